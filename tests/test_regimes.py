import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_curriculum.errors import UsageError
from diffusers_curriculum.regimes import Regime, build_regime
from diffusers_curriculum.regimes.experts import ExpertLayout
from diffusers_curriculum.regimes.weighting import Weighting
from diffusers_curriculum.sampling import LogitNormalSampler, UniformSampler

from conftest import regime_args



def test_build_regime_gives_uniform_with_min_snr():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    regime = build_regime(regime_args("--snr_gamma", "5"), scheduler)
    assert regime.weighting.name == "min_snr" and isinstance(regime.sampler, UniformSampler)
    assert regime.describe() == {"name": "uniform", "noise_process": "ddpm", "timestep_sampling": "uniform", "timestep_sampler": "UniformSampler",
                                 "weighting": "min_snr", "snr_gamma": 5.0, "balancer": "none"}
    logit = build_regime(regime_args("--timestep_sampling", "logit_normal", "--logit_std", "0.5"), scheduler)
    assert isinstance(logit.sampler, LogitNormalSampler) and logit.sampler.std == 0.5


def test_min_snr_without_gamma_uses_diffusers_recommended_five():
    regime = build_regime(regime_args("--weighting", "min_snr"), DDPMScheduler(num_train_timesteps=100))
    assert regime.weighting.name == "min_snr" and regime.describe()["snr_gamma"] == 5.0


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--regime", "warp"], "--regime"),
        (["--weighting", "min_snr", "--snr_gamma", "0"], "--snr_gamma"),
        (["--snr_gamma", "5", "--weighting", "p2"], "--snr_gamma"),
        (["--snr_gamma", "-1"], "--snr_gamma"),
        (["--logit_std", "0"], "--logit_std"),
        (["--p2_k", "0"], "--p2_k"),
    ],
)
def test_bad_regime_flags_name_the_flag(argv, flag):
    with pytest.raises(UsageError, match=flag):
        regime_args(*argv)


def test_compute_loss_applies_weights():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    regime = Regime(scheduler, UniformSampler(1000), Weighting("min_snr", snr_gamma=5.0))
    losses, t = torch.tensor([1.0, 2.0]), torch.tensor([0, 999])
    a = scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    expected = (losses * torch.clamp(snr, max=5.0) / snr).mean()
    assert torch.allclose(regime.compute_loss(losses, t), expected)
    assert torch.allclose(Regime(scheduler, UniformSampler(1000)).compute_loss(losses, t), torch.tensor(1.5))


def test_ranks_draw_disjoint_slices_of_one_global_batch():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    clean = torch.zeros(4, 1, 8, 8)
    single = Regime(scheduler, UniformSampler(1000, seed=1), seed=2)
    global_noise, global_t = single.sample(torch.zeros(8, 1, 8, 8))
    for rank in range(2):
        regime = Regime(scheduler, UniformSampler(1000, seed=1), seed=2, process_index=rank, num_processes=2)
        noise, t = regime.sample(clean)
        assert torch.equal(t, global_t[rank::2])
        assert torch.equal(noise, global_noise[rank::2])


def test_state_dict_restores_timestep_and_noise_draws():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    clean = torch.zeros(4, 1, 8, 8)
    a = Regime(scheduler, UniformSampler(1000, seed=1), seed=2)
    a.sample(clean)
    state = a.state_dict()
    expected = a.sample(clean)
    b = Regime(scheduler, UniformSampler(1000, seed=7), seed=8)
    b.load_state_dict(state)
    got = b.sample(clean)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_noise_and_timesteps_come_from_different_streams_under_one_seed():
    regime = Regime(DDPMScheduler(num_train_timesteps=1000), UniformSampler(1000, seed=7), seed=7)
    assert not torch.equal(regime.noise_generator.get_state(), regime.sampler.generator.get_state())


def test_loss_aware_sampling_weights_each_loss_by_its_importance_and_tdc_stage_two_does_not():
    from diffusers_curriculum.sampling import LossAwareSampler

    scheduler = DDPMScheduler(num_train_timesteps=10)
    sampler = LossAwareSampler(10, history=1, uniform_prob=0.0, seed=0)
    sampler.observe(torch.arange(10), torch.arange(1.0, 11.0))
    regime = Regime(scheduler, sampler)
    t = torch.tensor([0, 9])
    losses = torch.tensor([2.0, 2.0])
    expected = losses * sampler.importance_weights(t)
    assert regime.compute_loss(losses, t).item() == pytest.approx(expected.mean().item())
    assert sampler.importance_weights(t)[0] > sampler.importance_weights(t)[1]

    tdc = Regime(scheduler, sampler, experts=ExpertLayout(10, [0, 5, 10], base_steps=1), boundaries=[0, 5, 10])
    assert tdc.compute_loss(losses, t).item() == pytest.approx(expected.mean().item())  # stage 1: the loss-aware sampler
    tdc.experts.stage = 2  # stage 2 draws stratified over the groups: no importance weights
    assert tdc.active_sampler is tdc.experts.group_sampler and tdc.compute_loss(losses, t).item() == pytest.approx(2.0)


def test_learned_weighting_applies_u_of_each_samples_log_snr():
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=100)
    regime = build_regime(regime_args("--weighting", "learned", "--learned_weighting_lr", "0.1"), scheduler)
    assert regime.describe()["weighting"] == "learned" and regime.describe()["learned_weighting_lr"] == 0.1
    learned = regime.weighting.learned
    with torch.no_grad():
        learned.linear.bias.fill_(0.5)
    losses, t = torch.tensor([1.0, 2.0]), torch.tensor([3, 80])
    u = learned(compute_snr(scheduler, t).log())
    torch.testing.assert_close(regime.compute_loss(losses, t), (losses * torch.exp(-u) + u).mean())


LEARNED_FLAGS = {
    "uniform": [],
    "ant-uw": ["--regime", "ant", "--ant_clusters", "2"],
    "curriculum": ["--regime", "curriculum", "--curriculum_clusters", "2", "--curriculum_pacing", "fixed",
                   "--curriculum_steps_per_stage", "2"],
    "tdc": ["--regime", "tdc", "--tdc_groups", "2", "--tdc_base_steps", "2"],
}


@pytest.mark.parametrize("regime", sorted(LEARNED_FLAGS))
def test_learned_weighting_trains_with_every_regime_and_resumes_exactly(train_unconditional, tmp_path, tiny_flags, regime):
    import shutil

    from diffusers_curriculum import read_training_regime

    flags = [*tiny_flags, "--max_train_steps", "6", "--checkpointing_steps", "3", "--max_train_samples", "64",
             "--no_validation", "--weighting", "learned", *LEARNED_FLAGS[regime]]
    straight = train_unconditional.main(train_unconditional.parse_args(["--output_dir", str(tmp_path / "a"), *flags]))
    state = straight["regime_state"]["weighting"]
    assert state["module"]["linear.weight"].abs().sum() > 0  # u moved off its zero start
    assert read_training_regime(tmp_path / "a")["weighting"] == "learned"
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    resumed = train_unconditional.main(train_unconditional.parse_args(
        ["--output_dir", str(tmp_path / "b"), *flags, "--resume_from_checkpoint", "latest"]))
    assert resumed["losses"] == pytest.approx(straight["losses"][3:], rel=1e-5)
    torch.testing.assert_close(resumed["regime_state"]["weighting"]["module"], state["module"])


def test_resuming_across_a_change_of_learned_weighting_is_an_error(train_unconditional, tmp_path, tiny_flags):
    flags = [*tiny_flags, "--max_train_steps", "4", "--checkpointing_steps", "2", "--max_train_samples", "64", "--no_validation"]
    train_unconditional.main(train_unconditional.parse_args(["--output_dir", str(tmp_path / "a"), *flags, "--max_train_steps", "2"]))
    args = train_unconditional.parse_args(["--output_dir", str(tmp_path / "a"), *flags, "--weighting", "learned",
                                           "--resume_from_checkpoint", "latest"])
    with pytest.raises(UsageError, match="the checkpoint's weighting is {'weighting': 'none'}, this run's is {'weighting': 'learned'"):
        train_unconditional.main(args)
