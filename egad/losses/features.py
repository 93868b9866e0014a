"""Hidden-state (feature) distillation for the hard branch (spec section 5).

Layer indices follow HF `hidden_states`: 0 is the embedding output and L the last layer. Student layer m is mapped to
teacher layer g(m); a `Linear(d_S -> d_T, bias=False)` per mapped layer projects the student into the teacher's space.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding; the TinyBERT map wants 0.5 -> 1.
    return int(math.floor(x + 0.5))


def uniform_layer_map(student_layers: int, teacher_layers: int, k: int = 4) -> list[tuple[int, int]]:
    """TinyBERT-style uniform map (Jiao et al., 2020): m_k = round(k L_S / K), g(m) = round(m L_T / L_S), k = 1..K.

    Example: Qwen2.5-0.5B (24 layers) -> 7B (28 layers), K=4: [(6, 7), (12, 14), (18, 21), (24, 28)].
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got student={student_layers}, teacher={teacher_layers}")
    if not 1 <= k <= student_layers:
        raise ValueError(f"feat_layers K={k} must be in [1, student_layers={student_layers}]")
    pairs = []
    for i in range(1, k + 1):
        m = _round_half_up(i * student_layers / k)
        pairs.append((m, _round_half_up(m * teacher_layers / student_layers)))
    return pairs


def last_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """DistilBERT-style (Sanh et al., 2019): the last layer only."""
    return [(student_layers, teacher_layers)]


def layer_map(kind: str, student_layers: int, teacher_layers: int, k: int = 4) -> list[tuple[int, int]]:
    """Dispatch on the config's `layer_map` name ('uniform' or 'last')."""
    if kind == "uniform":
        return uniform_layer_map(student_layers, teacher_layers, k)
    if kind == "last":
        return last_layer_map(student_layers, teacher_layers)
    raise ValueError(f"layer_map={kind!r} is not one of ['uniform', 'last']")


def feature_pairs(
    kind: str, student_layers: int, teacher_layers: int, k: int = 4, copied_from: list[int] | None = None
) -> list[tuple[int, int]]:
    """The (student, teacher) hidden-state pairs of the feature branch. For a student cut from the teacher,
    `copied_from[i]` is the 0-based teacher block that student block i was copied from: each mapped student layer
    then pairs with the output of its own source block (the embeddings, layer 0, with the teacher's)."""
    pairs = layer_map(kind, student_layers, teacher_layers, k)
    if copied_from is None:
        return pairs
    if len(copied_from) != student_layers:
        raise ValueError(f"copied_from has {len(copied_from)} entries for {student_layers} student layers")
    return [(m, 0 if m == 0 else copied_from[m - 1] + 1) for m, _ in pairs]


class FeatureProjector(nn.Module):
    """One bias-free linear map student -> teacher per mapped layer (TinyBERT W_h, DSKD 's-t' projector).

    Xavier-uniform init. Trained with the student and saved beside it; not needed at inference.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_layers: int) -> None:
        super().__init__()
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.proj = nn.ModuleList(nn.Linear(student_dim, teacher_dim, bias=False) for _ in range(num_layers))
        for lin in self.proj:
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, k: int, h: Tensor) -> Tensor:
        return self.proj[k](h)


def cosine_feature_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """1 - cos(student, teacher) per row, fp32 (DistilBERT's CosineEmbeddingLoss with target 1). (N, d) -> (N,)."""
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)


def mse_ln_feature_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """||LN(s) - LN(t)||^2 / d with a parameter-free layer norm, fp32 (ours).

    The norm removes the 'massive activation' outlier dimensions that dominate a raw MSE on modern LLMs.
    """
    d = student.shape[-1]
    s = F.layer_norm(student.float(), (d,))
    t = F.layer_norm(teacher.float(), (d,))
    return (s - t).pow(2).sum(-1) / d


FEATURE_LOSSES = {"cosine": cosine_feature_loss, "mse_ln": mse_ln_feature_loss}


def feature_loss(
    student_feats: list[Tensor],
    teacher_feats: list[Tensor],
    projector: FeatureProjector,
    *,
    kind: str = "cosine",
) -> Tensor:
    """Per-token feature loss averaged over the K mapped layers: (1/K) sum_k l(P_k h^S_k, sg(h^T_k)).

    student_feats[k]: (N_r, d_S) and teacher_feats[k]: (N_r, d_T), already gathered at the routed tokens only.
    Returns (N_r,) fp32. The teacher features are detached.
    """
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"feat_loss={kind!r} is not one of {list(FEATURE_LOSSES)}")
    if not (len(student_feats) == len(teacher_feats) == len(projector.proj)):
        raise ValueError(
            f"got {len(student_feats)} student and {len(teacher_feats)} teacher feature layers for "
            f"{len(projector.proj)} projections; they must match the layer map"
        )
    fn = FEATURE_LOSSES[kind]
    total = None
    for k, (hs, ht) in enumerate(zip(student_feats, teacher_feats, strict=True)):
        if hs.shape[0] != ht.shape[0]:
            raise ValueError(f"layer {k}: {hs.shape[0]} student rows vs {ht.shape[0]} teacher rows")
        # Project in the projector's dtype; the loss itself is fp32.
        proj_w = projector.proj[k].weight
        term = fn(projector(k, hs.to(proj_w.dtype)), ht.detach())
        total = term if total is None else total + term
    assert total is not None
    return total / len(student_feats)
