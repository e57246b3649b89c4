"""A loss weighting added as one file (``diffusers_curriculum/weightings/edm.py``): it is a ``--weighting`` choice
with its own flag, check, record and words, and its weights are EDM's λ(σ) computed by hand in each
parametrisation (SNR from the betas, not the library's; the flow's x₀ error rebuilt from its velocity)."""

import json

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_curriculum.errors import UsageError
from diffusers_curriculum.noise import make_process
from diffusers_curriculum.experts.pruning import FinetuneObjective
from diffusers_curriculum.regimes import build_regime
from diffusers_curriculum.regimes.words import regime_in_words
from diffusers_curriculum.weighting import WEIGHTINGS
from diffusers_curriculum.weightings import PLUGINS

from conftest import parse_regime_flags

BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ALPHA_BAR = torch.cumprod(1 - BETAS, 0)
SNR = ALPHA_BAR / (1 - ALPHA_BAR)


def edm_lambda(sigma, sigma_data):
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def test_the_file_makes_a_weighting_choice_with_its_own_flag():
    assert "edm" in PLUGINS and "edm" in WEIGHTINGS
    args = parse_regime_flags("--weighting", "edm", "--edm_sigma_data", "0.7")
    regime = build_regime(args, DDPMScheduler())
    record = json.loads(json.dumps(regime.describe()))
    assert (record["weighting"], record["edm_sigma_data"]) == ("edm", 0.7)
    assert "Loss: EDM's loss weight" in regime_in_words(record)[2] and "σ_data = 0.7" in regime_in_words(record)[2]  # after process, timesteps
    with pytest.raises(UsageError, match=r"--edm_sigma_data must be > 0, got 0.0") as error:
        build_regime(parse_regime_flags("--weighting", "edm", "--edm_sigma_data", "0"), DDPMScheduler())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_edm_on_a_ddpm_target_is_lambda_of_sigma_on_the_x0_error(prediction_type):
    """σ_EDM = √((1 − ᾱ)/ᾱ); x̂₀ − x₀ = −σ_EDM (ε̂ − ε) = −√(1 − ᾱ)(v̂ − v): the weight on each target's error is λ·σ_EDM²,
    λ·(1 − ᾱ), λ."""
    t = torch.tensor([0, 10, 250, 500, 999])
    sigma = ((1 - ALPHA_BAR[t]) / ALPHA_BAR[t]).sqrt()
    lam = edm_lambda(sigma, 0.5)
    expected = {"epsilon": lam * sigma ** 2, "v_prediction": lam * (1 - ALPHA_BAR[t]), "sample": lam}[prediction_type]
    regime = build_regime(parse_regime_flags("--weighting", "edm"), DDPMScheduler(prediction_type=prediction_type))
    torch.testing.assert_close(regime.weighted(torch.ones(5), t).double(), expected, rtol=1e-3, atol=0)  # float32 ᾱ


def test_edm_under_flow_matching_is_lambda_of_sigma_on_the_rebuilt_x0_error():
    """Under rectified flow σ_EDM = σ/(1 − σ) and x̂₀ − x₀ = −σ (v̂ − v): the weighted velocity loss equals λ(σ_EDM) times
    the x₀ error rebuilt from the velocity prediction."""
    T = 100
    t = torch.tensor([3.0, 25.5, 50.0, 90.0])
    sigma = t.double() / T
    g = torch.Generator().manual_seed(0)
    x0, eps, v_hat = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    x_sigma = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
    x0_error = ((x_sigma - sigma[:, None] * v_hat - x0) ** 2).mean(1)
    v_error = ((v_hat - (eps - x0)) ** 2).mean(1)
    regime = build_regime(parse_regime_flags("--weighting", "edm", "--edm_sigma_data", "1.0"), make_process("flow", T))
    torch.testing.assert_close(regime.weighted(v_error.float(), t).double(), edm_lambda(sigma / (1 - sigma), 1.0) * x0_error,
                               rtol=1e-4, atol=1e-6)


def test_pruning_fine_tunes_with_the_plugin_weighting_of_the_record():
    objective = FinetuneObjective.from_record({"weighting": "edm", "edm_sigma_data": 0.25})
    t = torch.tensor([100, 700])
    sigma = ((1 - ALPHA_BAR[t]) / ALPHA_BAR[t]).sqrt()
    torch.testing.assert_close(objective.weights(DDPMScheduler(), t).double(), edm_lambda(sigma, 0.25) * sigma ** 2, rtol=1e-4, atol=0)
