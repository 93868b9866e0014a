"""Tests for egad.xtok: alignment of two tokenisations at shared boundaries, and the exact vocabulary map."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizer, PreTrainedTokenizerFast

from egad.xtok import (
    Alignment,
    AlignmentError,
    OffsetEncoder,
    align_offsets,
    align_responses,
    build_vocab_map,
    token_bytes,
    token_cuts,
)

SENTENCES = [
    "The cat sat on the mat, and the dog sat on the log.",
    "Distillation moves knowledge from a teacher model into a smaller student model.",
    "Prices rose 12.5% in 2023; analysts expected 3 to 4 percent at most.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
]
# Texts that stress the offsets: runs of spaces, newlines before words, a trailing space run, accents, CJK and an
# emoji (byte pieces), tabs, digits and punctuation.
TRICKY = [
    "a   the  café\n\n  x 日本語. Hi!  \n end  ",
    "Naïve résumé: 東京 is big 🎉🎉 ok",
    "  leading spaces and\ttabs\t\there",
    "1. First\n2. Second\n\n- bullet  point",
    "",
    "x",
]


# ----------------------------------------------------------------------------------------------------- tokenizers
def _byte_level(vocab: int, trim: bool = False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(SENTENCES * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """A Metaspace BPE whose vocabulary holds the 256 '<0xHH>' byte pieces (byte fallback), decoded as Llama 2's
    (Replace, ByteFallback, Fuse)."""
    pre = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre
    base.train_from_iterator(SENTENCES * 5, trainer=trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = base.get_vocab()
    learned_merges = json.loads(base.to_str())["model"]["merges"]
    vocab = {"<unk>": 0, "<s>": 1} | {f"<0x{i:02X}>": 2 + i for i in range(256)}
    vocab |= {piece: 258 + i for i, piece in enumerate(sorted(learned, key=learned.get))}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned_merges]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<unk>", "<s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<s>")


def _wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(SENTENCES * 5, trainer=trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                                               show_progress=False))  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


class _SlowChars(PreTrainedTokenizer):
    """A Python (slow) tokenizer: one token per character, no offsets."""

    def __init__(self, **kw):
        self._vocab = {chr(i): i for i in range(256)}
        super().__init__(**kw)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self):
        return dict(self._vocab)

    def _tokenize(self, text):
        return list(text)

    def _convert_token_to_id(self, token):
        return self._vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return chr(index)


@pytest.fixture(scope="module")
def smollm():
    from egad.models.model_files import ModelSourceError, resolve_model_source

    try:
        return AutoTokenizer.from_pretrained(resolve_model_source("smollm2-135m-instruct"))
    except (ModelSourceError, OSError) as e:
        pytest.skip(f"the SmolLM2 tokenizer is not available here: {e}")


@pytest.fixture(scope="module")
def small_bpe():
    return _byte_level(320)


def _check_pairs(teacher, student, texts, alignments) -> None:
    """At every aligned pair both models have read exactly text[:cut] (so each predicts the token starting there)."""
    enc_t, enc_s = OffsetEncoder(teacher)(texts), OffsetEncoder(student)(texts)
    for text, (ids_t, _), (ids_s, _), a in zip(texts, enc_t, enc_s, alignments, strict=True):
        assert a.n_teacher == len(ids_t) + 1 and a.n_student == len(ids_s) + 1
        for kt, ks, c in zip(a.teacher, a.student, a.cuts, strict=True):
            assert teacher.decode(ids_t[:kt]) == text[:c] == student.decode(ids_s[:ks])


# -------------------------------------------------------------------------------------------------------- cuts
def test_cuts_clean_overlap_and_gap():
    # "ab cd": 'ab' 'Ġcd' -> cuts 0, 2, 5
    assert token_cuts([(0, 2), (2, 5)], 5) == [0, 2, 5]
    # byte pieces of one character share its offsets: no clean cut between them
    assert token_cuts([(0, 1), (1, 3), (2, 3), (2, 3), (3, 4)], 4) == [0, 1, -1, -1, 3, 4]
    # WordPiece drops whitespace: the gap goes to the next token, the cut sits where the previous word ends
    assert token_cuts([(0, 1), (4, 7)], 7) == [0, 1, 7]
    assert token_cuts([], 0) == [0]


def test_trimmed_offsets_give_the_same_cuts(smollm):
    trimmed_backend = Tokenizer.from_str(smollm.backend_tokenizer.to_str())
    trimmed_backend.post_processor = processors.ByteLevel(trim_offsets=True)
    trimmed = PreTrainedTokenizerFast(tokenizer_object=trimmed_backend)
    raw_t = trimmed(TRICKY, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    raw_u = smollm(TRICKY, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert raw_t != raw_u  # the flag does move the raw offsets
    for text, (_, off_t), (_, off_u) in zip(TRICKY, OffsetEncoder(trimmed)(TRICKY), OffsetEncoder(smollm)(TRICKY),
                                             strict=True):  # fmt: skip
        assert off_t == off_u
        assert token_cuts(off_t, len(text)) == token_cuts(off_u, len(text))
    alignments, stats = align_responses(trimmed, smollm, TRICKY)
    assert stats.share == 1.0 and all(a.teacher == a.student for a in alignments)


# --------------------------------------------------------------------------------------------------- alignment
def test_align_by_hand():
    # "Hello world": teacher 'Hello' 'Ġworld'; student 'Hel' 'lo' 'Ġworld'
    a = align_offsets([(0, 5), (5, 11)], [(0, 3), (3, 5), (5, 11)], "Hello world")
    assert (a.teacher, a.student, a.cuts) == ((0, 1, 2), (0, 2, 3), (0, 5, 11))
    assert (a.n_teacher, a.n_student, a.aligned) == (3, 4, 3)
    assert a.share == pytest.approx(0.75)
    assert a.student_mask().tolist() == [True, False, True, True]
    assert a.teacher_for_student().tolist() == [0, -1, 1, 2]
    t_pos, s_pos = a.logit_positions(10, 4)
    assert t_pos.tolist() == [9, 10, 11] and s_pos.tolist() == [3, 5, 6]
    clipped = a.clip(2, 4)  # the teacher's end of turn was cut off
    assert (clipped.teacher, clipped.student, clipped.n_teacher) == ((0, 1), (0, 2), 2)
    no_end = align_offsets([(0, 5), (5, 11)], [(0, 3), (3, 5), (5, 11)], "Hello world", end_token=False)
    assert (no_end.teacher, no_end.student, no_end.n_student) == ((0, 1), (0, 2), 3)


def test_real_pair_invariants(smollm, small_bpe):
    texts = SENTENCES + TRICKY
    alignments, stats = align_responses(smollm, small_bpe, texts)
    _check_pairs(smollm, small_bpe, texts, alignments)
    assert 0.3 < stats.share < 1.0 and stats.responses == len(texts)
    for a in alignments:  # the first target and the end of turn always align
        assert a.student[0] == 0 and a.teacher[0] == 0
        assert (a.teacher[-1], a.student[-1]) == (a.n_teacher - 1, a.n_student - 1)


def test_byte_pieces_stay_unaligned(smollm, small_bpe):
    text = "日本語 🎉"
    (a,), _ = align_responses(smollm, small_bpe, [text])
    _, offs = OffsetEncoder(smollm)([text])[0]
    cuts = token_cuts(offs, len(text))
    assert -1 in cuts  # SmolLM2 splits these characters into byte pieces
    assert all(c >= 0 for c in a.cuts)


def test_identical_tokenizers_align_one_to_one(smollm):
    alignments, stats = align_responses(smollm, smollm, SENTENCES + TRICKY)
    assert stats.share == 1.0 and stats.teacher_share == 1.0
    assert all(a.teacher == a.student == tuple(range(a.n_student)) for a in alignments)


@pytest.mark.parametrize("other", ["sentencepiece", "wordpiece"])
def test_other_families_align(smollm, other):
    tok = _sentencepiece_like() if other == "sentencepiece" else _wordpiece()
    texts = SENTENCES + TRICKY[:4]
    alignments, stats = align_responses(smollm, tok, texts)
    assert stats.share > 0.3
    enc = OffsetEncoder(smollm)(texts)
    for text, (ids, _), a in zip(texts, enc, alignments, strict=True):
        for kt, c in zip(a.teacher, a.cuts, strict=True):
            assert smollm.decode(ids[:kt]) == text[:c]  # the teacher side read exactly the text before the cut
    if other == "wordpiece":  # it drops whitespace: its cut before a word is where the previous word ends
        (a,), _ = align_responses(smollm, tok, ["the cat"])
        assert a.cuts == (0, 3, 7)


def test_dolly_share(smollm, dolly_path, tmp_path):
    from egad.data import batches as D
    from egad.models.tokenizer import train_bpe_tokenizer

    records, _ = D.load_records(dolly_path, "train", max_examples=300)
    bpe = train_bpe_tokenizer(D.texts_for_tokenizer(records), 1024, tmp_path)
    texts = [r.response for r in records]
    alignments, stats = align_responses(smollm, bpe, texts)
    _check_pairs(smollm, bpe, texts[:40], alignments[:40])
    # a 1,024-entry BPE cuts finer than SmolLM2 (49,152 entries): many of its targets lie inside SmolLM2 tokens
    assert 0.45 < stats.share < 1.0 and stats.teacher_share > 0.9


# ---------------------------------------------------------------------------------------------------- refusals
def test_refuses_a_slow_tokenizer(small_bpe):
    slow = _SlowChars()
    assert not slow.is_fast
    with pytest.raises(AlignmentError, match="slow .*offsets"):
        align_responses(slow, small_bpe, ["hello"])
    with pytest.raises(AlignmentError, match="slow"):
        build_vocab_map(slow, small_bpe)


def test_refuses_offsets_that_do_not_tile_the_text():
    with pytest.raises(AlignmentError, match="covered by no token"):
        align_offsets([(0, 0), (0, 0)], [(0, 2), (2, 5)], "ab cd")
    with pytest.raises(AlignmentError, match="reading order"):
        align_offsets([(0, 2), (1, 2), (0, 5)], [(0, 5)], "ab cd")
    with pytest.raises(AlignmentError, match="offsets"):
        align_offsets([(0, 9)], [(0, 5)], "ab cd")


def test_refuses_no_shared_boundary():
    text = "ab cd ef"
    with pytest.raises(AlignmentError, match="share no boundary"):
        align_offsets([(0, 4), (4, 8)], [(0, 1), (1, 7), (7, 8)], text)
    loose = align_offsets([(0, 4), (4, 8)], [(0, 1), (1, 7), (7, 8)], text, strict=False)
    assert loose.cuts == (0, 8)
    # one word may legitimately share no inner boundary ('Lib|eria' against 'L|iber|ia'): no refusal
    word = align_offsets([(0, 3), (3, 7)], [(0, 1), (1, 5), (5, 7)], "Liberia")
    assert word.cuts == (0, 7)


def test_alignment_stats_summary(smollm, small_bpe):
    _, stats = align_responses(smollm, small_bpe, SENTENCES)
    assert stats.aligned <= min(stats.student_targets, stats.teacher_targets)
    assert "aligned targets" in stats.summary()


def test_alignment_is_frozen():
    a = Alignment((0,), (0,), (0,), 1, 1)
    with pytest.raises(AttributeError):
        a.share = 0.5  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------- vocabulary map
def test_vocab_map_pairs_tokens_with_the_same_bytes(smollm, small_bpe):
    vm = build_vocab_map(smollm, small_bpe)
    assert (vm.teacher_vocab, vm.student_vocab) == (len(smollm), len(small_bpe))
    assert 250 < vm.size <= len(small_bpe)
    t_str = smollm.convert_ids_to_tokens(vm.teacher_ids.tolist())
    s_str = small_bpe.convert_ids_to_tokens(vm.student_ids.tolist())
    assert t_str == s_str  # both byte-level: the same vocabulary strings
    assert "Ġthe" in t_str


def test_vocab_map_identity_and_pairs(smollm):
    vm = build_vocab_map(smollm, smollm)
    special = set(smollm.all_special_ids) | {int(i) for i, t in smollm.added_tokens_decoder.items() if t.special}
    assert vm.size == len(smollm) - len(special)
    assert torch.equal(vm.teacher_ids, vm.student_ids)
    eot = smollm.convert_tokens_to_ids("<|im_end|>")
    with_eot = build_vocab_map(smollm, smollm, pairs={eot: eot})
    assert with_eot.size == vm.size + 1
    with pytest.raises(ValueError, match="two teacher ids"):
        build_vocab_map(smollm, smollm, pairs={eot: eot, 0: eot})


def test_vocab_map_across_families(smollm):
    sp = _sentencepiece_like()
    vm = build_vocab_map(smollm, sp)
    assert vm.size > 250  # the 256 byte pieces (their one-byte twins in SmolLM2) and the learned pieces
    bytes_t, bytes_s = token_bytes(smollm), token_bytes(sp)
    for t, s in zip(vm.teacher_ids.tolist(), vm.student_ids.tolist(), strict=True):
        assert bytes_t[t][0] == bytes_s[s][0]
    assert bytes_s[sp.convert_tokens_to_ids("<0xE6>")] == (b"\xe6", 1)
    # SentencePiece's '▁' and '<0x20>' are both a space: the ordinary piece represents them
    space = [i for i, (b, _) in enumerate(bytes_s) if b == b" "]
    assert len(space) == 2
    chosen = vm.student_ids[vm.teacher_ids == smollm.convert_tokens_to_ids("Ġ")].tolist()
    assert chosen == [sp.convert_tokens_to_ids("\u2581")]
    with pytest.raises(AlignmentError, match="WordPiece"):
        build_vocab_map(smollm, _wordpiece())
