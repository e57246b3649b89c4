"""Aspect-ratio buckets: train on images at (about) their own shape instead of square crops.

``--aspect_ratio_buckets "h,w;h,w;…"`` (diffusers' flag, parsed by diffusers' ``parse_buckets_string``) lists the
training sizes. Each image goes to the bucket nearest its aspect ratio (diffusers' ``find_nearest_bucket``), is
resized to cover that size and cropped to it; a batch holds one bucket's images only
(:class:`BucketBatchSampler`), so every batch stacks into one tensor.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import numpy as np

from .errors import UsageError

Bucket = Tuple[int, int]  # (height, width) in pixels


def parse_buckets(text: str, multiple: int = 1, flag: str = "--aspect_ratio_buckets") -> List[Bucket]:
    """The buckets of ``"h,w;h,w;…"``; a one-line error naming ``flag`` when one is malformed or not a multiple of
    ``multiple`` (what the VAE and the denoiser need to divide every side evenly)."""
    import warnings

    from diffusers.training_utils import parse_buckets_string

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its "not divisible by 8" hint: the check below names the real multiple
            buckets = parse_buckets_string(text)
    except ValueError as e:
        raise UsageError(f"{flag} {text!r}: {e}") from None
    for height, width in buckets:
        if height % multiple or width % multiple:
            raise UsageError(f"{flag}: bucket {height},{width} does not fit the model: both sides must be multiples of {multiple}")
    if len(set(buckets)) != len(buckets):
        raise UsageError(f"{flag} {text!r} lists a bucket twice")
    return buckets


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's (diffusers' ``find_nearest_bucket``)."""
    from diffusers.training_utils import find_nearest_bucket

    return find_nearest_bucket(height, width, buckets)


def bucket_groups(bucket_of: Sequence[int]) -> List[np.ndarray]:
    """The item indices of each bucket, buckets in ascending order."""
    bucket_of = np.asarray(bucket_of)
    return [np.flatnonzero(bucket_of == bucket) for bucket in np.unique(bucket_of)]


class BucketBatchSampler:
    """Full batches of ``batch_size`` items from one bucket each. Every epoch (read from ``dataset.epoch``, which the
    training loop sets) shuffles each bucket's items and then the batches, all drawn from (seed, epoch): a resumed
    run sees the batches an uninterrupted one does. Items left over in a bucket (fewer than a batch) wait for another
    epoch's shuffle, as ``drop_last`` does."""

    def __init__(self, dataset, bucket_of: Sequence[int], batch_size: int, seed: int = 0):
        self.dataset, self.bucket_of, self.batch_size, self.seed = dataset, np.asarray(bucket_of), batch_size, seed

    def __iter__(self) -> Iterator[List[int]]:
        rng = np.random.default_rng((int(self.seed), int(getattr(self.dataset, "epoch", 0)), 2))
        batches = []
        for group in bucket_groups(self.bucket_of):
            items = rng.permutation(group)
            batches += [items[i:i + self.batch_size].tolist() for i in range(0, len(items) - self.batch_size + 1, self.batch_size)]
        for i in rng.permutation(len(batches)):
            yield batches[i]

    def __len__(self) -> int:
        return int(sum(count // self.batch_size for count in np.unique(self.bucket_of, return_counts=True)[1]))
