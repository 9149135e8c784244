"""Fast paths of the default softmax layer.

- without flash, Attend routes to F.scaled_dot_product_attention when no feature needs the logits: same outputs
  and gradients as the explicit path (fp32; masks, causal, biases, grouped kv heads, kv cache);
- attention maps still come back (computed when read) and equal the explicit path's; logit-level features and
  residual attention keep the explicit path;
- rotary through RotaryTable (one table per forward, q and k rotated together) equals the textbook formula;
- a training step of the default layer stays under a measured op count, and compiles without graph breaks.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from x_transformers import AutoregressiveWrapper, Decoder, Encoder, TransformerWrapper
from x_transformers.attend import Attend
from x_transformers.positional import RotaryEmbedding, RotaryTable, rotate_half

NUM_TOKENS, SEQ = 32, 12

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "count_ops.py"
_spec = importlib.util.spec_from_file_location("count_ops", _SCRIPT)
count_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(count_ops)


def force_explicit(monkeypatch):
    monkeypatch.setattr(Attend, "use_sdpa", lambda self, prev_attn=None: False)


def build(layers=Decoder, seed=0, **kwargs):
    torch.manual_seed(seed)
    return TransformerWrapper(
        num_tokens=NUM_TOKENS,
        max_seq_len=SEQ,
        attn_layers=layers(dim=32, depth=2, heads=4, attn_dim_head=8, **kwargs),
    )


def logits_and_grads(model, x, **kwargs):
    model.zero_grad()
    logits = model(x, **kwargs)
    logits.square().mean().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def count_sdpa_calls(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


CONFIGS = dict(
    rotary=(Decoder, dict(rotary_pos_emb=True)),
    rotary_full_dim=(Decoder, dict(rotary_pos_emb=True, rotary_emb_dim=8)),
    rotary_xpos=(Decoder, dict(rotary_pos_emb=True, rotary_xpos=True)),
    rotary_gqa=(Decoder, dict(rotary_pos_emb=True, attn_kv_heads=2)),
    rotary_qk_norm=(Decoder, dict(rotary_pos_emb=True, attn_qk_norm=True)),
    alibi=(Decoder, dict(alibi_pos_bias=True)),
    encoder=(Encoder, dict()),
    encoder_t5=(Encoder, dict(rel_pos_bias=True)),
)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_route_matches_explicit_path(name, masked, monkeypatch):
    layers, kwargs = CONFIGS[name]
    model = build(layers, **kwargs)
    x = torch.randint(0, NUM_TOKENS, (3, SEQ))
    mask = None
    if masked:
        mask = torch.ones(3, SEQ, dtype=torch.bool)
        mask[1, SEQ // 2 :] = False
        mask[2, :3] = False

    calls = count_sdpa_calls(monkeypatch)
    fast = logits_and_grads(model, x, mask=mask)
    assert len(calls) == 2

    force_explicit(monkeypatch)
    ref = logits_and_grads(model, x, mask=mask)
    assert len(calls) == 2

    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=1e-5)
    assert fast[1].keys() == ref[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(fast[1][name], ref[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", ["rotary", "rotary_xpos", "rotary_gqa", "alibi"])
def test_kv_cache_matches_explicit_path(name, monkeypatch):
    layers, kwargs = CONFIGS[name]
    model = build(layers, **kwargs).eval()
    prompts = torch.randint(0, NUM_TOKENS, (2, 4))

    with torch.no_grad():
        # the cache holds keys before rotary: cached logits equal a full forward
        logits, cache = model(prompts, return_intermediates=True)
        nxt = torch.cat((prompts, logits[:, -1:].argmax(dim=-1)), dim=-1)
        cached = model(nxt, cache=cache)[:, -1]
        full = model(nxt)[:, -1]
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)

    wrapper = AutoregressiveWrapper(model)
    fast = wrapper.generate(prompts, 6, temperature=0.0, cache_kv=True, fast_decode=False)
    force_explicit(monkeypatch)
    ref = wrapper.generate(prompts, 6, temperature=0.0, cache_kv=True, fast_decode=False)
    assert torch.equal(fast, ref)


def test_attention_maps_are_the_explicit_paths(monkeypatch):
    model = build(Decoder, rotary_pos_emb=True)
    x = torch.randint(0, NUM_TOKENS, (2, SEQ))

    _, maps = model(x, return_attn=True)
    _, inter = model(x, return_intermediates=True)
    force_explicit(monkeypatch)
    _, ref_maps = model(x, return_attn=True)
    _, ref_inter = model(x, return_intermediates=True)

    assert len(maps) == 2 and maps[0].shape == (2, 4, SEQ, SEQ)
    for got, ref in zip(maps, ref_maps):
        torch.testing.assert_close(got, ref)
    for got, ref in zip(inter.attn_intermediates, ref_inter.attn_intermediates):
        for a, b in zip(got.to_tuple(), ref.to_tuple()):
            torch.testing.assert_close(a, b)


def test_attention_maps_are_formed_only_when_read():
    model = build(Decoder, rotary_pos_emb=True)
    x = torch.randint(0, NUM_TOKENS, (2, SEQ))

    counter = count_ops.OpCounter()
    with counter:
        _, inter = model(x, return_intermediates=True)
    assert "_softmax" not in counter.counts and "bmm" not in counter.counts

    first = inter.attn_intermediates[0]
    assert first.attn_maps_fn is not None
    with counter:
        attn = first.post_softmax_attn
    assert counter.counts["_softmax"] == 1
    assert first.attn_maps_fn is None and first.pre_softmax_attn is not None
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(2, 4, SEQ))


def test_walking_dataclass_fields_does_not_form_attention_maps(tmp_path):
    """FSDP2 walks the dataclass fields of each wrapped block's output to hook its tensors for backward; the maps are
    attributes outside those fields, so a sharded training forward never forms them (it did: a (b, h, n, n) map per
    layer on every forward). Positional construction keeps upstream's field order."""
    import dataclasses

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from x_transformers.attend import Intermediates

    assert {f.name for f in dataclasses.fields(Intermediates)}.isdisjoint(
        {"qk_similarities", "pre_softmax_attn", "post_softmax_attn"}
    )
    maps = [torch.randn(1, 1, 2, 2) for _ in range(3)]
    inter = Intermediates(*maps, None, None, "a")
    assert inter.to_tuple() == tuple(maps) and inter.layer_type == "a" and Intermediates().post_softmax_attn is None

    model = build(Decoder, rotary_pos_emb=True)
    x = torch.randint(0, NUM_TOKENS, (2, SEQ))
    reference = model(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))  # CPU weights, also on a machine with a GPU
        for layer in model.attn_layers.layers:
            fully_shard(layer[1], mesh=mesh)
        fully_shard(model, mesh=mesh)
        counter = count_ops.OpCounter()
        with counter:
            out = model(x)
            out.sum().backward()
    finally:
        dist.destroy_process_group()
    assert "_softmax" not in counter.counts and "bmm" not in counter.counts, counter.counts
    torch.testing.assert_close(out, reference)


def test_attn_z_loss_and_its_gradients_match(monkeypatch):
    model = build(Decoder, rotary_pos_emb=True)
    wrapper = AutoregressiveWrapper(model, add_attn_z_loss=True)
    x = torch.randint(0, NUM_TOKENS, (2, SEQ + 1))

    def loss_and_grads():
        model.zero_grad()
        loss = wrapper(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fast = loss_and_grads()
    force_explicit(monkeypatch)
    ref = loss_and_grads()
    torch.testing.assert_close(fast[0], ref[0])
    for a, b in zip(fast[1], ref[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(attn_pre_talking_heads=True),
        dict(attn_sparse_topk=4),
        dict(attn_softclamp_logits=True),
        dict(attn_use_cope=True),
        dict(attn_sigmoid=True),
        dict(attn_l2_distance=True),
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_logit_features_keep_the_explicit_path(kwargs, monkeypatch):
    model = build(Decoder, **kwargs)
    calls = count_sdpa_calls(monkeypatch)
    logits, maps = model(torch.randint(0, NUM_TOKENS, (2, SEQ)), return_attn=True)
    assert len(calls) == 0
    assert all(m.shape == (2, 4, SEQ, SEQ) for m in maps)
    assert torch.isfinite(logits).all()


def test_residual_attention_reads_the_first_layers_logits(monkeypatch):
    # the first layer has no previous logits and takes SDPA, the next reads its (lazily formed) logits explicitly
    model = build(Decoder, residual_attn=True)
    x = torch.randint(0, NUM_TOKENS, (2, SEQ))
    calls = count_sdpa_calls(monkeypatch)
    fast = logits_and_grads(model, x)
    assert len(calls) == 1
    force_explicit(monkeypatch)
    ref = logits_and_grads(model, x)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=1e-5)
    for name in ref[1]:
        torch.testing.assert_close(fast[1][name], ref[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_attend_routing():
    assert Attend(causal=True).use_sdpa()
    assert not Attend(causal=True).use_sdpa(prev_attn=torch.zeros(1))
    assert Attend(heads=4, post_talking_heads=True).logit_features == ["talking_heads"]
    assert Attend(custom_attn_fn=F.softmax).logit_features == ["custom_attn_fn"]


# rotary


def reference_rotary(t, freqs, scale=1.0):
    # the textbook form: rotate the first rot_dim features, pass the rest through
    rot_dim = freqs.shape[-1]
    freqs = freqs[:, -t.shape[-2] :]
    if isinstance(scale, torch.Tensor):
        scale = scale[:, -t.shape[-2] :]
    if t.ndim == 4:
        freqs = freqs[:, None]
        scale = scale[:, None] if isinstance(scale, torch.Tensor) else scale
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    t = t * freqs.cos() * scale + rotate_half(t) * freqs.sin() * scale
    return torch.cat((t, t_pass), dim=-1)


@pytest.mark.parametrize(
    "rot_dim, xpos, ndim, n", [(8, False, 4, 10), (4, False, 4, 3), (8, True, 4, 10), (4, True, 3, 4)]
)
def test_rotary_table_matches_reference(rot_dim, xpos, ndim, n):
    torch.manual_seed(0)
    rotary = RotaryEmbedding(rot_dim, use_xpos=xpos, scale_base=8)
    freqs, scale = rotary(torch.arange(10))
    t = torch.randn(2, 3, n, 8) if ndim == 4 else torch.randn(2, n, 8)
    table = RotaryTable(freqs, scale)
    q_scale, k_scale = (scale, scale**-1) if xpos else (1.0, 1.0)
    torch.testing.assert_close(table.rotate(t), reference_rotary(t, freqs, q_scale))
    torch.testing.assert_close(table.rotate(t, keys=True), reference_rotary(t, freqs, k_scale))
    # bf16 in, bf16 out, computed in float32
    out = table.rotate(t.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), reference_rotary(t.bfloat16().float(), freqs, q_scale), atol=2e-2, rtol=1e-2
    )


def test_rotary_table_rejects_a_wider_rotary_dimension():
    table = RotaryTable(RotaryEmbedding(16)(torch.arange(4))[0])
    with pytest.raises(ValueError, match="rotary dimension 16"):
        table.rotate(torch.randn(1, 4, 8))


# structure: op counts and compile


# measured with torch 2.13 on CPU under bf16 autocast (benchmarks/count_ops.py): one default layer (rotary
# decoder) was 61 forward / 67 backward ops before the fast paths
MAX_LAYER_OPS = dict(forward=26, backward=36)


def test_default_layer_op_count():
    result = count_ops.main(["--dim", "32", "--depth", "1", "--heads", "2", "--batch", "1", "--seq-len", "16"])
    for phase, bound in MAX_LAYER_OPS.items():
        assert result["per_layer"][phase]["total"] <= bound, result["per_layer"][phase]["by_op"]
    # no materialized mask, no explicit softmax, no partial-rotary slicing
    ops = {**result["per_layer"]["forward"]["by_op"], **result["per_layer"]["backward"]["by_op"]}
    for name in ("masked_fill", "_softmax", "slice_backward", "stack", "bmm"):
        assert name not in ops, name


@pytest.mark.parametrize("kwargs", [
    dict(), dict(linear_attn="gated_deltanet"), dict(linear_attn="gated_deltanet", hybrid_pattern="LN"),
    dict(linear_attn="mamba2"),
], ids=["softmax", "gated_deltanet", "hybrid", "mamba2"])
def test_default_stack_compiles_without_graph_breaks(kwargs):
    """One graph for the whole training forward (the CPU paths of the mixers; on CUDA their Triton kernels)."""
    torch._dynamo.reset()
    wrapper = AutoregressiveWrapper(build(Decoder, rotary_pos_emb=True, **kwargs))
    explanation = torch._dynamo.explain(wrapper)(torch.randint(0, NUM_TOKENS, (2, SEQ + 1)))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_default_layer_takes_the_flash_kernel(monkeypatch):
    # the jointly rotated q, k are strided views of one buffer: the flash kernel must take them as they are
    torch.manual_seed(0)
    model = TransformerWrapper(
        num_tokens=256, max_seq_len=256, attn_layers=Decoder(dim=128, depth=2, heads=2, rotary_pos_emb=True)
    ).cuda()
    x = torch.randint(0, 256, (2, 256), device="cuda")

    def run():
        model.zero_grad()
        counter = count_ops.OpCounter()
        with counter, torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
            logits.float().square().mean().backward()
        return logits.float(), [p.grad.float() for p in model.parameters()], counter.counts

    logits, grads, counts = run()
    assert counts["_scaled_dot_product_flash_attention"] == 2
    assert counts["_scaled_dot_product_flash_attention_backward"] == 2

    # bf16 on both paths: compare by relative error
    force_explicit(monkeypatch)
    ref_logits, ref_grads, _ = run()
    for got, ref in zip([logits, *grads], [ref_logits, *ref_grads]):
        assert (got - ref).norm() <= 0.05 * ref.norm() + 1e-6
