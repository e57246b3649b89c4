"""Every combination of the four regime axes does what it says (losses against hand computations, stratified counts,
balancer state); nonsense combinations are one-line errors; a resume that changes any axis is refused naming the field."""

import itertools
import json

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from diffusers_curriculum.errors import UsageError
from diffusers_curriculum.losses import denoising_loss
from diffusers_curriculum.regimes import build_regime
from diffusers_curriculum.regimes.balancers import BALANCERS
from diffusers_curriculum.regimes.timesteps import CLUSTERED, TIMESTEP_SAMPLING
from diffusers_curriculum.weighting import FLOW_WEIGHTINGS, WEIGHTINGS

from conftest import axis_flags, check_regime_step, parse_regime_flags, tiny_regime_model

DDPM_WEIGHTINGS = [w for w in WEIGHTINGS if w not in FLOW_WEIGHTINGS]  # flow's are one-line errors under DDPM (test_flow_matching)

T = 100
EXPERTS = (None, 2)


parse = parse_regime_flags


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def hand_weights(weighting, snr):
    """Each DDPM weighting on the ε-MSE, from its paper: Min-SNR-γ min(SNR, γ)/SNR (γ = 5), P2 1/(k + SNR)^γ (k = γ = 1),
    EDM's λ(σ) = (σ² + σ_d²)/(σ σ_d)² on the x₀-MSE, which is σ² times the ε-MSE (σ² = 1/SNR, σ_d = 0.5)."""
    if weighting == "min_snr":
        return torch.clamp(snr, max=5.0) / snr
    if weighting == "p2":
        return 1 / (1 + snr)
    if weighting == "edm":
        sigma2 = 1 / snr
        return (sigma2 + 0.25) / (sigma2 * 0.25) * sigma2
    assert weighting in ("none", "learned"), f"no hand-written weights for {weighting}"
    return torch.ones_like(snr)


@pytest.mark.parametrize("sampling, weighting, balancer, experts", list(itertools.product(TIMESTEP_SAMPLING, DDPM_WEIGHTINGS, BALANCERS, EXPERTS)))
def test_every_combination_does_what_it_says(accelerator, sampling, weighting, balancer, experts):
    """Per combination and step: the logged loss (no balancer) or each cluster's loss (a balancer) equals the weighted
    ε-MSE computed by hand, stratified draws hold ⌊B/k⌋ per cluster, a balancer's state moves, and the record echoes
    every axis."""
    scheduler = DDPMScheduler(num_train_timesteps=T)
    regime = build_regime(parse(*axis_flags(sampling, weighting, balancer, experts)), scheduler, accelerator, max_train_steps=4)
    model, optimizer, clean = tiny_regime_model(regime, accelerator)
    balancer_before = regime.balancer.state_dict() if regime.balancer is not None else None
    for step in (1, 2):
        noise, t = regime.sample(clean)
        with regime.forward_context(accelerator, model):
            prediction = model(scheduler.add_noise(clean, noise, t), t).sample
            per_sample = denoising_loss(prediction, scheduler, clean, noise, t)
            torch.testing.assert_close(per_sample, ((prediction - noise) ** 2).mean(dim=(1, 2, 3)))
            alpha = scheduler.alphas_cumprod[t].double()
            terms = per_sample.detach().double() * hand_weights(weighting, alpha / (1 - alpha))
            if weighting == "learned":  # EDM2: L·exp(−u(λ)) + u(λ), λ = log SNR
                with torch.no_grad():
                    u = regime.weighting.learned(torch.log(alpha / (1 - alpha)).float()).double()
                terms = terms * torch.exp(-u) + u
            stratified = sampling == "stratified" or bool(experts and step == 2)  # stage 2 after the branch at step 1
            loss = check_regime_step(regime, accelerator, model, per_sample, t, terms, stratified)
        optimizer.step()
        optimizer.zero_grad()
        regime.on_step_end(accelerator, step)
        assert torch.isfinite(loss)
    if balancer in ("uw", "nash"):  # the balancer learned or solved something
        after = regime.balancer.state_dict()
        key = "log_variances" if balancer == "uw" else next(k for k, v in after.items() if torch.is_tensor(v))
        assert not torch.equal(after[key], balancer_before[key])

    record = json.loads(json.dumps(regime.describe()))  # what training_regime.json holds
    assert (record["timestep_sampling"], record["weighting"], record["balancer"]) == (sampling, weighting, balancer)
    assert ("groups" in record) == bool(experts) and record.get("stage", 2) == 2  # the experts branched after step 1
    assert ("clusters" in record) == (sampling in CLUSTERED or balancer != "none" or bool(experts))
    if "clusters" in record:
        assert len(record["clusters"]) == 2 and record["clusters"][0][0] == 0 and record["clusters"][-1][1] == T
    state = regime.state_dict()
    assert state["axes"]["timestep_sampling"] == sampling and state["optimizer_steps"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--balancer", "uw"], "--balancer uw needs clusters: give --clusters K"),
    (["--timestep_sampling", "stratified"], "--timestep_sampling stratified needs clusters: give --clusters K"),
    (["--clusters", "3"], "--clusters has no effect: nothing uses clusters"),
    (["--cluster_cost", "snr"], "--cluster_cost has no effect: nothing uses clusters"),
    (["--experts", "3", "--experts_base_steps", "1", "--clusters", "2"], "--clusters 2 differs from --experts 3"),
    (["--experts", "2"], "--experts needs --experts_base_steps >= 1"),
    (["--experts_base_steps", "3"], "--experts_base_steps needs --experts K"),
    (["--experts", "1", "--experts_base_steps", "1"], r"--experts must be in \[2, 100\]"),
    (["--balancer", "pcgrad", "--clusters", "2", "--mixed_precision", "fp16"],
     "--balancer pcgrad forms gradients itself and does not support --mixed_precision fp16"),
    (["--balancer", "uw", "--clusters", "2", "--cluster_cost", "affinity"], "--cluster_cost affinity needs --affinity_path"),
    (["--balancer", "uw", "--clusters", "2", "--affinity_path", "a.npz"], "--affinity_path is only used with --cluster_cost affinity"),
    (["--ant_clusters", "3"], "--ant_clusters belongs to --regime ant; with --regime uniform use --clusters"),
    (["--regime", "curriculum", "--tdc_groups", "3"], "--tdc_groups belongs to --regime tdc; with --regime curriculum use --experts"),
    (["--regime", "ant", "--ant_clusters", "300"], r"--ant_clusters must be in \[1, 100\]"),
])
def test_combinations_that_make_no_sense_are_one_line_errors_naming_the_flags(argv, message):
    with pytest.raises(UsageError, match=message) as error:
        build_regime(parse(*argv), DDPMScheduler(num_train_timesteps=T))
    assert "\n" not in str(error.value)


def test_presets_expand_to_their_axes_and_explicit_flags_win():
    scheduler = DDPMScheduler(num_train_timesteps=T)
    ant = build_regime(parse("--regime", "ant"), scheduler).describe()
    assert (ant["name"], ant["timestep_sampling"], ant["balancer"], len(ant["clusters"]), ant["cluster_cost"]) == (
        "ant", "stratified", "uw", 5, "log_snr")
    warm = build_regime(parse("--regime", "ant", "--timestep_sampling", "curriculum", "--weighting", "p2"), scheduler).describe()
    assert (warm["name"], warm["timestep_sampling"], warm["balancer"], warm["weighting"]) == ("curriculum+uw", "curriculum", "uw", "p2")
    tdc = build_regime(parse("--regime", "tdc", "--tdc_base_steps", "3", "--balancer", "uw"), scheduler).describe()
    assert tdc["name"] == "uw+experts" and len(tdc["groups"]) == 4 and tdc["groups"] == tdc["clusters"]


BASE = ["--timestep_sampling", "curriculum", "--clusters", "4", "--curriculum_pacing", "fixed", "--curriculum_steps_per_stage", "2",
        "--balancer", "uw", "--weighting", "p2"]


@pytest.mark.parametrize("before, after, field", [
    (BASE, [*BASE, "--timestep_sampling", "stratified"], "timestep_sampling"),
    (BASE, [*BASE, "--weighting", "none"], "weighting"),
    (BASE, [*BASE, "--p2_gamma", "2"], "weighting"),
    (BASE, [*BASE, "--balancer", "nash"], "balancer"),
    (BASE, [*BASE, "--uw_lr", "0.1"], "balancer"),
    (BASE, [*BASE, "--curriculum_steps_per_stage", "3"], "pacing"),
    (BASE, [*BASE, "--cluster_cost", "equal"], "clusters"),
    (BASE, [*BASE, "--experts", "4", "--experts_base_steps", "1"], "experts"),
    (["--regime", "curriculum"], ["--regime", "uniform"], "timestep_sampling"),
    (["--regime", "curriculum", "--curriculum_clusters", "4"], ["--regime", "curriculum", "--curriculum_clusters", "8"], "clusters"),
])
def test_a_resume_that_changes_any_axis_is_refused_naming_the_field(before, after, field):
    scheduler = DDPMScheduler(num_train_timesteps=T)
    state = build_regime(parse(*before), scheduler).state_dict()
    build_regime(parse(*before), scheduler).load_state_dict(state)  # the same flags resume
    with pytest.raises(UsageError, match=f"the checkpoint's {field} is .* this run's is"):
        build_regime(parse(*after), scheduler).load_state_dict(state)
