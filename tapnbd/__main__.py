from tapnbd.cli import main

main()
