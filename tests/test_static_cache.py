"""Every constructor flag either decodes exactly with a cache or refuses by name.

For each flag of `TransformerWrapper`, `AttentionLayers`, `Attention` (`attn_`), `FeedForward` / `MoE` (`ff_`) and
each mixer that changes a decoder's forward: greedy tokens with the static cache (x_transformers/cache.py, through
the fast decoder's eager step) and with the plain concatenating cache equal the tokens decoded without any cache;
or the static cache refuses, naming the flag, and generation falls back to the plain cache. A completeness check
makes a new constructor flag fail here until it is entered in the table.
"""

import inspect

import pytest
import torch

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper
from x_transformers.attention import Attention
from x_transformers.cache import StaticCache, static_cache_refusal
from x_transformers.feedforward import FeedForward
from x_transformers.mixers import MIXERS, mixer_class
from x_transformers.moe import MoE
from x_transformers.tensor_product_attention import TensorProductAttention
from x_transformers.x_transformers import AttentionLayers

NUM_TOKENS = 32

# flag -> (Decoder kwargs, TransformerWrapper kwargs); companions are flags a flag needs to act
FLAGS = dict(
    # norms and residuals
    use_scalenorm=(dict(use_scalenorm=True), {}),
    use_rmsnorm=(dict(use_rmsnorm=True), {}),
    use_simple_rmsnorm=(dict(use_simple_rmsnorm=True), {}),
    use_dynamic_tanh=(dict(use_dynamic_tanh=True), {}),
    dynamic_tanh_init_alpha=(dict(use_dynamic_tanh=True, dynamic_tanh_init_alpha=0.5), {}),
    use_derf=(dict(use_derf=True), {}),
    pre_and_post_norm=(dict(pre_and_post_norm=True), {}),
    norm_add_unit_offset=(dict(use_rmsnorm=True, norm_add_unit_offset=True), {}),
    pre_norm=(dict(pre_norm=False), {}),
    pre_norm_has_final_norm=(dict(pre_norm_has_final_norm=False), {}),
    sandwich_norm=(dict(sandwich_norm=True), {}),
    resi_dual=(dict(resi_dual=True, pre_norm=False), {}),
    resi_dual_scale=(dict(resi_dual=True, pre_norm=False, resi_dual_scale=0.5), {}),
    gate_residual=(dict(gate_residual=True), {}),
    scale_residual=(dict(scale_residual=True), {}),
    scale_residual_constant=(dict(scale_residual_constant=0.5), {}),
    num_residual_streams=(dict(num_residual_streams=2), {}),
    qkv_receive_diff_residuals=(dict(num_residual_streams=2, qkv_receive_diff_residuals=True), {}),
    residual_fn_kwargs=(dict(gate_residual=True, residual_fn_kwargs=dict()), {}),
    use_layerscale=(dict(use_layerscale=True, layerscale_init_value=0.5), {}),
    layerscale_init_value=(dict(use_layerscale=True, layerscale_init_value=0.3), {}),
    zero_init_branch_output=(dict(zero_init_branch_output=True), {}),
    softclamp_output=(dict(softclamp_output=True, softclamp_output_value=2.0), {}),
    softclamp_output_value=(dict(softclamp_output=True, softclamp_output_value=1.0), {}),
    unet_skips=(dict(unet_skips=True), {}),
    reinject_input=(dict(reinject_input=True), {}),
    learned_reinject_input_gate=(dict(reinject_input=True, learned_reinject_input_gate=True), {}),
    add_value_residual=(dict(add_value_residual=True), {}),
    learned_value_residual_mix=(dict(add_value_residual=True, learned_value_residual_mix=True), {}),
    residual_attn=(dict(residual_attn=True), {}),
    # layer arrangement
    macaron=(dict(macaron=True), {}),
    par_ratio=(dict(depth=6, par_ratio=2), {}),
    sandwich_coef=(dict(depth=4, sandwich_coef=1), {}),
    custom_layers=(dict(custom_layers=("a", "a", "f")), {}),
    weight_tie_layers=(dict(weight_tie_layers=True), {}),
    layers_execute_order=(dict(layers_execute_order=(0, 1, 0, 1, 2, 3)), {}),
    shift_tokens=(dict(shift_tokens=1), {}),
    # positions
    rotary_pos_emb=(dict(rotary_pos_emb=True), {}),
    rotary_emb_dim=(dict(rotary_pos_emb=True, rotary_emb_dim=4), {}),
    rotary_interpolation_factor=(dict(rotary_pos_emb=True, rotary_interpolation_factor=2.0), {}),
    rotary_base_rescale_factor=(dict(rotary_pos_emb=True, rotary_base_rescale_factor=2.0), {}),
    rotary_xpos=(dict(rotary_pos_emb=True, rotary_xpos=True), {}),
    rotary_xpos_scale_base=(dict(rotary_pos_emb=True, rotary_xpos=True, rotary_xpos_scale_base=64), {}),
    alibi_pos_bias=(dict(alibi_pos_bias=True), {}),
    alibi_num_heads=(dict(alibi_pos_bias=True, alibi_num_heads=2), {}),
    rel_pos_bias=(dict(rel_pos_bias=True), {}),
    rel_pos_num_buckets=(dict(rel_pos_bias=True, rel_pos_num_buckets=8, rel_pos_max_distance=16), {}),
    rel_pos_max_distance=(dict(rel_pos_bias=True, rel_pos_num_buckets=4, rel_pos_max_distance=6), {}),
    rel_pos_kwargs=(dict(alibi_pos_bias=True, rel_pos_kwargs=dict(slopes=[0.5, 0.25, 0.125, 0.0625])), {}),
    dynamic_pos_bias=(dict(dynamic_pos_bias=True), {}),
    dynamic_pos_bias_log_distance=(dict(dynamic_pos_bias=True, dynamic_pos_bias_log_distance=True), {}),
    dynamic_pos_bias_mlp_depth=(dict(dynamic_pos_bias=True, dynamic_pos_bias_mlp_depth=3), {}),
    dynamic_pos_bias_norm=(dict(dynamic_pos_bias=True, dynamic_pos_bias_norm=True), {}),
    disable_abs_pos_emb=(dict(disable_abs_pos_emb=True, rotary_pos_emb=True), {}),
    # attention
    attn_dim_head=(dict(attn_dim_head=4), {}),
    attn_flash=(dict(attn_flash=True, rotary_pos_emb=True), {}),
    attn_pre_talking_heads=(dict(attn_pre_talking_heads=True), {}),
    attn_post_talking_heads=(dict(attn_post_talking_heads=True), {}),
    attn_pre_scale_post_talking_heads=(dict(attn_pre_scale_post_talking_heads=True), {}),
    attn_head_scale=(dict(attn_head_scale=True), {}),
    attn_sparse_topk=(dict(attn_sparse_topk=2), {}),
    attn_sparse_topk_straight_through=(dict(attn_sparse_topk=2, attn_sparse_topk_straight_through=True), {}),
    attn_num_mem_kv=(dict(attn_num_mem_kv=2, rotary_pos_emb=True), {}),
    attn_on_attn=(dict(attn_on_attn=True), {}),
    attn_gate_value_heads=(dict(attn_gate_value_heads=True), {}),
    attn_swiglu_values=(dict(attn_gate_values=True, attn_swiglu_values=True), {}),
    attn_gate_values=(dict(attn_gate_values=True), {}),
    attn_zero_init_output=(dict(attn_zero_init_output=True), {}),
    attn_hard=(dict(attn_hard=True), {}),
    attn_max_attend_past=(dict(attn_max_attend_past=2), {}),
    attn_qk_norm=(dict(attn_qk_norm=True), {}),
    attn_qk_norm_groups=(dict(attn_qk_norm=True, attn_qk_norm_groups=2), {}),
    attn_qk_norm_scale=(dict(attn_qk_norm=True, attn_qk_norm_scale=4), {}),
    attn_qk_norm_dim_scale=(dict(attn_qk_norm=True, attn_qk_norm_dim_scale=True), {}),
    attn_l2_distance=(dict(attn_l2_distance=True), {}),
    attn_sigmoid=(dict(attn_sigmoid=True), {}),
    attn_selective=(dict(attn_selective=True), {}),
    attn_custom_attn_fn=(dict(attn_custom_attn_fn=lambda sim: sim.softmax(dim=-1)), {}),
    attn_hybrid_module=(dict(attn_dim_head=8, attn_hybrid_module=torch.nn.GRU(32, 32, batch_first=True)), {}),
    attn_one_kv_head=(dict(attn_one_kv_head=True), {}),
    attn_kv_heads=(dict(attn_kv_heads=2, rotary_pos_emb=True), {}),
    attn_value_dim_head=(dict(attn_value_dim_head=4), {}),
    attn_dim_out=(dict(attn_dim_out=32), {}),
    attn_add_zero_kv=(dict(attn_add_zero_kv=True), {}),
    attn_rotate_num_heads=(dict(rotary_pos_emb=True, attn_rotate_num_heads=2), {}),
    attn_data_dependent_alibi=(dict(attn_data_dependent_alibi=True), {}),
    attn_data_dependent_alibi_per_row=(dict(attn_data_dependent_alibi=True, attn_data_dependent_alibi_per_row=True), {}),
    attn_use_cope=(dict(attn_use_cope=True), {}),
    attn_softclamp_logits=(dict(attn_softclamp_logits=True, attn_logit_softclamp_value=2.0), {}),
    attn_neutreno_value_residual=(dict(add_value_residual=True, attn_neutreno_value_residual=True), {}),
    attn_laser=(dict(attn_laser=True), {}),
    attn_flash_pack_seq=(dict(attn_flash_pack_seq=True), {}),
    attn_use_latent_q=(dict(attn_use_latent_q=True, attn_dim_latent_q=16), {}),
    attn_use_latent_kv=(dict(attn_use_latent_kv=True, attn_dim_latent_kv=16), {}),
    attn_tensor_product=(dict(attn_tensor_product=True, attn_dim_head=8, rotary_pos_emb=True), {}),
    attn_tensor_product_q_rank=(dict(attn_tensor_product=True, attn_tensor_product_q_rank=2), {}),
    attn_tensor_product_k_rank=(dict(attn_tensor_product=True, attn_tensor_product_k_rank=3), {}),
    attn_tensor_product_v_rank=(dict(attn_tensor_product=True, attn_tensor_product_v_rank=1), {}),
    attn_tensor_product_multi_product=(dict(attn_tensor_product=True, attn_tensor_product_multi_product=True), {}),
    attn_latent_rope_subheads=(dict(attn_use_latent_kv=True, attn_dim_latent_kv=16, attn_latent_rope_subheads=2,
                                    rotary_pos_emb=True), {}),
    attn_qk_rmsnorm=(dict(attn_qk_rmsnorm=True, rotary_pos_emb=True), {}),
    attn_k_rmsnorm=(dict(attn_k_rmsnorm=True, attn_kv_heads=2), {}),
    attn_value_rmsnorm=(dict(attn_value_rmsnorm=True, rotary_pos_emb=True), {}),
    attn_output_gate=(dict(attn_output_gate=True), {}),
    attn_output_gate_rank=(dict(attn_output_gate=True, attn_output_gate_rank=4), {}),
    attn_output_gate_headwise=(dict(attn_output_gate=True, attn_output_gate_headwise=True, attn_gate_values=True), {}),
    attn_low_rank_silu_gates=(dict(attn_gate_values=True, attn_gate_values_rank=4, attn_low_rank_silu_gates=False), {}),
    attn_gate_values_rank=(dict(attn_gate_values=True, attn_gate_values_rank=4, attn_output_gate=True), {}),
    attn_gate_values_headwise=(dict(attn_gate_values=True, attn_gate_values_headwise=True), {}),
    attn_head_learned_sink=(dict(attn_head_learned_sink=True, attn_num_mem_kv=1, rotary_pos_emb=True), {}),
    attn_sublayer_dropout=(dict(attn_sublayer_dropout=0.1), {}),
    attn_output_proj_depth=(dict(attn_output_proj_depth=2), {}),
    # feedforward and mixture of experts
    ff_mult=(dict(ff_mult=2), {}),
    ff_glu=(dict(ff_glu=True), {}),
    ff_glu_mult_bias=(dict(ff_glu=True, ff_glu_mult_bias=True), {}),
    ff_swish=(dict(ff_swish=True), {}),
    ff_relu_squared=(dict(ff_relu_squared=True), {}),
    ff_post_act_ln=(dict(ff_post_act_ln=True), {}),
    ff_solu=(dict(ff_solu=True), {}),
    ff_custom_activation=(dict(ff_custom_activation=torch.nn.Tanh()), {}),
    ff_softclamp_value=(dict(ff_softclamp_value=0.5), {}),
    ff_glu_softclamp=(dict(ff_glu=True, ff_glu_softclamp=True), {}),
    ff_glu_gate_softclamp_value=(dict(ff_glu=True, ff_glu_softclamp=True, ff_glu_gate_softclamp_value=0.5), {}),
    ff_glu_up_softclamp_value=(dict(ff_glu=True, ff_glu_softclamp=True, ff_glu_up_softclamp_value=0.5), {}),
    ff_no_bias=(dict(ff_no_bias=True), {}),
    ff_num_experts=(dict(ff_num_experts=4), {}),
    ff_top_k=(dict(ff_num_experts=4, ff_top_k=1), {}),
    ff_num_shared_experts=(dict(ff_num_experts=4, ff_num_shared_experts=1), {}),
    ff_capacity_factor=(dict(ff_num_experts=4, ff_capacity_factor=1.0), {}),
    # the wrapper
    emb_dim=({}, dict(emb_dim=16)),
    post_emb_norm=({}, dict(post_emb_norm=True)),
    num_memory_tokens=({}, dict(num_memory_tokens=2)),
    tie_embedding=({}, dict(tie_embedding=True)),
    use_abs_pos_emb=(dict(rotary_pos_emb=True), dict(use_abs_pos_emb=False)),
    scaled_sinu_pos_emb=({}, dict(scaled_sinu_pos_emb=True)),
    l2norm_embed=({}, dict(l2norm_embed=True)),
    recycling=({}, dict(recycling=True)),
    mixture_of_softmax=({}, dict(mixture_of_softmax=True)),
    sigsoftmax_logits=({}, dict(sigsoftmax_logits=True)),
    max_seq_len=({}, dict(max_seq_len=64)),
    **{f"linear_attn={name}": (dict(linear_attn=name), {}) for name in MIXERS},
    hybrid_pattern=(dict(linear_attn="gla", hybrid_pattern="LN", rotary_pos_emb=True), {}),
    hybrid_legend=(dict(hybrid_pattern="GKN", hybrid_legend=dict(G="gla", K="kda"), rotary_pos_emb=True), {}),
    softmax_attn_layers=(dict(linear_attn="hgrn", softmax_attn_layers=(1,)), {}),
)

# flags that only act with another flag, whose name the refusal gives
REFUSED_AS = dict(
    attn_data_dependent_alibi_per_row="attn_data_dependent_alibi",
    attn_latent_rope_subheads="attn_use_latent_kv",
    rotary_xpos_scale_base="rotary_xpos",
)

# constructor arguments that do not change a decoder's eval forward, or are not flags of a decoder-only model
NOT_DECODER_FLAGS = {
    # sizes and the constructor's own plumbing
    "dim", "depth", "heads", "causal", "attn_heads", "attn_dim", "attn_dim_context", "attn_causal", "ff_dim", "ff_dim_out",
    "num_tokens", "attn_layers", "token_emb", "to_logits", "return_only_embed", "logits_dim", "num_output_heads",
    "squeeze_out_last_dim", "embed_num_tokens", "attn_onnxable", "attn_attend_sdp_kwargs",
    "attn_hybrid_mask_kwarg", "attn_hybrid_fold_axial_dim", "attn_data_dependent_alibi_kwargs",
    "attn_data_dependent_alibi_per_row_dim_head", "attn_cope_max_pos", "attn_cope_soft_onehot_pos",
    "attn_cope_talking_heads", "attn_logit_softclamp_value", "attn_laser_softclamp_value", "attn_neutreno_alpha",
    "attn_dim_latent_q", "attn_dim_latent_kv", "ff_ff_kwargs", "ff_aux_loss_weight", "ff_router_z_loss_weight",
    "ff_zero_init_output", "attn_learned_value_residual_mix", "attn_qkv_receive_diff_residuals",
    # dropout and training-only settings: nothing at eval
    "attn_dropout", "ff_dropout", "layer_dropout", "cross_attn_tokens_dropout", "emb_dropout", "emb_frac_gradient",
    "attn_z_loss_weight", "train_max_recycle_steps",
    # encoder / cross-attention / conditioning / memories: other tests (cross attention decodes in test_fast_decode)
    "cross_attend", "only_cross", "cross_residual_attn", "use_adaptive_layernorm", "use_adaptive_rmsnorm",
    "use_adaptive_layerscale", "dim_condition", "adaptive_condition_mlp", "adaptive_condition_mlp_expansion",
    "max_mem_len", "shift_mem_down", "memory_tokens_interspersed_every", "average_pool_embed", "use_cls_token",
    "num_cls_tokens", "attn_pool", "num_attn_pool_queries", "mixture_of_softmax_k",
    # mixers' own keywords are covered by tests/test_mixers.py
    "linear_attn",
}


def constructor_flags():
    def params(cls, prefix=""):
        names = inspect.signature(cls.__init__).parameters
        return {prefix + name for name in names if name not in ("self", "kwargs")}

    return (
        params(AttentionLayers) | params(Attention, "attn_") | params(FeedForward, "ff_") | params(MoE, "ff_")
        | params(TransformerWrapper) | {"attn_tensor_product"}
        | params(TensorProductAttention, "attn_tensor_product_") - {f"attn_tensor_product_{name}" for name in (
            "dim", "heads", "dim_head", "causal", "flash", "dropout", "zero_init_output")}
    )


def test_every_constructor_flag_is_in_the_table():
    missing = sorted(constructor_flags() - set(FLAGS) - NOT_DECODER_FLAGS)
    assert not missing, f"enter these constructor flags in FLAGS (or NOT_DECODER_FLAGS, saying why): {missing}"


def build(layer_kwargs, wrapper_kwargs):
    kwargs = dict(dim=32, depth=2, heads=4) | layer_kwargs
    net = TransformerWrapper(
        num_tokens=NUM_TOKENS, **(dict(max_seq_len=32) | wrapper_kwargs), attn_layers=Decoder(**kwargs)
    )
    # away from the initialization, where zero-init gates and identity talking heads would hide a missing piece
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return AutoregressiveWrapper(net).eval()


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_flag_decodes_exactly_or_refuses(flag):
    layer_kwargs, wrapper_kwargs = FLAGS[flag]
    name = flag.split("=")[-1] if flag.startswith("linear_attn=") else flag
    if flag.startswith("linear_attn=") and not getattr(mixer_class(name), "can_cache_kv", True):
        pytest.skip(f"linear_attn={name!r} has no recurrent form (its refusal is tested with the mixer)")
    torch.manual_seed(0)
    model = build(layer_kwargs, wrapper_kwargs)
    prompts = torch.randint(0, NUM_TOKENS, (2, 4))
    generate_kwargs = dict(temperature=0.0, recycle_steps=2) if flag == "recycling" else dict(temperature=0.0)

    expected = model.generate(prompts, 8, cache_kv=False, **generate_kwargs)

    if model.net.can_cache_kv:
        plain = model.generate(prompts, 8, cache_kv=True, fast_decode=False, **generate_kwargs)
        assert torch.equal(plain, expected), f"{flag}: the plain cache decodes other tokens"

    refusal = static_cache_refusal(model.net)
    if refusal is None:
        static = model.generate(prompts, 8, cache_kv=True, fast_decode="eager", **generate_kwargs)
        assert torch.equal(static, expected), f"{flag}: the static cache decodes other tokens"
    else:
        assert REFUSED_AS.get(name, name) in refusal, f"{flag}: the refusal does not name the flag: {refusal}"
        with pytest.raises(ValueError, match="static cache"):
            model.net(prompts, cache=StaticCache(2, 16))


@pytest.mark.parametrize("flag", ["rotary_pos_emb", "alibi_pos_bias", "shift_tokens", "linear_attn=gated_deltanet"])
def test_left_padded_prompts_decode_like_separate_rows(flag):
    # a row of a left-padded batch continues exactly as the same prompt decoded alone
    torch.manual_seed(1)
    model = build(*FLAGS[flag])
    short, long = torch.randint(0, NUM_TOKENS, (1, 3)), torch.randint(0, NUM_TOKENS, (1, 5))
    # right padded, as `generate(prompt_lens=)` takes them
    prompts = torch.cat((torch.cat((short, torch.zeros(1, 2, dtype=torch.long)), dim=1), long))
    lens = torch.tensor([3, 5])
    batched = model.generate(prompts, 6, temperature=0.0, prompt_lens=lens, fast_decode="eager")
    assert torch.equal(batched[:1], model.generate(short, 6, temperature=0.0, cache_kv=False))
    assert torch.equal(batched[1:], model.generate(long, 6, temperature=0.0, cache_kv=False))


def test_logits_of_chunks_equal_the_full_forward():
    # the cache takes any number of new tokens per call: prefill, a chunk, single tokens
    torch.manual_seed(2)
    net = build(dict(rotary_pos_emb=True, shift_tokens=1, linear_attn="gla", hybrid_pattern="LN"), {}).net
    x = torch.randint(0, NUM_TOKENS, (2, 12))
    cache = StaticCache(2, 16)
    chunks = [net(x[:, :5], cache=cache), net(x[:, 5:9], cache=cache), net(x[:, 9:10], cache=cache),
              net(x[:, 10:], cache=cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), net(x), atol=1e-5, rtol=1e-5)
    assert int(cache.pos) == 12

    # a reset starts over, reusing the buffers
    cache.reset()
    torch.testing.assert_close(net(x[:, :7], cache=cache), net(x[:, :7]), atol=1e-5, rtol=1e-5)


def test_static_cache_errors():
    torch.manual_seed(3)
    net = build(dict(rotary_pos_emb=True), {}).net
    x = torch.randint(0, NUM_TOKENS, (2, 6))
    with pytest.raises(ValueError, match="do not fit a static cache of length 4"):
        net(x, cache=StaticCache(2, 4))
    with pytest.raises(ValueError, match="holds 3 rows"):
        net(x, cache=StaticCache(3, 8))
    with pytest.raises(ValueError, match="mask"):
        net(x, cache=StaticCache(2, 8), mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="positive"):
        StaticCache(0, 8)
