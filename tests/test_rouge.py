"""ROUGE-L wrapper: agrees with `rouge_score` used directly with MiniLLM's settings, on hand-made and real cases."""

from __future__ import annotations

import pytest
from conftest import DATA
from rouge_score import rouge_scorer

from egad.data.records import load_records
from egad.eval.rouge import corpus_rouge_l, rouge_l

SINST = DATA / "eval" / "sinst.jsonl"

# The reference: MiniLLM's scorer, built independently of the module under test.
REF = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def direct(prediction: str, reference: str) -> float:
    return 100.0 * REF.score(reference, prediction)["rougeL"].fmeasure


def test_identical_and_disjoint():
    assert rouge_l("The cat sat on the mat.", "The cat sat on the mat.") == pytest.approx(100.0)
    assert rouge_l("alpha beta gamma", "delta epsilon") == 0.0


def test_partial_overlap_equals_the_scorer():
    pred, ref = "the quick brown fox jumps over a dog", "a quick brown dog jumps over the lazy fox"
    # LCS "quick brown jumps over": 4 tokens -> P = 4/8, R = 4/9, F = 2PR/(P+R) = 8/17.
    assert rouge_l(pred, ref) == pytest.approx(100 * 8 / 17)
    assert rouge_l(pred, ref) == pytest.approx(direct(pred, ref))


def test_punctuation_case_and_stemming_are_normalised():
    # The default tokenizer drops punctuation and lower-cases; the Porter stemmer maps "running"/"runs" to "run".
    assert rouge_l("Hello, WORLD!!!", "hello world") == pytest.approx(100.0)
    assert rouge_l("She runs quickly", "she running quickly") == pytest.approx(100.0)
    assert rouge_l("She ran, quickly.", "she running quickly") == pytest.approx(
        direct("She ran, quickly.", "she running quickly")
    )
    # No Latin letters or digits: no tokens, score 0, as in MiniLLM.
    assert rouge_l("你好世界", "你好世界") == 0.0


def test_empty_prediction_scores_zero():
    assert rouge_l("", "some reference") == 0.0


def test_max_over_references():
    pred = "the model answers the question briefly"
    refs = ["an unrelated sentence", "the model answers briefly", "the question is answered"]
    individual = [direct(pred, r) for r in refs]
    assert rouge_l(pred, refs) == pytest.approx(max(individual))
    assert rouge_l(pred, refs) == pytest.approx(rouge_l(pred, refs[1]))
    assert rouge_l(pred, refs[:1]) == pytest.approx(individual[0])


def test_empty_reference_list_is_an_error():
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l("anything", [])


def test_corpus_mean():
    preds = ["a b c", "x y", "hello there"]
    refs: list[str | list[str]] = ["a b c", "z w", ["general kenobi", "hello there friend"]]
    expected = (100.0 + 0.0 + direct("hello there", "hello there friend")) / 3
    assert corpus_rouge_l(preds, refs) == pytest.approx(expected)


def test_corpus_length_mismatch_and_empty():
    with pytest.raises(ValueError, match=r"2 predictions but 3 references"):
        corpus_rouge_l(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="no predictions"):
        corpus_rouge_l([], [])


@pytest.mark.skipif(not SINST.is_file(), reason="shared eval data not present")
def test_real_sinst_references_match_the_scorer():
    examples, _ = load_records(SINST, max_examples=40)
    assert any(isinstance(ex.output, list) and len(ex.output) > 1 for ex in examples)
    # A prediction built from another example's first reference: partial, nonzero overlaps on real text.
    preds = [examples[(i + 1) % len(examples)].response + " " + ex.instruction[:60] for i, ex in enumerate(examples)]
    refs = [ex.output for ex in examples]
    expected = []
    for pred, ref in zip(preds, refs, strict=True):
        ref_list = [ref] if isinstance(ref, str) else ref
        expected.append(max(direct(pred, r) for r in ref_list))
    assert corpus_rouge_l(preds, refs) == pytest.approx(sum(expected) / len(expected))
