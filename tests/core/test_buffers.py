"""HostBuffers: arrays taken for one save are handed out again only after recycle()."""

from __future__ import annotations

from checkpoint_hooks.core.buffers import HostBuffers


def test_arrays_are_reused_by_shape_and_type_after_recycle():
    made = []

    def allocate(shape, dtype):
        array = {"shape": shape, "dtype": dtype}
        made.append(array)
        return array

    buffers = HostBuffers(allocate)
    a, b, c = buffers.take((2, 3), "f4"), buffers.take((2, 3), "f4"), buffers.take((2, 3), "f8")
    assert len({id(a), id(b), id(c)}) == 3 and len(made) == 3  # none handed out twice in one save
    assert buffers.take((2, 3), "f4") is not a and len(made) == 4
    buffers.recycle()
    again = [buffers.take((2, 3), "f4") for _ in range(3)]
    assert {id(x) for x in again} <= {id(x) for x in made} and len({id(x) for x in again}) == 3
    assert buffers.take((3, 2), "f4")["shape"] == (3, 2) and len(made) == 5  # another shape: a new one
    assert buffers.take([2, 3], "f8") is c  # a list shape is the same shape
    buffers.clear()
    buffers.recycle()
    buffers.take((2, 3), "f4")
    assert len(made) == 6  # cleared: nothing kept
