"""The regime layer: timestep axis × loss weighting × cluster balancer × expert layout, composed into one object.

* :mod:`.timesteps` -- which timesteps a batch holds (uniform, logit-normal, SpeeD, bias, loss-aware,
  stratified over the clusters, the easy→hard curriculum with its pacing);
* :mod:`.weighting` -- per-sample loss weights (none, Min-SNR-γ, P2, EDM2's learned u(λ));
* :mod:`.balancers` -- multi-task balancers over the cluster losses (UW, PCGrad, NashMTL);
* :mod:`.experts` -- TDC's base stage, branching and routed experts;
* :mod:`.regime` -- :class:`Regime`, the one object a training script calls;
* :mod:`.cli` -- every flag, every check, the presets and :func:`build_regime`.

Constructors take plain values (T, boundaries, seeds); only :mod:`.cli` reads an argparse namespace.
"""

from .cli import PRESETS, add_regime_args, build_regime, check_launch, check_schedule, needs_unused_parameters, validate_regime_args
from .regime import Regime

__all__ = ["PRESETS", "Regime", "add_regime_args", "build_regime", "check_launch", "check_schedule", "needs_unused_parameters", "validate_regime_args"]
