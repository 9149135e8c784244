"""RWKV-7, Gated DeltaProduct and Comba: each recurrence against a plain step-by-step loop of its paper's formula,
cached decoding across the chunked / token-by-token switch, RWKV-7's value residual handed from layer to layer, and
clear errors. (tests/test_mixers.py runs the generic mixer checks on them too.)"""

import pytest
import torch
import torch.nn.functional as F

from x_transformers.mixers import make_mixer
from x_transformers.mixers import rwkv7 as rwkv7_module

DIM, HEADS = 32, 2
NAMES = ["rwkv7", "gated_deltaproduct", "comba"]


def build(name, **kwargs):
    torch.manual_seed(0)
    return make_mixer(name, dim=DIM, heads=HEADS, **kwargs).eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-8)).item()


def decode(mixer, x, prompt, **kwargs):
    """A prompt through the parallel path, then one token at a time with the cache."""
    out, cache = mixer(x[:, :prompt], return_intermediates=True, **kwargs)
    outs = [out]
    for t in range(prompt, x.shape[1]):
        out, cache = mixer(x[:, t : t + 1], cache=cache, return_intermediates=True)
        outs.append(out)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", NAMES)
def test_decoding_after_a_chunked_prompt(name):
    # a prompt longer than the token-by-token limit takes the chunked kernel; its state must carry on exactly
    mixer = build(name)
    x = torch.randn(2, 23, DIM)
    assert rel_err(decode(mixer, x, prompt=20), mixer(x)) < 1e-4


@pytest.mark.parametrize("kwargs", [dict(num_householder=3), dict(allow_neg_eigval=True)])
def test_deltaproduct_options_decode(kwargs):
    mixer = build("gated_deltaproduct", **kwargs)
    x = torch.randn(1, 12, DIM)
    assert rel_err(decode(mixer, x, prompt=4), mixer(x)) < 1e-4


def test_rwkv7_value_residual_through_layers():
    # the first layer hands its values on; a later layer mixes them in, in parallel and step by step alike
    first = build("rwkv7")
    torch.manual_seed(1)
    second = make_mixer("rwkv7", dim=DIM, heads=HEADS).eval()
    x = torch.randn(2, 20, DIM)
    out1, inter1 = first(x, return_intermediates=True)
    values = inter1.values
    assert values.shape == (2, 20, HEADS, DIM // HEADS)
    full = second(x, value_first=values)
    assert rel_err(full, second(x)) > 1e-3, "value_first must change a later layer's output"

    c1 = c2 = None
    outs = []
    for t in range(x.shape[1]):
        xt = x[:, t : t + 1]
        _, c1 = first(xt, cache=c1, return_intermediates=True)
        out, c2 = second(xt, cache=c2, return_intermediates=True, value_first=c1.values)
        outs.append(out)
    assert rel_err(torch.cat(outs, 1), full) < 1e-4


def test_rwkv7_kernel_inputs(monkeypatch):
    # a = -kappa with kappa L2-normalised, b = kappa * a_t with a_t in (0, 1), log w in (-exp(-0.5), 0)
    seen, real = {}, rwkv7_module.run_kernel

    def spy(chunk_fn, recurrent_fn, r, k, v, a, b, log_w, **kwargs):
        seen.update(a=a, b=b, log_w=log_w)
        return real(chunk_fn, recurrent_fn, r, k, v, a, b, log_w, **kwargs)

    mixer = build("rwkv7")
    with torch.no_grad():
        mixer.decay.bias.data[: DIM // 2] = 40.0
        mixer.decay.bias.data[DIM // 2 :] = -40.0
    monkeypatch.setattr(rwkv7_module, "run_kernel", spy)
    mixer(torch.randn(2, 7, DIM))
    a, b, log_w = seen["a"], seen["b"], seen["log_w"]
    assert torch.allclose(a.norm(dim=-1), torch.ones(a.shape[:-1]), atol=1e-5)
    lr = b / -a
    assert ((lr > 0) & (lr < 1)).all()
    assert (log_w < 0).all() and (log_w >= -rwkv7_module.LOG_DECAY_BOUND).all()
    assert log_w.min() < -0.6 and log_w.max() > -1e-6


def test_deltaproduct_matches_householder_loop():
    # S <- alpha S once per token, then n_h steps S <- S + beta k^T (v - k S); o = scale q S
    torch.manual_seed(0)
    mixer = build("gated_deltaproduct", num_householder=3, allow_neg_eigval=True)
    b, n, nh, h, dk, dv = 2, 21, 3, HEADS, 16, 16
    q = F.normalize(torch.randn(b, n, h, dk), dim=-1)
    k = F.normalize(torch.randn(b, n, nh, h, dk), dim=-1)
    v = torch.randn(b, n, nh, h, dv)
    beta = 2 * torch.rand(b, n, nh, h)
    g = -torch.rand(b, n, h)
    s0 = torch.randn(b, h, dk, dv)
    o, s = mixer.recurrence(q, k, v, beta, g, 0.25, s0, want_state=True)

    state, ref = s0.clone(), []
    for t in range(n):
        state = state * g[:, t].exp()[..., None, None]
        for j in range(nh):
            kj = k[:, t, j]
            pred = torch.einsum("bhk,bhkv->bhv", kj, state)
            state = state + torch.einsum("bhk,bhv->bhkv", kj, beta[:, t, j, :, None] * (v[:, t, j] - pred))
        ref.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * 0.25, state))
    assert rel_err(o, torch.stack(ref, 1)) < 1e-5 and rel_err(s, state) < 1e-5


def test_comba_matches_its_recurrence():
    # S_t = alpha S + beta k^T (v - p S), p = sigmoid(d) k, o = scale (q - D p) S_t
    mixer = build("comba")
    with torch.no_grad():
        mixer.d.normal_()
        mixer.D.uniform_(0.5, 1.5)
    b, n, h, dk, dv = 2, 19, HEADS, 16, 16
    q, k = F.normalize(torch.randn(b, n, h, dk), dim=-1), F.normalize(torch.randn(b, n, h, dk), dim=-1)
    v, beta, g = torch.randn(b, n, h, dv), torch.rand(b, n, h), -torch.rand(b, n, h)
    s0 = torch.randn(b, h, dk, dv)
    with torch.no_grad():
        o, s = mixer.recurrence(q, k, v, beta, g, 0.25, s0, want_state=True)

    p = k * mixer.d.detach().sigmoid()
    state, ref = s0.clone(), []
    for t in range(n):
        read = torch.einsum("bhk,bhkv->bhv", p[:, t], state)
        state = state * g[:, t].exp()[..., None, None]
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * (v[:, t] - read))
        qc = q[:, t] - mixer.D.detach()[:, None] * p[:, t]
        ref.append(torch.einsum("bhk,bhkv->bhv", qc * 0.25, state))
    assert rel_err(o, torch.stack(ref, 1)) < 1e-5 and rel_err(s, state) < 1e-5


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_householder"):
        make_mixer("gated_deltaproduct", dim=DIM, heads=HEADS, num_householder=0)
    with pytest.raises(ValueError, match="divisible"):
        make_mixer("rwkv7", dim=DIM, heads=3)
    mixer = build("rwkv7")
    x = torch.randn(2, 5, DIM)
    with pytest.raises(ValueError, match="value_first"):
        mixer(x, value_first=torch.randn(2, 4, HEADS, DIM // HEADS))
    with pytest.raises(TypeError, match="value_last"):
        mixer(x, value_last=torch.randn(2, 5, HEADS, DIM // HEADS))
    with pytest.raises(TypeError, match="unexpected inputs"):
        build("comba")(x, value_first=torch.randn(2, 5, HEADS, DIM // HEADS))


def test_rwkv7_empty_batch_keeps_shapes():
    mixer = build("rwkv7")
    out, inter = mixer(torch.randn(0, 6, DIM), return_intermediates=True)
    assert out.shape == (0, 6, DIM) and inter.values.shape == (0, 6, HEADS, DIM // HEADS)
