"""Generate parity fixtures for the building blocks from the upstream x-transformers 2.0.1 release.

Run with the interpreter of a virtual environment that has the PyPI release installed (not this repository):

    upvenv/bin/python scripts/make_block_fixtures.py

For every case below it builds the upstream block, randomizes its parameters, runs it on seeded inputs and
saves (kwargs, state dict, outputs) into tests/fixtures/blocks/<group>.pt. The tests build our block
from the same spec, load the state dict with strict=True, rebuild the seeded inputs and compare outputs.
The spec helpers (`cases`, `build`, `run`, `check_parity`) are shared with the tests, so both sides
interpret a case the same way.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "blocks"

B, H, N, D = 2, 4, 5, 4  # attention shapes: batch, heads, sequence, head dim
DIM = 8  # model dim for the other blocks


class KwargsLinear(nn.Linear):
    """nn.Linear that ignores extra forward kwargs (wrappers like ShiftTokens pass `mask=` through)."""

    def forward(self, x, **kwargs):
        return super().forward(x)


# case spec helpers


def g(seed, *shape, kind="randn"):
    """A seeded input tensor."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(*shape, generator=gen)
    if kind == "tokens":
        return torch.randint(0, 10, shape, generator=gen)
    if kind == "bool":
        return torch.rand(*shape, generator=gen) > 0.3
    raise ValueError(kind)


def case(group, name, cls, kwargs=None, args=(), call_kwargs=None, method="forward", randomize=True):
    """One fixture case; `cls` names a class or function, looked up in a namespace (ours or upstream's)."""
    return dict(
        group=group,
        name=name,
        cls=cls,
        kwargs=kwargs or {},
        args=list(args),
        call_kwargs=call_kwargs or {},
        method=method,
        randomize=randomize,
    )


def qkv(kv_heads=H, i=N, j=N, d=D, seed=0):
    return [g(seed, B, H, i, d), g(seed + 1, B, kv_heads, j, d), g(seed + 2, B, kv_heads, j, d)]


def key_padding_mask(j=N):
    # right padding; the second sequence keeps 3 keys
    mask = torch.ones(B, j, dtype=torch.bool)
    mask[1, 3:] = False
    return mask


def cases():
    """Every fixture case: (group, name, block, constructor kwargs, forward args / kwargs, method)."""
    out = []

    def add(group, name, cls, kwargs=None, args=(), call_kwargs=None, method="forward", randomize=True):
        out.append(case(group, name, cls, kwargs, args, call_kwargs, method, randomize))

    # norms
    x = g(1, B, N, DIM)
    for unit_offset in (False, True):
        for cls in ("LayerNorm", "ScaleNorm", "RMSNorm"):
            add("norms", f"{cls}_offset{unit_offset}", cls, dict(dim=DIM, unit_offset=unit_offset), [x])
    add("norms", "SimpleRMSNorm", "SimpleRMSNorm", dict(dim=DIM), [x])
    add("norms", "MultiheadRMSNorm", "MultiheadRMSNorm", dict(dim=D, heads=H), [g(2, B, H, N, D)])
    for cls in ("AdaptiveLayerNorm", "AdaptiveRMSNorm"):
        add("norms", f"{cls}_cond2d", cls, dict(dim=DIM, dim_condition=3), [x], dict(condition=g(3, B, 3)))
        add("norms", f"{cls}_cond3d", cls, dict(dim=DIM), [x], dict(condition=g(4, B, N, DIM)))

    # feedforward
    feedforwards = dict(
        gelu=dict(),
        swiglu_multbias=dict(glu=True, swish=True, glu_mult_bias=True),
        geglu=dict(glu=True, mult=2, dim_out=6),
        relu2_postln_nobias=dict(relu_squared=True, post_act_ln=True, no_bias=True),
        zero_init=dict(zero_init_output=True, swish=True),
    )
    for name, kwargs in feedforwards.items():
        add("feedforward", name, "FeedForward", dict(dim=DIM, **kwargs), [x])

    # residual family and wrappers around a block `fn`
    res = g(5, B, N, DIM)
    add("residual", "Residual", "Residual", dict(dim=DIM), [x, res])
    scaled = dict(dim=DIM, scale_residual=True, scale_residual_constant=0.5)
    add("residual", "Residual_scaled", "Residual", scaled, [x, res])
    add("residual", "GRUGating", "GRUGating", dict(dim=DIM, scale_residual=True), [x, res])
    streams = g(6, B * 2, N, DIM)
    hc = dict(dim=DIM, layer_index=3, num_residual_streams=2)
    add("residual", "HyperConnection_prepare", "HyperConnection", hc, [streams], method="prepare")
    hc_views = dict(hc, num_input_views=3)
    add("residual", "HyperConnection_views3_prepare", "HyperConnection", hc_views, [streams], method="prepare")
    hc_args = [x, g(7, B, N, 2, DIM)]
    add("residual", "HyperConnection_forward", "HyperConnection", hc, hc_args, dict(beta=g(8, B, N, 2)))
    fn = dict(fn=("linear", DIM, DIM))
    add("residual", "Scale", "Scale", dict(value=0.5, **fn), [x])
    add("residual", "LayerScale", "LayerScale", dict(dim=DIM, init_value=0.1, unit_offset=True, **fn), [x])
    ada = dict(dim=DIM, dim_condition=3, **fn)
    add("residual", "AdaptiveLayerScale", "AdaptiveLayerScale", ada, [x], dict(condition=g(3, B, 3)))
    add("residual", "ShiftTokens", "ShiftTokens", dict(shifts=(0, 1, -1), **fn), [x])
    shift_mask = dict(mask=key_padding_mask())
    add("residual", "ShiftTokens_mask", "ShiftTokens", dict(shifts=(1, 2), **fn), [x], shift_mask)
    add("residual", "FoldAxially", "FoldAxially", dict(axial_dim=3, **fn), [g(9, B, 7, DIM)])

    # positional: embeddings
    tokens = g(10, B, N, kind="tokens")
    add("positional", "TokenEmbedding", "TokenEmbedding", dict(dim=DIM, num_tokens=10), [tokens])
    add("positional", "TokenEmbedding_l2", "TokenEmbedding", dict(dim=DIM, num_tokens=10, l2norm_embed=True), [tokens])
    absolute = dict(dim=DIM, max_seq_len=8)
    add("positional", "AbsolutePositionalEmbedding", "AbsolutePositionalEmbedding", absolute, [x])
    start = dict(seq_start_pos=torch.tensor([0, 2]))
    absolute_l2 = dict(absolute, l2norm_embed=True)
    add("positional", "AbsolutePositionalEmbedding_l2_start", "AbsolutePositionalEmbedding", absolute_l2, [x], start)
    add("positional", "ScaledSinusoidalEmbedding", "ScaledSinusoidalEmbedding", dict(dim=DIM), [x])
    custom_pos = dict(pos=torch.arange(3, 3 + N))
    sinu = dict(dim=DIM, theta=100)
    add("positional", "ScaledSinusoidalEmbedding_pos", "ScaledSinusoidalEmbedding", sinu, [x], custom_pos)

    # positional: biases on the logits
    for causal in (False, True):
        t5 = dict(scale=2.0, causal=causal, num_buckets=8, max_distance=20, heads=2)
        add("positional", f"RelativePositionBias_causal{causal}", "RelativePositionBias", t5, [24, 24])
        add("positional", f"RelativePositionBias_causal{causal}_cached", "RelativePositionBias", t5, [3, 24])
    dpb = dict(dim=DIM, heads=2, depth=2)
    add("positional", "DynamicPositionBias", "DynamicPositionBias", dpb, [N, N])
    dpb_log = dict(dim=DIM, heads=2, depth=3, log_distance=True, norm=True)
    add("positional", "DynamicPositionBias_log_norm", "DynamicPositionBias", dpb_log, [N, N])
    add("positional", "AlibiPositionalBias", "AlibiPositionalBias", dict(heads=4), [N, N])
    partial_alibi = dict(heads=3, total_heads=4)
    add("positional", "AlibiPositionalBias_partial_cached", "AlibiPositionalBias", partial_alibi, [2, 6])
    pos = torch.tensor([[0, 1, 3, 7], [0, 2, 2, 5]])
    custom = dict(method="forward_custom_pos")
    alibi_partial = dict(heads=6, total_heads=8)
    add("positional", "AlibiPositionalBias_custom_pos", "AlibiPositionalBias", alibi_partial, [pos], **custom)
    slopes = dict(heads=2, slopes=[0.5, 0.25])
    pos_ij = [torch.arange(4), torch.arange(6)]
    add("positional", "AlibiPositionalBias_slopes_custom_pos", "AlibiPositionalBias", slopes, pos_ij, **custom)
    for causal in (True, False):
        dda = dict(dim=DIM, heads=2, causal=causal, post_log_scale=0.5)
        add("positional", f"DataDependentAlibi_causal{causal}", "DataDependentAlibi", dda, [x])
    per_row = dict(dim=DIM, heads=2, dim_head=4)
    add("positional", "PerRowDataDependentAlibi", "PerRowDataDependentAlibi", per_row, [x])
    cope_args = [g(12, B, H, N, D), g(11, B, H, N, N) * 2]
    for name, kwargs in dict(plain=dict(), talking_heads=dict(talking_heads=True)).items():
        add("positional", f"CoPE_{name}", "CoPE", dict(dim=D, heads=H, max_pos=3, **kwargs), cope_args)

    # positional: rotary
    positions = torch.tensor([[0, 1, 2, 5, 9], [3, 4, 5, 6, 7]])
    rotaries = dict(
        plain=dict(),
        xpos=dict(use_xpos=True, scale_base=16),
        interp_ntk=dict(interpolation_factor=2.0, base_rescale_factor=2.0),
    )
    for name, kwargs in rotaries.items():
        rotary = dict(dim=DIM, **kwargs)
        add("positional", f"RotaryEmbedding_{name}", "RotaryEmbedding", rotary, [N], method="forward_from_seq_len")
        add("positional", f"RotaryEmbedding_{name}_pos", "RotaryEmbedding", rotary, [positions])
    fixed = dict(randomize=False)
    add("positional", "rotate_half", "rotate_half", args=[g(13, B, H, N, D)], **fixed)
    freqs, xpos_scale = g(14, 1, 7, 6), g(16, 1, 7, 6).abs()
    t = g(15, B, H, N, DIM)
    add("positional", "apply_rotary_pos_emb_partial", "apply_rotary_pos_emb", args=[t, freqs], **fixed)
    add("positional", "apply_rotary_pos_emb_xpos", "apply_rotary_pos_emb", args=[t, freqs, xpos_scale], **fixed)
    t3, freqs3 = g(17, B, N, DIM), g(18, B, N, DIM)
    add("positional", "apply_rotary_pos_emb_3d", "apply_rotary_pos_emb", args=[t3, freqs3], **fixed)

    # attend, on both paths
    mask = key_padding_mask()
    bias = g(20, H, N, N)
    attend = dict(heads=H, scale=0.7)
    attn_mask_4d = g(21, B, 1, N, N, kind="bool") | torch.eye(N, dtype=torch.bool)
    for flash in (False, True):
        tag = "flash" if flash else "math"
        common = dict(attend, flash=flash)
        causal = dict(common, causal=True)
        add("attend", f"{tag}_plain", "Attend", common, qkv())
        add("attend", f"{tag}_default_scale", "Attend", dict(heads=H, flash=flash), qkv())
        add("attend", f"{tag}_mask", "Attend", common, qkv(), dict(mask=mask))
        add("attend", f"{tag}_causal", "Attend", causal, qkv())
        add("attend", f"{tag}_causal_mask_bias", "Attend", causal, qkv(), dict(mask=mask, attn_bias=bias))
        add("attend", f"{tag}_bias", "Attend", common, qkv(), dict(attn_bias=bias))
        add("attend", f"{tag}_causal_cached", "Attend", causal, qkv(i=2, j=N))
        add("attend", f"{tag}_causal_cached_mask", "Attend", causal, qkv(i=2, j=N), dict(mask=mask))
        add("attend", f"{tag}_gqa", "Attend", causal, qkv(kv_heads=2))
        add("attend", f"{tag}_one_kv_head", "Attend", common, qkv(kv_heads=1), dict(mask=mask))
        zero_kv = dict(common, add_zero_kv=True)
        add("attend", f"{tag}_zero_kv", "Attend", zero_kv, qkv(), dict(mask=mask, attn_bias=bias))
        add("attend", f"{tag}_l2_distance", "Attend", dict(common, l2_distance=True), qkv(), dict(mask=mask))
        add("attend", f"{tag}_attn_mask_4d", "Attend", common, qkv(), dict(mask=attn_mask_4d))

    # attend, math path only features
    def math(name, call_kwargs=None, inputs=None, **kwargs):
        add("attend", f"math_{name}", "Attend", dict(attend, **kwargs), inputs or qkv(), call_kwargs)

    math("qk_norm", dict(mask=mask), scale=10.0, qk_norm=True)
    math("prev_attn", dict(prev_attn=g(22, B, H, N, N)))
    math("talking_heads", dict(mask=mask), pre_talking_heads=True, post_talking_heads=True)
    math("pre_scale_post_talking_heads", pre_scale_post_talking_heads=True, causal=True)
    math("sparse_topk", dict(mask=mask), sparse_topk=2)
    math("sparse_topk_st", sparse_topk=3, sparse_topk_straight_through=True, causal=True)
    math("hard", dict(mask=mask), hard=True)
    math("sigmoid", dict(mask=mask), sigmoid=True)
    math("softclamp", dict(attn_bias=bias), softclamp_logits=True, logit_softclamp_value=1.5)
    math("selective", causal=True, selective=True)
    math("selective_cached", inputs=qkv(i=3, j=N), causal=True, selective=True)
    cope = dict(dim=D, heads=H, max_pos=3)
    math("cope", causal=True, cope=cope)
    math("cope_talking_heads", causal=True, cope=dict(cope, talking_heads=True))
    return out


# building and running a case, for either implementation


def build(spec, ns):
    """Build the block of `spec` from the namespace `ns` (name -> class or function)."""
    obj = ns[spec["cls"]]
    if not isinstance(obj, type):
        return obj

    kwargs = dict(spec["kwargs"])
    if "fn" in kwargs:
        _, dim_in, dim_out = kwargs.pop("fn")
        kwargs["fn"] = KwargsLinear(dim_in, dim_out)
    if isinstance(kwargs.get("cope"), dict):
        kwargs["cope"] = ns["CoPE"](**kwargs["cope"])
    return obj(**kwargs)


def run(spec, block):
    fn = block if not isinstance(block, nn.Module) else getattr(block, spec["method"])
    with torch.no_grad():
        return flatten_output(fn(*spec["args"], **spec["call_kwargs"]))


def flatten_output(out):
    """The tensors of an output, in order: tuples / lists / dicts recursively; of an Intermediates, the pre- and
    post-softmax attention (qk_similarities is left out to keep the fixtures small, tests check it directly)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (int, float)):
        return [torch.tensor(float(out))]
    if hasattr(out, "to_tuple"):
        return [t for t in out.to_tuple()[1:] if t is not None]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in flatten_output(out[key])]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in flatten_output(item)]
    if out is None:
        return []
    raise TypeError(f"cannot flatten output of type {type(out)}")


def randomize_(block, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5 + (param.mean() if param.numel() > 1 else 0))


def our_namespace():
    from x_transformers import attend, feedforward, norms, positional, residual, token_shift

    ns = {}
    for module in (attend, feedforward, norms, positional, residual, token_shift):
        ns.update({name: getattr(module, name) for name in dir(module) if not name.startswith("_")})
    return ns


def load_cases(group, fixture_dir=FIXTURE_DIR):
    """(spec, record) pairs of a fixture group, specs rebuilt by cases() (which recreates the inputs)."""
    records = torch.load(fixture_dir / f"{group}.pt", weights_only=True)
    specs = [spec for spec in cases() if spec["group"] == group]
    missing = sorted(set(records) - {spec["name"] for spec in specs})
    if missing:
        raise KeyError(f"fixture cases without a spec in cases(): {missing}")
    return [(spec, records[spec["name"]]) for spec in specs if spec["name"] in records]


def check_parity(spec, record, ns, rtol=1e-4, atol=1e-5):
    """Build our block, load upstream's state dict strictly, and compare every output tensor."""
    block = build(spec, ns)
    if isinstance(block, nn.Module):
        ours = {key: tuple(value.shape) for key, value in block.state_dict().items()}
        theirs = {key: tuple(value.shape) for key, value in record["state_dict"].items()}
        assert ours == theirs, f"state dict differs from upstream: ours {ours}, upstream {theirs}"
        block.load_state_dict(record["state_dict"], strict=True)
        block.eval()
    outputs = run(spec, block)
    expected = record["expected"]
    assert len(outputs) == len(expected), f"{len(outputs)} output tensors, upstream gives {len(expected)}"
    for index, (out, exp) in enumerate(zip(outputs, expected)):
        assert out.shape == exp.shape, f"output {index}: shape {tuple(out.shape)} != upstream {tuple(exp.shape)}"
        torch.testing.assert_close(out.to(exp.dtype), exp, rtol=rtol, atol=atol, msg=lambda m: f"output {index}: {m}")


def upstream_namespace():
    import x_transformers
    import x_transformers.attend as up_attend
    import x_transformers.x_transformers as up

    repo_root = FIXTURE_DIR.parent.parent.parent
    if Path(x_transformers.__file__).resolve().is_relative_to(repo_root):
        raise SystemExit("run this with the upstream release's interpreter (e.g. upvenv/bin/python)")
    ns = {name: getattr(up, name) for name in dir(up)}
    ns.update(Attend=up_attend.Attend, Intermediates=up_attend.Intermediates)
    return ns


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=FIXTURE_DIR)
    args = parser.parse_args()

    torch.manual_seed(0)
    ns = upstream_namespace()
    groups = {}
    for index, spec in enumerate(cases()):
        block = build(spec, ns)
        if isinstance(block, nn.Module) and spec["randomize"]:
            randomize_(block, seed=index)
        block.eval() if isinstance(block, nn.Module) else None
        # inputs are not stored: cases() rebuilds them from their seeds on the test side
        record = dict(
            kwargs=copy.deepcopy(spec["kwargs"]),
            state_dict=block.state_dict() if isinstance(block, nn.Module) else {},
            expected=run(spec, block),
        )
        groups.setdefault(spec["group"], {})[spec["name"]] = record

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for group, specs in groups.items():
        path = args.out_dir / f"{group}.pt"
        # the legacy format stores small tensors with far less per-tensor overhead than the zip format
        torch.save(specs, path, _use_new_zipfile_serialization=False)
        print(f"{path}: {len(specs)} cases, {path.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
