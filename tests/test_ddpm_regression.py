"""DDPM runs are unchanged by the noise-process seam: each preset's timestep draws, clusters and loss weights equal
what commit c3eb360 (before flow matching) produced, stored in ``fixtures/ddpm_regression.json``.

The draws and the boundaries are integers and the weights are kept to 6 significant digits, so the check does not
depend on a machine's float quirks. (On this machine the full check was stronger: 12 fixed-seed 12-step training runs,
one per preset and weighting, gave byte-identical UNet weights before and after; see the flow-matching note.)"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_curriculum.regimes import build_regime

from conftest import regime_args

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "ddpm_regression.json").read_text())
CASES = {
    "uniform": [], "curriculum": ["--regime", "curriculum"], "ant": ["--regime", "ant"], "tdc": ["--regime", "tdc", "--tdc_base_steps", "2"],
    "logit_normal+p2": ["--timestep_sampling", "logit_normal", "--weighting", "p2"], "mode": ["--timestep_sampling", "mode"],
    "speed": ["--timestep_sampling", "speed"], "timestep_bias": ["--timestep_sampling", "timestep_bias"],
    "loss_aware": ["--timestep_sampling", "loss_aware"], "min_snr": ["--snr_gamma", "5"],
    "ant_snr": ["--regime", "ant", "--ant_cost", "snr"], "ant_timestep": ["--regime", "ant", "--ant_cost", "timestep", "--ant_clusters", "7"],
    "tdc_rr": ["--regime", "tdc", "--tdc_base_steps", "2", "--experts_schedule", "round_robin"],
}


def test_every_reference_case_is_checked():
    assert sorted(CASES) == sorted(REFERENCE)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_ddpm_preset_draws_clusters_and_weights_as_before_flow_matching(name):
    regime = build_regime(regime_args(*CASES[name]), DDPMScheduler(num_train_timesteps=1000), None, 100)
    clean = torch.zeros(16, 1, 2, 2)
    draws = [regime.sample(clean)[1] for _ in range(3)]
    assert all(t.dtype == torch.long for t in draws)
    assert [t.tolist() for t in draws] == REFERENCE[name]["timesteps"]
    assert regime.boundaries == REFERENCE[name]["boundaries"]
    weights = regime.weighted(torch.ones(6), torch.tensor([0, 1, 10, 100, 500, 999]))
    assert weights.tolist() == pytest.approx(REFERENCE[name]["weights_at_0_1_10_100_500_999"], rel=1e-5)
