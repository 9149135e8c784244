"""FeedForward / GLU: parity with upstream 2.0.1 and the formula of each variant."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from x_transformers.feedforward import GLU, FeedForward, ReluSquared

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_block_fixtures.py"
_spec = importlib.util.spec_from_file_location("make_block_fixtures", _SCRIPT)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

CASES = fixtures.load_cases("feedforward")


@pytest.mark.parametrize("spec, record", CASES, ids=[spec["name"] for spec, _ in CASES])
def test_parity_with_upstream(spec, record):
    fixtures.check_parity(spec, record, fixtures.our_namespace())


x = torch.randn(2, 5, 8)


@pytest.mark.parametrize(
    "kwargs, act",
    [(dict(), F.gelu), (dict(swish=True), F.silu), (dict(relu_squared=True), lambda t: F.relu(t) ** 2)],
)
def test_mlp_formula(kwargs, act):
    ff = FeedForward(8, mult=2, **kwargs)
    lin_in, lin_out = ff.ff[0][0], ff.ff[-1]
    torch.testing.assert_close(ff(x), lin_out(act(lin_in(x))))


@pytest.mark.parametrize("kwargs, act", [(dict(glu=True), F.gelu), (dict(glu=True, swish=True), F.silu)])
def test_glu_formula(kwargs, act):
    ff = FeedForward(8, mult=2, **kwargs)
    proj, lin_out = ff.ff[0].proj, ff.ff[-1]
    value, gate = proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(ff(x), lin_out(value * act(gate)))


def test_glu_mult_bias_is_learned_per_feature():
    glu = GLU(8, 6, F.silu, mult_bias=True)
    assert glu.mult_bias.shape == (6,)
    before = glu(x)
    glu.mult_bias.data.fill_(2.0)
    torch.testing.assert_close(glu(x), 2 * before)


def test_state_dict_layout():
    assert list(FeedForward(8).state_dict()) == ["ff.0.0.weight", "ff.0.0.bias", "ff.2.weight", "ff.2.bias"]
    keys = list(FeedForward(8, glu=True, post_act_ln=True, no_bias=True, glu_mult_bias=True).state_dict())
    assert keys == ["ff.0.mult_bias", "ff.0.proj.weight", "ff.0.proj.bias", "ff.1.gamma", "ff.3.weight"]


def test_options():
    assert FeedForward(8, dim_out=3)(x).shape == (2, 5, 3)
    assert FeedForward(8, mult=1.5).ff[0][0].out_features == 12
    assert (FeedForward(8, zero_init_output=True)(x) == 0).all()
    assert all(m.bias is None for m in FeedForward(8, no_bias=True).modules() if isinstance(m, torch.nn.Linear))
    torch.testing.assert_close(ReluSquared()(torch.tensor([-1.0, 3.0])), torch.tensor([0.0, 9.0]))
    with pytest.raises(TypeError, match="unknown_flag"):
        FeedForward(8, unknown_flag=True)
