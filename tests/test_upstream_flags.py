"""Norm and feedforward flags of later x-transformers releases: DyT, Derf, pre_and_post_norm, SoLU, soft-clamped GLU
(SiTU-GLU), feedforward pre-activation soft clamp, custom activation.

Each flag: the outputs of the upstream release on the same weights (tests/fixtures/upstream/flags.pt, written by
make_upstream_fixtures.py there), its formula written out, composition with the mixer stacks, and its refusals.
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from x_transformers import Decoder, TransformerWrapper
from x_transformers.cache import StaticCache
from x_transformers.feedforward import GLU, FeedForward, SoLU
from x_transformers.norms import Derf, DynamicTanh, LayerNorm

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "upstream" / "flags.pt", weights_only=True)


def _unpack(record, flat, offset):
    tensors = {}
    for key, shape in record["layout"]:
        size = torch.Size(shape).numel()
        tensors[key] = flat[offset:offset + size].reshape(shape)
        offset += size
    return tensors, offset


def _cases():
    cases, offset = [], 0
    for name, record in FIXTURE["cases"].items():
        tensors, offset = _unpack(record, FIXTURE["flat"], offset)
        cases.append((name, record["kwargs"], tensors))
    assert offset == FIXTURE["flat"].numel()
    return cases


CASES = _cases()


@pytest.mark.parametrize("name, kwargs, tensors", CASES, ids=[name for name, _, _ in CASES])
def test_matches_upstream(name, kwargs, tensors):
    kwargs, tensors = dict(kwargs), dict(tensors)
    if "ff_custom_activation" in kwargs:
        kwargs["ff_custom_activation"] = getattr(nn, kwargs["ff_custom_activation"])()
    x, expected = tensors.pop("__x__"), tensors.pop("__out__")
    model = Decoder(dim=x.shape[-1], ff_mult=1, **kwargs)
    # strict: the same parameters under the same names as upstream
    model.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        out = model.double().eval()(x.double())
    torch.testing.assert_close(out.float(), expected, rtol=1e-5, atol=1e-5)


def test_fixture_exercises_the_clamps():
    # the soft-clamp cases are only evidence if their inputs saturate the clamps
    name, kwargs, tensors = next(c for c in CASES if c[0] == "ff_glu_softclamp")
    proj = tensors["layers.0.1.ff.0.proj.weight"]
    bias = tensors["layers.0.1.ff.0.proj.bias"]
    # the feedforward's input is the pre-norm output (gain stored as its offset from one)
    normed = LayerNorm(proj.shape[1], unit_offset=True)
    normed.load_state_dict({"gamma": tensors["layers.0.0.0.gamma"]})
    up, gate = (normed(tensors["__x__"]) @ proj.T + bias).chunk(2, dim=-1)
    assert up.abs().max() > kwargs["ff_glu_up_softclamp_value"]
    assert gate.abs().max() > kwargs["ff_glu_gate_softclamp_value"]


x = torch.randn(2, 5, 8, dtype=torch.float64) * 3


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module.double()


# norms


@pytest.mark.parametrize("unit_offset", [False, True])
def test_dynamic_tanh_formula(unit_offset):
    torch.manual_seed(0)
    norm = DynamicTanh(8, init_alpha=0.6, unit_offset=unit_offset)
    # at init: tanh(0.6 x), whatever way the parameters are stored
    torch.testing.assert_close(norm.double()(x), torch.tanh(0.6 * x))
    _perturb(norm)
    alpha = norm.pre_tanh_scale + (0.6 if unit_offset else 0.0)
    gamma = norm.gamma + float(unit_offset)
    torch.testing.assert_close(norm(x), torch.tanh(alpha * x) * gamma + norm.beta)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_derf_formula(unit_offset):
    torch.manual_seed(0)
    norm = Derf(8, init_alpha=0.5, init_bias=0.2, unit_offset=unit_offset)
    torch.testing.assert_close(norm.double()(x), torch.erf(0.5 * x + 0.2))
    _perturb(norm)
    offset = float(unit_offset)
    expected = torch.erf((norm.alpha + offset) * x + norm.s) * (norm.gamma + offset) + norm.beta
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("flag, cls", [("use_dynamic_tanh", DynamicTanh), ("use_derf", Derf)])
def test_norm_flags_build_their_norm_everywhere(flag, cls):
    layers = Decoder(dim=8, depth=2, heads=2, **{flag: True})
    norms = [m for m in layers.modules() if isinstance(m, (cls, LayerNorm))]
    # a pre-norm per block and the final norm, all of the chosen kind
    assert len(norms) == 5 and all(isinstance(m, cls) for m in norms)
    assert isinstance(layers.final_norm, cls)


def test_dynamic_tanh_init_alpha_reaches_every_norm():
    layers = Decoder(dim=8, depth=1, heads=2, use_dynamic_tanh=True, dynamic_tanh_init_alpha=0.25,
                     norm_add_unit_offset=False)
    alphas = {m.pre_tanh_scale.item() for m in layers.modules() if isinstance(m, DynamicTanh)}
    assert alphas == {0.25}


def test_pre_and_post_norm_layout():
    layers = Decoder(dim=8, depth=2, heads=2, pre_and_post_norm=True)
    # a norm before each block and after each residual add; no final norm
    assert isinstance(layers.final_norm, nn.Identity)
    for norms, _, _ in layers.layers:
        pre, post_branch, post_main = norms
        assert isinstance(pre, LayerNorm) and post_branch is None and isinstance(post_main, LayerNorm)


def test_pre_and_post_norm_formula():
    # one feedforward block: x' = post(x + ff(pre(x))), with no final norm
    torch.manual_seed(0)
    layers = _perturb(Decoder(dim=8, custom_layers=("f",), pre_and_post_norm=True, use_rmsnorm=True)).eval()
    (pre, _, post), block, _ = layers.layers[0]
    torch.testing.assert_close(layers(x), post(x + block(pre(x))))


@pytest.mark.parametrize("kwargs", [
    dict(use_dynamic_tanh=True),
    dict(use_derf=True),
    dict(pre_and_post_norm=True, use_derf=True),
    dict(pre_and_post_norm=True, ff_glu=True, ff_glu_softclamp=True, ff_solu=False),
    dict(ff_solu=True, ff_softclamp_value=2.0),
    dict(ff_custom_activation=nn.Tanh()),
], ids=["dyt", "derf", "pre_and_post_norm", "situ_glu", "solu_softclamp", "custom_activation"])
def test_composes_with_mixers(kwargs):
    # the norms wrap mixer blocks as they wrap attention; a chunked, cached forward equals the full one
    torch.manual_seed(0)
    net = TransformerWrapper(
        num_tokens=16, max_seq_len=16,
        attn_layers=Decoder(dim=16, depth=2, heads=2, linear_attn="gla", hybrid_pattern="LN", **kwargs),
    ).eval()
    _perturb(net).float()
    assert "l" in net.attn_layers.layer_types
    tokens = torch.randint(0, 16, (2, 7))
    cache = StaticCache(2, 8)
    chunks = [net(tokens[:, :4], cache=cache), net(tokens[:, 4:5], cache=cache), net(tokens[:, 5:], cache=cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), net(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(use_dynamic_tanh=True, pre_norm=False), "use_dynamic_tanh"),
    (dict(use_dynamic_tanh=True, resi_dual=True), "use_dynamic_tanh"),
    (dict(dynamic_tanh_init_alpha=0.5), "dynamic_tanh_init_alpha"),
    (dict(pre_and_post_norm=True, pre_norm=False), "pre_and_post_norm"),
    (dict(pre_and_post_norm=True, resi_dual=True), "pre_and_post_norm"),
    (dict(ff_num_experts=2, ff_solu=True), "ff_solu"),
    (dict(ff_num_experts=2, ff_glu=True, ff_glu_softclamp=True), "ff_glu_softclamp"),
    (dict(ff_num_experts=2, ff_num_shared_experts=1, ff_custom_activation=nn.Tanh()), "ff_custom_activation"),
])
def test_stack_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Decoder(dim=8, depth=1, heads=2, **kwargs)


def test_norm_choices_are_exclusive():
    with pytest.raises(AssertionError, match="at most one"):
        Decoder(dim=8, depth=1, use_dynamic_tanh=True, use_derf=True)
    with pytest.raises(AssertionError, match="at most one"):
        Decoder(dim=8, depth=1, use_derf=True, use_rmsnorm=True)


# feedforward


def test_solu_formula():
    torch.manual_seed(0)
    ff = _perturb(FeedForward(8, mult=2, solu=True))
    linear_in, solu = ff.ff[0]
    assert isinstance(solu, SoLU)
    h = linear_in(x)
    h = h * h.softmax(dim=-1)
    h = torch.nn.functional.layer_norm(h, (16,)) * solu.norm.gamma
    torch.testing.assert_close(ff(x), ff.ff[-1](h))


@pytest.mark.parametrize("swish", [False, True])
def test_glu_softclamp_formula(swish):
    torch.manual_seed(0)
    ff = _perturb(FeedForward(8, mult=2, glu=True, swish=swish, glu_softclamp=True, glu_gate_softclamp_value=1.5,
                              glu_up_softclamp_value=2.5))
    up, gate = ff.ff[0].proj(x).chunk(2, dim=-1)
    # gelu(g) = g * Phi(g), silu(g) = g * sigmoid(g): the linear factor g is clamped to 1.5 tanh(g / 1.5)
    smooth = torch.sigmoid(gate) if swish else 0.5 * (1 + torch.erf(gate / 2**0.5))
    hidden = 2.5 * torch.tanh(up / 2.5) * 1.5 * torch.tanh(gate / 1.5) * smooth
    torch.testing.assert_close(ff(x), ff.ff[-1](hidden))
    # bounded whatever the input: |up| < 2.5 and |gate factor| < 1.5
    big = ff.ff[0](x * 1e4)
    assert big.abs().max() <= 2.5 * 1.5


def test_glu_softclamp_defaults():
    glu = FeedForward(8, glu=True, glu_softclamp=True).ff[0]
    assert isinstance(glu, GLU) and glu.up_softclamp_value == 25.0 and glu.act.value == 4.0


def test_softclamp_value_formula():
    torch.manual_seed(0)
    ff = _perturb(FeedForward(8, mult=2, softclamp_value=1.5, relu_squared=True))
    h = 1.5 * torch.tanh(ff.ff[0][0](x) / 1.5)
    torch.testing.assert_close(ff(x), ff.ff[-1](torch.relu(h) ** 2))


def test_custom_activation_is_copied_per_block():
    act = nn.PReLU()
    layers = Decoder(dim=8, custom_layers=("f", "f"), ff_custom_activation=act)
    copies = [m for m in layers.modules() if isinstance(m, nn.PReLU)]
    # each block trains its own copy; the caller's module is not shared into the model
    assert len(copies) == 2 and all(c is not act for c in copies) and copies[0] is not copies[1]
    torch.manual_seed(0)
    ff = _perturb(FeedForward(8, mult=2, custom_activation=nn.PReLU(init=0.1)))
    linear_in, prelu = ff.ff[0]
    h = linear_in(x)
    torch.testing.assert_close(ff(x), ff.ff[-1](torch.where(h > 0, h, prelu.weight * h)))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(relu_squared=True, solu=True), ValueError, "relu_squared"),
    (dict(custom_activation=nn.Tanh(), swish=True), ValueError, "custom_activation"),
    (dict(custom_activation=torch.tanh), TypeError, "nn.Module"),
    (dict(glu_softclamp=True), ValueError, "glu=True"),
    (dict(glu=True, glu_softclamp=True, relu_squared=True), ValueError, "GELU"),
    (dict(glu=True, glu_softclamp=True, solu=True), ValueError, "GELU"),
    (dict(glu=True, glu_softclamp=True, custom_activation=nn.GELU(approximate="tanh")), ValueError, "GELU"),
    (dict(glu_up_softclamp_value=10.0), ValueError, "glu_softclamp=True"),
    (dict(glu=True, glu_softclamp=True, glu_gate_softclamp_value=0.0), ValueError, "positive"),
    (dict(glu=True, softclamp_value=2.0), ValueError, "glu_softclamp"),
    (dict(softclamp_value=-1.0), ValueError, "positive"),
])
def test_feedforward_refusals(kwargs, error, match):
    with pytest.raises(error, match=match):
        FeedForward(8, **kwargs)
