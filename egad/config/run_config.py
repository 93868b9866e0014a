"""The configuration of a training run: model, data, objective, train. Loaded from YAML with dotted overrides.

Split from egad/config/schema.py (the objective's knobs) to keep each file readable. Every field has a one-line
docstring, printed by `egad train --help`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from egad.config.coerce import coerce_fields, load_yaml
from egad.config.methods import METHODS
from egad.config.schema import ConfigError, ObjectiveConfig, field_docs

DTYPES = ("auto", "float32", "bfloat16", "float16")
LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


@dataclass
class ModelConfig:
    """Teacher, student and tokenizer."""

    teacher: str | None = None
    """Teacher: an HF folder, a hub id, a .gguf file or a shortcut (smollm2-135m-instruct). Or use teacher_config."""
    teacher_config: dict | None = None
    """Build the teacher from this config dict (keys of e.g. Qwen2Config, plus `model_type`) with random weights."""
    student: str | None = None
    """Student: an HF folder, a hub id, a .gguf file or a shortcut. Or use student_config / student_cut."""
    student_config: dict | None = None
    """Build the student from this config dict with random weights (from_config)."""
    student_cut: int | list[int] | None = None
    """Cut the student from the teacher (prune, then distil): a layer count (evenly spaced, first and last kept) or
    0-based teacher layer indices; embeddings, final norm and head are copied too. config.yaml records the indices."""
    lora: dict | None = None
    """Train LoRA adapters instead of the whole student (peft): {r: 8, alpha: 16, dropout: 0.0, target_modules:
    all-linear}; checkpoints hold the merged model and the adapter (adapter/)."""
    tokenizer: str | None = None
    """Tokenizer dir or hub id. Default: the student's, else the teacher's. Checked against the other model's."""
    teacher_tokenizer: str | None = None
    """The teacher's tokenizer (dir or hub id) when it differs from the student's: needs objective.cross_vocab.
    Default: the teacher model's own."""
    train_tokenizer: dict | None = None
    """Train a byte-level BPE tokenizer on the training data instead: {vocab_size: 4096, examples: 20000}."""
    teacher_cache: str | None = None
    """Read the teacher's signals from this `egad cache` folder instead of running the teacher (it is loaded only to
    cut the student when student_cut is set)."""
    teacher_dtype: str = "auto"
    """Teacher weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16."""
    student_dtype: str = "float32"
    """Student master-weights dtype (use train.mixed_precision for bf16 compute)."""
    teacher_placement: str = "auto"
    """The frozen teacher under several processes: replicate (a full copy per process), shard (its parameters spread
    over the processes: DeepSpeed ZeRO-3 or FSDP2 only), or auto (shard where the engine shards the student)."""
    revision: str | None = None
    """Hub revision for teacher and student."""
    trust_remote_code: bool = False
    """Passed to from_pretrained."""

    def __post_init__(self) -> None:
        for side in ("teacher", "student"):
            if getattr(self, side) and getattr(self, f"{side}_config"):
                raise ConfigError(f"model.{side} and model.{side}_config are both set; give one of them")
        given = [name for name in ("student", "student_config", "student_cut") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"give exactly one of model.student (a path, hub id, GGUF file or shortcut), model.student_config or "
                f"model.student_cut; got {given or 'none'}"
            )
        if self.student_cut is not None:
            if not (self.teacher or self.teacher_config):
                raise ConfigError("model.student_cut copies layers of the teacher: set model.teacher or teacher_config")
            cut = [self.student_cut] if isinstance(self.student_cut, int) else list(self.student_cut)
            if not cut or min(cut) < (1 if isinstance(self.student_cut, int) else 0):
                raise ConfigError(f"model.student_cut={self.student_cut!r}: a layer count >= 1 or indices >= 0")
        if self.lora is not None:
            unknown = sorted(set(self.lora) - set(LORA_DEFAULTS))
            if unknown:
                raise ConfigError(f"model.lora: unknown key(s) {unknown}; known: {sorted(LORA_DEFAULTS)}")
            r = self.lora.get("r", LORA_DEFAULTS["r"])
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ConfigError(f"model.lora.r={r!r} must be an int >= 1")
            if not 0 <= float(self.lora.get("dropout", 0.0)) < 1:
                raise ConfigError(f"model.lora.dropout={self.lora.get('dropout')!r} must lie in [0, 1)")
        if self.teacher_placement not in ("auto", "replicate", "shard"):
            raise ConfigError(
                f"model.teacher_placement={self.teacher_placement!r} is not one of ['auto', 'replicate', 'shard']"
            )
        for name in ("teacher_dtype", "student_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is not one of {list(DTYPES)}")


@dataclass
class DataConfig:
    """Instruction data: Dolly (instruction/context/response) or MiniLLM (instruction/input/output) fields."""

    train: str = "../shared/data/dolly/dolly.jsonl"
    """Training data: a JSONL file or a hub dataset id (e.g. databricks/databricks-dolly-15k)."""
    train_split: str | None = "train"
    """Keep the records whose `split` field equals this (JSONL); the dataset split for a hub id. Empty: all."""
    dev: str | None = "../shared/data/dolly/dolly.jsonl"
    """Dev data for evaluation and best-checkpoint selection; empty disables evaluation."""
    dev_split: str | None = "dev"
    """Split filter of the dev data."""
    template: str = "alpaca"
    """Prompt format: alpaca (the MiniLLM template, comparable with published numbers) or chat (tokenizer's)."""
    max_prompt_len: int = 256
    """Prompt tokens kept at most (truncated from the left, so the instruction's end survives)."""
    max_len: int = 512
    """Prompt + response tokens at most (the response is truncated on the right)."""
    max_train_examples: int | None = None
    """Use only the first N training examples."""
    max_dev_examples: int | None = 500
    """Use only the first N dev examples."""

    def __post_init__(self) -> None:
        if self.template not in ("alpaca", "chat"):
            raise ConfigError(f"data.template={self.template!r} is not one of ['alpaca', 'chat']")
        if not 0 < self.max_prompt_len < self.max_len:
            raise ConfigError(f"data.max_prompt_len={self.max_prompt_len} must be in (0, max_len={self.max_len})")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    output_dir: str = "runs/default"
    """Run folder: checkpoints, metrics.jsonl, TensorBoard events, the resolved config."""
    seed: int = 0
    """Seed of data order, initialisation and sampling."""
    max_steps: int = 0
    """Optimizer steps; 0 means `epochs` passes over the training data."""
    epochs: float = 1.0
    """Passes over the training data when max_steps is 0."""
    per_device_batch_size: int = 8
    """Examples per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = per_device_batch_size x grad_accum x processes."""
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay of the student (projections: 0)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Fraction of steps of linear warmup before the cosine decay."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    anchor_l2: float = 0.0
    """Strength gamma of an L2 pull towards the student's initial weights: gamma * (theta - theta_0) is added to
    each trainable parameter's gradient once per optimizer step, before clipping (the gradient of
    gamma/2 * ||theta - theta_0||^2). A control for losses that anchor a cut student to its copied layers. 0: off."""
    proj_lr_mult: float = 1.0
    """Learning-rate multiplier of the feature projections."""
    mixed_precision: str = "no"
    """accelerate mixed precision: no, bf16, fp16."""
    fused_lm_head: bool = False
    """Apply the student's lm_head per chunk inside the loss, so its full logits never exist (saves memory)."""
    fused_teacher: bool | None = None
    """Project the online teacher's logits per chunk from its last hidden state (never full size); default: as
    fused_lm_head."""
    gradient_checkpointing: bool = False
    """Recompute student activations in backward."""
    on_policy: float = 0.0
    """Fraction of micro-batches whose responses the student samples from their prompts (GKD's lambda); the online
    teacher scores the samples. 0: the dataset's responses only. Needs an online teacher (a cache cannot hold them)."""
    on_policy_temperature: float = 1.0
    """Sampling temperature of the on-policy responses."""
    on_policy_max_new_tokens: int = 128
    """Most tokens of an on-policy response (also bounded by data.max_len)."""
    calib_examples: int = 1000
    """Training examples the teacher runs over before training to fit the global entropy quantile knots."""
    log_every: int = 10
    """Steps between metric lines (JSONL, TensorBoard, progress bar)."""
    eval_at_start: bool = True
    """Evaluate on dev before the first step (the baseline of the dev curves)."""
    eval_every: int = 100
    """Steps between dev evaluations (response NLL, teacher-student KL); 0 = only at the end."""
    save_every: int = 100
    """Steps between checkpoints; 0 = only at the end."""
    keep_checkpoints: int = 2
    """Most recent step checkpoints kept (the best one is kept apart)."""
    tensorboard: bool = True
    """Write TensorBoard events under output_dir/tb."""

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # YAML gives a list
        for name in ("per_device_batch_size", "grad_accum", "log_every", "calib_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.max_steps < 0 or self.epochs <= 0:
            raise ConfigError("train.max_steps must be >= 0 and train.epochs > 0")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision={self.mixed_precision!r} is not one of ['no', 'bf16', 'fp16']")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must lie in [0, 1)")
        if self.anchor_l2 < 0:
            raise ConfigError(f"train.anchor_l2={self.anchor_l2} must be >= 0 (0 turns the pull off)")
        if not 0 <= self.on_policy <= 1:
            raise ConfigError(f"train.on_policy={self.on_policy} must lie in [0, 1] (the fraction of batches)")
        if self.on_policy_temperature <= 0 or self.on_policy_max_new_tokens < 1:
            raise ConfigError("train.on_policy_temperature must be > 0 and train.on_policy_max_new_tokens >= 1")


@dataclass
class RunConfig:
    """A whole run. `method` is the objective preset's name; `objective` holds its resolved fields."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: str = "egad"

    def __post_init__(self) -> None:
        cross = self.objective.cross_vocab != "none" and self.objective.uses_teacher
        if cross and self.train.on_policy > 0:
            raise ConfigError(
                f"train.on_policy={self.train.on_policy} with objective.cross_vocab={self.objective.cross_vocab!r}: "
                "the student's samples are not re-tokenized for the teacher yet; set train.on_policy: 0"
            )
        if self.train.on_policy > 0 and self.model.teacher_cache and self.objective.uses_teacher:
            raise ConfigError(
                f"train.on_policy={self.train.on_policy} trains on the student's own samples, which a teacher cache "
                "cannot hold: drop model.teacher_cache (the teacher then runs online) or set train.on_policy: 0"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["objective"] = {"preset": self.method, **_diff(self.objective, METHODS[self.method].objective_config())}
        d["train"]["adam_betas"] = list(self.train.adam_betas)
        return d


def _diff(cfg: ObjectiveConfig, base: ObjectiveConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}


SECTIONS = {"model": ModelConfig, "data": DataConfig, "objective": ObjectiveConfig, "train": TrainConfig}


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--objective.alpha', '0.3', '--train.lr=1e-4'] -> {'objective.alpha': '0.3', 'train.lr': '1e-4'}.

    Values stay text: build_config converts each to its field's type, so a str field keeps e.g. '0123' verbatim.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --section.field VALUE "
                f"(sections: {', '.join(SECTIONS)})"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, value = arg[2:], args[i + 1]
            i += 2
        out[key] = value
    return out


OVERRIDE = "command-line override"  # how an error names a value given on the command line


def build_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None, *, source: str = "config") -> RunConfig:
    """Validate a nested dict (from YAML) plus dotted overrides into a RunConfig. Errors name the bad key.

    Every value is converted to its field's declared type (egad/config/coerce.py), whether YAML read it or it is the
    text of a command-line override. An error is blamed on where the bad value came from: a file value's message starts
    with `source`, an override's with `command-line override --section.field`.
    """
    unknown = set(raw or {}) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; expected {list(SECTIONS)}")
    bad = sorted(k for k, v in (raw or {}).items() if not isinstance(v, (dict, type(None))))
    if bad:
        raise ConfigError(f"{source}: section(s) {bad} must be mappings of field: value")
    raw = {section: _coerce_section(section, dict(v or {}), source) for section, v in (raw or {}).items()}
    over: dict[str, dict[str, Any]] = {}
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(f"override --{key}: the section must be one of {list(SECTIONS)}")
        over.setdefault(section, {}).update(_coerce_section(section, {name: value}, f"{OVERRIDE} --{key}"))
    _check_fields(raw, source)
    _check_fields(over, OVERRIDE)
    merged = {s: {**raw.get(s, {}), **over.get(s, {})} for s in SECTIONS}
    obj = merged["objective"]
    method = obj.pop("preset", "egad")
    if method not in METHODS:
        blame = f"{OVERRIDE} --objective.preset" if "preset" in over.get("objective", {}) else source
        raise ConfigError(f"{blame}: objective.preset={method!r} is unknown; choose one of {sorted(METHODS)}")
    for key, value in METHODS[method].run.items():  # gkd's on-policy fraction, the anchor's pull: unless set
        section, _, name = key.partition(".")
        merged[section].setdefault(name, value)
    try:
        return RunConfig(
            model=ModelConfig(**merged["model"]),
            data=DataConfig(**merged["data"]),
            objective=METHODS[method].objective_config(**obj),
            train=TrainConfig(**merged["train"]),
            method=method,
        )
    except ConfigError as e:  # a field's own check: blame the override or the file that set the field it names
        named = [f"{s}.{n}" for s in SECTIONS for n in merged[s] if f"{s}.{n}=" in str(e)]
        given = [k for k in named if k.partition(".")[2] in over.get(k.partition(".")[0], {})]
        blame = f"{OVERRIDE} --{given[0]}" if given else source if named else None
        raise ConfigError(f"{blame}: {e}" if blame else str(e)) from None


def _check_fields(raw: dict[str, dict[str, Any]], source: str) -> None:
    """Refuse unknown fields, all of them in one message that names where they were given."""
    bad = sorted(
        f"{section}.{name}"
        for section, cls in SECTIONS.items()
        for name in set(raw.get(section, {}))
        - {f.name for f in fields(cls)}
        - ({"preset"} if section == "objective" else set())
    )
    if bad:
        raise ConfigError(f"{source}: unknown field(s) {bad}; `egad train --help` lists them")


def _coerce_section(section: str, values: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """Known fields converted to their types (unknown ones are reported later, all at once); preset stays text."""
    try:
        return coerce_fields(SECTIONS[section], values, section)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config and apply dotted overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
    with path.open() as f:
        try:
            raw = load_yaml(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {list(SECTIONS)}")
    return build_config(raw, overrides, source=str(path))


def help_text() -> str:
    """Every field of every section with its docstring and default, for `egad train --help`."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        if section == "objective":
            lines.append(f"  preset  (default egad)  one of: {', '.join(sorted(METHODS))}")
        defaults = {f.name: f.default for f in fields(cls)}
        for name, doc in field_docs(cls).items():
            default = defaults.get(name)
            shown = "" if default is dataclasses.MISSING else f"  (default {default})"
            lines.append(f"  {name}{shown}  {doc}")
    return "\n".join(lines)
