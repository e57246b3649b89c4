import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_curriculum.difficulty import (
    main, posterior_terms, predicted_x0, relative_entropy, steps_to_converge,
)


def oracle(scheduler, x0, kind="epsilon"):
    """A denoiser that knows x0: it returns the true ε (or v) for every x_t."""

    def denoise(x_t, t):
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return denoise


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_true_noise_predictor_has_zero_relative_entropy(kind):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    kl = relative_entropy(oracle(scheduler, x0, kind), scheduler, x0, [1, 10, 500, 999])
    assert np.all(np.abs(kl) < 1e-6)


def test_zero_noise_predictor_matches_closed_form():
    """ε_θ ≡ 0: x0 − x̂0 = −√((1−ᾱ)/ᾱ) ε, so E[KL] = c0² · d · (1−ᾱ)/ᾱ / (2 β̃_t)."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0 = torch.zeros(4000, 1, 4, 4)
    timesteps = [5, 100, 700]
    kl = relative_entropy(lambda x_t, t: torch.zeros_like(x_t), scheduler, x0, timesteps, batch_size=4000)
    t = torch.tensor(timesteps)
    c0, var = posterior_terms(scheduler, t)
    a = scheduler.alphas_cumprod.double()[t]
    expected = (c0**2 * 16 * (1 - a) / a / (2 * var)).numpy()
    np.testing.assert_allclose(kl, expected, rtol=0.03)


def test_predicted_x0_inverts_add_noise():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 50, 99])
    x_t = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(predicted_x0(scheduler, noise, x_t, t), x0, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="t >= 1"):
        posterior_terms(scheduler, torch.tensor([0]))


def test_steps_to_converge():
    steps = np.array([10, 20, 30, 40])
    curves = np.array([[4.0, 1.0], [2.0, 1.05], [1.05, 1.5], [1.0, 1.0]])
    np.testing.assert_array_equal(steps_to_converge(steps, curves, 0.1), [30, 40])


def test_cli_writes_arrays_and_both_plots(tmp_path, capsys):
    out = tmp_path / "study"
    main(["--output_dir", str(out), "--max_train_steps", "20", "--eval_every", "5", "--train_batch_size", "8",
          "--block_out_channels", "8,16", "--num_buckets", "4", "--eval_samples", "32", "--kl_timesteps", "6",
          "--kl_samples", "16", "--ddpm_num_steps", "100"])
    assert (out / "convergence.png").stat().st_size > 1000 and (out / "relative_entropy.png").stat().st_size > 1000
    arrays = np.load(out / "difficulty.npz")
    assert arrays["bucket_losses"].shape == (4, 4) and arrays["relative_entropy"].shape == (6,)
    summary = json.loads((out / "difficulty.json").read_text())
    assert summary["buckets"] == [[0, 25], [25, 50], [50, 75], [75, 100]]
    assert "t in [   0,   25)" in capsys.readouterr().out


def test_the_study_runs_under_flow_matching_with_convergence_only(tmp_path):
    out = tmp_path / "study"
    main(["--output_dir", str(out), "--noise_process", "flow", "--max_train_steps", "4", "--eval_every", "2", "--train_batch_size", "4",
          "--block_out_channels", "8,16", "--num_buckets", "2", "--eval_samples", "8", "--ddpm_num_steps", "100"])
    summary = json.loads((out / "difficulty.json").read_text())
    assert summary["noise_process"] == "flow" and summary["relative_entropy_nats"] == []
    assert np.load(out / "difficulty.npz")["bucket_losses"].shape == (2, 2) and not (out / "relative_entropy.png").exists()
    with pytest.raises(SystemExit):
        main(["--flow_shift", "3"])  # a shift without the flow


def test_cli_bad_flags():
    with pytest.raises(SystemExit) as e:
        main(["--num_buckets", "0"])
    assert e.value.code == 2
