"""Write parity fixtures for `x_transformers.attention.Attention` from the upstream x-transformers 2.0.1 release.

Run with the separate upstream environment (the PyPI release installed, not this repository):

    upvenv/bin/python scripts/make_attention_fixtures.py

Each fixture is one tiny `Attention` config: constructor kwargs, the upstream state dict, inputs, forward kwargs
and the upstream output. `tests/test_attention.py` loads the state dict into our module with strict=True and
compares outputs.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the upstream package must win over this repository's package of the same name
sys.path = [p for p in sys.path if Path(p or '.').resolve() != REPO]

import torch  # noqa: E402
from torch import nn  # noqa: E402
from x_transformers.x_transformers import Attention, RotaryEmbedding  # noqa: E402

DIM, HEADS, DIM_HEAD = 16, 4, 4
BATCH, SEQ = 2, 6

# name -> (constructor kwargs, which extra forward inputs to build)
CONFIGS = {
    'plain': (dict(), ('mask',)),
    'causal': (dict(causal=True), ()),
    'gqa': (dict(causal=True, kv_heads=2), ()),
    'one_kv_head': (dict(one_kv_head=True, value_dim_head=6, dim_out=12), ('mask',)),
    'rotary': (dict(causal=True), ('rotary',)),
    'rotary_xpos_gqa': (dict(causal=True, kv_heads=2), ('rotary_xpos',)),
    'mla': (
        dict(
            causal=True,
            use_latent_q=True,
            dim_latent_q=8,
            use_latent_kv=True,
            dim_latent_kv=8,
            latent_rope_subheads=2,
        ),
        ('rotary',),
    ),
    'value_gating': (dict(gate_values=True, gate_value_heads=True, swiglu_values=True), ('mask',)),
    'memory_kv': (dict(causal=True, num_mem_kv=2), ()),
    'qk_norm': (dict(qk_norm=True, qk_norm_scale=8, qk_norm_dim_scale=True, num_mem_kv=1), ('mask',)),
    'talking_heads': (dict(pre_talking_heads=True, post_talking_heads=True, pre_scale_post_talking_heads=True), ()),
    'hybrid_gru': (dict(causal=True, hybrid_fold_axial_dim=2), ('hybrid_gru',)),
    'cross_attn_on_attn': (dict(dim_context=10, on_attn=True), ('context',)),
    'sparse_topk_laser_softclamp': (
        dict(sparse_topk=3, laser=True, softclamp_logits=True, logit_softclamp_value=4.0),
        (),
    ),
    'forgetting': (dict(causal=True, data_dependent_alibi=True), ()),
    'value_residual': (dict(causal=True, learned_value_residual_mix=True), ('value_residual',)),
    'sigmoid_head_scale': (dict(sigmoid=True, head_scale=True), ('mask',)),
    'hard_zero_kv': (dict(hard=True, add_zero_kv=True), ()),
    'l2_distance_max_past': (dict(causal=True, l2_distance=True, one_kv_head=True, max_attend_past=2), ()),
    'cope': (dict(causal=True, use_cope=True, cope_max_pos=4, cope_talking_heads=True), ()),
    'forgetting_per_row': (dict(causal=True, data_dependent_alibi=True, data_dependent_alibi_per_row=True), ()),
    'selective': (dict(causal=True, selective=True), ()),
    'partial_rotary_heads': (dict(causal=True, rotate_num_heads=2), ('rotary',)),
}


def hybrid_gru():
    return nn.GRU(DIM, HEADS * DIM_HEAD, batch_first=True)


def make_fixture(name, kwargs, extras):
    torch.manual_seed(sum(map(ord, name)))

    build_kwargs = dict(kwargs)
    if 'hybrid_gru' in extras:
        build_kwargs['hybrid_module'] = hybrid_gru()

    attn = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, **build_kwargs).eval()

    # move every parameter off its init (gates start open, talking heads at identity), so parity means something
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(torch.randn_like(param) * 0.2)

    x = torch.randn(BATCH, SEQ, DIM)
    forward_kwargs = dict()

    if 'mask' in extras:
        forward_kwargs['mask'] = torch.tensor([[True] * SEQ, [True, True, False, True, True, False]])
    if 'rotary' in extras:
        forward_kwargs['rotary_pos_emb'] = RotaryEmbedding(DIM_HEAD)(torch.arange(SEQ))
    if 'rotary_xpos' in extras:
        forward_kwargs['rotary_pos_emb'] = RotaryEmbedding(DIM_HEAD, use_xpos=True, scale_base=8)(torch.arange(SEQ))
    if 'context' in extras:
        forward_kwargs['context'] = torch.randn(BATCH, SEQ + 2, kwargs['dim_context'])
        forward_kwargs['context_mask'] = torch.tensor([[True] * (SEQ + 2), [True] * 5 + [False] * 3])
    if 'value_residual' in extras:
        forward_kwargs['value_residual'] = torch.randn(BATCH, HEADS, SEQ, DIM_HEAD)

    with torch.no_grad():
        out, intermediates = attn(x, return_intermediates=True, **forward_kwargs)

    return dict(
        kwargs=kwargs,
        extras=list(extras),
        dims=dict(dim=DIM, heads=HEADS, dim_head=DIM_HEAD),
        state_dict=attn.state_dict(),
        x=x,
        forward_kwargs=forward_kwargs,
        out=out,
        values=intermediates.values,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out-dir', type=Path, default=REPO / 'tests' / 'fixtures' / 'attention')
    args = parser.parse_args()

    assert version('x-transformers') == '2.0.1', 'run with the upstream 2.0.1 environment (upvenv/bin/python)'

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, (kwargs, extras) in CONFIGS.items():
        torch.save(make_fixture(name, kwargs, extras), args.out_dir / f'{name}.pt')

    total = sum(path.stat().st_size for path in args.out_dir.glob('*.pt'))
    print(f'wrote {len(CONFIGS)} fixtures to {args.out_dir} ({total / 1024:.0f} KB)')


if __name__ == '__main__':
    main()
