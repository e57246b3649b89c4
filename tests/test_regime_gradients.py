"""What each regime axis does to the gradient and the partition, against expectations computed independently:
the SNR from the betas by hand (not ``compute_snr``), the weighted loss's gradient by autograd on a hand-written
objective, and each DP cost's optimum by brute force over every partition (not ``partition()``). A one-line bug that
drops a weighting from the gradient, detaches the learned weighting's loss, or swaps a cluster cost fails here."""

import itertools

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_curriculum.regimes import build_regime

from conftest import regime_args

T = 1000
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)  # DDPMScheduler's default linear schedule
ALPHA_BAR = torch.cumprod(1 - BETAS, 0)
SNR = ALPHA_BAR / (1 - ALPHA_BAR)
TIMESTEPS = torch.tensor([0, 3, 100, 400, 900, 999])


class Backprop:
    """The accelerator call an unbalanced regime step makes, for one process."""

    device = torch.device("cpu")

    def backward(self, loss):
        loss.backward()


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, generator=g), torch.randn(len(TIMESTEPS), 4, generator=g), torch.randn(len(TIMESTEPS), generator=g)


def per_sample(w, x, y):
    return (x @ w - y) ** 2


def regime_gradient(regime, w0, x, y):
    w = w0.clone().requires_grad_()
    regime.backward(Backprop(), per_sample(w, x, y), TIMESTEPS)
    return w.grad


def expected_gradient(weights, w0, x, y):
    w = w0.clone().requires_grad_()
    (per_sample(w, x, y) * weights).mean().backward()
    return w.grad


@pytest.mark.parametrize("argv, weights", [
    ((), torch.ones(len(TIMESTEPS), dtype=torch.float64)),
    (("--snr_gamma", "5"), torch.minimum(SNR[TIMESTEPS], torch.tensor(5.0, dtype=torch.float64)) / SNR[TIMESTEPS]),
    (("--weighting", "min_snr"), torch.minimum(SNR[TIMESTEPS], torch.tensor(5.0, dtype=torch.float64)) / SNR[TIMESTEPS]),
    (("--weighting", "p2", "--p2_gamma", "0.5", "--p2_k", "2"), (2 + SNR[TIMESTEPS]) ** -0.5),
], ids=["none", "min_snr", "min_snr_default_gamma", "p2"])
def test_the_models_gradient_is_the_gradient_of_the_weighted_loss(argv, weights):
    regime = build_regime(regime_args(*argv), DDPMScheduler(num_train_timesteps=T))
    w0, x, y = problem()
    got = regime_gradient(regime, w0, x, y)
    torch.testing.assert_close(got, expected_gradient(weights.float(), w0, x, y), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(weights, torch.ones_like(weights)) or argv == ()  # the case can tell weighted from not


def test_learned_weighting_scales_each_samples_gradient_by_exp_minus_u_and_trains_u():
    scheduler = DDPMScheduler(num_train_timesteps=T)
    regime = build_regime(regime_args("--weighting", "learned"), scheduler)
    learned = regime.weighting.learned
    alpha_bar = scheduler.alphas_cumprod[TIMESTEPS]  # u's Fourier features magnify float64-vs-float32 λ: use the float32 ᾱ
    log_snr = (alpha_bar / (1 - alpha_bar)).log()
    with torch.no_grad():  # away from u = 0, where exp(-u) = 1 would hide a dropped factor
        for p in learned.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
        u = learned(log_snr)
    assert u.abs().min() > 1e-3
    w0, x, y = problem()
    got = regime_gradient(regime, w0, x, y)
    torch.testing.assert_close(got, expected_gradient(torch.exp(-u), w0, x, y), rtol=1e-5, atol=1e-7)
    # u's own gradient: d/du of mean(L·exp(-u) + u) = (1 - L·exp(-u)) / B, through the module
    losses = per_sample(w0, x, y)
    probe = {name: p.detach().clone().requires_grad_() for name, p in learned.named_parameters()}
    u_probe = torch.func.functional_call(learned, probe, (log_snr,))
    (losses * torch.exp(-u_probe) + u_probe).mean().backward()
    for name, p in learned.named_parameters():  # λ through compute_snr's sqrt-and-square differs in the last bits
        torch.testing.assert_close(p.grad, probe[name].grad, rtol=1e-3, atol=1e-3)
        assert p.grad.abs().sum() > 0


# ---- the shared --cluster_cost: each cost's own optimum, by brute force --------------------------------------------
SMALL_T, K = 12, 3


def interval_cost(cost, values, start, end):
    """min over a center c in [start, end) of Σ_t |v(t) − v(c)|, v the timestep, SNR or log-SNR."""
    v = values[start:end]
    return min(float((v - v[c]).abs().sum()) for c in range(end - start))


def brute_force_best(cost, values):
    best = None
    for cuts in itertools.combinations(range(1, SMALL_T), K - 1):
        bounds = (0, *cuts, SMALL_T)
        total = sum(interval_cost(cost, values, a, b) for a, b in zip(bounds, bounds[1:]))
        best = total if best is None or total < best else best
    return best


def test_each_cluster_cost_reaches_its_own_brute_force_optimum():
    scheduler = DDPMScheduler(num_train_timesteps=SMALL_T)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, SMALL_T, dtype=torch.float64), 0)
    snr = alpha_bar / (1 - alpha_bar)
    values = {"timestep": torch.arange(SMALL_T, dtype=torch.float64), "snr": snr, "log_snr": snr.log()}
    partitions = {}
    for cost, v in values.items():
        args = regime_args("--timestep_sampling", "stratified", "--clusters", str(K), "--cluster_cost", cost)
        boundaries = build_regime(args, scheduler).boundaries
        assert boundaries[0] == 0 and boundaries[-1] == SMALL_T and len(boundaries) == K + 1
        got = sum(interval_cost(cost, v, a, b) for a, b in zip(boundaries, boundaries[1:]))
        assert got == pytest.approx(brute_force_best(cost, v), rel=1e-9), cost
        partitions[cost] = tuple(boundaries)
    # the costs disagree here, so a wiring that feeds every cost the same values cannot pass all three
    for cost, v in values.items():
        others = [p for c, p in partitions.items() if c != cost]
        optimum = brute_force_best(cost, v)
        assert any(sum(interval_cost(cost, v, a, b) for a, b in zip(p, p[1:])) > optimum * (1 + 1e-9) for p in others), cost
