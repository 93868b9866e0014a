"""Response generation: seeding, greedy decoding, input order, truncation, padding, length limits and sampling knobs,
with a tiny random Qwen2 and the session's BPE tokenizer."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from egad.data.batches import format_prompt
from egad.data.records import load_records
from egad.eval.generate import generate_ids, generate_responses, prompt_seeds


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def model(tok):
    config = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    # float64: batched and single-prompt logits then agree to ~1e-10, so greedy argmaxes cannot flip between them.
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()


@pytest.fixture(scope="module")
def prompts(dolly_path, tok):
    """Five real Dolly test prompts of distinct lengths under 256 tokens, deliberately not in length order."""
    examples, _ = load_records(dolly_path, "test", max_examples=40)
    by_len: dict[int, str] = {}
    for ex in examples:
        text = format_prompt(ex)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n < 200:
            by_len.setdefault(n, text)
    lengths = sorted(by_len)
    assert len(lengths) >= 5
    picked = [lengths[0], lengths[-1], lengths[len(lengths) // 2], lengths[1], lengths[-2]]
    return [by_len[n] for n in picked]


class Recorder:
    """Wraps `model.generate` to keep each call's inputs and output sequences."""

    def __init__(self, model):
        self.generate = model.generate
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, **kwargs):
        out = self.generate(**kwargs)
        self.calls.append((kwargs["input_ids"], kwargs["attention_mask"], out))
        return out


@pytest.fixture
def recorder(model, monkeypatch):
    rec = Recorder(model)
    monkeypatch.setattr(model, "generate", rec)
    return rec


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_same_seed_same_outputs_other_seed_differs(model, tok, prompts):
    kw = {"max_new_tokens": 12, "batch_size": 2, "progress": False}
    a = generate_responses(model, tok, prompts, seed=10, **kw)
    b = generate_responses(model, tok, prompts, seed=10, **kw)
    c = generate_responses(model, tok, prompts, seed=20, **kw)
    assert len(a) == len(prompts) and all(isinstance(x, str) for x in a)
    assert a == b
    assert a != c


def test_greedy_ignores_seed_and_keeps_input_order(model, tok, prompts):
    kw = {"greedy": True, "max_new_tokens": 12, "progress": False}
    batched = generate_responses(model, tok, prompts, seed=1, batch_size=3, **kw)
    assert generate_responses(model, tok, prompts, seed=2, batch_size=3, **kw) == batched
    assert generate_responses(model, tok, prompts, seed=None, batch_size=3, **kw) == batched
    # Each prompt alone (no padding, no sorting): the batched outputs must line up with their own prompts.
    alone = [generate_responses(model, tok, [p], seed=None, **kw)[0] for p in prompts]
    assert batched == alone
    assert len(set(alone)) > 1  # otherwise the order check would prove nothing


def test_left_truncation_and_left_padding(model, tok, prompts, recorder):
    long, short = prompts[1], prompts[0]
    long_ids, short_ids = ids_of(tok, long), ids_of(tok, short)
    keep = 24
    assert len(long_ids) > keep
    generate_responses(
        model, tok, [short, long], seed=None, greedy=True, max_prompt_len=keep, max_new_tokens=2, progress=False
    )
    [(input_ids, mask, _)] = recorder.calls
    rows = {tuple(r[m.bool()].tolist()) for r, m in zip(input_ids, mask, strict=True)}
    # The last `keep` tokens of each prompt survive (all of a prompt shorter than that).
    assert rows == {tuple(long_ids[-keep:]), tuple(short_ids[-keep:])}
    assert input_ids.shape[1] == keep

    recorder.calls.clear()
    tiny = tok.decode(short_ids[-5:])
    generate_responses(
        model, tok, [tiny, long], seed=None, greedy=True, max_prompt_len=keep, max_new_tokens=2, progress=False
    )
    [(input_ids, mask, _)] = recorder.calls
    n_tiny = len(ids_of(tok, tiny))
    tiny_row = [i for i in range(2) if mask[i].sum() == n_tiny][0]
    # Padding on the left: zeros in the mask first, pad ids under them, the prompt flush against the right edge.
    assert mask[tiny_row].tolist() == [0] * (keep - n_tiny) + [1] * n_tiny
    assert set(input_ids[tiny_row, : keep - n_tiny].tolist()) == {tok.pad_token_id}
    assert input_ids[tiny_row, keep - n_tiny :].tolist() == ids_of(tok, tiny)


def test_max_len_and_max_new_tokens_bound_each_prompts_new_tokens(model, tok, prompts, recorder):
    ids = [ids_of(tok, p) for p in prompts]
    longest, shortest = max(map(len, ids)), min(map(len, ids))
    kw = {
        "seed": None,
        "greedy": True,
        "batch_size": len(ids),
        "stop_ids": [tok.eos_token_id],
        "pad_id": tok.pad_token_id,
    }

    def lengths(**budget) -> list[int]:
        recorder.calls.clear()
        out = generate_ids(model, ids, **kw, **budget)
        [(input_ids, _, seqs)] = recorder.calls
        # The batch runs as long as its roomiest prompt needs; each prompt keeps only its own budget.
        assert seqs.shape[1] - input_ids.shape[1] == max(len(o) for o in out)
        return [len(o) for o in out]

    # Each prompt's own room: max_len - its length (not the batch's longest, which would tie it to its batch-mates);
    # greedy on this random model never emits eos early.
    assert lengths(max_len=longest + 6) == [longest + 6 - len(r) for r in ids]
    assert lengths(max_len=longest + 6, max_new_tokens=3) == [3] * len(ids)
    # A prompt already at max_len still gets one token, rather than an empty generation.
    assert lengths(max_len=longest) == [max(1, longest - len(r)) for r in ids] and shortest < longest


def test_top_k_zero_is_off_and_checkpoint_defaults_do_not_leak(model, tok, recorder):
    # Checkpoint defaults that must not apply: top_k=1 (a field the call sets) would make every sample the argmax;
    # suppress_tokens (a field the call leaves unset) would leave only tokens 0-9. The library's own default top_k=50
    # would cap the distinct first tokens at 50. With top_k=0 and none of these, this near-uniform random model draws
    # ~200 distinct tokens out of 512 in 256 samples.
    model.generation_config.top_k = 1
    model.generation_config.suppress_tokens = list(range(10, len(tok)))
    try:
        prompt = ["### Instruction:\nSay something.\n\n### Response:\n"] * 256
        kw = {"max_new_tokens": 1, "batch_size": 256, "progress": False}
        generate_responses(model, tok, prompt, seed=10, **kw)
        generate_responses(model, tok, prompt, seed=10, top_k=5, **kw)
        # The model's own config is back in place after the calls.
        assert model.generation_config.top_k == 1
        assert model.generation_config.suppress_tokens == list(range(10, len(tok)))
    finally:
        model.generation_config.top_k = None
        model.generation_config.suppress_tokens = None
    (inp_off, _, out_off), (inp_k5, _, out_k5) = recorder.calls
    first_off = set(out_off[:, inp_off.shape[1]].tolist())
    first_k5 = set(out_k5[:, inp_k5.shape[1]].tolist())
    assert len(first_off) > 100
    assert len(first_k5) <= 5


def test_restores_mode_and_caller_rng_and_progress_flag(model, tok, prompts):
    model.train()
    try:
        before = torch.get_rng_state()
        quiet = generate_responses(model, tok, prompts[:2], seed=30, max_new_tokens=4, progress=False)
        assert model.training
        # Seeded calls run on a forked RNG: the caller's stream is untouched.
        assert torch.equal(torch.get_rng_state(), before)
        # The progress bar draws no random numbers, so it cannot change the samples.
        assert generate_responses(model, tok, prompts[:2], seed=30, max_new_tokens=4, progress=True) == quiet
        generate_responses(model, tok, prompts[:2], seed=None, max_new_tokens=4, progress=False)
        assert not torch.equal(torch.get_rng_state(), before)  # unseeded sampling advances it, as usual
    finally:
        model.eval()


def test_edge_cases(model, tok):
    assert generate_responses(model, tok, [], seed=1) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_responses(model, tok, ["hello", ""], seed=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        generate_responses(model, tok, ["hello"], seed=1, batch_size=0)
    with pytest.raises(ValueError, match="temperature"):
        generate_responses(model, tok, ["hello"], seed=1, temperature=0.0)


def test_teacher_forced_per_example_sums_align_with_examples(model, tok, dolly_path):
    """Per-example NLL sums (the unit of the study's paired test) add up to the token mean and belong to the right
    example: each equals the NLL of that example scored alone."""
    from egad.eval.suite import EvalSettings, teacher_forced

    examples, _ = load_records(dolly_path, "test", max_examples=5)
    settings = EvalSettings(batch_size=2, max_prompt_len=64, max_len=128)
    both = teacher_forced(model, tok, examples, settings)
    per = both["per_example"]
    assert len(per["nll_sum"]) == len(per["tokens"]) == 5 and min(per["tokens"]) > 0
    assert sum(per["nll_sum"]) / sum(per["tokens"]) == pytest.approx(both["nll"], rel=1e-9)
    for i, ex in enumerate(examples):
        alone = teacher_forced(model, tok, [ex], settings)["per_example"]
        assert alone["tokens"] == [per["tokens"][i]]
        assert alone["nll_sum"][0] == pytest.approx(per["nll_sum"][i], rel=1e-6)


@pytest.fixture(scope="module")
def test_prompts(dolly_path):
    """The first 24 Dolly test prompts, in the data's order (as `egad eval --max-examples 24` reads them)."""
    examples, _ = load_records(dolly_path, "test", max_examples=24)
    return [format_prompt(ex) for ex in examples]


def test_a_prompts_sample_depends_on_the_prompt_and_seed_only(model, tok, test_prompts):
    """Issue 20: `--max-examples 12` and `--max-examples 24` gave the first 12 prompts different samples. Now a
    prompt's sample is the same alone, among the first 12, among 24, in another order and batch size, and run after
    run; another seed gives other samples."""
    kw = {"seed": 10, "max_new_tokens": 10, "max_prompt_len": 64, "progress": False}
    first12 = generate_responses(model, tok, test_prompts[:12], batch_size=12, **kw)
    all24 = generate_responses(model, tok, test_prompts, batch_size=24, **kw)
    assert all24[:12] == first12
    assert generate_responses(model, tok, test_prompts, batch_size=24, **kw) == all24  # run after run
    shuffled = list(range(24))
    random.Random(0).shuffle(shuffled)
    out = generate_responses(model, tok, [test_prompts[i] for i in shuffled], batch_size=5, **kw)
    assert [out[shuffled.index(i)] for i in range(24)] == all24
    for i in (0, 5, 11):
        assert generate_responses(model, tok, [test_prompts[i]], batch_size=1, **kw) == [all24[i]]
    assert len(set(all24)) > 20  # real samples, not one repeated string
    assert generate_responses(model, tok, test_prompts, batch_size=24, **{**kw, "seed": 20}) != all24


def test_eval_scores_a_prompt_the_same_whatever_the_evals_size(model, tok, dolly_path, tmp_path):
    """The issue's command in miniature: the first 12 Dolly test prompts get the same generations and ROUGE-L with
    max_examples 12 and 24 (batch 16: one batch of 12 against a batch of 16 and one of 8)."""
    from egad.eval.suite import EvalSettings, evaluate_set

    def run(n: int) -> list[dict]:
        settings = EvalSettings(seeds=(10,), max_new_tokens=8, max_prompt_len=64, max_len=128, max_examples=n)
        evaluate_set(model, tok, "dolly_test", settings, data_dir=dolly_path.parent.parent, out_dir=tmp_path / str(n))
        lines = (tmp_path / str(n) / "dolly_test" / "generations-seed10.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    small, large = run(12), run(24)
    assert len(small) == 12 and len(large) == 24
    assert small == large[:12]
    assert len({r["output"] for r in small}) > 10


def test_a_repeated_seed_is_generated_once_with_the_same_summary(model, tok, dolly_path, tmp_path, monkeypatch):
    """Seeds (10, 20, 10, 20), the teacher's list in the pre-registered study: two generations, not four, and the
    summary equals that of (10, 20) (per_seed is keyed by seed, so a repeat never weighed twice)."""
    from egad.eval import suite

    calls = []
    real = suite.generate_responses
    monkeypatch.setattr(suite, "generate_responses", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k))

    def run(seeds, name):
        settings = suite.EvalSettings(seeds=seeds, max_new_tokens=6, max_prompt_len=64, max_len=128, max_examples=6)
        got = suite.evaluate_set(model, tok, "dolly_test", settings, data_dir=dolly_path.parent.parent,
                                 out_dir=tmp_path / name)  # fmt: skip
        return {k: v for k, v in got.items() if k != "settings"}

    repeated = run((10, 20, 10, 20), "repeated")
    assert calls == [10, 20]
    assert repeated == run((10, 20), "once")


def test_prompt_seeds_depend_on_the_prompt_alone_and_split_repeats():
    a, b = [5, 6, 7], [8, 9]
    assert prompt_seeds([a, b], 10)[0] == prompt_seeds([b, a], 10)[1] == prompt_seeds([a], 10)[0]
    assert prompt_seeds([a], 10) != prompt_seeds([a], 20)
    twice = prompt_seeds([a, b, a], 10)
    assert twice[0] == prompt_seeds([a], 10)[0] and twice[2] != twice[0]  # a repeat draws its own sample
    assert all(0 <= s < 2**63 for s in twice)


def test_row_sampler_draws_from_the_filtered_softmax(model, tok):
    """The Gumbel-max sampler is a sampler of softmax(logits / T) after top-k: 4,000 repeats of one prompt (each its
    own generator), first-token frequencies against the model's probabilities, within 4.5 standard errors."""
    prompt = "### Instruction:\nSay something.\n\n### Response:\n"
    ids = ids_of(tok, prompt)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    temperature, top_k, n = 0.05, 4, 4000  # a low temperature, so the four kept tokens have unequal shares
    keep = logits.topk(top_k).indices
    probs = torch.softmax(logits[keep] / temperature, -1)
    out = generate_ids(model, [ids] * n, seed=3, temperature=temperature, top_k=top_k, max_new_tokens=1,
                       batch_size=1000, stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)  # fmt: skip
    first = torch.tensor([o[0] for o in out])
    assert set(first.tolist()) <= set(keep.tolist())
    freq = torch.stack([(first == k).double().mean() for k in keep])
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 4.5 * se + 1e-3).all(), (freq, probs)
    assert probs.min() > 0.02 and probs.max() < 0.9  # otherwise the check would be weak
