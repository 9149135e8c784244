"""Norms: parity with upstream 2.0.1 and their formulas."""

import importlib.util
from pathlib import Path

import pytest
import torch

from x_transformers.norms import (
    AdaptiveLayerNorm,
    AdaptiveRMSNorm,
    LayerNorm,
    MultiheadRMSNorm,
    RMSNorm,
    ScaleNorm,
    SimpleRMSNorm,
)

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_block_fixtures.py"
_spec = importlib.util.spec_from_file_location("make_block_fixtures", _SCRIPT)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

CASES = fixtures.load_cases("norms")


@pytest.mark.parametrize("spec, record", CASES, ids=[spec["name"] for spec, _ in CASES])
def test_parity_with_upstream(spec, record):
    fixtures.check_parity(spec, record, fixtures.our_namespace())


x = torch.randn(2, 5, 8) * 3 + 1


def test_rmsnorm_formula():
    norm = RMSNorm(8)
    torch.nn.init.normal_(norm.g)
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(norm(x), x / rms * norm.g)
    torch.testing.assert_close(SimpleRMSNorm(8)(x), x / rms)


def test_scalenorm_formula():
    norm = ScaleNorm(8)
    norm.g.data.fill_(2.0)
    torch.testing.assert_close(norm(x), x / x.norm(dim=-1, keepdim=True) * 8**0.5 * 2.0)


def test_layernorm_formula_and_no_bias():
    norm = LayerNorm(8)
    out = norm(x)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)
    assert list(dict(norm.named_parameters())) == ["gamma"]


@pytest.mark.parametrize("cls, name", [(LayerNorm, "gamma"), (RMSNorm, "g"), (ScaleNorm, "g")])
def test_unit_offset_stores_gain_minus_one(cls, name):
    plain, offset = cls(8), cls(8, unit_offset=True)
    assert (getattr(offset, name) == 0).all() and (getattr(plain, name) == 1).all()
    torch.testing.assert_close(offset(x), plain(x))


@pytest.mark.parametrize("adaptive, plain", [(AdaptiveLayerNorm, LayerNorm), (AdaptiveRMSNorm, RMSNorm)])
def test_adaptive_norms_start_as_plain_and_use_condition(adaptive, plain):
    norm = adaptive(8, dim_condition=3)
    condition = torch.randn(2, 3)
    torch.testing.assert_close(norm(x, condition=condition), plain(8)(x))
    torch.nn.init.normal_(norm.to_gamma.weight)
    per_sample = norm(x, condition=condition)
    per_token = norm(x, condition=condition[:, None].expand(2, 5, 3))
    torch.testing.assert_close(per_sample, per_token)
    assert not torch.allclose(per_sample, plain(8)(x))


def test_multihead_rmsnorm_gain_per_head():
    norm = MultiheadRMSNorm(4, heads=3)
    t = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(norm(t), SimpleRMSNorm(4)(t))
    norm.gamma.data[1] = 1.0
    torch.testing.assert_close(norm(t)[:, 1], 2 * SimpleRMSNorm(4)(t)[:, 1])


def test_zero_input_stays_finite():
    for norm in (RMSNorm(8), ScaleNorm(8), SimpleRMSNorm(8), LayerNorm(8)):
        assert torch.isfinite(norm(torch.zeros(1, 2, 8))).all()
