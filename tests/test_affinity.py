import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_curriculum.affinity import gradient_affinity, group_timesteps, main
from diffusers_curriculum.affinity import load_affinity
from diffusers_curriculum.clustering import partition
from diffusers_curriculum.models import tiny_unet_config


def test_group_timesteps_stay_in_their_group():
    t = group_timesteps(95, 10, 200, torch.Generator().manual_seed(0))
    assert t.shape == (10, 200)
    for g in range(10):
        assert int(t[g].min()) >= 10 * g and int(t[g].max()) < min(10 * (g + 1), 95)
    assert int(t[-1].max()) == 94


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pipe")
    unet = UNet2DModel.from_config(tiny_unet_config(16, 1, (8, 16)))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    return path


def test_affinity_is_a_cosine_matrix(tiny_pipeline):
    pipe = DDPMPipeline.from_pretrained(tiny_pipeline)
    batches = [torch.randn(4, 1, 16, 16) for _ in range(2)]
    A = gradient_affinity(pipe.unet, pipe.scheduler, batches, group_size=25)
    assert A.shape == (4, 4)
    np.testing.assert_allclose(np.diag(A), 1.0, atol=1e-9)
    np.testing.assert_allclose(A, A.T, atol=1e-12)
    assert np.all(np.abs(A) <= 1 + 1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_affinity_matches_per_group_gradients_computed_directly(prediction_type):
    """One batch, by hand: each group's timesteps, the loss against the scheduler's target, the gradient, the
    cosine matrix. A v-prediction model is scored against v (an ε target gives another matrix)."""
    torch.manual_seed(0)
    unet = UNet2DModel.from_config(tiny_unet_config(8, 1, (8, 16)))
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    clean = torch.randn(3, 1, 8, 8)
    A = gradient_affinity(unet, scheduler, [clean], group_size=25, seed=7)

    generator = torch.Generator().manual_seed(7)  # the draws gradient_affinity makes, in its order
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = group_timesteps(100, 25, 3, generator)
    assert len({int(t) for t in timesteps[:, 0]}) > 1  # the groups really sit at different noise levels

    def cosine_matrix(target_of):
        grads = []
        for t in timesteps:
            loss = ((unet(scheduler.add_noise(clean, noise, t), t).sample - target_of(t)) ** 2).mean()
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(unet.parameters()))]))
        g = torch.nn.functional.normalize(torch.stack(grads).double(), dim=1)
        return (g @ g.T).numpy()

    expected = cosine_matrix(lambda t: scheduler.get_velocity(clean, noise, t) if prediction_type == "v_prediction" else noise)
    np.testing.assert_allclose(A, expected, atol=1e-6)
    if prediction_type == "v_prediction":
        assert not np.allclose(A, cosine_matrix(lambda t: noise), atol=1e-3)


def test_cli_writes_matrix_and_heatmap_that_feed_ant(tiny_pipeline, tmp_path):
    out = tmp_path / "affinity"
    main(["--pretrained_model_name_or_path", str(tiny_pipeline), "--output_dir", str(out), "--group_size", "20",
          "--num_batches", "2", "--batch_size", "4"])
    assert (out / "affinity.png").stat().st_size > 1000
    A, group_size = load_affinity(str(out / "affinity.npz"))
    assert A.shape == (5, 5) and group_size == 20
    boundaries = partition("affinity", 2, 100, affinity=A, group_size=group_size)
    assert boundaries[0] == 0 and boundaries[-1] == 100 and len(boundaries) == 3


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--pretrained_model_name_or_path", str(tmp_path / "nothing")])
    assert e.value.code == 2
