"""diffusers-curriculum: timestep-aware training regimes for Hugging Face Diffusers."""

__version__ = "0.1.0.dev0"

from .ant import ANTRegime, StratifiedSampler
from .clustering import cluster_intervals, interval_costs
from .curriculum import AdaptivePacing, CurriculumRegime, FixedPacing, equal_clusters, stage_interval
from .regimes import REGIMES, TrainingRegime
from .sampling import IntervalSampler, LogitNormalSampler, TimestepSampler, UniformSampler
from . import schedulers  # noqa: F401  (folders saved in the old layout name this module)
from .experts import TimestepRoutedExperts
from .tdc import TDCRegime
from .pipelines import ClassConditionalPipeline
from .export import read_training_regime
from .metrics import FashionFeatures, fashion_feature_extractor, feature_fid
from .mtl import NashMTL, PCGrad, UncertaintyWeighting
from .weighting import loss_weights, min_snr_weights, p2_weights


__all__ = [
    "ANTRegime",
    "AdaptivePacing",
    "ClassConditionalPipeline",
    "CurriculumRegime",
    "FashionFeatures",
    "FixedPacing",
    "IntervalSampler",
    "LogitNormalSampler",
    "NashMTL",
    "PCGrad",
    "REGIMES",
    "StratifiedSampler",
    "TDCRegime",
    "TimestepRoutedExperts",
    "TimestepSampler",
    "TrainingRegime",
    "UncertaintyWeighting",
    "UniformSampler",
    "cluster_intervals",
    "equal_clusters",
    "fashion_feature_extractor",
    "feature_fid",
    "interval_costs",
    "loss_weights",
    "min_snr_weights",
    "p2_weights",
    "read_training_regime",
    "stage_interval",
]
