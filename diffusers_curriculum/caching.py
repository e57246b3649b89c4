"""``--cache_latents``: each training image through the VAE once, each caption through the text encoder once.

The frozen encoders give the same output every epoch, so encoding once and reusing is free quality-wise. The cache
holds the VAE posterior's mean and std, not a sample: each step still draws its latents from the posterior with the
regime's generator, so a cached run draws what an uncached one draws (and resumes exactly). Augmentations that
differ per epoch cannot be cached: a random flip is refused up front; a random crop is drawn once (epoch 0).
Every caption the data can give is encoded up front in fixed batches, so its embedding does not depend on the batch
that first met it and a resumed run reads exactly what an uninterrupted one does.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .buckets import bucket_groups


class LatentCache:
    """The posterior (mean, std) of every image of ``dataset`` under ``vae``, kept on the CPU in ``vae``'s dtype.
    With aspect-ratio buckets (``bucket_of``: each item's bucket) images are encoded a bucket at a time, so every
    batch the VAE sees has one shape."""

    def __init__(self, vae, dataset, batch_size: int, device, dtype: torch.dtype, disable_progress: bool = False,
                 bucket_of: Optional[Sequence[int]] = None):
        groups = [np.arange(len(dataset))] if bucket_of is None else bucket_groups(bucket_of)
        batches = [group[i:i + batch_size].tolist() for group in groups for i in range(0, len(group), batch_size)]
        self.mean: List[Optional[torch.Tensor]] = [None] * len(dataset)
        self.std: List[Optional[torch.Tensor]] = [None] * len(dataset)
        with torch.no_grad():
            for batch in tqdm(batches, desc="Caching latents", disable=disable_progress):
                pixels = torch.stack([dataset[i]["pixel_values"] for i in batch])
                posterior = vae.encode(pixels.to(device, dtype=dtype)).latent_dist
                for row, i in enumerate(batch):
                    self.mean[i], self.std[i] = posterior.mean[row].cpu(), posterior.std[row].cpu()

    def posterior(self, index: torch.Tensor, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the images at ``index`` (a batch's dataset indices), on ``device``."""
        rows = index.tolist()
        return (torch.stack([self.mean[i] for i in rows]).to(device), torch.stack([self.std[i] for i in rows]).to(device))


class TextEmbeddingCache:
    """The text side's output per caption (the denoiser's context and, for SDXL/SD3, the pooled embedding) for every
    caption the data set can give, computed up front in sorted batches of ``batch_size``. A caption's embedding
    then never depends on which batch first met it, so a resumed run reads exactly what an uninterrupted one does.
    ``tokenize(captions)`` and ``encode(input_ids)`` are the family's
    (:meth:`~diffusers_curriculum.families.StableDiffusionText.encode`)."""

    def __init__(self, tokenize: Callable[[Sequence[str]], Sequence[torch.Tensor]],
                 encode: Callable[[Sequence[torch.Tensor]], Tuple[torch.Tensor, Optional[torch.Tensor]]],
                 captions: Iterable[str], batch_size: int, disable_progress: bool = False):
        self.embeddings: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        unique = sorted(set(captions))
        with torch.no_grad():
            for start in tqdm(range(0, len(unique), batch_size), desc="Caching text embeddings", disable=disable_progress):
                chunk = unique[start:start + batch_size]
                hidden, pooled = encode(tokenize(chunk))
                for row, caption in enumerate(chunk):
                    self.embeddings[caption] = (hidden[row], None if pooled is None else pooled[row])

    def __call__(self, captions: Sequence[str]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        rows = [self.embeddings[caption] for caption in captions]
        pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        return torch.stack([r[0] for r in rows]), pooled
