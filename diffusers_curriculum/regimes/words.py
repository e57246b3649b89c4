"""A regime record (:meth:`Regime.describe`, ``training_regime.json``) in words, for model cards and logs.

Plain functions over the JSON record, so a card can be written (or rewritten) from a saved folder alone.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from ..weightings import PLUGINS

SAMPLING = {
    "uniform": "timesteps drawn uniformly",
    "logit_normal": "timesteps drawn from a logit-normal density (as SD3 trains)",
    "mode": "timesteps drawn from SD3's mode density",
    "speed": "SpeeD's asymmetric timestep sampling (the high-noise timesteps drawn less often)",
    "timestep_bias": "timesteps drawn with diffusers' SDXL timestep bias",
    "loss_aware": "IDDPM's loss-aware timestep resampling",
    "stratified": "every batch stratified over the clusters (an equal share of timesteps from each)",
    "curriculum": "a difficulty curriculum (Kim et al., arXiv 2403.10348): the easiest (noisiest) cluster first, one "
                  "harder cluster added per stage, then the full range",
    "two_phase": "Curriculum Sampling (arXiv 2603.12517): noise levels drawn logit-normal first, uniformly after a switch step",
}
COSTS = {"equal": "equal intervals", "timestep": "ANT's exact interval DP on the timestep",
         "snr": "ANT's exact interval DP on the SNR", "log_snr": "ANT's exact interval DP on the log-SNR",
         "affinity": "ANT's exact interval DP on measured task affinity"}


def weighting_words(record: Dict[str, Any]) -> str:
    name = record.get("weighting", "none")
    if name in PLUGINS:
        return PLUGINS[name].words(record)
    if name == "min_snr":
        return f"Min-SNR-γ loss weighting, γ = {record['snr_gamma']:g}"
    if name == "p2":
        return f"P2 loss weighting 1/(k + SNR)^γ, k = {record['p2_k']:g}, γ = {record['p2_gamma']:g}"
    if name == "learned":
        return f"EDM2's learned loss weighting u(λ) (its own Adam, learning rate {record['learned_weighting_lr']:g})"
    if name == "sigma_sqrt":
        return "SD3's sigma_sqrt loss weighting σ⁻²"
    if name == "cosmap":
        return "SD3's cosmap loss weighting 2 / (π (1 − 2σ + 2σ²))"
    return "the plain mean squared error (no loss weighting)"


def balancer_words(record: Dict[str, Any]) -> Optional[str]:
    name = record.get("balancer", "none")
    if name == "uw":
        return f"Uncertainty Weighting of the clusters' losses (ANT; learning rate {record['uw_lr']:g})"
    if name == "pcgrad":
        return "PCGrad over the clusters' gradients (ANT)"
    if name == "nash":
        return f"Nash-MTL over the clusters' gradients (ANT; solved every {record['nash_update_every']} steps)"
    return None


def intervals(clusters: Sequence[Sequence[int]]) -> str:
    return ", ".join(f"[{start}, {end})" for start, end in clusters)


def pacing_words(pacing: Dict[str, Any]) -> str:
    if pacing["policy"] == "FixedPacing":
        return f"fixed pacing: {pacing['steps_per_stage']} steps per stage"
    cap = f", or after {pacing['max_stage_steps']} steps" if pacing.get("max_stage_steps") else ""
    return (f"adaptive pacing: a stage ends when its smoothed loss has not improved for {pacing['patience']} checks "
            f"(one every {pacing['check_every']} steps){cap}")


def curriculum_progress(stage_history: Sequence[Dict[str, int]], num_stages: int, trained_steps: int) -> str:
    """How far a curriculum got in ``trained_steps``, in one sentence."""
    last = stage_history[-1]
    if last["stage"] >= num_stages:
        return (f"The curriculum reached stage {num_stages} of {num_stages} (the full range) at step {last['start_step']} "
                f"of {trained_steps}, and trained on every timestep for the remaining {trained_steps - last['start_step']} steps.")
    return (f"The curriculum reached stage {last['stage']} of {num_stages} (timesteps {last['t_min']} and above) by step "
            f"{trained_steps}: it never trained on the full range, so timesteps below {last['t_min']} were never drawn.")


def regime_in_words(record: Dict[str, Any], trained_steps: Optional[int] = None) -> List[str]:
    """One sentence per axis of ``record`` (and, for a curriculum, how far it got in ``trained_steps``)."""
    sampling = record.get("timestep_sampling", "uniform")
    lines = []
    if record.get("noise_process") == "flow":
        lines.append(f"Noise process: rectified flow (x_σ = (1 − σ) x₀ + σ ε, velocity target ε − x₀, shift "
                     f"{record.get('flow_shift', 1.0):g}); its noise levels t = 1000·σ play the timesteps' part below.")
    elif record.get("noise_process") == "ddpm":
        lines.append("Noise process: DDPM (discrete timesteps).")
    lines.append(f"Timesteps: {SAMPLING.get(sampling, sampling)}.")
    lines.append(f"Loss: {weighting_words(record)}.")
    if record.get("clusters"):
        clusters = record["clusters"]
        lines.append(f"Clusters: {len(clusters)} timestep intervals by {COSTS.get(record.get('cluster_cost'), record.get('cluster_cost'))}: "
                     f"{intervals(clusters)}.")
    balancer = balancer_words(record)
    if balancer:
        lines.append(f"Balancer: {balancer}.")
    if record.get("two_phase"):
        phase = record["two_phase"]
        switched = f"switched at step {phase['switched_at']}" if phase.get("switched_at") is not None else "had not switched yet"
        lines.append(f"Two phases: {phase['first']} until step {phase['switch_step']}, then {phase['then']} ({switched}).")
    if record.get("pacing"):
        lines.append(f"Curriculum pacing: {pacing_words(record['pacing'])}.")
        if trained_steps is not None and record.get("stage_history"):
            lines.append(curriculum_progress(record["stage_history"], len(record["clusters"]), trained_steps))
    if record.get("groups"):
        schedule = {"stratified": "every batch holds every group's timesteps, each routed to its expert",
                    "round_robin": "each step fine-tunes one expert on its group, the experts in turn"}
        lines.append(f"Experts (TDC, arXiv 2312.13307): one base model for {record['base_steps']} steps, then one copy per "
                     f"timestep group ({len(record['groups'])}), each fine-tuned on its group; "
                     f"{schedule.get(record.get('schedule'), record.get('schedule'))}.")
    if record.get("pruning"):
        lines.append("Pruning: each expert was structurally pruned and fine-tuned after training (details in "
                     "`training_regime.json`).")
    return lines
