import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the Hub in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The image-check cache of a test session lives in a temp folder, not in the user's ~/.cache.
os.environ.setdefault("DIFFUSERS_CURRICULUM_CACHE", tempfile.mkdtemp(prefix="dc-cache-"))


def load_script(name: str):
    """Imports train_scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "train_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def train_unconditional():
    return load_script("train_unconditional")


# A tiny, fast configuration of the unconditional script (real Fashion-MNIST, 32×32, 2-block UNet).
TINY_FLAGS = [
    "--resolution", "32", "--block_out_channels", "16,32", "--train_batch_size", "8",
    "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--lr_scheduler", "constant",
    "--ddpm_num_steps", "100", "--ddpm_num_inference_steps", "4", "--eval_batch_size", "4",
    "--max_train_samples", "512", "--report_to", "none", "--seed", "0",
]


def parse_regime_flags(*argv):
    """The :class:`RegimeSpec` the regime flags make, as a training script's parser makes it (seed 0, fp32); not yet
    checked against a noise process (``build_regime`` checks it against the one it is given)."""
    import argparse

    from diffusers_curriculum.regimes import add_regime_args, regime_spec

    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", type=str, default="no")
    add_regime_args(parser)
    return regime_spec(parser.parse_args([str(a) for a in argv]))


def regime_args(*argv):
    """The :class:`RegimeSpec` of the regime flags, checked against DDPM with T = 1000 (seed 0, fp32)."""
    spec = parse_regime_flags(*argv)
    spec.check_process(1000, "ddpm")
    return spec


def axis_flags(sampling, weighting, balancer, experts, snr_gamma=5.0):
    """The flags of one regime-matrix combination: 2 clusters where anything uses them, a fixed 1-step curriculum."""
    from diffusers_curriculum.regimes.timesteps import CLUSTERED

    flags = ["--timestep_sampling", sampling, "--weighting", weighting, "--balancer", balancer]
    flags += ["--snr_gamma", str(snr_gamma)] if weighting == "min_snr" else []
    flags += ["--experts", experts, "--experts_base_steps", "1"] if experts else []
    if sampling in CLUSTERED or balancer != "none" or experts:
        flags += ["--clusters", "2"]
    if sampling == "curriculum":
        flags += ["--curriculum_pacing", "fixed", "--curriculum_steps_per_stage", "1"]
    return flags


def tiny_regime_model(regime, accelerator):
    """A seeded 8×8 one-channel UNet wrapped by the regime (experts), prepared with SGD, and a fixed batch of 4."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = regime.wrap_model(UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), norm_num_groups=2,
                                          layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    regime.attach(optimizer=optimizer)
    return model, optimizer, torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_flags():
    return list(TINY_FLAGS)


def check_regime_step(regime, accelerator, model, per_sample, t, terms, stratified):
    """One regime backward of a 2-cluster matrix case, checked against the hand-computed weighted ``terms``: with
    ``stratified`` draws ⌊B/k⌋ from each cluster; without a balancer the logged loss is the terms' mean, with one each
    cluster's loss is its terms' mean. Returns the regime's loss."""
    import torch

    cluster = (t >= regime.boundaries[1]).long() if len(regime.boundaries or ()) > 2 else None
    if stratified:
        assert torch.bincount(cluster, minlength=2).min() >= len(t) // 2
    if regime.balancer is not None:
        losses, _ = regime.cluster_losses(per_sample.detach(), t)
        for c in range(2):
            if bool((cluster == c).any()):
                torch.testing.assert_close(losses[c].double(), terms[cluster == c].mean(), rtol=1e-4, atol=1e-6)
    loss = regime.backward(accelerator, per_sample, t, model)
    if regime.balancer is None:
        torch.testing.assert_close(loss.double(), terms.mean(), rtol=1e-4, atol=1e-6)
    return loss
