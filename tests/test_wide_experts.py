"""The batched expert step: TDC's experts run as one wide UNet (grouped convolutions) in stage 2."""

import copy
import logging

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file

from diffusers_curriculum.experts import wide as wide_experts
from diffusers_curriculum.experts import TimestepRoutedExperts
from diffusers_curriculum.models import tiny_unet_config
from diffusers_curriculum.experts.pruning import pruned_copy
from diffusers_curriculum.experts.wide import BatchedExpertStep, WideExperts, why_not_wide

BOUNDARIES = [0, 25, 50, 75, 100]


def routed(num_class_embeds=None, seed=0):
    """Four experts with different weights (3 blocks: attention at the lowest resolution, skip concatenations)."""
    torch.manual_seed(seed)
    config = tiny_unet_config(16, 2, (8, 16, 16))
    base = UNet2DModel.from_config({**config, "num_class_embeds": num_class_embeds})
    model = TimestepRoutedExperts.from_model(base, BOUNDARIES)
    with torch.no_grad():
        for i, expert in enumerate(model.experts):
            for p in expert.parameters():
                p.add_(0.1 * i * torch.randn_like(p))
    return model


def batch(n_per_group=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    t = torch.cat([torch.randint(b, e, (n_per_group,), generator=generator) for b, e in zip(BOUNDARIES, BOUNDARIES[1:])])
    order = torch.randperm(t.numel(), generator=generator)  # groups interleaved, as a stratified batch may be
    return torch.randn(t.numel(), 2, 16, 16, generator=generator), t[order]


def outputs_and_grads(model, x, t, **kwargs):
    model.zero_grad()
    out = model(x, t, **kwargs).sample
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "class-conditional"])
def test_batched_step_equals_the_per_group_forward_in_outputs_and_gradients(conditional):
    per_group = routed(num_class_embeds=5 if conditional else None)
    batched = copy.deepcopy(per_group)
    batched.batched = BatchedExpertStep()
    x, t = batch()
    kwargs = {"class_labels": torch.arange(t.numel()) % 5} if conditional else {}
    calls = []
    original = WideExperts.__call__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WideExperts, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
        out_b, grads_b = outputs_and_grads(batched, x, t, **kwargs)
    out_g, grads_g = outputs_and_grads(per_group, x, t, **kwargs)
    assert calls and batched.batched.wide is not None  # the wide model ran (the first batch twice: check + step)
    torch.testing.assert_close(out_b, out_g, rtol=1e-4, atol=1e-5)
    assert len(grads_b) == len(grads_g) == 4 * len(list(per_group.experts[0].parameters()))
    scale = max(g.abs().max() for g in grads_g)
    for a, b in zip(grads_b, grads_g):  # float tolerance: sums over the batch in another order
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * scale)


def test_an_uneven_batch_and_a_single_group_take_the_per_group_forward():
    model = routed()
    model.batched = BatchedExpertStep()
    x, t = batch()
    assert model.batched(model, x[:-1], t[:-1], model.group_of(t[:-1])) is None  # 3, 3, 3, 2 samples
    reference = copy.deepcopy(model)
    reference.batched = None
    torch.testing.assert_close(model(x[:-1], t[:-1]).sample, reference(x[:-1], t[:-1]).sample)
    assert model.batched.wide is None  # never built


def test_experts_it_cannot_cover_are_named():
    model = routed()
    assert why_not_wide(list(model.experts)) is None
    pruned = list(model.experts)
    pruned[1] = pruned_copy(pruned[1], {"stream": 0.5})
    assert "different widths" in why_not_wide(pruned)
    conditional = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                       cross_attention_dim=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2)
    assert "only UNet2DModel" in why_not_wide([conditional, copy.deepcopy(conditional)])
    checkpointed = [copy.deepcopy(e) for e in model.experts]
    checkpointed[0].enable_gradient_checkpointing()
    assert why_not_wide(checkpointed) == "gradient checkpointing"
    step = BatchedExpertStep()
    x, t = batch()
    model.experts[1] = pruned[1]
    assert step(model, x, t, model.group_of(t)) is None and "different widths" in step.reason


def test_the_batched_step_stays_on_under_bf16_autocast():
    model = routed()
    model.batched = BatchedExpertStep()
    reference = copy.deepcopy(model)
    reference.batched = None
    x, t = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = model(x, t).sample, reference(x, t).sample
    assert model.batched.wide is not None and model.batched.wide.checked  # the check passed at bf16 precision
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.05, atol=0.05 * float(expected.abs().max()))


def test_a_failed_first_batch_check_falls_back_for_good(monkeypatch, caplog):
    monkeypatch.setattr(wide_experts, "CHECK_TOLERANCE", -1.0)  # no wide output can pass
    model = routed()
    model.batched = BatchedExpertStep()
    reference = copy.deepcopy(model)
    reference.batched = None
    x, t = batch()
    with caplog.at_level(logging.WARNING, logger="diffusers_curriculum.experts.wide"):
        out = model(x, t).sample
    assert "differs from the per-group forward" in caplog.text
    torch.testing.assert_close(out, reference(x, t).sample)
    assert model.batched.wide is None and model.batched(model, x, t, model.group_of(t)) is None


def test_the_wide_model_follows_the_experts_after_an_optimizer_step():
    model = routed()
    model.batched = BatchedExpertStep()
    x, t = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x, t).sample.square().mean().backward()
    optimizer.step()
    reference = copy.deepcopy(model)
    reference.batched = None
    with torch.no_grad():
        torch.testing.assert_close(model(x, t).sample, reference(x, t).sample, rtol=1e-4, atol=1e-5)


def test_the_wide_model_is_rebuilt_when_a_parameter_is_replaced():
    """Pruning and loading replace parameter tensors: the wide model must not keep concatenating the old ones."""
    model = routed()
    model.batched = BatchedExpertStep()
    x, t = batch()
    with torch.no_grad():
        model(x, t)
        first = model.batched.wide
        expert = model.experts[2]
        expert.conv_out.bias = torch.nn.Parameter(expert.conv_out.bias + 1.0)
        out = model(x, t).sample
    assert model.batched.wide is not None and model.batched.wide is not first
    reference = copy.deepcopy(model)
    reference.batched = None
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x, t).sample, rtol=1e-4, atol=1e-5)


TDC4 = ["--regime", "tdc", "--tdc_groups", "4", "--tdc_base_steps", "2", "--max_train_samples", "64", "--no_validation",
        "--max_train_steps", "6", "--checkpointing_steps", "4"]


def test_training_with_the_batched_step_matches_the_per_group_step(train_unconditional, tmp_path, tiny_flags, monkeypatch):
    """Batch 8 over 4 groups: every stage-2 batch runs wide; same losses and weights as --experts_forward per_group."""
    runs, calls = {}, []
    original = WideExperts.__call__
    monkeypatch.setattr(WideExperts, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    for forward in ("batched", "per_group"):
        args = train_unconditional.parse_args(["--output_dir", str(tmp_path / forward), *tiny_flags, *TDC4,
                                               "--experts_forward", forward])
        runs[forward] = train_unconditional.main(args)
        # stage 2 is steps 3-6: four wide steps plus the first batch's check, none with per_group
        assert len(calls) == 5
    assert runs["batched"]["regime_state"]["experts"]["stage"] == 2
    assert runs["batched"]["losses"] == pytest.approx(runs["per_group"]["losses"], rel=1e-4)
    a = load_file(tmp_path / "batched" / "checkpoint-6" / "model.safetensors")
    b = load_file(tmp_path / "per_group" / "checkpoint-6" / "model.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("experts.3.") for k in a)  # same checkpoint layout
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)
    # resume in stage 2 with the batched step: bit-identical to the uninterrupted batched run
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    import shutil

    shutil.copytree(tmp_path / "batched" / "checkpoint-4", resumed_dir / "checkpoint-4")
    args = train_unconditional.parse_args(["--output_dir", str(resumed_dir), *tiny_flags, *TDC4,
                                           "--resume_from_checkpoint", "latest"])
    resumed = train_unconditional.main(args)
    assert resumed["losses"] == runs["batched"]["losses"][4:]
    c = load_file(resumed_dir / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(a[key], c[key]) for key in a)


def test_the_check_allows_for_tf32_on_cuda_only(monkeypatch):
    """cuDNN convolutions run in TF32 by default: there the grouped and the per-group forward differ by ~2e-4 of
    the output's scale (seen on an H200), which the float32 tolerance (1e-4) refused."""
    out = torch.zeros(2, dtype=torch.float32)
    assert wide_experts.check_tolerance(out, torch.device("cpu")) == wide_experts.CHECK_TOLERANCE
    assert wide_experts.check_tolerance(out.bfloat16(), torch.device("cpu")) == wide_experts.CHECK_TOLERANCE_REDUCED
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert wide_experts.check_tolerance(out, torch.device("cuda")) == wide_experts.CHECK_TOLERANCE_TF32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert torch.get_float32_matmul_precision() == "highest"  # PyTorch's default: no TF32 matmuls
    assert wide_experts.check_tolerance(out, torch.device("cuda")) == wide_experts.CHECK_TOLERANCE
