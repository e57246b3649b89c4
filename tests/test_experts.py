import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

import diffusers_curriculum  # noqa: F401
from diffusers_curriculum.checkpointing import save_pipeline
from diffusers_curriculum.experts import TimestepRoutedExperts, check_boundaries, is_routed_experts
from diffusers_curriculum.models import tiny_unet_config


def experts(boundaries=(0, 30, 60, 100), seed=0):
    torch.manual_seed(seed)
    units = [UNet2DModel.from_config(tiny_unet_config(8, 1, (8, 16))) for _ in range(len(boundaries) - 1)]
    return TimestepRoutedExperts(boundaries=list(boundaries), expert_class="UNet2DModel", experts=units).eval()


@torch.no_grad()
def test_mixed_batch_equals_each_sample_through_its_own_expert():
    model = experts()
    x, t = torch.randn(6, 1, 8, 8), torch.tensor([0, 29, 30, 59, 60, 99])
    out = model(x, t)
    assert isinstance(out, UNet2DOutput) and out.sample.shape == x.shape
    for i, group in enumerate([0, 0, 1, 1, 2, 2]):  # boundary t = 30 and t = 60 go to the upper group
        expected = model.experts[group](x[i : i + 1], t[i : i + 1]).sample
        torch.testing.assert_close(out.sample[i : i + 1], expected, rtol=1e-5, atol=1e-5)
    assert model(x, t, return_dict=False)[0].shape == x.shape


@torch.no_grad()
def test_scalar_timestep_uses_one_expert():
    model = experts()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model(x, 45).sample, model.experts[1](x, 45).sample)
    torch.testing.assert_close(model(x, torch.tensor(99)).sample, model.experts[2](x, torch.tensor(99)).sample)


def test_gradients_reach_only_the_routed_experts():
    model = experts().train()
    model(torch.randn(2, 1, 8, 8), torch.tensor([5, 10])).sample.sum().backward()
    assert all(p.grad is not None for p in model.experts[0].parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.experts[2].parameters())


@torch.no_grad()
def test_save_and_from_pretrained_give_identical_outputs_with_different_widths(tmp_path):
    torch.manual_seed(0)
    units = [UNet2DModel.from_config(tiny_unet_config(8, 1, (8, 16))), UNet2DModel.from_config(tiny_unet_config(8, 1, (16, 32)))]
    model = TimestepRoutedExperts(boundaries=[0, 50, 100], expert_class="UNet2DModel", experts=units).eval()
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "expert_0", "expert_1"}
    loaded = TimestepRoutedExperts.from_pretrained(tmp_path / "m")
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([3, 70, 49, 50])
    torch.testing.assert_close(loaded(x, t).sample, model(x, t).sample)
    assert loaded.boundaries == [0, 50, 100] and loaded.experts[1].config.block_out_channels == [16, 32]


@torch.no_grad()
def test_stock_ddpm_and_ddim_pipelines_generate_and_reload(tmp_path):
    model = experts()
    pipe = DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=100))
    images = pipe(batch_size=2, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1)
    save_pipeline(pipe, tmp_path / "pipe")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True)
    assert is_routed_experts(reloaded.unet) and type(reloaded) is DDPMPipeline
    again = reloaded(batch_size=2, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert abs(again - images).max() < 1e-5
    ddim = DDIMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=100))
    assert ddim(batch_size=1, num_inference_steps=3, output_type="np").images.shape == (1, 8, 8, 1)


@torch.no_grad()
def test_conditional_experts_route_encoder_states_per_sample():
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4)
    units = [UNet2DConditionModel(**config) for _ in range(2)]
    model = TimestepRoutedExperts(boundaries=[0, 500, 1000], expert_class="UNet2DConditionModel", experts=units).eval()
    x, t, text = torch.randn(3, 4, 8, 8), torch.tensor([10, 900, 400]), torch.randn(3, 5, 12)
    out = model(x, t, encoder_hidden_states=text).sample
    expected = units[1](x[1:2], t[1:2], encoder_hidden_states=text[1:2]).sample
    torch.testing.assert_close(out[1:2], expected, rtol=1e-5, atol=1e-5)
    assert model.config.cross_attention_dim == 12 and model.config.in_channels == 4


@torch.no_grad()
def test_stock_stable_diffusion_pipeline_generates_with_experts_and_reloads(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusers_curriculum.tiny_sd import UNET_CONFIG, tiny_stable_diffusion

    unet = TimestepRoutedExperts.from_model(UNet2DConditionModel(**UNET_CONFIG), [0, 500, 1000])
    pipe = tiny_stable_diffusion(tmp_path, unet=unet)
    kwargs = dict(num_inference_steps=3, height=16, width=16, output_type="np")
    images = pipe("a photo of a sneaker", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert images.shape == (1, 16, 16, 3)
    save_pipeline(pipe, tmp_path / "sd")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "sd", trust_remote_code=True)
    assert type(reloaded) is StableDiffusionPipeline
    assert is_routed_experts(reloaded.unet) and len(reloaded.unet.experts) == 2
    again = reloaded("a photo of a sneaker", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(again - images).max() < 1e-4


def test_bad_groups_are_errors():
    with pytest.raises(ValueError, match="start at 0"):
        check_boundaries([10, 50, 100])
    with pytest.raises(ValueError, match="increase strictly"):
        check_boundaries([0, 60, 50, 100])
    with pytest.raises(ValueError, match="increase strictly"):
        check_boundaries([0, 50, 50, 100])
    with pytest.raises(ValueError, match="3 groups .* but 2 experts"):
        experts(boundaries=(0, 10, 20, 30)).__class__(boundaries=[0, 10, 20, 30], experts=[UNet2DModel.from_config(tiny_unet_config(8, 1, (8, 16)))] * 2)


def test_from_model_copies_the_base_per_group():
    base = UNet2DModel.from_config(tiny_unet_config(8, 1, (8, 16)))
    model = TimestepRoutedExperts.from_model(base, [0, 40, 100])
    assert len(model.experts) == 2 and model.experts[0] is not base
    for a, b in zip(model.experts[0].parameters(), base.parameters()):
        assert torch.equal(a, b)
