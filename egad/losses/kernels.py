"""The losses' full-vocabulary passes as fused kernels, compiled by `torch.compile` where it works: the student
atoms' (below) and the online teacher's forward KL (`kl_forward`, `kl_grad`, for `egad.losses.fused_kl`).

`egad.losses.student_atoms` needs, per row of the student logits z (N, V): the maximum m, the normaliser
sum exp((z - m) / tau) and, with a cross-entropy at another temperature, sum exp(z - m); in the backward, the dense
part of the gradient a exp((z - m) / tau) + b exp(z - m) with per-row coefficients a and b. In eager PyTorch that is
a dozen (N, V) passes and a saved (N, V) buffer; each compiled kernel reads z once or twice and writes at most one
(N, V) tensor, and the forward saves none (the backward recomputes the exponentials from z, as Liger's and TRL's
chunked losses recompute theirs). The values agree with the eager passes to float32 rounding, not bit for bit.

Which path runs is the calling thread's mode, set for a scope by `using` (the objective passes `objective.kernels`;
a forward hands its mode to its backward):

* ``eager``: PyTorch's own operations, no compiler (the default of a bare call, so the pure functions stay pure);
* ``compiled``: the kernels, or an error when `torch.compile` cannot build them here;
* ``auto``: the kernels, or eager with one warning when `torch.compile` fails (no C++ compiler on a CPU host, no
  Triton on a GPU one). A failure is remembered per device type for the process.

The first call on a device compiles (seconds); later shapes reuse it (`dynamic=True`), and so do later processes
through inductor's on-disk cache.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["MODES", "active", "current", "dense_grad", "kl_forward", "kl_grad", "normalisers", "using"]

MODES = ("auto", "compiled", "eager")

_state = threading.local()
_broken: dict[str, str] = {}  # device type -> why torch.compile failed there ("auto" falls back)
_compiled: dict[str, Callable] = {}
_over_limit: set[str] = set()  # kernels that reached torch's recompile limit (warned once)


def _mode() -> str:
    return getattr(_state, "mode", "eager")


@contextlib.contextmanager
def using(mode: str) -> Iterator[None]:
    """Run the student atoms' passes in `mode` (one of MODES) inside the block."""
    if mode not in MODES:
        raise ValueError(f"kernels mode {mode!r} is not one of {list(MODES)}")
    before = _mode()
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = before


def current() -> str:
    """The mode in force in this thread. A backward may run in another thread (the autograd engine's, on a GPU), so
    a forward that takes the kernels records the mode and hands it to the backward's calls."""
    return _mode()


def active(z: Tensor, mode: str | None = None) -> bool:
    """True when the fused kernels serve z's device in `mode` (default: the current one; auto: unless they failed
    there)."""
    mode = mode or _mode()
    return mode == "compiled" or (mode == "auto" and z.device.type not in _broken)


def _normalisers(z: Tensor, tau: Tensor, with_ce: bool) -> tuple[Tensor, Tensor, Tensor]:
    m = z.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)  # a row of -inf: exp gives 0 and log 0 = -inf, as log_softmax
    s = z - m
    total = torch.exp(s / tau).sum(-1, keepdim=True)
    total1 = torch.exp(s).sum(-1, keepdim=True) if with_ce else total
    return m, total, total1


def _dense_grad(z: Tensor, m: Tensor, tau: Tensor, a: Tensor, b: Tensor | None) -> Tensor:
    s = z - m
    out = torch.exp(s / tau) * a
    return out + torch.exp(s) * b if b is not None else out


def _row_max(x: Tensor) -> Tensor:
    m = x.amax(-1, keepdim=True)
    return torch.where(m == float("-inf"), 0.0, m)


def _kl_forward(zs: Tensor, zt: Tensor, tau: Tensor) -> tuple[Tensor, ...]:
    # log p - log q = d + log Zs - log Zt with d the shifted difference: no (N, V) log-probabilities are formed. A term
    # is dropped where either side is -inf (p or q is 0), so a masked entry adds nothing and NaN still propagates.
    a, b = zs / tau, zt / tau
    ms, mt = _row_max(a), _row_max(b)
    sa, sb = a - ms, b - mt
    total_s = torch.exp(sa).sum(-1, keepdim=True)
    eb = torch.exp(sb)
    total_t = eb.sum(-1, keepdim=True)
    keep = (a != float("-inf")) & (b != float("-inf"))
    w = torch.where(keep, eb, 0.0)
    kept = w.sum(-1, keepdim=True)
    dot = (w * torch.where(keep, sb - sa, 0.0)).sum(-1, keepdim=True)
    safe_t = torch.where(total_t > 0, total_t, 1.0)
    kl = torch.where(kept > 0, (dot + kept * (total_s.log() - safe_t.log())) / safe_t, 0.0)
    return ms, total_s, mt, safe_t, kl, kept / safe_t


def _kl_grad(zs: Tensor, zt: Tensor, tau: Tensor, ms: Tensor, total_s: Tensor, mt: Tensor, total_t: Tensor,
             cq: Tensor, cp: Tensor) -> Tensor:  # fmt: skip
    a = zs / tau
    q = torch.exp(a - ms) / torch.where(total_s > 0, total_s, 1.0)
    p = torch.where(a != float("-inf"), torch.exp(zt / tau - mt) / total_t, 0.0)
    return q * cq - p * cp


_EAGER = {"normalisers": _normalisers, "dense_grad": _dense_grad, "kl_forward": _kl_forward, "kl_grad": _kl_grad}


def _kernel(name: str) -> Callable:
    if name not in _compiled:
        _compiled[name] = torch.compile(_EAGER[name], dynamic=True, fullgraph=True)
    return _compiled[name]


def _call(name: str, mode: str | None, z: Tensor, *args):
    mode = mode or _mode()
    if not active(z, mode):
        return _EAGER[name](z, *args)
    try:
        # The kernels are outside autograd: one grad mode for every caller, or each mode would be another variant.
        with torch.no_grad():
            return _kernel(name)(z, *args)
    except Exception as exc:  # torch.compile reports a missing compiler or backend with many exception types
        if type(exc).__name__ == "FailOnRecompileLimitHit":
            return _over_recompile_limit(name, z, *args)
        if mode == "compiled":
            raise RuntimeError(
                f"objective.kernels='compiled', but torch.compile cannot build egad's fused kernels on "
                f"{z.device.type}: {type(exc).__name__}: {exc}. Install a C++ compiler (CPU) or Triton (GPU), or "
                "set objective.kernels to 'auto' (falls back to eager) or 'eager'."
            ) from exc
        _broken[z.device.type] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"egad's fused loss kernels could not be compiled on {z.device.type} ({type(exc).__name__}: "
            f"{str(exc)[:200]}); using eager PyTorch, which is slower. Set objective.kernels='eager' to skip the try.",
            RuntimeWarning,
            stacklevel=3,
        )
        return _EAGER[name](z, *args)


def _over_recompile_limit(name: str, z: Tensor, *args):
    """Not a missing compiler: this process has compiled the kernel for more input variants (sizes of 1, strides,
    flags) than torch allows per function. The variants compiled so far stay compiled; a new one runs eager."""
    if name not in _over_limit:
        _over_limit.add(name)
        warnings.warn(
            f"egad's fused kernel {name!r} reached torch's recompile limit (torch._dynamo.config.recompile_limit = "
            f"{torch._dynamo.config.recompile_limit}) in this process; input variants past it run in eager PyTorch. "
            "Raise the limit to keep them compiled.",
            RuntimeWarning,
            stacklevel=4,
        )
    return _EAGER[name](z, *args)


def normalisers(z: Tensor, tau: Tensor, *, with_ce: bool, mode: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(m, sum exp((z - m) / tau), sum exp(z - m)), each (N, 1), for z (N, V) fp32 and tau (N, 1) fp32 > 0; m is
    the row maximum (0 on a row of -inf). Without `with_ce` the third is the second. `mode`: default the current."""
    return _call("normalisers", mode, z, tau, with_ce)


def dense_grad(z: Tensor, m: Tensor, tau: Tensor, a: Tensor, b: Tensor | None, *, mode: str | None = None) -> Tensor:
    """a exp((z - m) / tau) + b exp(z - m), a new (N, V) fp32 tensor; m, tau, a, b (N, 1), b optional. `mode`:
    default the current."""
    return _call("dense_grad", mode, z, m, tau, a, b)


def kl_forward(zs: Tensor, zt: Tensor, tau: Tensor, *, mode: str | None = None) -> tuple[Tensor, ...]:
    """Forward KL(p || q) per row, p = softmax(zt / tau), q = softmax(zs / tau), terms dropped where either side is
    -inf, in one fused kernel: (ms, Zs, mt, Zt, kl, S), each (N, 1), with m the row maxima of the tempered logits,
    Z the normalisers (Zt 1 on a teacher row of -inf) and S the teacher mass on the kept entries. zs, zt (N, V) fp32;
    tau (N, 1) fp32 > 0. `mode`: default the current."""
    return _call("kl_forward", mode, zs, zt, tau)


def kl_grad(zs: Tensor, zt: Tensor, tau: Tensor, ms: Tensor, total_s: Tensor, mt: Tensor, total_t: Tensor,
            cq: Tensor, cp: Tensor, *, mode: str | None = None) -> Tensor:  # fmt: skip
    """cq q - cp p_kept, a new (N, V) fp32 tensor, from `kl_forward`'s row statistics (p_kept: p where zs is not
    -inf); cq, cp (N, 1). `mode`: default the current."""
    return _call("kl_grad", mode, zs, zt, tau, ms, total_s, mt, total_t, cq, cp)
