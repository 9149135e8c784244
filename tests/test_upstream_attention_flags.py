"""Attention flags of later x-transformers releases: qk / k / value rmsnorm, low-rank and headwise value gates, the
output gate (HyGA), learned attention sinks, sublayer dropout, depth-scaled output init.

Each flag: the outputs of the upstream release on the same weights (tests/fixtures/upstream/attention_flags.pt,
written by make_attention_flag_fixtures.py there), the SDPA path against the math path, cached decoding with both
caches, and its refusals.
"""

from pathlib import Path

import pytest
import torch

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper
from x_transformers.attention import Attention
from x_transformers.packing import build_packing

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "upstream" / "attention_flags.pt", weights_only=True)


def _cases():
    cases, offset = [], 0
    flat = FIXTURE["flat"]
    for name, record in FIXTURE["cases"].items():
        tensors = {}
        for key, shape in record["layout"]:
            size = torch.Size(shape).numel()
            tensors[key] = flat[offset:offset + size].reshape(shape)
            offset += size
        cases.append((name, record["kwargs"], tensors))
    assert offset == flat.numel()
    return cases


CASES = _cases()


@pytest.mark.parametrize("name, kwargs, tensors", CASES, ids=[name for name, _, _ in CASES])
def test_matches_upstream(name, kwargs, tensors):
    tensors = dict(tensors)
    x, expected = tensors.pop("__x__"), tensors.pop("__out__")
    model = Decoder(**FIXTURE["base"], **kwargs)
    # strict: the same parameters under the same names as upstream
    model.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        out = model.double().eval()(x.double())
    torch.testing.assert_close(out.float(), expected, rtol=1e-5, atol=1e-5)


def _perturbed_attention(**kwargs):
    torch.manual_seed(0)
    attn = Attention(8, dim_head=4, heads=2, causal=True, **kwargs)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return attn.double().eval()


FLAG_SETS = dict(
    qk_rmsnorm=dict(qk_rmsnorm=True),
    k_rmsnorm=dict(k_rmsnorm=True, kv_heads=1),
    value_rmsnorm=dict(value_rmsnorm=True),
    gates=dict(gate_values=True, gate_values_rank=2, output_gate=True, output_gate_headwise=True),
    sink=dict(head_learned_sink=True),
    sink_mem_kv=dict(head_learned_sink=True, num_mem_kv=1, kv_heads=1),
)


@pytest.mark.parametrize("flags", FLAG_SETS.values(), ids=FLAG_SETS.keys())
def test_sdpa_path_equals_math_path(flags):
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [False, False] + [True] * 4])
    math_attn = _perturbed_attention(**flags)
    sdpa_attn = _perturbed_attention(flash=True, **flags)
    sdpa_attn.load_state_dict(math_attn.state_dict())
    with torch.no_grad():
        expected = math_attn(x, mask=mask)
        out = sdpa_attn(x, mask=mask)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("flags", FLAG_SETS.values(), ids=FLAG_SETS.keys())
def test_token_by_token_cache_equals_parallel(flags):
    attn = _perturbed_attention(**flags)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = attn(x)
        out, cache = attn(x[:, :2], return_intermediates=True)
        outs = [out]
        for t in range(2, 5):
            out, cache = attn(x[:, t:t + 1], cache=cache, return_intermediates=True)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), expected)


@pytest.mark.parametrize("flags", [dict(head_learned_sink=True), dict(head_learned_sink=True, num_mem_kv=2)],
                         ids=["sink", "sink_mem_kv"])
def test_packed_documents_equal_separate_rows(flags):
    # the sink (and memory slots) in front of the keys belong to every packed document
    attn = _perturbed_attention(**flags)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x, pack=build_packing(1, 6, "cpu", seq_lens=[2, 4]))
        expected = torch.cat((attn(x[:, :2]), attn(x[:, 2:])), dim=1)
    torch.testing.assert_close(out, expected)


def test_sink_takes_weight_and_reads_nothing():
    attn = _perturbed_attention(head_learned_sink=True)
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        attn.attend.head_attn_sink.fill_(50.0)
        # all weight on the sink: the heads output zero, so only the output projection of zeros remains
        out = attn(x)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-12, rtol=0)


@pytest.mark.parametrize("layer_kwargs", [
    dict(attn_head_learned_sink=True, alibi_pos_bias=True),
    dict(attn_head_learned_sink=True, attn_max_attend_past=2, rotary_pos_emb=True),
    dict(attn_head_learned_sink=True, attn_flash=True, attn_kv_heads=2),
    dict(attn_head_learned_sink=True, residual_attn=True, attn_sparse_topk=3),
    dict(attn_qk_rmsnorm=True, attn_value_rmsnorm=True, attn_flash=True, rotary_pos_emb=True),
    dict(attn_output_gate=True, attn_output_gate_rank=4, attn_gate_values=True, attn_gate_values_headwise=True),
], ids=["sink_alibi", "sink_attend_past", "sink_flash_gqa", "sink_residual_attn_topk", "rmsnorm_flash", "gates"])
def test_static_and_plain_cache_decode_like_no_cache(layer_kwargs):
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=32, max_seq_len=32,
                             attn_layers=Decoder(dim=32, depth=2, heads=4, **layer_kwargs))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = AutoregressiveWrapper(net).eval()
    prompts = torch.randint(0, 32, (2, 4))
    expected = model.generate(prompts, 6, temperature=0.0, cache_kv=False)
    assert torch.equal(model.generate(prompts, 6, temperature=0.0, cache_kv=True, fast_decode=False), expected)
    assert torch.equal(model.generate(prompts, 6, temperature=0.0, cache_kv=True, fast_decode="eager"), expected)


def test_sublayer_dropout_and_depth_scaled_init():
    attn = Attention(8, dim_head=4, heads=2, sublayer_dropout=0.5)
    x = torch.randn(1, 64, 8)
    assert (attn.train()(x) == 0).any()
    torch.testing.assert_close(attn.eval()(x), attn.eval()(x))
    assert not (attn.eval()(x) == 0).any()

    torch.manual_seed(0)
    std = Attention(64, dim_head=32, heads=8, output_proj_depth=3).to_out.weight.std().item()
    assert abs(std - (2 * 256 * 3) ** -0.5) < 0.1 * std


@pytest.mark.parametrize("kwargs, message", [
    (dict(qk_rmsnorm=True, k_rmsnorm=True), "qk_rmsnorm or k_rmsnorm"),
    (dict(value_rmsnorm=True, kv_heads=1), "value_rmsnorm"),
    (dict(value_rmsnorm=True, value_dim_head=8), "value_rmsnorm"),
    (dict(gate_values=True, gate_values_headwise=True, gate_values_rank=2), "gate_values_rank"),
    (dict(output_gate=True, output_gate_headwise=True, output_gate_rank=2), "output_gate_rank"),
    (dict(output_gate=True, output_gate_rank=64), "rank"),
    (dict(head_learned_sink=True, l2_distance=True), "l2_distance"),
    (dict(head_learned_sink=True, softclamp_logits=True), "softclamp_logits"),
    (dict(head_learned_sink=True, laser=True), "laser"),
])
def test_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Attention(8, dim_head=4, heads=2, causal=True, **kwargs)
