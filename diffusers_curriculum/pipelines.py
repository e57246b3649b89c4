"""Pipelines diffusers does not have. The class lives in :mod:`diffusers_curriculum.portable`, a self-contained
module that every saved class-conditional pipeline carries so that stock diffusers can load it."""

from .portable.class_conditional_pipeline import ClassConditionalPipeline  # noqa: F401
