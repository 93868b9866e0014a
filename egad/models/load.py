"""Load teacher, student and tokenizer; check that they agree; capture the hidden states of mapped layers.

Hidden-state convention: feature layer m >= 1 is the output of decoder block m (the pre-norm residual stream), and
m = 0 the embedding output, for teacher and student alike. (HF's `hidden_states[-1]` is taken after the final norm
while the others are not; forward hooks on the blocks avoid that mismatch and avoid keeping every layer.)
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from egad.errors import EgadError
from egad.models.model_files import load_error, resolve_model_source
from egad.paths import cache_root

log = logging.getLogger("egad.models.load")

_PROBE = 'Distillation probe: héllo wörld 12345 <tag> {"k": [1, 2]}\n\tdone.'


class ModelError(EgadError):
    """Models or tokenizers that cannot be used together; the message says why and what to do."""


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """'auto' is bfloat16 on CUDA and float32 elsewhere (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_model(
    source: str | None,
    config: dict | None,
    *,
    dtype: torch.dtype,
    tokenizer=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> PreTrainedModel:
    """`from_pretrained(source)` (an HF folder, hub id, GGUF file or shortcut: egad.models.model_files), or
    `from_config` with random weights from a config dict (needs `model_type`)."""
    if source:
        resolved = resolve_model_source(source)
        try:
            return AutoModelForCausalLM.from_pretrained(
                resolved, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as e:  # a hub id that does not exist or cannot be reached, a folder with no model
            raise load_error(source, e) from None
    if not config or "model_type" not in config:
        raise ModelError("a model built from a config needs `model_type` (e.g. qwen2, llama) in its config dict")
    kwargs = dict(config)
    model_type = kwargs.pop("model_type")
    if tokenizer is not None:
        kwargs.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if getattr(tokenizer, name, None) is not None:
                kwargs.setdefault(name, getattr(tokenizer, name))
    cfg = AutoConfig.for_model(model_type, **kwargs)
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def try_load_tokenizer(source: str | None, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer stored with a model, or None when the source has none."""
    if not source:
        return None
    source = resolve_model_source(source)
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        log.info("no tokenizer found at %s (%s)", source, err)
        return None


def check_tokenizers(a, b, name_a: str = "teacher", name_b: str = "student") -> None:
    """Distillation compares distributions over the same token ids: vocabularies, special tokens and the encoding of
    a probe text must agree (a mere size match is not enough)."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:5]
        diff_id = next((t for t in va if t in vb and va[t] != vb[t]), None)
        detail = f"e.g. {only_a} only in the {name_a}'s" if only_a else f"token {diff_id!r} has different ids"
        raise ModelError(
            f"the {name_a} and {name_b} tokenizers differ ({len(va)} vs {len(vb)} entries; {detail}). "
            "Token-level distillation needs one shared tokenizer: pick models of the same family."
        )
    for attr in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            raise ModelError(f"{attr} differs: {name_a} {getattr(a, attr, None)} vs {name_b} {getattr(b, attr, None)}")
    if a(_PROBE, add_special_tokens=False)["input_ids"] != b(_PROBE, add_special_tokens=False)["input_ids"]:
        raise ModelError(
            f"the {name_a} and {name_b} tokenizers encode the same text differently (normaliser or "
            "pre-tokenizer differ); use one tokenizer for both"
        )


def check_tokenizer_roundtrip(tokenizer, model: PreTrainedModel) -> None:
    """Save the tokenizer beside the model's config and reload it with AutoTokenizer, as users of our checkpoints
    will. Some model types make AutoTokenizer rebuild a different pipeline from the saved vocabulary (seen with a
    byte-level BPE beside a qwen2 config in transformers 5.x); that would silently change every token id."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoTokenizer.from_pretrained(tmp)
    if (
        reloaded(_PROBE, add_special_tokens=False)["input_ids"]
        != tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    ):
        raise ModelError(
            f"AutoTokenizer reloads this tokenizer as {type(reloaded).__name__} next to a "
            f"{model.config.model_type!r} config and encodes text differently, so saved checkpoints would not "
            "round-trip. Use a model_type whose tokenizer mapping is generic (e.g. llama) for from-scratch models, "
            "or the model family's own tokenizer."
        )


def shared_vocab(tokenizer, *models: PreTrainedModel) -> int:
    """V = len(tokenizer); every model must have at least that many logit rows (extra rows are padding)."""
    vocab = len(tokenizer)
    for m in models:
        rows = m.get_output_embeddings().weight.shape[0]
        if rows < vocab:
            raise ModelError(
                f"{type(m).__name__} has {rows} logit rows but the tokenizer has {vocab} tokens: "
                "the tokenizer does not belong to this model"
            )
    return vocab


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Teacher mode: eval (no dropout), no gradients, its own dtype."""
    model.eval()
    model.requires_grad_(False)
    return model


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (Llama/Qwen/Mistral/Gemma `model.layers`, GPT-2 `h`, ...)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for attr in ("layers", "h", "blocks"):
        layers = getattr(base, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ModelError(f"cannot find the decoder blocks of {type(model).__name__}; feature distillation needs them")


def even_layers(n_teacher: int, n_keep: int) -> list[int]:
    """`n_keep` evenly spaced 0-based layers of `n_teacher`, the first and the last kept (one layer: the first)."""
    if not 1 <= n_keep <= n_teacher:
        raise ModelError(f"cannot keep {n_keep} of the teacher's {n_teacher} layers: choose 1 to {n_teacher}")
    if n_keep == 1:
        return [0]
    return [int(math.floor(i * (n_teacher - 1) / (n_keep - 1) + 0.5)) for i in range(n_keep)]


def cut_layers(spec: int | list[int], n_teacher: int) -> list[int]:
    """The 0-based teacher layers a `model.student_cut` spec keeps: a count (evenly spaced) or explicit indices."""
    if isinstance(spec, int):
        return even_layers(n_teacher, spec)
    layers = [int(i) for i in spec]
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= n_teacher:
        raise ModelError(
            f"model.student_cut={spec!r}: need increasing, distinct 0-based layer indices below {n_teacher}"
        )
    return layers


def cut_student(teacher: PreTrainedModel, layers: list[int], *, dtype: torch.dtype) -> PreTrainedModel:
    """A depth-pruned copy of the teacher (Minitron, DistilBERT): the given decoder layers, in order, plus every
    weight outside the decoder blocks (embeddings, final norm, head). Built from the teacher's config with fewer
    layers (per-layer config lists such as `layer_types` follow the kept layers), so layer indices, caches and
    `save_pretrained` behave as for any model of that type. The config records `egad_cut` = {teacher_layers, layers}
    so that the feature map follows the copied layers."""
    blocks = decoder_layers(teacher)
    n_teacher = len(blocks)
    layers = cut_layers(layers, n_teacher)
    prefix = next(name for name, mod in teacher.named_modules() if mod is blocks)
    fields = teacher.config.to_dict()
    for key, value in fields.items():
        if isinstance(value, list) and len(value) == n_teacher and key != "egad_cut":
            fields[key] = [value[i] for i in layers]
    fields.update(num_hidden_layers=len(layers), egad_cut={"teacher_layers": n_teacher, "layers": layers})
    fields.pop("_name_or_path", None)
    config = type(teacher.config).from_dict(fields)
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    position = {t: s for s, t in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(index) in position:
                state[f"{prefix}.{position[int(index)]}.{rest}"] = value
        else:
            state[key] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ModelError(
            f"cutting {type(teacher).__name__}: missing {sorted(set(missing) - tied)}, unexpected {unexpected}"
        )
    student.generation_config = teacher.generation_config
    return student


def copied_layers(student: PreTrainedModel, n_teacher: int) -> list[int] | None:
    """The teacher layers a cut student's blocks were copied from, or None when it was not cut from a teacher of
    `n_teacher` layers (then the feature map is the plain uniform one)."""
    cut = getattr(student.config, "egad_cut", None)
    if not isinstance(cut, dict) or cut.get("teacher_layers") != n_teacher:
        return None
    layers = list(cut.get("layers") or [])
    return layers if len(layers) == len(decoder_layers(student)) else None


def model_dims(model: PreTrainedModel) -> tuple[int, int]:
    """(number of layers, hidden size)."""
    return len(decoder_layers(model)), model.get_input_embeddings().weight.shape[1]


@contextlib.contextmanager
def capture_hidden(model: PreTrainedModel, layers: list[int]) -> Iterator[list[Tensor]]:
    """Collect the outputs of the given layers (see the module docstring) during one forward. Yields a list filled
    in `layers` order once the forward has run."""
    if not layers:
        yield []
        return
    blocks = decoder_layers(model)
    slots: dict[int, Tensor] = {}
    handles = []
    for m in sorted(set(layers)):
        module = model.get_input_embeddings() if m == 0 else blocks[m - 1]

        def hook(_mod, _inp, out, m=m):
            slots[m] = out[0] if isinstance(out, tuple) else out

        handles.append(module.register_forward_hook(hook))
    result: list[Tensor] = []
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    missing = [m for m in layers if m not in slots]
    if missing and slots:
        raise ModelError(f"layers {missing} produced no output during the forward")
    result.extend(slots[m] for m in layers if m in slots)


def tokenizer_name(tok) -> str:
    return getattr(tok, "name_or_path", "") or type(tok).__name__


def resolve_tokenizer(model_cfg, data_cfg, *, cross: bool = False):
    """The run's tokenizer: model.tokenizer, else the student's, else the teacher's, else a BPE trained on the
    training data (model.train_tokenizer). Every tokenizer found beside a model must agree with it, the teacher's
    (or model.teacher_tokenizer) too unless `cross` (objective.cross_vocab: the teacher keeps its own)."""
    m = model_cfg
    found = {
        side: try_load_tokenizer(src, m.revision, m.trust_remote_code)
        for side, src in (("tokenizer", m.tokenizer), ("student", m.student), ("teacher", m.teacher))
    }
    if getattr(m, "teacher_tokenizer", None):
        found["teacher"] = try_load_tokenizer(m.teacher_tokenizer, m.revision, m.trust_remote_code)
        if found["teacher"] is None:
            raise ModelError(f"model.teacher_tokenizer={m.teacher_tokenizer!r} could not be loaded")
    if m.tokenizer and found["tokenizer"] is None:
        raise ModelError(f"model.tokenizer={m.tokenizer!r} could not be loaded")
    # Across tokenizers the teacher's is its own, never the student's default.
    tok = found["tokenizer"] or found["student"] or (None if cross else found["teacher"])
    if tok is None:
        if not m.train_tokenizer:
            tried = [f"model.{side}={src!r}" for side, src in (("student", m.student), ("teacher", m.teacher)) if src]
            where = f" (none could be loaded from {', '.join(tried)})" if tried else ""
            raise ModelError(
                f"no tokenizer{where}: set model.tokenizer, load a model that has one, or set "
                "model.train_tokenizer: {vocab_size: 4096} to train a BPE on the training data"
            )
        tok = _train_tokenizer(m.train_tokenizer, data_cfg)
    if found["student"] is not None and found["student"] is not tok:
        check_tokenizers(found["student"], tok, "student", "run")
    if found["teacher"] is not None and found["teacher"] is not tok and not cross:
        try:
            check_tokenizers(found["teacher"], tok, "teacher", "run")
        except ModelError as e:
            raise ModelError(
                f"{e} The teacher's tokenizer is {tokenizer_name(found['teacher'])!r}, the run's (student's) "
                f"{tokenizer_name(tok)!r}. To distil across tokenizers set objective.cross_vocab to exact, uld or "
                "hybrid"
            ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _train_tokenizer(spec: dict, data_cfg):
    from pathlib import Path

    from egad.data import batches as D
    from egad.models.tokenizer import cached_bpe_tokenizer

    n, vocab = int(spec.get("examples", 20000)), int(spec.get("vocab_size", 4096))
    records, _ = D.load_records(data_cfg.train, data_cfg.train_split, max_examples=n)
    fp = D.fingerprint([data_cfg.train, data_cfg.train_split, n, vocab])
    cache = Path(spec.get("cache_dir", cache_root() / "tokenizers"))
    return cached_bpe_tokenizer(lambda: D.texts_for_tokenizer(records), vocab, cache, fp)
