import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_curriculum.weighting import loss_weights, min_snr_weights, p2_weights


def snr_of(scheduler, t):
    a = scheduler.alphas_cumprod[t]
    return a / (1 - a)


def test_min_snr_epsilon_is_min_snr_gamma_over_snr():
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    expected = torch.tensor([1.0, 1.0, 1.0, 0.05])
    assert torch.allclose(min_snr_weights(snr, 5.0, "epsilon"), expected)


def test_min_snr_v_prediction_and_sample_targets():
    snr = torch.tensor([1.0, 10.0])
    assert torch.allclose(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5, 5.0 / 11.0]))
    assert torch.allclose(min_snr_weights(snr, 5.0, "sample"), torch.tensor([1.0, 5.0]))
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(snr, 5.0, "flow")


def test_p2_weights_match_formula():
    snr = torch.tensor([0.0, 1.0, 3.0])
    assert torch.allclose(p2_weights(snr, gamma=1.0, k=1.0), torch.tensor([1.0, 0.5, 0.25]))
    assert torch.allclose(p2_weights(snr, gamma=0.5, k=1.0), torch.tensor([1.0, 2 ** -0.5, 0.5]))


def test_loss_weights_uses_the_schedulers_snr():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 10, 500, 999])
    snr = snr_of(scheduler, t).float()
    assert loss_weights(scheduler, t, "none") is None
    assert torch.allclose(loss_weights(scheduler, t, "min_snr", snr_gamma=5.0), torch.clamp(snr, max=5.0) / snr)
    assert torch.allclose(loss_weights(scheduler, t, "p2"), 1.0 / (1.0 + snr))
    with pytest.raises(ValueError, match="weighting"):
        loss_weights(scheduler, t, "huber")


def test_min_snr_down_weights_low_noise_timesteps_only():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    w = loss_weights(scheduler, torch.arange(1000), "min_snr", snr_gamma=5.0)
    assert w[0] < 0.01 and torch.all(w[-500:] == 1.0)
    assert torch.all(w[1:] >= w[:-1])
