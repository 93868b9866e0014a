"""One experiment: a scale -> the run config it yields -> train -> evaluate under the MiniLLM protocol.

The one place that knows how a run is set up, trained and cleaned up (`run_training`), how a model is scored
(`evaluate`: Dolly test ROUGE-L over sampling seeds plus fixed subsets of the other MiniLLM sets, teacher-forced NLL
and KL), where the data comes from (`resolve_dolly`) and how the from-scratch tokenizer and teacher are cached
between runs. `egad demo`, `egad study`, `egad train` and the benchmarks stand side by side on it.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from egad.config.run_config import RunConfig, build_config
from egad.config.schema import ConfigError
from egad.data import batches as D
from egad.data.records import DataError
from egad.eval.suite import EvalSettings, merge_summary, run_eval, set_summaries
from egad.paths import cache_root, default_data_dir
from egad.train.trainer import Trainer

HUB_DOLLY = "databricks/databricks-dolly-15k"
OTHER_SETS = ["self_inst", "vicuna", "sinst", "uinst"]


@dataclass(frozen=True)
class Scale:
    """Everything that differs between experiments of one protocol: model sizes, steps, lengths, evaluation subsets.

    `teacher`: a from-scratch config dict (`model_type` + HF config keys, trained here by SFT for `teacher_steps`), or
    a model (folder, hub id, .gguf file or shortcut). `student`: a from-scratch config, a model, or a cut of the
    teacher (a layer count or 0-based layer indices: `model.student_cut`). `run`: dotted run-config overrides for every
    run of this scale (train.lr, train.mixed_precision, ...), applied after the scale's own fields."""

    vocab: int
    teacher: dict | str
    student: dict | str | int | list
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
    feat_layers: int = 2
    template: str = "alpaca"
    train_examples: int | None = None
    test_kl: bool = True  # teacher-student KL on Dolly test (one more teacher pass per evaluated model)
    dev_every: int | None = None  # steps between a student's dev evaluations (its dev-NLL curve); None: at the end
    eval_precision: str | None = None  # the evaluation's autocast (no / bf16); None: as training
    run: dict = field(default_factory=dict)

    @property
    def mixed_precision(self) -> str:
        return str(self.run.get("train.mixed_precision", "no"))


SCALE_DIR = Path(__file__).parent / "scales"  # package data: an installed egad carries its scales


def read_scale(path: Path) -> Scale:
    """A scale file that gives every field of Scale (egad/scales/*.yaml)."""
    raw = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(Scale)}
    if set(raw) - known:
        raise ConfigError(f"{path}: unknown field(s) {sorted(set(raw) - known)}; expected {sorted(known)}")
    return Scale(**{**raw, "seeds": tuple(raw.get("seeds", ())), "run": dict(raw.get("run") or {})})


# The toy scale (a from-scratch teacher and a 4x smaller student), its miniature, and the real job on this machine
# (SmolLM2-135M-Instruct into a depth cut of itself): egad/scales/{toy,toy_quick,smollm2}.yaml.
SCALES = {p.stem: read_scale(p) for p in sorted(SCALE_DIR.glob("*.yaml"))}
TOY, TOY_QUICK, SMOLLM2 = SCALES["toy"], SCALES["toy_quick"], SCALES["smollm2"]


def load_scale(path: str | Path, base: Scale) -> Scale:
    """A scale file: `base:` names the scale to start from (toy, toy_quick, smollm2; default `base`), `size:` replaces
    its fields (a `student` string is a model, a mapping a from-scratch config, a number or list a cut of the teacher)
    and `run:` adds dotted run-config overrides for every run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"scale file {path} does not exist (see configs/study/ for examples)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys size and run")
    bad = set(raw) - {"size", "run", "base"}
    if "base" in raw:
        if raw["base"] not in SCALES:
            raise ConfigError(f"{path}: base={raw['base']!r} is not one of {sorted(SCALES)}")
        base = SCALES[raw["base"]]
    known = {f.name for f in fields(Scale)}
    bad |= {f"size.{k}" for k in set(raw.get("size") or {}) - known}
    if bad:
        raise ConfigError(f"{path}: unknown key(s) {sorted(bad)}; expected size.<{'|'.join(sorted(known))}> and run")
    size = dict(raw.get("size") or {})
    if "seeds" in size:
        size["seeds"] = tuple(size["seeds"])
    size["run"] = {**base.run, **dict(size.get("run") or {}), **dict(raw.get("run") or {})}
    return replace(base, **size)


def model_fields(side: str, model: dict | str | int | list) -> dict:
    """A scale's teacher or student as run-config model fields: a model, a from-scratch config, or a cut."""
    if isinstance(model, str):
        return {side: model}
    if isinstance(model, dict):
        return {f"{side}_config": model}
    return {"student_cut": model}


# -------------------------------------------------------------------------------------------------------------- data
def resolve_dolly(data: str | Path | None, out: Path) -> tuple[Path, Path]:
    """(Dolly JSONL with train/dev/test splits, the data dir that named eval sets are read from).

    From `data` (a folder holding dolly/dolly.jsonl), else $EGAD_DATA_DIR or ../shared/data, else the hub dataset,
    split here deterministically into 1,000 dev, 500 test and the rest train and written under `out`/data (which then
    holds no other MiniLLM sets: see `has_other_sets`)."""
    data_dir = Path(data) if data else default_data_dir()
    if data_dir is not None and (data_dir / "dolly" / "dolly.jsonl").is_file():
        return data_dir / "dolly" / "dolly.jsonl", data_dir
    if data:
        raise DataError(str(data), None, "holds no dolly/dolly.jsonl: pass the folder that holds dolly/ and eval/")
    root = out / "data"
    path = root / "dolly" / "dolly.jsonl"
    if path.is_file():
        return path, root
    records, _ = D.load_records(HUB_DOLLY, "train")
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for rank, i in enumerate(order):
            ex = records[i]
            split = "dev" if rank < 1000 else "test" if rank < 1500 else "train"
            row = {"instruction": ex.instruction, "context": ex.input, "response": ex.response, "split": split}
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path, root


def has_other_sets(data_dir: Path) -> bool:
    """True when the data dir holds the other MiniLLM eval sets (Self-Instruct, Vicuna, S-NI, UnNI)."""
    return all((data_dir / "eval" / f"{name}.jsonl").is_file() for name in OTHER_SETS)


# ------------------------------------------------------------------------------------------- cached toy components
def cached_tokenizer(scale: Scale, dolly: Path) -> Path:
    """A byte-level BPE of `scale.vocab` entries trained on Dolly train, trained once and cached."""
    from egad.models.tokenizer import cached_bpe_tokenizer

    records, _ = D.load_records(dolly, "train")
    fp = D.fingerprint([dolly, "train", scale.vocab])
    root = cache_root() / "demo" / "tokenizers"
    tok = cached_bpe_tokenizer(lambda: D.texts_for_tokenizer(records), scale.vocab, root, fp)
    return Path(tok.name_or_path)


def cached_teacher(scale: Scale, dolly: Path, tok_dir: Path) -> Path:
    """The scale's from-scratch teacher, trained by SFT once and cached by a fingerprint of everything that shapes
    it. Returns the run folder (the model is in final/)."""
    if isinstance(scale.teacher, str):
        raise ConfigError(f"scale.teacher={scale.teacher!r} is a model, not a from-scratch config: nothing to train")
    shape = [dolly, tok_dir.name, json.dumps(scale.teacher, sort_keys=True), scale.teacher_steps, scale.batch]
    fp = D.fingerprint(shape + [scale.max_len, scale.max_prompt_len])[:12]
    run_dir = cache_root() / "demo" / f"teacher-{fp}"
    if (run_dir / "final" / "model.safetensors").is_file():
        print(f"[egad] reusing the cached teacher {run_dir}")
        return run_dir
    raw = base_run(scale, dolly, run_dir, tok_dir)
    raw["model"]["student_config"] = scale.teacher
    raw["objective"] = {"preset": "sft"}
    raw["train"].update(max_steps=scale.teacher_steps, eval_every=max(scale.teacher_steps // 4, 10))
    return train_run(raw)


def save_cut_student(teacher: str | Path, layers: int | list[int], run_dir: Path) -> Path:
    """The untrained cut of the teacher as a model folder (run_dir/final, with the teacher's tokenizer): the baseline
    that every trained student must beat. Reused when present."""
    from egad.models import checkpoint as ckpt
    from egad.models.load import build_model, cut_student, try_load_tokenizer

    final = run_dir / "final"
    if (final / "config.json").is_file():
        return final
    import torch

    model = build_model(str(teacher), None, dtype=torch.float32)
    student = cut_student(model, layers, dtype=torch.float32)
    with ckpt.atomic_dir(final) as tmp:
        ckpt.save_model_dir(tmp, student, try_load_tokenizer(str(teacher)), None, [])
    return final


# ---------------------------------------------------------------------------------------------------------- training
def base_run(scale: Scale, dolly: Path, out_dir: Path, tok_dir: str | Path) -> dict:
    """The run config (as a raw dict for `build_config`) that every run of this scale starts from: its sizes, then
    the scale's `run` overrides."""
    raw = {
        "model": {"tokenizer": str(tok_dir)},
        "data": {
            "train": str(dolly),
            "dev": str(dolly),
            "max_prompt_len": scale.max_prompt_len,
            "max_len": scale.max_len,
            "max_dev_examples": scale.dev_examples,
            "max_train_examples": scale.train_examples,
            "template": scale.template,
        },
        "train": {
            "output_dir": str(out_dir),
            "per_device_batch_size": scale.batch,
            "lr": 2e-3,
            "warmup_ratio": 0.05,
            "log_every": 10,
            "eval_every": max(scale.student_steps // 3, 10),
            "save_every": 0,
            "calib_examples": 512,
            "tensorboard": False,
        },
    }
    for key, value in scale.run.items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    return raw


def run_training(cfg: RunConfig, *, resume: bool = False, stop_at: int | None = None) -> Trainer:
    """Set up, train and clean up one run; returns the finished trainer (its `step`, `out`, `last_eval`)."""
    trainer = Trainer(cfg).setup(resume=resume)
    try:
        trainer.train(stop_at=stop_at)
    finally:
        trainer.cleanup()
    return trainer


def train_run(raw: dict, overrides: dict | None = None, *, resume: bool = False) -> Path:
    """`run_training` of a raw config dict plus dotted overrides; returns the run folder."""
    return run_training(build_config(raw, overrides), resume=resume).out


# -------------------------------------------------------------------------------------------------------- evaluation
def eval_settings(scale: Scale, seeds: tuple[int, ...] | list[int]) -> EvalSettings:
    """The MiniLLM protocol at this scale's lengths: sampling at temperature 1, top-p 1, top-k 0, with `seeds`."""
    return EvalSettings(
        seeds=tuple(seeds),
        max_prompt_len=scale.max_prompt_len,
        max_len=scale.max_len,
        max_new_tokens=scale.max_new_tokens,
        batch_size=32,
        max_examples=scale.test_examples,
        template=scale.template,
        mixed_precision=scale.eval_precision or scale.mixed_precision,
    )


def evaluate(
    model_dir: str | Path,
    out_dir: Path,
    *,
    scale: Scale,
    data_dir: Path,
    seeds: tuple[int, ...] | list[int],
    other_seeds: tuple[int, ...] | list[int] | None = None,
    teacher: str | Path | None = None,
    dev: bool = False,
    skip_done: bool = False,
) -> dict:
    """Score a model folder under the MiniLLM protocol into `out_dir` (egad eval's layout): Dolly test
    (`scale.test_examples`, all when None) over `seeds`, with teacher-student KL when `teacher` is given, and the
    first `scale.other_examples` records of the other MiniLLM sets over `other_seeds` (default `seeds`) when the data
    dir has them. `dev` adds the teacher-forced NLL on the first `scale.dev_examples` Dolly dev examples (set
    `dolly_dev`, no generation), the dev NLL that every row of a report then shares. Dolly test runs last, so its
    summary.json marks a finished evaluation; `skip_done` skips the sets already scored with the same settings (an
    interrupted evaluation resumes per set; a set scored with other seeds or sizes is scored again). Returns the
    merged summary's sets."""
    settings = eval_settings(scale, seeds)

    def done(name: str, wanted: EvalSettings) -> bool:
        """Evaluated before with these settings (seeds, subset, lengths, template): resumable, never stale."""
        file = out_dir / name / "summary.json"
        if not (skip_done and file.is_file()):
            return False
        had = json.loads(file.read_text()).get("settings", {})
        return all(had.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in asdict(wanted).items())

    if dev:
        forced = replace(settings, seeds=(), greedy=False, max_examples=scale.dev_examples)
        if not done("dolly_dev", forced):
            run_eval(model_dir, ["dolly_dev"], forced, out_dir=out_dir, data_dir=data_dir)
    others = OTHER_SETS if scale.other_examples and has_other_sets(data_dir) else []
    sub = replace(settings, seeds=tuple(other_seeds or seeds), max_examples=scale.other_examples)
    todo = [s for s in others if not done(s, sub)]
    if todo:
        run_eval(model_dir, todo, sub, out_dir=out_dir, data_dir=data_dir)
    if not done("dolly_test", settings):
        run_eval(model_dir, ["dolly_test"], settings, out_dir=out_dir, data_dir=data_dir, teacher_path=teacher)
    # Each set's own summary is the record: the merged one may have been removed, or rewritten by a resumed call.
    scored = (["dolly_dev"] if dev else []) + others + ["dolly_test"]
    return merge_summary(out_dir, set_summaries(out_dir, scored), model_dir, teacher)["sets"]
