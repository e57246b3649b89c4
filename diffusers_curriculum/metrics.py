"""Feature-FID for the offline data sets (no Inception download is possible here).

A small CNN is trained once (seeded, cached as safetensors) to classify Fashion-MNIST; its penultimate
128-d activations are the features of torchmetrics' ``FrechetInceptionDistance(feature=<module>)``.
The numbers are comparable between runs that use the same extractor (same seed and training recipe),
not to Inception FIDs in papers. Report FID(real, held-out real) next to them as the floor.

    extractor = fashion_feature_extractor()                      # trains on first use, then cached
    fid = feature_fid(real_images, generated_images, extractor)   # images: (N, 1, H, W) floats in [0, 1]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CACHE = Path(os.environ.get("DIFFUSERS_CURRICULUM_CACHE", Path.home() / ".cache" / "diffusers_curriculum"))


class FashionFeatures(nn.Module):
    """Two conv blocks and a 128-d embedding; ``forward`` returns the embedding (the FID features),
    ``classify`` the 10 class logits it was trained with. Inputs: (N, 1 or 3, H, W) floats in [0, 1]."""

    num_features = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
        return self.body(x * 2 - 1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))


def train_feature_extractor(images: torch.Tensor, labels: torch.Tensor, epochs: int = 2, seed: int = 0,
                            batch_size: int = 256) -> FashionFeatures:
    """Trains :class:`FashionFeatures` on ``images`` (N, 1, 28, 28) in [0, 1] with cross-entropy."""
    torch.manual_seed(seed)
    model = FashionFeatures()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model.classify(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def fashion_mnist_unit(split: str = "train"):
    """Fashion-MNIST as ((N, 1, 28, 28) floats in [0, 1], labels)."""
    from .data import load_fashion_mnist

    images, labels = load_fashion_mnist(split)
    return torch.from_numpy(images.copy()).float().div_(255.0)[:, None], torch.from_numpy(labels)


def fashion_feature_extractor(cache_dir: Optional[Path] = None, seed: int = 0, epochs: int = 2) -> FashionFeatures:
    """The cached extractor for ``seed``/``epochs``; trains it on Fashion-MNIST's train split on first use."""
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir or DEFAULT_CACHE) / f"fashion_features_seed{seed}_epochs{epochs}.safetensors"
    model = FashionFeatures()
    if path.exists():
        model.load_state_dict(load_file(path))
        return model.eval()
    images, labels = fashion_mnist_unit("train")
    model = train_feature_extractor(images, labels, epochs=epochs, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(model.state_dict(), tmp)
    os.replace(tmp, path)  # a concurrent or interrupted first use never leaves a half-written cache
    return model


@torch.no_grad()
def classifier_accuracy(model: FashionFeatures, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model.classify(images).argmax(1) == labels).float().mean())


@torch.no_grad()
def class_agreement(model: FashionFeatures, images: torch.Tensor, requested: torch.Tensor, num_classes: int = 10,
                    batch_size: int = 500) -> dict:
    """How often the classifier assigns generated ``images`` to the class they were ``requested`` for: the share
    per requested class (None for a class not requested) and its mean over the requested classes. Measures
    conditioning, next to the FID that measures quality."""
    predicted = torch.cat([model.classify(images[i : i + batch_size]).argmax(1) for i in range(0, images.shape[0], batch_size)])
    hits = (predicted == requested).float()
    per_class = [float(hits[requested == c].mean()) if bool((requested == c).any()) else None for c in range(num_classes)]
    shares = [share for share in per_class if share is not None]
    return {"per_class": per_class, "mean": sum(shares) / len(shares) if shares else float("nan")}


@torch.no_grad()
def feature_fid(real: torch.Tensor, fake: torch.Tensor, extractor: nn.Module, batch_size: int = 500) -> float:
    """FID between two image sets, (N, C, H, W) floats in [0, 1], on ``extractor``'s features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=extractor, normalize=True)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, images.shape[0], batch_size):
            metric.update(images[start : start + batch_size].float(), real=is_real)
    return float(metric.compute())


@torch.no_grad()
def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights_path: str, batch_size: int = 100) -> float:
    """Standard FID on Inception-v3 pool features, for when the FID Inception weights exist locally
    (``pt_inception-2015-12-05-6726825d.pth``; nothing is downloaded). Needs ``torch-fidelity``
    (``pip install "diffusers-curriculum[inception]"``). Images: (N, 1 or 3, H, W) floats in [0, 1]."""
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"Inception weights {weights_path} do not exist; real-Inception FID needs them locally")
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=weights_path)
    except ModuleNotFoundError as e:
        raise ImportError(f'real-Inception FID needs torch-fidelity: pip install "diffusers-curriculum[inception]" ({e})') from None
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].float()
            metric.update(batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch, real=is_real)
    return float(metric.compute())
