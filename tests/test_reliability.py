"""Every configuration computes right or refuses clearly, under every dtype, shape and tool.

Classes of inputs, for every mixer and the softmax attention paths: empty batches, length 1, lengths that are no
multiple of any block size, fp16 / bf16 / fp64 on the CPU, fully masked rows, inf / NaN at masked positions, token ids
outside the vocabulary; generation inputs; tools (torch.compile, torch.save / pickle / deepcopy, state-dict round
trips, gradcheck, torch.func); configuration errors at construction; recurrent state across XL segments.
"""

from __future__ import annotations

import copy
import io
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.attention import Attention
from x_transformers.autoregressive_wrapper import AutoregressiveWrapper
from x_transformers.mixers import MIXERS, make_mixer, mixer_class
from x_transformers.xl_autoregressive_wrapper import XLAutoregressiveWrapper

NUM_TOKENS, DIM, HEADS = 20, 16, 2
ALL_MIXERS = sorted(MIXERS)
# the mixers with a decoding state (gtu has none: it refuses a cache)
DECODING_MIXERS = [name for name in ALL_MIXERS if mixer_class(name).can_cache_kv]
HALF = (torch.float16, torch.bfloat16)

# small mixer settings, so that fp64 gradchecks stay quick
SMALL = dict(mamba2=dict(d_state=4), rwkv6=dict(mix_low_rank_dim=4, decay_low_rank_dim=4), based=dict(feature_dim=4))

# softmax attention paths: the SDPA path and every feature that forms the logits
ATTENTION_PATHS = dict(
    sdpa={},
    flash=dict(flash=True),
    math_talking_heads=dict(pre_talking_heads=True, post_talking_heads=True),
    sparse_topk=dict(sparse_topk=2),
    sigmoid=dict(sigmoid=True),
    hard=dict(hard=True),
    l2_distance=dict(l2_distance=True),
    softclamp=dict(softclamp_logits=True),
    selective=dict(selective=True),
    cope=dict(use_cope=True, cope_max_pos=4),
    forgetting=dict(data_dependent_alibi=True),
    forgetting_per_row=dict(data_dependent_alibi=True, data_dependent_alibi_per_row=True),
    gqa_mem_kv=dict(kv_heads=1, num_mem_kv=2),
    laser_zero_kv=dict(laser=True, add_zero_kv=True),
    latent_kv=dict(use_latent_kv=True, dim_latent_kv=8),
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: one intra-op thread is several times faster than two spinning against each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mixer(name, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    return make_mixer(name, dim=DIM, heads=HEADS, **{**SMALL.get(name, {}), **kwargs}).to(dtype).eval()


def attention(name, dtype=torch.float32):
    torch.manual_seed(0)
    return Attention(DIM, dim_head=8, heads=HEADS, causal=True, **ATTENTION_PATHS[name]).to(dtype).eval()


def lm(num_tokens=NUM_TOKENS, max_seq_len=32, wrapper=None, **layers):
    torch.manual_seed(0)
    layers = {"dim": DIM, "depth": 2, "heads": HEADS, **layers}
    return TransformerWrapper(
        num_tokens=num_tokens, max_seq_len=max_seq_len, attn_layers=Decoder(**layers), **(wrapper or {})
    ).eval()


def tokens(b=2, n=9, seed=0):
    return torch.randint(0, NUM_TOKENS, (b, n), generator=torch.Generator().manual_seed(seed))


def left_padded_mask(b, n, pads):
    return torch.arange(n) >= torch.tensor(pads)[:, None]


# shapes: empty batches, single tokens, lengths across block boundaries


@pytest.mark.parametrize("name", DECODING_MIXERS)
def test_mixer_shapes(name):
    m = mixer(name)
    # an empty batch, short (token-by-token kernel) and long (chunked), with and without the decode state
    for n in (5, 70):
        out, inter = m(torch.randn(0, n, DIM), return_intermediates=True)
        assert out.shape == (0, n, DIM)
        assert all(t.shape[0] == 0 for t in inter.recurrent_state if torch.is_tensor(t))
        out, _ = m(torch.randn(0, 1, DIM), cache=inter, return_intermediates=True)
        assert out.shape == (0, 1, DIM)
    # length 1, and lengths that are no multiple of the 16-token decode threshold or the 64-token chunk
    for n in (1, 17, 65, 79):
        x = torch.randn(2, n, DIM)
        out = m(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
    # an empty sequence
    assert m(torch.randn(2, 0, DIM)).shape == (2, 0, DIM)


@pytest.mark.parametrize("name", DECODING_MIXERS)
def test_mixer_chunked_equals_stepped_across_block_boundaries(name):
    # 79 tokens: a 64-token chunk plus 15, against one token at a time from the cache
    m = mixer(name)
    x = torch.randn(1, 79, DIM)
    full = m(x)
    out, cache = m(x[:, :1], return_intermediates=True)
    outs = [out]
    for t in range(1, 79):
        out, cache = m(x[:, t : t + 1], cache=cache, return_intermediates=True)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ATTENTION_PATHS)
def test_attention_shapes(name):
    attn = attention(name)
    assert attn(torch.randn(0, 5, DIM)).shape == (0, 5, DIM)
    for n in (1, 17):
        out = attn(torch.randn(2, n, DIM))
        assert out.shape == (2, n, DIM) and torch.isfinite(out).all()


def test_model_empty_batch_and_sequence():
    for layers in (dict(), dict(linear_attn="gla", hybrid_pattern="LN", rotary_pos_emb=True)):
        model = lm(**layers)
        assert model(tokens(0, 5)).shape == (0, 5, NUM_TOKENS)
        assert model(tokens(2, 0)).shape == (2, 0, NUM_TOKENS)


# dtypes: computed in the input's dtype (fp32 accumulation for half precision)


@pytest.mark.parametrize("name", DECODING_MIXERS)
def test_mixer_dtypes(name):
    x = torch.randn(2, 21, DIM)
    ref = mixer(name)(x)
    for dtype in (*HALF, torch.float64):
        m = mixer(name, dtype)
        out, inter = m(x.to(dtype), return_intermediates=True)
        assert out.dtype == dtype and torch.isfinite(out).all()
        # the kernel state in fp32 at least: fp64 for an fp64 model (convolution states hold inputs, in their dtype)
        assert inter.recurrent_state[0].dtype == torch.promote_types(dtype, torch.float32)
        tol = 1e-5 if dtype == torch.float64 else 0.1
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ATTENTION_PATHS)
def test_attention_dtypes(name):
    x = torch.randn(2, 9, DIM)
    ref = attention(name)(x)
    for dtype in (*HALF, torch.float64):
        out = attention(name, dtype)(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        if dtype == torch.float64:
            torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)


def test_laser_values_near_the_soft_clamp_in_fp16():
    # e^15 overflows fp16: the values are shifted by their maximum before the exp
    torch.manual_seed(0)
    attn = Attention(DIM, dim_head=8, heads=HEADS, kv_heads=1, causal=True, laser=True).eval()
    with torch.no_grad():
        attn.to_v.weight.mul_(100.0)
    x = torch.randn(2, 9, DIM)
    ref = attn(x)
    out = copy.deepcopy(attn).half()(x.half())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_half_precision_rwkv6_and_dynamic_position_bias_models():
    for layers in (dict(linear_attn="rwkv6"), dict(dynamic_pos_bias=True), dict(ff_num_experts=2)):
        for dtype in (*HALF, torch.float64):
            out = lm(**layers).to(dtype)(tokens())
            assert out.dtype == dtype and torch.isfinite(out).all()


# masks: fully masked rows, and inf / NaN at masked positions never reach unmasked outputs


def fill_masked(x, mask, value):
    return x.masked_fill(~mask[..., None], value)


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_mixer_masked_positions_do_not_leak(name):
    m = mixer(name)
    x = torch.randn(3, 21, DIM)
    mask = left_padded_mask(3, 21, [4, 0, 21])  # the last row is fully masked
    mask[1, 10:12] = False
    ref = m(x, mask=mask)
    assert torch.isfinite(ref).all()
    for value in (float("inf"), float("-inf"), float("nan")):
        out = m(fill_masked(x, mask, value), mask=mask)
        torch.testing.assert_close(out[mask], ref[mask])


@pytest.mark.parametrize("name", ATTENTION_PATHS)
def test_attention_masked_positions_do_not_leak(name):
    attn = attention(name)
    x = torch.randn(3, 9, DIM)
    mask = left_padded_mask(3, 9, [2, 0, 9])
    mask[1, 4] = False
    ref = attn(x, mask=mask)
    assert torch.isfinite(ref).all()
    for value in (float("inf"), float("nan")):
        out = attn(fill_masked(x, mask, value), mask=mask)
        torch.testing.assert_close(out[mask], ref[mask])


def test_stack_masked_positions_do_not_leak():
    # through shifts in feedforward layers, capacity-limited experts and an encoder's mixers and forgetting gates
    configs = [
        (Decoder, dict(shift_tokens=1)),
        (Decoder, dict(ff_num_experts=2, ff_capacity_factor=1.0)),
        (Decoder, dict(attn_data_dependent_alibi=True, attn_selective=True)),
        (Encoder, dict(linear_attn="based")),
        (Encoder, dict(attn_data_dependent_alibi=True, num_residual_streams=2)),
    ]
    x = torch.randn(2, 10, DIM)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 3:5] = False
    mask[1, 7:] = False
    for layers_cls, kwargs in configs:
        torch.manual_seed(0)
        layers = layers_cls(dim=DIM, depth=2, heads=HEADS, **kwargs).eval()
        ref = layers(x, mask=mask)
        out = layers(fill_masked(x, mask, float("nan")), mask=mask)
        torch.testing.assert_close(out[mask], ref[mask], msg=lambda m: f"{kwargs}: {m}")


# ids and lengths outside what the model holds


def test_token_ids_outside_the_vocabulary():
    model = lm()
    for bad in (NUM_TOKENS, -1):
        x = tokens()
        x[0, 3] = bad
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, 20\)"):
            model(x)


def test_sequence_longer_than_absolute_positions():
    with pytest.raises(ValueError, match="max_seq_len"):
        lm(max_seq_len=8)(tokens(1, 9))
    # relative positions and mixers have no such limit
    assert lm(max_seq_len=8, rotary_pos_emb=True)(tokens(1, 9)).shape == (1, 9, NUM_TOKENS)


# generation inputs


def test_generation_input_errors():
    wrapper = AutoregressiveWrapper(lm())
    prompts = tokens(2, 3)
    with pytest.raises(ValueError, match="at least one token"):
        wrapper.generate(prompts[:, :0], 4)
    with pytest.raises(ValueError, match="at least one token"):
        wrapper.generate([prompts[0, :0], prompts[1]], 4)
    with pytest.raises(ValueError, match="prompt_lens"):
        wrapper.generate(prompts, 4, prompt_lens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="seq_len"):
        wrapper.generate(prompts, -1)
    with pytest.raises(TypeError, match="seq_len"):
        wrapper.generate(prompts, 2.5)
    with pytest.raises(ValueError, match="temperature"):
        wrapper.generate(prompts, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="at least one token"):
        wrapper.beam_search(prompts[:, :0], 2)
    with pytest.raises(ValueError, match="at least one token"):
        XLAutoregressiveWrapper(wrapper.net).generate(prompts[:, :0], 2)
    assert wrapper.generate(prompts, 0).shape == (2, 0)
    assert wrapper.beam_search(prompts, 0).shape == (2, 0)


@pytest.mark.parametrize(
    "layers",
    [dict(rotary_pos_emb=True), dict(linear_attn="gated_deltanet"), dict(linear_attn="mamba2", hybrid_pattern="NL"),
     dict(shift_tokens=(1, 0, 2, 0), rotary_pos_emb=True)],
)
def test_mixed_length_prompts_decode_the_same_cached_and_uncached(layers):
    wrapper = AutoregressiveWrapper(lm(wrapper=dict(use_abs_pos_emb=False), **layers))
    prompts = [tokens(1, 2, seed=1)[0], tokens(1, 6, seed=2)[0], tokens(1, 4, seed=3)[0]]
    cached = wrapper.generate(prompts, 6, temperature=0.0, cache_kv=True)
    uncached = wrapper.generate(prompts, 6, temperature=0.0, cache_kv=False)
    assert torch.equal(cached, uncached)
    # each prompt alone gives its row
    for row, prompt in enumerate(prompts):
        assert torch.equal(wrapper.generate(prompt[None], 6, temperature=0.0)[0], cached[row])


def test_per_layer_tuples_reach_every_layer_and_must_match_the_depth():
    layers = Decoder(dim=DIM, depth=2, heads=HEADS, shift_tokens=(1, 0, 2, 3))
    shifts = [getattr(block, "shifts", None) for _, block, _ in layers.layers]
    assert shifts == [(0, 1), None, (0, 1, 2), (0, 1, 2, 3)]
    assert Decoder(dim=DIM, depth=2, heads=HEADS, layer_dropout=(0.1, 0.0, 0.2, 0.3)).layer_dropouts == (0.1, 0.0, 0.2, 0.3)
    for name, value in (("shift_tokens", (1, 0, 2)), ("shift_tokens", (1, 0, 2, 0, 1)), ("layer_dropout", (0.1,))):
        with pytest.raises(ValueError, match=name):
            Decoder(dim=DIM, depth=2, heads=HEADS, **{name: value})


# token shifts carry their tail through the decode cache


@pytest.mark.parametrize("layers", [dict(shift_tokens=1), dict(shift_tokens=(2, 1, 0, 3), linear_attn="gla", hybrid_pattern="LN")])
def test_shift_tokens_decode_from_the_cache(layers):
    model = lm(**layers)
    assert model.can_cache_kv
    x = tokens(2, 10)
    seq_start_pos = torch.tensor([3, 0])
    with torch.no_grad():
        full = model(x, seq_start_pos=seq_start_pos)
        logits, cache = model(x[:, :4], seq_start_pos=seq_start_pos, return_intermediates=True)
        steps = [logits]
        for t in range(4, 10):
            logits, cache = model(x[:, : t + 1], seq_start_pos=seq_start_pos, cache=cache, return_intermediates=True)
            steps.append(logits[:, -1:])
    keep = torch.arange(10) >= seq_start_pos[:, None]
    torch.testing.assert_close(torch.cat(steps, dim=1)[keep], full[keep], rtol=1e-5, atol=1e-5)

    wrapper = AutoregressiveWrapper(model)
    prompts = tokens(2, 3)
    assert torch.equal(wrapper.generate(prompts, 6, temperature=0.0), wrapper.generate(prompts, 6, temperature=0.0, cache_kv=False))
    assert torch.equal(wrapper.beam_search(prompts, 4, beams=3), wrapper.beam_search(prompts, 4, beams=3, cache_kv=False))


# tools


def round_trips(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    yield torch.load(buffer, weights_only=False)
    yield pickle.loads(pickle.dumps(model))
    yield copy.deepcopy(model)


@pytest.mark.parametrize(
    "layers, wrapper",
    [
        (dict(attn_flash=True), dict(tie_embedding=True)),
        (dict(linear_attn="linear", linear_attn_feature_map="softmax"), {}),
        (dict(linear_attn="retnet", hybrid_pattern="LN", ff_num_experts=2, ff_relu_squared=True), {}),
    ],
)
def test_save_pickle_deepcopy_and_state_dict(layers, wrapper):
    model = lm(wrapper=wrapper, **layers)
    x = tokens()
    ref = model(x)
    for copied in round_trips(model):
        torch.testing.assert_close(copied(x), ref)
    fresh = lm(wrapper=wrapper, **layers)
    with torch.no_grad():
        for param in fresh.parameters():
            param.add_(1.0)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), ref)


def test_compile_moe_and_hybrid():
    torch._dynamo.reset()
    x = tokens(2, 19)
    for layers in (dict(ff_num_experts=4, ff_top_k=2), dict(linear_attn="gated_deltanet", hybrid_pattern="LN")):
        model = lm(depth=1 if "ff_num_experts" in layers else 2, **layers).train()
        ref = model(x)
        compiled = torch.compile(model, backend="aot_eager", dynamic=False)
        out = compiled(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out.square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.skipif(
    os.environ.get("XT_SLOW_TESTS") != "1", reason="inductor compiles of every mixer take minutes: XT_SLOW_TESTS=1"
)
@pytest.mark.parametrize("name", ALL_MIXERS)
def test_compile_every_mixer_with_inductor(name):
    torch._dynamo.reset()
    model = lm(depth=1, linear_attn=name).train()
    x = tokens(2, 19)
    ref = model(x)
    out = torch.compile(model, dynamic=False)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_mixer_gradcheck_fp64(name):
    m = mixer(name, torch.float64).train()
    for n in (3, 19):
        x = torch.randn(1, n, DIM, dtype=torch.float64, requires_grad=True)
        mask = torch.ones(1, n, dtype=torch.bool)
        mask[:, 0] = False
        assert torch.autograd.gradcheck(lambda t: m(t, mask=mask), (x,), fast_mode=True, atol=1e-6, rtol=1e-4)


def test_kernel_cpu_paths_gradcheck_fp64():
    from x_transformers.ops.delta_rule.chunk_torch import chunk_delta_rule_torch
    from x_transformers.ops.delta_rule.naive import naive_delta_rule
    from x_transformers.ops.gla.chunk_torch import chunk_gla_torch
    from x_transformers.ops.gla.naive import naive_recurrent_gla
    from x_transformers.ops.hgrn.naive import naive_hgrn
    from x_transformers.ops.hgrn.scan_torch import chunk_hgrn_torch
    from x_transformers.ops.simple_gla.chunk_torch import chunk_simple_gla_torch
    from x_transformers.ops.simple_gla.naive import naive_simple_gla

    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()

    B, T, H, K, V = 1, 19, 2, 4, 3
    q, k, v, h0 = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V), rand(B, H, K, V)
    g_scalar, g_channel = -rand(B, T, H).abs().detach().requires_grad_(), -rand(B, T, H, K).abs().detach().requires_grad_()
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64).requires_grad_()
    k_unit = F.normalize(k.detach(), dim=-1).requires_grad_()
    cases = [
        (lambda q, k, v, g, h: chunk_simple_gla_torch(q, k, v, g, 0.5, h, True, chunk_size=8), (q, k, v, g_scalar, h0)),
        (lambda q, k, v, g, h: naive_simple_gla(q, k, v, g, 0.5, h, True), (q, k, v, g_scalar, h0)),
        (lambda q, k, v, g, h: chunk_gla_torch(q, k, v, g, 0.5, h, True), (q, k, v, g_channel, h0)),
        (lambda q, k, v, g, h: naive_recurrent_gla(q, k, v, g, 0.5, h, True), (q, k, v, g_channel, h0)),
        (lambda q, k, v, b, g, h: chunk_delta_rule_torch(q, k, v, b, g, 0.5, h, True, chunk_size=8), (q, k_unit, v, beta, g_scalar, h0)),
        (lambda q, k, v, b, g, h: naive_delta_rule(q, k, v, b, g, 0.5, h, True), (q, k_unit, v, beta, g_scalar, h0)),
        (lambda x, g, h: chunk_hgrn_torch(x, g, h, True), (rand(B, T, 5), -rand(B, T, 5).abs().detach().requires_grad_(), rand(B, 5))),
        (lambda x, g, h: naive_hgrn(x, g, h, True), (rand(B, T, 5), -rand(B, T, 5).abs().detach().requires_grad_(), rand(B, 5))),
    ]
    for fn, inputs in cases:
        out = fn(*inputs)
        assert all(t.dtype == torch.float64 for t in out)
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True, atol=1e-6, rtol=1e-4)


# SDPA has no vmap batching rule on the CPU (a slower fallback runs): expected here
@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("layers", [dict(rotary_pos_emb=True, attn_kv_heads=1), dict(linear_attn="gated_deltanet"),
                                    dict(linear_attn="gla", hybrid_pattern="LN")])
def test_per_sample_gradients_with_torch_func(layers):
    from torch.func import functional_call, grad, vmap

    model = lm(**layers)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(params, x, y):
        logits = functional_call(model, (params, buffers), (x[None],))
        return F.cross_entropy(logits[0], y)

    x, y = tokens(3, 19), tokens(3, 19, seed=1)
    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        one = grad(loss)(params, x[i], y[i])
        for name in params:
            torch.testing.assert_close(batched[name][i], one[name], rtol=1e-4, atol=1e-6)


# configuration errors at construction, naming the flag


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(linear_attn="gla", softmax_attn_layers=(2,)), "softmax_attn_layers"),
        (dict(linear_attn="gla", softmax_attn_layers=(-1,)), "softmax_attn_layers"),
        (dict(linear_attn="gla", softmax_attn_layers=(0, 0)), "softmax_attn_layers"),
        (dict(linear_attn="gla", hybrid_pattern="LLN"), "hybrid_pattern"),
        (dict(linear_attn="nope"), "unknown linear_attn"),
        (dict(linear_attn="gla", alibi_pos_bias=True), "alibi_pos_bias"),
        (dict(linear_attn="gla", attn_qk_norm=True), "attn_qk_norm"),
        (dict(linear_attn="gla", residual_attn=True), "residual_attn"),
        (dict(linear_attn="gla", add_value_residual=True), "add_value_residual"),
        (dict(linear_attn="gla", cross_attn_kv_heads=1), "cross_attn_kv_heads"),
        (dict(linear_attn="gla", cross_attend=True, only_cross=True), "linear_attn"),
        (dict(cross_attend=True, attn_data_dependent_alibi=True), "cross_attn_data_dependent_alibi=False"),
        (dict(cross_attend=True, attn_max_attend_past=4), "cross_attn_max_attend_past=None"),
        (dict(rotary_xpos=True, attn_num_mem_kv=1), "attn_num_mem_kv"),
        (dict(rotary_xpos=True, attn_l2_distance=True), "attn_l2_distance"),
        (dict(custom_layers=("a", "f"), layers_execute_order=(0, 2), depth=None), "layers_execute_order"),
        (dict(shift_tokens=-1), "shift_tokens"),
    ],
)
def test_conflicting_flags_raise(kwargs, match):
    kwargs = {"dim": DIM, "depth": 2, "heads": HEADS, **kwargs}
    with pytest.raises(ValueError, match=match):
        Decoder(**kwargs)


def test_mixer_stacks_keep_shared_attention_flags():
    # head size, SDPA backend and rotary (which also turns absolute positions off) ride in shared configs
    model = lm(linear_attn="gla", attn_dim_head=8, attn_flash=True, rotary_pos_emb=True)
    assert not model.has_abs_pos_emb
    assert model(tokens()).shape == (2, 9, NUM_TOKENS)


def test_zero_init_branch_output_reaches_mixers_and_experts():
    for name in ("gla", "mamba2", "rwkv6"):
        layers = Decoder(dim=DIM, depth=1, heads=HEADS, linear_attn=name, zero_init_branch_output=True,
                         ff_num_experts=2, ff_num_shared_experts=1)
        x = torch.randn(1, 5, DIM)
        torch.testing.assert_close(layers(x), layers.final_norm(x))
    with pytest.raises(ValueError, match="expansion_factor"):
        Decoder(dim=DIM, depth=1, heads=HEADS, linear_attn="mingru", zero_init_branch_output=True)


def test_capacity_limited_experts_refuse_the_cache():
    assert lm(ff_num_experts=2).can_cache_kv
    assert not lm(ff_num_experts=2, ff_capacity_factor=1.0).can_cache_kv


# recurrent memory across Transformer-XL segments


@pytest.mark.parametrize(
    "layers, wrapper",
    [
        (dict(linear_attn="gated_deltanet"), dict(use_abs_pos_emb=False)),
        (dict(linear_attn="rwkv6", shift_tokens=0), dict(use_abs_pos_emb=False)),
        (dict(linear_attn="mamba2", hybrid_pattern="LN", rotary_pos_emb=True), dict(max_mem_len=64)),
    ],
)
def test_xl_segments_carry_mixer_states(layers, wrapper):
    net = lm(max_seq_len=8, wrapper=wrapper, **layers)
    xl = XLAutoregressiveWrapper(net)
    x = tokens(2, 27)
    with torch.no_grad():
        full = F.cross_entropy(net(x[:, :-1]).transpose(1, 2), x[:, 1:])
        segmented = xl(x)
    torch.testing.assert_close(segmented, full, rtol=1e-5, atol=1e-5)

    # decoding across segment boundaries: with and without the cache, and as one long sequence
    prompts = tokens(2, 13)
    cached = xl.generate(prompts, 10, temperature=0.0, cache_kv=True)
    assert torch.equal(cached, xl.generate(prompts, 10, temperature=0.0, cache_kv=False))
    long = AutoregressiveWrapper(net).generate(prompts, 10, temperature=0.0, cache_kv=False, restrict_to_max_seq_len=False)
    assert torch.equal(cached, long)


def test_recurrent_states_errors():
    layers = Decoder(dim=DIM, depth=2, heads=HEADS, linear_attn="gla")
    x = torch.randn(1, 4, DIM)
    _, inter = layers(x, return_hiddens=True)
    states = [t.recurrent_state for t in inter.attn_intermediates if t.layer_type == "l"]
    with pytest.raises(ValueError, match="one state per mixer"):
        layers(x, recurrent_states=states[:1])
    with pytest.raises(ValueError, match="either `cache` or `recurrent_states`"):
        layers(x[:, -1:], cache=inter, recurrent_states=states)
