"""TDC's k experts run as one k-times-wider UNet: a batched expert step for stage 2 (arXiv 2312.13307).

In stage 2 every batch is stratified with equal counts per timestep group, and until pruning the k experts share
one architecture. :class:`WideExperts` runs them in one forward pass instead of k small ones: sample j of group
i goes into channel block i of row j ("expert-major" channel layout, ``[n, k·C, H, W]`` for ``n`` samples per
group), and every layer with weights works on its own expert's block:

* ``Conv2d`` → one grouped convolution (``groups × k``) over the experts' concatenated kernels;
* ``GroupNorm`` → one group norm with ``k ×`` the groups (the groups are the experts' own channel blocks);
* ``Linear`` → one batched matmul over the experts' weights (a block-diagonal layer); ``Embedding`` → per-expert
  look-ups;
* attention: ``k ×`` the heads (each head lies inside one expert's block); samplers: ``k ×`` their width;
* skip connections: an up-block resnet's input is ``cat([h, skip])``, i.e. ``[h_1 … h_k, s_1 … s_k]``; it is
  permuted back to ``[h_1 s_1 … h_k s_k]`` on entry.

The wide model holds no weights of its own: every call concatenates the experts' parameters (one autograd node
for all of them), so gradients land on the experts' own parameters and checkpoints, optimizer state and EMA keep
their layout. It is
built only for the models it covers (``UNet2DModel`` made of those layers) and checked once against the routed
forward on the first batch it gets; :meth:`TimestepRoutedExperts.forward` falls back to one forward per group
when it is not built, the experts' widths differ (after pruning) or a batch does not split evenly.
"""

from __future__ import annotations

import copy
import logging
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import Timesteps
from diffusers.models.upsampling import Upsample2D
from torch import nn

logger = logging.getLogger(__name__)

# How far the wide forward may stray from the routed one in the first-batch check (relative to the output's scale):
# in float32; in float32 on CUDA with TF32 convolutions or matmuls (PyTorch's default for cuDNN convolutions: on an
# H200 the grouped and the per-group convolutions differ by ~2e-4); under reduced precision (bf16/fp16 autocast or
# weights). A layout error is off by the output's own size, far above all three.
CHECK_TOLERANCE = 1e-4
CHECK_TOLERANCE_TF32 = 1e-2
CHECK_TOLERANCE_REDUCED = 5e-2


class _WideLayer(nn.Module):
    """A layer of the wide model: the k experts' copies of one layer, run as one. ``self.first`` (expert 0's
    layer, registered so that ``model.dtype``/``device`` work) and ``self.layers`` (all k, not registered: the
    wide model owns no parameters) point at the experts' own modules. Before each call :class:`WideExperts` sets
    ``self.weight``/``self.bias`` to the k experts' tensors concatenated along dim 0 (``[k·O, …]``)."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.first = layers[0]
        object.__setattr__(self, "layers", list(layers))
        self.__dict__.update(weight=None, bias=None)

    def sources(self) -> List[List[Optional[torch.Tensor]]]:
        """The experts' weights then biases (None where the layer has no bias)."""
        return [[getattr(layer, name, None) for layer in self.layers] for name in ("weight", "bias")]


class WideConv2d(_WideLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.first
        return F.conv2d(x, self.weight, self.bias, conv.stride, conv.padding, conv.dilation, conv.groups * len(self.layers))


class WideGroupNorm(_WideLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.first
        return F.group_norm(x, norm.num_groups * len(self.layers), self.weight, self.bias, norm.eps)


class WideLinear(_WideLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.layers)
        weight = self.weight.view(k, -1, self.weight.shape[-1])
        out = torch.einsum("...ki,koi->...ko", x.view(*x.shape[:-1], k, -1), weight).flatten(-2)
        return out if self.bias is None else out + self.bias


class WideEmbedding(_WideLayer):
    """Class labels arrive as ``[k, n]`` (row i: group i's labels); returns ``[n, k·D]``."""

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        k = len(self.layers)
        tables = self.weight.view(k, -1, self.weight.shape[-1])
        return torch.cat([F.embedding(row, table) for row, table in zip(labels, tables)], dim=-1)


class WideTimesteps(nn.Module):
    """The sinusoidal projection (no weights) of ``[k, n]`` timesteps, laid out as ``[n, k·D]``."""

    def __init__(self, projection: Timesteps):
        super().__init__()
        self.projection = projection

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        k, n = timesteps.shape
        return self.projection(timesteps.reshape(-1)).view(k, n, -1).transpose(0, 1).reshape(n, -1)


WIDE_LAYERS = {nn.Conv2d: WideConv2d, nn.GroupNorm: WideGroupNorm, nn.Linear: WideLinear, nn.Embedding: WideEmbedding}


def why_not_wide(experts: Sequence[nn.Module]) -> Optional[str]:
    """Why these experts cannot run as one wide model, or None when they can."""
    if len(experts) < 2:
        return "a single expert"
    if any(type(e) is not UNet2DModel for e in experts):
        return f"experts of type {type(experts[0]).__name__} (only UNet2DModel is covered)"
    if experts[0].config.time_embedding_type != "positional" or experts[0].config.class_embed_type is not None:
        return "a Fourier time embedding or a class embedding type other than the default"
    if any(e.is_gradient_checkpointing for e in experts):  # recomputation would run after the gathered weights are gone
        return "gradient checkpointing"
    shapes = [[(tuple(p.shape), p.dtype, p.device) for p in e.parameters()] for e in experts]
    if any(s != shapes[0] for s in shapes[1:]):
        return "experts of different widths (pruned), dtypes or devices"
    if len({dtype for _, dtype, _ in shapes[0]}) > 1:
        return "parameters of more than one dtype"
    for name, module in experts[0].named_modules():
        if next(module.parameters(recurse=False), None) is not None and type(module) not in WIDE_LAYERS:
            return f"a layer with weights the wide model does not cover ({name}: {type(module).__name__})"
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            return f"{name} pads with {module.padding_mode!r}"
        if next(module.buffers(recurse=False), None) is not None:
            return f"a layer with buffers ({name})"
    return None


class WideExperts:
    """k same-architecture UNet2DModel experts run as one wide model (see the module's docstring).

    Call it with a batch whose samples are grouped by expert: ``sample`` ``[k·n, C, H, W]`` with rows
    ``i·n … (i+1)·n − 1`` for expert i, timesteps ``[k·n]`` and optional class labels ``[k·n]``.
    """

    def __init__(self, experts: Sequence[nn.Module]):
        self.k = len(experts)
        self.experts = list(experts)
        self.layers: List[_WideLayer] = []  # the wide model's weighted layers, filled by _build
        self.model = self._build()
        self.checked = False
        # What _gather_weights concatenates, listed once: the experts' parameter tensors as they are now (a
        # BatchedExpertStep builds a new WideExperts when they are replaced; in-place updates are followed).
        self._slots, self._counts, self._sources = [], [], []
        for layer in self.layers:
            for name, group in zip(("weight", "bias"), layer.sources()):
                if group[0] is not None:
                    self._slots.append((layer, name))
                    self._counts.append(len(group))
                    self._sources.extend(group)

    def _build(self) -> nn.Module:
        k, experts = self.k, self.experts
        # A structural copy of expert 0 without tensors: its weighted layers are replaced right away.
        wide = copy.deepcopy(experts[0], memo={id(p): None for p in experts[0].parameters()})
        for name, module in list(wide.named_modules()):
            if type(module) in WIDE_LAYERS:
                self.layers.append(WIDE_LAYERS[type(module)]([e.get_submodule(name) for e in experts]))
                _replace(wide, name, self.layers[-1])
            elif isinstance(module, Attention):
                module.heads *= k
            elif isinstance(module, (Downsample2D, Upsample2D)):  # they assert their input's width
                module.channels, module.out_channels = module.channels * k, module.out_channels * k
        wide.time_proj = WideTimesteps(wide.time_proj)
        for block in wide.up_blocks:
            _regroup_skip_connections(block, k)
        return wide

    def _gather_weights(self) -> None:
        """Sets every wide layer's weight and bias to the experts' tensors concatenated along dim 0, through one
        autograd node (:class:`_Concatenate`) instead of one per tensor: on a tiny UNet the per-tensor graph of
        k × ~270 parameters costs more than the concatenation itself."""
        wide = _Concatenate.apply(self._counts, *self._sources)
        for (layer, name), tensor in zip(self._slots, wide):
            layer.__dict__[name] = tensor

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        k = self.k
        n = sample.shape[0] // k
        wide_sample = sample.view(k, n, *sample.shape[1:]).transpose(0, 1).reshape(n, -1, *sample.shape[2:])
        labels = None if class_labels is None else class_labels.view(k, n)
        self._gather_weights()
        try:
            out = self.model(wide_sample, timesteps.view(k, n), class_labels=labels).sample
        finally:
            for layer in self.layers:
                layer.__dict__.update(weight=None, bias=None)
        return out.view(n, k, -1, *out.shape[2:]).transpose(0, 1).reshape(k * n, -1, *out.shape[2:])

    def check(self, routed_output: torch.Tensor, sample, timesteps, class_labels=None) -> bool:
        """Compares the wide forward with the routed one on one batch (once, under the same autocast state);
        False disables the wide model."""
        with torch.no_grad():
            wide_output = self(sample, timesteps, class_labels)
        error = float((wide_output.float() - routed_output.float()).abs().max())
        scale = float(routed_output.float().abs().max()) + 1e-6
        self.checked = True
        if error > check_tolerance(routed_output, sample.device) * scale:
            logger.warning("The batched expert step differs from the per-group forward (max error %.3g at scale %.3g); "
                           "training goes on with one forward per group.", error, scale)
            return False
        return True


def check_tolerance(output: torch.Tensor, device: torch.device) -> float:
    """The first-batch check's relative tolerance for an output computed on ``device`` in the current precision."""
    if output.dtype != torch.float32 or torch.is_autocast_enabled(device.type):
        return CHECK_TOLERANCE_REDUCED
    if device.type == "cuda" and (torch.backends.cudnn.allow_tf32 or torch.get_float32_matmul_precision() != "highest"):
        return CHECK_TOLERANCE_TF32
    return CHECK_TOLERANCE


class _Concatenate(torch.autograd.Function):
    """``torch.cat`` of consecutive runs of tensors (run lengths ``counts``) as one autograd node: backward splits
    each run's gradient back into its tensors' (views, which accumulate into the experts' ``.grad``)."""

    @staticmethod
    def forward(ctx, counts, *tensors):
        ctx.counts = counts
        ctx.sizes = [t.shape[0] for t in tensors]
        runs, start = [], 0
        for count in counts:
            runs.append(torch.cat(tensors[start:start + count]))
            start += count
        return tuple(runs)

    @staticmethod
    def backward(ctx, *grads):
        out, start = [None], 0
        for count, grad in zip(ctx.counts, grads):
            sizes = ctx.sizes[start:start + count]
            out += [None] * count if grad is None else list(grad.split(sizes))
            start += count
        return tuple(out)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = module


def _regroup_skip_connections(block: nn.Module, k: int) -> None:
    """An up block concatenates its input with a skip connection before each resnet; in the wide layout that
    gives ``[h_1 … h_k, s_1 … s_k]``. Hooks permute each resnet's input back to ``[h_1 s_1 … h_k s_k]``; the skip
    widths come from the tuple the block receives (its resnets take the skips from the end)."""
    skips: List[int] = []

    def read_skips(_block, args, kwargs):
        res_tuple = args[1] if len(args) > 1 else kwargs["res_hidden_states_tuple"]
        skips[:] = [r.shape[1] // k for r in reversed(res_tuple)]

    def regroup(index):
        def hook(_resnet, args, kwargs):
            x = args[0] if args else kwargs["input_tensor"]
            n, width, *spatial = x.shape
            skip = skips[index]
            own = width // k - skip
            hidden, skipped = x.split([k * own, k * skip], dim=1)
            x = torch.cat([hidden.view(n, k, own, *spatial), skipped.view(n, k, skip, *spatial)], dim=2).view(n, width, *spatial)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "input_tensor": x})
        return hook

    block.register_forward_pre_hook(read_skips, with_kwargs=True)
    for index, resnet in enumerate(block.resnets):
        resnet.register_forward_pre_hook(regroup(index), with_kwargs=True)


class BatchedExpertStep:
    """The batched path of a :class:`TimestepRoutedExperts` (set as its ``batched``): runs a batch with equal
    counts per group through the experts' :class:`WideExperts`, built on first use and rebuilt when the experts'
    parameters change (a resume, pruning); returns None (→ one forward per group) when it cannot."""

    def __init__(self):
        self.wide: Optional[WideExperts] = None
        self.reason: Optional[str] = None  # why the current experts cannot run wide
        self.expert_ids: Optional[List[int]] = None
        self.slots: List[tuple] = []  # (module, name, parameter) of every expert parameter, when last looked at

    def __deepcopy__(self, memo):  # a copied model builds its own
        return type(self)()

    def _unchanged(self, experts: Sequence[nn.Module]) -> bool:
        """Whether the experts and their parameter tensors are those of the last look: a dictionary lookup per
        parameter, where walking the experts' modules (``parameters()``) cost ~1 ms per expert and step."""
        return [id(e) for e in experts] == self.expert_ids and all(m._parameters.get(n) is p for m, n, p in self.slots)

    def wide_for(self, experts: Sequence[nn.Module]) -> Optional[WideExperts]:
        if not self._unchanged(experts):
            self.expert_ids, self.wide = [id(e) for e in experts], None
            self.slots = [(m, n, p) for e in experts for m in e.modules() for n, p in m._parameters.items() if p is not None]
            self.reason = why_not_wide(experts)
            if self.reason is None:
                self.wide = WideExperts(experts)
            else:
                logger.info("TDC experts run one forward per group: %s.", self.reason)
        return self.wide

    def __call__(self, routed, sample, t, groups, *args, class_labels=None, **kwargs):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        if args or any(v is not None for v in kwargs.values()):
            return None
        k = len(routed.experts)
        counts = torch.bincount(groups, minlength=k)
        if bool((counts != counts[0]).any()):
            return None
        wide = self.wide_for(routed.experts)
        if wide is None:
            return None
        order = torch.argsort(groups, stable=True)
        sample, t = sample[order], t[order]
        labels = None if class_labels is None else class_labels[order]
        if not wide.checked:
            routed.batched = None
            try:
                with torch.no_grad():
                    reference = routed(sample, t, class_labels=labels).sample
            finally:
                routed.batched = self
            if not wide.check(reference, sample, t, labels):
                self.wide, self.reason = None, "the first-batch check failed"
                return None
        out = wide(sample, t, labels)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return UNet2DOutput(sample=out.index_select(0, inverse))
