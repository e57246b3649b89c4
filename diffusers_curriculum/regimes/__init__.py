"""The regime layer: timestep axis × loss weighting × cluster balancer × expert layout, composed into one object.

* :mod:`.timesteps` -- which timesteps a batch holds (uniform, logit-normal, SpeeD, bias, loss-aware,
  stratified over the clusters, the easy→hard curriculum with its pacing);
* :mod:`.weighting` -- per-sample loss weights (none, Min-SNR-γ, P2, EDM2's learned u(λ));
* :mod:`.balancers` -- multi-task balancers over the cluster losses (UW, PCGrad, NashMTL);
* :mod:`.experts` -- TDC's base stage, branching and routed experts;
* :mod:`.regime` -- :class:`Regime`, the one object a training script calls;
* :mod:`.spec` -- :class:`RegimeSpec`, the regime as checked plain values, the presets, and :func:`build_regime`;
* :mod:`.cli` -- every flag, and :func:`regime_spec`, which resolves them into a spec once.

Constructors take plain values (T, boundaries, seeds) or the spec; only :mod:`.cli` reads an argparse namespace.
"""

from .cli import add_regime_args, regime_spec
from .regime import Regime
from .spec import PRESETS, RegimeSpec, build_regime

__all__ = ["PRESETS", "Regime", "RegimeSpec", "add_regime_args", "build_regime", "regime_spec"]
