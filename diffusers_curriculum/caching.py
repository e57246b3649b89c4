"""``--cache_latents``: each training image through the VAE once, each caption through the text encoder once.

The frozen encoders give the same output every epoch, so encoding once and reusing is free quality-wise. The cache
holds the VAE posterior's mean and std, not a sample: each step still draws its latents from the posterior with the
regime's generator, so a cached run draws what an uncached one draws (and resumes exactly). Augmentations that
differ per epoch cannot be cached: a random flip is refused up front; a random crop is drawn once (epoch 0).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm


class LatentCache:
    """The posterior (mean, std) of every image of ``dataset`` under ``vae``, kept on the CPU in ``vae``'s dtype."""

    def __init__(self, vae, dataset, batch_size: int, device, dtype: torch.dtype, disable_progress: bool = False):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                             collate_fn=lambda items: torch.stack([item["pixel_values"] for item in items]))
        means, stds = [], []
        with torch.no_grad():
            for pixels in tqdm(loader, desc="Caching latents", disable=disable_progress):
                posterior = vae.encode(pixels.to(device, dtype=dtype)).latent_dist
                means.append(posterior.mean.cpu())
                stds.append(posterior.std.cpu())
        self.mean, self.std = torch.cat(means), torch.cat(stds)

    def posterior(self, index: torch.Tensor, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the images at ``index`` (a batch's dataset indices), on ``device``."""
        index = index.cpu()
        return self.mean[index].to(device), self.std[index].to(device)


class TextEmbeddingCache:
    """The text side's output per caption (the UNet's context and, for SDXL, the pooled embedding), computed the first
    time a caption is seen. ``encode(input_ids)`` is the family's
    (:meth:`~diffusers_curriculum.families.StableDiffusionText.encode`), over one tensor of ids per tokenizer."""

    def __init__(self, encode: Callable[[Sequence[torch.Tensor]], Tuple[torch.Tensor, Optional[torch.Tensor]]]):
        self.encode = encode
        self.embeddings: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    def __call__(self, captions: Sequence[str], input_ids: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        missing = [i for i, caption in enumerate(captions) if caption not in self.embeddings]
        if missing:
            with torch.no_grad():
                hidden, pooled = self.encode([ids[missing] for ids in input_ids])
            for row, i in enumerate(missing):
                self.embeddings.setdefault(captions[i], (hidden[row], None if pooled is None else pooled[row]))
        rows = [self.embeddings[caption] for caption in captions]
        pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        return torch.stack([r[0] for r in rows]), pooled
