"""Loss weightings added one file each: every module in this folder that defines ``WEIGHTING`` (a
:class:`WeightingPlugin`) is a ``--weighting`` choice, with its own flags, checks and words, in every script, every
regime combination and the regime matrix test. ``edm.py`` is the worked example (README, "Extending").

Built-in weightings (none, Min-SNR, P2, EDM2's learned u(λ), SD3's sigma_sqrt / cosmap) live in
:mod:`diffusers_curriculum.weighting`; a plugin is a fixed per-sample factor computed from the noise level.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class WeightingPlugin:
    """One loss weighting.

    Args:
        name: the ``--weighting`` value.
        weights: ``weights(process, t, **settings)`` → per-sample factors of shape ``(B,)`` on the model's loss, for
            the noise levels ``t`` of ``process`` (a :class:`~diffusers_curriculum.noise.NoiseProcess`: its ``snr(t)``
            and ``x0_weight_factor(snr)`` carry a weight defined on the x₀ error to any target).
        words: the record (``training_regime.json``: ``weighting`` plus the settings) as a phrase for the model card.
        flags: ``{flag name: argparse keyword arguments}``; their values are the ``settings`` (and the record).
        check: ``check(settings)`` → an error message naming the flag, or None.
        processes: the noise processes it is defined for.
    """

    name: str
    weights: Callable[..., torch.Tensor]
    words: Callable[[Dict[str, Any]], str]
    flags: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    check: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None
    processes: Tuple[str, ...] = ("ddpm", "flow")


def discover() -> Dict[str, WeightingPlugin]:
    """``{name: plugin}`` of every module in this package that defines ``WEIGHTING``."""
    plugins = {}
    for module in pkgutil.iter_modules(__path__):
        plugin = getattr(importlib.import_module(f"{__name__}.{module.name}"), "WEIGHTING", None)
        if plugin is not None:
            plugins[plugin.name] = plugin
    return plugins


PLUGINS = discover()
