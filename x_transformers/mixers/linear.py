"""Linear attention (arXiv:2006.16236) with an output norm in place of the denominator (TransNormer, arXiv:2210.10340).

`S_t = S_{t-1} + phi(k_t)^T v_t`, `o_t = phi(q_t) S_t`: the scalar-decay kernel with no gate. Non-causal (Encoder)
use is the same sum over the whole sequence: `o = phi(Q) (phi(K)^T V)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from x_transformers.mixers.base import (
    HeadOutput, Mixer, QKVProjection, masked_fill_zero, pick_state, run_kernel, upcast,
)
from x_transformers.ops import chunk_simple_gla, fused_recurrent_simple_gla

def identity(t):
    return t


def elu_plus_one(t):
    return F.elu(t) + 1.0


def softmax_last(t):
    return t.softmax(dim=-1)


# module-level functions, not lambdas: a model holding one must pickle (torch.save, deepcopy)
FEATURE_MAPS = {
    "identity": identity,
    "elu": elu_plus_one,
    "relu": F.relu,
    "silu": F.silu,
    "softmax": softmax_last,
}


def feature_map_fn(name: str):
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {name!r}, choose one of {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]


def bidirectional_linear_attention(q, k, v, scale):
    """o = Q (K^T V) over the whole sequence; masked keys / values must already be zero."""
    kv = torch.einsum("bmhk,bmhv->bhkv", upcast(k), upcast(v))
    return torch.einsum("bnhk,bhkv->bnhv", upcast(q) * scale, kv)


class LinearAttention(Mixer):
    name = "linear"
    # causal use only: the bidirectional sum over the whole sequence (Encoder) takes the padded path
    packed_path = "cu_seqlens"
    bidirectional = True

    def __init__(
        self,
        dim,
        heads,
        causal=True,
        expand_k=1.0,
        expand_v=1.0,
        feature_map="elu",
        use_short_conv=False,
        conv_size=4,
        output_norm=True,
        output_gate=None,
    ):
        super().__init__(dim, heads, causal)
        self.dim_k = int(dim * expand_k) // heads
        dim_v = int(dim * expand_v) // heads
        self.feature_map = feature_map_fn(feature_map)
        self.qkv = QKVProjection(dim, heads, self.dim_k, dim_v, use_short_conv, conv_size)
        self.out = HeadOutput(dim, heads, dim_v, norm=output_norm, gate=output_gate)

    def packs_by_cu_seqlens(self):
        return self.causal and super().packs_by_cu_seqlens()

    def mix(self, x, mask, state, want_state, pack=None):
        x = masked_fill_zero(x, mask)
        q, k, v, conv_state = self.qkv(x, pick_state(state, 1), pack=pack)
        q, k = self.feature_map(q), self.feature_map(k)
        k, v = masked_fill_zero(k, mask), masked_fill_zero(v, mask)
        scale = self.dim_k**-0.5

        if not self.causal:
            return self.out(bidirectional_linear_attention(q, k, v, scale), x), None

        o, s = run_kernel(
            chunk_simple_gla, fused_recurrent_simple_gla, q, k, v, None,
            scale=scale, initial_state=pick_state(state, 0), want_state=want_state, pack=pack,
        )
        return self.out(o, x), (s, conv_state) if want_state else None
