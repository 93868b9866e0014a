"""The one stateful piece: an explicit distillation loop on `accelerate.Accelerator`.

setup() builds the run's parts (egad.train.run_parts), its data windows (egad.train.windows) and optimizer
(egad.train.optim), starts the plan's run-level state (egad.objective.plan_runtime) or resumes
(egad.train.run_checkpoint); train() runs the steps with gradient clipping and accumulation; evaluate() gives dev
response NLL and teacher-student KL (egad.train.dev_eval); checkpoints are HF-format folders written atomically
(egad.train.run_checkpoint).

Exactness across accumulation and processes: every optimizer step consumes one window of `grad_accum` global
micro-batches; each process takes its slice of each (egad.data.batches.shard); the KD, CE and feature sums are
divided by the response-token count of the whole window on all processes, and the DDP gradient mean is undone by the
world size. Each token's plan (weight, temperature, route) depends on the token and on run-level state only (the step,
the entropy CDFs, which streams update once per window from counts summed over it), never on its batch-mates. So one
process with batch B, one with batch B/k and k-step accumulation, and P processes with batch B/P compute the same
update up to float summation order; tests/test_split_exactness.py checks it for every preset. The two batch rules
left as options (cdf_mode 'batch', route_mode 'batch_topk') are refused wherever a window is split.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from egad.config.run_config import RunConfig
from egad.data import batches as D
from egad.data.rollout import is_on_policy, on_policy_batch
from egad.eval.suite import scorer
from egad.models import checkpoint as ckpt
from egad.models import engines
from egad.models.load import resolve_tokenizer
from egad.objective.plan_runtime import PlanRuntime
from egad.objective.token_plan import check_window_exact
from egad.plan.curriculum import training_progress
from egad.train import run_checkpoint as rc
from egad.train.dev_eval import dev_metrics, teacher_scorer
from egad.train.optim import build_optimizer, pull_to_anchor
from egad.train.run_log import RunLog
from egad.train.run_parts import build_parts
from egad.train.windows import Windows, token_keys
from egad.xtok.pairing import teacher_tokenizer

log = logging.getLogger("egad.train.trainer")


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        self.step = 0
        self.best_dev_nll = math.inf
        self.plan = PlanRuntime(cfg.objective)  # the plan's run-level state: knots, streams, route threshold

    # ------------------------------------------------------------------ setup
    def setup(self, resume: bool = False) -> Trainer:
        cfg, t = self.cfg, self.cfg.train
        self.acc = engines.make_accelerator(t.mixed_precision)
        self.engine = engines.engine_in_use(self.acc)
        self.sharded = self.engine in engines.SHARDING
        engines.check_support(self.engine, self.cfg.train, self.cfg.model)
        engines.configure_deepspeed(
            self.acc, micro_batch=t.per_device_batch_size, grad_accum=t.grad_accum, grad_clip=t.grad_clip
        )
        set_seed(t.seed)
        self.main = self.acc.is_main_process
        with self.acc.main_process_first():
            cross = cfg.objective.cross_vocab != "none"  # the teacher may keep a tokenizer of its own
            self.tokenizer = resolve_tokenizer(self.cfg.model, self.cfg.data, cross=cross)
            # None unless the teacher keeps its own tokenizer (egad.xtok)
            self.teacher_tokenizer = teacher_tokenizer(cfg, self.tokenizer)
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
        resume_step = self.step if resumed else None
        self.log = RunLog(self.out, enabled=self.main, tensorboard=t.tensorboard, resume_step=resume_step)
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
                **engines.teacher_sizes(self.teacher_model),
                "mixed_precision": self.acc.mixed_precision,
                "teacher_source": type(self.source).__name__ if self.source is not None else None,
                "vocab": self.vocab,
                **{f"data_{k}": v for k, v in asdict(self.train_stats).items()},
            }
        )
        return self

    def _calibrate(self) -> None:
        """The plan's run-level state before the first step (egad.objective.plan_runtime), and the teacher entropies
        its knots came from, for the report's histogram."""
        t = self.cfg.train
        self.module.eval()
        sample = self.plan.calibrate(
            self.source,
            self.train_set[: t.calib_examples],
            self.acc,
            self._student_scorer(),
            cache=self.cache,
            pad_id=self.tokenizer.pad_token_id,
            batch_size=t.per_device_batch_size,
            vocab=self.vocab,
        )
        self.module.train()
        if self.main and sample is not None and self.plan.knots is not None:
            tensors = {"knots": self.plan.knots.contiguous().cpu(), "sample": sample.contiguous().float().cpu()}
            save_file(tensors, str(self.out / "entropy_knots.safetensors"))

    def _student_scorer(self):
        if self.sharded:  # through the wrapper, which gathers the sharded weights for the forward
            return lambda b: self.module(b["input_ids"], b["attention_mask"])
        return scorer(self.acc.unwrap_model(self.module).student, self.vocab)

    def _setup_models(self) -> None:
        parts = build_parts(self.cfg, self.acc, self.engine, self.tokenizer, self.train_set, self.teacher_tokenizer)
        self.module, self.teacher_model, self.source = parts.module, parts.teacher_model, parts.source
        self.cache = parts.cache
        self.pairs, self.vocab, self.placement = parts.pairs, parts.vocab, parts.placement
        self._teacher_engine = parts.teacher_engine  # holds the sharded teacher's engine for the run
        self.plan.route_threshold = parts.route_threshold

    def _setup_data(self) -> None:
        d, t = self.cfg.data, self.cfg.train
        self.train_set, self.train_stats = D.tokenized_split(d, self.tokenizer, "train")
        self.dev_set = D.tokenized_split(d, self.tokenizer, "dev")[0] if d.dev else []
        self.world = self.acc.num_processes
        self.windows = Windows(
            self.train_set,
            per_device_batch=t.per_device_batch_size,
            grad_accum=t.grad_accum,
            world=self.world,
            rank=self.acc.process_index,
            seed=t.seed,
            pad_id=self.tokenizer.pad_token_id,
            device=self.acc.device,
            max_steps=t.max_steps,
            epochs=t.epochs,
        )
        self.global_batch, self.total_steps = self.windows.global_batch, self.windows.total_steps

    def _setup_optim(self) -> None:
        student, projector = self.module.student, self.module.projector
        opt, self.sched, self.anchor = build_optimizer(student, projector, self.cfg.train, self.total_steps)
        # The scheduler is not prepared: accelerate would step it once per process (it assumes a sharded
        # dataloader), while our windows already hold the global batch. It is registered for checkpointing instead.
        self.module, self.opt = self.acc.prepare(self.module, opt)
        self.acc.register_for_checkpointing(self.sched)

    # ------------------------------------------------------------------ data
    def _student_samples(self, batch: dict[str, Tensor], micro: int) -> dict[str, Tensor]:
        student = self.acc.unwrap_model(self.module).student
        with self.acc.autocast():
            return on_policy_batch(
                student, batch, self.tokenizer, self.cfg.data, self.cfg.train, step=self.step, micro=micro,
                rank=self.acc.process_index,
            )  # fmt: skip

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
        window = self.windows(self.step)
        on_policy = [is_on_policy(t.seed, self.step, i, t.on_policy) for i in range(len(window))]
        window = [
            self._student_samples(b, i) if on else b for i, (b, on) in enumerate(zip(window, on_policy, strict=True))
        ]
        n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        n_global = float(self.acc.reduce(torch.tensor(float(n_local), device=self.acc.device), "sum"))
        progress = training_progress(self.step, self.total_steps)
        state = self.plan.state(self.step, t.seed, self.acc.device)
        sums: dict[str, float] = {}
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
                    token_keys=token_keys(batch),
                )
                engines.backward(self.acc, self.engine, loss, sync=sync)
            for k, v in metrics.items():
                # Loss terms add up over the window: each process's sum is world x its share of the global mean, so
                # the mean over processes below is the exact global value. Token statistics are averaged.
                w = 1.0 if k in ("loss", "ce", "kd", "feat") else 1.0 / len(window)
                sums[k] = sums.get(k, 0.0) + float(v) * w
            self.plan.observe(tokens)
        if t.on_policy > 0:
            sums["on_policy"] = sum(on_policy) / len(on_policy)
        if self.anchor:
            sums["anchor"] = pull_to_anchor(self.anchor, t.anchor_l2)
        if t.grad_clip > 0:
            sums["grad_norm"] = float(self.acc.clip_grad_norm_(self.module.parameters(), t.grad_clip))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.plan.end_window(lambda c: self.acc.reduce(c, "sum"), self.acc.device)
        reduced = self.acc.reduce(torch.tensor(list(sums.values()), device=self.acc.device), "mean")
        return dict(zip(sums, reduced.tolist(), strict=True)), n_global

    # ------------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, float]:
        """Dev response NLL (perplexity) of the student, and with a teacher: its NLL, KL(teacher || student), top-1
        agreement (egad.train.dev_eval)."""
        self.module.eval()
        out = dev_metrics(
            self._student_scorer(),
            teacher_scorer(self.teacher_model, self.placement, self.vocab, cross=self.teacher_tokenizer is not None),
            self.dev_set,
            self.acc,
            batch_size=self.cfg.train.per_device_batch_size,
            pad_id=self.tokenizer.pad_token_id,
            vocab=self.vocab,
        )
        self.module.train()
        return out

    def _eval_and_keep_best(self) -> None:
        ev = self.evaluate()
        ev["step"] = self.step
        self.last_eval = ev
        self._log(ev)
        if ev["dev_nll"] < self.best_dev_nll:
            self.best_dev_nll = ev["dev_nll"]
            rc.save_model_dir(self, self.out / "best", extra={"step": self.step, **ev})

    # ------------------------------------------------------------ checkpoints (egad.train.run_checkpoint)
    def save_checkpoint(self) -> Path:
        return rc.save_checkpoint(self)

    def _save_on_interrupt(self) -> None:
        """Ctrl-C mid-step: the step is discarded and the last finished one is saved, so `--resume` loses nothing.
        With several processes a collective save could hang; the periodic checkpoints serve there."""
        self.opt.zero_grad(set_to_none=True)
        if self.world == 1 and self.step > 0 and not (self.out / f"checkpoint-{self.step}").exists():
            log.warning("interrupted: saving checkpoint-%d before exiting", self.step)
            self.save_checkpoint()

    def save_final(self) -> None:
        rc.save_model_dir(self, self.out / "final", extra={"step": self.step, **getattr(self, "last_eval", {})})

    def _resume(self) -> None:
        log.info("resumed from %s at step %d", rc.resume(self), self.step)

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
