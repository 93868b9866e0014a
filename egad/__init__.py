"""egad: Entropy-Guided Adaptive Distillation for LLMs. The public API."""

from egad.config import ConfigError, ObjectiveConfig
from egad.entropy import EmaEntropyHistogram, EntropyQuantileCalibrator, fit_quantile_knots, token_entropy
from egad.losses.divergences import DIVERGENCES
from egad.losses.features import FeatureProjector, layer_map
from egad.objective import ObjectiveOutput, StudentOutputs, distillation_loss, shift_labels
from egad.presets import PRESETS, preset
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
