"""Every linear-attention / RNN mixer: cached token-by-token decoding equals the parallel forward, padding does not
leak, gradients are finite, bad names and kwargs fail clearly."""

import pytest
import torch

from x_transformers.attend import Intermediates
from x_transformers.mixers import MIXERS, make_mixer, mixer_class

DIM, HEADS = 32, 2
CAUSAL_MIXERS = sorted(MIXERS)
# mixers with a decoding cache; the others (gtu) refuse one and set can_cache_kv = False for the layer stack
DECODING_MIXERS = [name for name in CAUSAL_MIXERS if getattr(mixer_class(name), "can_cache_kv", True)]
BIDIRECTIONAL = ["linear", "based", "gtu"]


def build(name, causal=True, **kwargs):
    torch.manual_seed(0)
    return make_mixer(name, dim=DIM, heads=HEADS, causal=causal, **kwargs).eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-8)).item()


@pytest.mark.parametrize("name", DECODING_MIXERS)
def test_cached_decoding_matches_parallel(name):
    mixer = build(name)
    x = torch.randn(2, 21, DIM)
    full = mixer(x)

    # a prompt of 5 tokens through the chunked / parallel path, then one token at a time with the cache
    out, cache = mixer(x[:, :5], return_intermediates=True)
    outs = [out]
    for t in range(5, x.shape[1]):
        out, cache = mixer(x[:, t : t + 1], cache=cache, return_intermediates=True)
        outs.append(out)
    stepped = torch.cat(outs, dim=1)
    assert cache.layer_type == "l"
    assert rel_err(stepped, full) < 1e-4


@pytest.mark.parametrize("name", DECODING_MIXERS)
def test_left_padding_equals_unpadded(name):
    mixer = build(name)
    x = torch.randn(1, 19, DIM)
    pad = 3
    padded = torch.cat((torch.randn(1, pad, DIM), x), dim=1)
    mask = torch.ones(1, pad + 19, dtype=torch.bool)
    mask[:, :pad] = False

    ref, ref_cache = mixer(x, return_intermediates=True)
    out, cache = mixer(padded, mask=mask, return_intermediates=True)
    assert rel_err(out[:, pad:], ref) < 1e-4

    # the next decoded token sees the same state either way
    nxt = torch.randn(1, 1, DIM)
    a = mixer(nxt, cache=ref_cache)
    b = mixer(nxt, cache=cache, mask=torch.cat((mask, torch.ones(1, 1, dtype=torch.bool)), dim=1))
    assert rel_err(b, a) < 1e-4


@pytest.mark.parametrize("name", CAUSAL_MIXERS)
def test_gradients_finite(name):
    mixer = build(name).train()
    x = torch.randn(2, 24, DIM, requires_grad=True)
    mixer(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", CAUSAL_MIXERS)
def test_causal(name):
    mixer = build(name)
    x = torch.randn(1, 20, DIM)
    y = x.clone()
    y[:, 12:] = torch.randn_like(y[:, 12:])
    assert torch.allclose(mixer(x)[:, :12], mixer(y)[:, :12], atol=1e-5)


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_bidirectional(name):
    mixer = build(name, causal=False)
    x = torch.randn(2, 20, DIM)
    y = x.clone()
    y[:, -1] += 1.0
    # the first token sees the last one
    assert not torch.allclose(mixer(x)[:, 0], mixer(y)[:, 0])
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[:, -4:] = False
    z = x.clone()
    z[:, -4:] = torch.randn_like(z[:, -4:])
    assert torch.allclose(mixer(x, mask=mask)[:, :16], mixer(z, mask=mask)[:, :16], atol=1e-5)


@pytest.mark.parametrize("name", sorted(set(CAUSAL_MIXERS) - set(DECODING_MIXERS)))
def test_mixers_without_cache_refuse_decoding(name):
    mixer = build(name)
    _, inter = mixer(torch.randn(1, 4, DIM), return_intermediates=True)
    with pytest.raises(ValueError, match=f"linear_attn='{name}' has no decoding cache"):
        mixer(torch.randn(1, 1, DIM), cache=inter)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown linear_attn 'nope'"):
        make_mixer("nope", dim=DIM, heads=HEADS)
    with pytest.raises(ValueError, match="bogus"):
        make_mixer("gla", dim=DIM, heads=HEADS, bogus=1)
    with pytest.raises(ValueError, match="no bidirectional form"):
        make_mixer("gated_deltanet", dim=DIM, heads=HEADS, causal=False)
    mixer = build("gla")
    with pytest.raises(ValueError, match="expects x of shape"):
        mixer(torch.randn(2, 5, DIM + 1))


def test_mixer_kwargs_reach_the_mixer():
    mixer = make_mixer("gated_deltanet", dim=DIM, heads=HEADS, expand_v=2.0, conv_size=2)
    assert mixer.qkv.splits == [DIM, DIM, 2 * DIM]
    assert mixer.qkv.conv.size == 2
    assert isinstance(Intermediates(recurrent_state=(1,)).recurrent_state, tuple)


def block_kinds(decoder):
    return [type(layer[1]).__name__ for layer in decoder.layers]


def test_hybrid_layouts_build_the_right_layers():
    from x_transformers import Decoder, Encoder

    d = Decoder(dim=DIM, depth=8, heads=HEADS, linear_attn="gated_deltanet", hybrid_pattern="LLLN")
    mixers = [kind for kind in block_kinds(d) if kind != "FeedForward"]
    assert mixers == ["GatedDeltaNet"] * 3 + ["Attention"] + ["GatedDeltaNet"] * 3 + ["Attention"]

    d = Decoder(dim=DIM, depth=6, heads=HEADS, linear_attn="mamba2", softmax_attn_layers=(1, 4))
    mixers = [kind for kind in block_kinds(d) if kind != "FeedForward"]
    assert [i for i, kind in enumerate(mixers) if kind == "Attention"] == [1, 4]
    assert set(mixers) == {"Mamba2", "Attention"}

    d = Decoder(dim=DIM, depth=2, heads=HEADS, linear_attn="gla", custom_layers=("l", "f", "a", "f"))
    assert block_kinds(d) == ["GLA", "FeedForward", "Attention", "FeedForward"]

    # softmax layers keep their attn_ features; mixer kwargs reach only the mixers
    d = Decoder(dim=DIM, depth=2, heads=HEADS, linear_attn="gla", hybrid_pattern="LN", attn_kv_heads=1,
                linear_attn_expand_k=1.0)
    assert d.layers[0][1].dim_k == DIM // HEADS
    assert d.layers[2][1].kv_heads == 1

    with pytest.raises(ValueError, match="no bidirectional form"):
        Encoder(dim=DIM, depth=1, heads=HEADS, linear_attn="gated_deltanet")
    with pytest.raises(ValueError, match="linear_attn"):
        Decoder(dim=DIM, depth=2, heads=HEADS, hybrid_pattern="LN")
