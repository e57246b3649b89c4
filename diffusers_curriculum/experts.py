"""The timestep-routed multi-expert denoiser (TDC, arXiv 2312.13307) for training code.

The class lives in :mod:`diffusers_curriculum.portable.timestep_routed_experts`, a self-contained module that
every saved TDC pipeline carries so that stock diffusers can load it; this module is where the package imports
it from (and where pipelines saved in the old layout, ``["diffusers_curriculum.experts",
"TimestepRoutedExperts"]``, find it).
"""

# Folders saved in the old layout name this module as the experts' library; diffusers' loader then looks the
# base class up on it (`getattr(module, "ModelMixin")`) to find `from_pretrained`. Keep it importable here.
from diffusers import ModelMixin  # noqa: F401

from .portable.timestep_routed_experts import (  # noqa: F401
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
