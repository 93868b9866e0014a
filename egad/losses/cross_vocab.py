"""Per-token distillation losses between a teacher and a student whose vocabularies differ.

The rows compared are aligned positions (`egad.xtok.align`): the teacher's logits z_T (N, V_T) and the student's z_S
(N, V_S) predict the token that starts at the same character of the same text, each over its own vocabulary.
Signatures follow `egad.losses`: ``fn(student_logits, teacher_logits, vmap, *, temperature, **hyper) -> (N,)`` fp32,
``temperature`` a float or an (N,) tensor dividing both sides' logits, no tau^2 factor (the caller applies it). Logits
arrive sliced to each tokenizer's real vocabulary (padded rows away), which `vmap` records.

EXACT MATCHING (`exact`). `VocabMap` pairs G teacher ids with G student ids whose tokens decode to the same bytes
(`egad.xtok.vocab.build_vocab_map`; each string once per side). Both models are mapped to G + 1 outcomes: the G
matched tokens, and one tail bucket holding everything else: log p_tail = logsumexp of the teacher's unmatched
log-probs, log q_tail the same over the student's unmatched ids (a logsumexp, so it stays exact when the matched mass
is ~1; -inf with nothing unmatched). The dense divergence of `egad.losses.divergences` then runs on the bucket
log-probs at temperature 1, tempering having been applied to the full vocabularies first, as the sparse path does
(`egad.losses.sparse`). The teacher's and the student's unmatched tokens are different strings; the one shared tail
bucket is the coarsening that keeps the loss a divergence between two distributions over the same outcomes (a lower
bound of any finer comparison, by data processing). With identical vocabularies and the identity map the tail is
empty on both sides and `exact` equals the same-tokenizer divergence. TTM, WTTM and BiLD temper or rank logits in
their own way and are not offered here.

ULD (`uld`). Universal Logit Distillation, Boizard, El Haddad, Hudelot & Colombo, 2024, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss for LLMs" (arXiv:2402.12030): the closed-form Wasserstein-1
distance between the two distributions once their supports are put in rank order,
    ULD = sum_i | p_(i) - q_(i) |,   p_(1) >= p_(2) >= ... sorted, the shorter vector padded with zeros,
p = softmax(z_T / tau), q = softmax(z_S / tau). It needs no vocabulary map; it ignores which token carries which
probability (only the shape of the distribution is taught). The paper adds it to the CE with a weight; here it is
a per-token value like any divergence. Its gradient flows through the sort (a permutation; ties are measure zero).

HYBRID (`hybrid`), as in TRL's GOLD trainer (ULD "hybrid" mode): the matched part exactly, the rest by ULD,
    hybrid = w * exact(divergence) + (1 - w) * sum_i | p^u_(i) - q^u_(i) |,
with p^u, q^u the probabilities of the unmatched teacher and student tokens (not renormalised), sorted and
zero-padded. `exact` already matches the total unmatched mass through its tail bucket; the ULD term teaches its
shape. w = `matched_weight`, default 0.5 (GOLD's default is G / V_T, the teacher's matched share; pass it).

CHUNKED (`chunked_cross_vocab_loss`). From the final hidden states and the heads, chunk by chunk: neither (N, V_T)
nor (N, V_S) logits are ever alive, only (C, V) ones for a chunk of C rows; the student's gradient is accumulated
into (N, d_S) and (V_S, d_S) buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from egad.heads import OutputHead
from egad.losses.divergences import _NEG, DIVERGENCES, _temper

__all__ = [
    "CROSS_VOCAB_LOSSES",
    "EXACT_DIVERGENCES",
    "VocabMap",
    "chunked_cross_vocab_loss",
    "exact",
    "hybrid",
    "matched_logprobs",
    "uld",
]

# The dense divergences that temper both sides by tau and read probabilities only: they run on the buckets.
EXACT_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "akl", "todi")


# ------------------------------------------------------------------------------------------------------ the map
@dataclass(frozen=True)
class VocabMap:
    """G matched pairs: teacher id `teacher_ids[g]` and student id `student_ids[g]` are the same token (each id at
    most once). teacher_vocab, student_vocab: the real vocabulary sizes (logit columns beyond are padding)."""

    teacher_ids: Tensor  # (G,) long
    student_ids: Tensor  # (G,) long
    teacher_vocab: int
    student_vocab: int
    _on: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        t, s = self.teacher_ids, self.student_ids
        if t.dim() != 1 or t.shape != s.shape:
            raise ValueError(f"VocabMap ids must both be (G,), got {tuple(t.shape)} and {tuple(s.shape)}")
        for name, ids, v in (("teacher", t, self.teacher_vocab), ("student", s, self.student_vocab)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
                raise ValueError(f"VocabMap {name}_ids must lie in [0, {v})")
            if ids.unique().numel() != ids.numel():
                raise ValueError(f"VocabMap {name}_ids must be distinct (one bucket per token)")

    @classmethod
    def identity(cls, vocab: int) -> VocabMap:
        """The map of two identical vocabularies: every id to itself."""
        ids = torch.arange(vocab)
        return cls(ids, ids.clone(), vocab, vocab)

    @property
    def size(self) -> int:
        return self.teacher_ids.numel()

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(teacher ids, student ids, teacher unmatched ids, student unmatched ids) on `device`, cached."""
        key = str(device)
        if key not in self._on:
            rest = []
            for ids, v in ((self.teacher_ids, self.teacher_vocab), (self.student_ids, self.student_vocab)):
                keep = torch.ones(v, dtype=torch.bool)
                keep[ids] = False
                rest.append(keep.nonzero().squeeze(1))
            self._on[key] = tuple(x.to(device) for x in (self.teacher_ids, self.student_ids, *rest))
        return self._on[key]


def _check(student_logits: Tensor, teacher_logits: Tensor, vmap: VocabMap | None) -> tuple[Tensor, Tensor]:
    if student_logits.dim() != 2 or teacher_logits.dim() != 2 or student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            "expected student logits (N, V_S) and teacher logits (N, V_T) for the same N aligned rows; got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    widths = (student_logits.shape[1], teacher_logits.shape[1])
    if vmap is not None and widths != (vmap.student_vocab, vmap.teacher_vocab):
        raise ValueError(
            f"logits have {student_logits.shape[1]} (student) and {teacher_logits.shape[1]} (teacher) columns, the "
            f"vocabulary map {vmap.student_vocab} and {vmap.teacher_vocab}: slice padded rows away first "
            "(logits[..., :len(tokenizer)])"
        )
    return student_logits.float(), teacher_logits.float()


# ------------------------------------------------------------------------------------------------ exact matching
def _tempered(z: Tensor, tau: float | Tensor) -> Tensor:
    # At a float tau of 1 the logits are used as they are: no (C, V) copy.
    return z if isinstance(tau, float) and tau == 1.0 else _temper(z, tau)


def _tail(rest: Tensor) -> Tensor:
    """log of the mass of the `rest` log-prob columns, (N, R) -> (N,); -inf (zero gradient) where there is none."""
    if not rest.requires_grad:
        return torch.logsumexp(rest, dim=-1)  # -inf for an all -inf (or empty) row
    # A finite floor keeps logsumexp's backward finite when every remaining entry is -inf (masked vocabulary).
    lse = torch.logsumexp(rest.clamp_min(_NEG), dim=-1)
    return torch.where(lse > _NEG / 2, lse, -math.inf)


def _side(logx: Tensor, ids: Tensor, rest_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(log-probs over the matched ids and the tail bucket (N, G+1), the unmatched log-probs). Without a gradient
    (the teacher) the unmatched part is `logx` itself with the matched columns set to -inf in place (no (N, V) copy;
    the extra zeros change neither the tail nor a sorted, zero-padded comparison); with one, a gathered copy."""
    matched = logx.index_select(-1, ids)  # (N, G)
    rest = logx.index_fill_(-1, ids, -math.inf) if not logx.requires_grad else logx.index_select(-1, rest_ids)
    return torch.cat([matched, _tail(rest)[:, None]], dim=-1), rest


def _buckets(logq: Tensor, logp: Tensor, vmap: VocabMap) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log q, log p) over the G + 1 outcomes, and each side's unmatched log-probs (see `_side`)."""
    t_ids, s_ids, t_rest, s_rest = vmap.on(logq.device)
    q, q_rest = _side(logq, s_ids, s_rest)
    p, p_rest = _side(logp, t_ids, t_rest)
    return q, p, q_rest, p_rest


def _log_probs(student_logits, teacher_logits, vmap, temperature) -> tuple[Tensor, Tensor]:
    zs, zt = _check(student_logits, teacher_logits, vmap)
    return torch.log_softmax(_tempered(zs, temperature), dim=-1), torch.log_softmax(_tempered(zt, temperature), dim=-1)


def matched_logprobs(
    student_logits: Tensor, teacher_logits: Tensor, vmap: VocabMap, *, temperature: float | Tensor = 1.0
) -> tuple[Tensor, Tensor]:
    """(log q, log p) over the G matched tokens and the tail bucket, at `temperature`. (N, V_S), (N, V_T) ->
    (N, G+1) each; each row sums to 1 exactly (both come from the full-vocabulary softmax)."""
    return _buckets(*_log_probs(student_logits, teacher_logits, vmap, temperature), vmap)[:2]


def _divergence(name: str) -> Callable[..., Tensor]:
    if name not in EXACT_DIVERGENCES:
        raise ValueError(f"divergence={name!r} is not offered across vocabularies; expected one of {EXACT_DIVERGENCES}")
    return DIVERGENCES[name]


def exact(
    student_logits: Tensor,
    teacher_logits: Tensor,
    vmap: VocabMap,
    *,
    temperature: float | Tensor = 1.0,
    divergence: str = "forward_kl",
    **hyper: float,
) -> Tensor:
    """`divergence` (forward_kl = KL(teacher || student) by default) between the two models' distributions over the
    matched tokens plus one tail bucket (module docstring). Hyper-parameters (beta, lam, mu) are the dense
    function's. (N, V_S), (N, V_T) -> (N,)"""
    fn = _divergence(divergence)
    logq, logp = matched_logprobs(student_logits, teacher_logits, vmap, temperature=temperature)
    return fn(logq, logp, temperature=1.0, **hyper)


# ------------------------------------------------------------------------------------------------------------- ULD
def _sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """sum_i |p_(i) - q_(i)| of descending-sorted rows, the shorter one zero-padded. (N, A), (N, B) -> (N,)"""
    p = torch.sort(p, dim=-1, descending=True).values if p.shape[-1] else p
    q = torch.sort(q, dim=-1, descending=True).values if q.shape[-1] else q
    m = min(p.shape[-1], q.shape[-1])
    # Beyond the shorter length the padding is 0: |x - 0| = x, summed directly (no padded copy).
    return (p[:, :m] - q[:, :m]).abs().sum(-1) + p[:, m:].sum(-1) + q[:, m:].sum(-1)


def uld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    vmap: VocabMap | None = None,
    *,
    temperature: float | Tensor = 1.0,
) -> Tensor:
    """Universal Logit Distillation: sum_i |p_(i) - q_(i)| over the sorted, zero-padded probabilities (module
    docstring; Boizard et al. 2024, arXiv:2402.12030). `vmap` only checks the vocabulary sizes. (N, V_S), (N, V_T)
    -> (N,)"""
    logq, logp = _log_probs(student_logits, teacher_logits, vmap, temperature)
    return _sorted_l1(logp.exp(), logq.exp())


def hybrid(
    student_logits: Tensor,
    teacher_logits: Tensor,
    vmap: VocabMap,
    *,
    temperature: float | Tensor = 1.0,
    matched_weight: float = 0.5,
    divergence: str = "forward_kl",
    **hyper: float,
) -> Tensor:
    """GOLD-style hybrid: matched_weight * exact + (1 - matched_weight) * ULD over the unmatched tokens (module
    docstring). (N, V_S), (N, V_T) -> (N,)"""
    if not 0.0 <= matched_weight <= 1.0:
        raise ValueError(f"matched_weight must be in [0, 1], got {matched_weight}")
    fn = _divergence(divergence)
    bq, bp, q_rest, p_rest = _buckets(*_log_probs(student_logits, teacher_logits, vmap, temperature), vmap)
    rest = _sorted_l1(p_rest.exp(), q_rest.exp())
    return matched_weight * fn(bq, bp, temperature=1.0, **hyper) + (1.0 - matched_weight) * rest


CROSS_VOCAB_LOSSES: dict[str, Callable[..., Tensor]] = {"exact": exact, "uld": uld, "hybrid": hybrid}


# --------------------------------------------------------------------------------------------------------- chunked
@dataclass
class _Run:
    fn: Callable[..., Tensor]
    hyper: dict
    vmap: VocabMap | None
    s_head: OutputHead  # weight/bias detached; the autograd inputs are passed to the Function separately
    t_head: OutputHead
    t_hidden: Tensor  # (N, d_T)
    v_s: int
    v_t: int
    temperature: float | Tensor
    step: int
    weights: Tensor | None  # (N,) the caller's reduction weights, or None
    grads: tuple[bool, bool, bool]  # hidden, weight, bias need a gradient
    plan: Callable[[Tensor, slice], tuple[Tensor, Tensor]] | None = None  # see chunked_cross_vocab_loss

    def chunk(self, hs: Tensor, sl: slice, coef: Tensor | None):
        """Per-token values of rows `sl`, and with `coef` (N,) the gradient of sum(coef[sl] * values) w.r.t. the
        linear part of the student head's output. -> (C,), (C, V_S) or None"""
        with torch.no_grad():
            # (C, V_T) fp32: the chunk's one teacher projection, in the head's dtype (no fp32 copy of the weight)
            zt = self.t_head.logits(self.t_hidden[sl].to(self.t_head.weight.dtype), self.v_t).float()
            if self.plan is not None:  # first sweep: the caller's plan fills the chunk's temperatures and weights
                tau_c, w_c = self.plan(zt, sl)
                self.temperature[sl], self.weights[sl] = tau_c, w_c  # type: ignore[index]
        tau = self.temperature
        tau = tau[sl] if isinstance(tau, Tensor) and tau.dim() else tau
        coef = None if coef is None else coef[sl]
        with torch.enable_grad():
            x = hs[sl].detach().to(self.s_head.weight.dtype)
            leaf = self.s_head.linear(x, self.v_s).float().detach().requires_grad_(coef is not None)  # (C, V_S)
            values = self.fn(self.s_head.finish(leaf, self.v_s), zt, self.vmap, temperature=tau, **self.hyper)
            if coef is None:
                return values.detach(), None
            (g,) = torch.autograd.grad((values * coef).sum(), [leaf])  # (C, V_S)
        return values.detach(), g

    def accumulate(self, hs: Tensor, sl: slice, g: Tensor, bufs: list[Tensor | None]) -> None:
        gh, gw, gb = bufs
        head, w = self.s_head, self.s_head.weight[: self.v_s]
        if gh is not None:
            gh[sl] += (g.to(w.dtype) @ w).float() * head.hidden_scale
        if gw is not None:
            x = hs[sl].detach().float() * head.hidden_scale
            gw[: self.v_s].addmm_(g.t(), x)
        if gb is not None:
            gb[: self.v_s] += g.sum(0)

    def buffers(self, hs: Tensor, w: Tensor, b: Tensor | None) -> list[Tensor | None]:
        like = (hs, w, b)
        return [torch.zeros(t.shape, device=t.device, dtype=torch.float32) if need else None
                for t, need in zip(like, self.grads, strict=True)]  # fmt: skip

    def sweep(self, hs: Tensor, w: Tensor, b: Tensor | None, coef: Tensor | None):
        """Every chunk: values (N,), and with `coef` the gradient buffers of sum(coef * values)."""
        n = hs.shape[0]
        out = torch.empty(n, device=hs.device, dtype=torch.float32)
        bufs = self.buffers(hs, w, b) if coef is not None else [None, None, None]
        for start in range(0, n, self.step):
            sl = slice(start, start + self.step)
            values, g = self.chunk(hs, sl, coef)
            out[sl] = values
            if g is not None:
                self.accumulate(hs, sl, g, bufs)
        return out, bufs


def _scale_of(g: Tensor, w: Tensor) -> float | None:
    """c with g == c * w (to fp32 rounding), or None."""
    g, w = g.detach().double(), w.detach().double()
    ww = float((w * w).sum())
    if ww == 0.0:
        return 0.0 if not bool(g.any()) else None
    c = float((g * w).sum()) / ww
    tol = 1e-6 * max(float(g.abs().max()), 1e-30)
    return c if float((g - c * w).abs().max()) <= tol else None


class _ChunkedCrossVocab(torch.autograd.Function):
    """Per-token values (N,); the student gradient from the chunks, computed in forward when the caller's reduction
    weights are known (`token_weights`) and the upstream gradient turns out proportional to them, else by
    re-projecting every chunk in backward."""

    @staticmethod
    def forward(ctx, hs: Tensor, w: Tensor, b: Tensor | None, run: _Run):  # type: ignore[override]
        need = any(run.grads) and run.weights is not None
        out, bufs = run.sweep(hs, w, b, run.weights if need else None)
        run.plan = None  # planned once: a backward sweep reads the filled temperatures and weights
        ctx.run, ctx.pre = run, (bufs if need else None)
        ctx.save_for_backward(hs, w, *(() if b is None else (b,)))
        ctx.dtypes = (hs.dtype, w.dtype, None if b is None else b.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out: Tensor):  # type: ignore[override]
        run = ctx.run
        hs, w, *b = ctx.saved_tensors
        b = b[0] if b else None
        scale = _scale_of(g_out, run.weights) if ctx.pre is not None else None
        if scale is not None:
            bufs = [None if t is None else t.mul_(scale) for t in ctx.pre]
        else:
            bufs = run.sweep(hs, w, b, g_out.float())[1]
        ctx.pre = None
        grads = [None if t is None else t.to(dt) for t, dt in zip(bufs, ctx.dtypes, strict=True)]
        return (*grads, None)


def _as_head(head: OutputHead | Tensor) -> OutputHead:
    return head if isinstance(head, OutputHead) else OutputHead(head)


def chunked_cross_vocab_loss(
    student_hidden: Tensor,
    student_head: OutputHead | Tensor,
    teacher_hidden: Tensor,
    teacher_head: OutputHead | Tensor,
    vmap: VocabMap | None,
    *,
    loss: str = "exact",
    temperature: float | Tensor = 1.0,
    student_vocab: int | None = None,
    teacher_vocab: int | None = None,
    chunk_size: int | None = None,
    token_weights: Tensor | None = None,
    plan: Callable[[Tensor, slice], tuple[Tensor, Tensor]] | None = None,
    **hyper: float | str,
) -> Tensor:
    """Per-token `CROSS_VOCAB_LOSSES[loss]` from the final hidden states of aligned rows and the heads. -> (N,) fp32

    student_hidden (N, d_S) and teacher_hidden (N, d_T): row i of each is one aligned pair (gather them with
    `egad.xtok.Alignment.logit_positions`). Heads: an `egad.heads.OutputHead` or a bare (V_rows, d) weight. Real
    vocabularies: the map's, else `student_vocab` / `teacher_vocab`, else the heads' rows. `chunk_size`: rows per
    chunk (default 2^24 / max(V_T, V_S), at least 16, as `ObjectiveConfig.chunk_tokens`). Gradients reach the
    student's hidden states, head weight and bias; the teacher gets none.

    `token_weights` (N,), without gradient: the weights the caller reduces with, as (values * token_weights).sum()
    times any constant (the objective's w_t tau_t^2 / N). The student gradient is then computed in the forward pass,
    one teacher projection per chunk. Without them (or when the upstream gradient is not proportional to them) the
    backward re-projects every chunk: exact, at twice the head GEMMs.

    `plan(teacher_logits, rows) -> (temperature, token_weights)`, for a caller whose temperatures and weights depend
    on the teacher (egad's per-token plan reads its entropy): called once per chunk under no_grad with the chunk's
    teacher logits (C, V_T) fp32 and its row slice, before the chunk's loss, so that the plan and the loss share the
    chunk's one teacher projection; it returns (C,) each, and `temperature` / `token_weights` are then ignored. Read
    the filled values back from the caller's side (the plan sees every row once, in order).
    """
    if loss not in CROSS_VOCAB_LOSSES:
        raise ValueError(f"loss={loss!r}; expected one of {sorted(CROSS_VOCAB_LOSSES)}")
    if loss != "uld" and vmap is None:
        raise ValueError(f"loss={loss!r} needs the vocabulary map (egad.xtok.build_vocab_map)")
    s_head, t_head = _as_head(student_head), _as_head(teacher_head)
    n = student_hidden.shape[0]
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != n:
        raise ValueError(
            f"expected student_hidden (N, d_S) and teacher_hidden (N, d_T); got {tuple(student_hidden.shape)} and "
            f"{tuple(teacher_hidden.shape)}"
        )
    v_s = vmap.student_vocab if vmap is not None else (student_vocab or s_head.rows)
    v_t = vmap.teacher_vocab if vmap is not None else (teacher_vocab or t_head.rows)
    if v_s > s_head.rows or v_t > t_head.rows:
        raise ValueError(
            f"vocabularies ({v_s} student, {v_t} teacher) exceed the head rows ({s_head.rows}, {t_head.rows})"
        )
    if isinstance(temperature, Tensor) and temperature.dim() and temperature.shape != (n,):
        raise ValueError(f"temperature must be a float or an ({n},) tensor, got {tuple(temperature.shape)}")
    if token_weights is not None and token_weights.shape != (n,):
        raise ValueError(f"token_weights must have shape ({n},), got {tuple(token_weights.shape)}")
    w, b = s_head.weight, s_head.bias
    trains = [t is not None and t.requires_grad for t in (student_hidden, w, b)]
    grads = tuple(torch.is_grad_enabled() and x for x in trains)
    frozen = OutputHead(w.detach(), None if b is None else b.detach(), s_head.hidden_scale, s_head.logit_scale,
                        s_head.softcap)  # fmt: skip
    tau = temperature.detach().float() if isinstance(temperature, Tensor) else temperature
    if plan is not None:  # filled chunk by chunk by the plan
        device = student_hidden.device
        tau = torch.ones(n, device=device, dtype=torch.float32)
        token_weights = torch.zeros(n, device=device, dtype=torch.float32)
    run = _Run(
        fn=CROSS_VOCAB_LOSSES[loss],
        hyper=dict(hyper),
        vmap=vmap,
        s_head=frozen,
        t_head=t_head,
        t_hidden=teacher_hidden.detach(),
        v_s=v_s,
        v_t=v_t,
        temperature=tau,
        step=chunk_size or max(16, 2**24 // max(v_s, v_t)),
        weights=None if token_weights is None else token_weights.detach().float(),
        grads=grads,  # type: ignore[arg-type]
        plan=plan,
    )
    if not any(grads):
        with torch.no_grad():
            return run.sweep(student_hidden, w, b, None)[0]
    return _ChunkedCrossVocab.apply(student_hidden, w, b, run)
