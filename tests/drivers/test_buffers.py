"""The read-buffer pool: only its own buffers come back, and it stays bounded."""

from __future__ import annotations

from tapnbd import buffers


def test_small_buffers_are_plain_and_zeroed() -> None:
    buf = buffers.take(4096)
    assert type(buf) is bytearray and buf == bytes(4096)
    buffers.give(buf)  # ignored: not from the pool
    assert 4096 not in buffers._free


def test_big_buffers_are_reused_and_bounded() -> None:
    size = buffers.POOL_MIN * 3
    taken = [buffers.take(size) for _ in range(buffers.PER_SIZE + 4)]
    assert all(type(b) is buffers.PooledBuffer for b in taken)
    for b in taken:
        buffers.give(b)
    assert len(buffers._free[size]) == buffers.PER_SIZE
    again = buffers.take(size)
    assert any(again is b for b in taken)
    buffers.give(bytearray(size))  # a stranger's bytearray never enters the pool
    assert all(type(b) is buffers.PooledBuffer for b in buffers._free[size])


def test_many_sizes_do_not_grow_the_pool() -> None:
    buffers._free.clear()
    buffers._held = 0
    for i in range(buffers.MAX_SIZES * 3):
        buffers.give(buffers.take(buffers.POOL_MIN + 512 * i))
    assert len(buffers._free) <= buffers.MAX_SIZES
    assert buffers._held == sum(size * len(f) for size, f in buffers._free.items())


def test_a_new_size_drops_only_the_stalest() -> None:
    """A client cycling through more sizes than the pool keeps must not empty it: the
    size in steady use keeps its buffers, and the one given back longest ago goes."""
    buffers._free.clear()
    buffers._held = 0
    common = 1 << 20
    kept = buffers.take(common)
    buffers.give(kept)
    for i in range(buffers.MAX_SIZES * 2):
        buffers.give(buffers.take(buffers.POOL_MIN + 512 * i))
        again = buffers.take(common)  # the steady size, between the odd ones
        assert again is kept, i
        buffers.give(again)
    assert len(buffers._free) == buffers.MAX_SIZES
    assert buffers._held == sum(size * len(f) for size, f in buffers._free.items())


def test_pool_is_bounded_in_bytes() -> None:
    # Eight 32 MiB buffers of one size would be 256 MiB kept for ever: MAX_BYTES caps it.
    buffers._free.clear()
    buffers._held = 0
    size = 32 << 20
    taken = [buffers.take(size) for _ in range(buffers.PER_SIZE)]
    for b in taken:
        buffers.give(b)
    assert len(buffers._free[size]) * size <= buffers.MAX_BYTES
    assert buffers._held == len(buffers._free[size]) * size
    buffers.take(size)
    assert buffers._held == len(buffers._free[size]) * size


def test_shared_zeroes_are_read_only() -> None:
    assert buffers.ZEROES.readonly and len(buffers.ZEROES) == 32 << 20


def test_big_buffers_start_on_a_page() -> None:
    # A read buffer a few bytes past a page boundary made the kernel's copy into it five
    # times slower ("4K aliasing"): pooled buffers are page-aligned, whatever malloc did.
    for size in (buffers.POOL_MIN, 1 << 20, (2 << 20) + 512):
        buf = buffers.take(size)
        assert len(buf) == size and buf == bytes(size)
        assert buffers._address(buf) % buffers.PAGE == 0
        memoryview(buf)[-1:] = b"x"  # its bytes are its own to the end
        buffers.give(buf)
