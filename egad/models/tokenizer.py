"""A small byte-level BPE tokenizer, trained from text, for tests, demos and toy students.

Real runs use the teacher's tokenizer. This one exists so the whole pipeline (data -> tokens -> student) can be
exercised on CPU in seconds without downloading anything. It is saved in the Hugging Face format, so every consumer
loads it with `AutoTokenizer.from_pretrained(dir)` exactly like a hub tokenizer.

`<|endoftext|>` is both bos and eos (GPT-2's convention); `<|pad|>` is a separate token so padding never collides
with the eos that the student must learn to emit.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
# 256 byte symbols plus the special tokens: a smaller vocabulary could not encode arbitrary text.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

_FINGERPRINT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`, save it to `out_dir` (HF format) and return it.

    Deterministic: the same texts in the same order give the same vocabulary and merges.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is below {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} specials)"
        )
    tok = Tokenizer(models.BPE())
    # No prefix space: prompt and response are encoded separately and concatenated, and an inserted space would
    # change the response text the student is trained to produce.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # The full byte alphabet, even bytes absent from the corpus, so no text is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def cached_bpe_tokenizer(
    texts_fn: Callable[[], Iterable[str]], vocab_size: int, cache_dir: str | Path, fingerprint: str
) -> PreTrainedTokenizerBase:
    """Load the tokenizer cached under `cache_dir/bpe-{vocab_size}-{fingerprint[:12]}`, training it first if absent.

    `fingerprint` identifies the training texts (e.g. a hash of the data file); `texts_fn` is only called on a cache
    miss, so a hit costs no data read. The directory appears atomically (train into a temporary sibling, then
    rename), so an interrupted run never leaves a half-written tokenizer that later runs would load.
    """
    if not fingerprint or not _FINGERPRINT_RE.match(fingerprint[:12]):
        raise ValueError(f"fingerprint {fingerprint!r} must be non-empty and use only [A-Za-z0-9_.-]")
    cache_dir = Path(cache_dir)
    final = cache_dir / f"bpe-{vocab_size}-{fingerprint[:12]}"
    if final.is_dir():
        return AutoTokenizer.from_pretrained(str(final))
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Same parent as `final`, so the rename stays on one filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        train_bpe_tokenizer(texts_fn(), vocab_size, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished first (the target is a non-empty directory): use its copy.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(final))
