import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from diffusers_curriculum import read_training_regime
from diffusers_curriculum.clustering import equal_boundaries, partition
from diffusers_curriculum.errors import UsageError
from diffusers_curriculum.regimes import Regime, build_regime
from diffusers_curriculum.regimes.balancers import (
    NashMTL, PCGrad, UncertaintyWeighting, nash_weights, pcgrad_project, uncertainty_weighted_loss,
)
from diffusers_curriculum.sampling import StratifiedSampler

from conftest import regime_args as conftest_regime_args


def test_uw_loss_matches_hand_computation():
    losses, s = torch.tensor([1.0, 2.0]), torch.tensor([0.0, math.log(2.0)])
    # ½(e^0·1 + 0) + ½(e^{-ln 2}·2 + ln 2) = 0.5 + 0.5 + ½ ln 2
    assert uncertainty_weighted_loss(losses, s).item() == pytest.approx(1.0 + 0.5 * math.log(2.0))


def test_pcgrad_projection_matches_hand_computation():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1·g2 = -1: g1' = g1 + ½ g2 = [0.5, 0.5]; g2' = g2 + g1 = [0, 1]
    assert torch.allclose(pcgrad_project(grads), torch.tensor([0.5, 1.5]))
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(pcgrad_project(agreeing), agreeing.sum(0))


def test_projected_gradients_no_longer_conflict():
    torch.manual_seed(0)
    grads = torch.randn(2, 10)
    grads[1] = -grads[0] + 0.1 * torch.randn(10)
    g0 = grads[0] - torch.dot(grads[0], grads[1]) / grads[1].pow(2).sum() * grads[1]
    assert torch.dot(g0, grads[1]).abs() < 1e-5


def test_nash_weights_satisfy_bargaining_condition():
    torch.manual_seed(0)
    g = torch.randn(5, 40, dtype=torch.float64)
    gram = g @ g.T
    alpha = nash_weights(gram)
    normalised = gram / gram.norm()
    assert torch.all(alpha > 0)
    torch.testing.assert_close(normalised @ alpha, 1 / alpha, rtol=1e-6, atol=1e-8)
    diagonal = torch.diag(torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64))
    expected = 1 / torch.sqrt(torch.diagonal(diagonal / diagonal.norm()))
    torch.testing.assert_close(nash_weights(diagonal), expected)
    torch.testing.assert_close(nash_weights(gram * 1000.0), alpha)  # scale-free


def test_nash_weights_match_a_cvxpy_solution():
    """Independent check with a generic convex solver (cvxpy, the reference implementation's tool):
    α = argmin ½ αᵀ Ĝ α − Σ log α_i over α > 0, whose optimality condition is Ĝ α = 1/α."""
    cp = pytest.importorskip("cvxpy")
    torch.manual_seed(1)
    g = torch.randn(4, 30, dtype=torch.float64)
    gram = g @ g.T
    normalised = (gram / gram.norm()).numpy()
    alpha = cp.Variable(4, pos=True)
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(alpha, cp.psd_wrap(normalised)) - cp.sum(cp.log(alpha))))
    problem.solve(solver=cp.CLARABEL)
    np.testing.assert_allclose(nash_weights(gram).numpy(), alpha.value, rtol=1e-4)


def test_stratified_sampler_balances_clusters_and_stays_inside():
    sampler = StratifiedSampler(100, [0, 10, 30, 60, 100], seed=0)
    for batch in (4, 7, 13, 64):
        t = sampler.sample(batch)
        counts = torch.bincount(sampler.cluster_of(t), minlength=4)
        assert counts.sum() == batch and counts.max() - counts.min() <= (1 if batch % 4 else 0)
        assert int(t.min()) >= 0 and int(t.max()) < 100
    t = sampler.sample(4000)
    cluster = sampler.cluster_of(t)
    for i, (lo, hi) in enumerate([(0, 10), (10, 30), (30, 60), (60, 100)]):
        inside = t[cluster == i]
        assert int(inside.min()) == lo and int(inside.max()) == hi - 1


def test_cluster_losses_average_within_clusters():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    regime = Regime(scheduler, StratifiedSampler(100, [0, 50, 100]), balancer=UncertaintyWeighting(2), boundaries=[0, 50, 100])
    losses, present = regime.cluster_losses(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([10, 20, 70]))
    assert torch.allclose(losses, torch.tensor([2.0, 10.0])) and present.all()
    losses, present = regime.cluster_losses(torch.tensor([1.0, 3.0]), torch.tensor([10, 20]))
    assert present.tolist() == [True, False] and losses[1] == 0


class SingleProcess:
    num_processes, gradient_accumulation_steps, device = 1, 1, torch.device("cpu")

    def backward(self, loss):
        loss.backward()


def test_pcgrad_balancer_writes_projected_gradient_into_params():
    w = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    model = torch.nn.Module()
    model.w = w
    # L1 = x·w with x = [1, 0] and L2 = y·w with y = [-1, 1]: gradients [1, 0] and [-1, 1]
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    losses = torch.stack([w @ grads[0], w @ grads[1]])
    PCGrad(2).backward(SingleProcess(), losses, torch.tensor([True, True]), model, step=0)
    assert torch.allclose(w.grad, pcgrad_project(grads))  # with two clusters the projection order does not matter
    assert not torch.allclose(w.grad, grads.sum(0))  # the gradients conflict: projecting changed the sum


def test_nash_balancer_reuses_weights_between_updates():
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    model = torch.nn.Module()
    model.w = w
    nash = NashMTL(2, update_every=3)
    assert [nash.needs_manual_sync(s) for s in range(4)] == [True, False, False, True]
    losses = torch.stack([(w * torch.tensor([1.0, 0.0])).sum(), (w * torch.tensor([0.0, 4.0])).sum()])
    nash.backward(SingleProcess(), losses, torch.tensor([True, True]), model, step=0)
    # orthogonal gradients with Gram diag(1, 16): α_i ∝ 1/‖g_i‖
    assert nash.alpha[0] / nash.alpha[1] == pytest.approx(4.0, rel=1e-4)
    assert torch.allclose(w.grad, nash.alpha * torch.tensor([1.0, 4.0]))


def regime_args(*argv):
    return conftest_regime_args("--regime", "ant", *argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ant_clusters", "0"], "--ant_clusters must be in \\[1, 1000\\]"),
        (["--ant_clusters", "1001"], "--ant_clusters must be in \\[1, 1000\\]"),
        (["--ant_cost", "affinity"], "--ant_cost affinity needs --ant_affinity_path"),
        (["--ant_affinity_path", "x.npz"], "--ant_affinity_path is only used with --ant_cost affinity"),
        (["--ant_cost", "affinity", "--ant_affinity_path", "/nonexistent.npz"], "--ant_affinity_path .*cannot read"),
        (["--uw_lr", "0"], "--uw_lr must be > 0"),
        (["--nash_update_every", "0"], "--nash_update_every must be >= 1"),
        (["--ant_method", "pcgrad", "--mixed_precision", "fp16"], "does not support --mixed_precision fp16"),
    ],
)
def test_bad_ant_flags(argv, message):
    with pytest.raises(UsageError, match=message):
        regime_args(*argv)


@pytest.mark.parametrize("cost", ["timestep", "snr", "log_snr"])
def test_the_run_uses_the_dp_clusters_of_its_cost(cost):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    regime = build_regime(regime_args("--ant_cost", cost), scheduler)
    expected = partition(cost, 5, 1000, scheduler.alphas_cumprod)
    assert regime.boundaries == expected == regime.sampler.boundaries.tolist()
    if cost != "timestep":  # the timestep cost's optimum is (nearly) equal intervals; SNR costs are not
        assert expected != equal_boundaries(1000, 5)
    assert regime.describe()["cluster_cost"] == cost and regime.describe()["method"] == "uw"


def test_affinity_clusters_from_file(tmp_path):
    A = np.eye(10) + 0.5 * (np.abs(np.subtract.outer(np.arange(10), np.arange(10))) < 3)
    np.savez(tmp_path / "affinity.npz", affinity=A, group_size=100)
    args = regime_args("--ant_cost", "affinity", "--ant_affinity_path", str(tmp_path / "affinity.npz"), "--ant_clusters", "3")
    boundaries = build_regime(args, DDPMScheduler(num_train_timesteps=1000)).boundaries
    assert boundaries == partition("affinity", 3, 1000, affinity=A, group_size=100)
    assert boundaries[0] == 0 and boundaries[-1] == 1000 and all(b % 100 == 0 for b in boundaries)


@pytest.mark.parametrize("method", ["uw", "pcgrad", "nash"])
def test_script_trains_each_method_and_resumes_balancer_state(train_unconditional, tmp_path, tiny_flags, method):
    flags = [*tiny_flags, "--regime", "ant", "--ant_method", method, "--nash_update_every", "4", "--no_validation",
             "--max_train_steps", "40", "--checkpointing_steps", "20", "--block_out_channels", "8,16",
             "--use_ema", "--gradient_accumulation_steps", "2", "--train_batch_size", "4"]
    straight = train_unconditional.main(train_unconditional.parse_args(["--output_dir", str(tmp_path / "a"), *flags]))
    losses = straight["losses"]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    record = read_training_regime(tmp_path / "a")
    assert record["method"] == method and len(record["clusters"]) == 5
    pipe = DDPMPipeline.from_pretrained(tmp_path / "a")
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 1)

    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-20", tmp_path / "b" / "checkpoint-20")
    resumed = train_unconditional.main(train_unconditional.parse_args(
        ["--output_dir", str(tmp_path / "b"), *flags, "--resume_from_checkpoint", "latest"]))
    assert resumed["losses"] == pytest.approx(losses[20:], rel=1e-4)
    a, b = straight["regime_state"]["balancer"], resumed["regime_state"]["balancer"]
    for key in a:
        if key != "optimizer":
            torch.testing.assert_close(torch.as_tensor(a[key]), torch.as_tensor(b[key]))
    if method == "uw":
        assert not torch.equal(a["log_variances"], torch.zeros(5))  # s actually learned
    if method == "nash":
        assert not torch.equal(a["alpha"], torch.ones(5))


@pytest.mark.parametrize("method", ["pcgrad", "nash"])
def test_self_formed_gradients_work_with_bf16_and_clipping(tmp_path, tiny_flags, method):
    # its own process: accelerate's precision is fixed once per process
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_scripts" / "train_unconditional.py"), "--output_dir", str(tmp_path / "run"),
         *tiny_flags, "--regime", "ant", "--ant_method", method, "--nash_update_every", "2", "--mixed_precision", "bf16",
         "--max_grad_norm", "0.01", "--max_train_steps", "4", "--no_validation", "--block_out_channels", "8,16"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_training_regime(tmp_path / "run")["method"] == method
