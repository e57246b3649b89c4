"""Rectified flow through the noise-process seam, against expectations computed independently: the process's
formulas by hand and against diffusers' own scheduler, each weighting against a direct computation in another
parametrisation (x₀ or ε errors rebuilt from the velocity), the regime matrix under flow with the loss, the
stratified counts and the cluster losses by hand, the DP against brute force on a small grid, and the script's flow
runs (one-line errors, exact resume, what the record and the card say)."""

import itertools
import json
import math
import shutil

import pytest
import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from diffusers_curriculum.errors import UsageError
from diffusers_curriculum.losses import denoising_loss
from diffusers_curriculum.noise import DDPMProcess, FlowProcess, as_process, make_process
from diffusers_curriculum.regimes import build_regime
from diffusers_curriculum.regimes.balancers import BALANCERS
from diffusers_curriculum.regimes.timesteps import TIMESTEP_SAMPLING
from diffusers_curriculum.weighting import WEIGHTINGS

from conftest import axis_flags, check_regime_step, parse_regime_flags, tiny_regime_model

T = 100
GAMMA, P2_K, P2_GAMMA = 5.0, 2.0, 0.5


parse = parse_regime_flags


def sigma_of(t, shift=1.0, num_levels=T):
    s = torch.as_tensor(t, dtype=torch.float64) / num_levels
    return shift * s / (1 + (shift - 1) * s)


# ---- the process -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_process_noises_targets_and_feeds_the_network_as_sd3_trains(shift):
    process = make_process("flow", 1000, shift=shift)
    t = torch.tensor([0.5, 250.0, 500.0, 999.5])
    sigma = sigma_of(t, shift, 1000)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    s4 = sigma.float().view(-1, 1, 1, 1)
    torch.testing.assert_close(process.add_noise(x0, eps, t), (1 - s4) * x0 + s4 * eps)
    torch.testing.assert_close(process.target(x0, eps, t), eps - x0)
    torch.testing.assert_close(process.log_snr(t), (2 * torch.log((1 - sigma) / sigma)).float())
    torch.testing.assert_close(process.model_timesteps(t), (1000 * sigma).float())
    for level in (1.0, 333.0, 777.5):  # level_of inverts the shift
        assert process.level_of(float(process.model_timesteps(torch.tensor([level]))[0])) == pytest.approx(level, rel=1e-5)
    # diffusers' own training grid: FlowMatchEulerDiscreteScheduler.timesteps[i] is the network's timestep of level 1000 − i
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    index = torch.tensor([0, 1, 10, 500, 999])
    torch.testing.assert_close(process.model_timesteps((1000 - index).double()), scheduler.timesteps[index].float())
    assert isinstance(process.pipeline_scheduler(), FlowMatchEulerDiscreteScheduler)
    assert process.pipeline_scheduler().config.shift == shift


def test_as_process_tells_the_processes_apart():
    assert isinstance(as_process(FlowMatchEulerDiscreteScheduler()), FlowProcess)
    assert isinstance(as_process(make_process("ddpm").scheduler), DDPMProcess)
    with pytest.raises(TypeError, match="no noise process"):
        as_process(object())


# ---- weighting through log-SNR, checked in the other parametrisation -------------------------------------------
def errors_in_every_parametrisation(sigma):
    """x₀, ε, the velocity prediction v̂, and the x₀ / ε predictions it implies (x₀ = x_σ − σ v, ε = x_σ + (1 − σ) v)."""
    g = torch.Generator().manual_seed(3)
    n = sigma.shape[0]
    x0, eps, v_hat = (torch.randn(n, 6, generator=g, dtype=torch.float64) for _ in range(3))
    s = sigma[:, None]
    x_sigma = (1 - s) * x0 + s * eps
    mse = lambda a, b: ((a - b) ** 2).mean(dim=1)  # noqa: E731
    return {"v": mse(v_hat, eps - x0), "x0": mse(x_sigma - s * v_hat, x0), "eps": mse(x_sigma + (1 - s) * v_hat, eps)}


@pytest.mark.parametrize("argv, expected", [
    # Min-SNR-γ is min(SNR, γ) on the x₀ error
    (("--snr_gamma", str(GAMMA)), lambda e, snr, sigma: torch.minimum(snr, torch.tensor(GAMMA, dtype=torch.float64)) * e["x0"]),
    # P2 is 1 / (k + SNR)^γ on the ε error
    (("--weighting", "p2", "--p2_k", str(P2_K), "--p2_gamma", str(P2_GAMMA)), lambda e, snr, sigma: (P2_K + snr) ** -P2_GAMMA * e["eps"]),
    (("--weighting", "sigma_sqrt"), lambda e, snr, sigma: sigma ** -2 * e["v"]),
    (("--weighting_scheme", "cosmap"), lambda e, snr, sigma: 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2)) * e["v"]),
    ((), lambda e, snr, sigma: e["v"]),
], ids=["min_snr", "p2", "sigma_sqrt", "cosmap", "none"])
def test_each_weighting_on_the_velocity_equals_its_definition_in_its_own_parametrisation(argv, expected):
    t = torch.tensor([2.0, 10.5, 37.0, 50.0, 81.25, 99.0])
    sigma = sigma_of(t)
    snr = ((1 - sigma) / sigma) ** 2
    errors = errors_in_every_parametrisation(sigma)
    regime = build_regime(parse(*argv), make_process("flow", T))
    weighted = regime.weighted(errors["v"].float(), t)
    torch.testing.assert_close(weighted.double(), expected(errors, snr, sigma), rtol=1e-4, atol=1e-6)


def test_learned_weighting_reads_the_flows_log_snr():
    t = torch.tensor([5.0, 50.0, 95.0])
    regime = build_regime(parse("--weighting", "learned"), make_process("flow", T))
    with torch.no_grad():
        regime.weighting.learned.linear.weight.normal_(generator=torch.Generator().manual_seed(1))
    lam = 2 * torch.log((1 - sigma_of(t)) / sigma_of(t))
    u = regime.weighting.learned(lam.float())
    losses = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(regime.weighted(losses, t), losses * torch.exp(-u) + u)


def test_flow_only_weightings_and_mixed_flags_are_one_line_errors():
    for argv, message in ((("--weighting", "cosmap"), "--weighting cosmap is a rectified-flow loss weight"),
                          (("--weighting_scheme", "sigma_sqrt"), "--weighting_scheme sigma_sqrt is a rectified-flow loss weight"),
                          (("--weighting_scheme", "cosmap", "--weighting", "p2"), "--weighting_scheme cosmap is a loss weighting")):
        with pytest.raises(UsageError, match=message) as error:
            build_regime(parse(*argv), make_process("ddpm", T))
        assert "\n" not in str(error.value)


# ---- the regime matrix under flow ------------------------------------------------------------------------------
def covering_combinations():
    """Every (timestep source, weighting) pair, with balancers and experts cycled so that every pair of values of any
    two axes appears at least once (a pairwise covering of the 4-axis product)."""
    combos = []
    for i, sampling in enumerate(TIMESTEP_SAMPLING):
        for j, weighting in enumerate(WEIGHTINGS):
            combos.append((sampling, weighting, BALANCERS[(i + j) % len(BALANCERS)], (None, 2)[(j + i // 2) % 2]))
    for a, b in itertools.combinations(range(4), 2):
        values = [(TIMESTEP_SAMPLING, WEIGHTINGS, BALANCERS, (None, 2))[k] for k in (a, b)]
        assert {(c[a], c[b]) for c in combos} == set(itertools.product(*values)), (a, b)
    return combos


def hand_weights(regime, weighting, t):
    sigma = sigma_of(t)
    snr = ((1 - sigma) / sigma) ** 2
    if weighting == "min_snr":
        return torch.minimum(snr, torch.tensor(GAMMA, dtype=torch.float64)) * sigma ** 2
    if weighting == "p2":
        return (1 + snr) ** -1.0 * (1 - sigma) ** 2
    if weighting == "sigma_sqrt":
        return sigma ** -2
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    if weighting == "edm":  # λ(σ_EDM) on the x₀ error, σ_EDM = σ/(1 − σ), σ_data 0.5; x₀ error = σ² × velocity error
        sigma_edm = sigma / (1 - sigma)
        return (sigma_edm ** 2 + 0.25) / (sigma_edm * 0.5) ** 2 * sigma ** 2
    assert weighting in ("none", "learned"), f"no hand-written weights for {weighting}"
    return torch.ones_like(sigma)


def hand_terms(regime, weighting, per_sample, t):
    terms = per_sample.double() * hand_weights(regime, weighting, t)
    if weighting == "learned":
        with torch.no_grad():
            u = regime.weighting.learned((2 * torch.log((1 - sigma_of(t)) / sigma_of(t))).float()).double()
        terms = terms * torch.exp(-u) + u
    return terms


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.mark.parametrize("sampling, weighting, balancer, experts", covering_combinations())
def test_every_axis_under_flow_matching_does_what_it_says(accelerator, sampling, weighting, balancer, experts):
    process = make_process("flow", T)
    regime = build_regime(parse(*axis_flags(sampling, weighting, balancer, experts, GAMMA)), process, accelerator, max_train_steps=4)
    model, optimizer, clean = tiny_regime_model(regime, accelerator)
    for step in (1, 2):
        noise, t = regime.sample(clean)
        assert t.dtype == torch.float32 and bool(((t >= 0) & (t < T)).all()) and not bool((t == t.round()).all())
        sigma = sigma_of(t).float().view(-1, 1, 1, 1)
        noisy = process.add_noise(clean, noise, t)
        torch.testing.assert_close(noisy, (1 - sigma) * clean + sigma * noise)
        with regime.forward_context(accelerator, model):
            prediction = model(noisy, process.model_timesteps(t)).sample
            per_sample = denoising_loss(prediction, process, clean, noise, t)
            torch.testing.assert_close(per_sample, ((prediction - (noise - clean)) ** 2).mean(dim=(1, 2, 3)))
            terms = hand_terms(regime, weighting, per_sample.detach(), t)
            stratified = sampling == "stratified" or bool(experts and step == 2)  # stage 2 after the branch at step 1
            check_regime_step(regime, accelerator, model, per_sample, t, terms, stratified)
        optimizer.step()
        optimizer.zero_grad()
        regime.on_step_end(accelerator, step)
    record = json.loads(json.dumps(regime.describe()))
    assert record["noise_process"] == "flow" and (record["timestep_sampling"], record["weighting"]) == (sampling, weighting)


# ---- the DP on the flow's grid, against brute force ----------------------------------------------------------------
def brute_force_cost(values, k):
    """The least total cost over every cut of the levels into k intervals; cost = min_c Σ|v_t − v_c| per interval."""
    n = len(values)
    interval = lambda a, b: min(sum(abs(values[t] - values[c]) for t in range(a, b)) for c in range(a, b))  # noqa: E731
    return min(sum(interval(a, b) for a, b in zip((0, *cuts), (*cuts, n))) for cuts in itertools.combinations(range(1, n), k - 1))


@pytest.mark.parametrize("shift", [None, 1.0, 3.0], ids=["ddpm", "flow", "flow-shift3"])
@pytest.mark.parametrize("cost", ["timestep", "snr", "log_snr"])
def test_regime_clusters_are_the_brute_force_optimum_on_each_process_grid(cost, shift):
    """The regime's --cluster_cost partition, for each DP cost, against brute force over every cut: on DDPM's integer
    timesteps (SNR = ᾱ/(1 − ᾱ)) and on the flow's level grid (SNR = ((1 − σ)/σ)² at each cell's centre)."""
    from diffusers import DDPMScheduler

    levels, k = 12, 3
    if shift is None:
        process = DDPMScheduler(num_train_timesteps=levels)
        alpha = process.alphas_cumprod.double()
        snr = alpha / (1 - alpha)
    else:
        sigma = sigma_of(torch.arange(levels, dtype=torch.float64) + 0.5, shift, levels)  # each cell's centre
        snr = ((1 - sigma) / sigma) ** 2
        process = FlowProcess(FlowMatchEulerDiscreteScheduler(num_train_timesteps=levels, shift=shift))
    values = {"timestep": list(range(levels)), "snr": snr.tolist(), "log_snr": snr.log().tolist()}[cost]
    regime = build_regime(parse("--balancer", "uw", "--clusters", k, "--cluster_cost", cost), process)
    b = regime.boundaries
    got = sum(min(sum(abs(values[t] - values[c]) for t in range(lo, hi)) for c in range(lo, hi)) for lo, hi in zip(b, b[1:]))
    assert got == pytest.approx(brute_force_cost(values, k), rel=1e-9, abs=1e-12)
    if cost == "log_snr" and shift == 1.0:
        assert b[1] == levels - b[2]  # λ is antisymmetric about σ = 1/2 on an even grid: the cut is symmetric


# ---- the script --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--noise_process", "flow", "--prediction_type", "v_prediction"], "--prediction_type applies to --noise_process ddpm"),
    (["--noise_process", "flow", "--use_ddim"], "--use_ddim applies to --noise_process ddpm"),
    (["--noise_process", "flow", "--ddpm_beta_schedule", "squaredcos_cap_v2"], "--ddpm_beta_schedule applies to --noise_process ddpm"),
    (["--flow_shift", "3"], "--flow_shift applies to --noise_process flow"),
    (["--noise_process", "flow", "--flow_shift", "0"], "--flow_shift must be > 0"),
    (["--weighting", "sigma_sqrt"], "needs --noise_process flow"),
    (["--noise_process", "flow", "--timestep_sampling", "two_phase", "--two_phase_switch", "1.5"], r"--two_phase_switch must be in \[0, 1\]"),
])
def test_flags_that_make_no_sense_for_the_process_are_one_line_errors(train_unconditional, tmp_path, argv, message):
    with pytest.raises(UsageError, match=message) as error:
        train_unconditional.parse_args(["--output_dir", str(tmp_path / "out"), *argv])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_composed_flow_run_resumes_bit_identically_and_its_record_and_card_name_the_process(train_unconditional, tmp_path, tiny_flags):
    flags = [*tiny_flags, "--max_train_steps", "6", "--checkpointing_steps", "3", "--max_train_samples", "64", "--use_ema",
             "--noise_process", "flow", "--flow_shift", "2", "--timestep_sampling", "curriculum", "--balancer", "uw", "--clusters", "3",
             "--curriculum_pacing", "fixed", "--curriculum_steps_per_stage", "2", "--weighting", "learned"]
    straight = train_unconditional.main(train_unconditional.parse_args(["--output_dir", str(tmp_path / "a"), *flags]))
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    resumed = train_unconditional.main(train_unconditional.parse_args(
        ["--output_dir", str(tmp_path / "b"), *flags, "--resume_from_checkpoint", "latest"]))
    assert resumed["losses"] == straight["losses"][3:]
    for part in ("unet/diffusion_pytorch_model.safetensors", "checkpoint-6/model.safetensors"):
        a, b = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
        assert all(torch.equal(a[name], b[name]) for name in a)
    record = json.loads((tmp_path / "a" / "training_regime.json").read_text())
    assert (record["noise_process"], record["flow_shift"]) == ("flow", 2.0)
    assert [s["stage"] for s in record["stage_history"]] == [1, 2, 3]
    scheduler = json.loads((tmp_path / "a" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["shift"]) == ("FlowMatchEulerDiscreteScheduler", 2.0)
    card = (tmp_path / "a" / "README.md").read_text()
    assert "Noise process: rectified flow" in card and "| noise_process | `flow` |" in card
    assert "prediction_type" not in card  # a DDPM-only setting


def test_a_flow_checkpoint_is_not_resumed_as_ddpm(train_unconditional, tmp_path, tiny_flags):
    flags = [*tiny_flags, "--max_train_steps", "2", "--checkpointing_steps", "2", "--max_train_samples", "32", "--no_validation"]
    train_unconditional.main(train_unconditional.parse_args(["--output_dir", str(tmp_path), *flags, "--noise_process", "flow"]))
    with pytest.raises(UsageError, match=r"the checkpoint's noise_process is .*flow.*, this run's is not set \(the default\)"):
        train_unconditional.main(train_unconditional.parse_args(
            ["--output_dir", str(tmp_path), *flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]))


def test_two_phase_sampling_switches_from_logit_normal_to_uniform_at_its_step():
    regime = build_regime(parse("--timestep_sampling", "two_phase", "--two_phase_switch", "0.5", "--logit_std", "0.3"),
                          make_process("flow", 1000), max_train_steps=4)
    accelerator = Accelerator(cpu=True)
    spread = []
    for step in range(1, 5):
        t = regime.sampler.sample(4096)
        spread.append(float(((t < 100) | (t >= 900)).float().mean()))  # the share drawn near the ends
        regime.on_step_end(accelerator, step)
    # logit-normal(0, 0.3): almost nothing beyond σ ∈ [0.1, 0.9); uniform: 20 % there
    assert spread[0] < 0.001 and spread[1] < 0.001 and spread[2] == pytest.approx(0.2, abs=0.03) and spread[3] == pytest.approx(0.2, abs=0.03)
    assert regime.describe()["two_phase"]["switched_at"] == 2
