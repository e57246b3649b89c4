"""The difficulty study of Kim et al. (arXiv 2403.10348): which timesteps are hard denoising tasks?

Two measurements, both per timestep:

* **convergence** — the denoising loss of timestep buckets on a fixed evaluation batch (fixed images,
  noise and timesteps), tracked while a model trains; each bucket's curve is normalised by its final
  value and summarised as the first step after which it stays within ``tolerance`` of that value;
* **relative entropy** — KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)), the per-timestep VLB term. Both
  are Gaussians with the posterior variance β̃_t, so KL = ‖μ̃_t(x_t, x_0) − μ_θ(x_t, t)‖² / (2 β̃_t), and
  with μ = c₀·x̂₀ + c_t·x_t this is c₀² ‖x_0 − x̂_0‖² / (2 β̃_t), summed over pixels, averaged over data.

Training and the convergence curves go through the noise process (``--noise_process ddpm|flow``): under rectified
flow the buckets are intervals of its noise levels. The relative entropy is the DDPM posterior's and is measured
for DDPM only (a rectified flow's sampler has no Gaussian posterior to compare with).

CLI (trains a small UNet on Fashion-MNIST, writes ``difficulty.npz``, ``difficulty.json`` and two PNGs)::

    python -m diffusers_curriculum.difficulty --output_dir difficulty-study --max_train_steps 1500
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ArgumentParser, UsageError, exits_on_usage_error
from .losses import denoising_loss
from .noise import NOISE_PROCESSES, as_process, make_process

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> model output


def predicted_x0(scheduler, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂₀ from the model's output for ε, v or x₀ targets (shapes ``(B, C, H, W)``, ``t``: ``(B,)``)."""
    alpha_bar = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, *([1] * (x_t.ndim - 1)))
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def posterior_terms(scheduler, t: torch.Tensor):
    """(c₀, β̃_t) of q(x_{t-1} | x_t, x_0) = N(c₀ x_0 + c_t x_t, β̃_t I) for timesteps ``t`` ≥ 1 (Ho et al. eq. 7)."""
    if int(t.min()) < 1:
        raise ValueError("the relative entropy is defined for t >= 1 (t = 0 is the decoder term)")
    alphas_cumprod = scheduler.alphas_cumprod.double()
    betas = scheduler.betas.double()
    alpha_bar, alpha_bar_prev, beta = alphas_cumprod[t], alphas_cumprod[t - 1], betas[t]
    c0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
    posterior_variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    return c0, posterior_variance


@torch.no_grad()
def relative_entropy(
    denoiser: Denoiser, scheduler, x0: torch.Tensor, timesteps: Sequence[int], generator: Optional[torch.Generator] = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Mean over ``x0`` of KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) in nats, for each t in ``timesteps``."""
    generator = generator or torch.Generator().manual_seed(0)
    result = []
    for t_value in timesteps:
        total = 0.0
        for start in range(0, x0.shape[0], batch_size):
            clean = x0[start : start + batch_size]
            t = torch.full((clean.shape[0],), int(t_value), dtype=torch.long)
            noise = torch.randn(clean.shape, generator=generator).to(clean)
            x_t = scheduler.add_noise(clean, noise, t)
            x0_hat = predicted_x0(scheduler, denoiser(x_t, t), x_t, t)
            c0, variance = posterior_terms(scheduler, t[:1])
            squared = (clean.double() - x0_hat.double()).pow(2).flatten(1).sum(1)
            total += float((c0**2 * squared / (2 * variance)).sum())
        result.append(total / x0.shape[0])
    return np.asarray(result)


@torch.no_grad()
def bucket_losses(denoiser: Denoiser, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  buckets: torch.Tensor, num_buckets: int, scheduler) -> np.ndarray:
    """Mean denoising loss per timestep bucket on a fixed evaluation batch; ``timesteps`` are noise levels of the
    ``scheduler``'s process (the denoiser is fed what the network is fed for them)."""
    process = as_process(scheduler)
    x_t = process.add_noise(x0, noise, timesteps)
    per_sample = denoising_loss(denoiser(x_t, process.model_timesteps(timesteps)), process, x0, noise, timesteps)
    return torch.zeros(num_buckets).index_add_(0, buckets, per_sample).div_(torch.bincount(buckets, minlength=num_buckets)).numpy()


def steps_to_converge(steps: np.ndarray, curves: np.ndarray, tolerance: float = 0.1) -> np.ndarray:
    """For each bucket (column of ``curves``, rows = evaluations at ``steps``): the first step from which the
    curve, normalised by its final value, stays within ``1 ± tolerance``."""
    normalised = curves / curves[-1:]
    inside = np.abs(normalised - 1.0) <= tolerance
    # index of the first evaluation after the last one outside the band
    outside_rev = ~inside[::-1]
    last_outside = np.where(outside_rev.any(0), curves.shape[0] - 1 - outside_rev.argmax(0), -1)
    return steps[np.minimum(last_outside + 1, len(steps) - 1)]


# ---- CLI ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyConfig:
    """The study's settings (the CLI's flags), checked when made."""

    output_dir: str = "difficulty-study"
    dataset_name: str = "fashion_mnist"
    resolution: int = 32
    block_out_channels: Tuple[int, ...] = (32, 64, 64)
    max_train_steps: int = 1500
    train_batch_size: int = 32
    learning_rate: float = 1e-3
    ddpm_num_steps: int = 1000
    noise_process: str = "ddpm"
    flow_shift: float = 1.0
    num_buckets: int = 10
    eval_every: int = 50
    eval_samples: int = 512
    kl_timesteps: int = 50
    kl_samples: int = 256
    tolerance: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.block_out_channels, str):  # the flag's comma-separated form
            try:
                object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels.split(",")))
            except ValueError:
                raise UsageError(f"--block_out_channels {self.block_out_channels!r}: expected comma-separated integers") from None
        for name in ("max_train_steps", "train_batch_size", "ddpm_num_steps", "num_buckets", "eval_every", "eval_samples",
                     "kl_timesteps", "kl_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.num_buckets > self.ddpm_num_steps:
            raise UsageError(f"--num_buckets {self.num_buckets} is more than --ddpm_num_steps {self.ddpm_num_steps}")
        if self.kl_timesteps > self.ddpm_num_steps - 1:
            raise UsageError(f"--kl_timesteps must be <= --ddpm_num_steps - 1 = {self.ddpm_num_steps - 1}")
        if not self.flow_shift > 0 or (self.flow_shift != 1.0 and self.noise_process != "flow"):
            raise UsageError(f"--flow_shift {self.flow_shift}: a shift > 0 of --noise_process flow")
        if not 0 < self.tolerance < 1:
            raise UsageError(f"--tolerance must be in (0, 1), got {self.tolerance}")


def parse_args(argv=None) -> StudyConfig:
    parser = ArgumentParser(description="Per-timestep difficulty study: convergence and relative entropy.")
    parser.add_argument("--output_dir", type=str, default="difficulty-study")
    parser.add_argument("--dataset_name", type=str, default="fashion_mnist")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--block_out_channels", type=str, default="32,64,64")
    parser.add_argument("--max_train_steps", type=int, default=1500)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--ddpm_num_steps", type=int, default=1000, help="T: DDPM's timesteps, or the flow's grid of noise levels.")
    parser.add_argument("--noise_process", type=str, default="ddpm", choices=NOISE_PROCESSES,
                        help="ddpm, or flow (rectified flow: convergence curves only, no relative entropy).")
    parser.add_argument("--flow_shift", type=float, default=1.0, help="--noise_process flow: the scheduler's shift.")
    parser.add_argument("--num_buckets", type=int, default=10, help="Timestep buckets for the convergence curves.")
    parser.add_argument("--eval_every", type=int, default=50, help="Steps between evaluations of the bucket losses.")
    parser.add_argument("--eval_samples", type=int, default=512, help="Images (per bucket pass) in the fixed evaluation batch.")
    parser.add_argument("--kl_timesteps", type=int, default=50, help="Timesteps (evenly spaced in [1, T)) for the relative entropy.")
    parser.add_argument("--kl_samples", type=int, default=256)
    parser.add_argument("--tolerance", type=float, default=0.1, help="Band around the final loss for steps-to-converge.")
    parser.add_argument("--seed", type=int, default=0)
    return StudyConfig(**vars(parser.parse_args(argv)))


def run_study(config: StudyConfig) -> Dict[str, object]:
    from diffusers import UNet2DModel

    from .data import build_dataset, load_fashion_mnist, TensorImageDataset
    from .models import unet_config_from_args
    from .regimes import Regime
    from .sampling import UniformSampler

    torch.manual_seed(config.seed)
    dataset = build_dataset(config.dataset_name, resolution=config.resolution)
    unet_config = unet_config_from_args(None, config.resolution, 1, list(config.block_out_channels), 1)
    model = UNet2DModel.from_config(unet_config)
    process = make_process(config.noise_process, config.ddpm_num_steps, shift=config.flow_shift)
    sampler = UniformSampler(config.ddpm_num_steps, seed=config.seed)
    sampler.continuous = process.continuous
    regime = Regime(process, sampler, seed=config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(config.seed))

    # Held-out evaluation images (test split for Fashion-MNIST), with fixed noise and timesteps.
    if config.dataset_name == "fashion_mnist":
        images, labels = load_fashion_mnist("test")
        held_out = TensorImageDataset(images, labels, config.resolution)
    else:
        held_out = dataset
    eval_gen = torch.Generator().manual_seed(config.seed + 1)
    eval_x0 = torch.stack([held_out[i]["pixel_values"] for i in range(min(config.eval_samples, len(held_out)))])
    eval_buckets = torch.arange(eval_x0.shape[0]) % config.num_buckets
    width = config.ddpm_num_steps / config.num_buckets
    eval_t = eval_buckets * width + torch.rand(eval_x0.shape[0], generator=eval_gen) * width
    eval_t = eval_t.clamp_max(config.ddpm_num_steps - 1e-3) if process.continuous else eval_t.long()
    eval_noise = torch.randn(eval_x0.shape, generator=eval_gen)

    def denoiser(x_t, t):
        return model(x_t, t).sample

    steps, curves = [], []
    step, progress = 0, tqdm(total=config.max_train_steps, desc="difficulty study")
    while step < config.max_train_steps:
        for batch in loader:
            clean = batch["pixel_values"]
            noise, t = regime.sample(clean)
            prediction = model(process.add_noise(clean, noise, t), process.model_timesteps(t)).sample
            loss = regime.compute_loss(denoising_loss(prediction, process, clean, noise, t), t)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            progress.update(1)
            if step % config.eval_every == 0 or step == config.max_train_steps:
                model.eval()
                curves.append(bucket_losses(denoiser, eval_x0, eval_noise, eval_t, eval_buckets, config.num_buckets, process))
                steps.append(step)
                model.train()
            if step >= config.max_train_steps:
                break
    progress.close()

    model.eval()
    kl_t = np.unique(np.linspace(1, config.ddpm_num_steps - 1, config.kl_timesteps).round().astype(int))
    if process.name == "ddpm":
        kl = relative_entropy(denoiser, process.scheduler, eval_x0[: config.kl_samples], kl_t.tolist(),
                              torch.Generator().manual_seed(config.seed + 2))
    else:  # no Gaussian posterior: nothing to measure
        kl_t, kl = np.zeros(0, dtype=int), np.zeros(0)
    steps_arr, curves_arr = np.asarray(steps), np.stack(curves)
    converge = steps_to_converge(steps_arr, curves_arr, config.tolerance)
    bucket_edges = [(int(round(i * width)), int(round((i + 1) * width))) for i in range(config.num_buckets)]
    summary = {
        "buckets": bucket_edges,
        "final_bucket_loss": curves_arr[-1].tolist(),
        "steps_to_within_tolerance": converge.tolist(),
        "tolerance": config.tolerance,
        "kl_timesteps": kl_t.tolist(),
        "relative_entropy_nats": kl.tolist(),
        "noise_process": process.name,
        "max_train_steps": config.max_train_steps,
        "seed": config.seed,
    }
    os.makedirs(config.output_dir, exist_ok=True)
    np.savez(os.path.join(config.output_dir, "difficulty.npz"), steps=steps_arr, bucket_losses=curves_arr,
             buckets=np.asarray(bucket_edges), kl_timesteps=kl_t, relative_entropy=kl)
    with open(os.path.join(config.output_dir, "difficulty.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_study(config.output_dir, steps_arr, curves_arr, bucket_edges, kl_t, kl)
    return summary


def plot_study(output_dir: str, steps: np.ndarray, curves: np.ndarray, buckets, kl_t: np.ndarray, kl: np.ndarray) -> None:
    """Writes ``convergence.png`` (normalised bucket-loss curves) and ``relative_entropy.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.cm.viridis(np.linspace(0, 1, len(buckets)))
    for i, (lo, hi) in enumerate(buckets):
        ax.plot(steps, curves[:, i] / curves[-1, i], color=colors[i], label=f"t ∈ [{lo}, {hi})")
    ax.set(xlabel="training step", ylabel="bucket loss / final bucket loss", title="Per-timestep convergence", yscale="log")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "convergence.png"), dpi=120)
    plt.close(fig)

    if len(kl_t) == 0:  # rectified flow: no relative entropy
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(kl_t, kl, marker=".")
    ax.set(xlabel="timestep t", ylabel="KL(q ‖ p_θ) [nats]", title="Relative entropy per timestep", yscale="log")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "relative_entropy.png"), dpi=120)
    plt.close(fig)


@exits_on_usage_error
def main(argv=None):
    summary = run_study(parse_args(argv))
    for (lo, hi), s, loss in zip(summary["buckets"], summary["steps_to_within_tolerance"], summary["final_bucket_loss"]):
        print(f"t in [{lo:4d}, {hi:4d}): final loss {loss:.4f}, within ±{summary['tolerance']:.0%} from step {s}")


if __name__ == "__main__":
    main()
