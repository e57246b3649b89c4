import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_curriculum.weighting import (
    LearnedWeighting, learned_weighting_loss, loss_weights, min_snr_weights, p2_weights,
)


def snr_of(scheduler, t):
    a = scheduler.alphas_cumprod[t]
    return a / (1 - a)


def test_min_snr_epsilon_is_min_snr_gamma_over_snr():
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    expected = torch.tensor([1.0, 1.0, 1.0, 0.05])
    assert torch.allclose(min_snr_weights(snr, 5.0, "epsilon"), expected)


def test_min_snr_v_prediction_and_sample_targets():
    snr = torch.tensor([1.0, 10.0])
    assert torch.allclose(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5, 5.0 / 11.0]))
    assert torch.allclose(min_snr_weights(snr, 5.0, "sample"), torch.tensor([1.0, 5.0]))
    # the flow velocity: min(SNR, γ)·σ² with σ = 1 / (1 + √SNR)
    assert torch.allclose(min_snr_weights(snr, 5.0, "flow"), torch.tensor([1.0 / 4.0, 5.0 / (1 + 10.0 ** 0.5) ** 2]))
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(snr, 5.0, "x0")


def test_p2_weights_match_formula():
    snr = torch.tensor([0.0, 1.0, 3.0])
    assert torch.allclose(p2_weights(snr, gamma=1.0, k=1.0), torch.tensor([1.0, 0.5, 0.25]))
    assert torch.allclose(p2_weights(snr, gamma=0.5, k=1.0), torch.tensor([1.0, 2 ** -0.5, 0.5]))


def test_loss_weights_uses_the_schedulers_snr():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 10, 500, 999])
    snr = snr_of(scheduler, t).float()
    assert loss_weights(scheduler, t, "none") is None
    assert torch.allclose(loss_weights(scheduler, t, "min_snr", snr_gamma=5.0), torch.clamp(snr, max=5.0) / snr)
    assert torch.allclose(loss_weights(scheduler, t, "p2"), 1.0 / (1.0 + snr))
    with pytest.raises(ValueError, match="weighting"):
        loss_weights(scheduler, t, "huber")


def test_min_snr_down_weights_low_noise_timesteps_only():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    w = loss_weights(scheduler, torch.arange(1000), "min_snr", snr_gamma=5.0)
    assert w[0] < 0.01 and torch.all(w[-500:] == 1.0)
    assert torch.all(w[1:] >= w[:-1])


def test_learned_weighting_loss_is_minimal_at_the_log_of_the_mean_loss():
    losses = torch.tensor([0.5, 2.0, 3.5])  # mean 2
    u = torch.linspace(-1, 3, 4001)
    objective = torch.stack([learned_weighting_loss(losses, torch.full_like(losses, v)).mean() for v in u])
    assert abs(float(u[objective.argmin()]) - math.log(2.0)) < 1e-3


def test_learned_u_converges_to_the_log_scale_of_each_noise_level():
    """Synthetic losses whose mean at log-SNR λ is scale(λ) = exp(sin(λ/3) + λ/10), half of them 0.5 and half
    1.5 times it: u(λ) learns log scale(λ), the log of the *mean* loss (the mean of log L would sit 0.144 lower)."""
    weighting = LearnedWeighting(lr=0.02, seed=0)
    scale = lambda lam: torch.exp(torch.sin(lam / 3) + lam / 10)  # noqa: E731
    spread = torch.tensor([0.5, 1.5]).repeat(256)
    generator = torch.Generator().manual_seed(1)
    for step in range(2000):
        if step == 1000:  # a step decay, as any training schedule would, to settle the noise of the estimate
            weighting.optimizer.param_groups[0]["lr"] = 0.002
        lam = torch.rand(512, generator=generator) * 20 - 10
        weighting.loss(scale(lam) * spread, lam).mean().backward()
        weighting.step()
    grid = torch.linspace(-9, 9, 37)
    with torch.no_grad():
        error = weighting(grid) - scale(grid).log()
    assert float((error - error.mean()).abs().max()) < 0.12  # the shape of log scale(λ)
    assert float(error.mean().abs()) < 0.06  # and its level: log E[L], not E[log L] = log scale - 0.144


def test_learned_weighting_starts_unweighted_and_resumes_its_state():
    weighting = LearnedWeighting(seed=3)
    lam, losses = torch.tensor([-5.0, 0.0, 5.0]), torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(weighting.loss(losses, lam), losses)  # u = 0 at the start
    weighting.loss(losses, lam).sum().backward()
    weighting.step()
    copy = LearnedWeighting(seed=3)
    copy.load_training_state(weighting.training_state())
    torch.testing.assert_close(copy(lam), weighting(lam))
    assert copy.optimizer.state_dict()["state"].keys() == weighting.optimizer.state_dict()["state"].keys()
