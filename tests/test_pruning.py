"""Structured pruning of experts: FLOPs counting, budgets, the proxy search, pruned save/load, the script."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from torch import nn

import diffusers_curriculum  # noqa: F401
from diffusers_curriculum import read_training_regime
from diffusers_curriculum.experts import pruning
from diffusers_curriculum.data import build_dataset
from diffusers_curriculum.experts import TimestepRoutedExperts
from diffusers_curriculum.models import tiny_unet_config

from conftest import ROOT, TINY_FLAGS, load_script


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel.from_config(tiny_unet_config(16, 1, (16, 32))).eval()


def test_flops_are_counted_from_a_real_forward():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    assert pruning.count_flops(conv, {"input": torch.zeros(1, 3, 7, 7)}) == 2 * 5 * 3 * 9 * 7 * 7


def test_group_budgets_follow_progressive_scaling():
    # N = 4 groups, keep k = 0.5: expert 0 (hardest, lowest t) keeps the most, expert 3 keeps k
    assert pruning.group_budgets(4, 0.5) == pytest.approx([0.875, 0.75, 0.625, 0.5])
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="prune_ratio must be in"):
            pruning.group_budgets(4, bad)


def test_pruned_model_is_smaller_keeps_shapes_and_fine_tunes():
    model = tiny_unet()
    before_params, before_flops = pruning.count_params(model), pruning.count_flops(model)
    pruned = pruning.pruned_copy(model, {name: 0.5 for name in pruning.prunable_blocks(model)})
    assert pruning.count_params(pruned) < 0.5 * before_params and pruning.count_flops(pruned) < 0.5 * before_flops
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 50, 900])
    assert pruned(x, t).sample.shape == x.shape
    dataset = build_dataset("fashion_mnist", resolution=16, max_train_samples=32)
    weights = pruned.conv_in.weight.detach().clone()
    pruning.finetune(pruned, pruning.infinite_batches(dataset, 8, 0), DDPMScheduler(), (0, 500), 2, 1e-3)
    assert not torch.equal(weights, pruned.conv_in.weight)
    assert pruning.count_params(model) == before_params  # pruned_copy left the original alone


def test_distillation_loss_is_zero_when_student_is_teacher_and_pulls_a_pruned_expert_towards_it():
    model = tiny_unet()
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([1, 50, 400, 900])
    prediction = model(x, t).sample
    assert pruning.distillation_loss(prediction, prediction) == 0
    scheduler, clean, noise = DDPMScheduler(), torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    plain = pruning.proxy_loss(model, scheduler, clean, noise, t)
    assert torch.equal(pruning.proxy_loss(model, scheduler, clean, noise, t, teacher=model, distill_weight=5.0), plain)

    student = pruning.pruned_copy(model, {name: 0.5 for name in pruning.prunable_blocks(model)})
    dataset = build_dataset("fashion_mnist", resolution=16, max_train_samples=32)
    def gap():
        with torch.no_grad():
            return float(pruning.distillation_loss(student(x, t).sample, model(x, t).sample))

    before = gap()
    pruning.finetune(student, pruning.infinite_batches(dataset, 8, 0), scheduler, (0, 1000), 30, 1e-3,
                     teacher=model, distill_weight=10.0)
    assert gap() < before  # the student's outputs moved towards the teacher's
    assert model.conv_in.weight.grad is None  # the teacher is not trained


def test_search_meets_the_budget_and_fills_the_memory_bank():
    model = tiny_unet()
    scores = iter([3.0, 1.0, 2.0, 0.5])
    result = pruning.search_pruning(model, 0.6, proxy=lambda candidate: next(scores), rounds=3)
    assert len(result.memory) == 3
    assert all(r.flops_fraction <= 0.6 for r in result.memory)
    assert result.config == result.memory[1].config  # the best (lowest) proxy score wins
    assert len({json.dumps(r.config, sort_keys=True) for r in result.memory}) == 3  # no repeated proposal
    assert pruning.count_flops(pruning.pruned_copy(model, result.config)) == result.flops


def test_a_custom_proposer_plugs_in():
    class Fixed(pruning.Proposer):
        def propose(self, memory, blocks, fit):
            return None if memory else {b: 0.25 for b in blocks}

    result = pruning.search_pruning(tiny_unet(), 1.0, proxy=lambda c: 0.0, proposer=Fixed(), rounds=5)
    assert len(result.memory) == 1 and set(result.config.values()) == {0.25}


def test_pruned_experts_save_and_reload_with_identical_outputs(tmp_path):
    experts = TimestepRoutedExperts.from_model(tiny_unet(), [0, 400, 1000])
    pruning.prune_model(experts.experts[1], {name: 0.5 for name in pruning.prunable_blocks(experts.experts[1])})
    experts.experts[1].pruning_record = {"config": "half"}
    experts.save_pretrained(tmp_path / "m")
    loaded = TimestepRoutedExperts.from_pretrained(tmp_path / "m")
    assert loaded.experts[1].conv_in.out_channels < loaded.experts[0].conv_in.out_channels
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 399, 400, 999])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, experts.eval()(x, t).sample)
    assert loaded.experts[1].conv_norm_out.num_groups == experts.experts[1].conv_norm_out.num_groups == 4  # of 8
    report = pruning.flops_report(loaded, [999, 500, 10])
    assert report["flops_per_sample"] == report["experts"][1]["flops"] * 2 + report["experts"][0]["flops"]


@pytest.fixture(scope="module")
def tdc_pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("tdc") / "run"
    script = load_script("train_unconditional")
    script.main(script.parse_args(["--output_dir", str(out), *TINY_FLAGS, "--regime", "tdc", "--tdc_groups", "2",
                                   "--tdc_base_steps", "3", "--max_train_steps", "5", "--max_train_samples", "64",
                                   "--no_validation"]))
    return out


@pytest.mark.slow
def test_prune_script_writes_a_smaller_pipeline_that_generates(tdc_pipeline, tmp_path):
    prune = load_script("prune_experts")
    out = tmp_path / "pruned"
    summary = prune.main(prune.parse_args([
        "--pretrained_model_name_or_path", str(tdc_pipeline), "--output_dir", str(out), "--prune_ratio", "0.5",
        "--search_rounds", "2", "--proxy_steps", "1", "--finetune_steps", "1", "--max_train_samples", "32",
        "--validation_size", "8", "--train_batch_size", "8", "--num_inference_steps", "10", "--distill_weight", "1",
        "--max_loss_increase", "inf",
    ]))
    assert summary["flops_per_sample"] < summary["flops_per_sample_before"]
    assert json.loads((out / "unet" / "expert_0" / "pruning.json").read_text())["distill_weight"] == 1.0
    pipeline = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    record = read_training_regime(out)["pruning"]
    assert record["flops_per_sample"] == summary["flops_per_sample"] and len(record["experts"]) == 2
    assert pipeline(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 1)
    assert (out / "unet" / "expert_1" / "pruning.json").exists() and (out / "pruning_report.json").exists()
    assert (tdc_pipeline / "model_index.json").exists()  # the unpruned pipeline is kept
    # the experts were fine-tuned with the run's own AdamW settings (the scripts' defaults) and weighting
    assert record["finetune_objective"]["betas"] == [0.95, 0.999] and record["finetune_objective"]["weight_decay"] == 1e-6
    assert read_training_regime(tdc_pipeline)["optimizer"]["betas"] == [0.95, 0.999]


@pytest.mark.slow
def test_prune_at_branch_fine_tunes_each_expert_for_the_rest_of_the_run_at_its_learning_rate(tdc_pipeline, tmp_path, monkeypatch):
    """The recipe of the README's pruned-TDC result as a flag: the run (5 steps, lr 1e-3) planned for 8 gives each
    pruned expert 3 fine-tuning steps at 1e-3 and ships their EMA (0.999)."""
    prune = load_script("prune_experts")
    seen = {}
    real = prune.prune_experts
    monkeypatch.setattr(prune, "prune_experts", lambda *a, **k: seen.update(k) or real(*a, **k))
    argv = ["--pretrained_model_name_or_path", str(tdc_pipeline), "--output_dir", str(tmp_path / "pruned"), "--prune_at", "branch",
            "--search_rounds", "1", "--proxy_steps", "1", "--max_train_samples", "32", "--validation_size", "8",
            "--train_batch_size", "4", "--num_inference_steps", "4", "--max_loss_increase", "inf"]
    summary = prune.main(prune.parse_args([*argv, "--total_train_steps", "8"]))
    assert read_training_regime(tdc_pipeline)["trained_steps"] == 5
    assert (seen["finetune_steps"], seen["learning_rate"], seen["ema_decay"]) == (3, 1e-3, 0.999)
    assert (summary["prune_at"], summary["finetune_steps"]) == ("branch", 3)
    assert read_training_regime(tmp_path / "pruned")["pruning"]["learning_rate"] == 1e-3
    with pytest.raises(diffusers_curriculum.errors.UsageError, match="--total_train_steps 5 leaves no fine-tuning: the run trained 5 steps"):
        prune.main(prune.parse_args([*argv[:3], str(tmp_path / "other"), *argv[4:], "--total_train_steps", "5"]))
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("extra, message", [
    (["--prune_ratio", "1.0"], "--prune_ratio must be in (0, 1), got 1.0"),
    (["--prune_ratio", "0"], "--prune_ratio must be in (0, 1), got 0.0"),
    (["--search_rounds", "0"], "--search_rounds must be >= 1, got 0"),
    (["--distill_weight", "-1"], "--distill_weight must be >= 0, got -1.0"),
    (["--max_loss_increase", "-0.1"], "--max_loss_increase must be >= 0 (inf: no limit), got -0.1"),
    (["--relaxations", "-1"], "--relaxations must be >= 0, got -1"),
    (["--ema_max_decay", "1"], "--ema_max_decay must be in (0, 1), got 1.0"),
    (["--prune_at", "branch"], "--prune_at branch needs --total_train_steps (the run's planned length)"),
    (["--total_train_steps", "9"], "--total_train_steps applies to --prune_at branch"),
    (["--prune_at", "branch", "--total_train_steps", "9", "--finetune_steps", "3"],
     "--finetune_steps is set by --prune_at branch (--total_train_steps minus the steps trained); give one"),
])
def test_prune_script_bad_flags_are_one_line_errors(tmp_path, capsys, extra, message):
    prune = load_script("prune_experts")
    with pytest.raises(SystemExit) as exited:  # the script's entry point, in-process
        prune.cli(["--pretrained_model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "out"), *extra])
    assert exited.value.code == 2 and capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_a_bad_prune_flag_is_one_line_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_scripts" / "prune_experts.py"), "--pretrained_model_name_or_path",
                           str(tmp_path), "--output_dir", str(tmp_path / "out"), "--prune_ratio", "1.0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --prune_ratio must be in (0, 1), got 1.0"


def test_prune_script_refuses_a_pipeline_without_experts(tmp_path):
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "plain")
    prune = load_script("prune_experts")
    args = prune.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "plain"), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(diffusers_curriculum.errors.UsageError, match="not the TimestepRoutedExperts"):
        prune.main(args)


def default_unet():
    """The benchmark's UNet: widths 16, 32, 32 and GroupNorms of 8 groups (2 or 4 channels each)."""
    torch.manual_seed(0)
    return UNet2DModel.from_config(tiny_unet_config(32, 1, (16, 32, 32))).eval()


def test_pruning_removes_whole_groupnorm_groups_a_step_of_one_group():
    model = default_unet()
    assert pruning.ratio_step(model) == 1 / 8
    pruned = pruning.pruned_copy(model, {"stream": 1 / 8})  # one step: 2 of 16 and 4 of 32 channels
    assert pruned.conv_in.out_channels == 14 and pruned.down_blocks[1].resnets[0].conv2.out_channels == 28
    for name, norm in pruned.named_modules():
        if isinstance(norm, nn.GroupNorm):  # group sizes kept, groups fewer
            original = model.get_submodule(name)
            assert norm.num_channels // norm.num_groups == original.num_channels // original.num_groups, name
    assert 0.7 < pruning.count_flops(pruned) / pruning.count_flops(model) < 0.8  # ~ (7/8)^2
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 900])
    assert pruned(x, t).sample.shape == x.shape
    # ratios between steps round down to whole groups
    assert pruning.pruned_copy(model, {"stream": 0.2}).conv_in.out_channels == 14


def test_fit_to_budget_gives_whole_group_ratios_that_meet_the_budget():
    model = default_unet()
    blocks = pruning.prunable_blocks(model)
    base = pruning.count_flops(model)
    config = pruning.fit_to_budget(model, blocks, {}, 0.8 * base)
    assert all(abs(ratio * 8 - round(ratio * 8)) < 1e-6 for ratio in config.values())
    assert pruning.count_flops(pruning.pruned_copy(model, config)) <= 0.8 * base
    assert pruning.fit_to_budget(model, blocks, {}, 0.01 * base) is None  # past max_ratio


def test_the_proxy_scores_with_its_fine_tuning_objective():
    model, teacher = tiny_unet(seed=0), tiny_unet(seed=1)
    validation = pruning.ValidationSet(torch.randn(4, 1, 16, 16), (0, 500))
    scheduler = DDPMScheduler()
    plain = pruning.Proxy(iter(()), scheduler, validation, (0, 500), steps=0)(model)
    distilled = pruning.Proxy(iter(()), scheduler, validation, (0, 500), steps=0, teacher=teacher, distill_weight=2.0)(model)
    assert plain == pytest.approx(validation.loss(model, scheduler))
    assert distilled > plain and distilled == pytest.approx(validation.loss(model, scheduler, teacher, 2.0))


def test_a_budget_that_breaks_quality_is_relaxed_then_refused(monkeypatch):
    """The validation loss here grows as FLOPs shrink: no pruned expert stays within 5 %, so the search relaxes
    the budget twice and keeps the expert unpruned; with no limit the pruned expert ships."""
    base_flops = pruning.count_flops(tiny_unet())
    monkeypatch.setattr(pruning.ValidationSet, "loss", lambda self, model, scheduler, *a, **k: base_flops / pruning.count_flops(model))
    dataset = build_dataset("fashion_mnist", resolution=16, max_train_samples=16)
    kwargs = dict(rounds=1, proxy_steps=0, finetune_steps=0, batch_size=8, validation_size=4, log=lambda _: None)
    experts = TimestepRoutedExperts.from_model(tiny_unet(), [0, 500, 1000])
    reports = pruning.prune_experts(experts, dataset, DDPMScheduler(), 0.5, max_loss_increase=0.05, relaxations=2, **kwargs)
    last = reports[-1]  # the easiest expert: budget 0.5
    assert last["kept_unpruned"] and last["config"] == {} and last["flops"] == last["flops_before"]
    assert [a["flops_budget_fraction"] for a in last["attempts"]] == pytest.approx([0.5, 0.75, 0.875])
    assert all(a["validation_loss"] > 1.05 for a in last["attempts"])
    experts = TimestepRoutedExperts.from_model(tiny_unet(), [0, 500, 1000])
    shipped = pruning.prune_experts(experts, dataset, DDPMScheduler(), 0.5, **kwargs)[-1]
    assert not shipped["kept_unpruned"] and shipped["flops"] <= 0.5 * shipped["flops_before"]
    assert experts.experts[1].conv_in.out_channels < 16


def test_fine_tuning_with_ema_ships_the_average_of_its_weights():
    dataset = build_dataset("fashion_mnist", resolution=16, max_train_samples=16)
    runs = {}
    for ema_decay in (None, 0.999):
        model = tiny_unet()
        pruning.finetune(model, pruning.infinite_batches(dataset, 8, 0), DDPMScheduler(), (0, 500), 6, 1e-2, ema_decay=ema_decay)
        runs[ema_decay] = model.conv_in.weight.detach().clone()
    start = tiny_unet().conv_in.weight.detach()
    # same seeded steps; the EMA lags behind the raw weights, between them and the start
    assert not torch.equal(runs[None], runs[0.999])
    assert (runs[0.999] - start).norm() < (runs[None] - start).norm()


def test_pruned_experts_are_fine_tuned_with_the_runs_optimizer_and_weighting():
    """Two fine-tuning steps under a run's record (AdamW β = (0.95, 0.999), weight decay 1e-6, clipping at 1, P2
    weighting) equal two steps written by hand: the same draws, P2's 1/(k + SNR)^γ from the betas by hand."""
    record = {"weighting": "p2", "p2_gamma": 0.5, "p2_k": 2.0,
              "optimizer": {"name": "AdamW", "learning_rate": 1e-3, "betas": [0.95, 0.999], "weight_decay": 1e-6, "eps": 1e-8,
                            "max_grad_norm": 1.0}}
    objective = pruning.FinetuneObjective.from_record(record)
    assert (objective.betas, objective.weight_decay, objective.max_grad_norm, objective.weighting) == ((0.95, 0.999), 1e-6, 1.0, "p2")
    batch = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    scheduler = DDPMScheduler()
    model = tiny_unet()
    pruning.finetune(model, iter([batch, batch]), scheduler, (100, 600), 2, 1e-2, seed=3, objective=objective)

    expected = tiny_unet()
    expected.train()
    optimizer = torch.optim.AdamW(expected.parameters(), lr=1e-2, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)  # DDPMScheduler's linear betas, in its float32
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        t = torch.randint(100, 600, (4,), generator=generator)
        noise = torch.randn(batch.shape, generator=generator)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        prediction = expected(a ** 0.5 * batch + (1 - a) ** 0.5 * noise, t).sample
        snr = alpha_bar[t] / (1 - alpha_bar[t])
        loss = (((prediction - noise) ** 2).mean(dim=(1, 2, 3)) * (2.0 + snr) ** -0.5).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(expected.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    for (name, got), want in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_a_record_without_optimizer_settings_keeps_torchs_defaults_and_learned_is_fine_tuned_unweighted():
    assert pruning.FinetuneObjective.from_record({"weighting": "none"}) == pruning.FinetuneObjective()
    learned = pruning.FinetuneObjective.from_record({"weighting": "learned"})
    assert learned.weighting == "none" and "not saved with the pipeline" in learned.note
