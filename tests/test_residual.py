"""Residual variants and post-branch wrappers: parity with upstream 2.0.1 and their behaviour."""

import importlib.util
from pathlib import Path

import pytest
import torch

from x_transformers.residual import AdaptiveLayerScale, GRUGating, HyperConnection, LayerScale, Residual, Scale

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_block_fixtures.py"
_spec = importlib.util.spec_from_file_location("make_block_fixtures", _SCRIPT)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

CASES = fixtures.load_cases("residual")


@pytest.mark.parametrize("spec, record", CASES, ids=[spec["name"] for spec, _ in CASES])
def test_parity_with_upstream(spec, record):
    fixtures.check_parity(spec, record, fixtures.our_namespace())


x, res = torch.randn(2, 2, 5, 8).unbind(0)


class Double(torch.nn.Module):
    def forward(self, t, **kwargs):
        return 2 * t, "aux"


def test_residual_protocol_and_scaling():
    residual = Residual(8, scale_residual=True, scale_residual_constant=0.5)
    branch_input, kept, kwargs = residual.prepare(res)
    assert branch_input is res and kept is res and kwargs == {}
    residual.residual_scale.data.fill_(3.0)
    torch.testing.assert_close(residual(x, kept), x + 1.5 * res)
    torch.testing.assert_close(Residual(8)(x, res), x + res)


def test_gru_gating_is_a_gru_step():
    gate = GRUGating(8)
    expected = gate.gru(x.reshape(-1, 8), res.reshape(-1, 8)).reshape(2, 5, 8)
    torch.testing.assert_close(gate(x, res), expected)


def test_hyper_connections_start_as_plain_residual():
    # at init, with one stream per layer read and beta = 1, each layer's update is added to every stream
    streams = 3
    hc = HyperConnection(8, layer_index=4, num_residual_streams=streams)
    h = torch.randn(2 * streams, 5, 8)
    branch_input, residuals, kwargs = hc.prepare(h)
    per_stream = h.reshape(2, streams, 5, 8)
    # dynamic terms are zero at init: the block reads stream layer_index % streams
    torch.testing.assert_close(branch_input, per_stream[:, 4 % streams])
    out = hc(x, residuals, **kwargs).reshape(2, streams, 5, 8)
    torch.testing.assert_close(out, per_stream + x[:, None])


def test_hyper_connections_multiple_views():
    hc = HyperConnection(8, layer_index=0, num_residual_streams=2, num_input_views=3)
    branch_input, residuals, kwargs = hc.prepare(torch.randn(4, 5, 8))
    assert branch_input.shape == (3, 2, 5, 8) and residuals.shape == (2, 5, 2, 8)
    assert kwargs["beta"].shape == (2, 5, 2)


def test_scale_wrappers_scale_only_the_first_output():
    out, aux = Scale(0.5, Double())(x)
    torch.testing.assert_close(out, x)
    assert aux == "aux"
    layer_scale = LayerScale(Double(), 8, init_value=0.1)
    out, aux = layer_scale(x)
    torch.testing.assert_close(out, 0.2 * x)
    torch.testing.assert_close(LayerScale(Double(), 8, init_value=0.1, unit_offset=True)(x)[0], out)
    adaptive = AdaptiveLayerScale(Double(), 8, dim_condition=3)
    out, _ = adaptive(x, condition=torch.randn(2, 3))
    torch.testing.assert_close(out, 2 * x * torch.sigmoid(torch.tensor(-2.0)))
    assert isinstance(LayerScale(torch.nn.Identity(), 8)(x), torch.Tensor)
