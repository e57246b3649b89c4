"""Schedulers of the old pipeline layout, kept so that those folders still load with the package imported.

Up to version 0.1.0.dev0 (commit e71fd58) the scripts saved ``RegimeDDPMScheduler`` / ``RegimeDDIMScheduler``:
diffusers' schedulers with one more config entry, ``training_regime``. ``model_index.json`` then names this
module, which only an interpreter that imported ``diffusers_curriculum`` can resolve. The scripts now save stock
schedulers and ``training_regime.json``; ``python -m diffusers_curriculum.convert_pipeline OLD NEW`` rewrites an
old folder that way.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.configuration_utils import register_to_config

# diffusers' loader looks the base class up on the library module (`getattr(module, "SchedulerMixin")`).
from diffusers import SchedulerMixin  # noqa: F401


def _init_with_regime(base):
    """``base.__init__`` plus a trailing ``training_regime=None`` parameter, for ``@register_to_config``
    (diffusers reads a config class's fields from its ``__init__`` signature)."""
    base_init = inspect.unwrap(base.__init__)

    def __init__(self, *args, training_regime: Optional[Dict[str, Any]] = None, **kwargs):
        base_init(self, *args, **kwargs)

    params = list(inspect.signature(base_init).parameters.values())
    params.append(inspect.Parameter("training_regime", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None))
    __init__.__signature__ = inspect.Signature(params)
    __init__.__doc__ = base.__init__.__doc__
    return __init__


class RegimeDDPMScheduler(DDPMScheduler):
    """Old layout: :class:`~diffusers.DDPMScheduler` whose config also records the training regime."""

    __init__ = register_to_config(_init_with_regime(DDPMScheduler))


class RegimeDDIMScheduler(DDIMScheduler):
    """Old layout: :class:`~diffusers.DDIMScheduler` whose config also records the training regime."""

    __init__ = register_to_config(_init_with_regime(DDIMScheduler))


LEGACY_SCHEDULERS = {"RegimeDDPMScheduler": "DDPMScheduler", "RegimeDDIMScheduler": "DDIMScheduler"}
