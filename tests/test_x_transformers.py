"""The assembly (`x_transformers/x_transformers.py`): every flag builds and trains a step, kwarg routing and errors,
return conventions, the hybrid-mixer and MoE hooks of our contract, ResiDual. Tiny sizes throughout."""

import sys
import types

import pytest
import torch
from torch import nn

import x_transformers
from x_transformers import x_transformers as xt
from x_transformers.attend import Intermediates
from x_transformers.x_transformers import (
    AttentionLayers,
    CrossAttender,
    Decoder,
    Encoder,
    LayerIntermediates,
    PrefixDecoder,
    TransformerWrapper,
    ViTransformerWrapper,
    XTransformer,
)

NUM_TOKENS, SEQ, DIM = 20, 8, 16
TINY = dict(dim=DIM, depth=2, heads=2, attn_dim_head=8)


def lm(layers_cls=Decoder, wrapper_kwargs=None, **layers_kwargs):
    return TransformerWrapper(
        num_tokens=NUM_TOKENS,
        max_seq_len=16,
        attn_layers=layers_cls(**{**TINY, **layers_kwargs}),
        **(wrapper_kwargs or {}),
    )


def tokens(b=2, n=SEQ):
    return torch.randint(0, NUM_TOKENS, (b, n))


def padding_mask(b=2, n=SEQ):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, n // 2 :] = False
    return mask


# every public name upstream's x_transformers.py defines is importable from ours

UPSTREAM_NAMES = """
Attend Intermediates AutoregressiveWrapper DEFAULT_DIM_HEAD LayerIntermediates LinearNoBias exists default first is_empty
cast_tuple divisible_by maybe at_most_one_of always not_equals equals Sequential log max_neg_value l2norm softclamp
masked_mean pad_at_dim or_reduce calc_entropy calc_z_loss init_zero_ pick_and_pop group_dict_by_key string_begins_with
group_by_key_prefix groupby_prefix_and_trim dropout_seq ReluSquared TokenEmbedding AbsolutePositionalEmbedding
ScaledSinusoidalEmbedding RelativePositionBias CoPE DynamicPositionBias AlibiPositionalBias DataDependentAlibi
PerRowDataDependentAlibi RotaryEmbedding rotate_half apply_rotary_pos_emb Scale LayerNorm AdaptiveLayerNorm ScaleNorm
RMSNorm AdaptiveRMSNorm SimpleRMSNorm MultiheadRMSNorm Residual GRUGating HyperConnection shift ShiftTokens FoldAxially
LayerScale AdaptiveLayerScale ConcatCombine GLU FeedForward Attention AttentionLayers Encoder Decoder PrefixDecoder
CrossAttender ViTransformerWrapper TransformerWrapper XTransformer
""".split()

PACKAGE_NAMES = """
XTransformer Encoder Decoder PrefixDecoder CrossAttender Attention FeedForward RMSNorm AdaptiveRMSNorm TransformerWrapper
ViTransformerWrapper AutoregressiveWrapper NonAutoregressiveWrapper ContinuousTransformerWrapper
ContinuousAutoregressiveWrapper MultiInputTransformerWrapper XValTransformerWrapper XValAutoregressiveWrapper
XLAutoregressiveWrapper DPO NeoMLP
""".split()


def test_module_reexports_upstream_names():
    missing = [name for name in UPSTREAM_NAMES if not hasattr(xt, name)]
    assert not missing, f"x_transformers.x_transformers lacks {missing}"


def test_package_exports_match_upstream():
    public = {name for name in dir(x_transformers) if not name.startswith("_") and name[0].isupper()}
    assert public == set(PACKAGE_NAMES)


def test_layer_intermediates_fields():
    fields = set(LayerIntermediates.__dataclass_fields__)
    upstream = {"hiddens", "last_hidden", "attn_intermediates", "layer_hiddens", "attn_z_loss", "mems", "memory_tokens", "logit_entropies"}
    assert fields == upstream | {"aux_loss"}
    assert LayerIntermediates().aux_loss is None


# every flag: builds, runs forward + backward, gives finite gradients

LAYER_FLAGS = [
    dict(),
    dict(use_scalenorm=True),
    dict(use_rmsnorm=True),
    dict(use_simple_rmsnorm=True),
    dict(norm_add_unit_offset=False),
    dict(alibi_pos_bias=True),
    dict(alibi_pos_bias=True, alibi_num_heads=1),
    dict(rel_pos_bias=True),
    dict(dynamic_pos_bias=True, dynamic_pos_bias_log_distance=True, dynamic_pos_bias_norm=True),
    dict(rotary_pos_emb=True),
    dict(rotary_xpos=True),
    dict(rotary_pos_emb=True, rotary_interpolation_factor=2.0, rotary_base_rescale_factor=2.0),
    dict(weight_tie_layers=True),
    dict(depth=None, custom_layers=("a", "f", "a", "a", "f")),
    dict(depth=None, custom_layers=("a", "f"), layers_execute_order=(0, 1, 0, 1)),
    dict(depth=4, sandwich_coef=2),
    dict(depth=4, par_ratio=2),
    dict(residual_attn=True),
    dict(macaron=True),
    dict(pre_norm=False),
    dict(pre_norm=True, pre_norm_has_final_norm=False),
    dict(gate_residual=True),
    dict(scale_residual=True, scale_residual_constant=0.5),
    dict(shift_tokens=1),
    dict(shift_tokens=(1, 0, 2, 0)),
    dict(sandwich_norm=True),
    dict(softclamp_output=True),
    dict(resi_dual=True),
    dict(resi_dual=True, resi_dual_scale=0.1),
    dict(zero_init_branch_output=True),
    dict(layer_dropout=0.5),
    dict(use_layerscale=True, layerscale_init_value=0.1),
    dict(depth=4, unet_skips=True),
    dict(num_residual_streams=4),
    dict(num_residual_streams=2, qkv_receive_diff_residuals=True),
    dict(reinject_input=True, learned_reinject_input_gate=True),
    dict(reinject_input=True, num_residual_streams=2),
    dict(add_value_residual=True),
    dict(add_value_residual=True, learned_value_residual_mix=False),
    dict(attn_flash=True),
    dict(attn_num_mem_kv=2),
    dict(attn_one_kv_head=True),
    dict(heads=4, attn_kv_heads=2),
    dict(attn_on_attn=True),
    dict(attn_gate_values=True, attn_gate_value_heads=True),
    dict(attn_swiglu_values=True),
    dict(attn_sparse_topk=2),
    dict(attn_hard=True),
    dict(attn_pre_talking_heads=True, attn_post_talking_heads=True),
    dict(attn_head_scale=True),
    dict(attn_qk_norm=True),
    dict(attn_qk_norm=True, attn_qk_norm_groups=2),
    dict(attn_qk_norm=True, attn_qk_norm_dim_scale=True),
    dict(attn_l2_distance=True),
    dict(attn_sigmoid=True),
    dict(attn_softclamp_logits=True),
    dict(attn_laser=True),
    dict(attn_data_dependent_alibi=True),
    dict(attn_use_cope=True),
    dict(attn_max_attend_past=4),
    dict(attn_add_zero_kv=True),
    dict(attn_value_dim_head=4),
    dict(attn_use_latent_q=True, attn_dim_latent_q=16, attn_use_latent_kv=True, attn_dim_latent_kv=16),
    dict(attn_hybrid_module=nn.GRU(DIM, 16, batch_first=True)),
    dict(attn_hybrid_module=nn.GRU(DIM, 16, batch_first=True), attn_hybrid_fold_axial_dim=2),
    dict(attn_dropout=0.1, ff_dropout=0.1),
    dict(ff_glu=True),
    dict(ff_swish=True, ff_glu=True, ff_glu_mult_bias=True),
    dict(ff_relu_squared=True),
    dict(ff_no_bias=True, ff_post_act_ln=True),
    dict(ff_mult=2),
]


def flag_id(flags):
    return "-".join(f"{k}={v}" if not isinstance(v, nn.Module) else k for k, v in flags.items()) or "default"


@pytest.mark.parametrize("flags", LAYER_FLAGS, ids=[flag_id(f) for f in LAYER_FLAGS])
def test_flag_forward_backward(flags):
    torch.manual_seed(0)
    model = lm(**flags)
    model.train()
    logits = model(tokens())
    assert logits.shape == (2, SEQ, NUM_TOKENS)
    logits.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 0 and all(torch.isfinite(g).all() for g in grads)


WRAPPER_FLAGS = [
    dict(emb_dim=8),
    dict(max_mem_len=4),
    dict(emb_dropout=0.1),
    dict(post_emb_norm=True),
    dict(num_memory_tokens=2),
    dict(num_memory_tokens=1, memory_tokens_interspersed_every=3),
    dict(tie_embedding=True),
    dict(logits_dim=3),
    dict(num_output_heads=2),
    dict(use_abs_pos_emb=False),
    dict(scaled_sinu_pos_emb=True),
    dict(l2norm_embed=True),
    dict(emb_frac_gradient=0.1),
    dict(mixture_of_softmax=True),
    dict(sigsoftmax_logits=True),
    dict(recycling=True),
]


@pytest.mark.parametrize("flags", WRAPPER_FLAGS, ids=[flag_id(f) for f in WRAPPER_FLAGS])
def test_wrapper_flag_forward_backward(flags):
    torch.manual_seed(0)
    model = lm(wrapper_kwargs=flags)
    out = model(tokens())
    out = torch.stack(out) if isinstance(out, tuple) else out
    assert out.shape[-2:] == (SEQ, flags.get("logits_dim", NUM_TOKENS))
    out.mean().backward()


def test_encoder_pooling_heads():
    x, mask = tokens(), padding_mask()
    assert lm(Encoder, dict(average_pool_embed=True, logits_dim=3))(x, mask=mask).shape == (2, 3)
    assert lm(Encoder, dict(use_cls_token=True, num_cls_tokens=2, logits_dim=3))(x, mask=mask).shape == (2, 2, 3)
    assert lm(Encoder, dict(attn_pool=True, logits_dim=3))(x, mask=mask).shape == (2, 3)
    assert lm(Encoder, dict(attn_pool=True, num_attn_pool_queries=4, logits_dim=3))(x, mask=mask).shape == (2, 4, 3)
    assert lm(Encoder, dict(average_pool_embed=True, logits_dim=1, squeeze_out_last_dim=True))(x, mask=mask).shape == (2,)


def test_condition_and_cross_attention_variants():
    x = tokens()
    cond = torch.randn(2, 8)
    for flags in (dict(use_adaptive_layernorm=True), dict(use_adaptive_rmsnorm=True, adaptive_condition_mlp=True), dict(use_adaptive_layerscale=True)):
        model = lm(dim_condition=8, **flags)
        model(x, condition=cond).sum().backward()

    context, context_mask = torch.randn(2, 5, DIM), padding_mask(2, 5)
    for flags in (dict(cross_residual_attn=True), dict(cross_attn_tokens_dropout=0.5)):
        model = lm(cross_attend=True, **flags)
        model.train()
        model(x, context=context, context_mask=context_mask).sum().backward()

    model = lm(cross_attend=True, cross_attn_dim_context=12, rotary_pos_emb=True)
    model(x, context=torch.randn(2, 5, 12), context_pos=torch.arange(5))

    layers = CrossAttender(**TINY)
    assert layers(torch.randn(2, 3, DIM), context=context, context_mask=context_mask).shape == (2, 3, DIM)


def test_prefix_decoder_is_bidirectional_in_prefix_only():
    torch.manual_seed(0)
    layers = PrefixDecoder(**TINY).eval()
    x = torch.randn(1, 6, DIM)
    out = layers(x, prefix_attn_len=3)
    changed = x.clone()
    changed[:, 2] += torch.randn(DIM)  # inside the prefix: earlier prefix positions see it
    assert not torch.allclose(layers(changed, prefix_attn_len=3)[:, 0], out[:, 0])
    changed = x.clone()
    changed[:, 4] += torch.randn(DIM)  # after the prefix: causal, so position 3 does not see it
    assert torch.allclose(layers(changed, prefix_attn_len=3)[:, :4], out[:, :4], atol=1e-6)


def test_xtransformer_routing_and_loss():
    model = XTransformer(
        dim=DIM, tie_token_emb=True, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_heads=2, enc_max_seq_len=16,
        enc_num_memory_tokens=1, dec_num_tokens=NUM_TOKENS, dec_depth=1, dec_heads=2, dec_max_seq_len=16,
        dec_rotary_pos_emb=True, cross_attn_tokens_dropout=0.25,
    )
    assert model.decoder.net.token_emb is model.encoder.token_emb
    assert model.encoder.num_memory_tokens == 1 and model.decoder.net.attn_layers.rotary_pos_emb is not None
    src, tgt = tokens(), tokens()
    loss = model(src, tgt, mask=padding_mask())
    loss.backward()
    out = model.generate(src[:, :4], tgt[:, :1], 3, mask=padding_mask(2, 4))
    assert out.shape == (2, 3)


def test_vit():
    vit = ViTransformerWrapper(image_size=8, patch_size=4, num_classes=3, num_register_tokens=2, attn_layers=Encoder(**TINY))
    img = torch.randn(2, 3, 8, 8)
    logits, embed = vit(img, return_logits_and_embeddings=True)
    assert logits.shape == (2, 3) and embed.shape == (2, 4, DIM)
    assert vit(img, return_embeddings=True).shape == (2, 4, DIM)
    no_head = ViTransformerWrapper(image_size=8, patch_size=4, attn_layers=Encoder(**TINY))
    assert no_head(img).shape == (2, DIM)  # as upstream: the identity head returns the mean-pooled embedding


# return conventions


def test_return_conventions():
    torch.manual_seed(0)
    model = lm(wrapper_kwargs=dict(max_mem_len=6)).eval()
    x = tokens()
    logits = model(x)

    logits2, embeds = model(x, return_logits_and_embeddings=True)
    assert torch.allclose(logits, logits2) and embeds.shape == (2, SEQ, DIM)
    assert torch.allclose(model(x, return_embeddings=True), embeds)

    _, inter = model(x, return_intermediates=True)
    assert isinstance(inter, LayerIntermediates) and len(inter.attn_intermediates) == 2
    assert len(inter.hiddens) == 2 and len(inter.layer_hiddens) == 5 and inter.aux_loss is None
    assert torch.allclose(inter.last_hidden, embeds)

    _, mems = model(x, return_mems=True)
    assert len(mems) == 2 and mems[0].shape == (2, 6, DIM)
    out_with_mems = model(x, mems=mems)
    assert out_with_mems.shape == logits.shape and not torch.allclose(out_with_mems, logits)

    _, attn_maps = model(x, return_attn=True)
    assert len(attn_maps) == 2 and attn_maps[0].shape == (2, 2, SEQ, SEQ)

    _, inter = model(x, return_attn_z_loss=True)
    assert inter.attn_z_loss.ndim == 0 and inter.attn_z_loss > 0

    _, inter = model(x, return_logit_entropies=True)
    assert inter.logit_entropies.shape == (2, SEQ)

    prepend = torch.randn(2, 3, DIM)
    assert model(x, prepend_embeds=prepend, mask=padding_mask()).shape == (2, SEQ + 3, NUM_TOKENS)
    assert model(x, sum_embeds=torch.randn(2, SEQ, DIM)).shape == logits.shape
    assert model(x, seq_start_pos=torch.tensor([0, 2])).shape == logits.shape


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = lm(rotary_pos_emb=True, cross_attend=True).eval()
    x, context = tokens(), torch.randn(2, 5, DIM)
    _, cache = model(x[:, :-1], context=context, return_intermediates=True)
    full = model(x, context=context)
    cached = model(x, context=context, cache=cache)
    assert torch.allclose(full[:, -1], cached[:, -1], atol=1e-5)


# errors


def test_unknown_kwargs_are_named():
    with pytest.raises(TypeError, match="bogus_flag"):
        Decoder(dim=DIM, depth=1, bogus_flag=True)
    with pytest.raises(TypeError, match="attn_bogus"):
        Decoder(dim=DIM, depth=1, attn_bogus=True)
    with pytest.raises(TypeError, match="cross_attn_bogus"):
        Decoder(dim=DIM, depth=1, cross_attend=True, cross_attn_bogus=True)
    with pytest.raises(TypeError, match="ff_bogus"):
        Encoder(dim=DIM, depth=1, ff_bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=16, attn_layers=Decoder(dim=DIM, depth=1), bogus=1)
    with pytest.raises(TypeError, match="enc_bogus"):
        XTransformer(dim=DIM, enc_num_tokens=4, enc_depth=1, enc_max_seq_len=4, enc_bogus=1, dec_num_tokens=4, dec_depth=1, dec_max_seq_len=4)
    with pytest.raises(TypeError, match="dec_attn_bogus"):
        XTransformer(dim=DIM, enc_num_tokens=4, enc_depth=1, enc_max_seq_len=4, dec_num_tokens=4, dec_depth=1, dec_max_seq_len=4, dec_attn_bogus=1)
    with pytest.raises(TypeError, match="stray"):
        XTransformer(dim=DIM, enc_num_tokens=4, enc_depth=1, enc_max_seq_len=4, dec_num_tokens=4, dec_depth=1, dec_max_seq_len=4, stray=1)


def test_bad_inputs_raise_clear_errors():
    model = lm()
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.randint(0, NUM_TOKENS, (2, 3, 4)))
    with pytest.raises(TypeError, match="integer"):
        model(torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, NUM_TOKENS, (1, 17)))
    with pytest.raises(ValueError, match="mask"):
        model(tokens(), mask=torch.ones(2, SEQ + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        model(tokens(), mask=torch.ones(2, SEQ))
    with pytest.raises(TypeError, match="AttentionLayers"):
        TransformerWrapper(num_tokens=4, max_seq_len=4, attn_layers=nn.Linear(2, 2))

    layers = Encoder(**TINY)
    with pytest.raises(ValueError, match=f"batch, seq, {DIM}"):
        layers(torch.randn(2, 4, DIM + 1))
    with pytest.raises(ValueError, match="cross_attend"):
        layers(torch.randn(2, 4, DIM), context=torch.randn(2, 3, DIM))
    cross = Decoder(cross_attend=True, **TINY)
    with pytest.raises(ValueError, match="context"):
        cross(torch.randn(2, 4, DIM))
    with pytest.raises(ValueError, match="context_mask"):
        cross(torch.randn(2, 4, DIM), context=torch.randn(2, 3, DIM), context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="condition"):
        Decoder(use_adaptive_layernorm=True, **TINY)(torch.randn(1, 2, DIM))

    vit = ViTransformerWrapper(image_size=8, patch_size=4, attn_layers=Encoder(**TINY))
    with pytest.raises(ValueError, match="channels"):
        vit(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="patch size"):
        vit(torch.randn(1, 3, 6, 6))

    # relative positions have no max_seq_len limit
    assert lm(rotary_pos_emb=True)(torch.randint(0, NUM_TOKENS, (1, 20))).shape == (1, 20, NUM_TOKENS)


@pytest.mark.parametrize("flash", (False, True))
def test_fully_masked_rows_give_no_nan(flash):
    torch.manual_seed(0)
    model = lm(Encoder, attn_flash=flash)
    mask = padding_mask()
    mask[0] = False
    logits = model(tokens(), mask=mask)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_padding_does_not_leak_with_hyper_connections():
    torch.manual_seed(0)
    model = lm(Encoder, num_residual_streams=3).eval()
    x, mask = tokens(), padding_mask()
    out = model(x, mask=mask)
    other = x.masked_fill(~mask, 1)
    assert torch.allclose(model(other, mask=mask)[mask], out[mask], atol=1e-5)


# ResiDual (arXiv 2304.14802): accepted (upstream 2.0.1 rejects it) and computed as post-norm + normed pre-norm sum


def test_resi_dual_matches_manual_computation():
    torch.manual_seed(0)
    scale = 0.5
    layers = Encoder(dim=DIM, depth=1, heads=2, attn_dim_head=8, resi_dual=True, resi_dual_scale=scale).eval()
    assert not layers.pre_norm
    x = torch.randn(2, 5, DIM)

    (attn_norms, attn, _), (ff_norms, ff, _) = layers.layers
    attn_out = attn(x)
    h = attn_norms[2](x + attn_out)
    ff_out = ff(h)
    h = ff_norms[2](h + ff_out)
    expected = h + layers.final_norm(scale * (x + attn_out + ff_out))

    assert torch.allclose(layers(x), expected, atol=1e-5)


# hybrid layouts (our contract): the mixer factory is replaced with a dummy that records its calls


class DummyMixer(nn.Module):
    def __init__(self, dim, heads, causal, **kwargs):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.heads, self.causal, self.kwargs = heads, causal, kwargs
        self.calls = []

    def forward(self, x, mask=None, cache=None, return_intermediates=False):
        self.calls.append(dict(n=x.shape[1], mask=mask, cache=cache))
        steps = (cache.recurrent_state[0] if cache is not None else 0) + x.shape[1]
        out = self.proj(x)
        if not return_intermediates:
            return out
        return out, Intermediates(recurrent_state=(steps,), layer_type="l")


@pytest.fixture
def dummy_mixers(monkeypatch):
    built = []

    def make_mixer(name, *, dim, heads, causal, **kwargs):
        if name != "dummy":
            raise ValueError(f"unknown mixer {name!r}")
        mixer = DummyMixer(dim, heads, causal, **kwargs)
        built.append(mixer)
        return mixer

    monkeypatch.setitem(sys.modules, "x_transformers.mixers", types.SimpleNamespace(make_mixer=make_mixer))
    return built


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(linear_attn="dummy"), ("l", "f") * 4),
        (dict(linear_attn="dummy", hybrid_pattern="LN"), ("l", "f", "a", "f") * 2),
        (dict(linear_attn="dummy", hybrid_pattern="LLN"), ("l", "f", "l", "f", "a", "f", "l", "f")),
        (dict(linear_attn="dummy", softmax_attn_layers=(0, 3)), ("a", "f", "l", "f", "l", "f", "a", "f")),
    ],
)
def test_hybrid_layouts(dummy_mixers, kwargs, expected):
    layers = Decoder(dim=DIM, depth=4, heads=2, **kwargs)
    assert layers.layer_types == expected
    assert len(dummy_mixers) == expected.count("l")
    assert layers.num_attn_layers == expected.count("a")
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=16, attn_layers=layers)
    model(tokens()).sum().backward()


def test_hybrid_custom_layers_and_routing(dummy_mixers):
    layers = Encoder(dim=DIM, heads=4, custom_layers=("l", "f", "a", "f"), linear_attn="dummy", linear_attn_expand=2, linear_attn_heads=1)
    assert layers.layer_types == ("l", "f", "a", "f")
    (mixer,) = dummy_mixers
    assert mixer.kwargs == dict(expand=2) and mixer.heads == 1 and mixer.causal is False

    Decoder(dim=DIM, depth=1, heads=4, linear_attn="dummy")
    assert dummy_mixers[-1].heads == 4 and dummy_mixers[-1].causal is True

    mask = padding_mask()
    layers(torch.randn(2, SEQ, DIM), mask=mask)
    assert mixer.calls[-1]["mask"] is mask


def test_hybrid_errors(dummy_mixers):
    with pytest.raises(ValueError, match="linear_attn"):
        Decoder(dim=DIM, depth=2, hybrid_pattern="LN")
    with pytest.raises(ValueError, match="linear_attn"):
        Decoder(dim=DIM, depth=2, softmax_attn_layers=(0,))
    with pytest.raises(ValueError, match="linear_attn"):
        Decoder(dim=DIM, custom_layers=("l", "f"))
    with pytest.raises(ValueError, match="hybrid_pattern"):
        Decoder(dim=DIM, depth=2, linear_attn="dummy", hybrid_pattern="LX")
    with pytest.raises(ValueError, match="unknown mixer"):
        Decoder(dim=DIM, depth=2, linear_attn="nope")


def test_hybrid_cache_flows_through(dummy_mixers):
    torch.manual_seed(0)
    layers = Decoder(dim=DIM, depth=2, heads=2, attn_dim_head=8, linear_attn="dummy", hybrid_pattern="LN")
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=16, attn_layers=layers).eval()
    x = tokens()
    _, cache = model(x[:, :-1], return_intermediates=True)
    assert [inter.layer_type for inter in cache.attn_intermediates] == ["l", "a"]
    assert cache.attn_intermediates[0].recurrent_state == (SEQ - 1,)

    _, new_cache = model(x, cache=cache, return_intermediates=True)
    (mixer,) = dummy_mixers
    assert mixer.calls[-1]["n"] == 1 and mixer.calls[-1]["cache"] is cache.attn_intermediates[0]
    assert new_cache.attn_intermediates[0].recurrent_state == (SEQ,)

    # attention z-loss and attention maps skip the mixer blocks
    _, inter = model(x, return_attn_z_loss=True)
    assert torch.isfinite(inter.attn_z_loss)
    _, maps = model(x, return_attn=True)
    assert len(maps) == 1


# mixture of experts wiring (our contract), with a dummy MoE


class DummyMoE(nn.Module):
    def __init__(self, dim, num_experts, top_k=2, **kwargs):
        super().__init__()
        self.experts = nn.Linear(dim, dim)
        self.num_experts, self.top_k, self.kwargs = num_experts, top_k, kwargs
        self.masks = []

    def forward(self, x, mask=None):
        self.masks.append(mask)
        return self.experts(x), self.experts.weight.abs().mean() * 0 + 0.25


@pytest.fixture
def dummy_moe(monkeypatch):
    monkeypatch.setitem(sys.modules, "x_transformers.moe", types.SimpleNamespace(MoE=DummyMoE))


def test_moe_wiring(dummy_moe):
    model = lm(Encoder, depth=3, ff_num_experts=4, ff_top_k=1, ff_mult=2, macaron=True)
    moes = [m for m in model.modules() if isinstance(m, DummyMoE)]
    assert len(moes) == 6  # macaron: two feedforwards per block
    assert moes[0].num_experts == 4 and moes[0].top_k == 1 and moes[0].kwargs == dict(mult=2)
    assert any(key.startswith("attn_layers.layers.0.1.fn.experts.") for key in model.state_dict())

    mask = padding_mask()
    _, inter = model(tokens(), mask=mask, return_intermediates=True)
    assert torch.allclose(inter.aux_loss, torch.tensor(0.25 * 6))
    assert moes[0].masks[-1] is mask

    _, inter = lm()(tokens(), return_intermediates=True)
    assert inter.aux_loss is None


# GPU: the same assembly under bf16 autocast with SDPA, and cached decoding (skipped without CUDA)

CUDA_FLAGS = [
    dict(attn_flash=True),
    dict(attn_flash=True, rotary_pos_emb=True, attn_kv_heads=1),
    dict(attn_flash=True, num_residual_streams=2, add_value_residual=True),
    dict(residual_attn=True, macaron=True, sandwich_norm=True),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("flags", CUDA_FLAGS, ids=[flag_id(f) for f in CUDA_FLAGS])
def test_cuda_bf16_and_cache(flags):
    torch.manual_seed(0)
    model = lm(**flags).cuda()
    x = tokens().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
    assert torch.isfinite(logits).all()
    logits.float().mean().backward()

    model.eval()
    with torch.no_grad():
        _, cache = model(x[:, :-1], return_intermediates=True)
        cached = model(x, cache=cache)[:, -1]
        full = model(x)[:, -1]
    torch.testing.assert_close(cached, full, rtol=1e-3, atol=1e-3)
