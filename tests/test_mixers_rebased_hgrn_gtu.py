"""ReBased feature map on `based`, HGRN2 with scalar decay, learned layer-wise lower bounds of hgrn / hgrn2, and the
gated Toeplitz unit (`gtu`): each against an independent float64 formula, cached decoding against the parallel
forward, padding, and bad input refused with a clear error."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.autoregressive_wrapper import AutoregressiveWrapper
from x_transformers.mixers import make_mixer
from x_transformers.mixers.lower_bounds import LayerLowerBounds

DIM, HEADS = 16, 2
f64 = torch.float64


def build(name, causal=True, dtype=f64, **kwargs):
    torch.manual_seed(0)
    mixer = make_mixer(name, dim=DIM, heads=HEADS, causal=causal, **kwargs).to(dtype).eval()
    # off the init (LayerNorm gamma = 1, beta = 0, ...), so that every parameter shapes the output
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return mixer


def rel_err(a, b, floor=1e-12):
    return ((a - b).norm() / b.norm().clamp(min=floor)).item()


def assert_grads_close(out, ref, inputs):
    """Gradients of a random cotangent, relative to their size (absolute below 1e-3: a gradient near zero is a
    difference of larger terms, exact to their roundoff only)."""
    cot = torch.randn_like(out)
    grads = torch.autograd.grad((out * cot).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * cot).sum(), inputs)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r, floor=1e-3) < 1e-9


def stepped(mixer, x, prompt=5, mask=None, **inputs):
    """The prompt through the parallel path, then one token at a time from the cache."""
    out, cache = mixer(x[:, :prompt], mask=None if mask is None else mask[:, :prompt], return_intermediates=True,
                       **inputs)
    outs = [out]
    for t in range(prompt, x.shape[1]):
        m = None if mask is None else mask[:, : t + 1]
        out, cache = mixer(x[:, t : t + 1], mask=m, cache=cache, return_intermediates=True, **inputs)
        outs.append(out)
    return torch.cat(outs, dim=1)


def left_pad(x, pad):
    padded = torch.cat((torch.randn(x.shape[0], pad, x.shape[2], dtype=x.dtype), x), dim=1)
    mask = torch.ones(padded.shape[:2], dtype=torch.bool)
    mask[:, :pad] = False
    return padded, mask


def heads_out(mixer, o, x, gate_logits=None):
    """HeadOutput written out: per-head RMS norm, gate, merge heads, output projection."""
    out = mixer.out
    if out.norm is not None:
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + out.norm.eps) * out.norm.weight
    o = rearrange(o, "b n h d -> b n (h d)")
    if out.to_gate is not None:
        g = out.to_gate(x) if gate_logits is None else gate_logits
        o = o * (F.silu(g) if out.gate_kind == "swish" else g.sigmoid())
    return out.to_out(o)


# ReBased


def rebased_reference(mixer, x, causal):
    """(gamma LN(q) + beta . gamma LN(k) + beta)^2 / d attention, normalised over the keys, as a dense matrix."""
    d = mixer.qkv.splits[0] // HEADS
    q, k, v = [rearrange(t, "b n (h e) -> b h n e", h=HEADS) for t in mixer.qkv.to_qkv(x).split(mixer.qkv.splits, -1)]

    def affine_ln(t, norm):
        mean = t.mean(-1, keepdim=True)
        var = (t - mean).pow(2).mean(-1, keepdim=True)
        return (t - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    q, k = affine_ln(q, mixer.q_norm), affine_ln(k, mixer.k_norm)
    s = (q @ k.transpose(-1, -2)).pow(2) / d
    if causal:
        n = x.shape[1]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), 0.0)
    o = (s @ v) / (s.sum(-1, keepdim=True) + mixer.eps)
    return heads_out(mixer, rearrange(o, "b h n e -> b n h e"), x)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 7, 37])
def test_rebased_matches_quadratic_attention(causal, n):
    # 37 tokens: the chunked kernel (more than 16 tokens), 7 and 1: the token-by-token one
    mixer = build("based", causal, feature_dim=4, feature_map="rebased", output_norm=True, output_gate="swish")
    x = torch.randn(2, n, DIM, dtype=f64, requires_grad=True)
    out = mixer(x)
    ref = rebased_reference(mixer, x, causal)
    assert rel_err(out, ref) < 1e-10
    assert_grads_close(out, ref, [x, *mixer.parameters()])


def test_rebased_layer_norm_is_over_the_head_width():
    mixer = make_mixer("based", dim=DIM, heads=HEADS, feature_dim=6, feature_map="rebased")
    assert mixer.q_norm.normalized_shape == mixer.k_norm.normalized_shape == (6,)
    assert mixer.qkv.splits[:2] == [HEADS * 6, HEADS * 6]
    # the Taylor map (the default) has no learnable affine
    assert make_mixer("based", dim=DIM, heads=HEADS).q_norm is None


def test_rebased_cached_decoding_and_left_padding():
    mixer = build("based", feature_dim=4, feature_map="rebased")
    x = torch.randn(2, 23, DIM, dtype=f64)
    full = mixer(x)
    assert rel_err(stepped(mixer, x), full) < 1e-10

    padded, mask = left_pad(x, 3)
    assert rel_err(mixer(padded, mask=mask)[:, 3:], full) < 1e-10
    assert rel_err(stepped(mixer, padded, prompt=6, mask=mask)[:, 3:], full) < 1e-10


def test_rebased_bad_feature_map():
    with pytest.raises(ValueError, match="based feature_map must be one of"):
        make_mixer("based", dim=DIM, heads=HEADS, feature_map="rebase")


# HGRN2 with scalar decay


def hgrn2_reference(mixer, x, lower_bound=None):
    """The HGRN2 recurrence step by step in float64; `lower_bound` a tensor over the gate (or the mixer's float)."""
    b, n, _ = x.shape
    h, dk = HEADS, mixer.dim_k
    lb = mixer.lower_bound if lower_bound is None else lower_bound
    f = lb + (1 - lb) * torch.sigmoid(mixer.to_f(x))
    q = rearrange(F.silu(mixer.to_q(x)), "b n (h d) -> b n h d", h=h)
    v = rearrange(mixer.to_v(x), "b n (h d) -> b n h d", h=h)
    if mixer.decay == "vector":
        f = rearrange(f, "b n (h d) -> b n h d", h=h)
        k, decay, scale = 1 - f, f[..., None], 1.0
    else:
        k = rearrange(F.silu(mixer.to_k(x)), "b n (h d) -> b n h d", h=h) * (1 - f)[..., None]
        decay, scale = f[..., None, None], dk**-0.5
    state = x.new_zeros(b, h, dk, v.shape[-1])
    outs = []
    for t in range(n):
        state = decay[:, t] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    return heads_out(mixer, torch.stack(outs, dim=1), x)


@pytest.mark.parametrize("lower_bound", [0.0, 0.4])
def test_hgrn2_scalar_decay_matches_recurrence(lower_bound, monkeypatch):
    import x_transformers.mixers.hgrn2 as hgrn2

    mixer = build("hgrn2", decay="scalar", lower_bound=lower_bound)
    # one forget gate per head
    assert mixer.to_f.out_features == HEADS == mixer.gate_width
    calls = []
    chunk = hgrn2.chunk_simple_gla
    monkeypatch.setattr(hgrn2, "chunk_simple_gla", lambda *a, **k: calls.append(1) or chunk(*a, **k))
    x = torch.randn(2, 29, DIM, dtype=f64, requires_grad=True)
    out = mixer(x)
    assert calls, "the scalar decay runs on the simple-GLA kernel"
    ref = hgrn2_reference(mixer, x)
    assert rel_err(out, ref) < 1e-10
    cot = torch.randn_like(out)
    g, r = (torch.autograd.grad((y * cot).sum(), x)[0] for y in (out, ref))
    assert rel_err(g, r) < 1e-9


def test_hgrn2_default_is_vector_decay():
    mixer = make_mixer("hgrn2", dim=DIM, heads=HEADS)
    assert mixer.decay == "vector" and mixer.to_k is None
    assert mixer.to_f.out_features == HEADS * mixer.dim_k == mixer.gate_width
    x = torch.randn(2, 9, DIM, dtype=f64)
    mixer = build("hgrn2")
    assert rel_err(mixer(x), hgrn2_reference(mixer, x)) < 1e-10


def test_hgrn2_scalar_decay_cached_decoding_and_left_padding():
    mixer = build("hgrn2", decay="scalar")
    x = torch.randn(2, 23, DIM, dtype=f64)
    full = mixer(x)
    assert rel_err(stepped(mixer, x), full) < 1e-10
    padded, mask = left_pad(x, 4)
    assert rel_err(stepped(mixer, padded, prompt=7, mask=mask)[:, 4:], full) < 1e-10
    assert rel_err(mixer(padded, mask=mask)[:, 4:], full) < 1e-10


def test_hgrn2_bad_decay():
    with pytest.raises(ValueError, match="hgrn2 decay must be one of"):
        make_mixer("hgrn2", dim=DIM, heads=HEADS, decay="matrix")


# learned layer-wise lower bounds


def test_layer_lower_bounds():
    bounds = LayerLowerBounds(4, 3)
    # equal logits at init: layer i at i / 4
    expected = torch.arange(4.0)[:, None].expand(4, 3) / 4
    torch.testing.assert_close(torch.stack([bounds(i) for i in range(4)]), expected)
    with torch.no_grad():
        bounds.logits.copy_(torch.randn(4, 3) * 3)
    all_bounds = bounds.all_bounds()
    assert torch.equal(bounds(0), torch.zeros(3))
    assert (all_bounds.diff(dim=0) > 0).all() and (all_bounds < 1).all()
    # in fp32 even for a half-precision parameter
    assert bounds.to(torch.bfloat16)(2).dtype == torch.float32
    with pytest.raises(IndexError, match="layer 4 out of range for 4 layers"):
        bounds(4)
    with pytest.raises(ValueError, match="num_layers >= 1"):
        LayerLowerBounds(0, 3)


@pytest.mark.parametrize("name,kwargs", [("hgrn", {}), ("hgrn2", {}), ("hgrn2", dict(decay="scalar"))])
def test_learned_lower_bound_with_layer_bounds(name, kwargs):
    mixer = build(name, lower_bound="learned", **kwargs)
    assert mixer.stack_inputs == ("lower_bound",)
    bounds = LayerLowerBounds(3, mixer.gate_width).to(f64)
    with torch.no_grad():
        bounds.logits.copy_(torch.randn_like(bounds.logits))
    x = torch.randn(2, 21, DIM, dtype=f64)

    # the first layer's bound is 0: the same as a fixed bound of 0
    fixed = build(name, lower_bound=0.0, **kwargs)
    fixed.load_state_dict(mixer.state_dict())
    assert rel_err(mixer(x, lower_bound=bounds(0)), fixed(x)) < 1e-12

    # a deeper layer's per-channel bound against the recurrence written out
    lb = bounds(2)
    out = mixer(x, lower_bound=lb)
    ref = hgrn_reference(mixer, x, lb) if name == "hgrn" else hgrn2_reference(mixer, x, lb)
    assert rel_err(out, ref) < 1e-10
    assert rel_err(stepped(mixer, x, lower_bound=lb), out) < 1e-10

    # the bounds learn through the mixer
    mixer(x, lower_bound=bounds(1)).square().sum().backward()
    assert bounds.logits.grad is not None and bounds.logits.grad.abs().sum() > 0

    # an empty batch: the layer's bound keeps its shape (it has no batch dim)
    out, inter = mixer(x[:0], lower_bound=lb, return_intermediates=True)
    assert out.shape == (0, 21, DIM) and all(t.shape[0] == 0 for t in inter.recurrent_state)


def hgrn_reference(mixer, x, lb):
    f = lb + (1 - lb) * torch.sigmoid(mixer.to_f(x))
    inp = (1 - f) * F.silu(mixer.to_i(x))
    h, hs = torch.zeros_like(inp[:, 0]), []
    for t in range(x.shape[1]):
        h = f[:, t] * h + inp[:, t]
        hs.append(h)
    h = torch.stack(hs, dim=1)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + mixer.norm.eps) * mixer.norm.weight
    return mixer.to_out(h * F.silu(mixer.to_g(x)))


@pytest.mark.parametrize("name", ["hgrn", "hgrn2"])
def test_learned_lower_bound_errors(name):
    mixer = make_mixer(name, dim=DIM, heads=HEADS, lower_bound="learned")
    x = torch.randn(1, 3, DIM)
    with pytest.raises(ValueError, match=f"linear_attn='{name}' with lower_bound='learned' needs"):
        mixer(x)
    with pytest.raises(ValueError, match=rf"lower_bound must be a tensor of shape \({mixer.gate_width},\)"):
        mixer(x, lower_bound=torch.zeros(mixer.gate_width + 1))
    with pytest.raises(ValueError, match="float in \\[0, 1\\) or 'learned'"):
        make_mixer(name, dim=DIM, heads=HEADS, lower_bound="learnt")
    # a fixed bound takes no bound from the stack
    with pytest.raises(TypeError, match="unexpected inputs \\['lower_bound'\\]"):
        make_mixer(name, dim=DIM, heads=HEADS)(x, lower_bound=torch.zeros(mixer.gate_width))


# GTU


def gtu_reference(mixer, x, causal, mask=None):
    """u * (T v) with the Toeplitz matrix T[i, j] = rpe(i - j) decay^|i - j| built in full (O(n^2))."""
    n = x.shape[1]
    u, v = F.silu(mixer.to_uv(x)).chunk(2, dim=-1)
    if mask is not None:
        v = v * mask[..., None]
    rel = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    t = mixer.rpe(rel.flatten().to(x.dtype)).reshape(n, n, -1) * (mixer.decay ** rel.abs().to(x.dtype))[..., None]
    if causal:
        t = t * (rel >= 0)[..., None]
    o = u * torch.einsum("ijc,bjc->bic", t, v)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mixer.norm.eps) * mixer.norm.weight
    return mixer.to_out(o)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 2, 13, 33])
def test_gtu_matches_toeplitz_matrix(causal, n):
    mixer = build("gtu", causal, expand_ratio=1.5, rpe_dim=8, rpe_layers=2, decay=0.9)
    x = torch.randn(2, n, DIM, dtype=f64, requires_grad=True)
    out = mixer(x)
    ref = gtu_reference(mixer, x, causal)
    assert rel_err(out, ref) < 1e-10
    assert_grads_close(out, ref, [x, *mixer.parameters()])


def test_gtu_causal_ignores_the_future_and_left_padding():
    mixer = build("gtu")
    x = torch.randn(2, 20, DIM, dtype=f64)
    y = x.clone()
    y[:, 12:] = torch.randn_like(y[:, 12:])
    assert torch.allclose(mixer(x)[:, :12], mixer(y)[:, :12], rtol=0, atol=1e-12)

    padded, mask = left_pad(x, 5)
    assert rel_err(mixer(padded, mask=mask)[:, 5:], mixer(x)) < 1e-10


def test_gtu_bidirectional_padding():
    mixer = build("gtu", causal=False)
    x = torch.randn(2, 17, DIM, dtype=f64)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, -4:] = False
    mask[1, 3:6] = False
    out = mixer(x, mask=mask)
    assert rel_err(out[mask], gtu_reference(mixer, x, causal=False, mask=mask)[mask]) < 1e-10
    # whatever sits at the masked positions never reaches the others
    z = torch.where(mask[..., None], x, torch.randn_like(x) * 100)
    assert torch.allclose(mixer(z, mask=mask)[mask], out[mask], rtol=0, atol=1e-10)
    # and the first token sees the last
    y = x.clone()
    y[:, -1] += 1.0
    assert not torch.allclose(mixer(y)[:, 0], mixer(x)[:, 0])


def test_gtu_refuses_cached_decoding():
    mixer = build("gtu")
    x = torch.randn(1, 6, DIM, dtype=f64)
    out, inter = mixer(x, return_intermediates=True)
    assert inter.recurrent_state is None and inter.layer_type == "l"
    with pytest.raises(ValueError, match="linear_attn='gtu' has no decoding cache"):
        mixer(x[:, -1:], cache=inter)
    assert type(mixer).can_cache_kv is False


def test_gtu_in_a_model_generates_without_cache():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=11, max_seq_len=32, attn_layers=Decoder(dim=DIM, depth=2, heads=HEADS,
                                                                                linear_attn="gtu"))
    assert not net.attn_layers.can_cache_kv and not net.can_cache_kv
    wrapper = AutoregressiveWrapper(net).eval()
    prompts = torch.randint(0, 11, (2, 4))
    # cache_kv=True falls back to re-running the sequence, as the stack knows the mixer has no cache
    a = wrapper.generate(prompts, 5, temperature=0.0, cache_kv=True)
    b = wrapper.generate(prompts, 5, temperature=0.0, cache_kv=False)
    assert torch.equal(a, b)
    assert Encoder(dim=DIM, depth=1, heads=HEADS, linear_attn="gtu")(torch.randn(1, 5, DIM)).shape == (1, 5, DIM)


def test_gtu_half_precision_and_errors():
    mixer = build("gtu", dtype=torch.float32)
    x = torch.randn(2, 40, DIM)
    ref = mixer(x)
    out = build("gtu", dtype=torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 0.05
    with pytest.raises(ValueError, match="gtu decay must be in"):
        make_mixer("gtu", dim=DIM, heads=HEADS, decay=1.5)
    with pytest.raises(ValueError, match="gtu needs rpe_dim"):
        make_mixer("gtu", dim=DIM, heads=HEADS, rpe_dim=0)


@pytest.mark.parametrize("name,kwargs", [
    ("based", dict(feature_dim=4, feature_map="rebased")),
    ("hgrn2", dict(decay="scalar", lower_bound="learned")),
])
def test_triton_kernels_match_the_torch_path(name, kwargs, monkeypatch):
    # the Triton kernels (the CUDA path; the interpreter here) against the PyTorch path, chunked and token by token
    pytest.importorskip("triton")
    mixer = build(name, dtype=torch.float32, **kwargs)
    inputs = dict(lower_bound=torch.linspace(0.0, 0.9, mixer.gate_width)) if "lower_bound" in kwargs else {}
    x = torch.randn(2, 20, DIM)
    ref, ref_stepped = mixer(x, **inputs), stepped(mixer, x, prompt=18, **inputs)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert rel_err(mixer(x, **inputs), ref) < 1e-5
    assert rel_err(stepped(mixer, x, prompt=18, **inputs), ref_stepped) < 1e-5
