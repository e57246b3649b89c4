import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_curriculum import RegimeDDIMScheduler, RegimeDDPMScheduler

REGIME = {"name": "uniform", "weighting": "min_snr", "snr_gamma": 5.0, "clusters": [[0, 50], [50, 100]]}


def test_scheduler_config_round_trip_carries_regime(tmp_path):
    scheduler = RegimeDDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", training_regime=REGIME)
    scheduler.save_pretrained(tmp_path)
    loaded = RegimeDDPMScheduler.from_pretrained(tmp_path)
    assert loaded.training_regime == REGIME
    assert loaded.config.num_train_timesteps == 100 and loaded.config.beta_schedule == "squaredcos_cap_v2"
    assert torch.allclose(loaded.alphas_cumprod, scheduler.alphas_cumprod)


def test_regime_scheduler_behaves_like_its_base():
    ours, stock = RegimeDDIMScheduler(num_train_timesteps=100), DDIMScheduler(num_train_timesteps=100)
    ours.set_timesteps(10), stock.set_timesteps(10)
    assert torch.equal(ours.timesteps, stock.timesteps)
    sample, eps = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    assert torch.equal(ours.step(eps, 50, sample).prev_sample, stock.step(eps, 50, sample).prev_sample)
    assert isinstance(ours, DDIMScheduler) and isinstance(RegimeDDPMScheduler(), DDPMScheduler)


def test_stock_scheduler_reads_our_config(tmp_path):
    RegimeDDPMScheduler(num_train_timesteps=77, training_regime=REGIME).save_pretrained(tmp_path)
    assert DDPMScheduler.from_pretrained(tmp_path).config.num_train_timesteps == 77


def test_with_training_regime_and_cross_class_conversion_keep_the_record():
    scheduler = RegimeDDPMScheduler(num_train_timesteps=100).with_training_regime(REGIME)
    assert scheduler.training_regime == REGIME
    assert RegimeDDIMScheduler.from_config(scheduler.config).training_regime == REGIME


def test_pipeline_from_pretrained_restores_regime_scheduler(tmp_path):
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=RegimeDDPMScheduler(num_train_timesteps=10, training_regime=REGIME)).save_pretrained(tmp_path)
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    assert type(pipe.scheduler).__name__ == "RegimeDDPMScheduler"
    assert pipe.scheduler.training_regime == REGIME
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
