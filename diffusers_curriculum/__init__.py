"""diffusers-curriculum: timestep-aware training regimes for Hugging Face Diffusers."""

__version__ = "0.1.0.dev0"

from . import schedulers  # noqa: F401  (folders saved in the old layout name this module)
from .clustering import cluster_intervals, equal_boundaries, interval_costs, partition
from .experts import TimestepRoutedExperts
from .export import read_training_regime
from .losses import denoising_loss
from .metrics import FashionFeatures, fashion_feature_extractor, feature_fid
from .pipelines import ClassConditionalPipeline
from .regimes import PRESETS, Regime, RegimeSpec, build_regime
from .regimes.balancers import NashMTL, PCGrad, UncertaintyWeighting
from .regimes.timesteps import AdaptivePacing, CurriculumSampler, FixedPacing, stage_interval
from .sampling import IntervalSampler, LogitNormalSampler, StratifiedSampler, TimestepSampler, UniformSampler
from .weighting import LearnedWeighting, loss_weights, min_snr_weights, p2_weights

__all__ = [
    "AdaptivePacing",
    "ClassConditionalPipeline",
    "CurriculumSampler",
    "FashionFeatures",
    "FixedPacing",
    "IntervalSampler",
    "LearnedWeighting",
    "LogitNormalSampler",
    "NashMTL",
    "PCGrad",
    "PRESETS",
    "Regime",
    "RegimeSpec",
    "StratifiedSampler",
    "TimestepRoutedExperts",
    "TimestepSampler",
    "UncertaintyWeighting",
    "UniformSampler",
    "build_regime",
    "cluster_intervals",
    "denoising_loss",
    "equal_boundaries",
    "fashion_feature_extractor",
    "feature_fid",
    "interval_costs",
    "loss_weights",
    "min_snr_weights",
    "p2_weights",
    "partition",
    "read_training_regime",
    "stage_interval",
]
