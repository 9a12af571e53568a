"""fastsft/plan/device.py: a GPU's memory read from the command line, and PyTorch's CUDA caching allocator
as the plan replays it (the rounding, the two pools, splitting, caching and merging, expandable segments),
which decides the reserved memory the plan reports."""

import pytest

from fastsft.plan.device import CachingAllocator, GiB, MiB, allocator_rounding


@pytest.mark.parametrize(
    "text, said",
    [
        ("9" * 400, "is more than 4,096 GiB, far past any one GPU"),  # was an OverflowError traceback
        ("1000000", "is more than 4,096 GiB"),  # 1,000,000 GiB
        ("0", "less than 1 MiB"),
    ],
)
def test_a_gpu_memory_past_any_gpu_is_refused(text, said):
    from fastsft.plan.device import parse_size

    with pytest.raises(ValueError, match=said):
        parse_size(text)
    assert parse_size("80GB") == 80 * GiB


def test_allocator_rounding():
    assert [allocator_rounding(n) for n in (0, 1, 512, 513)] == [0, 512, 512, 1024]
    assert allocator_rounding(20 * MiB) == 20 * MiB  # up to kLargeBuffer: 512-byte blocks
    assert allocator_rounding(20 * MiB + 1) == 22 * MiB  # above: 2 MiB steps


def test_small_requests_share_a_2_mib_segment_and_large_ones_a_20_mib_one():
    a = CachingAllocator()
    a.malloc(1000), a.malloc(1000), a.malloc(MiB - 2048)  # up to 1 MiB: the small pool
    assert a.reserved == 2 * MiB
    three = a.malloc(3 * MiB)  # under 10 MiB: a 20 MiB segment, split
    assert a.reserved == 22 * MiB
    five = a.malloc(5 * MiB)  # from the rest of that segment
    assert a.reserved == 22 * MiB
    a.malloc(13 * MiB)  # the 12 MiB left are too few; 10 MiB and more: a segment of its own, in 2 MiB
    assert a.reserved == 36 * MiB
    a.release(three)
    a.release(five)  # merged with its free neighbours: the 20 MiB segment is one free block again
    a.malloc(19 * MiB)
    assert a.reserved == a.reserved_peak == 36 * MiB  # nothing new, nothing returned


def test_a_freed_block_that_is_not_merged_is_not_reused_for_a_larger_request():
    a = CachingAllocator()
    first = a.malloc(12 * MiB)
    a.malloc(12 * MiB)
    a.release(first)
    a.malloc(14 * MiB)  # 12 MiB cached, too small: a new segment
    assert a.reserved == 38 * MiB
    a.malloc(12 * MiB)  # the cached block
    assert a.reserved == 38 * MiB


def test_expandable_segments_grow_in_2_mib_pages():
    a = CachingAllocator(expandable=True)
    b = a.malloc(3 * MiB)
    assert a.reserved == 4 * MiB  # the request in 2 MiB pages, no 20 MiB segment
    a.release(b)
    a.malloc(7 * MiB)  # the free tail grows by the missing pages
    assert a.reserved == 8 * MiB
    a.malloc(1 * MiB + 1)  # past 1 MiB: the large pool, appended pages
    assert a.reserved == 10 * MiB
