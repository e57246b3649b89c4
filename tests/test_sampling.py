import pytest
import torch

from diffusers_curriculum.sampling import GroupCycleSampler, IntervalSampler, LogitNormalSampler, UniformSampler


@pytest.mark.parametrize("cls", [UniformSampler, LogitNormalSampler])
def test_samplers_draw_long_timesteps_inside_range(cls):
    t = cls(50, seed=1).sample(10_000)
    assert t.dtype == torch.long and t.shape == (10_000,)
    assert int(t.min()) >= 0 and int(t.max()) <= 49


def test_uniform_sampler_covers_every_timestep_evenly():
    counts = torch.bincount(UniformSampler(10, seed=0).sample(100_000), minlength=10).float()
    assert torch.allclose(counts / counts.sum(), torch.full((10,), 0.1), atol=0.01)


def test_logit_normal_sampler_concentrates_on_middle_timesteps():
    t = LogitNormalSampler(1000, mean=0.0, std=1.0, seed=0).sample(50_000).float()
    middle = ((t >= 250) & (t < 750)).float().mean()
    assert middle > 0.6  # P(|u| < logit(0.75)=1.0986) ≈ 0.73 for u ~ N(0, 1)
    assert abs(t.mean().item() - 500) < 10


def test_logit_normal_mean_shifts_draws():
    high = LogitNormalSampler(1000, mean=1.0, seed=0).sample(20_000).float().mean()
    assert high > 650


def test_interval_sampler_stays_inside_interval_and_rejects_empty():
    sampler = IntervalSampler(100, 20, 30, seed=0)
    t = sampler.sample(5000)
    assert set(t.tolist()) == set(range(20, 30))
    with pytest.raises(ValueError, match="interval"):
        sampler.set_interval(30, 30)
    with pytest.raises(ValueError, match="interval"):
        sampler.set_interval(0, 101)


@pytest.mark.parametrize("cls", [UniformSampler, LogitNormalSampler])
def test_state_dict_round_trip_reproduces_draws(cls):
    a = cls(1000, seed=3)
    a.sample(7)
    state = a.state_dict()
    expected = a.sample(16)
    b = cls(1000, seed=99)
    b.load_state_dict(state)
    assert torch.equal(b.sample(16), expected)


def test_explicit_generator_overrides_own_generator():
    sampler = UniformSampler(1000, seed=0)
    before = sampler.state_dict()["generator"].clone()
    draws = sampler.sample(8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(draws, UniformSampler(1000).sample(8, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(sampler.state_dict()["generator"], before)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        UniformSampler(0)
    with pytest.raises(ValueError, match="std"):
        LogitNormalSampler(10, std=0.0)


def test_speed_and_timestep_bias_weights():
    from diffusers_curriculum.sampling import WeightedSampler, speed_weights, timestep_bias_weights

    w = speed_weights(1000, tau=0.7, suppression=0.25)
    assert w[699] == 1 and w[700] == 0.25
    draws = WeightedSampler(1000, w, seed=0).sample(40000)
    share = (draws >= 700).float().mean().item()
    assert share == pytest.approx(0.3 * 0.25 / (0.7 + 0.3 * 0.25), abs=0.01)
    later = timestep_bias_weights(1000, "later", 3.0, 0.1)
    assert later[899] == 1 and later[900] == 3 and timestep_bias_weights(1000, "range", 2.0, begin=10, end=20)[15] == 2
    with pytest.raises(ValueError, match="timestep bias range"):
        timestep_bias_weights(1000, "range", 2.0, begin=50, end=20)


def test_loss_aware_sampler_is_uniform_until_warm_then_follows_loss():
    from diffusers_curriculum.sampling import LossAwareSampler

    sampler = LossAwareSampler(10, history=2, uniform_prob=0.0, seed=0)
    assert torch.allclose(sampler.weights(), torch.full((10,), 0.1, dtype=torch.float64))
    t = torch.arange(10).repeat(2)
    sampler.observe(t, torch.where(t < 5, 3.0, 1.0))
    weights = sampler.weights()
    assert weights[0] == pytest.approx(3 * weights[9]) and weights.sum() == pytest.approx(1.0)
    restored = LossAwareSampler(10, history=2, uniform_prob=0.0, seed=5)
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.sample(20), sampler.sample(20))


def test_loss_aware_importance_weights_keep_the_uniform_objective():
    from diffusers_curriculum.sampling import LossAwareSampler

    sampler = LossAwareSampler(10, history=1, uniform_prob=0.01, seed=0)
    assert torch.equal(sampler.importance_weights(torch.arange(10)), torch.ones(10))  # uniform while warming up
    losses = torch.linspace(4.0, 0.1, 10)
    sampler.observe(torch.arange(10), losses)
    p = sampler.weights()
    w = sampler.importance_weights(torch.arange(10)).double()
    assert torch.allclose(w, 1 / (10 * p))
    # E_{t~p}[w(t) L(t)] equals the uniform mean of L: the reweighted loss is unbiased for the uniform objective
    assert float((p * w * losses.double()).sum()) == pytest.approx(float(losses.mean()), rel=1e-6)
    assert w[0] < 1 < w[9]  # high-loss timesteps are drawn more often and weighted down


def test_group_cycle_sampler_draws_one_cluster_at_a_time_and_resumes_its_turn():
    sampler = GroupCycleSampler(100, [0, 10, 60, 100], seed=0)
    seen = []
    for _ in range(4):
        t = sampler.sample(2_000)
        seen.append((int(t.min()), int(t.max())))
        sampler.next_cluster()
    assert seen == [(0, 9), (10, 59), (60, 99), (0, 9)]  # the whole interval, nothing outside it, then around again
    state = sampler.state_dict()
    assert state["current"] == 1
    resumed = GroupCycleSampler(100, [0, 10, 60, 100], seed=5)
    resumed.load_state_dict(state)
    assert resumed.current == 1 and torch.equal(resumed.sample(8), sampler.sample(8))
