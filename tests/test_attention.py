"""Attention: parity with upstream x-transformers 2.0.1, cached-vs-parallel decoding, fast path vs fallback.

Fixtures come from `scripts/make_attention_fixtures.py` (run with the upstream 2.0.1 environment).
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from x_transformers.attention import Attention
from x_transformers.positional import RotaryEmbedding

FIXTURES = Path(__file__).parent / 'fixtures' / 'attention'
FIXTURE_NAMES = sorted(path.stem for path in FIXTURES.glob('*.pt'))

DIM, HEADS, DIM_HEAD = 32, 4, 8


def perturb_(module: nn.Module, std=0.1):
    # move gates, talking heads and norm gains off their identity init, so every feature changes the output
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * std)
    return module


# parity with upstream


def test_fixtures_present():
    assert len(FIXTURE_NAMES) >= 9, 'run scripts/make_attention_fixtures.py with the upstream environment'


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_upstream_parity(name):
    fixture = torch.load(FIXTURES / f'{name}.pt')
    dims, kwargs = fixture['dims'], dict(fixture['kwargs'])

    if 'hybrid_gru' in fixture['extras']:
        kwargs['hybrid_module'] = nn.GRU(dims['dim'], dims['heads'] * dims['dim_head'], batch_first=True)

    attn = Attention(dims['dim'], heads=dims['heads'], dim_head=dims['dim_head'], **kwargs).eval()
    attn.load_state_dict(fixture['state_dict'], strict=True)

    with torch.no_grad():
        out, intermediates = attn(fixture['x'], return_intermediates=True, **fixture['forward_kwargs'])

    torch.testing.assert_close(out, fixture['out'], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(intermediates.values, fixture['values'], rtol=1e-4, atol=1e-5)


# cached decoding equals the parallel causal forward


class CausalConv(nn.Module):
    """A hybrid module that returns no recurrent state: cached decoding must replay its history."""

    def __init__(self, dim, dim_out, kernel=3):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(dim, dim_out, kernel)

    def forward(self, x):
        x = nn.functional.pad(x.transpose(1, 2), (self.kernel - 1, 0))
        return self.conv(x).transpose(1, 2)


CACHE_CONFIGS = {
    'plain': dict(),
    'gqa': dict(kv_heads=2),
    'one_kv_head': dict(one_kv_head=True),
    'rotary': dict(),
    'rotary_xpos': dict(kv_heads=2),
    'memory_kv': dict(num_mem_kv=2),
    'qk_norm': dict(qk_norm=True, qk_norm_dim_scale=True, num_mem_kv=1),
    'mla': dict(
        use_latent_q=True, dim_latent_q=16, use_latent_kv=True, dim_latent_kv=16, latent_rope_subheads=2
    ),
    'mla_no_rope': dict(use_latent_kv=True, dim_latent_kv=16),
    'mla_all_keys_decoupled': dict(use_latent_kv=True, dim_latent_kv=16, latent_rope_subheads=HEADS),
    'hybrid_gru': dict(hybrid_fold_axial_dim=1, hybrid_module=nn.GRU(DIM, HEADS * DIM_HEAD, batch_first=True)),
    'hybrid_gru_folded': dict(
        hybrid_fold_axial_dim=3, hybrid_module=nn.GRU(DIM, HEADS * DIM_HEAD, batch_first=True)
    ),
    'hybrid_lstm_folded': dict(
        hybrid_fold_axial_dim=2, hybrid_module=nn.LSTM(DIM, HEADS * DIM_HEAD, batch_first=True)
    ),
    'hybrid_stateless_folded': dict(hybrid_fold_axial_dim=2, hybrid_module=CausalConv(DIM, HEADS * DIM_HEAD)),
    'forgetting': dict(data_dependent_alibi=True, num_mem_kv=1),
    'forgetting_per_row': dict(data_dependent_alibi=True, data_dependent_alibi_per_row=True),
    'cope': dict(use_cope=True),
    'max_attend_past': dict(max_attend_past=2),
    'laser_gates_talking': dict(laser=True, gate_values=True, gate_value_heads=True, pre_talking_heads=True),
    'flash_gqa': dict(flash=True, kv_heads=2),
}

# config name -> whether its rotary embedding uses xpos
ROTARY_CONFIGS = {
    'rotary': False,
    'rotary_xpos': True,
    'mla': False,
    'mla_all_keys_decoupled': False,
    'flash_gqa': False,
}


def decode_in_chunks(attn, x, chunks, rotary=None):
    """Feed `x` through `attn` chunk by chunk with `cache=`; rotary covers every position so far, as the layers do."""
    outs, cache, start = [], None, 0
    for size in chunks:
        end = start + size
        rotary_pos_emb = rotary(torch.arange(end)) if rotary else None
        out, cache = attn(x[:, start:end], rotary_pos_emb=rotary_pos_emb, cache=cache, return_intermediates=True)
        outs.append(out)
        start = end
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize('name', sorted(CACHE_CONFIGS))
def test_cached_decoding_matches_parallel(name):
    torch.manual_seed(0)
    attn = perturb_(Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=True, **CACHE_CONFIGS[name])).eval()

    rotary = None
    if name in ROTARY_CONFIGS:
        rotary = RotaryEmbedding(DIM_HEAD, use_xpos=ROTARY_CONFIGS[name], scale_base=16)

    seq_len = 8
    x = torch.randn(2, seq_len, DIM)

    with torch.no_grad():
        parallel = attn(x, rotary_pos_emb=rotary(torch.arange(seq_len)) if rotary else None)

        # one token at a time, then a prefill followed by uneven chunks (speculative decoding feeds several)
        for chunks in ((1,) * seq_len, (3, 1, 2, 1, 1)):
            cached = decode_in_chunks(attn, x, chunks, rotary)
            torch.testing.assert_close(cached, parallel, rtol=0, atol=1e-5)


@pytest.mark.parametrize('latent', [False, True])
def test_cached_decoding_with_value_residual(latent):
    # the second layer lerps toward the first layer's values with a learned per-token mix (resformer)
    torch.manual_seed(0)
    kwargs = dict(use_latent_kv=True, dim_latent_kv=16) if latent else dict()
    first, second = (
        Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=True, learned_value_residual_mix=learned, **kwargs)
        for learned in (False, True)
    )
    first, second = perturb_(first).eval(), perturb_(second).eval()

    def two_layers(x, caches=(None, None)):
        out1, inter1 = first(x, cache=caches[0], return_intermediates=True)
        out2, inter2 = second(x + out1, cache=caches[1], value_residual=inter1.values, return_intermediates=True)
        return out2, (inter1, inter2)

    x = torch.randn(2, 6, DIM)
    with torch.no_grad():
        parallel, _ = two_layers(x)
        outs, caches = [], (None, None)
        for t in range(6):
            out, caches = two_layers(x[:, t : t + 1], caches)
            outs.append(out)

    torch.testing.assert_close(torch.cat(outs, dim=1), parallel, rtol=0, atol=1e-5)


def test_neutreno_adds_value_difference_to_output():
    # neutreno: out = attention + alpha * (first layer values - own values), before the output projection
    torch.manual_seed(0)
    kwargs = dict(heads=HEADS, dim_head=DIM_HEAD, kv_heads=2, causal=True)
    neutreno = perturb_(Attention(DIM, neutreno_value_residual=True, neutreno_alpha=0.3, **kwargs))
    plain = Attention(DIM, **kwargs)
    plain.load_state_dict(neutreno.state_dict())

    x, value_residual = torch.randn(2, 5, DIM), torch.randn(2, 2, 5, DIM_HEAD)
    out, inter = neutreno(x, value_residual=value_residual, return_intermediates=True)

    diff = (value_residual - inter.values).repeat(1, HEADS // 2, 1, 1)
    diff = diff.transpose(1, 2).reshape(2, 5, HEADS * DIM_HEAD)
    torch.testing.assert_close(out, plain(x) + neutreno.to_out(0.3 * diff))


def test_cached_decoding_with_memories():
    # transformer-xl memories are prepended every call but never enter the cache
    torch.manual_seed(0)
    attn = perturb_(Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=True, num_mem_kv=1)).eval()
    x, mem = torch.randn(2, 5, DIM), torch.randn(2, 3, DIM)

    with torch.no_grad():
        parallel = attn(x, mem=mem)
        outs, cache = [], None
        for t in range(5):
            out, cache = attn(x[:, t : t + 1], mem=mem, cache=cache, return_intermediates=True)
            outs.append(out)
        assert cache.cached_kv[0].shape[-2] == 5

    torch.testing.assert_close(torch.cat(outs, dim=1), parallel, rtol=0, atol=1e-5)


def test_cross_attention_cache():
    # cross attention caches the context's keys / values; later calls pass an empty context
    torch.manual_seed(0)
    attn = perturb_(Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, dim_context=12)).eval()
    x, context = torch.randn(2, 4, DIM), torch.randn(2, 6, 12)

    with torch.no_grad():
        full = attn(x, context=context)
        _, cache = attn(x[:, :3], context=context, return_intermediates=True)
        last = attn(x[:, 3:], context=context[:, :0], cache=cache)

    torch.testing.assert_close(last, full[:, 3:], rtol=0, atol=1e-5)


@pytest.mark.parametrize('fold', [1, 3])
def test_cross_attention_hybrid_cache(fold):
    # a decoder's cross attention is not causal, but its hybrid module reads the decoded sequence left to right
    torch.manual_seed(0)
    gru = nn.GRU(DIM, HEADS * DIM_HEAD, batch_first=True)
    attn = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, hybrid_fold_axial_dim=fold, hybrid_module=gru)
    attn = perturb_(attn).eval()
    x, context = torch.randn(2, 7, DIM), torch.randn(2, 5, DIM)

    with torch.no_grad():
        full = attn(x, context=context)
        out, cache = attn(x[:, :3], context=context, return_intermediates=True)
        outs = [out]
        for t in range(3, 7):
            out, cache = attn(x[:, t : t + 1], context=context[:, :0], cache=cache, return_intermediates=True)
            outs.append(out)

    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-5)


def test_hybrid_hidden_is_the_module_state():
    torch.manual_seed(0)
    gru = nn.GRU(DIM, HEADS * DIM_HEAD, batch_first=True)
    attn = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=True, hybrid_fold_axial_dim=1, hybrid_module=gru)
    x = torch.randn(2, 5, DIM)

    _, intermediates = attn(x, return_intermediates=True)
    state, pending = intermediates.hybrid_hidden

    _, expected_state = attn.hybrid_module.fn(x)
    torch.testing.assert_close(state, expected_state)
    assert pending.shape[1] == 0


# fast paths against their fallbacks


@pytest.mark.parametrize('kwargs', [dict(), dict(kv_heads=2), dict(num_mem_kv=2, qk_norm=True)])
@pytest.mark.parametrize('causal', [False, True])
def test_flash_matches_math_path(kwargs, causal):
    torch.manual_seed(0)
    math_attn = perturb_(Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=causal, **kwargs)).eval()
    flash_attn = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=causal, flash=True, **kwargs).eval()
    flash_attn.load_state_dict(math_attn.state_dict())

    x = torch.randn(2, 7, DIM)
    mask = torch.tensor([[True] * 7, [True, False, True, True, False, True, True]])

    with torch.no_grad():
        torch.testing.assert_close(flash_attn(x, mask=mask), math_attn(x, mask=mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kwargs', [dict(onnxable=True), dict(custom_attn_fn=lambda sim: sim.softmax(dim=-1))])
def test_attend_options_pass_through(kwargs):
    # the onnx-friendly causal mask and a custom (here: plain softmax) attention function give the same output
    torch.manual_seed(0)
    base = perturb_(Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=True)).eval()
    other = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=True, **kwargs).eval()
    other.load_state_dict(base.state_dict())

    x = torch.randn(2, 6, DIM)
    torch.testing.assert_close(other(x), base(x))

    # and the custom function really is the one called
    if 'custom_attn_fn' in kwargs:
        def uniform_attn(sim):
            return torch.ones_like(sim) / sim.shape[-1]

        uniform = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, custom_attn_fn=uniform_attn)
        uniform.load_state_dict(base.state_dict())
        v = uniform.to_v(x).reshape(2, 6, HEADS, DIM_HEAD).mean(dim=1, keepdim=True).expand(2, 6, HEADS, DIM_HEAD)
        torch.testing.assert_close(uniform(x), uniform.to_out(v.reshape(2, 6, HEADS * DIM_HEAD)))


def test_fused_projection_matches_separate_and_trains():
    torch.manual_seed(0)
    attn = perturb_(Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, kv_heads=2, causal=True))
    x = torch.randn(2, 5, DIM)

    def unfused(x):
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        return q, k, v

    fused = attn.fused_linear(x, ('to_q', 'to_k', 'to_v'))
    for a, b in zip(fused, unfused(x)):
        torch.testing.assert_close(a, b)

    # inference reuses the concatenated weight, training concatenates each call so gradients reach every Linear
    with torch.no_grad():
        before = attn(x)
        attn.to_v.weight.mul_(2.0)
        after = attn(x)
    assert not torch.allclose(before, after), 'cached fused weight must follow in-place weight updates'

    attn(x).sum().backward()
    assert all(lin.weight.grad is not None for lin in (attn.to_q, attn.to_k, attn.to_v))

    # memory-saving switch: separate matmuls, no cached copy
    attn.cache_fused_weights = False
    with torch.no_grad():
        torch.testing.assert_close(attn(x), after)
    assert len(attn._fused_weights) == 0


# masks and bad input


@pytest.mark.parametrize('flash', [False, True])
def test_fully_masked_rows_are_zero_not_nan(flash):
    torch.manual_seed(0)
    attn = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, flash=flash)
    x = torch.randn(2, 4, DIM)
    context_mask = torch.tensor([[True, True, False, False], [False, False, False, False]])

    out = attn(x, context_mask=context_mask)
    assert not out.isnan().any()
    assert (out[1] == 0).all()


def test_attn_mask_with_memory_kv():
    # an (i, j) attention mask over the sequence leaves the learned memory slots attendable
    torch.manual_seed(0)
    attn = perturb_(Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, num_mem_kv=2)).eval()
    x = torch.randn(2, 5, DIM)
    allow_all = torch.ones(5, 5, dtype=torch.bool)
    causal = allow_all.tril()

    with torch.no_grad():
        torch.testing.assert_close(attn(x, attn_mask=allow_all), attn(x))
        causal_attn = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, num_mem_kv=2, causal=True).eval()
        causal_attn.load_state_dict(attn.state_dict())
        torch.testing.assert_close(attn(x, attn_mask=causal), causal_attn(x))


def test_output_masked_positions_are_zero():
    attn = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = attn(torch.randn(2, 3, DIM), mask=mask)
    assert (out[0, 2] == 0).all() and (out[1] != 0).any()


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(one_kv_head=True, kv_heads=2), 'not both'),
        (dict(kv_heads=3), 'divisible'),
        (dict(use_latent_kv=True), 'dim_latent_kv'),
        (dict(use_cope=True), 'causal'),
        (dict(qk_norm=True, qk_norm_groups=4), 'group dimension'),
        (dict(rotate_num_heads=2, kv_heads=2), 'partial rotate'),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, **kwargs)


def test_unknown_kwarg_raises():
    with pytest.raises(TypeError, match='not_a_flag'):
        Attention(DIM, not_a_flag=True)


def test_bad_input_shapes_raise():
    attn = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD)
    with pytest.raises(ValueError, match='batch, seq'):
        attn(torch.randn(5, DIM))
    with pytest.raises(ValueError, match='key mask'):
        attn(torch.randn(2, 3, DIM), context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=f'batch, seq, {DIM}'):
        attn(torch.randn(2, 3, DIM + 1))
    with pytest.raises(TypeError, match='floating point'):
        attn(torch.ones(2, 3, DIM, dtype=torch.long))
    with pytest.raises(ValueError, match='mask must have shape'):
        attn(torch.randn(2, 3, DIM), mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match='bool'):
        attn(torch.randn(2, 3, DIM), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match='context must have shape'):
        attn(torch.randn(2, 3, DIM), context=torch.randn(2, 4, DIM + 1))


def test_qkv_receive_diff_residuals():
    # hyper-connections hand (3, b, n, d); with identical views it equals plain self attention
    torch.manual_seed(0)
    attn = perturb_(Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, qkv_receive_diff_residuals=True))
    plain = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD)
    plain.load_state_dict(attn.state_dict())

    x = torch.randn(2, 4, DIM)
    torch.testing.assert_close(attn(torch.stack((x, x, x))), plain(x))

    # different views do change the output
    assert not torch.allclose(attn(torch.stack((x, x.flip(1), x))), plain(x))


# GPU only: run with `pytest tests/test_attention.py -k cuda`

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')

SYNC_FREE_CONFIGS = {
    'plain_masked': dict(),
    'flash_gqa': dict(flash=True, kv_heads=2),
    'memory_kv_qk_norm': dict(num_mem_kv=2, qk_norm=True),
    'mla': dict(use_latent_kv=True, dim_latent_kv=16, latent_rope_subheads=2),
    'forgetting': dict(data_dependent_alibi=True),
    'gates': dict(gate_values=True, gate_value_heads=True, laser=True),
}


@requires_cuda
@pytest.mark.parametrize('name', sorted(SYNC_FREE_CONFIGS))
def test_cuda_forward_and_decode_have_no_host_sync(name):
    torch.manual_seed(0)
    attn = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=True, **SYNC_FREE_CONFIGS[name]).cuda().eval()
    rotary = RotaryEmbedding(DIM_HEAD).cuda()
    x = torch.randn(2, 8, DIM, device='cuda')
    mask = torch.ones(2, 8, dtype=torch.bool, device='cuda')
    positions = torch.arange(8, device='cuda')

    def run():
        with torch.no_grad():
            attn(x, mask=mask, rotary_pos_emb=rotary(positions))
            _, cache = attn(x[:, :7], rotary_pos_emb=rotary(positions[:7]), return_intermediates=True)
            attn(x[:, 7:], rotary_pos_emb=rotary(positions), cache=cache, return_intermediates=True)

    run()  # warm up allocator and kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode('default')


@requires_cuda
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('kwargs', [dict(), dict(kv_heads=2), dict(num_mem_kv=2)])
def test_cuda_flash_half_precision_matches_fp32_math(dtype, kwargs):
    torch.manual_seed(0)
    math_attn = perturb_(Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=True, **kwargs)).cuda().eval()
    flash_attn = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=True, flash=True, **kwargs).cuda().eval()
    flash_attn.load_state_dict(math_attn.state_dict())

    x = torch.randn(2, 64, DIM, device='cuda')
    with torch.no_grad():
        expected = math_attn(x)
        with torch.autocast('cuda', dtype=dtype):
            out = flash_attn(x)

    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@requires_cuda
def test_cuda_compiled_forward_and_decode_step_fullgraph():
    # the forward and a one-token cached step trace as single graphs (no graph breaks, no host syncs)
    torch.manual_seed(0)
    attn = perturb_(Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=True, kv_heads=2, flash=True))
    attn = attn.cuda().eval()
    x = torch.randn(2, 16, DIM, device='cuda')

    def decode_step(x, cache):
        return attn(x, cache=cache, return_intermediates=True)

    with torch.no_grad():
        expected = attn(x)
        torch.testing.assert_close(torch.compile(attn, fullgraph=True)(x), expected, rtol=1e-4, atol=1e-4)

        _, cache = attn(x[:, :15], return_intermediates=True)
        out, _ = torch.compile(decode_step, fullgraph=True)(x[:, 15:], cache)
        torch.testing.assert_close(out, expected[:, 15:], rtol=1e-4, atol=1e-4)
