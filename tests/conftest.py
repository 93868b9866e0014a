"""Shared fixtures: the real data folder and a small BPE tokenizer trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DOLLY = DATA / "dolly" / "dolly.jsonl"


@pytest.fixture(params=["eager", "compiled"])
def kernel_mode(request):
    """A loss test that takes it runs on the eager passes and on the compiled kernels (egad.losses.kernels)."""
    from egad.losses import kernels

    with kernels.using(request.param):
        yield request.param


@pytest.fixture(scope="session")
def dolly_path() -> Path:
    if not DOLLY.is_file():
        pytest.skip(f"{DOLLY} is missing (the shared data folder sits beside the repository)")
    return DOLLY


@pytest.fixture(scope="session")
def egad_cache_dir(tmp_path_factory) -> Path:
    """A session-wide EGAD_CACHE_DIR, so the quick demo and the quick study share one tokenizer and teacher."""
    return tmp_path_factory.mktemp("egad-cache")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, dolly_path) -> Path:
    """A 512-entry byte-level BPE trained on 1,500 Dolly train records, saved as a HF tokenizer folder."""
    from egad.data import batches as D
    from egad.models.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok")
    records, _ = D.load_records(dolly_path, "train", max_examples=1500)
    train_bpe_tokenizer(D.texts_for_tokenizer(records), 512, out)
    return out


@pytest.fixture(scope="session")
def teacher_tok_dir(tmp_path_factory, dolly_path) -> Path:
    """A second, 400-entry BPE trained on 300 Dolly dev records: a teacher tokenizer other than the student's."""
    from egad.data import batches as D
    from egad.models.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("teacher-tok")
    records, _ = D.load_records(dolly_path, "dev", max_examples=300)
    train_bpe_tokenizer(D.texts_for_tokenizer(records), 400, out)
    return out


def tiny_run_overrides(tok_dir: Path, out_dir: Path, **extra) -> dict:
    """Overrides that turn configs/tiny.yaml into a ~10 s run for tests."""
    o = {
        "model.tokenizer": str(tok_dir),
        "model.train_tokenizer": None,
        "model.teacher_config": {
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 256,
            "tie_word_embeddings": True,
        },
        "model.student_config": {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 256,
            "tie_word_embeddings": True,
        },
        "data.train": str(DOLLY),
        "data.dev": str(DOLLY),
        "data.max_train_examples": 400,
        "data.max_dev_examples": 48,
        "data.max_prompt_len": 64,
        "data.max_len": 128,
        "train.output_dir": str(out_dir),
        "train.per_device_batch_size": 8,
        "train.calib_examples": 64,
        "train.log_every": 2,
        "train.tensorboard": False,
    }
    o.update(extra)
    return o


def plan_state(teacher_logits, student_logits, num_knots: int = 101, **kw):
    """A PlanState whose CDFs (teacher entropy, student entropy, Hellinger) are fitted on these logits themselves:
    what a test needs to run presets that rank tokens by a student-side signal."""
    import torch

    from egad.losses.divergences import hellinger_from_logprobs
    from egad.objective.token_plan import PlanState
    from egad.plan.entropy import fit_quantile_knots, token_entropy

    v = min(teacher_logits.shape[-1], student_logits.shape[-1])  # the shared vocabulary: padded rows sliced away
    zt = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])[:, :v].float()
    zs = student_logits.detach().reshape(-1, student_logits.shape[-1])[:, :v].float()
    with torch.no_grad():
        hel = hellinger_from_logprobs(zs.log_softmax(-1), zt.log_softmax(-1))
        return PlanState(
            knots=fit_quantile_knots(token_entropy(zt), num_knots),
            student_knots=fit_quantile_knots(token_entropy(zs), num_knots),
            hellinger_knots=fit_quantile_knots(hel, num_knots),
            **kw,
        )
