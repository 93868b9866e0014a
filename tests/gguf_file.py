"""Writes a tiny Llama GGUF file with the `gguf` package's own writer, laid out the way llama.cpp lays one out.

The tests of `egad.models.model_files` need a GGUF file that loads in transformers, quickly and without the network.
This writes one from random weights and a byte-level BPE tokenizer folder: the llama.cpp metadata keys transformers maps
onto a LlamaConfig, the tokenizer as `tokenizer.ggml.*` arrays, and tensors under llama.cpp's names, q and k permuted
as llama.cpp permutes them, norms in F32 and the matrices in a llama.cpp-like mix of Q8_0, Q4_0, Q4_1 and F16, so that
loading it really de-quantises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|endoftext|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyLlama:
    """The shape of the model in the file."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    context: int = 256
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class WrittenGGUF:
    """The file, and what a loader should find in it."""

    path: Path
    # HF parameter name -> the float32 values a correct loader produces: the stored values de-quantised (with the
    # gguf package's own de-quantiser) and q/k un-permuted.
    expected: dict[str, np.ndarray]
    # HF parameter name -> the ggml type it is stored in ("Q8_0", "F32", ...)
    types: dict[str, str]


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py, LlamaModel.permute): rotary pairs interleaved."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """The inverse of `_permute`."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(tokenizer_dir: Path) -> dict:
    """Vocabulary (in id order), token types, merges and special ids of a HF byte-level BPE tokenizer.json."""
    spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    if model["type"] != "BPE":
        raise ValueError(f"{tokenizer_dir}: a {model['type']} tokenizer, not the byte-level BPE this writer handles")
    vocab: dict[str, int] = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    if any(t is None for t in tokens):
        raise ValueError(f"{tokenizer_dir}: token ids are not contiguous")
    special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {
        "tokens": tokens,
        "special": special,
        "merges": merges,
        "bos": vocab[config["bos_token"]],
        "eos": vocab[config["eos_token"]],
        "pad": vocab[config["pad_token"]],
    }


def write_tiny_llama_gguf(
    path: str | Path,
    tokenizer_dir: str | Path,
    *,
    seed: int = 0,
    shape: TinyLlama | None = None,
    tie_embeddings: bool = False,
    chat_template: str | None = CHAT_TEMPLATE,
) -> WrittenGGUF:
    """Write a Llama GGUF file with random weights and the tokenizer of `tokenizer_dir`; return what is in it. The
    test that asks for one is skipped where the gguf extra is not installed."""
    gguf = pytest.importorskip("gguf", reason="writing a GGUF file needs the gguf extra: pip install -e '.[gguf]'")
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    shape = shape or TinyLlama()
    path = Path(path)
    tok = _tokenizer_metadata(Path(tokenizer_dir))
    vocab_size = len(tok["tokens"])
    rng = np.random.default_rng(seed)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("egad tiny llama")
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.intermediate)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_vocab_size(vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tok["tokens"])
    w.add_token_types([gguf.TokenType.CONTROL if t in tok["special"] else gguf.TokenType.NORMAL for t in tok["tokens"]])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_pad_token_id(tok["pad"])
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    expected: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}

    def add(gguf_name: str, hf_name: str, value: np.ndarray, qtype: Q, heads: tuple[int, int] | None = None) -> None:
        value = value.astype(np.float32)
        stored = _permute(value, *heads) if heads else value
        data = quantize(stored, qtype)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(gguf_name, data)
        else:
            w.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
        restored = dequantize(data, qtype).reshape(value.shape).astype(np.float32)
        expected[hf_name] = _unpermute(restored, *heads) if heads else restored
        types[hf_name] = qtype.name

    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0.0, 0.5 / np.sqrt(cols), size=(rows, cols))

    def norm(n: int) -> np.ndarray:
        return 1.0 + rng.normal(0.0, 0.1, size=n)

    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    add("token_embd.weight", "model.embed_tokens.weight", rng.normal(0.0, 1.0, size=(vocab_size, h)), Q.Q8_0)
    for i in range(shape.layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", norm(h), Q.F32)
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", matrix(h, h), Q.Q8_0, (shape.heads, shape.heads))
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", matrix(kv, h), Q.Q8_0, (shape.heads, shape.kv_heads))
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", matrix(kv, h), Q.F16)
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", matrix(h, h), Q.Q4_0)
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", norm(h), Q.F32)
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", matrix(shape.intermediate, h), Q.Q4_1)
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", matrix(shape.intermediate, h), Q.Q4_1)
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", matrix(h, shape.intermediate), Q.Q8_0)
    add("output_norm.weight", "model.norm.weight", norm(h), Q.F32)
    if not tie_embeddings:  # llama.cpp writes `output.weight` only when it is not the embedding matrix
        add("output.weight", "lm_head.weight", matrix(vocab_size, h), Q.F16)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return WrittenGGUF(path, expected, types)
