"""Fused heads against the model's own logits, the Liger way: a tiny model of every installed causal-LM type whose
forward does more than a bias-free `hidden @ W^T`, its transform set to a value a head that ignored it would get
wrong, and either the fused loss equals the unfused one (values and every student gradient) or the probe refuses.

Not decoder-only, so not listed: the encoders and encoder-decoder halves of the causal-LM mapping (bart, bert,
bert-generation, big_bird, bigbird_pegasus, blenderbot, blenderbot-small, camembert, data2vec-text, electra, ernie,
marian, mbart, megatron-bert, mvp, pegasus, plbart, prophetnet, rembert, roberta, roberta-prelayernorm, roc_bert,
roformer, trocr, whisper, xlm, xlm-roberta, xlm-roberta-xl, xlnet, xmod). Every other type of the mapping ends in a
bias-free linear head and is covered by llama and qwen2.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from egad.config.presets import preset
from egad.models.heads import HeadError, OutputHead, check_output_head, decoder_hidden, output_head
from egad.objective.compose import StudentOutputs, distillation_loss
from egad.teacher.signal import DenseSignal

B, L, V = 3, 12, 113
ATOL, RTOL = 1e-5, 1e-4  # fp32 chunked vs fp32 dense: only summation order differs
GAIN = 16.0  # on the head weight, so that the tiny models' logits reach the soft-caps (about 5)
TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=16, vocab_size=V, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
SWA = dict(swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=16, d_rel=4, rel_extent=16)
INKLING = dict(n_routed_experts=4, sliding_window_size=8, **MOE, **SWA)
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16)
LAYERS = dict(layer_types=["sliding_attention", "full_attention"])
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
CAP, SCALE = 5.0, 0.7
GEMMA4 = dict(
    final_logit_softcapping=CAP,
    vocab_size_per_layer_input=V,
    hidden_size_per_layer_input=8,
    global_head_dim=16,
    **LAYERS,
)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
)

# model type -> config overrides that make it tiny and its transform non-trivial. Comments: the transform.
FITS: dict[str, dict] = {
    "llama": dict(tie_word_embeddings=True),  # none (tied head)
    "qwen2": dict(),  # none (untied head)
    "llama4_text": dict(num_local_experts=4, **MOE),  # none; its get_decoder() returns the model itself
    "gemma3": dict(text_config=dict(), vision_config=VISION, mm_tokens_per_image=4),  # none: see IGNORED
    # soft-cap: cap * tanh(logits / cap)
    "gemma2": dict(final_logit_softcapping=CAP),
    "gemma3_text": dict(final_logit_softcapping=CAP),
    "gemma3n_text": dict(
        final_logit_softcapping=CAP,
        vocab_size_per_layer_input=V,
        hidden_size_per_layer_input=8,
        laurel_rank=4,
        num_kv_shared_layers=0,
        activation_sparsity_pattern=[0.0, 0.0],
        altup_num_inputs=2,
        **LAYERS,
    ),
    "gemma4_text": GEMMA4,
    "gemma4": dict(text_config=GEMMA4),
    "gemma4_unified_text": dict(final_logit_softcapping=CAP, **LAYERS),
    "gemma4_unified": dict(text_config=dict(final_logit_softcapping=CAP, **LAYERS)),
    "vaultgemma": dict(final_logit_softcapping=CAP),
    "nanochat": dict(final_logit_softcapping=CAP),
    "beam": dict(final_logit_softcapping=CAP, n_routed_experts=4, **MOE),
    "inkling2_text": dict(final_logit_softcapping=CAP, unpadded_vocab_size=V, n_layers_per_attn_res_block=1, **INKLING),
    "inkling2_loop_text": dict(
        final_logit_softcapping=CAP, unpadded_vocab_size=V, n_layers_per_attn_res_block=1, **INKLING
    ),
    "recurrent_gemma": dict(logits_soft_cap=CAP, num_hidden_layers=3, lru_width=32, attention_window_size=16),
    # xLSTM rounds its head sizes up to multiples of 64, and its cached forward cannot be differentiated
    "xlstm": dict(
        output_logit_soft_cap=CAP,
        hidden_size=64,
        embedding_dim=64,
        num_blocks=2,
        num_heads=2,
        chunk_size=4,
        qk_dim_factor=1.0,
        v_dim_factor=1.0,
        use_cache=False,
    ),
    # logits * logit_scale
    "cohere": dict(logit_scale=SCALE),
    "cohere2": dict(logit_scale=SCALE, **LAYERS),
    "cohere2_moe": dict(logit_scale=SCALE, num_experts=4, **MOE),
    "cohere_compass_text": dict(
        logit_scale=SCALE, rope_parameters={"sliding_attention": ROPE, "full_attention": ROPE}, **LAYERS
    ),
    # logits * lm_head_multiplier
    "falcon_h1": dict(lm_head_multiplier=SCALE, mamba_d_ssm=64, **MAMBA),
    # logits / logits_scaling
    "granite": dict(logits_scaling=1.7),
    "granite_swa": dict(logits_scaling=1.7),
    "granitemoe": dict(logits_scaling=1.7, num_local_experts=4, **MOE),
    "granitemoe_swa": dict(logits_scaling=1.7, num_local_experts=4, **MOE),
    "granitemoehybrid": dict(
        logits_scaling=1.7,
        num_local_experts=4,
        shared_intermediate_size=32,
        layer_types=["mamba", "attention"],
        **MOE,
        **MAMBA,
    ),
    "granitemoeshared": dict(logits_scaling=1.7, num_local_experts=4, shared_intermediate_size=32, **MOE),
    # logits * logits_scaling (a Granite config)
    "hyperclovax": dict(logits_scaling=1.7),
    # lm_head(hidden / logits_scaling), logits_scaling = hidden_size / dim_model_base
    "minicpm3": dict(
        dim_model_base=8,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
    ),
    # lm_head(hidden / logits_mup_width_multiplier)
    "inkling_text": dict(logits_mup_width_multiplier=3.0, n_shared_experts=1, **INKLING),
    # a bias on the head (made non-zero below)
    "phi": dict(),
    "gptj": dict(rotary_dim=8),
    "codegen": dict(rotary_dim=8),
    "ctrl": dict(dff=64),
    "git": dict(vision_config=VISION),
    "ernie4_5_moe": dict(use_bias=True, moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1),
    "phimoe": dict(lm_head_bias=True, num_local_experts=4, **MOE),
    "zaya": dict(lm_head_bias=True, num_experts=4, moe_intermediate_size=32, router_hidden_size=16),
}
PLAIN = {"llama", "qwen2", "llama4_text", "gemma3"}

# Transforms that do not fit an OutputHead: the probe refuses them.
REFUSED: dict[str, dict] = {
    "dory": dict(),  # lm_head is a DoryLMHead: a learned per-token logit scale (set non-trivial below)
    "modernbert-decoder": dict(),  # dense + activation + norm between the decoder and its output layer
    "musicgen": dict(num_codebooks=2),  # one head per codebook, no single output layer
    "musicgen_melody": dict(num_codebooks=2),
    # draft models: need the backbone's shared_kv_states and inputs_embeds (optionally a centroid-masked head)
    "gemma4_assistant": dict(
        backbone_hidden_size=32,
        text_config=dict(
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=0,
            num_kv_shared_layers=2,
            global_head_dim=16,
            **LAYERS,
        ),
    ),
    "gemma4_unified_assistant": dict(
        backbone_hidden_size=32, text_config=dict(num_kv_shared_layers=2, global_head_dim=16, **LAYERS)
    ),
}
# Attributes egad reads that these forwards ignore: egad applies them, so the probe refuses (never a silent
# mis-computation). Gemma3ForConditionalGeneration skips its text config's soft-cap (Gemma3ForCausalLM applies it);
# transformers' MPT does not implement the `logit_scale` of MosaicML's code. Released checkpoints leave both unset.
IGNORED: dict[str, dict] = {
    "gemma3": dict(text_config=dict(final_logit_softcapping=CAP), vision_config=VISION, mm_tokens_per_image=4),
    "mpt": dict(logit_scale=SCALE),
}
CONFIG_TYPES = {"musicgen": "musicgen_decoder", "musicgen_melody": "musicgen_melody_decoder"}

# Types on the list that cannot be built tiny on a CPU here, with the reason.
SKIPPED = {
    "gemma3n": "soft-cap (text_config.final_logit_softcapping): Gemma3nForConditionalGeneration builds its vision "
    "tower with timm, which is not installed; its text model, gemma3n_text, is tested",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(model_type: str, overrides: dict):
    """The model type's causal LM at a tiny size, seeded, fp32, eval mode (no dropout)."""
    if "text_config" in overrides:
        kw = {**overrides, "text_config": {**TINY, **overrides["text_config"]}}
    else:
        kw = {**TINY, **overrides}
    config = AutoConfig.for_model(CONFIG_TYPES.get(model_type, model_type), **kw)
    torch.manual_seed(0)
    model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])(config).float().eval()
    head = model.get_output_embeddings()
    if hasattr(head, "weight"):
        with torch.no_grad():
            head.weight.mul_(GAIN)
            if getattr(head, "bias", None) is not None:
                head.bias.normal_(generator=torch.Generator().manual_seed(1))
    return model


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (B, L), generator=g)
    targets = torch.randint(0, V, (B, L), generator=g)
    targets[torch.rand(B, L, generator=g) < 0.25] = -100
    teacher = DenseSignal(torch.randn(B, L, V, generator=g) * 3)
    return ids, torch.ones_like(ids), targets, teacher


def loss_and_grads(model, fused: bool, cfg, ids, mask, targets, teacher):
    if fused:
        student = StudentOutputs(hidden=decoder_hidden(model, ids, mask), head=output_head(model))
    else:
        student = StudentOutputs(logits=model(input_ids=ids, attention_mask=mask).logits)
    loss = distillation_loss(student, teacher, targets, cfg, progress=0.5).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("model_type", [*FITS, *SKIPPED])
def test_fused_loss_equals_unfused(model_type):
    if model_type in SKIPPED:
        pytest.skip(SKIPPED[model_type])
    model = tiny(model_type, FITS[model_type])
    head = output_head(model)
    check_output_head(model, head, vocab=V)
    ids, mask, targets, teacher = batch()
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).logits
        linear_only = OutputHead(head.weight).logits(decoder_hidden(model, ids, mask))
    # The transform is live: a bias-free linear head would not reproduce these logits.
    assert (model_type in PLAIN) == torch.allclose(linear_only, own, atol=1e-3, rtol=1e-3)
    for cfg in (
        preset("kd", chunk_size=13),
        preset("egad", cdf_mode="batch", beta_f=0.0, route_mode="none", chunk_size=13),
    ):
        fused, fused_grads = loss_and_grads(model, True, cfg, ids, mask, targets, teacher)
        unfused, unfused_grads = loss_and_grads(model, False, cfg, ids, mask, targets, teacher)
        torch.testing.assert_close(fused, unfused, atol=ATOL, rtol=RTOL)
        for name, got, want in zip(
            [n for n, p in model.named_parameters() if p.requires_grad], fused_grads, unfused_grads, strict=True
        ):
            assert (got is None) == (want is None), name
            if got is not None:
                torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
        head_grad = dict(zip([id(p) for p in model.parameters() if p.requires_grad], fused_grads, strict=True))
        assert head_grad[id(head.weight)].abs().sum() > 0
        if head.bias is not None:
            assert head_grad[id(head.bias)].abs().sum() > 0


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_probe_refuses_what_a_head_cannot_say(model_type):
    assert_refused(model_type, REFUSED[model_type])


@pytest.mark.parametrize("model_type", list(IGNORED))
def test_probe_refuses_an_attribute_the_forward_ignores(model_type):
    assert_refused(model_type, IGNORED[model_type])


def assert_refused(model_type: str, overrides: dict) -> None:
    model = tiny(model_type, overrides)
    if model_type == "dory":
        with torch.no_grad():
            model.lm_head.logit_scale.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    with pytest.raises(HeadError) as err:
        check_output_head(model, output_head(model), vocab=V)
    assert model_type in str(err.value) and "fused_lm_head: false" in str(err.value)


def _llama(**kw):
    return tiny("llama", dict(FITS["llama"], **kw))


def _patch_logits(monkeypatch, model, transform):
    """Make the model's forward apply `transform` to its logits, a transform its config does not describe."""
    real = model.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logits = transform(out.logits)
        return out

    monkeypatch.setattr(model, "forward", forward)


def test_probe_refuses_logits_doubled_in_forward(monkeypatch):
    model = _llama()
    check_output_head(model, output_head(model), vocab=V)
    _patch_logits(monkeypatch, model, lambda z: z * 2)
    with pytest.raises(HeadError, match="llama.*fused_lm_head: false"):
        check_output_head(model, output_head(model), vocab=V)


def test_probe_refuses_a_bias_not_on_the_head(monkeypatch):
    model = _llama()
    bias = torch.randn(V, generator=torch.Generator().manual_seed(3))
    _patch_logits(monkeypatch, model, lambda z: z + bias)
    with pytest.raises(HeadError, match="does not reproduce"):
        check_output_head(model, output_head(model), vocab=V)


def test_probe_amplifies_to_see_an_unknown_soft_cap(monkeypatch):
    """At a fresh model's logit scale a soft-cap of 30 is below the tolerance; the amplified probe still sees it."""
    model = tiny("llama", FITS["llama"])
    with torch.no_grad():
        model.lm_head.weight.div_(GAIN)  # back to the initialised scale
        ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
        z = model(input_ids=ids).logits
        assert torch.allclose(30 * torch.tanh(z / 30), z, atol=1e-4, rtol=1e-4)  # the probe's own tolerance
    _patch_logits(monkeypatch, model, lambda z: 30 * torch.tanh(z / 30))
    with pytest.raises(HeadError, match=r"head input x"):
        check_output_head(model, output_head(model), vocab=V)


def test_distillation_module_checks_the_head_it_fuses():
    from egad.objective.student import DistillationModule

    DistillationModule(tiny("gemma2", FITS["gemma2"]), None, [], fused=True, vocab=V)
    with pytest.raises(HeadError, match="dory"):
        DistillationModule(tiny("dory", REFUSED["dory"]), None, [], fused=True, vocab=V)


def test_config_attribute_ignored_by_the_head_is_refused():
    model = tiny("gemma2", FITS["gemma2"])
    with pytest.raises(HeadError, match="gemma2"):
        check_output_head(model, OutputHead(model.lm_head.weight), vocab=V)


def test_probe_accepts_a_bf16_model_and_still_refuses_in_bf16(monkeypatch):
    model = _llama().to(torch.bfloat16)
    check_output_head(model, output_head(model), vocab=V)
    _patch_logits(monkeypatch, model, lambda z: z * 1.5)
    with pytest.raises(HeadError):
        check_output_head(model, output_head(model), vocab=V)


def test_output_head_reads_each_attribute_in_the_models_direction():
    """The numbers themselves, for the attribute names that mean different things in different models."""
    granite, hyperclovax = tiny("granite", FITS["granite"]), tiny("hyperclovax", FITS["hyperclovax"])
    assert output_head(granite).logit_scale == pytest.approx(1 / 1.7)
    assert output_head(hyperclovax).logit_scale == pytest.approx(1.7)
    minicpm = output_head(tiny("minicpm3", FITS["minicpm3"]))
    assert (minicpm.hidden_scale, minicpm.logit_scale) == (pytest.approx(8 / 32), 1.0)
    assert output_head(tiny("recurrent_gemma", FITS["recurrent_gemma"])).softcap == CAP
