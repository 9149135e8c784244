"""Tensor product attention (TPA, arXiv 2501.06425) and multi-product attention (MPA), as softmax-attention blocks.

Each token's queries, keys and values are low-rank sums of outer products of a head factor and a token factor:

    q_t = 1/R_q sum_r a_r(x_t) (x) b_r(x_t),   a_r in R^heads, b_r in R^dim_head   (likewise k with R_k, v with R_v)

Rotary acts on the token factors b, so the decoding cache keeps only the factors of keys and values -
(R_k + R_v)(heads + dim_head) numbers per token instead of multi-head attention's 2 heads dim_head - and rebuilds
the keys and values from them. Multi-product attention (`multi_product=True`) is the rank-1 case whose head factors
of the shared key and value are sigmoid gates.

`Decoder(attn_tensor_product=True, attn_tensor_product_q_rank=6, ...)` builds it in place of `Attention`; it takes
`Attention`'s call contract inside the layer stack (masks, rotary, both decoding caches) and refuses the flags it
does not implement by name.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, cat, nn
from torch.nn import Module

from x_transformers.attend import Attend, Intermediates
from x_transformers.cache import KeyValueBuffer
from x_transformers.positional import RotaryTable
from x_transformers.utils import exists, pad_at_dim


class TensorProductAttention(Module):
    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        causal: bool = False,
        q_rank: int = 6,
        k_rank: int = 2,
        v_rank: int = 2,
        multi_product: bool = False,
        flash: bool = False,
        dropout: float = 0.0,
        zero_init_output: bool = False,
    ):
        super().__init__()
        if multi_product:
            k_rank = v_rank = 1
        for name, rank in dict(q_rank=q_rank, k_rank=k_rank, v_rank=v_rank).items():
            if rank < 1:
                raise ValueError(f"tensor product attention needs {name} >= 1, got {rank}")
        self.heads, self.dim_head, self.causal = heads, dim_head, causal
        self.ranks = (q_rank, k_rank, v_rank)
        self.multi_product = multi_product
        # head factors then token factors of q, k, v, from one matmul
        self.splits = [r * n for r in self.ranks for n in (heads, dim_head)]
        self.to_factors = nn.Linear(dim, sum(self.splits), bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        if zero_init_output:
            nn.init.zeros_(self.to_out.weight)
        self.attend = Attend(causal=causal, flash=flash, dropout=dropout)
        # plain decoding cache: the layer stack reads these like Attention's
        self.can_cache_kv = True

    def cache_numbers_per_token(self) -> tuple[int, int]:
        """(this layer's cache, multi-head attention's) numbers kept per token: the factors vs full keys / values."""
        _, k_rank, v_rank = self.ranks
        return (k_rank + v_rank) * (self.heads + self.dim_head), 2 * self.heads * self.dim_head

    def factors(self, x: Tensor):
        """Head and token factors (b, R, n, heads) and (b, R, n, dim_head) of q, k and v."""
        parts = self.to_factors(x).split(self.splits, dim=-1)
        out = []
        for index, (rank, (heads_part, token_part)) in enumerate(zip(self.ranks, zip(parts[0::2], parts[1::2]))):
            a = rearrange(heads_part, "b n (r h) -> b r n h", r=rank)
            b = rearrange(token_part, "b n (r d) -> b r n d", r=rank)
            if self.multi_product and index > 0:
                a = a.sigmoid()
            out.append((a, b))
        return out

    @staticmethod
    def combine(a: Tensor, b: Tensor, rank: int) -> Tensor:
        """(b, R, n, h), (b, R, n, d) -> (b, h, n, d): the mean over ranks of the outer products."""
        return torch.einsum("b r n h, b r n d -> b h n d", a, b) / rank

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        rel_pos=None,
        pos=None,
        rotary_pos_emb=None,
        attn_bias: Tensor | None = None,
        cache: Intermediates | None = None,
        static_kv: KeyValueBuffer | None = None,
        return_intermediates: bool = False,
        **unsupported,
    ):
        given = [name for name, value in unsupported.items() if exists(value)]
        if given:
            raise ValueError(f"tensor product attention does not take {given}")
        if x.ndim != 3:
            raise ValueError(f"tensor product attention expects x of shape (batch, seq, dim), got {tuple(x.shape)}")
        b, n = x.shape[:2]
        (aq, bq), (ak, bk), (av, bv) = self.factors(x)

        # rotary on the token factors of queries and keys, at the new tokens' positions
        if exists(rotary_pos_emb):
            rotary = RotaryTable.cast(rotary_pos_emb)
            if isinstance(rotary.xpos_scale, Tensor):
                raise ValueError("tensor product attention does not take rotary_xpos (the cache keeps rotated keys)")
            bq, bk = rotary.rotate(bq), rotary.rotate(bk, keys=True)

        # the caches keep the factors, (b, R, n, heads + dim_head)
        k_factors, v_factors = cat((ak, bk), dim=-1), cat((av, bv), dim=-1)
        static_buffer = False
        if exists(static_kv):
            if exists(cache):
                raise ValueError("pass either a static cache or a plain cache")
            if static_kv.cache.fresh:
                static_kv.write(k_factors, v_factors)
            else:
                k_factors, v_factors = static_kv.write(k_factors, v_factors)
                static_buffer = True
        elif exists(cache):
            cached_k, cached_v = cache.cached_kv[:2]
            k_factors, v_factors = cat((cached_k, k_factors), dim=-2), cat((cached_v, v_factors), dim=-2)

        q_rank, k_rank, v_rank = self.ranks
        q = self.combine(aq, bq, q_rank)
        k = self.combine(*k_factors.split((self.heads, self.dim_head), dim=-1), k_rank)
        v = self.combine(*v_factors.split((self.heads, self.dim_head), dim=-1), v_rank)
        i, j = q.shape[-2], k.shape[-2]

        # keys: padding over the sequence so far, or the static buffer's written positions of the row
        keep = None
        if static_buffer:
            keep = static_kv.cache.keep_mask(n)
        else:
            key_mask = context_mask if exists(context_mask) else mask
            if exists(key_mask):
                keep = rearrange(pad_at_dim(key_mask.bool(), (j - key_mask.shape[-1], 0), value=True), "b j -> b 1 1 j")
        if exists(attn_mask):
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape)).bool()
            keep = attn_mask if not exists(keep) else keep & attn_mask

        if exists(rel_pos):
            if static_buffer:
                attn_bias = rel_pos.forward_positions(static_kv.cache.positions(n), static_kv.cache.key_pos)
            else:
                attn_bias = rel_pos(i, j)

        out, intermediates = self.attend(
            q, k, v, mask=keep, attn_bias=attn_bias, causal=False if static_buffer else None
        )
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        if exists(mask):
            out = out.masked_fill(~mask[:, -n:, None], 0.0)

        if not return_intermediates:
            return out
        intermediates.cached_kv = () if exists(static_kv) else (k_factors, v_factors)
        return out, intermediates

    def static_decode_refusal(self):
        return None
