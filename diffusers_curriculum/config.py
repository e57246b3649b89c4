"""A run's settings as frozen plain values, made once from a script's flags and checked when made.

:class:`RunConfig` is what the shared plumbing (:mod:`diffusers_curriculum.training`) needs of a run: where it
writes, how it checkpoints, resumes, logs and publishes. :class:`OptimizerSettings` is its optimizer, also the
record ``training_regime.json`` keeps so that later fine-tuning (``prune_experts.py``) steps as the run did. The
regime's own spec is :class:`~diffusers_curriculum.regimes.RegimeSpec`. A script builds them with
:func:`from_flags` from its parsed flags; the library never reads the argparse namespace.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
from . import hub
from .errors import UsageError
from .hub_checkpoints import is_hub_repo_id

# --report_to names accelerate can log to, and the module each needs.
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow",
                   "clearml": "clearml", "dvclive": "dvclive", "aim": "aim", "swanlab": "swanlab", "trackio": "trackio"}


def from_flags(factory, flags: Mapping[str, Any], **values):
    """``factory(...)`` (a class or function) called with the entries of ``flags`` (e.g. ``vars`` of a parsed
    namespace) it has parameters for, ``values`` taking precedence."""
    names = inspect.signature(factory).parameters
    return factory(**{**{name: flags[name] for name in names if name in flags}, **values})


def check_report_to(report_to: Optional[str]) -> None:
    """``--report_to``: ``none``, ``all`` or comma-separated tracker names, each installed (one-line error
    naming the missing package before any work, instead of accelerate's warning and no logs)."""
    if report_to in (None, "none", "all"):
        return
    for name in report_to.split(","):
        if name not in TRACKER_MODULES:
            raise UsageError(f"--report_to {name!r} is unknown; choose none, all or from {', '.join(TRACKER_MODULES)}")
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise UsageError(f"--report_to {name}: {TRACKER_MODULES[name]} is not installed (pip install {TRACKER_MODULES[name]})")


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW's settings (diffusers' example scripts' flags and defaults); ``use_8bit_adam``: bitsandbytes' 8-bit AdamW."""

    learning_rate: float = 1e-4
    adam_beta1: float = 0.95
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-6
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False

    def __post_init__(self):
        if self.use_8bit_adam:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise UsageError("--use_8bit_adam: bitsandbytes is not installed (pip install 'diffusers-curriculum[8bit]')")
            if not torch.cuda.is_available():
                raise UsageError("--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit optimizers); this run is on the CPU")

    def record(self) -> Dict[str, Any]:
        """The settings as ``training_regime.json`` keeps them."""
        return {"name": "AdamW8bit" if self.use_8bit_adam else "AdamW", "learning_rate": self.learning_rate,
                "betas": [self.adam_beta1, self.adam_beta2], "weight_decay": self.adam_weight_decay, "eps": self.adam_epsilon,
                "max_grad_norm": self.max_grad_norm}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], **values) -> "OptimizerSettings":
        """The settings a :meth:`record` was written from (``values`` over them, e.g. another learning rate)."""
        beta1, beta2 = record["betas"]
        return cls(**{**dict(learning_rate=record["learning_rate"], adam_beta1=beta1, adam_beta2=beta2,
                             adam_weight_decay=record["weight_decay"], adam_epsilon=record["eps"],
                             max_grad_norm=record["max_grad_norm"], use_8bit_adam=record["name"] == "AdamW8bit"), **values})


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it checkpoints, resumes, logs and publishes (the scripts' flags of the same names).

    ``hub_token`` is resolved when the config is made: ``--hub_token``, else the saved login's, where a push or a
    resume from the Hub needs one (a push without any token is a one-line error here, before any work)."""

    output_dir: str
    max_train_steps: Optional[int] = None
    gradient_accumulation_steps: int = 1
    mixed_precision: Optional[str] = None
    allow_tf32: bool = False
    report_to: Optional[str] = "tensorboard"
    logging_dir: str = "logs"
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    overwrite_output_dir: bool = False
    offload_ema: bool = False
    use_lora: bool = False
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_token: Optional[str] = None
    hub_private_repo: bool = False
    push_checkpoints: bool = False
    push_checkpoints_timeout: float = 600.0

    def __post_init__(self):
        check_report_to(self.report_to)
        if self.push_checkpoints:
            if not self.push_checkpoints_timeout > 0:
                raise UsageError(f"--push_checkpoints_timeout must be > 0, got {self.push_checkpoints_timeout}")
            token = hub.resolve_hub_token(self.hub_token, "--push_checkpoints")
        elif self.push_to_hub:
            token = hub.resolve_hub_token(self.hub_token)
        else:  # a public repo to resume from needs no token; a private one takes the login's
            token = self.hub_token or (hub.get_token() if is_hub_repo_id(self.resume_from_checkpoint) else None)
        object.__setattr__(self, "hub_token", token)
