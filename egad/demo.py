"""`egad demo`: the whole job on a fresh machine, with no model downloads.

1. train a byte-level BPE tokenizer on Dolly train;
2. train a small teacher from scratch (SFT, cached: a second demo reuses it);
3. distil a smaller student three ways: SFT, KD (forward KL) and EGAD;
4. evaluate the students and the teacher (Dolly test500 ROUGE-L over sampling seeds, teacher-forced NLL, KL);
5. print the table and write the report and plots into one folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from egad import data as D
from egad.eval.report import write_report
from egad.eval.suite import EvalSettings, default_data_dir, run_eval
from egad.run_config import build_config
from egad.trainer import Trainer

HUB_DOLLY = "databricks/databricks-dolly-15k"


@dataclass(frozen=True)
class DemoSize:
    """Everything that differs between the full demo (about 20 min on 2 cores) and --quick (about 3 min)."""

    vocab: int
    teacher: dict
    student: dict
    teacher_steps: int
    student_steps: int
    batch: int
    max_prompt_len: int
    max_len: int
    dev_examples: int
    test_examples: int | None
    other_examples: int
    seeds: tuple[int, ...]
    max_new_tokens: int


def _llama(hidden: int, layers: int, heads: int) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 3 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    }


FULL = DemoSize(
    vocab=4096,
    teacher=_llama(192, 4, 4),
    student=_llama(96, 2, 2),
    teacher_steps=700,
    student_steps=250,
    batch=16,
    max_prompt_len=96,
    max_len=192,
    dev_examples=200,
    test_examples=None,
    other_examples=40,
    seeds=(10, 20, 30, 40, 50),
    max_new_tokens=96,
)
QUICK = DemoSize(
    vocab=1024,
    teacher=_llama(96, 2, 2),
    student=_llama(48, 1, 2),
    teacher_steps=120,
    student_steps=40,
    batch=16,
    max_prompt_len=96,
    max_len=160,
    dev_examples=64,
    test_examples=48,
    other_examples=0,
    seeds=(10,),
    max_new_tokens=24,
)


def resolve_dolly(data: str | None, out: Path) -> tuple[Path, Path | None]:
    """(Dolly JSONL with train/dev/test splits, eval data dir or None). Falls back to the hub dataset, split here
    deterministically into 1,000 dev, 500 test and the rest train."""
    data_dir = Path(data) if data else default_data_dir()
    if data_dir is not None and (data_dir / "dolly" / "dolly.jsonl").is_file():
        return data_dir / "dolly" / "dolly.jsonl", data_dir
    records, _ = D.load_records(HUB_DOLLY, "train")
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    path = out / "data" / "dolly.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for rank, i in enumerate(order):
            ex = records[i]
            split = "dev" if rank < 1000 else "test" if rank < 1500 else "train"
            f.write(
                json.dumps(
                    {"instruction": ex.instruction, "context": ex.input, "response": ex.response, "split": split}
                )
                + "\n"
            )
    return path, None


def _cache_root() -> Path:
    """Where the demo keeps its tokenizer and teacher between runs: $EGAD_CACHE_DIR/demo or ~/.cache/egad/demo."""
    return Path(os.environ.get("EGAD_CACHE_DIR", Path.home() / ".cache" / "egad")) / "demo"


def base_run(size: DemoSize, dolly: Path, out_dir: Path, tok_dir: Path) -> dict:
    return {
        "model": {"tokenizer": str(tok_dir)},
        "data": {
            "train": str(dolly),
            "dev": str(dolly),
            "max_prompt_len": size.max_prompt_len,
            "max_len": size.max_len,
            "max_dev_examples": size.dev_examples,
        },
        "train": {
            "output_dir": str(out_dir),
            "per_device_batch_size": size.batch,
            "lr": 2e-3,
            "warmup_ratio": 0.05,
            "log_every": 10,
            "eval_every": max(size.student_steps // 3, 10),
            "save_every": 0,
            "calib_examples": 512,
            "tensorboard": False,
        },
    }


def train_run(raw: dict, overrides: dict | None = None) -> Path:
    trainer = Trainer(build_config(raw, overrides)).setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer.out


def demo_tokenizer(size: DemoSize, dolly: Path) -> Path:
    from egad.tokenizer import cached_bpe_tokenizer

    records, _ = D.load_records(dolly, "train")
    fp = D.fingerprint([dolly, "train", size.vocab])
    tok = cached_bpe_tokenizer(lambda: D.texts_for_tokenizer(records), size.vocab, _cache_root() / "tokenizers", fp)
    return Path(tok.name_or_path)


def demo_teacher(size: DemoSize, dolly: Path, tok_dir: Path) -> Path:
    """SFT from scratch, cached by a fingerprint of everything that shapes it."""
    fp = D.fingerprint(
        [
            dolly,
            tok_dir.name,
            json.dumps(size.teacher, sort_keys=True),
            size.teacher_steps,
            size.batch,
            size.max_len,
            size.max_prompt_len,
        ]
    )[:12]
    run_dir = _cache_root() / f"teacher-{fp}"
    if (run_dir / "final" / "model.safetensors").is_file():
        print(f"[demo] reusing the cached teacher {run_dir}")
        return run_dir
    raw = base_run(size, dolly, run_dir, tok_dir)
    raw["model"]["student_config"] = size.teacher
    raw["objective"] = {"preset": "sft"}
    raw["train"].update(max_steps=size.teacher_steps, eval_every=max(size.teacher_steps // 4, 10))
    return train_run(raw)


def run_demo(out: str | Path = "runs/demo", *, data: str | None = None, quick: bool = False) -> str:
    size = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dolly, data_dir = resolve_dolly(data, out)
    print(f"[demo] data {dolly}; output {out}; {'quick' if quick else 'full'} size")
    tok_dir = demo_tokenizer(size, dolly)
    teacher_run = demo_teacher(size, dolly, tok_dir)
    shutil.copytree(teacher_run, out / "teacher", dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint-*"))
    runs = [out / "teacher"]
    for method in ("sft", "kd", "egad"):
        raw = base_run(size, dolly, out / method, tok_dir)
        raw["model"].update(student_config=size.student, teacher=str(teacher_run / "final"))
        raw["objective"] = {"preset": method, "feat_layers": 2}
        raw["train"]["max_steps"] = size.student_steps
        print(f"[demo] distilling the student with {method}")
        runs.append(train_run(raw))
    settings = EvalSettings(
        seeds=size.seeds,
        max_prompt_len=size.max_prompt_len,
        max_len=size.max_len,
        max_new_tokens=size.max_new_tokens,
        batch_size=32,
        max_examples=size.test_examples,
    )
    eval_dolly = data_dir if data_dir is not None else dolly.parent.parent
    for run in runs:
        print(f"[demo] evaluating {run.name}")
        run_eval(
            run / "final",
            ["dolly_test"],
            settings,
            out_dir=run / "eval",
            data_dir=eval_dolly,
            teacher_path=None if run.name == "teacher" else teacher_run / "final",
        )
        if size.other_examples and data_dir is not None:
            # A fast fixed subset of the other MiniLLM sets: the first N records, one seed.
            other = EvalSettings(**{**settings.__dict__, "max_examples": size.other_examples, "seeds": size.seeds[:1]})
            run_eval(
                run / "final", ["self_inst", "vicuna", "sinst", "uinst"], other, out_dir=run / "eval", data_dir=data_dir
            )
    table, plots = write_report(runs, out / "report")
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{table}\n\n[demo] report and {len(plots)} plots in {out / 'report'}; {minutes:.1f} min")
    return table
