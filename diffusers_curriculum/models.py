"""Small denoisers that train on a CPU, and the checks every UNet config must pass."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence

from diffusers import UNet2DModel

from .errors import UsageError, describe_exception


def tiny_unet_config(
    resolution: int, channels: int, block_out_channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1
) -> Dict[str, Any]:
    """A UNet2DModel config small enough for CPU training (~1M parameters at the defaults), with
    self-attention in the lowest-resolution blocks like diffusers' unconditional example."""
    n = len(block_out_channels)
    down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D"]
    up = ["AttnUpBlock2D"] + ["UpBlock2D"] * (n - 1)
    return {
        "sample_size": resolution,
        "in_channels": channels,
        "out_channels": channels,
        "layers_per_block": layers_per_block,
        "block_out_channels": list(block_out_channels),
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": min(8, min(block_out_channels)),
        "attention_head_dim": 8,
    }


def downsampling_factor(config: Dict[str, Any]) -> int:
    """How many times a UNet2DModel halves its input: 2^(number of blocks − 1)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def unet_config_from_args(
    model_config_name_or_path: Optional[str], resolution: int, channels: int,
    block_out_channels: Sequence[int], layers_per_block: int,
) -> Dict[str, Any]:
    """The UNet config the flags ask for, checked against the resolution and the data's channels."""
    if model_config_name_or_path is None:
        config = tiny_unet_config(resolution, channels, block_out_channels, layers_per_block)
    else:
        path = model_config_name_or_path
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            config = UNet2DModel.load_config(path) if not path.endswith(".json") else json.load(open(path))
        except Exception as e:
            raise UsageError(f"--model_config_name_or_path {model_config_name_or_path}: cannot read a UNet config ({describe_exception(e)})") from None
        config = {**config, "sample_size": resolution}
        for key in ("in_channels", "out_channels"):
            if config.get(key, channels) != channels:
                raise UsageError(
                    f"--model_config_name_or_path: {key}={config[key]} but the training images have {channels} channel(s)"
                )
    factor = downsampling_factor(config)
    if resolution % factor != 0:
        raise UsageError(
            f"--resolution {resolution} is not divisible by {factor}, the UNet's down-sampling factor "
            f"({len(config['block_out_channels'])} blocks); use e.g. --resolution {resolution + (-resolution) % factor}"
        )
    return config
