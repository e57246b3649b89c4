"""Data-parallel helpers shared by the training scripts and the regimes."""

from __future__ import annotations

import os

import torch


def force_cpu_backend() -> bool:
    """True when the script was launched on several processes (``accelerate launch --multi_gpu
    --num_processes N``) on a machine without CUDA.

    accelerate only picks its gloo CPU backend when the ``Accelerator`` is built with ``cpu=True``; without
    it every process would silently train alone as rank 0. Pass the result as ``Accelerator(cpu=...)``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return world_size > 1 and not torch.cuda.is_available()
