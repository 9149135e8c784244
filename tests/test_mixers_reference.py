"""Every mixer layer (projections, gates, short convolutions, norms and the recurrence between them) against an
independent float64 reference written from its paper's equations: a plain loop over tokens that reads the mixer's
weights through its parameters and calls none of its methods or kernels. Outputs, input gradients and parameter
gradients must agree to float64 roundoff, and so must a left-padded row and cached decoding (a chunked prompt, then
single tokens, then two tokens at once).

rwkv7, comba, gated_deltaproduct, kda, gtu, ReBased and the hgrn/hgrn2 learned bounds / scalar decay have their
own reference tests (tests/test_mixers_delta_family.py, test_mixers_kda.py, test_mixers_rebased_hgrn_gtu.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from x_transformers.mixers import make_mixer

DIM, HEADS, BATCH, SEQ, PAD = 32, 2, 2, 21, 3
# a prompt over the token-by-token limit (16) takes the chunked kernel, then decoding carries its state on
PROMPT = 17
f64 = torch.float64


# the shared pieces, written out from their definitions


def lin(x, layer):
    """A Linear layer's affine map, from its parameters."""
    return F.linear(x, layer.weight, layer.bias)


def silu(t):
    return t * torch.sigmoid(t)


def split_heads(t, h=HEADS):
    return rearrange(t, "b n (h d) -> b n h d", h=h)


def rms_norm(t, weight, eps):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


def l2_norm(t):
    return t / t.norm(dim=-1, keepdim=True)


def short_conv(x, conv):
    """Causal depthwise convolution then SiLU (arXiv:2406.06484, 3.2): `y_t = silu(sum_i w_i x_{t-K+1+i})`, zeros
    before the first token."""
    w = conv.conv.weight[:, 0]  # (d, K), the last tap on the current token
    K, outs = w.shape[1], []
    for t in range(x.shape[1]):
        acc = torch.zeros_like(x[:, 0])
        for i in range(K):
            if t - K + 1 + i >= 0:
                acc = acc + w[:, i] * x[:, t - K + 1 + i]
        outs.append(silu(acc))
    return torch.stack(outs, dim=1)


def qkv_heads(m, x):
    """Query / key / value heads from the joint projection, through the short convolution where the mixer has one."""
    proj = m.qkv
    qkv = lin(x, proj.to_qkv)
    if proj.conv is not None:
        qkv = short_conv(qkv, proj.conv)
    return [split_heads(t) for t in qkv.split(proj.splits, dim=-1)]


def head_output(m, o, x):
    """Per-head RMS norm, swish or sigmoid output gate, heads merged, output projection."""
    out = m.out
    if out.norm is not None:
        o = rms_norm(o, out.norm.weight, out.norm.eps)
    o = rearrange(o, "b n h d -> b n (h d)")
    if out.to_gate is not None:
        g = lin(x, out.to_gate)
        o = o * (silu(g) if out.gate_kind == "swish" else torch.sigmoid(g))
    return lin(o, out.to_out)


def gated_linear_recurrence(q, k, v, decay=None, scale=1.0):
    """`S_t = decay_t * S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`, one token at a time. decay: None (none),
    per head (b, n, h) or per key channel (b, n, h, dk)."""
    b, n, h, dk = k.shape
    S = k.new_zeros(b, h, dk, v.shape[-1])
    outs = []
    for t in range(n):
        if decay is not None:
            a = decay[:, t]
            S = S * (a[..., None, None] if a.ndim == 2 else a[..., None])
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(torch.einsum("bhk,bhkv->bhv", scale * q[:, t], S))
    return torch.stack(outs, dim=1)


# one reference per mixer


def linear_reference(m, x, cfg):
    # arXiv:2006.16236: phi(q_t) sum_{s <= t} phi(k_s)^T v_s (every s for the bidirectional form); the output
    # norm of HeadOutput takes the place of the denominator
    phi = {
        "elu": lambda t: F.elu(t) + 1,
        "softmax": lambda t: torch.exp(t) / torch.exp(t).sum(-1, keepdim=True),
    }[cfg.get("feature_map", "elu")]
    q, k, v = qkv_heads(m, x)
    q, k = phi(q), phi(k)
    scale = q.shape[-1] ** -0.5
    if cfg.get("causal", True):
        o = gated_linear_recurrence(q, k, v, scale=scale)
    else:
        S = torch.einsum("bnhk,bnhv->bhkv", k, v)
        o = torch.einsum("bnhk,bhkv->bnhv", scale * q, S)
    return head_output(m, o, x)


def rotate(t, pos, base=10000.0):
    """RoPE: the channel pair (2f, 2f + 1) turns by the angle pos * base^(-2f / d)."""
    d = t.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=f64) / d)
    angle = pos[:, None] * theta  # (n, d / 2)
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    even, odd = t[..., 0::2], t[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def retnet_reference(m, x, cfg):
    # arXiv:2307.08621 eq. 1-2: S_t = gamma_h S_{t-1} + k_t^T v_t, o_t = q_t S_t, gamma_h = 1 - 2^(-5 - h)
    q, k, v = qkv_heads(m, x)
    if cfg.get("rotary", True):
        pos = torch.arange(x.shape[1], dtype=f64)
        q, k = rotate(q, pos), rotate(k, pos)
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(HEADS, dtype=f64))
    decay = gamma.expand(*x.shape[:2], HEADS)
    return head_output(m, gated_linear_recurrence(q, k, v, decay, q.shape[-1] ** -0.5), x)


def lightning_reference(m, x, cfg):
    # arXiv:2307.14995: decay lambda_h = exp(-8 (h + 1) / H), SiLU kernels on queries and keys
    q, k, v = qkv_heads(m, x)
    lam = torch.exp(-8.0 * (torch.arange(HEADS, dtype=f64) + 1) / HEADS)
    decay = lam.expand(*x.shape[:2], HEADS)
    return head_output(m, gated_linear_recurrence(silu(q), silu(k), v, decay, q.shape[-1] ** -0.5), x)


def gla_reference(m, x, cfg):
    # arXiv:2312.06635 eq. 4: alpha_t = sigmoid(W2 W1 x_t + b)^(1/16) per key channel
    q, k, v = qkv_heads(m, x)
    logits = lin(lin(x, m.to_gate[0]), m.to_gate[1])
    alpha = split_heads(torch.sigmoid(logits) ** (1 / 16))
    return head_output(m, gated_linear_recurrence(q, k, v, alpha, q.shape[-1] ** -0.5), x)


def hgrn2_reference(m, x, cfg):
    # arXiv:2404.07904: f_t = lb + (1 - lb) sigmoid(W_f x_t), k_t = 1 - f_t, q_t = silu(W_q x_t)
    lb = cfg.get("lower_bound", 0.0)
    f = split_heads(lb + (1 - lb) * torch.sigmoid(lin(x, m.to_f)))
    q, v = split_heads(silu(lin(x, m.to_q))), split_heads(lin(x, m.to_v))
    return head_output(m, gated_linear_recurrence(q, 1 - f, v, f), x)


def delta_rule_reference(m, x, cfg):
    """DeltaNet (arXiv:2406.06484) and, with m.to_a, Gated DeltaNet (arXiv:2412.06464):
    S_t = alpha_t S_{t-1} + beta_t k_t^T (v_t - k_t alpha_t S_{t-1}), o_t = q_t S_t / sqrt(d_k)."""
    q, k, v = qkv_heads(m, x)
    if m.qkv.conv is None:
        q, k, v = silu(q), silu(k), silu(v)
    q, k = l2_norm(q), l2_norm(k)
    beta = torch.sigmoid(lin(x, m.to_beta))
    if m.to_a is not None:
        # Mamba2's gate: alpha_t = exp(-exp(A_log) softplus(W_a x_t + dt_bias))
        alpha = torch.exp(-torch.exp(m.A_log) * F.softplus(lin(x, m.to_a) + m.dt_bias))
    else:
        alpha = torch.ones_like(beta)
    b, n, h, dk = k.shape
    S = x.new_zeros(b, h, dk, v.shape[-1])
    outs = []
    for t in range(n):
        S = alpha[:, t, :, None, None] * S
        err = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * err)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * dk**-0.5, S))
    return head_output(m, torch.stack(outs, dim=1), x)


def mamba2_reference(m, x_in, cfg):
    # arXiv:2405.21060: h_t = exp(dt_t A) h_{t-1} + dt_t B_t^T x_t, y_t = C_t h_t + D x_t, then
    # RMSNorm(y * silu(z)) and the output projection
    d_inner, d_state = m.d_inner, m.d_state
    z, xbc, dt = lin(x_in, m.in_proj).split([d_inner, d_inner + 2 * d_state, HEADS], dim=-1)
    x, B, C = short_conv(xbc, m.conv).split([d_inner, d_state, d_state], dim=-1)
    x = split_heads(x)
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    b, n = x_in.shape[:2]
    S = x_in.new_zeros(b, HEADS, d_state, x.shape[-1])
    ys = []
    for t in range(n):
        S = torch.exp(dt[:, t] * A)[..., None, None] * S
        S = S + torch.einsum("bk,bhv->bhkv", B[:, t], dt[:, t, :, None] * x[:, t])
        ys.append(torch.einsum("bk,bhkv->bhv", C[:, t], S) + m.D[:, None] * x[:, t])
    y = rearrange(torch.stack(ys, dim=1), "b n h p -> b n (h p)")
    return lin(rms_norm(y * silu(z), m.norm.weight, m.norm.eps), m.out_proj)


def mingru_reference(m, x, cfg):
    # arXiv:2410.01201 (log-space version): z_t = sigmoid(W_z x_t), h~_t = g(W_h x_t),
    # h_t = (1 - z_t) h_{t-1} + z_t h~_t with g(a) = a + 0.5 for a >= 0, sigmoid(a) below
    hidden, gate = lin(x, m.to_hidden_and_gate).chunk(2, dim=-1)
    z = torch.sigmoid(gate)
    cand = torch.where(hidden >= 0, hidden + 0.5, torch.sigmoid(hidden))
    h = torch.zeros_like(z[:, 0])
    hs = []
    for t in range(x.shape[1]):
        h = (1 - z[:, t]) * h + z[:, t] * cand[:, t]
        hs.append(h)
    h = torch.stack(hs, dim=1)
    return lin(h, m.to_out) if isinstance(m.to_out, nn.Linear) else h


def hgrn_reference(m, x, cfg):
    # arXiv:2311.04823: f_t = lb + (1 - lb) sigmoid(W_f x_t), i_t = silu(W_i x_t), h_t = f_t h_{t-1} + (1 - f_t) i_t,
    # o_t = W_o (RMSNorm(h_t) * silu(W_g x_t))
    lb = cfg.get("lower_bound", 0.0)
    f = lb + (1 - lb) * torch.sigmoid(lin(x, m.to_f))
    i = silu(lin(x, m.to_i))
    h = torch.zeros_like(f[:, 0])
    hs = []
    for t in range(x.shape[1]):
        h = f[:, t] * h + (1 - f[:, t]) * i[:, t]
        hs.append(h)
    o = rms_norm(torch.stack(hs, dim=1), m.norm.weight, m.norm.eps) * silu(lin(x, m.to_g))
    return lin(o, m.to_out)


def rwkv6_reference(m, x, cfg):
    # arXiv:2404.05892 section 4: token shift with data-dependent lerp, w_t = exp(-exp(d_t)),
    # wkv_t = S_{t-1} + diag(u) k_t^T v_t, o_t = r_t wkv_t, S_t = diag(w_t) S_{t-1} + k_t^T v_t,
    # then a per-head GroupNorm, the SiLU gate and the output projection
    b, n, d = x.shape
    lora_rank = m.mix_up.shape[1]
    dh = d // HEADS
    S = x.new_zeros(b, HEADS, dh, dh)
    prev = torch.zeros_like(x[:, 0])
    outs = []
    for t in range(n):
        xt = x[:, t]
        delta = prev - xt
        lora = torch.tanh((xt + delta * m.mix_x) @ m.mix_down)
        # one low-rank mix each for w, k, v, r, g
        xw, xk, xv, xr, xg = (
            xt + delta * (m.mix_base[j] + lora[:, j * lora_rank : (j + 1) * lora_rank] @ m.mix_up[j])
            for j in range(5)
        )
        r, k, v = (lin(xs, layer).view(b, HEADS, dh) for xs, layer in ((xr, m.to_r), (xk, m.to_k), (xv, m.to_v)))
        w = torch.exp(-torch.exp(m.decay_base + torch.tanh(xw @ m.decay_down) @ m.decay_up)).view(b, HEADS, dh)
        kv = torch.einsum("bhk,bhv->bhkv", k, v)
        o = torch.einsum("bhk,bhkv->bhv", r, S + m.bonus[..., None] * kv)
        S = w[..., None] * S + kv
        # GroupNorm with one group per head, affine per channel
        mean = o.mean(-1, keepdim=True)
        var = (o - mean).pow(2).mean(-1, keepdim=True)
        o = ((o - mean) / torch.sqrt(var + m.norm.eps)).reshape(b, d) * m.norm.weight + m.norm.bias
        outs.append(lin(o * silu(lin(xg, m.to_g)), m.to_out))
        prev = xt
    return torch.stack(outs, dim=1)


def based_reference(m, x, cfg):
    # arXiv:2402.18668: exp(q.k / sqrt(d)) ~ 1 + q.k / sqrt(d) + (q.k)^2 / (2 d), o_t = sum_s a_ts v_s / sum_s a_ts
    q, k, v = qkv_heads(m, x)
    d = q.shape[-1]
    n = x.shape[1]
    causal = cfg.get("causal", True)
    outs = []
    for t in range(n):
        keys = slice(0, t + 1) if causal else slice(0, n)
        qk = torch.einsum("bhd,bshd->bsh", q[:, t], k[:, keys])
        a = 1 + qk / d**0.5 + qk**2 / (2 * d)
        num = torch.einsum("bsh,bshv->bhv", a, v[:, keys])
        outs.append(num / (a.sum(1)[..., None] + m.eps))
    return head_output(m, torch.stack(outs, dim=1), x)


def gateloop_reference(m, x, cfg):
    # arXiv:2311.01927, real-valued: a_t = sigmoid(W_a x_t + b) per key channel, S_t = diag(a_t) S_{t-1} + k_t^T v_t
    q, k, v = qkv_heads(m, x)
    a = split_heads(torch.sigmoid(lin(x, m.to_a)))
    return head_output(m, gated_linear_recurrence(q, k, v, a, q.shape[-1] ** -0.5), x)


REFERENCES = {
    "linear": linear_reference,
    "retnet": retnet_reference,
    "lightning": lightning_reference,
    "gla": gla_reference,
    "hgrn2": hgrn2_reference,
    "deltanet": delta_rule_reference,
    "gated_deltanet": delta_rule_reference,
    "mamba2": mamba2_reference,
    "mingru": mingru_reference,
    "hgrn": hgrn_reference,
    "rwkv6": rwkv6_reference,
    "based": based_reference,
    "gateloop": gateloop_reference,
}

# (case, mixer, kwargs): every mixer's defaults plus the branches its glue takes
CASES = [
    ("linear", "linear", {}),
    ("linear_softmax_conv", "linear", dict(feature_map="softmax", use_short_conv=True)),
    ("linear_bidirectional", "linear", dict(causal=False)),
    ("retnet", "retnet", {}),
    ("retnet_no_rotary", "retnet", dict(rotary=False)),
    ("lightning", "lightning", {}),
    ("gla", "gla", {}),
    ("gla_conv", "gla", dict(use_short_conv=True)),
    ("hgrn2", "hgrn2", {}),
    ("hgrn2_lower_bound", "hgrn2", dict(lower_bound=0.3, output_gate="sigmoid")),
    ("deltanet", "deltanet", {}),
    ("deltanet_no_conv", "deltanet", dict(use_short_conv=False, output_gate="swish")),
    ("gated_deltanet", "gated_deltanet", {}),
    ("gated_deltanet_plain_out", "gated_deltanet", dict(output_norm=False, output_gate=None, conv_size=2)),
    ("mamba2", "mamba2", dict(d_state=8)),
    ("mingru", "mingru", {}),
    ("mingru_expanded", "mingru", dict(expansion_factor=1.5)),
    ("hgrn", "hgrn", {}),
    ("hgrn_lower_bound", "hgrn", dict(lower_bound=0.3)),
    ("rwkv6", "rwkv6", {}),
    ("based", "based", {}),
    ("based_bidirectional", "based", dict(causal=False)),
    ("gateloop", "gateloop", {}),
]


def build(name, kwargs, dtype=f64):
    kwargs = dict(kwargs)
    causal = kwargs.pop("causal", True)
    torch.manual_seed(0)
    mixer = make_mixer(name, dim=DIM, heads=HEADS, causal=causal, **kwargs).to(dtype).eval()
    # move every parameter off its init (some start at zero or one) so each path carries a gradient
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def rel_err(a, b, floor=1e-12):
    return ((a - b).norm() / b.norm().clamp(min=floor)).item()


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_mixer_matches_float64_reference(case):
    _, name, cfg = next(c for c in CASES if c[0] == case)
    mixer = build(name, cfg)
    reference = REFERENCES[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, DIM, generator=gen, dtype=f64, requires_grad=True)

    out = mixer(x)
    ref = reference(mixer, x, cfg)
    assert rel_err(out, ref) < 1e-10, f"{case}: output off by {rel_err(out, ref):.1e}"

    # gradients of a random cotangent, for the input and every parameter (absolute below 1e-3: a gradient near zero
    # is a difference of larger terms, exact to their roundoff only)
    cot = torch.randn(out.shape, generator=gen, dtype=f64)
    names, params = zip(*mixer.named_parameters())
    grads = torch.autograd.grad((out * cot).sum(), (x, *params), allow_unused=True)
    ref_grads = torch.autograd.grad((ref * cot).sum(), (x, *params), allow_unused=True)
    for what, g, r in zip(("x", *names), grads, ref_grads):
        assert r is not None, f"{case}: the reference does not read {what}"
        assert g is not None, f"{case}: no gradient reaches {what}"
        assert rel_err(g, r, floor=1e-3) < 1e-9, f"{case}: d{what} off by {rel_err(g, r, floor=1e-3):.1e}"

    with torch.no_grad():
        x = x.detach()
        # left padding on the second row only: its real tokens see no trace of the padding (the first row reads its
        # extra tokens as real ones)
        padded = torch.cat((torch.randn(BATCH, PAD, DIM, generator=gen, dtype=f64), x), dim=1)
        mask = torch.ones(BATCH, PAD + SEQ, dtype=torch.bool)
        mask[1, :PAD] = False
        out = mixer(padded, mask=mask)
        assert rel_err(out[0], reference(mixer, padded[:1], cfg)[0]) < 1e-10
        assert rel_err(out[1, PAD:], ref[1]) < 1e-10

        if mixer.causal:
            # a chunked prompt, single tokens, then two tokens at once, each from the previous call's cache
            ends = [PROMPT, PROMPT + 1, PROMPT + 2, SEQ]
            out, cache = mixer(x[:, :PROMPT], return_intermediates=True)
            outs = [out]
            for start, end in zip(ends[:-1], ends[1:]):
                out, cache = mixer(x[:, start:end], cache=cache, return_intermediates=True)
                outs.append(out)
            stepped = torch.cat(outs, dim=1)
            assert rel_err(stepped, ref) < 1e-10, f"{case}: decoding off by {rel_err(stepped, ref):.1e}"


def test_every_listed_mixer_has_a_reference():
    assert {name for _, name, _ in CASES} == set(REFERENCES)


# the glue helpers on their own


def test_l2_normalize_matches_f_normalize_with_gradients():
    from x_transformers.mixers.base import l2_normalize

    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: l2_normalize(t), (x,))
    # a zero row (padding) takes F.normalize's eps clamp, the same finite gradient
    x.data[0, 0, 0] = 0.0
    w = torch.randn_like(x)
    (l2_normalize(x) * w).sum().backward()
    dx, x.grad = x.grad, None
    (torch.nn.functional.normalize(x, dim=-1) * w).sum().backward()
    torch.testing.assert_close(dx, x.grad)


def test_short_convolution_matches_shifted_products_and_caches():
    from x_transformers.mixers.base import ShortConvolution

    torch.manual_seed(0)
    conv = ShortConvolution(6, size=4)
    x = torch.randn(2, 9, 6)
    weight = conv.conv.weight[:, 0]  # (d, k)
    padded = torch.nn.functional.pad(x, (0, 0, 3, 0))
    ref = torch.nn.functional.silu(sum(padded[:, i : i + 9] * weight[:, i] for i in range(4)))
    out, cache = conv(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(cache, x[:, -3:])
    # the kernel path (ops.causal_conv1d: Triton on CUDA / under TRITON_INTERPRET=1) and the shifted products agree,
    # gradients, caches and decoding from a cache too
    xs = x.clone().requires_grad_()
    results = []
    for use_kernel in (True, False):
        conv.use_kernel = use_kernel
        out, cache = conv(xs)
        step, step_cache = conv(xs[:, 7:], cache=xs[:, 4:7].detach())
        grads = torch.autograd.grad((out.square().sum() + step.sum()), (xs, conv.conv.weight))
        results.append((out, cache, step, step_cache, *grads))
    conv.use_kernel = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)

    # two tokens with a cache of the past three inputs continue the sequence; a short prompt pads its cache
    out2, cache2 = conv(x[:, 7:], cache=x[:, 4:7])
    torch.testing.assert_close(out2, ref[:, 7:])
    torch.testing.assert_close(cache2, x[:, -3:])
    _, short = conv(x[:, :1])
    assert short.shape == (2, 3, 6) and short[:, :2].abs().sum() == 0


def test_rms_norm_stays_in_the_activation_dtype_under_autocast():
    from x_transformers.mixers.base import rms_norm as mixer_rms_norm

    x = torch.randn(3, 16, dtype=torch.bfloat16)
    weight = torch.rand(16) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer_rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.rms_norm(x.float(), (16,), weight, 1e-5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["gated_deltanet", "retnet", "mamba2", "hgrn2", "hgrn", "gla"])
def test_bf16_autocast_close_to_fp32_and_decodes(name):
    mixer = build(name, {}, dtype=torch.float32)
    x = torch.randn(BATCH, SEQ, DIM, generator=torch.Generator().manual_seed(1))
    ref = mixer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(x)
        # decoding under autocast keeps one state structure and dtype from step to step
        _, cache = mixer(x[:, :5], return_intermediates=True)
        _, cache2 = mixer(x[:, 5:6], cache=cache, return_intermediates=True)
    assert rel_err(out.float(), ref) < 3e-2
    for a, b in zip(cache.recurrent_state, cache2.recurrent_state):
        assert (a is None) == (b is None)
        assert a is None or (a.shape == b.shape and a.dtype == b.dtype)
