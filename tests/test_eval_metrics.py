"""Teacher-forced metrics against a float64 reference, and the entropy-decile split."""

from __future__ import annotations

import torch

from egad.eval.metrics import entropy_buckets, response_sums, token_metrics


def test_response_sums_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(3, 47, 123, generator=g), torch.randn(3, 47, 130, generator=g) * 2
    targets = torch.randint(0, 123, (3, 47), generator=g)
    targets[:, :9] = -100
    got = response_sums(zs, targets, vocab_size=123, teacher_logits=zt, chunk_size=13)
    m = targets != -100
    s, t, y = zs[m].double(), zt[m][:, :123].double(), targets[m]
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    rows = torch.arange(len(y))
    want = {
        "nll": -ls[rows, y].sum(),
        "teacher_nll": -lt[rows, y].sum(),
        "kl": (lt.exp() * (lt - ls)).sum(),
        "agree": (s.argmax(-1) == t.argmax(-1)).double().sum(),
        "tokens": torch.tensor(float(len(y)), dtype=torch.float64),
    }
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-5)
    assert set(response_sums(zs, targets, vocab_size=123)) == {"nll", "tokens"}


def test_entropy_buckets_split_tokens_by_teacher_entropy():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(2, 50, 40, generator=g)
    zt = torch.randn(2, 50, 40, generator=g) * torch.linspace(0.1, 5, 50)[None, :, None]
    targets = torch.randint(0, 40, (2, 50), generator=g)
    tok = token_metrics(zs, targets, vocab_size=40, teacher_logits=zt)
    rows = entropy_buckets(tok, n_buckets=10)
    assert len(rows) == 10 and sum(r["tokens"] for r in rows) == 100
    assert all(a["h_max"] <= b["h_min"] for a, b in zip(rows, rows[1:], strict=False))
