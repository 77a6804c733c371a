"""Aspect-ratio buckets (lycoris_core/train/buckets.py): the bucket sizes, the bucket and crop each
image gets, and the batches drawn from buckets (one bucket per batch, in proportion to size,
reproducible and resumable)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lycoris_core.errors import LycorisError
from lycoris_core.train import BucketSampler, aspect_error, bucket_sizes, nearest_bucket, place


@st.composite
def bucket_settings(draw):
    step = draw(st.sampled_from([8, 16, 32, 64]))
    resolution = draw(st.integers(step, 24 * step))
    min_side = draw(st.integers(1, resolution // step * step))  # leaves the square at least
    max_side = draw(st.integers(resolution, 4 * resolution))
    return resolution, step, min_side, max_side


image_size = st.tuples(st.integers(1, 4000), st.integers(1, 4000))


@given(bucket_settings())
@settings(max_examples=200, deadline=None)
def test_buckets_fit_the_area_the_step_and_the_side_limits(args):
    resolution, step, min_side, max_side = args
    sizes = bucket_sizes(resolution, step, min_side, max_side)
    assert sizes and len(set(sizes)) == len(sizes)
    for w, h in sizes:
        assert w * h <= resolution * resolution
        assert w % step == 0 and h % step == 0
        assert min_side <= w <= max_side and min_side <= h <= max_side
    assert {(h, w) for w, h in sizes} == set(sizes)  # portrait and landscape alike


@given(bucket_settings())
@settings(max_examples=100, deadline=None)
def test_each_bucket_is_the_largest_of_its_width_or_of_its_height(args):
    resolution, step, min_side, max_side = args

    def fits(w, h):
        return max(w, h) <= max_side and w * h <= resolution * resolution

    for w, h in bucket_sizes(resolution, step, min_side, max_side):
        assert not fits(w, h + step) or not fits(w + step, h) or w == h  # or the largest square


def test_the_square_and_the_usual_sdxl_buckets_are_there():
    sizes = bucket_sizes(1024, 64, 256, 2048)
    assert {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (1536, 640)} <= set(sizes)


def test_settings_that_leave_no_bucket_are_refused():
    with pytest.raises(LycorisError, match="no bucket fits"):
        bucket_sizes(256, 64, 512, 1024)
    with pytest.raises(LycorisError, match="step"):
        bucket_sizes(32, 64)


@given(bucket_settings(), image_size)
@settings(max_examples=300, deadline=None)
def test_the_chosen_bucket_minimises_the_aspect_ratio_error(args, size):
    sizes = bucket_sizes(*args)
    chosen = nearest_bucket(size, sizes)
    ratio = math.log(size[0] / size[1])
    best = min(abs(ratio - math.log(w / h)) for w, h in sizes)  # brute force
    assert aspect_error(size, chosen) == pytest.approx(best, abs=1e-12)


def test_an_image_with_a_bucket_aspect_ratio_gets_that_bucket_and_no_crop():
    sizes = bucket_sizes(1024, 64, 256, 2048)
    placement = place((608, 416), sizes)  # 1216 x 832 halved
    assert placement.bucket == (1216, 832) and placement.resized == (1216, 832) and placement.crop == (0, 0)


@given(bucket_settings(), image_size)
@settings(max_examples=300, deadline=None)
def test_resize_covers_the_bucket_keeps_the_aspect_ratio_and_crops_centred(args, size):
    placement = place(size, bucket_sizes(*args))
    (bw, bh), (rw, rh), (left, top) = placement.bucket, placement.resized, placement.crop
    assert rw >= bw and rh >= bh
    assert rw == bw or rh == bh  # the smallest covering size: one side fits exactly
    scale = max(bw / size[0], bh / size[1])
    assert abs(rw - size[0] * scale) <= 0.5 + 1e-9 or rw == bw
    assert abs(rh - size[1] * scale) <= 0.5 + 1e-9 or rh == bh
    assert (left, top) == ((rw - bw) // 2, (rh - bh) // 2)
    assert placement.crop_box == (left, top, left + bw, top + bh)


def test_a_2_to_1_image_in_a_small_bucket_set():
    placement = place((64, 32), bucket_sizes(64, 16, 32, 128))
    assert placement.bucket == (80, 48)  # log(80/48) is nearer log 2 than log(96/32)
    assert placement.resized == (96, 48) and placement.crop_box == (8, 0, 88, 48)


# ----- batches ----------------------------------------------------------------------------------
def test_one_bucket_draws_a_reshuffled_order_as_before_buckets_existed():
    g, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sampler = BucketSampler([7], 3, g)
    order: list[int] = []
    expected = []
    for _ in range(12):
        if not order:
            order = torch.randperm(7, generator=ref).tolist()
        expected.append(order.pop())
    drawn = [i for _ in range(4) for i in sampler.draw()[1]]
    assert drawn == expected
    assert torch.equal(g.get_state(), ref.get_state())  # no bucket draw consumed the generator


def test_batches_never_mix_buckets_and_cover_each_bucket_every_epoch():
    sizes = [5, 2, 9]
    sampler = BucketSampler(sizes, 4, torch.Generator().manual_seed(0))
    seen = {k: [] for k in range(3)}
    for _ in range(300):
        bucket, idx = sampler.draw(batches=2)
        lo = sampler.offsets[bucket]
        assert len(idx) == 2 * min(4, sizes[bucket])
        assert all(lo <= i < lo + sizes[bucket] for i in idx)
        seen[bucket].extend(idx)
    for k, size in enumerate(sizes):  # every image of a bucket once per pass through its order
        full = len(seen[k]) // size * size
        counts = torch.bincount(torch.tensor(seen[k][:full]) - sampler.offsets[k], minlength=size)
        assert counts.min() == counts.max() > 0


def test_buckets_are_drawn_in_proportion_to_their_size():
    sizes = [30, 10, 60]
    sampler = BucketSampler(sizes, 1, torch.Generator().manual_seed(1))
    n = 6000
    counts = torch.bincount(torch.tensor([sampler.draw()[0] for _ in range(n)]), minlength=3).double()
    expected = torch.tensor(sizes, dtype=torch.float64) / sum(sizes) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_the_same_seed_draws_the_same_batches():
    def run(seed):
        sampler = BucketSampler([3, 4], 2, torch.Generator().manual_seed(seed))
        return [sampler.draw() for _ in range(20)]

    assert run(3) == run(3) and run(3) != run(4)


def test_a_resumed_sampler_continues_exactly():
    g = torch.Generator().manual_seed(2)
    whole = BucketSampler([3, 5, 2], 2, g)
    first = [whole.draw() for _ in range(7)]
    saved_g, saved_orders = g.get_state(), [list(o) for o in whole.orders]
    rest = [whole.draw() for _ in range(9)]

    g2 = torch.Generator().manual_seed(99)
    resumed = BucketSampler([3, 5, 2], 2, g2)
    g2.set_state(saved_g)
    resumed.orders = saved_orders
    assert [resumed.draw() for _ in range(9)] == rest and first


def test_an_empty_bucket_is_refused():
    with pytest.raises(LycorisError, match="at least one image"):
        BucketSampler([3, 0], 1, torch.Generator())
