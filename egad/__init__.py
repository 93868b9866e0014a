"""egad: Entropy-Guided Adaptive Distillation for LLMs. The public API."""

from egad.config.presets import PRESETS, preset
from egad.config.schema import ConfigError, ObjectiveConfig
from egad.data.batches import shift_labels
from egad.losses.divergences import DIVERGENCES
from egad.losses.features import FeatureProjector, layer_map
from egad.objective.compose import ObjectiveOutput, StudentOutputs, distillation_loss
from egad.plan.entropy import fit_quantile_knots, token_entropy
from egad.plan.entropy_stream import EmaEntropyHistogram, EntropyQuantileCalibrator
from egad.teacher.signal import DenseSignal

__version__ = "0.1.0"

__all__ = [
    "DIVERGENCES",
    "PRESETS",
    "ConfigError",
    "DenseSignal",
    "EmaEntropyHistogram",
    "EntropyQuantileCalibrator",
    "FeatureProjector",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "StudentOutputs",
    "distillation_loss",
    "fit_quantile_knots",
    "layer_map",
    "preset",
    "shift_labels",
    "token_entropy",
]
