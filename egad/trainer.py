"""The one stateful piece: an explicit distillation loop on `accelerate.Accelerator`.

setup() loads models and data, fits the teacher-entropy knots and resumes; train() runs AdamW with warmup + cosine,
gradient clipping and accumulation; evaluate() gives dev response NLL and teacher-student KL; save_checkpoint()
writes HF-format folders atomically.

Exactness across accumulation and processes: every optimizer step consumes one window of `grad_accum` global
micro-batches; each process takes its slice of each (egad.data.shard), the KD, CE and feature sums are divided by
the response-token count of the whole window on all processes, and the DDP gradient mean is undone by the world
size. Each token's plan (weight, temperature, route) depends on the token and on run-level state only (the step,
the entropy CDFs, which streams update once per window from counts summed over it), never on its batch-mates. So one
process with batch B, one with batch B/k and k-step accumulation, and P processes with batch B/P compute the same
update up to float summation order; tests/test_split_exactness.py checks it for every preset. The two batch rules
left as options (cdf_mode 'batch', route_mode 'batch_topk') are refused wherever a window is split.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from egad import checkpoint as ckpt
from egad import data as D
from egad import engines
from egad.config import ConfigError
from egad.curriculum import training_progress
from egad.entropy import fit_quantile_knots
from egad.entropy_stream import EmaEntropyHistogram, absorb_window
from egad.eval.metrics import response_sums
from egad.eval.suite import scorer
from egad.heads import output_head
from egad.lora import add_lora
from egad.losses.features import FeatureProjector, feature_pairs
from egad.models import (
    build_model,
    check_tokenizer_roundtrip,
    copied_layers,
    cut_layers,
    cut_student,
    decoder_layers,
    freeze,
    model_dims,
    resolve_dtype,
    resolve_tokenizer,
    shared_vocab,
)
from egad.rollout import is_on_policy, sample_batch, sampling_seed
from egad.routing import step_seed
from egad.run_config import RunConfig
from egad.run_log import RunLog
from egad.student import DistillationModule
from egad.teacher.cache import TeacherCache, run_identity
from egad.teacher.calibrate import STUDENT_SIGNALS, calibrate_entropy, calibrate_signals
from egad.teacher.online import OnlineTeacher
from egad.teacher.signal import TeacherSource
from egad.token_plan import PlanState, check_window_exact

log = logging.getLogger("egad.trainer")


def _adamw(groups: list[dict], **kw) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel (CPU and CUDA): measured 7x faster than the default per-tensor loop
    for 50M fp32 parameters on one CPU thread, which is ~5% of a cut-SmolLM2 student's step."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for these devices or dtypes
        return torch.optim.AdamW(groups, **kw)


def _token_keys(batch: dict[str, Tensor]) -> Tensor:
    """(B, L) int64: a key per token that names it whatever batch it is in, its example's position in the training
    split and its position in the sequence (right padding keeps positions fixed)."""
    ids = batch["input_ids"]
    index = batch["train_index"].to(ids.device).long()
    return index[:, None] * 2**24 + torch.arange(ids.shape[1], device=ids.device)[None, :]


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        self.step = 0
        self.best_dev_nll = math.inf
        self.knots: Tensor | None = None
        # Streamed CDFs by signal: the teacher entropy under cdf_mode ema_hist, the student-side signals a rule ranks
        # tokens by. Each absorbs one window's counts per optimizer step.
        self.streams: dict[str, EmaEntropyHistogram] = {}
        self.route_threshold: float | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, resume: bool = False) -> Trainer:
        cfg, t = self.cfg, self.cfg.train
        self.acc = engines.make_accelerator(t.mixed_precision)
        self.engine = engines.engine_in_use(self.acc)
        self.sharded = self.engine in engines.SHARDING
        self._check_engine()
        engines.configure_deepspeed(
            self.acc, micro_batch=t.per_device_batch_size, grad_accum=t.grad_accum, grad_clip=t.grad_clip
        )
        set_seed(t.seed)
        self.main = self.acc.is_main_process
        with self.acc.main_process_first():
            self.tokenizer = resolve_tokenizer(self.cfg.model, self.cfg.data)
        self._setup_data()
        check_window_exact(cfg.objective, grad_accum=t.grad_accum, processes=self.world)
        self._setup_models()
        if self.main:  # after the models: a cut student's chosen layers are part of the config
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self._setup_optim()
        resumed = resume and bool(ckpt.checkpoints(self.out))
        if resumed:
            self._resume()
        else:
            self._calibrate()
        self.log = RunLog(
            self.out,
            enabled=self.main,
            tensorboard=self.cfg.train.tensorboard,
            resume_step=self.step if resumed else None,
        )
        self._log(
            {
                "event": "setup",
                "step": self.step,
                "train_examples": len(self.train_set),
                "dev_examples": len(self.dev_set),
                "total_steps": self.total_steps,
                "processes": self.world,
                "engine": self.engine,
                "teacher_placement": self.placement if self.teacher_model is not None else None,
                **self._teacher_sizes(),
                "mixed_precision": self.acc.mixed_precision,
                "teacher_source": type(self.source).__name__ if self.source is not None else None,
                "vocab": self.vocab,
                **{f"data_{k}": v for k, v in asdict(self.train_stats).items()},
            }
        )
        return self

    def _check_engine(self) -> None:
        """What egad does not support under a sharding engine, refused before anything is loaded."""
        t, m = self.cfg.train, self.cfg.model
        if t.anchor_l2 > 0 and (self.sharded or self.engine.startswith("deepspeed")):
            raise ConfigError(
                f"train.anchor_l2={t.anchor_l2} adds to each parameter's whole gradient, which {self.engine} "
                "partitions or applies inside backward: train the anchor control under DDP or on one process"
            )
        if not self.sharded:
            return
        unsupported = {
            "train.on_policy > 0 (sampling needs the whole student on each process)": t.on_policy > 0,
            "model.lora (the adapter is merged on save from full weights)": m.lora is not None,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ConfigError(
                f"{self.engine} shards the student across processes; this run also sets {'; '.join(bad)}. "
                "Turn those off, or train under DDP / DeepSpeed ZeRO-2"
            )

    def _teacher_sizes(self) -> dict:
        if self.teacher_model is None:
            return {}
        return {
            "teacher_params": engines.full_numel(self.teacher_model),
            "teacher_params_local": engines.local_numel(self.teacher_model),
        }

    def _calibrate(self) -> None:
        obj = self.cfg.objective
        if self.cache is not None:
            self.knots = self.cache.knots.to(self.acc.device)  # exact: over every cached token
            if obj.cdf_mode == "ema_hist":
                self.streams["entropy"] = EmaEntropyHistogram()
                self.streams["entropy"].update(self.cache.knots)
            self._save_knots(self.cache.entropy_sample(20000))
        elif self.source is not None and obj.needs_knots:
            n = min(self.cfg.train.calib_examples, len(self.train_set))
            samples = calibrate_entropy(
                self.source,
                self.train_set[:n],
                self.acc,
                pad_id=self.tokenizer.pad_token_id,
                batch_size=self.cfg.train.per_device_batch_size,
                vocab=self.vocab,
            )
            if obj.cdf_mode == "ema_hist":
                self.streams["entropy"] = EmaEntropyHistogram()
                self.streams["entropy"].update(samples)
                self.knots = self.streams["entropy"].knots()
            else:
                self.knots = fit_quantile_knots(samples)
            keep = torch.randperm(samples.numel(), generator=torch.Generator().manual_seed(0))[:20000]
            self._save_knots(samples[keep])
        self._calibrate_student_signals()

    def _calibrate_student_signals(self) -> None:
        """Start the streamed CDFs of the student-side signals from the untrained student on the calibration set."""
        need = [s for s in STUDENT_SIGNALS if s in self.cfg.objective.cdfs_needed]
        if not need or self.source is None:
            return
        n = min(self.cfg.train.calib_examples, len(self.train_set))
        self.module.eval()
        values = calibrate_signals(
            self.source,
            self._student_scorer(),
            self.train_set[:n],
            self.acc,
            signals=need,
            pad_id=self.tokenizer.pad_token_id,
            batch_size=self.cfg.train.per_device_batch_size,
            vocab=self.vocab,
        )
        self.module.train()
        for name in need:
            self.streams[name] = EmaEntropyHistogram()
            self.streams[name].update(values[name])

    def _student_scorer(self):
        if self.sharded:  # through the wrapper, which gathers the sharded weights for the forward
            return lambda b: self.module(b["input_ids"], b["attention_mask"])
        return scorer(self.acc.unwrap_model(self.module).student, self.vocab)

    def _plan_state(self) -> PlanState:
        seed = step_seed(self.cfg.train.seed, self.step)
        return PlanState.from_streams(
            self.knots, self.streams, seed=seed, device=self.acc.device, route_threshold=self.route_threshold
        )

    def _save_knots(self, sample: Tensor) -> None:
        """The knots and a sample of the teacher entropies they came from, for the report's histogram."""
        if self.main and self.knots is not None:
            save_file(
                {"knots": self.knots.contiguous().cpu(), "sample": sample.contiguous().float().cpu()},
                str(self.out / "entropy_knots.safetensors"),
            )

    def _setup_models(self) -> None:
        m, dev, obj = self.cfg.model, self.acc.device, self.cfg.objective
        teacher = None
        if (obj.uses_teacher and not m.teacher_cache) or m.student_cut is not None:
            if not (m.teacher or m.teacher_config):
                raise ConfigError(
                    f"objective preset {self.cfg.method!r} distils from a teacher: set model.teacher (a folder, hub "
                    "id, .gguf file or shortcut), model.teacher_config or model.teacher_cache, or use preset sft"
                )
            with engines.whole_models(self.acc):
                teacher = freeze(self._build("teacher")).to(dev)
        if m.student_cut is not None:
            layers = cut_layers(m.student_cut, len(decoder_layers(teacher)))
            student = cut_student(teacher, layers, dtype=resolve_dtype(m.student_dtype, dev))
            self.cfg.model.student_cut = layers  # the resolved indices go into config.yaml
        else:
            with engines.whole_models(self.acc):
                student = self._build("student")
        if m.student is None:  # built here: its saved tokenizer must reload identically
            check_tokenizer_roundtrip(self.tokenizer, student)
        if m.teacher_cache:
            teacher = None  # loaded only to cut the student from: with a cache the teacher never runs
        self.vocab = shared_vocab(self.tokenizer, student, *([teacher] if teacher is not None else []))
        self.cache = None
        if obj.uses_teacher and m.teacher_cache:
            # Checked once, by the cache, against this run's tokenizer, tokenized data, template and vocabulary.
            expect = run_identity(self.tokenizer, self.train_set, self.cfg.data, self.vocab)
            self.cache = TeacherCache(m.teacher_cache, expect=expect)
            self.route_threshold = self._cache_route_threshold()
        if m.lora is not None:
            student = add_lora(student, m.lora)
        if self.cfg.train.gradient_checkpointing:
            student.gradient_checkpointing_enable()
            if m.lora is not None:
                student.enable_input_require_grads()  # the frozen embeddings would cut the checkpointed graph
        self.pairs: list[tuple[int, int]] = []
        projector = None
        if obj.uses_features:
            ls, ds = model_dims(student)
            lt, dt = model_dims(teacher) if teacher is not None else self.cache.teacher_dims()
            k = min(obj.feat_layers, ls)
            self.pairs = feature_pairs(obj.layer_map, ls, lt, k, copied_from=copied_layers(student, lt))
            if self.cache is not None:
                self.cache.require_layers([p[1] for p in self.pairs])
            projector = FeatureProjector(ds, dt, len(self.pairs)).to(dev)
        self.placement = engines.resolve_placement(m.teacher_placement, self.engine)
        self._teacher_engine = None
        if teacher is not None and self.placement == "shard":
            layers = decoder_layers(teacher)
            teacher, self._teacher_engine = engines.shard_teacher(teacher, self.acc, layers, self.engine)
        self.teacher_model = teacher
        self.source: TeacherSource | None = self.cache
        if teacher is not None and obj.uses_teacher:
            fused = (
                self.cfg.train.fused_lm_head if self.cfg.train.fused_teacher is None else self.cfg.train.fused_teacher
            )
            if self.placement == "shard" and fused:
                if self.cfg.train.fused_teacher:
                    raise ConfigError(
                        "train.fused_teacher reads the teacher's head outside its forward, which a sharded teacher "
                        "cannot serve: set train.fused_teacher false or model.teacher_placement replicate"
                    )
                log.info("the sharded teacher hands over its logits: its fused head is off")
                fused = False
            self.source = OnlineTeacher(teacher, [p[1] for p in self.pairs], fused=fused, vocab=self.vocab)
        layers = [p[0] for p in self.pairs]
        self.module = DistillationModule(student, projector, layers, self.cfg.train.fused_lm_head, vocab=self.vocab)
        if self.cfg.train.fused_lm_head:
            engines.share_head(self.module, output_head(student), self.engine)

    def _cache_route_threshold(self) -> float | None:
        """The router reads the cache's hidden-state threshold when the two select the same share, so that every
        routed token has its stored hidden state; a router asking for more than the cache stores is refused here."""
        obj, man = self.cfg.objective, self.cache.manifest
        hq, thr = man.get("hidden_quantile"), man.get("hidden_threshold")
        if not obj.uses_features or obj.route_mode == "none" or not hq:
            return None  # no features needed, or hidden states stored for every token
        stored = 1.0 - hq
        if obj.route_mode != "global_quantile":
            raise ConfigError(
                f"{self.cache.path} stores hidden states for the top {stored:.0%} of tokens by entropy "
                f"(hidden_quantile {hq}, threshold {thr:.4f} nats); route_mode={obj.route_mode!r} may route "
                "others. Use route_mode global_quantile, or rebuild the cache with --hidden-quantile 0 (every token)"
            )
        if obj.rho > stored + 1e-9:
            raise ConfigError(
                f"objective.rho={obj.rho} routes the top {obj.rho:.0%} of tokens to the feature branch, but "
                f"{self.cache.path} stores hidden states for the top {stored:.0%} only (hidden_quantile {hq}, "
                f"threshold {thr:.4f} nats). Set objective.rho <= {stored:g}, or rebuild the cache with "
                f"--hidden-quantile {1 - obj.rho:g}"
            )
        return float(thr) if abs(obj.rho - stored) <= 1e-9 else None

    def _build(self, side: str):
        m = self.cfg.model
        dtype = m.teacher_dtype if side == "teacher" else m.student_dtype
        return build_model(
            getattr(m, side),
            getattr(m, f"{side}_config"),
            dtype=resolve_dtype(dtype, self.acc.device),
            tokenizer=self.tokenizer,
            revision=m.revision,
            trust_remote_code=m.trust_remote_code,
            seed=self.cfg.train.seed + (1 if side == "teacher" else 0),
        )

    def _setup_data(self) -> None:
        d, t = self.cfg.data, self.cfg.train
        self.train_set, self.train_stats = D.tokenized_split(d, self.tokenizer, "train")
        self.dev_set = D.tokenized_split(d, self.tokenizer, "dev")[0] if d.dev else []
        self.world = self.acc.num_processes
        self.global_micro = t.per_device_batch_size * self.world
        self.global_batch = self.global_micro * t.grad_accum
        self.steps_per_epoch = len(self.train_set) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(self.train_set)} training examples cannot fill one step of "
                f"{self.global_batch} (batch x accumulation x processes): lower "
                "train.per_device_batch_size or train.grad_accum, or use more data"
            )
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.steps_per_epoch)

    def _setup_optim(self) -> None:
        t = self.cfg.train
        student, projector = self.module.student, self.module.projector
        decay, no_decay = [], []
        for name, p in student.named_parameters():
            if p.requires_grad:
                ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition is flat: read the full shape
                (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if projector is not None:
            groups.append({"params": list(projector.parameters()), "weight_decay": 0.0, "lr": t.lr * t.proj_lr_mult})
        # The anchor's reference: the student as built, before any checkpoint is loaded, so a resumed run pulls
        # towards the same initial weights (a cut is copied, a from-scratch init seeded).
        self.anchor = [(p, p.detach().clone()) for p in decay + no_decay] if t.anchor_l2 > 0 else []
        opt = _adamw(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps)
        sched = get_cosine_schedule_with_warmup(opt, math.ceil(t.warmup_ratio * self.total_steps), self.total_steps)
        # The scheduler is not prepared: accelerate would step it once per process (it assumes a sharded
        # dataloader), while our windows already hold the global batch. It is registered for checkpointing instead.
        self.module, self.opt = self.acc.prepare(self.module, opt)
        self.sched = sched
        self.acc.register_for_checkpointing(self.sched)

    # ------------------------------------------------------------------ data
    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    def _window(self, step: int) -> list[dict[str, Tensor]]:
        """This process's micro-batches for optimizer step `step`: a pure function of (seed, step), so a resumed run
        sees exactly the batches an uninterrupted one would."""
        t = self.cfg.train
        epoch, offset = divmod(step, self.steps_per_epoch)
        batches = D.global_batches(len(self.train_set), self.global_micro, seed=t.seed, epoch=epoch)
        window = batches[offset * t.grad_accum : (offset + 1) * t.grad_accum]
        local = [D.shard(b, self.acc.process_index, self.world, t.per_device_batch_size) for b in window]
        batches = []
        for ix in local:
            batch = self._to_device(D.collate([self.train_set[i] for i in ix], self.tokenizer.pad_token_id))
            batch["train_index"] = torch.tensor(ix)  # positions in train_set: the cache is keyed by them
            batches.append(batch)
        return batches

    def _student_samples(self, batch: dict[str, Tensor], micro: int) -> dict[str, Tensor]:
        """The batch with the student's own responses (train.on_policy), sampled reproducibly (egad.rollout)."""
        t, d = self.cfg.train, self.cfg.data
        seed = sampling_seed(t.seed, self.step, micro, self.acc.process_index)
        student = self.acc.unwrap_model(self.module).student
        with self.acc.autocast():
            return sample_batch(
                student,
                batch,
                seed=seed,
                pad_id=self.tokenizer.pad_token_id,
                stop_ids=[D.end_of_turn_id(self.tokenizer, d.template)],
                max_len=d.max_len,
                max_new_tokens=t.on_policy_max_new_tokens,
                temperature=t.on_policy_temperature,
            )

    # ------------------------------------------------------------------ train
    def train(self, stop_at: int | None = None) -> dict[str, float]:
        """Run to train.max_steps (or `stop_at`, which leaves the run resumable, as an interruption would)."""
        t = self.cfg.train
        if self.dev_set and self.step == 0 and t.eval_at_start:
            self._eval_and_keep_best()
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc=self.cfg.method, disable=not self.main, dynamic_ncols=True
        )
        window: dict[str, float] = {}
        n_window, t0, tokens_seen = 0, time.perf_counter(), 0.0
        while self.step < self.total_steps and (stop_at is None or self.step < stop_at):
            try:
                metrics, n_tok = self._train_step()
            except KeyboardInterrupt:
                self._save_on_interrupt()
                raise
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v
            n_window += 1
            tokens_seen += n_tok
            self.step += 1
            bar.update(1)
            last = self.step == self.total_steps
            if self.step % t.log_every == 0 or last:
                row = {k: v / n_window for k, v in window.items()}
                seconds = time.perf_counter() - t0
                # tokens and train_s are the window's response tokens and training seconds (evaluation and saving
                # excluded): their sums over rows are the run's tokens seen and training time.
                row.update(
                    step=self.step,
                    lr=self.sched.get_last_lr()[0],
                    tokens=tokens_seen,
                    train_s=seconds,
                    tokens_per_s=tokens_seen / max(seconds, 1e-9),
                )
                self._log(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kd=f"{row['kd']:.3f}")
                window, n_window, t0, tokens_seen = {}, 0, time.perf_counter(), 0.0
            if self.dev_set and ((t.eval_every and self.step % t.eval_every == 0) or last):
                self._eval_and_keep_best()
            if (t.save_every and self.step % t.save_every == 0) or last:
                self.save_checkpoint()
            if n_window == 0:
                t0 = time.perf_counter()
        bar.close()
        if self.step == self.total_steps:
            self.save_final()
        return getattr(self, "last_eval", {})

    def _train_step(self) -> tuple[dict[str, float], float]:
        t, obj = self.cfg.train, self.cfg.objective
        window = self._window(self.step)
        on_policy = [is_on_policy(t.seed, self.step, i, t.on_policy) for i in range(len(window))]
        window = [
            self._student_samples(b, i) if on else b for i, (b, on) in enumerate(zip(window, on_policy, strict=True))
        ]
        n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        n_global = float(self.acc.reduce(torch.tensor(float(n_local), device=self.acc.device), "sum"))
        progress = training_progress(self.step, self.total_steps)
        state = self._plan_state()
        sums: dict[str, float] = {}
        streamed: dict[str, list[Tensor]] = {name: [] for name in self.streams}
        self.module.train()
        for i, batch in enumerate(window):
            sync = i == len(window) - 1
            with nullcontext() if sync else self.acc.no_sync(self.module):
                teacher = None
                if self.source is not None:
                    with self.acc.autocast():
                        teacher = self.source.signal(batch)
                # DDP averages gradients over processes; the loss is already a global mean, so scale N down by the
                # world size instead (keeps the upstream gradient at 1, which the chunked loss relies on).
                loss, metrics, tokens = self.module(
                    batch["input_ids"],
                    batch["attention_mask"],
                    D.shift_labels(batch["labels"]),
                    teacher,
                    obj,
                    progress=progress,
                    num_tokens=n_global / self.world,
                    vocab_size=self.vocab,
                    state=state,
                    token_keys=_token_keys(batch),
                )
                self._backward(loss, sync)
            for k, v in metrics.items():
                # Loss terms add up over the window: each process's sum is world x its share of the global mean, so
                # the mean over processes below is the exact global value. Token statistics are averaged.
                w = 1.0 if k in ("loss", "ce", "kd", "feat") else 1.0 / len(window)
                sums[k] = sums.get(k, 0.0) + float(v) * w
            for name, parts in streamed.items():
                if name in tokens:
                    parts.append(tokens[name].detach().float())
        if t.on_policy > 0:
            sums["on_policy"] = sum(on_policy) / len(on_policy)
        if self.anchor:
            sums["anchor"] = self._pull_to_anchor(t.anchor_l2)
        if t.grad_clip > 0:
            sums["grad_norm"] = float(self.acc.clip_grad_norm_(self.module.parameters(), t.grad_clip))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self._absorb_window(streamed)
        reduced = self.acc.reduce(torch.tensor(list(sums.values()), device=self.acc.device), "mean")
        return dict(zip(sums, reduced.tolist(), strict=True)), n_global

    @torch.no_grad()
    def _pull_to_anchor(self, gamma: float) -> float:
        """Add gamma * (theta - theta_0) to every trainable gradient, once per window (after DDP's averaging, so
        every process adds the same); returns the pull's loss gamma/2 * ||theta - theta_0||^2."""
        dist2 = 0.0
        for p, p0 in self.anchor:
            d = p.detach() - p0
            dist2 += float(d.float().pow(2).sum())
            if p.grad is None:
                p.grad = d.mul(gamma)
            else:
                p.grad.add_(d, alpha=gamma)
        return 0.5 * gamma * dist2

    def _absorb_window(self, streamed: dict[str, list[Tensor]]) -> None:
        absorb_window(self.streams, streamed, lambda c: self.acc.reduce(c, "sum"), self.acc.device)
        if "entropy" in self.streams:
            self.knots = self.streams["entropy"].knots().to(self.acc.device)

    def _backward(self, loss: Tensor, sync: bool) -> None:
        """DeepSpeed steps inside backward at the window's end: tell it where the window ends (accelerate reads its
        sync flag), and keep it from dividing the loss by the window length, which egad's token count already
        does."""
        if not self.engine.startswith("deepspeed"):
            self.acc.backward(loss)
            return
        self.acc.gradient_state._set_sync_gradients(sync)
        self.acc.backward(loss, scale_wrt_gas=False)
        self.acc.gradient_state._set_sync_gradients(True)

    # ------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Dev response NLL (perplexity) of the student, and with a teacher: its NLL, KL(teacher || student), top-1
        agreement. Sharded across processes, summed, then divided."""
        self.module.eval()
        if self.sharded:  # through the wrapper, which gathers the sharded weights for the forward
            score = lambda b: self.module(b["input_ids"], b["attention_mask"])  # noqa: E731
        else:
            score = scorer(self.acc.unwrap_model(self.module).student, self.vocab)
        score_t = None
        if self.teacher_model is not None:
            teacher = self.teacher_model
            score_t = (
                (lambda b: teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)
                if self.placement == "shard"
                else scorer(teacher, self.vocab)
            )
        bs = self.cfg.train.per_device_batch_size
        idx = list(range(self.acc.process_index, len(self.dev_set), self.world))
        # Every process runs the same number of forwards (a sharding engine gathers weights collectively in each):
        # one whose share has run out scores a stand-in batch and drops the result.
        n_batches = math.ceil(math.ceil(len(self.dev_set) / self.world) / bs)
        totals: dict[str, Tensor] = {}
        for b in range(n_batches):
            part = idx[b * bs : (b + 1) * bs]
            batch = self._to_device(D.collate([self.dev_set[i] for i in part or [0]], self.tokenizer.pad_token_id))
            targets = D.shift_labels(batch["labels"])
            with self.acc.autocast():
                logits = score(batch)
                t_logits = score_t(batch) if score_t is not None else None
            if not part:
                continue
            for k, v in response_sums(logits, targets, vocab_size=self.vocab, teacher_logits=t_logits).items():
                totals[k] = totals.get(k, 0) + v
        keys = sorted(totals) or ["tokens"]
        vec = torch.stack(
            [torch.as_tensor(totals.get(k, 0.0), dtype=torch.float64, device=self.acc.device) for k in keys]
        )
        vec = self.acc.reduce(vec, "sum")
        tot = dict(zip(keys, vec.tolist(), strict=True))
        n = max(tot.get("tokens", 0.0), 1.0)
        out = {"dev_nll": tot.get("nll", 0.0) / n}
        out["dev_ppl"] = math.exp(min(out["dev_nll"], 50))
        if "kl" in tot:
            out.update(dev_teacher_nll=tot["teacher_nll"] / n, dev_kl=tot["kl"] / n, dev_top1_agree=tot["agree"] / n)
        self.module.train()
        return out

    def _eval_and_keep_best(self) -> None:
        ev = self.evaluate()
        ev["step"] = self.step
        self.last_eval = ev
        self._log(ev)
        if ev["dev_nll"] < self.best_dev_nll:
            self.best_dev_nll = ev["dev_nll"]
            self._save_model_dir(self.out / "best", extra={"step": self.step, **ev})

    # ------------------------------------------------------------ checkpoints
    def _gathered_state(self) -> dict | None:
        """Under a sharding engine, the full weights of the student and projector, gathered from every process (a
        collective: all must call it); None where each process already holds them whole."""
        if not self.sharded:
            return None
        state = self.acc.get_state_dict(self.module)
        return {k: v.detach().cpu() for k, v in state.items()} if self.main else None

    def _write_model(self, path: Path, state: dict | None) -> None:
        unwrapped = self.acc.unwrap_model(self.module)
        ckpt.save_model_dir(
            path, unwrapped.student, self.tokenizer, unwrapped.projector, self.pairs, self._prompt(), state=state
        )

    def _save_model_dir(self, path: Path, extra: dict | None = None) -> None:
        self.acc.wait_for_everyone()
        state = self._gathered_state()
        if self.main:
            with ckpt.atomic_dir(path) as tmp:
                self._write_model(tmp, state)
                if extra:
                    (tmp / "eval.json").write_text(json.dumps(extra, indent=1))
        self.acc.wait_for_everyone()

    def _prompt(self) -> dict:
        d = self.cfg.data
        return {"template": d.template, "max_prompt_len": d.max_prompt_len, "max_len": d.max_len}

    def save_checkpoint(self) -> Path:
        """checkpoint-<step>/: HF model + tokenizer + projector, and the full training state (optimizer, scheduler,
        RNG, step, best dev NLL, entropy CDF) so that `--resume` continues the same run."""
        final = self.out / f"checkpoint-{self.step}"
        tmp = final.with_name(f".tmp-{final.name}")
        if self.main:
            ckpt.staging_dir(final)
        self.acc.wait_for_everyone()
        # Every process writes its RNG state. Pickled weights here: the tied lm_head makes safetensors drop (and
        # warn about) the shared tensor, and the loadable HF copy is written beside it anyway.
        self.acc.save_state(str(tmp / "state"), safe_serialization=False)
        self.acc.wait_for_everyone()
        state = self._gathered_state()
        if self.main:
            self._write_model(tmp, state)
            state = {
                "step": self.step,
                "best_dev_nll": self.best_dev_nll,
                "total_steps": self.total_steps,
                "method": self.cfg.method,
                "engine": self.engine,
                "processes": self.world,
                "global_batch": self.global_batch,
            }
            if self.knots is not None:
                save_file({"knots": self.knots.contiguous().cpu()}, str(tmp / "entropy_knots.safetensors"))
            if self.streams:
                torch.save({k: h.state_dict() for k, h in self.streams.items()}, tmp / "signal_streams.pt")
            # trainer_state.json is written last: its presence marks the checkpoint complete.
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            ckpt.commit_dir(tmp, final)
            ckpt.prune(self.out, self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()
        return final

    def _save_on_interrupt(self) -> None:
        """Ctrl-C mid-step: the step is discarded and the last finished one is saved, so `--resume` loses nothing.
        With several processes a collective save could hang; the periodic checkpoints serve there."""
        self.opt.zero_grad(set_to_none=True)
        if self.world == 1 and self.step > 0 and not (self.out / f"checkpoint-{self.step}").exists():
            log.warning("interrupted: saving checkpoint-%d before exiting", self.step)
            self.save_checkpoint()

    def save_final(self) -> None:
        self._save_model_dir(self.out / "final", extra={"step": self.step, **getattr(self, "last_eval", {})})

    def _resume(self) -> None:
        step, path = ckpt.checkpoints(self.out)[-1]
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("total_steps") != self.total_steps:
            raise ConfigError(
                f"{path} was written by a run of {state.get('total_steps')} steps; this config gives "
                f"{self.total_steps}. Resume with the same train.max_steps / epochs / batch sizes"
            )
        self._check_resumable(path, state)
        self.acc.load_state(str(path / "state"))
        self.step, self.best_dev_nll = step, state["best_dev_nll"]
        if (path / "entropy_knots.safetensors").is_file():
            self.knots = load_file(str(path / "entropy_knots.safetensors"))["knots"].to(self.acc.device)
        saved = {}
        if (path / "signal_streams.pt").is_file():
            saved = torch.load(path / "signal_streams.pt")
        elif (path / "entropy_hist.pt").is_file():  # written before the student-side streams existed
            saved = {"entropy": torch.load(path / "entropy_hist.pt")}
        for name, sd in saved.items():
            self.streams[name] = EmaEntropyHistogram()
            self.streams[name].load_state_dict(sd)
        log.info("resumed from %s at step %d", path, step)

    def _check_resumable(self, path: Path, state: dict) -> None:
        """A checkpoint resumes only under the launch that wrote it: the same global batch (else the data windows
        differ), and for a sharding engine the same engine and process count (its state is stored in shards)."""
        batch = self.global_batch
        if state.get("global_batch", batch) != batch:
            raise ConfigError(
                f"{path} was written with a global batch of {state['global_batch']} (batch x accumulation x "
                f"processes); this launch gives {batch}. Resume with the same batch size, accumulation and processes"
            )
        engine, world = state.get("engine", self.engine), state.get("processes", self.world)
        sharded = engines.stores_shards(engine) or engines.stores_shards(self.engine)
        if sharded and (engine != self.engine or world != self.world):
            raise ConfigError(
                f"{path} holds the sharded state of {engine} on {world} processes; this launch is {self.engine} on "
                f"{self.world}. Resume with the accelerate config and process count that wrote it"
            )

    def _log(self, row: dict) -> None:
        self.log.write(row, self.step)

    def cleanup(self) -> None:
        if getattr(self, "log", None) is not None:
            self.log.close()
        for tracker in self.acc.trackers:
            tracker.finish()
        # Not `end_training()`: it also destroys the process group, which the PartialState kept below still names, so
        # a second run in a launched process would fail ("Default process group has not been initialized").
        # accelerate keeps its settings (mixed precision, accumulation) in process-wide singletons and refuses a
        # second Accelerator with other settings; forget them, so a later run in this process (a benchmark, the
        # demo, a notebook) may choose its own. The process group (PartialState) is kept.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
