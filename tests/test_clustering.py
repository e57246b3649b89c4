import itertools

import numpy as np
import pytest
from diffusers import DDPMScheduler

from diffusers_curriculum.clustering import (
    absolute_deviation_costs, affinity_costs, boundaries_to_clusters, cluster_intervals, cluster_intervals_naive,
    interval_costs,
)


def direct_cost(kind, values_or_affinity, a, b):
    """An interval's cost straight from its definition: try every centre."""
    if kind == "affinity":
        A = values_or_affinity
        return -max(sum(A[c, t] for t in range(a, b)) for c in range(a, b))
    v = values_or_affinity
    return min(sum(abs(v[t] - v[c]) for t in range(a, b)) for c in range(a, b))


def brute_force(cost_matrix, T, k):
    best = (np.inf, None)
    for cut in itertools.combinations(range(1, T), k - 1):
        bounds = [0, *cut, T]
        total = sum(cost_matrix[bounds[i], bounds[i + 1]] for i in range(k))
        best = min(best, (total, bounds), key=lambda x: x[0])
    return best


def inputs(kind, T, rng):
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    a = scheduler.alphas_cumprod.double().numpy()
    if kind == "timestep":
        return np.arange(T, dtype=float), dict()
    if kind == "snr":
        return a / (1 - a), dict(alphas_cumprod=a)
    if kind == "log_snr":
        return np.log(a / (1 - a)), dict(alphas_cumprod=a)
    M = rng.normal(size=(T, T))
    A = (M + M.T) / 2
    return A, dict(affinity=A)


@pytest.mark.parametrize("kind", ["timestep", "snr", "log_snr", "affinity"])
@pytest.mark.parametrize("T", [12, 17])
def test_cost_matrix_matches_definition_and_dp_matches_brute_force(kind, T):
    rng = np.random.default_rng(T)
    raw, kwargs = inputs(kind, T, rng)
    costs = interval_costs(kind, T, **kwargs)
    for a in range(T):
        for b in range(a + 1, T + 1):
            assert costs[a, b] == pytest.approx(direct_cost(kind, raw, a, b), rel=1e-9, abs=1e-9)
    for k in range(1, T + 1):
        boundaries, total = cluster_intervals(costs, k)
        expected_total, _ = brute_force(costs, T, k)
        assert total == pytest.approx(expected_total, rel=1e-9, abs=1e-9)
        assert boundaries[0] == 0 and boundaries[-1] == T and len(boundaries) == k + 1
        assert all(isinstance(x, int) for x in boundaries)
        assert all(lo < hi for lo, hi in boundaries_to_clusters(boundaries))  # no empty cluster
        assert sum(costs[lo, hi] for lo, hi in boundaries_to_clusters(boundaries)) == pytest.approx(total)


def test_dp_on_40_timesteps_matches_naive_recurrence():
    scheduler = DDPMScheduler(num_train_timesteps=40)
    costs = interval_costs("log_snr", 40, alphas_cumprod=scheduler.alphas_cumprod)
    for k in (1, 2, 5, 8, 40):
        fast = cluster_intervals(costs, k)
        slow = cluster_intervals_naive(lambda a, b: costs[a, b], 40, k)
        assert fast[1] == pytest.approx(slow[1])


def test_edge_cases_k_equals_one_and_t():
    costs = interval_costs("timestep", 10)
    assert cluster_intervals(costs, 1) == ([0, 10], 25.0)
    assert cluster_intervals(costs, 10) == (list(range(11)), 0.0)  # zero-cost intervals are valid, not inf


def test_timestep_cost_gives_near_uniform_intervals():
    boundaries, _ = cluster_intervals(interval_costs("timestep", 1000), 5)
    sizes = np.diff(boundaries)
    assert sizes.sum() == 1000 and np.all(np.abs(sizes - 200) <= 1)  # ties between equal-cost splits


def test_bad_inputs_raise_clear_errors():
    costs = interval_costs("timestep", 10)
    with pytest.raises(ValueError, match="k must be in \\[1, T=10\\]"):
        cluster_intervals(costs, 11)
    with pytest.raises(ValueError, match="k must be"):
        cluster_intervals(costs, 0)
    bad = costs.copy()
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cluster_intervals(bad, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        absolute_deviation_costs(np.array([0.0, np.nan, 2.0]))
    with pytest.raises(ValueError, match="NaN or inf"):
        affinity_costs(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="monotone"):
        absolute_deviation_costs(np.array([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="unknown cost"):
        interval_costs("entropy", 10)
