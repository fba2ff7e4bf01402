"""tapnbd's benchmark harness: the fio peer table (issue 2) and the blktap Bonnie table (issue 6).

Run it with ``python -m bench`` (``make bench``); see bench/README.md.
"""
