"""ROUGE-L as MiniLLM reports it, computed by Google's `rouge_score` package.

Settings match MiniLLM's `rouge_metric.py` (microsoft/LMOps, `minillm/rouge_metric.py`), which builds
`rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)` once and scores each prediction against each reference:

- `rougeL` (sentence-level LCS, not the summary-level `rougeLsum`), F-measure;
- the package's default tokenizer: lower-cases, replaces every character outside `[a-z0-9]` with a space, splits on
  whitespace. Punctuation and case therefore never matter, and text with no Latin letters or digits has no tokens
  (its score is 0);
- Porter stemming on (`use_stemmer=True`): "running" and "runs" both match "run";
- with several references (Super-Natural-Instructions), the maximum over them; the corpus score is the mean over
  examples, times 100.

MiniLLM rounds the corpus score to 4 decimals for its logs; nothing is rounded here.
"""

from __future__ import annotations

from collections.abc import Sequence

from rouge_score import rouge_scorer

# Built once: the scorer holds only its settings, and constructing it per call would dominate the cost on short texts.
_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure x 100 of `prediction` against one reference, or the maximum over a list of references.

    Raises ValueError for an empty list of references (there is nothing to take the maximum of)."""
    if isinstance(references, str):
        references = [references]
    if len(references) == 0:
        raise ValueError("rouge_l needs at least one reference, got an empty list")
    # rouge_score's signature is score(target, prediction); LCS F-measure is symmetric, but keep the roles right.
    return 100.0 * max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean over examples of `rouge_l(prediction, reference(s))`, in [0, 100].

    Each entry of `references` is a reference string or a list of references (max over them). Unlike MiniLLM, which
    silently truncates to the shorter list, a length mismatch raises ValueError; so does an empty corpus."""
    if len(predictions) != len(references):
        raise ValueError(
            f"corpus_rouge_l got {len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    if not predictions:
        raise ValueError("corpus_rouge_l got no predictions; the mean of an empty corpus is undefined")
    return sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)
