"""What a causal LM's forward applies after its last hidden state, so that the fused loss reproduces the model's own
logits chunk by chunk, or refuses.

transformers models do not all compute `logits = hidden @ W^T`. The transforms of the installed model types, read
from the (text) config; each name below is what that model's forward reads:

* a bias on the head: taken from the head module itself (Phi, GPT-J, CodeGen, CTRL, GIT; Ernie 4.5 MoE `use_bias`,
  PhiMoE and ZAYA `lm_head_bias`);
* the hidden state scaled before the head: MiniCPM3 divides it by `logits_scaling`, a config property equal to
  hidden_size / `dim_model_base`; Inkling divides it by `logits_mup_width_multiplier`;
* the logits scaled: Cohere multiplies by `logit_scale`, Falcon-H1 by `lm_head_multiplier`; Granite divides by
  `logits_scaling`, while HyperCLOVAX, whose config is Granite's, multiplies by it;
* soft-capping, `cap * tanh(logits / cap)`: `final_logit_softcapping` (Gemma 2 and later, VaultGemma, nanochat, Beam,
  Inkling 2), `logits_soft_cap` (RecurrentGemma), `output_logit_soft_cap` (xLSTM).

`output_head(model)` collects them into an `OutputHead`, and `check_output_head` refuses, with an error that names
the model type and the fix, a head module with its own forward (Dory's learned per-token scale) and any head whose
logits differ from the model's own on a probe batch. The probe runs twice, the second time with the head's input
amplified: a freshly initialised model's logits are small, where a soft-cap nobody read is invisible, but training
makes them large. An attribute that a forward ignores (Gemma3ForConditionalGeneration skips its text config's
soft-cap, transformers' MPT its `logit_scale`) is still applied, so such a model is refused rather than mis-computed.
TRL shipped this bug once (its chunked loss ignored `logit_scale` and soft-capping); the probe is what keeps a new
model type from repeating it silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from egad.errors import EgadError

# Config attributes of a final soft-cap, each applied as cap * tanh(logits / cap).
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# Model types whose `logits_scaling` multiplies the logits: HyperCLOVAX reuses Granite's config, which divides.
_LOGITS_SCALING_MULTIPLIES = frozenset({"hyperclovax"})
# The probe's head input is amplified until its largest logit is about this (trained models' logits reach tens).
_PROBE_LOGIT = 64.0


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


def _text_config(config):
    """The config the language model reads; a config with several text parts (MusicGen) is taken as it is."""
    try:
        return config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:
        return config


def output_head(model) -> OutputHead:
    """The head of `model` as the config describes it (see the module docstring); check it with
    `check_output_head` before trusting it."""
    text = _text_config(model.config)
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise HeadError(
            f"{type(model).__name__} ({model.config.model_type}) has no linear output head; set "
            "train.fused_lm_head: false"
        )
    hidden_scale, logit_scale = 1.0, 1.0
    base, width = _number(text, "dim_model_base"), _number(text, "hidden_size")
    if base and width and getattr(text, "scale_width", True):
        # MiniCPM: lm_head(hidden / (hidden_size / dim_model_base)); MiniCPM3's `logits_scaling` is that same ratio
        # (a property), so it is not read again below.
        hidden_scale = base / width
    elif scaling := _number(text, "logits_scaling"):
        logit_scale = scaling if text.model_type in _LOGITS_SCALING_MULTIPLIES else 1.0 / scaling
    if mup := _number(text, "logits_mup_width_multiplier"):
        hidden_scale /= mup
    for name in ("logit_scale", "lm_head_multiplier"):
        value = _number(text, name)
        if value is not None:
            logit_scale *= value
    softcap = next((cap for name in _SOFTCAPS if (cap := _number(text, name))), None)
    return OutputHead(head.weight, getattr(head, "bias", None), hidden_scale, logit_scale, softcap)


def decoder_hidden(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The last hidden state that the model's head reads (after the final norm). (B, L, d)"""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    if decoder is model:
        # get_decoder() falls back to the model itself when base_model_prefix names no module (Llama 4 keeps its
        # decoder in `model` but names it `language_model`); the model itself would return logits.
        decoder = getattr(model, "model", None)
        if not isinstance(decoder, nn.Module):
            raise HeadError(f"{model.config.model_type}: no decoder module found; set train.fused_lm_head: false")
    return decoder(input_ids=input_ids, attention_mask=attention_mask)[0]


def _model_logits(model, module: nn.Module, ids: Tensor, mask: Tensor, gain: float) -> Tensor:
    """The model's own logits with the head module's input multiplied by `gain`."""
    hook = module.register_forward_pre_hook(lambda _m, args: (args[0] * gain, *args[1:])) if gain != 1.0 else None
    try:
        return model(input_ids=ids, attention_mask=mask).logits
    finally:
        if hook is not None:
            hook.remove()


@torch.no_grad()
def check_output_head(model, head: OutputHead, *, vocab: int, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """Run the model on a small probe batch and require head(decoder hidden) to equal its own logits, at the model's
    scale and amplified (see the module docstring). Autocast is off; a 16-bit head is compared to its resolution."""
    kind = model.config.model_type
    module = model.get_output_embeddings()
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        raise HeadError(
            f"{kind}: its output head is a {type(module).__name__} with a forward of its own, which the fused loss "
            "would skip; set train.fused_lm_head: false"
        )
    device, dtype = head.weight.device, head.weight.dtype
    # A 16-bit head rounds each logit to its own resolution, relative to the largest one.
    resolution = 2 * torch.finfo(dtype).eps if torch.finfo(dtype).bits < 32 else 0.0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 7), generator=g).to(device)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            hidden = decoder_hidden(model, ids, mask).to(dtype)
            gain = 1.0
            for _ in range(2):
                want = _model_logits(model, module, ids, mask, gain)[..., :vocab].float()
                got = head.logits(hidden * gain, vocab).float()
                _compare(kind, got, want, gain, atol, rtol, resolution)
                peak = want.abs().max().item()
                if not 0.0 < peak < _PROBE_LOGIT:
                    break
                gain = _PROBE_LOGIT / peak
    except HeadError:
        raise
    except Exception as e:  # a model whose decoder cannot be called alone
        raise HeadError(
            f"{kind}: the fused loss cannot reach the last hidden state ({e}); set train.fused_lm_head: false"
        ) from None
    finally:
        model.train(was_training)


def _compare(kind: str, got: Tensor, want: Tensor, gain: float, atol: float, rtol: float, resolution: float) -> None:
    if got.shape == want.shape:
        peak = want.abs().max().item()
        if torch.allclose(got, want, atol=max(atol, resolution * peak), rtol=max(rtol, resolution)):
            return
    diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    raise HeadError(
        f"{kind}: the fused loss does not reproduce this model's logits (max difference {diff:.3g} on a probe batch, "
        f"head input x{gain:.3g}): its forward applies something after the last hidden state that egad does not "
        "know. Set train.fused_lm_head: false"
    )


__all__ = ["HeadError", "OutputHead", "check_output_head", "decoder_hidden", "output_head"]
