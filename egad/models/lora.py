"""LoRA students through peft: adapters on the student's linear layers, the rest frozen; the feature projections
are trained as usual. A checkpoint holds the merged model (what `from_pretrained` and `egad eval` read) and the
adapter alone in `adapter/` (what `PeftModel.from_pretrained(base, path / "adapter")` reads)."""

from __future__ import annotations

import copy

from egad.config.run_config import LORA_DEFAULTS
from egad.models.load import ModelError


def add_lora(model, spec: dict):
    """`model` wrapped by peft with LoRA adapters as `spec` (model.lora) asks; only the adapters require grad."""
    try:
        import peft
    except ImportError:
        raise ModelError("model.lora needs the peft package: pip install 'egad[lora]'") from None
    s = {**LORA_DEFAULTS, **spec}
    config = peft.LoraConfig(
        r=int(s["r"]),
        lora_alpha=float(s["alpha"]),
        lora_dropout=float(s["dropout"]),
        target_modules=s["target_modules"],
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules that the model does not have
        raise ModelError(f"model.lora={spec}: {e}") from None


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged_copy(model):
    """A plain model with the adapters merged in; the trained model keeps its adapters (training goes on)."""
    return copy.deepcopy(model).merge_and_unload()


__all__ = ["add_lora", "is_lora", "merged_copy"]
