"""Exact interval clustering of noise levels by dynamic programming (ANT, Go et al., NeurIPS 2023).

The DP runs on the noise process's grid of T levels (:mod:`diffusers_curriculum.noise`): DDPM's timesteps, or the
cells [i, i + 1) of a continuous coordinate (rectified flow), whose SNR is taken at the cell's centre. [0, T) is split into k contiguous clusters [b_0=0, b_1), [b_1, b_2), …, [b_{k-1}, b_k=T) minimising the
sum of interval costs. ``cost[a, b]`` is the cost of the interval [a, b) (``inf`` where a ≥ b); every cost
matrix is computed for all O(T²) intervals at once, and the DP

    D[j, i] = min_{l < i} D[j-1, l] + cost[l, i]

runs vectorised in O(k·T²). Costs (each with the interval centre c that minimises it):

* timestep:  Σ_{t∈I} |t − c|
* snr:       Σ_{t∈I} |SNR(t) − SNR(c)|      (raw SNR spans orders of magnitude: prefer log_snr)
* log_snr:   Σ_{t∈I} |log SNR(t) − log SNR(c)|
* affinity:  −max_c Σ_{t∈I} TAS(c, t)       (TAS: a task-affinity matrix, see ``affinity.py``)
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

# Checking and bucketing boundaries live in the experts' self-contained module (saved pipelines carry it).
from .portable.timestep_routed_experts import bucketize, check_boundaries  # noqa: F401

COSTS = ("timestep", "snr", "log_snr", "affinity")
PARTITIONS = ("equal",) + COSTS


def absolute_deviation_costs(values: np.ndarray) -> np.ndarray:
    """cost[a, b] = min_c Σ_{t∈[a,b)} |v_t − v_c| for a monotone sequence ``values`` (length T).

    For a monotone sequence the minimising centre is the interval's median element, and both sums
    around it come from prefix sums. Returns a (T+1, T+1) matrix, ``inf`` where a ≥ b.
    """
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("cost values must be finite (got NaN or inf)")
    diffs = np.diff(v)
    if np.all(diffs <= 0):
        v = -v
    elif not np.all(diffs >= 0):
        raise ValueError("absolute-deviation costs need monotone values (timestep, SNR, log-SNR)")
    T = len(v)
    prefix = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(T + 1, dtype=np.int32)
    s = idx[:, None] + idx[None, :] - 1  # a + b − 1
    m = np.maximum(s >> 1, 0)  # median index ⌊(a + b − 1)/2⌋ (clamped where the interval is empty)
    # Σ_{t>m} (v_t − v_m) + Σ_{t<m} (v_m − v_t) = P[b] + P[a] − P[m] − P[m+1] − v_m·((b − m − 1) − (m − a)),
    # where (b − m − 1) − (m − a) = (a + b − 1) mod 2 and P[m+1] = P[m] + v_m.
    cost = prefix[None, :] + prefix[:, None] - 2 * prefix[m] - v[m] * (1 + (s & 1))
    cost[idx[None, :] <= idx[:, None]] = np.inf
    return cost


def affinity_costs(affinity: np.ndarray) -> np.ndarray:
    """cost[a, b] = −max_{c∈[a,b)} Σ_{t∈[a,b)} A[c, t] for an (n, n) affinity matrix; O(n³) vectorised over
    intervals, one pass per centre c."""
    A = np.asarray(affinity, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"the affinity matrix must be square, got shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise ValueError("the affinity matrix holds NaN or inf")
    n = A.shape[0]
    row_prefix = np.concatenate([np.zeros((n, 1)), np.cumsum(A, axis=1)], axis=1)  # (n, n+1)
    a = np.arange(n + 1)[:, None]
    b = np.arange(n + 1)[None, :]
    best = np.full((n + 1, n + 1), -np.inf)
    for c in range(n):
        contains_c = (a <= c) & (c < b)
        score = row_prefix[c][b] - row_prefix[c][a]
        best = np.where(contains_c, np.maximum(best, score), best)
    return np.where(b > a, -best, np.inf)


def interval_costs(cost: str, num_train_timesteps: int, alphas_cumprod=None, affinity=None, snr=None) -> np.ndarray:
    """The (T+1, T+1) interval-cost matrix for ``cost`` (see the module docstring).

    snr/log_snr need each level's SNR: ``snr`` (length T, e.g. a noise process's ``level_snr()``) or DDPM's
    ``alphas_cumprod`` (SNR = ᾱ / (1 − ᾱ)); affinity needs ``affinity`` (T, T).
    """
    if cost == "timestep":
        return absolute_deviation_costs(np.arange(num_train_timesteps, dtype=np.float64))
    if cost in ("snr", "log_snr"):
        if snr is None and alphas_cumprod is None:
            raise ValueError(f"cost {cost!r} needs the levels' SNR (snr or alphas_cumprod)")
        if snr is None:
            a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).numpy()[:num_train_timesteps]
            snr = a / (1 - a)
        snr = np.asarray(snr, dtype=np.float64)[:num_train_timesteps]
        return absolute_deviation_costs(np.log(snr) if cost == "log_snr" else snr)
    if cost == "affinity":
        if affinity is None:
            raise ValueError("cost 'affinity' needs an affinity matrix")
        if np.shape(affinity)[0] != num_train_timesteps:
            raise ValueError(f"affinity matrix has {np.shape(affinity)[0]} rows, expected {num_train_timesteps}")
        return affinity_costs(affinity)
    raise ValueError(f"unknown cost {cost!r}; choose one of {COSTS}")


def cluster_intervals(costs: np.ndarray, k: int) -> Tuple[List[int], float]:
    """Optimal split of [0, T) into ``k`` non-empty contiguous clusters under ``costs`` (T+1, T+1).

    Returns the boundaries ``[0, b_1, …, b_{k-1}, T]`` (Python ints) and the total cost. O(k·T²).
    """
    costs = np.asarray(costs, dtype=np.float64)
    T = costs.shape[0] - 1
    if not 1 <= k <= T:
        raise ValueError(f"k must be in [1, T={T}], got {k}")
    if np.isnan(costs).any():
        raise ValueError("interval costs hold NaN")
    D = costs[0].copy()  # D[i]: best cost of [0, i) in j clusters; j = 1
    by_end = np.ascontiguousarray(costs.T)  # [i, l] = cost of [l, i): argmin runs along contiguous rows
    total = np.empty_like(by_end)
    rows = np.arange(T + 1)
    choices = []
    for _ in range(2, k + 1):
        np.add(by_end, D[None, :], out=total)  # [i, l]: clusters of [0, l) then [l, i)
        best_l = np.argmin(total, axis=1)
        D = total[rows, best_l]
        choices.append(best_l)
    boundaries = [T]
    for best_l in reversed(choices):
        boundaries.append(int(best_l[boundaries[-1]]))
    boundaries.append(0)
    return boundaries[::-1], float(D[T])


def cluster_intervals_naive(cost_fn, T: int, k: int) -> Tuple[List[int], float]:
    """The straightforward O(k·T³) recurrence (each interval's cost summed inside the loop), as in the
    public ANT code: the reference for the benchmark. ``cost_fn(a, b)`` is the cost of [a, b)."""
    inf = float("inf")
    D = [[inf] * (T + 1) for _ in range(k + 1)]
    arg = [[0] * (T + 1) for _ in range(k + 1)]
    D[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, T + 1):
            for l in range(j - 1, i):
                candidate = D[j - 1][l] + cost_fn(l, i)
                if candidate < D[j][i]:
                    D[j][i], arg[j][i] = candidate, l
    boundaries = [T]
    for j in range(k, 0, -1):
        boundaries.append(arg[j][boundaries[-1]])
    return boundaries[::-1], D[k][T]


def boundaries_to_clusters(boundaries: Sequence[int]) -> List[Tuple[int, int]]:
    """``[0, b_1, …, T]`` → ``[(0, b_1), (b_1, b_2), …]``."""
    return [(int(boundaries[i]), int(boundaries[i + 1])) for i in range(len(boundaries) - 1)]


def equal_boundaries(num_train_timesteps: int, k: int) -> List[int]:
    """[0, T) cut into ``k`` contiguous intervals whose sizes differ by at most one."""
    if not 1 <= k <= num_train_timesteps:
        raise ValueError(f"k must be in [1, {num_train_timesteps}], got {k}")
    return [round(i * num_train_timesteps / k) for i in range(k + 1)]


def partition(cost: str, k: int, num_train_timesteps: int, alphas_cumprod=None, affinity: Optional[np.ndarray] = None,
              group_size: int = 1, snr=None) -> List[int]:
    """The boundaries ``[0, b_1, …, T]`` of ``k`` clusters: equal intervals (``cost="equal"``) or the exact DP
    under ``cost``. An affinity matrix is over groups of ``group_size`` timesteps: the DP runs on the groups
    and the boundaries are scaled back to timesteps."""
    if cost == "equal":
        return equal_boundaries(num_train_timesteps, k)
    if cost == "affinity":
        boundaries, _ = cluster_intervals(interval_costs("affinity", affinity.shape[0], affinity=affinity), k)
        return [min(num_train_timesteps, b * group_size) for b in boundaries[:-1]] + [num_train_timesteps]
    return cluster_intervals(interval_costs(cost, num_train_timesteps, alphas_cumprod=alphas_cumprod, snr=snr), k)[0]
