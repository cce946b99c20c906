"""edgekd.native: the allocator setting the training loops run inside."""

import resource

import pytest
import torch

from edgekd.native import _glibc, retained_heap


def _faults_for_large_buffers(times: int = 4) -> int:
    """Minor page faults taken while allocating, touching and freeing a 64 MB buffer ``times`` times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")
def test_retained_heap_reuses_freed_buffers():
    outside = _faults_for_large_buffers()
    with retained_heap():
        _faults_for_large_buffers(4)  # the heap grows to fit over the first few allocations
        inside = _faults_for_large_buffers(8)
    # with glibc's defaults a 64 MB buffer is mmap-ed, and its ~16k pages fault in again after every free
    assert outside >= 16000
    assert inside <= 16400  # 8 buffers, at most one of them on fresh pages (glibc's defaults: all 8)


def test_retained_heap_is_a_decorator_that_returns_the_value_and_raises_through():
    @retained_heap()
    def f(x):
        if x < 0:
            raise ValueError("negative")
        return x + 1

    assert f(1) == 2
    with pytest.raises(ValueError):
        f(-1)
    assert f(2) == 3  # usable again after an exception
