"""The timestep-routed multi-expert denoiser (TDC, arXiv 2312.13307) for training code.

The class lives in :mod:`diffusers_curriculum.portable.timestep_routed_experts`, a self-contained module that
every saved TDC pipeline carries so that stock diffusers can load it; this module is where the package imports
it from (and where pipelines saved in the old layout, ``["diffusers_curriculum.experts",
"TimestepRoutedExperts"]``, find it).

FLOPs and parameters of a denoiser are counted here (``torch.utils.flop_counter`` on a real forward pass).
"""

from typing import Dict, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Folders saved in the old layout name this module as the experts' library; diffusers' loader then looks the
# base class up on it (`getattr(module, "ModelMixin")`) to find `from_pretrained`. Keep it importable here.
from diffusers import ModelMixin  # noqa: F401

from ..portable.timestep_routed_experts import (  # noqa: F401
    PRUNING_FILE,
    TimestepRoutedExperts,
    check_boundaries,
    resize_to_state_dict,
    sync_sampler_widths,
)


def is_routed_experts(model) -> bool:
    """Whether ``model`` is a :class:`TimestepRoutedExperts`: this package's class, or the copy of it that a
    saved folder ships and diffusers loads with ``trust_remote_code=True``."""
    return type(model).__name__ == TimestepRoutedExperts.__name__


# ---- counting: FLOPs and parameters -------------------------------------------------------------
def example_inputs(model: nn.Module, batch_size: int = 1) -> Dict[str, torch.Tensor]:
    """Inputs for one forward pass of a diffusers denoiser: a UNet (sample + timestep [+ class label, text, SDXL's
    added conditions]) or SD3's transformer (latents, timestep, a 77-token joint context, pooled projections)."""
    config = model.config
    size = config.sample_size if isinstance(config.sample_size, int) else tuple(config.sample_size)
    size = (size, size) if isinstance(size, int) else size
    device = next(model.parameters()).device
    if getattr(config, "joint_attention_dim", None):  # SD3Transformer2DModel: keyword inputs
        return {"hidden_states": torch.zeros(batch_size, config.in_channels, *size, device=device),
                "timestep": torch.zeros(batch_size, device=device),
                "encoder_hidden_states": torch.zeros(batch_size, 77, config.joint_attention_dim, device=device),
                "pooled_projections": torch.zeros(batch_size, config.pooled_projection_dim, device=device)}
    inputs = {"sample": torch.zeros(batch_size, config.in_channels, *size, device=device),
              "timestep": torch.zeros(batch_size, dtype=torch.long, device=device)}
    if getattr(config, "num_class_embeds", None):
        inputs["class_labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
    if getattr(config, "cross_attention_dim", None):  # UNet2DConditionModel: a 77-token text condition
        dim = config.cross_attention_dim
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        inputs["encoder_hidden_states"] = torch.zeros(batch_size, 77, dim, device=device)
    if getattr(config, "addition_embed_type", None) == "text_time":  # SDXL: pooled text + six size/crop ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch_size, pooled, device=device),
                                       "time_ids": torch.zeros(batch_size, 6, device=device)}
    return inputs


def count_flops(model: nn.Module, inputs: Optional[Dict[str, torch.Tensor]] = None) -> int:
    """FLOPs of one forward pass for one sample, counted by ``torch.utils.flop_counter``."""
    inputs = example_inputs(model) if inputs is None else inputs
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
