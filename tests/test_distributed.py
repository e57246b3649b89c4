"""2-process CPU DDP (gloo) through `accelerate launch`, as a user would run it."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMPipeline
from safetensors.torch import load_file

import diffusers_curriculum  # noqa: F401

from conftest import ROOT, TINY_FLAGS

LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no",
]


def run_launch(command, timeout=300):
    """``accelerate launch`` in a process group of its own, killed whole on timeout: a hung rank then fails one
    test quickly instead of outliving the launcher and holding the pipes (and the test run) open."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, command[-6:]))} timed out after {timeout} s; stderr: {stderr[-3000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def launch(output_dir, *extra):
    proc = run_launch([*LAUNCH, str(ROOT / "train_scripts" / "train_unconditional.py"), "--output_dir", str(output_dir),
                       *TINY_FLAGS, "--train_batch_size", "4", "--max_train_samples", "64", *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_process_ddp_trains_and_saves_one_pipeline(tmp_path):
    launch(tmp_path / "ddp", "--max_train_steps", "6", "--checkpointing_steps", "3", "--eval_batch_size", "2")
    out = tmp_path / "ddp"
    # Both ranks really took part: each wrote its own RNG state into the checkpoint.
    assert sorted(p.name for p in (out / "checkpoint-6").glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert len(list(out.glob("**/model_index.json"))) == 1
    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 1)


REGIME_FLAGS = {
    "uniform": [],
    # rectified flow (real-valued levels, shifted): the curriculum's pacing (all-reduced loss) under UW over the same
    # clusters, with the learned weighting reading the flow's log-SNR
    "flow-curriculum+uw+learned": ["--noise_process", "flow", "--flow_shift", "3", "--regime", "ant", "--timestep_sampling", "curriculum",
                                   "--ant_clusters", "4", "--curriculum_pacing", "fixed", "--curriculum_steps_per_stage", "2",
                                   "--weighting", "learned"],
    "stratified+uw+p2": ["--regime", "ant", "--ant_method", "uw", "--ant_clusters", "4", "--weighting", "p2"],
    "ant-pcgrad": ["--regime", "ant", "--ant_method", "pcgrad", "--ant_clusters", "4"],
    "ant-nash": ["--regime", "ant", "--ant_method", "nash", "--ant_clusters", "4", "--nash_update_every", "2"],
    # branches at step 2, resumes at 3 in stage 2; experts without samples in a step need find_unused_parameters
    "experts+uw": ["--experts", "3", "--experts_base_steps", "2", "--balancer", "uw"],
    # one expert per stage-2 step, the same one on both ranks (its turn is in the checkpoint), UW over the clusters
    "experts-round-robin+uw": ["--experts", "3", "--experts_base_steps", "2", "--experts_schedule", "round_robin", "--balancer", "uw"],
    # 4 experts, 1 sample per group on each rank (strided slices of a group-sorted draw): the batched wide step
    "experts-batched": ["--experts", "4", "--experts_base_steps", "2"],
    # u(λ) lives outside the DDP model: its gradient is averaged by hand, so every rank holds the same u
    "learned-ant-uw": ["--weighting", "learned", "--regime", "ant", "--ant_clusters", "4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("regime", sorted(REGIME_FLAGS))
def test_two_process_ddp_resume_matches_uninterrupted_run(tmp_path, regime):
    flags = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--no_validation", "--use_ema", *REGIME_FLAGS[regime]]
    launch(tmp_path / "straight", *flags)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    launch(tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    unet = "unet/expert_2" if "experts" in regime else "unet"
    for part in ("checkpoint-6/model.safetensors", f"{unet}/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "straight" / part), load_file(tmp_path / "resumed" / part)
        for name in a:
            if regime.startswith("flow"):  # the flow must-show: bit-identical to the uninterrupted run
                assert torch.equal(a[name], b[name]), name
            else:
                torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_curriculum_stage_decisions_identical_on_both_ranks(tmp_path):
    import json

    from ddp_probe_curriculum import rank_loss

    from diffusers_curriculum.regimes.timesteps import AdaptivePacing

    proc = run_launch([*LAUNCH, str(ROOT / "tests" / "ddp_probe_curriculum.py"), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert rank0["num_processes"] == rank1["num_processes"] == 2
    assert rank0["stages"] == rank1["stages"] and rank0["history"] == rank1["history"]
    assert len(rank0["history"]) > 1
    assert all(a != b for a, b in zip(rank0["draws"], rank1["draws"]))  # different slices of one global batch

    # The check can fail: paced on its own losses alone, each rank would have decided differently.
    def alone(rank):
        pacing = AdaptivePacing(patience=2, check_every=2, smoothing=0.0)
        return [step for step in range(1, 61) if pacing.update(rank_loss(rank, step))]

    assert alone(0) != alone(1)


@pytest.mark.slow
def test_ant_balancers_run_under_ddp_with_identical_state_on_both_ranks(tmp_path):
    proc = run_launch([*LAUNCH, str(ROOT / "tests" / "ddp_probe_ant.py"), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("uw", "pcgrad", "nash"):
        rank0, rank1 = (torch.load(tmp_path / f"{method}-rank{i}.pt") for i in (0, 1))
        assert rank0["num_processes"] == 2
        torch.testing.assert_close(rank0["checksum"], rank1["checksum"], rtol=0, atol=1e-9)
        for key in rank0["balancer"]:
            assert torch.equal(torch.as_tensor(rank0["balancer"][key]), torch.as_tensor(rank1["balancer"][key])), (method, key)
        if method == "uw":
            assert not torch.equal(rank0["balancer"]["log_variances"], torch.zeros(3))
