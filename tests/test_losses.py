"""The one denoising loss: the scheduler's target and the per-sample MSE."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_curriculum.losses import denoising_loss, prediction_target


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_target_follows_the_prediction_type(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    clean, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 50, 99])
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {"epsilon": noise, "sample": clean,
                "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * clean}[prediction_type]
    torch.testing.assert_close(prediction_target(scheduler, clean, noise, t), expected)


def test_denoising_loss_is_the_per_sample_mse_in_float32():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    clean, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 70])
    output = (noise + 0.5).to(torch.bfloat16)
    loss = denoising_loss(output, scheduler, clean, noise, t)
    assert loss.shape == (2,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ((output.float() - noise) ** 2).mean(dim=(1, 2, 3)))


def test_unknown_prediction_type_is_an_error():
    scheduler = DDPMScheduler(num_train_timesteps=10)
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        prediction_target(scheduler, torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))
