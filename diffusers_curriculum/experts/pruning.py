"""Structured pruning of TDC experts with a proxy-scored multi-round search (arXiv 2312.13307).

Pruning one expert is a multi-round decision problem:

1. a **proposer** suggests a configuration — a channel-pruning ratio per UNet block (``down_blocks.i``,
   ``mid_block``, ``up_blocks.i``) — that fits the expert's FLOPs budget;
2. a **proxy** scores it: prune a copy with torch-pruning (DepGraph keeps coupled channels consistent),
   fine-tune it for a few steps on the group's timesteps, measure the denoising loss on a fixed validation
   batch of the group's timesteps;
3. the (configuration, FLOPs, score) record goes into a **memory bank** the proposer reads next round.

The paper's proposer is an LLM; here :class:`Proposer` is an interface and the default,
:class:`CoordinateSearchProposer`, is a deterministic search. Budgets follow the paper's progressive
scaling: with N groups and keep fraction k = 1 − ``prune_ratio``, the expert of the i-th easiest group
(i = 0 is the highest-noise group) may use (i/N + (N−i)/N · k) of the unpruned FLOPs, so easy groups get
smaller experts. FLOPs are counted with ``torch.utils.flop_counter`` on a real forward pass.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import count_flops, count_params, example_inputs, sync_sampler_widths
from ..clustering import bucketize
from ..losses import denoising_loss
from ..noise import as_process
from ..sampling import uniform_levels
from ..weighting import loss_weights
from ..weightings import PLUGINS

Config = Dict[str, float]


def group_budgets(num_groups: int, prune_ratio: float) -> List[float]:
    """Allowed fraction of the unpruned FLOPs per expert, expert 0 = lowest timesteps (hardest).

    The i-th easiest group (i = 0 is the highest-noise group) gets i/N + (N − i)/N · (1 − prune_ratio).
    """
    if not 0 < prune_ratio < 1:
        raise ValueError(f"prune_ratio must be in (0, 1), got {prune_ratio}")
    keep = 1.0 - prune_ratio
    budgets = []
    for expert in range(num_groups):
        i = num_groups - 1 - expert
        budgets.append(i / num_groups + (num_groups - i) / num_groups * keep)
    return budgets


# ---- pruning one model ---------------------------------------------------------------------------------
STREAM = "stream"


def prunable_blocks(model: nn.Module) -> List[str]:
    """Names a configuration assigns ratios to: ``"stream"`` (the channels coupled through residual adds and
    skip connections, pruned alike everywhere) and each block, whose ratio applies to the channels local to
    it (inside every ResNet block, between its two convolutions, and the attention head dims)."""
    names = [STREAM] + [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    names += ["mid_block"] if getattr(model, "mid_block", None) is not None else []
    return names + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]


def _local_roots(block: nn.Module) -> List[nn.Module]:
    """The layers whose output channels stay inside ``block``: ResNet ``conv1`` and attention q/k/v."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    roots = []
    for module in block.modules():
        if isinstance(module, ResnetBlock2D):
            roots.append(module.conv1)
        elif isinstance(module, Attention):
            roots += [module.to_q, module.to_k, module.to_v]
    return roots


def norm_groups(model: nn.Module) -> int:
    """The number of groups of the model's GroupNorms (its ``norm_num_groups``; 1 without GroupNorms)."""
    groups = {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    return max(groups) if groups else 1


def ratio_step(model: nn.Module) -> float:
    """The pruning granularity: the smallest ratio that removes whole GroupNorm groups, ``1 / norm_num_groups``.

    A ratio m/G removes m of the G groups of every stream and every ResNet block's inner channels (each a whole
    group of ``C / G`` channels): for the default tiny UNet (widths 16, 32, 32; 8 groups) a step is 2 of 16 or 4
    of 32 channels; attention projections lose m/G of every head's dims, the heads stay.
    """
    return 1.0 / norm_groups(model)


def quantize(config: Config, step: float) -> Config:
    """Every ratio rounded down to a multiple of ``step``."""
    return {name: math.floor(ratio / step + 1e-6) * step for name, ratio in config.items()}


def _group_size_importance(group_sizes: Dict[nn.Module, int]):
    """torch-pruning's L2 magnitude importance, averaged over each GroupNorm group of a dependency group's
    channels: channels of one group rank together, so pruning ``m × size`` channels removes m whole groups."""
    import torch_pruning as tp

    class WholeGroups(tp.importance.MagnitudeImportance):
        def __call__(self, group):
            importance = super().__call__(group)
            if importance is None:
                return None
            sizes = [group_sizes[dep.target.module] for dep, _ in group
                     if dep.target.module in group_sizes and dep.target.module.num_channels == len(importance)]
            size = sizes[0] if sizes else 1
            if size > 1 and len(importance) % size == 0:
                blocks = importance.view(-1, size).mean(dim=1)
                blocks = blocks + torch.arange(len(blocks), device=blocks.device) * 1e-9 * blocks.abs().mean()  # no ties
                importance = blocks.repeat_interleave(size)
            return importance

    return WholeGroups(p=2)


def prune_model(model: nn.Module, config: Config) -> nn.Module:
    """Prunes ``model`` in place: stream channels by ``config["stream"]``, each block's local channels by its ratio.

    Ratios are multiples of :func:`ratio_step` (others are rounded down): channels go in whole GroupNorm groups
    and every GroupNorm keeps its group size (its number of groups shrinks), so a step is one group, not one
    channel of every group. Coupled channels (residual streams, skip concatenations, attention heads) are handled
    by torch-pruning's dependency graph; the output convolution keeps its channels.
    """
    import torch_pruning as tp

    step = ratio_step(model)
    config = quantize(config, step)
    if not any(ratio > 0 for ratio in config.values()):
        return model
    # A ratio m/G of C channels removes exactly m·C/G of them (int() in torch-pruning would round m/G·C up).
    eps = 1e-9
    ratios = {root: max(ratio - eps, 0.0) for name, ratio in config.items() if name != STREAM
              for root in _local_roots(model.get_submodule(name))}
    from diffusers.models.attention_processor import Attention

    # Attention projections are pruned per head (equal head dims), keeping the number of heads.
    num_heads = {}
    for module in model.modules():
        if isinstance(module, Attention):
            num_heads.update({layer: module.heads for layer in (module.to_q, module.to_k, module.to_v)})
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    group_sizes = {norm: norm.num_channels // norm.num_groups for norm in norms}
    was_training = model.training
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model, example_inputs(model), importance=_group_size_importance(group_sizes),
        pruning_ratio=max(config.get(STREAM, 0.0) - eps, 0.0), pruning_ratio_dict=ratios, ignored_layers=[model.conv_out],
        num_heads=num_heads,
    )
    for norm in norms:  # whole groups, not the same position in every group
        pruner.in_channel_groups.pop(norm, None)
        pruner.out_channel_groups.pop(norm, None)
    pruner.step()
    for norm, size in group_sizes.items():
        if norm.num_channels % size:
            raise RuntimeError(f"pruning left {norm.num_channels} channels in a GroupNorm of groups of {size}")
        norm.num_groups = norm.num_channels // size
    sync_sampler_widths(model)
    model.train(was_training)
    return model


def pruned_copy(model: nn.Module, config: Config) -> nn.Module:
    return prune_model(copy.deepcopy(model), config)


# ---- fine-tuning and the proxy -------------------------------------------------------------------------
def infinite_batches(dataset, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of ``pixel_values`` from ``dataset`` (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
    while True:
        for batch in loader:
            yield batch["pixel_values"]


def distillation_loss(student_prediction: torch.Tensor, teacher_prediction: torch.Tensor) -> torch.Tensor:
    """Output distillation: the mean squared difference between the pruned expert's prediction and its unpruned
    teacher's on the same noisy input (the teacher's side carries no gradient)."""
    return torch.nn.functional.mse_loss(student_prediction.float(), teacher_prediction.detach().float())


@dataclass(frozen=True)
class FinetuneObjective:
    """How pruned experts are fine-tuned and scored: the run's AdamW settings and loss weighting, read from its
    ``training_regime.json`` (:meth:`from_record`), so that an expert is fine-tuned on the objective TDC trained it
    on. The defaults (torch's AdamW, unweighted MSE, no clipping) are what a record without them gets."""

    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    max_grad_norm: Optional[float] = None
    weighting: str = "none"
    snr_gamma: Optional[float] = None
    p2_gamma: float = 1.0
    p2_k: float = 1.0
    settings: Tuple[Tuple[str, Any], ...] = ()  # a plugin weighting's flag values
    note: Optional[str] = None  # what could not be carried over

    @classmethod
    def from_record(cls, record: Dict) -> "FinetuneObjective":
        """The objective of a run from its record (``training_regime.json``). EDM2's learned weighting u(λ) is not
        saved with the pipeline: its experts are fine-tuned unweighted, and ``note`` says so."""
        optimizer = record.get("optimizer") or {}
        fields = {}
        if optimizer:
            fields.update(betas=tuple(optimizer["betas"]), weight_decay=optimizer["weight_decay"], eps=optimizer["eps"],
                          max_grad_norm=optimizer.get("max_grad_norm"))
        weighting = record.get("weighting", "none")
        if weighting == "learned":
            return cls(**fields, note="the run's learned weighting u(λ) is not saved with the pipeline: fine-tuned unweighted")
        plugin = PLUGINS.get(weighting)
        settings = tuple((name, record[name]) for name in plugin.flags) if plugin is not None else ()
        return cls(**fields, weighting=weighting, snr_gamma=record.get("snr_gamma"), p2_gamma=record.get("p2_gamma", 1.0),
                   p2_k=record.get("p2_k", 1.0), settings=settings)

    def optimizer(self, parameters, learning_rate: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameters, lr=learning_rate, betas=self.betas, weight_decay=self.weight_decay, eps=self.eps)

    def weights(self, noise_scheduler, timesteps: torch.Tensor) -> Optional[torch.Tensor]:
        return loss_weights(noise_scheduler, timesteps, self.weighting, self.snr_gamma, self.p2_gamma, self.p2_k, **dict(self.settings))


DEFAULT_OBJECTIVE = FinetuneObjective()


def proxy_loss(model, noise_scheduler, clean, noise, timesteps, teacher: Optional[nn.Module] = None,
               distill_weight: float = 0.0, objective: FinetuneObjective = DEFAULT_OBJECTIVE) -> torch.Tensor:
    """The batch's mean :func:`~diffusers_curriculum.losses.denoising_loss` of ``model`` under the ``objective``'s
    loss weighting, plus ``distill_weight`` × :func:`distillation_loss` against ``teacher`` when one is given."""
    process = as_process(noise_scheduler)
    noisy = process.add_noise(clean, noise, timesteps)
    prediction = model(noisy, process.model_timesteps(timesteps)).sample
    per_sample = denoising_loss(prediction, process, clean, noise, timesteps)
    weights = objective.weights(process, timesteps)
    loss = (per_sample if weights is None else per_sample * weights.to(per_sample.dtype)).mean()
    if teacher is not None and distill_weight > 0:
        with torch.no_grad():
            target = teacher(noisy, process.model_timesteps(timesteps)).sample
        loss = loss + distill_weight * distillation_loss(prediction, target)
    return loss


def draw_levels(noise_scheduler, t_range: Tuple[float, float], batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Noise levels uniform on ``t_range`` = [low, high) of the process's coordinate: integers (DDPM) or reals (flow)."""
    return uniform_levels(t_range[0], t_range[1], batch_size, generator, as_process(noise_scheduler).continuous)


def expert_level_range(noise_scheduler, experts_model, index: int) -> Tuple[float, float]:
    """Expert ``index``'s group as noise levels: its routing boundaries are in the timesteps the network is fed."""
    process = as_process(noise_scheduler)
    low, high = experts_model.boundaries[index], experts_model.boundaries[index + 1]
    return process.level_of(low), process.level_of(high)


def finetune(model, batches: Iterator[torch.Tensor], noise_scheduler, t_range: Tuple[int, int], steps: int,
             learning_rate: float, seed: int = 0, progress: Optional[Callable[[int, float], None]] = None,
             teacher: Optional[nn.Module] = None, distill_weight: float = 0.0, ema_decay: Optional[float] = None,
             objective: FinetuneObjective = DEFAULT_OBJECTIVE) -> nn.Module:
    """``steps`` AdamW steps (the ``objective``'s betas, weight decay, epsilon and gradient clipping) on its weighted
    loss, at timesteps drawn uniformly from ``t_range`` = [low, high); with a ``teacher`` (the unpruned expert) and
    ``distill_weight`` > 0 the loss adds output distillation. With ``ema_decay`` the model ends with the EMA of its
    fine-tuning weights (diffusers' ``EMAModel`` with the warm-up schedule of the training scripts, ``decay`` capped
    at ``ema_decay``), as trained pipelines ship EMA weights."""
    if steps <= 0:
        return model
    from diffusers.training_utils import EMAModel

    generator = torch.Generator().manual_seed(seed)
    optimizer = objective.optimizer(model.parameters(), learning_rate)
    ema = EMAModel(model.parameters(), decay=ema_decay, use_ema_warmup=True) if ema_decay else None
    device = next(model.parameters()).device
    model.train()
    for step in range(steps):
        clean = next(batches).to(device)
        timesteps = draw_levels(noise_scheduler, t_range, clean.shape[0], generator).to(device)
        noise = torch.randn(clean.shape, generator=generator).to(device)
        loss = proxy_loss(model, noise_scheduler, clean, noise, timesteps, teacher, distill_weight, objective)
        loss.backward()
        if objective.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), objective.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())
        if progress is not None:
            progress(step, float(loss))
    if ema is not None:
        ema.copy_to(model.parameters())
    model.eval()
    return model


class ValidationSet:
    """A fixed batch (images, noise, timesteps in the group) on which every candidate is scored."""

    def __init__(self, images: torch.Tensor, t_range: Tuple[int, int], seed: int = 0, noise_scheduler=None):
        generator = torch.Generator().manual_seed(seed)
        self.images = images
        self.noise = torch.randn(images.shape, generator=generator)
        if noise_scheduler is None:
            self.timesteps = torch.randint(*t_range, (images.shape[0],), generator=generator)
        else:
            self.timesteps = draw_levels(noise_scheduler, t_range, images.shape[0], generator)

    @torch.no_grad()
    def loss(self, model, noise_scheduler, teacher: Optional[nn.Module] = None, distill_weight: float = 0.0,
             objective: FinetuneObjective = DEFAULT_OBJECTIVE) -> float:
        """The batch's (weighted) denoising loss (plus ``distill_weight`` × the distillation loss against ``teacher``)."""
        device = next(model.parameters()).device
        model.eval()
        return float(proxy_loss(model, noise_scheduler, self.images.to(device), self.noise.to(device),
                                self.timesteps.to(device), teacher, distill_weight, objective))


@dataclass
class Proxy:
    """Scores a pruned candidate: ``steps`` fine-tuning steps on the group, then the validation loss under the
    fine-tuning's own objective (with a teacher: denoising + ``distill_weight`` × distillation)."""

    batches: Iterator[torch.Tensor]
    noise_scheduler: object
    validation: ValidationSet
    t_range: Tuple[int, int]
    steps: int = 20
    learning_rate: float = 1e-4
    seed: int = 0
    teacher: Optional[nn.Module] = None  # the unpruned expert: its outputs are distilled into the candidate
    distill_weight: float = 0.0
    objective: FinetuneObjective = DEFAULT_OBJECTIVE

    def __call__(self, candidate: nn.Module) -> float:
        finetune(candidate, self.batches, self.noise_scheduler, self.t_range, self.steps, self.learning_rate, self.seed,
                 teacher=self.teacher, distill_weight=self.distill_weight, objective=self.objective)
        return self.validation.loss(candidate, self.noise_scheduler, self.teacher, self.distill_weight, self.objective)


# ---- the search ----------------------------------------------------------------------------------------
@dataclass
class Record:
    """One memory-bank entry: a configuration, its FLOPs (fraction of the unpruned expert) and proxy score."""

    config: Config
    flops_fraction: float
    score: float


class Proposer:
    """Suggests the next configuration from the memory bank; ``None`` ends the search early.

    ``fit(fixed)`` returns a configuration that keeps the ratios in ``fixed`` and gives every other block the
    same ratio, the smallest that meets the FLOPs budget.
    """

    def propose(self, memory: Sequence[Record], blocks: Sequence[str], fit: Callable[[Config], Config]) -> Optional[Config]:
        raise NotImplementedError


@dataclass
class CoordinateSearchProposer(Proposer):
    """Deterministic default. Round 0: one ratio for every block. Later rounds: start from the best
    configuration in the memory bank, prune one block by ``step`` less (blocks taken in turn; default one
    GroupNorm group, :func:`ratio_step`) and let the others absorb the FLOPs; configurations already in the
    bank are skipped."""

    step: Optional[float] = None
    _cursor: int = field(default=0, repr=False)

    def propose(self, memory, blocks, fit):
        if not memory:
            return fit({})
        best = min(memory, key=lambda r: r.score).config
        seen = [r.config for r in memory]
        for _ in range(len(blocks)):
            block = blocks[self._cursor % len(blocks)]
            self._cursor += 1
            lowered = max(0.0, best[block] - self.step)
            if lowered == best[block]:
                continue
            candidate = fit({block: round(lowered, 4)})
            if candidate is not None and all(not _same(candidate, c) for c in seen):
                return candidate
        return None


def _same(a: Config, b: Config, tol: float = 1e-3) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) < tol for k in a)


def fit_to_budget(model: nn.Module, blocks: Sequence[str], fixed: Config, budget_flops: float,
                  max_ratio: float = 0.75) -> Optional[Config]:
    """The configuration that keeps ``fixed`` and prunes the other blocks by one shared ratio, the smallest
    multiple of :func:`ratio_step` (by bisection) whose counted FLOPs meet ``budget_flops``; ``None`` when even
    ``max_ratio`` does not."""
    step = ratio_step(model)
    free = [b for b in blocks if b not in fixed]

    def config_for(m: int) -> Config:
        return {b: round(fixed.get(b, m * step), 6) for b in blocks}

    def fits(m: int) -> bool:
        return count_flops(pruned_copy(model, config_for(m))) <= budget_flops

    if fits(0):
        return config_for(0)
    top = math.floor(max_ratio / step + 1e-6)
    if not free or not fits(top):
        return None
    low, high = 0, top  # fits(high), not fits(low)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return config_for(high)


@dataclass
class SearchResult:
    config: Config
    memory: List[Record]
    flops: int
    base_flops: int


def search_pruning(model: nn.Module, budget_fraction: float, proxy: Callable[[nn.Module], float],
                   proposer: Optional[Proposer] = None, rounds: int = 4, log: Callable[[str], None] = lambda _: None) -> SearchResult:
    """Multi-round proxy search for ``model`` under ``budget_fraction`` of its FLOPs (see module doc)."""
    if not 0 < budget_fraction <= 1:
        raise ValueError(f"budget fraction must be in (0, 1], got {budget_fraction}")
    proposer = CoordinateSearchProposer() if proposer is None else proposer
    if getattr(proposer, "step", 0.0) is None:
        proposer.step = ratio_step(model)
    blocks = prunable_blocks(model)
    base_flops = count_flops(model)
    budget = budget_fraction * base_flops

    def fit(fixed: Config) -> Optional[Config]:
        return fit_to_budget(model, blocks, fixed, budget)

    memory: List[Record] = []
    for round_index in range(rounds):
        config = proposer.propose(memory, blocks, fit)
        if config is None:
            break
        candidate = pruned_copy(model, config)
        fraction = count_flops(candidate) / base_flops
        if fraction > budget_fraction + 1e-9:
            raise ValueError(f"the proposer's configuration {config} uses {fraction:.3f} of the FLOPs, over the budget {budget_fraction:.3f}")
        score = proxy(candidate)
        memory.append(Record(config, fraction, score))
        log(f"round {round_index}: flops {fraction:.3f} of base, proxy loss {score:.5f}, config {config}")
    if not memory:
        raise ValueError(f"no configuration meets a FLOPs budget of {budget_fraction:.3f}")
    best = min(memory, key=lambda r: r.score)
    return SearchResult(best.config, memory, int(best.flops_fraction * base_flops), base_flops)


def sampling_flops(expert_flops: Sequence[int], boundaries: Sequence[int], timesteps: Sequence[int]) -> int:
    """FLOPs to generate one sample: each inference timestep runs the expert of its group once."""
    groups = bucketize(torch.as_tensor(list(timesteps)), list(boundaries))
    return int(sum(expert_flops[g] for g in groups.tolist()))


def flops_report(experts_model, timesteps: Sequence[int]) -> Dict[str, object]:
    """Per-expert params/FLOPs and the FLOPs per generated sample over ``timesteps``."""
    flops = [count_flops(e) for e in experts_model.experts]
    return {
        "experts": [{"group": [a, b], "params": count_params(e), "flops": f}
                    for (a, b), e, f in zip(itertools.pairwise(experts_model.boundaries), experts_model.experts, flops)],
        "flops_per_sample": sampling_flops(flops, experts_model.boundaries, timesteps),
        "num_inference_steps": len(list(timesteps)),
    }


def prune_experts(experts_model, dataset, noise_scheduler, prune_ratio: float, rounds: int = 4, proxy_steps: int = 20,
                  finetune_steps: int = 200, batch_size: int = 16, learning_rate: float = 1e-4, validation_size: int = 64,
                  seed: int = 0, proposer_factory: Callable[[], Proposer] = CoordinateSearchProposer,
                  log: Callable[[str], None] = print, distill_weight: float = 0.0,
                  max_loss_increase: Optional[float] = None, relaxations: int = 2, ema_decay: Optional[float] = None,
                  objective: FinetuneObjective = DEFAULT_OBJECTIVE):
    """Searches, prunes and fine-tunes every expert of a :class:`TimestepRoutedExperts` (its ``experts`` are
    replaced by the pruned ones). With ``distill_weight`` > 0 the proxy's score and every fine-tuning add output
    distillation from the expert as it was before pruning (a frozen copy); with ``ema_decay`` each shipped expert
    holds the EMA of its final fine-tuning.

    With ``max_loss_increase`` (e.g. 0.1) a pruned expert whose validation denoising loss ends more than that
    fraction above the unpruned expert's is not shipped: the search runs again under a budget half-way to the
    unpruned FLOPs (up to ``relaxations`` times), and an expert no budget keeps good stays unpruned. The record
    says which budgets were tried and what each kept.

    Every fine-tuning and every score uses ``objective`` (the run's optimizer settings and loss weighting:
    :meth:`FinetuneObjective.from_record`).

    Returns one dict per expert (budget, chosen configuration, memory bank, params and FLOPs before/after).
    """
    budgets = group_budgets(len(experts_model.experts), prune_ratio)
    validation_images = torch.stack([dataset[i]["pixel_values"] for i in range(min(validation_size, len(dataset)))])
    reports = []
    for index, (original, budget) in enumerate(zip(list(experts_model.experts), budgets)):
        t_range = expert_level_range(noise_scheduler, experts_model, index)
        batches = infinite_batches(dataset, batch_size, seed + index)
        teacher = copy.deepcopy(original).eval().requires_grad_(False) if distill_weight > 0 else None
        validation = ValidationSet(validation_images, t_range, seed + index, noise_scheduler)
        proxy = Proxy(batches, noise_scheduler, validation, t_range, proxy_steps, learning_rate, seed + index,
                      teacher, distill_weight, objective)
        params_before, flops_before = count_params(original), count_flops(original)
        loss_before = validation.loss(original, noise_scheduler, objective=objective)
        limit = None if max_loss_increase is None else loss_before * (1 + max_loss_increase)
        attempts, expert, result = [], None, None
        for _ in range(relaxations + 1 if limit is not None else 1):
            log(f"expert {index} (t in [{t_range[0]}, {t_range[1]})): FLOPs budget {budget:.3f} of the base")
            result = search_pruning(original, budget, proxy, proposer_factory(), rounds, log=lambda m: log(f"  {m}"))
            candidate = pruned_copy(original, result.config)
            finetune(candidate, batches, noise_scheduler, t_range, finetune_steps, learning_rate, seed + index,
                     teacher=teacher, distill_weight=distill_weight, ema_decay=ema_decay, objective=objective)
            loss, flops = validation.loss(candidate, noise_scheduler, objective=objective), count_flops(candidate)
            attempts.append({"flops_budget_fraction": budget, "config": result.config, "validation_loss": loss,
                             "flops_fraction": flops / flops_before})
            if limit is None or loss <= limit:
                expert = candidate
                break
            log(f"  validation loss {loss:.5f} is over {limit:.5f} (unpruned {loss_before:.5f} + {max_loss_increase:.0%}): "
                f"the budget {budget:.3f} is too aggressive for this expert")
            budget = (budget + 1) / 2
        kept_unpruned = expert is None
        if kept_unpruned:
            log(f"  no budget tried keeps the validation loss within {max_loss_increase:.0%}: expert {index} stays unpruned")
            expert, loss, flops = original, loss_before, flops_before
        expert.pruning_record = {
            "flops_budget_fraction": attempts[-1]["flops_budget_fraction"], "config": {} if kept_unpruned else result.config,
            "memory_bank": [vars(r) for r in result.memory],
            "params_before": params_before, "params": count_params(expert),
            "flops_before": flops_before, "flops": flops,
            "validation_loss_before": loss_before,
            "validation_loss": loss,
            "finetune_steps": finetune_steps, "distill_weight": distill_weight, "ema_decay": ema_decay,
            "max_loss_increase": max_loss_increase, "attempts": attempts,
            "kept_unpruned": kept_unpruned,
        }
        experts_model.experts[index] = expert
        log(f"  kept {expert.pruning_record['flops'] / flops_before:.3f} of the FLOPs; validation loss "
            f"{loss_before:.5f} -> {expert.pruning_record['validation_loss']:.5f}")
        reports.append({"expert": index, **expert.pruning_record})
    return reports
