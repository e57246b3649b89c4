"""--regime tdc: base stage, branching into routed experts, resume in either stage, bad resumes."""

import copy
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from diffusers_curriculum import read_training_regime
from diffusers_curriculum.errors import UsageError
from diffusers_curriculum.experts import TimestepRoutedExperts, is_routed_experts
from diffusers_curriculum.models import tiny_unet_config
from diffusers_curriculum.clustering import equal_boundaries, partition
from diffusers_curriculum.regimes import build_regime

from conftest import regime_args

TDC_FLAGS = ["--regime", "tdc", "--tdc_groups", "3", "--tdc_base_steps", "4", "--max_train_samples", "64", "--no_validation"]


@pytest.mark.parametrize("cost", ["equal", "timestep", "snr", "log_snr"])
def test_the_experts_serve_the_clusters_of_their_cost(cost):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    args = regime_args("--regime", "tdc", "--tdc_groups", "4", "--tdc_group_cost", cost, "--tdc_base_steps", "2")
    regime = build_regime(args, scheduler)
    expected = partition(cost, 4, 1000, scheduler.alphas_cumprod)
    assert regime.experts.boundaries == regime.boundaries == expected == regime.experts.group_sampler.boundaries.tolist()
    assert expected[0] == 0 and expected[-1] == 1000 and all(b > a for a, b in zip(expected, expected[1:]))
    if cost in ("snr", "log_snr"):  # DP clusters, not equal intervals under another name
        assert expected != equal_boundaries(1000, 4)


def make_regime(base_steps=2):
    args = regime_args("--regime", "tdc", "--tdc_groups", "3", "--tdc_group_cost", "equal", "--tdc_base_steps", str(base_steps))
    return build_regime(args, DDPMScheduler(num_train_timesteps=1000))


class FakeAccelerator:
    device = torch.device("cpu")

    def backward(self, loss):
        loss.backward()


def train_step(regime, model, optimizer, ema, step):
    clean = torch.randn(6, 1, 8, 8)
    noise, t = regime.sample(clean)
    loss = ((model(clean + noise, t).sample - noise) ** 2).mean(dim=(1, 2, 3))
    regime.backward(FakeAccelerator(), loss, t, model)
    optimizer.step()
    optimizer.zero_grad()
    ema.step(model.parameters())
    return t, regime.on_step_end(FakeAccelerator(), step)


def test_stage_one_trains_the_base_then_branching_copies_weights_optimizer_and_ema():
    torch.manual_seed(0)
    regime = make_regime(base_steps=2)
    model = regime.wrap_model(UNet2DModel.from_config(tiny_unet_config(8, 1, (8, 16))))
    assert isinstance(model, TimestepRoutedExperts) and regime.experts.experts is model
    untouched = {k: v.clone() for k, v in model.experts[2].state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMAModel(model.parameters(), decay=0.9)
    regime.attach(optimizer=optimizer, ema_model=ema)

    t, logs = train_step(regime, model, optimizer, ema, 1)
    assert logs["tdc_stage"] == 1 and t.min() < 333 and t.max() >= 667  # stage 1: all timesteps, one model
    for k, v in model.experts[2].state_dict().items():  # the other experts do not move before branching
        assert torch.equal(v, untouched[k])
    _, logs = train_step(regime, model, optimizer, ema, 2)
    assert logs["tdc_stage"] == 2 and regime.experts.stage == 2 and model.route_all_to is None
    base = list(model.experts[0].parameters())
    per_expert = len(base)
    for i in (1, 2):
        for j, (a, b) in enumerate(zip(base, model.experts[i].parameters())):
            assert torch.equal(a, b)
            assert torch.equal(optimizer.state[a]["exp_avg"], optimizer.state[b]["exp_avg"])
            assert torch.equal(ema.shadow_params[j], ema.shadow_params[i * per_expert + j])

    t, logs = train_step(regime, model, optimizer, ema, 3)  # stage 2: stratified, each expert its own group
    assert sorted(regime.experts.group_sampler.cluster_of(t).tolist()) == [0, 0, 1, 1, 2, 2]
    assert {"loss/group_0", "loss/group_1", "loss/group_2"} <= set(logs)
    assert not torch.equal(model.experts[0].conv_in.weight, model.experts[1].conv_in.weight)


def test_stratified_stage_two_gives_each_expert_the_gradient_of_its_own_group_mean():
    """As if each expert were fine-tuned alone on its group: not 1/k of that (the batch mean), which under the AdamW
    second moments inherited from the base would step at about lr/k."""
    torch.manual_seed(0)
    regime = make_regime(base_steps=1)
    model = regime.wrap_model(UNet2DModel.from_config(tiny_unet_config(8, 1, (8, 16))))
    regime.experts.branch()
    clean = torch.randn(6, 1, 8, 8)
    noise, t = regime.sample(clean)
    per_sample = ((model(clean + noise, t).sample - noise) ** 2).mean(dim=(1, 2, 3))
    logged = regime.backward(FakeAccelerator(), per_sample, t, model)
    torch.testing.assert_close(logged, per_sample.detach().mean())  # the logs keep the batch mean
    groups = regime.experts.group_sampler.cluster_of(t)
    for i, expert in enumerate(model.experts):
        alone = copy.deepcopy(expert)
        mine = groups == i
        ((alone(clean[mine] + noise[mine], t[mine]).sample - noise[mine]) ** 2).mean().backward()
        for own, reference in zip(expert.parameters(), alone.parameters()):
            torch.testing.assert_close(own.grad, reference.grad, rtol=1e-4, atol=1e-7)


def test_round_robin_stage_two_trains_one_expert_per_step_on_a_full_batch_of_its_group():
    torch.manual_seed(0)
    args = regime_args("--regime", "tdc", "--tdc_groups", "3", "--tdc_group_cost", "equal", "--tdc_base_steps", "1",
                       "--experts_schedule", "round_robin")
    regime = build_regime(args, DDPMScheduler(num_train_timesteps=1000))
    model = regime.wrap_model(UNet2DModel.from_config(tiny_unet_config(8, 1, (8, 16))))
    assert model.batched is None  # nothing to batch: one expert per step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMAModel(model.parameters(), decay=0.9)
    regime.attach(optimizer=optimizer, ema_model=ema)
    train_step(regime, model, optimizer, ema, 1)  # stage 1, then the branch
    for step, expert in zip(range(2, 6), [0, 1, 2, 0]):
        before = [{k: v.clone() for k, v in e.state_dict().items()} for e in model.experts]
        t, logs = train_step(regime, model, optimizer, ema, step)
        assert regime.experts.group_sampler.cluster_of(t).tolist() == [expert] * 6
        assert [key for key in logs if key.startswith("loss/group_")] == [f"loss/group_{expert}"]
        for i, e in enumerate(model.experts):  # only this step's expert moved (AdamW skips parameters without grad)
            moved = any(not torch.equal(v, before[i][k]) for k, v in e.state_dict().items())
            assert moved == (i == expert)
    assert regime.describe()["schedule"] == "round_robin"
    assert regime.axes()["experts"] == {"num_experts": 3, "base_steps": 1, "schedule": "round_robin"}
    stratified = build_regime(regime_args("--regime", "tdc", "--tdc_base_steps", "1"), DDPMScheduler(num_train_timesteps=1000))
    assert "schedule" not in stratified.axes()["experts"]  # the record of checkpoints written before the flag
    with pytest.raises(UsageError, match="checkpoint's experts is .*'schedule': 'round_robin'.*--experts_schedule"):
        stratified.load_state_dict(regime.state_dict())


def test_state_round_trip_and_mismatched_resumes_are_clear_errors():
    regime = make_regime(base_steps=2)
    regime.wrap_model(UNet2DModel.from_config(tiny_unet_config(8, 1, (8, 16))))
    regime.experts.stage = 2
    state = regime.state_dict()
    fresh = make_regime(base_steps=2)
    fresh.wrap_model(UNet2DModel.from_config(tiny_unet_config(8, 1, (8, 16))))
    fresh.load_state_dict(state)
    assert fresh.experts.stage == 2 and fresh.experts.experts.route_all_to is None
    with pytest.raises(UsageError, match="checkpoint's experts is .*'base_steps': 2.* this run's is .*'base_steps': 50"):
        make_regime(base_steps=50).load_state_dict(state)
    with pytest.raises(UsageError, match="checkpoint's experts is None"):
        make_regime().load_state_dict(build_regime(regime_args(), DDPMScheduler()).state_dict())


def run(script, tmp_path, tiny_flags, *extra, name="run"):
    return script.main(script.parse_args(["--output_dir", str(tmp_path / name), *tiny_flags, *TDC_FLAGS, *extra]))


def test_tdc_run_saves_a_routed_pipeline_that_generates(train_unconditional, tmp_path, tiny_flags):
    summary = run(train_unconditional, tmp_path, tiny_flags, "--max_train_steps", "8", "--use_ema")
    assert summary["global_step"] == 8 and summary["regime_state"]["experts"]["stage"] == 2
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "run", trust_remote_code=True)
    assert is_routed_experts(pipeline.unet) and len(pipeline.unet.experts) == 3
    record = read_training_regime(tmp_path / "run")
    assert record["name"] == "tdc" and record["base_steps"] == 4 and len(record["groups"]) == 3
    assert all(e["flops_per_forward"] > 0 and e["params"] > 0 for e in record["experts"])
    images = pipeline(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 32, 32, 1) and (tmp_path / "run" / "unet" / "expert_2" / "config.json").exists()


@pytest.mark.parametrize("interrupt_at", [3, 6], ids=["in-stage-1", "in-stage-2"])
def test_resume_in_either_stage_reproduces_the_uninterrupted_run(train_unconditional, tmp_path, tiny_flags, interrupt_at):
    flags = ["--max_train_steps", "8", "--checkpointing_steps", "3", "--use_ema"]
    straight = run(train_unconditional, tmp_path, tiny_flags, *flags, name="straight")
    (tmp_path / "resumed").mkdir()
    name = f"checkpoint-{interrupt_at}"
    shutil.copytree(tmp_path / "straight" / name, tmp_path / "resumed" / name)
    resumed = run(train_unconditional, tmp_path, tiny_flags, *flags, "--resume_from_checkpoint", "latest", name="resumed")
    assert resumed["losses"] == pytest.approx(straight["losses"][interrupt_at:], rel=1e-5)
    a = load_file(tmp_path / "straight" / "checkpoint-6" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint-6" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_round_robin_resume_in_stage_two_reproduces_the_uninterrupted_run(train_unconditional, tmp_path, tiny_flags):
    flags = ["--max_train_steps", "8", "--checkpointing_steps", "5", "--experts_schedule", "round_robin"]
    straight = run(train_unconditional, tmp_path, tiny_flags, *flags, name="straight")
    assert straight["regime_state"]["experts"]["group_sampler"]["current"] == 1  # 4 stage-2 steps over 3 experts
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-5", tmp_path / "resumed" / "checkpoint-5")
    resumed = run(train_unconditional, tmp_path, tiny_flags, *flags, "--resume_from_checkpoint", "latest", name="resumed")
    assert resumed["losses"] == pytest.approx(straight["losses"][5:], rel=1e-5)


def test_resuming_with_other_base_steps_is_refused(train_unconditional, tmp_path, tiny_flags):
    run(train_unconditional, tmp_path, tiny_flags, "--max_train_steps", "6", "--checkpointing_steps", "6")
    flags = [f if f != "4" else "7" for f in TDC_FLAGS]  # --tdc_base_steps 7: step 6 would still be stage 1
    args = train_unconditional.parse_args(["--output_dir", str(tmp_path / "run"), *tiny_flags, *flags,
                                           "--max_train_steps", "10", "--resume_from_checkpoint", "latest"])
    with pytest.raises(UsageError, match="checkpoint's experts .*'base_steps': 4.* this run's .*'base_steps': 7.*--experts_base_steps"):
        train_unconditional.main(args)
