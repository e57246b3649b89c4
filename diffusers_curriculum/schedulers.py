"""Schedulers that remember how their model was trained.

``RegimeDDPMScheduler`` and ``RegimeDDIMScheduler`` are diffusers' DDPM/DDIM schedulers with one more
config entry, ``training_regime``: a JSON-able dict (regime name, weighting, clusters, stage history, …)
written to ``scheduler_config.json`` by ``save_pretrained``. A pipeline saved with one of them reloads with
``DDPMPipeline.from_pretrained(path)`` once ``diffusers_curriculum`` is importable; stock diffusers
schedulers still read the config (they ignore the extra entry).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.configuration_utils import register_to_config

# A saved pipeline records this module as the scheduler's library; diffusers' loader then looks the base
# class up on it (`getattr(module, "SchedulerMixin")`) to find `from_pretrained`. Keep it importable here.
from diffusers import SchedulerMixin  # noqa: F401


def _init_with_regime(base):
    """``base.__init__`` plus a trailing ``training_regime=None`` parameter, for ``@register_to_config``.

    diffusers reads a config class's fields from its ``__init__`` signature, so the subclass exposes the
    base's parameters and the new one instead of hiding them behind ``**kwargs``.
    """
    base_init = inspect.unwrap(base.__init__)

    def __init__(self, *args, training_regime: Optional[Dict[str, Any]] = None, **kwargs):
        base_init(self, *args, **kwargs)

    params = list(inspect.signature(base_init).parameters.values())
    params.append(inspect.Parameter("training_regime", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None))
    __init__.__signature__ = inspect.Signature(params)
    __init__.__doc__ = base.__init__.__doc__
    return __init__


class RegimeSchedulerMixin:
    """Accessors for the ``training_regime`` entry of a scheduler config."""

    @property
    def training_regime(self) -> Dict[str, Any]:
        return dict(self.config.get("training_regime") or {})

    def with_training_regime(self, training_regime: Dict[str, Any]):
        """A copy of this scheduler whose config records ``training_regime``."""
        return self.__class__.from_config(self.config, training_regime=training_regime)


class RegimeDDPMScheduler(RegimeSchedulerMixin, DDPMScheduler):
    """:class:`~diffusers.DDPMScheduler` whose config also records the training regime."""

    __init__ = register_to_config(_init_with_regime(DDPMScheduler))


class RegimeDDIMScheduler(RegimeSchedulerMixin, DDIMScheduler):
    """:class:`~diffusers.DDIMScheduler` whose config also records the training regime."""

    __init__ = register_to_config(_init_with_regime(DDIMScheduler))


def regime_scheduler(noise_scheduler, training_regime: Dict[str, Any], sampler: str = "ddpm"):
    """The scheduler to ship: ``noise_scheduler``'s config as a DDPM or DDIM regime scheduler recording
    ``training_regime``. (``DDIMPipeline`` would swap any scheduler for a stock one and drop the record, so
    pixel pipelines keep ``DDPMPipeline`` and take the DDIM scheduler.)"""
    cls = {"ddpm": RegimeDDPMScheduler, "ddim": RegimeDDIMScheduler}[sampler]
    return cls.from_config(noise_scheduler.config, training_regime=training_regime)
