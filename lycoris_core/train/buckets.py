"""Aspect-ratio buckets for training on images of mixed sizes, and the batches drawn from them.

An image is trained at the bucket whose aspect ratio is nearest its own: the candidate sizes are,
for every width that is a multiple of `step` between `min_side` and `max_side`, the tallest height
(also a multiple of `step`, at most `max_side`) whose area stays within `resolution^2`, plus the
largest square (kohya's scheme). The image is resized to cover the bucket and the excess is cut
off equally on both sides. Aspect ratios are compared on a log scale, so 2:1 and 1:2 are equally
far from a square.

Every batch comes from one bucket (a batch is one tensor, so one size): the bucket is drawn in
proportion to its number of images, then the next images of that bucket's own order, which is
reshuffled every time it runs out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import LycorisError

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class Placement:
    """Where one image goes: its bucket, the size it is resized to (covering the bucket, aspect
    ratio kept) and the top-left corner of the centred crop of the bucket's size."""

    bucket: Size
    resized: Size
    crop: tuple[int, int]

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop inside the resized image (PIL's box)."""
        (left, top), (w, h) = self.crop, self.bucket
        return left, top, left + w, top + h


def bucket_sizes(resolution: int, step: int = 64, min_side: int = 256, max_side: int = 1024) -> list[Size]:
    """Every bucket (width, height) for a target area of `resolution`^2: sides multiples of `step`
    within [min_side, max_side], area at most resolution^2, each the largest for its width."""
    if step < 1 or resolution < step:
        raise LycorisError(f"bucket step must be >= 1 and at most the resolution, found step {step} "
                           f"and resolution {resolution}")
    low = math.ceil(min_side / step) * step
    high = (max_side // step) * step
    area = resolution * resolution
    sizes = set()
    square = (resolution // step) * step
    if low <= square <= high:
        sizes.add((square, square))
    for width in range(max(low, step), high + 1, step):
        height = min(high, (area // width) // step * step)
        if height >= low:
            sizes.update({(width, height), (height, width)})
    if not sizes:
        raise LycorisError(f"no bucket fits: sides from {min_side} to {max_side} in steps of {step} "
                           f"leave no size with an area within {resolution}^2")
    return sorted(sizes)


def aspect_error(size: Size, bucket: Size) -> float:
    """How far the bucket's aspect ratio is from the image's: |log(w/h) - log(bw/bh)|."""
    return abs(math.log(size[0] / size[1]) - math.log(bucket[0] / bucket[1]))


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket with the nearest aspect ratio (ties: the larger, then the wider one)."""
    if size[0] < 1 or size[1] < 1:
        raise LycorisError(f"an image of {size[0]}x{size[1]} pixels cannot be bucketed")
    return min(buckets, key=lambda b: (aspect_error(size, b), -b[0] * b[1], -b[0]))


def place(size: Size, buckets: Sequence[Size]) -> Placement:
    """The image's bucket, resize (the smallest covering the bucket, aspect ratio kept) and
    centred crop."""
    bucket = nearest_bucket(size, buckets)
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    resized = (max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale)))
    return Placement(bucket, resized, ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2))


class BucketSampler:
    """The images each optimiser step trains on, for a dataset whose images are numbered bucket
    after bucket (`sizes[k]` images in bucket k). With one bucket no bucket is drawn, so the draws
    are those of a plain reshuffled-every-epoch order."""

    def __init__(self, sizes: Sequence[int], batch_size: int, generator: torch.Generator):
        if not sizes or min(sizes) < 1:
            raise LycorisError(f"every bucket needs at least one image, found bucket sizes {list(sizes)}")
        self.sizes = [int(s) for s in sizes]
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        self.weights = torch.tensor(self.sizes, dtype=torch.float64)
        self.batch = batch_size
        self.g = generator
        self.orders: list[list[int]] = [[] for _ in self.sizes]

    def batch_size(self, bucket: int) -> int:
        """A batch of this bucket (the bucket whole when it has fewer images than a batch)."""
        return min(self.batch, self.sizes[bucket])

    def take(self, bucket: int, count: int) -> list[int]:
        """The next `count` images of the bucket's order (dataset-wide numbers)."""
        out = []
        order = self.orders[bucket]
        while len(out) < count:
            if not order:
                order.extend(torch.randperm(self.sizes[bucket], generator=self.g).tolist())
            out.append(order.pop())
        offset = self.offsets[bucket]
        return [offset + i for i in out] if offset else out

    def draw(self, batches: int = 1) -> tuple[int, list[int]]:
        """A bucket (in proportion to its size) and `batches` batches of its images."""
        bucket = 0 if len(self.sizes) == 1 else int(torch.multinomial(self.weights, 1, generator=self.g))
        return bucket, self.take(bucket, batches * self.batch_size(bucket))
