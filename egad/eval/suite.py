"""`egad eval`: the MiniLLM evaluation protocol on named or file eval sets.

For each set: sampled generations over several seeds (temperature 1, top-p 1, top-k 0; seeds 10..50) scored by
ROUGE-L against the references (S-NI: max over its reference list), written as JSONL; and teacher-forced metrics on
the references: response NLL / perplexity, and with a teacher, KL(teacher || student) and top-1 agreement, broken
down by teacher-entropy decile.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from egad.config.schema import ConfigError
from egad.data import batches as D
from egad.eval.generate import generate_responses
from egad.eval.metrics import HiddenLogits, entropy_buckets, token_metrics
from egad.eval.rouge import rouge_l
from egad.models.heads import HeadError, check_output_head, decoder_hidden, output_head
from egad.models.load import check_tokenizers, shared_vocab
from egad.models.model_files import load_error, resolve_model_source

# name -> (file under the data dir, split filter)
EVAL_SETS: dict[str, tuple[str, str | None]] = {
    "dolly_test": ("dolly/dolly.jsonl", "test"),
    "dolly_dev": ("dolly/dolly.jsonl", "dev"),  # for teacher-forced dev NLL (model selection), not reported ROUGE
    "self_inst": ("eval/self_inst.jsonl", None),
    "vicuna": ("eval/vicuna.jsonl", None),
    "sinst": ("eval/sinst.jsonl", None),
    "uinst": ("eval/uinst.jsonl", None),
}
MINILLM_SEEDS = (10, 20, 30, 40, 50)


def resolve_eval_set(spec: str, data_dir: Path | None) -> tuple[str, Path, str | None]:
    """A set name (see EVAL_SETS) or a JSONL path -> (name, path, split)."""
    if spec in EVAL_SETS:
        if data_dir is None:
            raise ConfigError(f"eval set {spec!r} is read from the data dir: pass --data-dir or set $EGAD_DATA_DIR")
        rel, split = EVAL_SETS[spec]
        path = Path(data_dir) / rel
        if not path.is_file():
            raise ConfigError(f"eval set {spec!r}: {path} does not exist (check --data-dir)")
        return spec, path, split
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"eval set {spec!r} is neither a known name ({', '.join(EVAL_SETS)}) nor a JSONL file")
    return path.stem, path, None


@dataclass
class EvalSettings:
    """Generation and scoring settings; defaults are the MiniLLM protocol."""

    seeds: tuple[int, ...] = MINILLM_SEEDS
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_len: int = 256
    max_len: int = 512
    max_new_tokens: int | None = None
    batch_size: int = 16
    max_examples: int | None = None
    template: str = "alpaca"
    # "bf16": generation and scoring under bf16 autocast, 2x faster on the CPU; the dev NLL of SmolLM2-135M moved by
    # +0.0008 nats against fp32 (docs/benchmarks.md). The logits are upcast to fp32 before every softmax. Sampling is
    # seeded per prompt, but bf16 rounding depends on the batch's shape, so under bf16 a prompt's sample can still
    # depend on its batch-mates (egad.eval.generate); float32, or batch_size 1, keeps it a function of the prompt.
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        if self.template not in D.TEMPLATES:
            raise ConfigError(f"eval template={self.template!r} is not one of {list(D.TEMPLATES)}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"eval mixed_precision={self.mixed_precision!r} is not one of ['no', 'bf16']")


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """A model folder, hub id, GGUF file or shortcut (egad.models.model_files) and its tokenizer, in eval mode."""
    source = resolve_model_source(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:  # a hub id that does not exist or cannot be reached, a folder with no model
        raise load_error(path, e) from None
    return model.to(device).eval(), tokenizer


def _autocast(settings: EvalSettings, model) -> contextlib.AbstractContextManager:
    if settings.mixed_precision == "bf16":
        return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate_set(
    model, tokenizer, spec: str, settings: EvalSettings, *, data_dir: Path | None, out_dir: Path, teacher=None
) -> dict:
    """Generate, score and write one eval set; returns its summary (also written as summary.json). With no seeds
    (and not greedy) only the teacher-forced metrics are computed: the dev-NLL set."""
    name, path, split = resolve_eval_set(spec, data_dir)
    examples, _ = D.load_records(path, split, max_examples=settings.max_examples)
    prompts = [D.format_prompt(ex, settings.template, tokenizer) for ex in examples]
    set_dir = Path(out_dir) / name
    set_dir.mkdir(parents=True, exist_ok=True)
    seeds = (None,) if settings.greedy else settings.seeds
    per_seed: dict[str, float] = {}
    for seed in seeds:
        tag = "greedy" if seed is None else f"seed{seed}"
        if tag in per_seed:  # a repeated seed: sampling is seeded per prompt, so it gives the same generations
            continue
        with _autocast(settings, model):
            outputs = generate_responses(
                model,
                tokenizer,
                prompts,
                seed=seed,
                greedy=settings.greedy,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                max_prompt_len=settings.max_prompt_len,
                max_len=settings.max_len,
                max_new_tokens=settings.max_new_tokens,
                batch_size=settings.batch_size,
                desc=f"{name} seed {seed}",
                stop_ids=[D.end_of_turn_id(tokenizer, settings.template)],
            )
        scores = [rouge_l(o, ex.output) for o, ex in zip(outputs, examples, strict=True)]
        with (set_dir / f"generations-{tag}.jsonl").open("w") as f:
            for p, ex, o, sc in zip(prompts, examples, outputs, scores, strict=True):
                f.write(json.dumps({"prompt": p, "reference": ex.output, "output": o, "rouge_l": sc}) + "\n")
        per_seed[tag] = sum(scores) / max(len(scores), 1)
    vals = list(per_seed.values())
    summary = {"set": name, "examples": len(examples)}
    if vals:
        summary.update(
            rouge_l_mean=statistics.fmean(vals),
            rouge_l_std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
            rouge_l_per_seed=per_seed,
        )
    summary["settings"] = asdict(settings)
    with _autocast(settings, model):
        forced = teacher_forced(model, tokenizer, examples, settings, teacher=teacher)
    (set_dir / "nll-per-example.json").write_text(json.dumps(forced.pop("per_example")))
    summary.update(forced)
    (set_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def scorer(model, vocab: int):
    """batch -> the model's logits for teacher-forced scoring: its last hidden state and head when egad can reproduce
    the head (only response positions are then projected: the (B, L, V) logits never exist), else its logits."""
    try:
        head = output_head(model)
        check_output_head(model, head, vocab=vocab)
    except HeadError:
        return lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return lambda b: HiddenLogits(decoder_hidden(model, b["input_ids"], b["attention_mask"]), head)


@torch.no_grad()
def teacher_forced(model, tokenizer, examples, settings: EvalSettings, *, teacher=None) -> dict:
    """Response NLL / perplexity on the references; with a teacher, KL and top-1 agreement by entropy decile."""
    items, _ = D.tokenize_dataset(
        examples,
        tokenizer,
        template=settings.template,
        max_prompt_len=settings.max_prompt_len,
        max_len=settings.max_len,
    )
    models = [model] + ([teacher] if teacher is not None else [])
    vocab = shared_vocab(tokenizer, *models)
    device = next(model.parameters()).device
    score = scorer(model, vocab)
    score_t = scorer(teacher, vocab) if teacher is not None else None
    parts: dict[str, list[torch.Tensor]] = {}
    counts: list[int] = []  # response tokens per example, in order: token_metrics keeps row order
    for start in tqdm(range(0, len(items), settings.batch_size), desc="teacher-forced", leave=False):
        batch = {
            k: v.to(device)
            for k, v in D.collate(items[start : start + settings.batch_size], tokenizer.pad_token_id).items()
        }
        targets = D.shift_labels(batch["labels"])
        counts += (targets != -100).sum(-1).tolist()
        t_logits = score_t(batch) if teacher is not None else None
        tok = token_metrics(score(batch), targets, vocab_size=vocab, teacher_logits=t_logits)
        for k, v in tok.items():
            parts.setdefault(k, []).append(v)
    tokens = {k: torch.cat(v) for k, v in parts.items()}
    out = {"tokens": int(tokens["nll"].numel()), "nll": float(tokens["nll"].double().mean())}
    out["ppl"] = math.exp(min(out["nll"], 50))
    # Per-example sums make paired tests between models possible (same examples, same tokens).
    sums = [float(t.sum()) for t in torch.split(tokens["nll"].double(), counts)]
    out["per_example"] = {"nll_sum": sums, "tokens": counts}
    if teacher is not None:
        out.update(
            teacher_nll=float(tokens["teacher_nll"].double().mean()),
            kl=float(tokens["kl"].double().mean()),
            top1_agree=float(tokens["agree"].double().mean()),
            buckets=entropy_buckets(tokens),
        )
    return out


def run_eval(
    model_path: str | Path,
    sets: list[str],
    settings: EvalSettings,
    *,
    out_dir: str | Path,
    teacher_path: str | Path | None = None,
    data_dir: Path | None = None,
    device: str | None = None,
) -> dict:
    """Evaluate one model on several sets; writes <out_dir>/<set>/... and <out_dir>/summary.json."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for spec in (model_path, teacher_path):  # bad inputs are refused before any model is loaded
        resolve_model_source(spec)
    for name in sets:
        resolve_eval_set(name, data_dir)
    model, tokenizer = load_model(model_path, device)
    teacher = None
    if teacher_path is not None:
        teacher, t_tok = load_model(teacher_path, device)
        check_tokenizers(t_tok, tokenizer, "teacher", "model")
    out = Path(out_dir)
    results = {
        s: evaluate_set(model, tokenizer, s, settings, data_dir=data_dir, out_dir=out, teacher=teacher) for s in sets
    }
    merge_summary(out, results, model_path, teacher_path)
    return results


def merge_summary(
    out_dir: Path, sets: dict[str, dict], model_path: str | Path, teacher_path: str | Path | None
) -> dict:
    """Merge set summaries (their entropy buckets left out) into <out_dir>/summary.json, keeping the sets of earlier
    calls on the same folder, so sets can be evaluated in separate runs (e.g. with other sizes). Returns the merged
    summary."""
    path = Path(out_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {"sets": {}}
    summary.update(model=str(model_path), teacher=str(teacher_path) if teacher_path else None)
    summary["sets"].update({k: {kk: vv for kk, vv in v.items() if kk != "buckets"} for k, v in sets.items()})
    path.write_text(json.dumps(summary, indent=1))
    return summary


def set_summaries(out_dir: Path, names: list[str]) -> dict[str, dict]:
    """The summaries that `evaluate_set` wrote for `names` (<out_dir>/<set>/summary.json): each set's own record."""
    return {name: json.loads((Path(out_dir) / name / "summary.json").read_text()) for name in names}
