"""Gradient task affinity between timestep groups (ANT, Go et al., NeurIPS 2023, Sec. 3).

TAS(a, b) is the cosine similarity between full-model gradients of the denoising loss at timestep groups a
and b. For every batch, all groups see the same images and the same noise (only t differs), the cosine
matrix of the groups' gradients is computed, and the matrices are averaged over batches. The result feeds
``--regime ant --ant_cost affinity``.

CLI (on a trained pipeline folder or Hub id)::

    python -m diffusers_curriculum.affinity --pretrained_model_name_or_path fmnist-ddpm --output_dir affinity
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Iterable, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import ArgumentParser, UsageError, describe_exception, exits_on_usage_error
from .losses import denoising_loss
from .noise import as_process
from .sampling import real_uniform


def group_timesteps(num_train_timesteps: int, group_size: int, batch_size: int, generator: torch.Generator,
                    continuous: bool = False) -> torch.Tensor:
    """(groups, batch_size) noise levels, uniform inside each group [g·size, min((g+1)·size, T)): integers, or reals
    for a ``continuous`` process (rectified flow)."""
    groups = -(-num_train_timesteps // group_size)
    low = torch.arange(groups) * group_size
    width = torch.clamp(num_train_timesteps - low, max=group_size)
    fraction = torch.rand(groups, batch_size, generator=generator)
    if continuous:
        return real_uniform(low[:, None], (low + width)[:, None], fraction.double())
    return low[:, None] + (fraction * width[:, None]).long()


def gradient_affinity(unet, scheduler, batches: Iterable[torch.Tensor], group_size: int = 10, seed: int = 0) -> np.ndarray:
    """(G, G) mean cosine similarity of the denoising-loss gradients of the G timestep groups; ``scheduler`` is the
    pipeline's (its noise process: DDPM or rectified flow)."""
    process = as_process(scheduler)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in unet.parameters() if p.requires_grad]
    T = process.num_train_timesteps
    total, count = None, 0
    for clean in batches:
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = group_timesteps(T, group_size, clean.shape[0], generator, process.continuous)
        grads = []
        for t in tqdm(timesteps, desc=f"affinity batch {count + 1}", leave=False):
            prediction = unet(process.add_noise(clean, noise, t), process.model_timesteps(t)).sample
            loss = denoising_loss(prediction, process, clean, noise, t).mean()
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        g = F.normalize(torch.stack(grads).double(), dim=1)
        cosine = (g @ g.T).numpy()
        total = cosine if total is None else total + cosine
        count += 1
    if count == 0:
        raise ValueError("no batches given")
    return total / count


def load_affinity(path: str, flag_name: str = "--affinity_path") -> Tuple[np.ndarray, int]:
    """(affinity matrix, group size) from an ``affinity.npz`` written by :func:`main`; a one-line error naming
    ``flag_name`` when it cannot be read."""
    try:
        with np.load(path) as f:
            return f["affinity"], int(f["group_size"])
    except Exception as e:
        raise UsageError(f"{flag_name} {path}: cannot read an affinity matrix ({describe_exception(e)})") from None


def plot_affinity(affinity: np.ndarray, group_size: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extent = [0, affinity.shape[0] * group_size, affinity.shape[0] * group_size, 0]
    fig, ax = plt.subplots(figsize=(5, 4.3))
    image = ax.imshow(affinity, cmap="viridis", extent=extent, vmin=min(0.0, float(affinity.min())), vmax=1.0)
    ax.set(xlabel="timestep", ylabel="timestep", title=f"Gradient task affinity (groups of {group_size})")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> Dict[str, Any]:
    """The CLI's flags as keyword arguments of :func:`write_affinity`."""
    parser = ArgumentParser(description="Gradient task affinity between timestep groups.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="A saved DDPM pipeline (folder or Hub id).")
    parser.add_argument("--output_dir", type=str, default="affinity")
    parser.add_argument("--dataset_name", type=str, default="fashion_mnist")
    parser.add_argument("--group_size", type=int, default=10)
    parser.add_argument("--num_batches", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return vars(parser.parse_args(argv))


def write_affinity(pretrained_model_name_or_path: str, output_dir: str = "affinity", dataset_name: str = "fashion_mnist",
                   group_size: int = 10, num_batches: int = 4, batch_size: int = 32, seed: int = 0) -> np.ndarray:
    """Measures the gradient affinity of the pipeline's UNet between timestep groups of ``group_size`` on
    ``num_batches`` batches of ``dataset_name``; writes ``affinity.npz`` (for ``--cluster_cost affinity``) and
    ``affinity.png`` to ``output_dir``."""
    from diffusers import DiffusionPipeline

    from . import schedulers  # noqa: F401  (pipelines saved in the old layout name this module)
    from .data import build_dataset

    for name, value in (("group_size", group_size), ("num_batches", num_batches), ("batch_size", batch_size)):
        if value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    try:
        pipeline = DiffusionPipeline.from_pretrained(pretrained_model_name_or_path, trust_remote_code=True)
    except Exception as e:
        raise UsageError(f"--pretrained_model_name_or_path {pretrained_model_name_or_path}: cannot load a DDPM pipeline ({type(e).__name__})") from None
    unet, scheduler = pipeline.unet, pipeline.scheduler
    if group_size > scheduler.config.num_train_timesteps:
        raise UsageError(f"--group_size {group_size} exceeds the {scheduler.config.num_train_timesteps} timesteps")
    dataset = build_dataset(dataset_name, resolution=unet.config.sample_size)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    batches = [torch.stack([dataset[int(i)]["pixel_values"] for i in order[b * batch_size : (b + 1) * batch_size]])
               for b in range(num_batches)]
    affinity = gradient_affinity(unet, scheduler, batches, group_size, seed)
    os.makedirs(output_dir, exist_ok=True)
    np.savez(os.path.join(output_dir, "affinity.npz"), affinity=affinity, group_size=group_size)
    plot_affinity(affinity, group_size, os.path.join(output_dir, "affinity.png"))
    print(f"wrote {output_dir}/affinity.npz ({affinity.shape[0]}×{affinity.shape[0]} groups) and affinity.png")
    return affinity


@exits_on_usage_error
def main(argv=None) -> np.ndarray:
    return write_affinity(**parse_args(argv))


if __name__ == "__main__":
    main()
