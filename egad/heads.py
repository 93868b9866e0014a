"""What a causal LM's forward applies after its last hidden state, so that the fused loss reproduces the model's own
logits chunk by chunk, or refuses.

transformers models do not all compute `logits = hidden @ W^T`. Known transforms, read from the config:

* a bias on the head (e.g. GPT-J, Phi);
* a scale on the hidden state before the head (MiniCPM: hidden / (hidden_size / dim_model_base));
* a scale on the logits (Cohere: `logit_scale`; Granite: 1 / `logits_scaling`; Falcon-H1: `lm_head_multiplier`);
* final-logit soft-capping, `cap * tanh(logits / cap)` (Gemma 2 and later: `final_logit_softcapping`).

`output_head(model)` collects them into an `OutputHead`, and `check_output_head` runs the model once on a probe
batch and compares: a head that does anything else is refused with an error that names the model type and the fix.
TRL shipped this bug once (its chunked loss ignored `logit_scale` and soft-capping); the probe is what keeps a new
model type from repeating it silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from egad.errors import EgadError


class HeadError(EgadError):
    """The fused path cannot reproduce a model's logits; the message names the model type and the fix."""


@dataclass
class OutputHead:
    """logits = softcap(((hidden * hidden_scale) @ weight^T + bias) * logit_scale)."""

    weight: Tensor  # (V_rows, d)
    bias: Tensor | None = None  # (V_rows,)
    hidden_scale: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    def linear(self, hidden: Tensor, vocab: int) -> Tensor:
        """(hidden * hidden_scale) @ weight[:vocab]^T, the part that carries the weight gradient. (C, vocab)"""
        x = hidden * self.hidden_scale if self.hidden_scale != 1.0 else hidden
        return x @ self.weight[:vocab].t()

    def finish(self, linear: Tensor, vocab: int) -> Tensor:
        """The rest of the head on `linear`'s output: bias, logit scale, soft-cap (differentiable)."""
        z = linear if self.bias is None else linear + self.bias[:vocab]
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def logits(self, hidden: Tensor, vocab: int | None = None) -> Tensor:
        vocab = self.rows if vocab is None else vocab
        return self.finish(self.linear(hidden, vocab), vocab)


def _number(config, name: str) -> float | None:
    value = getattr(config, name, None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def output_head(model) -> OutputHead:
    """The head of `model` as the config describes it (see the module docstring); check it with
    `check_output_head` before trusting it."""
    config = model.config
    text = getattr(config, "get_text_config", lambda: config)()
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise HeadError(
            f"{type(model).__name__} ({text.model_type}) has no linear output head; set train.fused_lm_head: false"
        )
    hidden_scale, logit_scale = 1.0, 1.0
    base = _number(text, "dim_model_base")
    if base and _number(text, "hidden_size") and getattr(text, "scale_width", True):
        hidden_scale = base / float(text.hidden_size)  # MiniCPM: lm_head(hidden / (hidden_size / dim_model_base))
    for name in ("logit_scale", "lm_head_multiplier", "output_multiplier_scale"):
        value = _number(text, name)
        if value is not None:
            logit_scale *= value
    scaling = _number(text, "logits_scaling")
    if scaling:
        logit_scale /= scaling  # Granite divides its logits
    softcap = _number(text, "final_logit_softcapping")
    return OutputHead(head.weight, getattr(head, "bias", None), hidden_scale, logit_scale, softcap or None)


def decoder_hidden(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The last hidden state that the model's head reads (after the final norm). (B, L, d)"""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    return decoder(input_ids=input_ids, attention_mask=attention_mask)[0]


@torch.no_grad()
def check_output_head(model, head: OutputHead, *, vocab: int, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """Run the model on a small probe batch and require head(decoder hidden) to equal its own logits (fp32)."""
    device = head.weight.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 7), generator=g).to(device)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            want = model(input_ids=ids, attention_mask=mask).logits[..., :vocab].float()
            got = head.logits(decoder_hidden(model, ids, mask).float(), vocab).float()
    except Exception as e:  # a model whose decoder cannot be called alone
        raise HeadError(
            f"{model.config.model_type}: the fused loss cannot reach the last hidden state ({e}); set "
            "train.fused_lm_head: false"
        ) from None
    finally:
        model.train(was_training)
    diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    if not (got.shape == want.shape and torch.allclose(got, want, atol=atol, rtol=rtol)):
        raise HeadError(
            f"{model.config.model_type}: the fused loss does not reproduce this model's logits (max difference "
            f"{diff:.3g} on a probe batch): its forward applies something after the last hidden state that egad does "
            "not know. Set train.fused_lm_head: false"
        )


__all__ = ["HeadError", "OutputHead", "check_output_head", "decoder_hidden", "output_head"]
