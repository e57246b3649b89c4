"""A timestep-routed multi-expert denoiser (TDC, arXiv 2312.13307).

This file is self-contained (torch, diffusers, safetensors, huggingface_hub only): every pipeline with experts
carries a copy of it in its ``unet/`` folder, and ``model_index.json`` names it
(``"unet": ["timestep_routed_experts", "TimestepRoutedExperts"]``), so stock diffusers loads the folder with
``DiffusionPipeline.from_pretrained(path_or_repo_id, trust_remote_code=True)`` -- no ``diffusers_curriculum``
needed. ``diffusers_curriculum.experts`` re-exports the same class for training.

:class:`TimestepRoutedExperts` holds one denoiser per timestep group [b_i, b_{i+1}) and routes every sample
of a batch to the expert of its own timestep, so mixed-t training batches and scalar-t sampling both work.
It takes the wrapped model's ``forward`` arguments (positional or keyword, by the experts' own names) and returns
its output type, and it mirrors the first expert's config (``sample_size``, ``in_channels``, ...), so stock
``DDPMPipeline``, ``DDIMPipeline``, ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` and
``StableDiffusion3Pipeline`` use it in place of their UNet or transformer.

``save_pretrained`` writes the routing config (``config.json``) plus one folder per expert
(``expert_0/``, ``expert_1/``, ...); ``from_pretrained`` restores it from a folder or a Hub repo. A timestep
equal to a boundary b_i belongs to group i (intervals are closed on the left). Boundaries are in the timesteps
the network is fed: integers for DDPM, reals for a rectified flow whose ``shift`` moves them off the integer grid
(folders saved with integer boundaries load as before).

Experts may differ in width after structured pruning: a pruned expert's folder holds its unpruned
``config.json``, its weights (whose shapes define the pruned widths) and ``pruning.json``; loading builds the
model from the config and shrinks every layer to the saved shapes.
"""

from __future__ import annotations

import json
import os
from typing import Any, List, Optional, Sequence, Union

import diffusers
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

# Keys of the routing config itself; everything else in the config mirrors expert 0.
ROUTING_KEYS = ("boundaries", "expert_class")
# Loading options that make sense for every expert; others that pipelines pass (device maps, offloading,
# quantization) are left to the experts' defaults.
PRUNING_FILE = "pruning.json"
EXPERT_LOAD_KWARGS = ("torch_dtype", "variant", "use_safetensors", "cache_dir", "local_files_only", "revision", "token")


def _level(value) -> Union[int, float]:
    """A boundary as an int when it is integral (DDPM timesteps, flow levels on the grid), else a float."""
    value = float(value)
    return int(value) if value.is_integer() else value


def check_boundaries(boundaries: Sequence[float], num_experts: Optional[int] = None) -> List[Union[int, float]]:
    """Boundaries 0 = b_0 < b_1 < … < b_k = T (integral ones as ints); raises ValueError otherwise."""
    boundaries = [_level(b) for b in boundaries]
    if len(boundaries) < 2 or boundaries[0] != 0:
        raise ValueError(f"boundaries {boundaries} must start at 0 and hold at least one group")
    if any(b <= a for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries {boundaries} must increase strictly (groups may not overlap or be empty)")
    if num_experts is not None and len(boundaries) - 1 != num_experts:
        raise ValueError(f"{len(boundaries) - 1} groups in {boundaries} but {num_experts} experts")
    return boundaries


def bucketize(timesteps: torch.Tensor, boundaries) -> torch.Tensor:
    """Group index of each timestep for boundaries ``[0, b_1, …, T]`` (a sequence or a tensor):
    t ∈ [b_i, b_{i+1}) → i. Integer timesteps against integer boundaries compare as integers, anything else in
    float64. A tensor already on the timesteps' device is used as it is (no copy)."""
    if not torch.is_tensor(boundaries):
        integral = all(float(b).is_integer() for b in boundaries)
        boundaries = torch.tensor([float(b) for b in boundaries], dtype=torch.float64).to(torch.long if integral else torch.float64)
    inner = boundaries[1:-1].to(timesteps.device)
    if inner.is_floating_point() or timesteps.is_floating_point():
        inner, timesteps = inner.double(), timesteps.double()
    return torch.bucketize(timesteps, inner, right=True)


def _select(value: Any, index: torch.Tensor, batch_size: int) -> Any:
    """The rows ``index`` of a per-sample tensor (or of the tensors in a dict); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
        return value[index]
    if isinstance(value, dict):
        return {k: _select(v, index, batch_size) for k, v in value.items()}
    return value


class TimestepRoutedExperts(ModelMixin, ConfigMixin):
    """One expert per timestep group, routed by each sample's timestep.

    Args:
        boundaries: ``[0, b_1, …, T]`` in the timesteps the network is fed; expert i serves t ∈ [b_i, b_{i+1}).
        expert_class: the experts' diffusers class name (e.g. ``"UNet2DModel"``), used when loading.
        experts: the expert modules (same input/output shapes; widths may differ).
    """

    config_name = "config.json"
    ignore_for_config = ["experts"]

    @register_to_config
    def __init__(self, boundaries: List[float], expert_class: str = "UNet2DModel", experts: Optional[Sequence[nn.Module]] = None):
        super().__init__()
        if not experts:
            raise ValueError("TimestepRoutedExperts needs its experts; load saved ones with from_pretrained")
        boundaries = check_boundaries(boundaries, len(experts))
        self.experts = nn.ModuleList(experts)
        # When set, every sample goes to this expert (TDC stage 1 trains the base model only).
        self.route_all_to: Optional[int] = None
        # Training may set a batched step here (diffusers_curriculum.experts.wide): called as
        # batched(self, sample, t, groups, **inputs) with the call's other arguments by name, it returns the model
        # output or None to fall back to one forward per group.
        self.batched = None
        self._signature = None  # the experts' forward signature, read on the first call
        # Moves with the model, so routing a batch copies nothing to the device. Real boundaries (a shifted flow) stay a
        # list: a floating buffer would follow the model's dtype (fp16 cannot hold them).
        integral = all(isinstance(b, int) for b in boundaries)
        self.register_buffer("_boundaries", torch.tensor(boundaries, dtype=torch.long) if integral else None, persistent=False)
        # Pipelines read e.g. unet.config.sample_size / in_channels: mirror the first expert's config.
        mirrored = {k: v for k, v in experts[0].config.items() if not k.startswith("_") and k not in ROUTING_KEYS}
        self.register_to_config(**mirrored)

    @classmethod
    def from_model(cls, model: ModelMixin, boundaries: Sequence[int]) -> "TimestepRoutedExperts":
        """Copies ``model`` once per group (TDC stage 2 starts from the base model)."""
        import copy

        boundaries = check_boundaries(boundaries)
        experts = [copy.deepcopy(model) for _ in range(len(boundaries) - 1)]
        return cls(boundaries=boundaries, expert_class=type(model).__name__, experts=experts)

    @property
    def boundaries(self) -> List[float]:
        return list(self.config.boundaries)

    @property
    def add_embedding(self):
        """SDXL pipelines read the width of the added (pooled text + size/crop) embedding: every expert takes the
        same inputs, so the first expert's layer answers for all."""
        return self.experts[0].add_embedding

    def group_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Expert index of each timestep."""
        return bucketize(timesteps, self._boundaries if self._boundaries is not None else self.boundaries)

    def _inputs(self, args, kwargs) -> "dict[str, Any]":
        """The call's arguments by the experts' own parameter names (a UNet takes ``sample, timestep, ...``
        positionally; SD3's transformer takes ``hidden_states=``, ``timestep=`` as keywords)."""
        import inspect

        if self._signature is None:
            self._signature = inspect.signature(self.experts[0].forward)
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        extra = [name for name, p in self._signature.parameters.items() if p.kind is p.VAR_KEYWORD and name in bound]
        for name in extra:  # an expert's own **kwargs, flattened
            bound.update(bound.pop(name))
        return dict(bound)

    def forward(self, *args, return_dict: bool = True, **kwargs):
        if self.route_all_to is not None:
            return self.experts[self.route_all_to](*args, return_dict=return_dict, **kwargs)
        inputs = self._inputs(args, kwargs)
        sample_name = next(iter(self._signature.parameters))  # ``sample`` (UNets), ``hidden_states`` (transformers)
        sample, timestep = inputs.pop(sample_name), inputs.pop("timestep")
        batch_size = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(batch_size).contiguous() if t.ndim == 0 else t
        groups = self.group_of(t)
        if bool((groups == groups[0]).all()):  # sampling: one timestep, one expert
            return self.experts[int(groups[0])](*args, return_dict=return_dict, **kwargs)
        if self.batched is not None:
            result = self.batched(self, sample, t, groups, **inputs)
            if result is not None:
                return result if return_dict else (result.sample,)

        output, output_type = None, None
        for group in groups.unique().tolist():
            index = (groups == group).nonzero().squeeze(1)
            result = self.experts[group](**{sample_name: sample[index], "timestep": t[index]}, return_dict=True,
                                         **{k: _select(v, index, batch_size) for k, v in inputs.items()})
            if output is None:
                output_type = type(result)
                output = result.sample.new_empty((batch_size, *result.sample.shape[1:]))
            output[index] = result.sample
        return output_type(sample=output) if return_dict else (output,)

    # ---- persistence: one folder per expert + the routing config -------------------------------------------
    def save_pretrained(self, save_directory: str, is_main_process: bool = True, **kwargs):
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory} is a file")
        os.makedirs(save_directory, exist_ok=True)
        for i, expert in enumerate(self.experts):
            folder = os.path.join(save_directory, f"expert_{i}")
            expert.save_pretrained(folder, is_main_process=is_main_process,
                                   safe_serialization=kwargs.get("safe_serialization", True), variant=kwargs.get("variant"))
            record = getattr(expert, "pruning_record", None)
            if record is not None and is_main_process:
                # GroupNorms may have lost whole groups: their widths are in the weights, their group counts here.
                groups = {name: m.num_groups for name, m in expert.named_modules() if isinstance(m, nn.GroupNorm)}
                with open(os.path.join(folder, PRUNING_FILE), "w") as f:
                    json.dump({**record, "group_norm_groups": groups}, f, indent=2)
        if is_main_process:
            self.save_config(save_directory)  # last: a folder with config.json is complete

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):  # a Hub repo id
            from huggingface_hub import snapshot_download

            pattern = f"{subfolder}/*" if subfolder else None
            folder = snapshot_download(folder, allow_patterns=pattern, revision=kwargs.get("revision"),
                                       token=kwargs.get("token"), cache_dir=kwargs.get("cache_dir"),
                                       local_files_only=kwargs.get("local_files_only", False))
        if subfolder:
            folder = os.path.join(folder, subfolder)
        config = cls.load_config(folder)
        boundaries = check_boundaries(config["boundaries"])
        expert_cls = getattr(diffusers, config["expert_class"])
        load_kwargs = {k: kwargs[k] for k in EXPERT_LOAD_KWARGS if kwargs.get(k) is not None and k not in ("revision", "token", "cache_dir", "local_files_only")}
        experts = [_load_expert(expert_cls, os.path.join(folder, f"expert_{i}"), load_kwargs) for i in range(len(boundaries) - 1)]
        model = cls(boundaries=boundaries, expert_class=config["expert_class"], experts=experts)
        return model.eval()


def _load_expert(expert_cls, folder: str, load_kwargs) -> nn.Module:
    """An expert from its folder; a pruned one is built from its config and shrunk to the saved shapes."""
    pruning_path = os.path.join(folder, PRUNING_FILE)
    if not os.path.exists(pruning_path):
        return expert_cls.from_pretrained(folder, **load_kwargs)
    from safetensors.torch import load_file

    with open(pruning_path) as f:
        record = json.load(f)
    expert = expert_cls.from_config(expert_cls.load_config(folder))
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    resize_to_state_dict(expert, state)
    # Pruning removes whole GroupNorm groups: the number of groups left is in the record (older records: unchanged).
    for name, groups in record.get("group_norm_groups", {}).items():
        expert.get_submodule(name).num_groups = groups
    expert.load_state_dict(state, strict=True)
    expert.pruning_record = record
    dtype = load_kwargs.get("torch_dtype")
    return expert.to(dtype) if dtype is not None else expert


def resize_to_state_dict(model: nn.Module, state: dict) -> None:
    """Shrinks ``model``'s layers in place so that their parameters have the shapes in ``state``.

    Covers the layers structured pruning changes in diffusers UNets (convolutions, linear layers, group and
    layer norms, up/down-samplers); every width follows from the saved tensor shapes.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for key, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            saved = state.get(prefix + key)
            if saved is not None and saved.shape != tensor.shape:
                new = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
                if isinstance(tensor, nn.Parameter):
                    setattr(module, key, nn.Parameter(new, requires_grad=tensor.requires_grad))
                else:
                    module.register_buffer(key, new)
        if isinstance(module, nn.Conv2d):
            module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.GroupNorm) and module.weight is not None:
            module.num_channels = module.weight.shape[0]
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
    sync_sampler_widths(model)


def sync_sampler_widths(model: nn.Module) -> None:
    """Up/down-samplers check their input width against attributes that resizing or pruning leaves stale."""
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    for module in model.modules():
        if isinstance(module, (Downsample2D, Upsample2D)) and getattr(module, "conv", None) is not None:
            module.channels, module.out_channels = module.conv.in_channels, module.conv.out_channels
