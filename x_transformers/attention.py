"""Attention: projections, heads, kv heads, multi-latent attention, gating, memory key/values, KV caching.

The softmax core (SDPA fast path, math path for logit-level features) lives in `attend.py`; this module turns a
sequence into queries, keys and values, prepares masks and biases, calls `Attend`, and mixes the heads back out.

Cache protocol (same as x-transformers): `forward(..., return_intermediates=True)` returns `(out, Intermediates)`;
passing that `Intermediates` back as `cache=` on the next call continues the sequence. `cached_kv` holds the keys
and values of every position so far (before rotary, after qk-norm) - or for multi-latent attention, the latents.
"""

from __future__ import annotations

import warnings
from copy import deepcopy
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, cat, nn
from torch.nn import Module, ModuleList
from torch.utils._pytree import tree_flatten

from x_transformers.attend import Attend, Intermediates
from x_transformers.cache import KeyValueBuffer
from x_transformers.norms import MultiheadRMSNorm
from x_transformers.ops.attention import flash_attention
from x_transformers.ops.common.utils import use_triton
from x_transformers.positional import CoPE, DataDependentAlibi, PerRowDataDependentAlibi, RotaryTable
from x_transformers.token_shift import FoldAxially
from x_transformers.utils import default, divisible_by, exists, l2norm, log, pad_at_dim, softclamp

DEFAULT_DIM_HEAD = 64

LinearNoBias = partial(nn.Linear, bias=False)


def init_zero_(layer: nn.Linear):
    nn.init.zeros_(layer.weight)
    if exists(layer.bias):
        nn.init.zeros_(layer.bias)


def first_leaf_and_state(outputs):
    """A module's main output, and its recurrent state when it returns `(out, state)` like `nn.GRU` does."""
    (out, *_), _ = tree_flatten(outputs)
    state = outputs[1] if isinstance(outputs, (tuple, list)) and len(outputs) > 1 else None
    return out, state


class LowRankLinear(Module):
    """down (no bias), optional activation, up (no bias, zero-initialized)."""

    def __init__(self, dim_in, dim_out, rank, activation=None):
        super().__init__()
        if not (rank < dim_in or rank < dim_out):
            raise ValueError(f'rank ({rank}) must be less than the input ({dim_in}) or output ({dim_out}) dimension')
        self.down = LinearNoBias(dim_in, rank)
        self.up = LinearNoBias(rank, dim_out)
        init_zero_(self.up)
        self.activation = activation

    def forward(self, x):
        hidden = self.down(x)
        if exists(self.activation):
            hidden = self.activation(hidden)
        return self.up(hidden)


def gate_projection(dim_in, dim_out, rank=None, activation=None) -> Module:
    """Gate logits: a zero-initialized bias-free linear, or a low-rank one when a rank is given."""
    if exists(rank):
        return LowRankLinear(dim_in, dim_out, rank, activation)
    linear = LinearNoBias(dim_in, dim_out)
    init_zero_(linear)
    return linear


class Attention(Module):
    """Multi-head attention. `forward(x, ...)` returns `out`, or `(out, Intermediates)` with return_intermediates.

    x (b, n, dim); context (b, m, dim_context) for cross attention; mask (b, n) bool, True = keep (in self attention
    also the key mask); context_mask (b, m) bool; attn_mask (i, j), (h, i, j) or (b, h, i, j) bool, True = attend;
    rotary_pos_emb / context_rotary_pos_emb: (freqs, xpos_scale) from RotaryEmbedding, or a RotaryTable of them,
    covering every position so far; mem (b, m, dim): Transformer-XL memories; cache: the Intermediates this layer
    returned on the previous call; value_residual: the first layer's `Intermediates.values`.
    """

    # inference keeps one concatenated copy of the fused projection weights (faster decoding, more memory);
    # set to False to trade that memory back for separate matmuls
    cache_fused_weights = True

    def __init__(
        self,
        dim,
        dim_head=DEFAULT_DIM_HEAD,
        dim_context=None,
        heads=8,
        causal=False,
        flash=False,
        pre_talking_heads=False,  # 2003.02436
        post_talking_heads=False,  # 2003.02436
        pre_scale_post_talking_heads=False,
        head_scale=False,  # normformer, 2110.09456
        sparse_topk=None,  # 1912.11637
        sparse_topk_straight_through=False,
        num_mem_kv=0,  # 1907.01470
        dropout=0.0,
        sublayer_dropout=0.0,
        on_attn=False,  # attention on attention, 1908.06954
        gate_value_heads=False,  # 2306.12929
        swiglu_values=False,
        gate_values=False,  # alphafold2 style value gating
        gate_values_rank=None,  # low-rank value gate (from the layer input); None = one linear
        gate_values_headwise=False,  # one value-gate logit per head instead of per feature
        output_gate=False,  # gate computed from the attention output itself (hybrid gated attention, HyGA)
        output_gate_rank=None,
        output_gate_headwise=False,
        low_rank_silu_gates=True,  # silu between the down and up projections of the low-rank gates
        zero_init_output=False,
        output_proj_depth=None,  # depth-scaled init of the output projection (olmo)
        hard=False,
        max_attend_past=None,
        qk_norm=False,  # 2010.04245
        qk_norm_groups=1,
        qk_norm_scale=10,
        qk_norm_dim_scale=False,  # 2302.05442
        qk_rmsnorm=False,
        k_rmsnorm=False,
        value_rmsnorm=False,  # alphagenome, GR3
        l2_distance=False,  # 2006.04710
        sigmoid=False,  # 2409.04431
        selective=False,  # 2410.02703
        custom_attn_fn: Callable | None = None,
        hybrid_module: Module | None = None,  # hymba, 2411.13676
        hybrid_mask_kwarg: str | None = None,
        hybrid_fold_axial_dim: int | None = None,
        one_kv_head=False,  # 1911.02150
        kv_heads=None,  # 2305.13245
        value_dim_head=None,
        dim_out=None,
        add_zero_kv=False,  # same as add_zero_attn in pytorch
        head_learned_sink=False,  # a learned per-head logit every query can put weight on, reading nothing
        rotate_num_heads=None,
        data_dependent_alibi=False,  # forgetting transformer, openreview q2Lnyegkr8
        data_dependent_alibi_per_row=False,
        data_dependent_alibi_per_row_dim_head=8,
        data_dependent_alibi_kwargs: dict = dict(),
        use_cope=False,  # 2405.18719
        cope_max_pos=16,
        cope_soft_onehot_pos=False,
        cope_talking_heads=False,
        softclamp_logits=False,  # gemma 2, 2408.00118
        logit_softclamp_value=50.0,
        learned_value_residual_mix=False,  # 2410.17897
        neutreno_value_residual=False,  # 2312.00751
        neutreno_alpha=0.4,
        laser=False,  # 2411.03493
        laser_softclamp_value=15.0,
        qkv_receive_diff_residuals=False,  # hyper-connections, 2409.19606
        use_latent_q=False,  # multi-latent attention, 2405.04434
        dim_latent_q=None,
        use_latent_kv=False,
        dim_latent_kv=None,
        latent_rope_subheads=None,
        onnxable=False,
        attend_sdp_kwargs: dict = dict(enable_flash=True, enable_math=True, enable_mem_efficient=True),
        flash_pack_seq=False,  # upstream's flag for packed sequences; here every layer takes them without it
    ):
        super().__init__()
        dim_kv = default(dim_context, dim)
        self.flash_pack_seq = flash_pack_seq

        self.scale = dim_head**-0.5
        self.heads = heads
        self.causal = causal
        self.max_attend_past = max_attend_past
        self.dim_head = dim_head
        self.dim, self.dim_kv = dim, dim_kv

        if exists(kv_heads) and one_kv_head:
            raise ValueError('give either one_kv_head=True (one key / value head) or kv_heads, not both')

        value_dim_head = default(value_dim_head, dim_head)
        kv_heads = 1 if one_kv_head else default(kv_heads, heads)

        if not divisible_by(heads, kv_heads):
            raise ValueError(f'heads ({heads}) must be divisible by kv_heads ({kv_heads})')

        self.kv_heads = kv_heads
        self.value_dim_head = value_dim_head

        q_dim = dim_head * heads
        k_dim = dim_head * kv_heads
        v_dim = value_dim_head * kv_heads
        out_dim = value_dim_head * heads

        # multi-latent attention - queries and / or keys-values come from a small latent, which is all the cache keeps

        self.to_latent_q = None
        self.to_latent_kv = None
        # "decoupled rope": a few key heads come straight from the input, so that rotary can act on them
        self.to_rotateable_k = None

        dim_q_input = dim
        dim_kv_input = dim_kv

        if use_latent_q:
            if not exists(dim_latent_q):
                raise ValueError('use_latent_q=True needs dim_latent_q')
            self.to_latent_q = LinearNoBias(dim, dim_latent_q)
            dim_q_input = dim_latent_q

        if use_latent_kv:
            if not exists(dim_latent_kv):
                raise ValueError('use_latent_kv=True needs dim_latent_kv')
            self.to_latent_kv = LinearNoBias(dim, dim_latent_kv)
            dim_kv_input = dim_latent_kv

        if exists(latent_rope_subheads):
            if exists(rotate_num_heads):
                raise ValueError('latent_rope_subheads sets rotate_num_heads itself; do not give both')
            rotate_num_heads = latent_rope_subheads
            k_dim = dim_head * (kv_heads - latent_rope_subheads)
            self.to_rotateable_k = LinearNoBias(dim, dim_head * latent_rope_subheads)

        self.use_latent_q = use_latent_q
        self.use_latent_kv = use_latent_kv

        # query, key, value projections - kept as three modules for checkpoint compatibility, run as one matmul

        self.to_q = LinearNoBias(dim_q_input, q_dim)

        # with every key head decoupled (latent_rope_subheads == kv_heads) to_k is empty, as upstream has it
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Initializing zero-element tensors')
            self.to_k = LinearNoBias(dim_kv_input, k_dim)

        self.to_v = LinearNoBias(dim_kv_input, v_dim)
        self._fused_weights = {}

        self.qkv_receive_diff_residuals = qkv_receive_diff_residuals

        # laser - attend over exp(values), then take the log, for larger gradients (2411.03493)

        self.laser = laser
        self.laser_softclamp_value = laser_softclamp_value

        # value gating - a sigmoid (or silu) gate per output feature, initialized open (alphafold2)

        if gate_values_headwise and exists(gate_values_rank):
            raise ValueError('gate_values_rank cannot be set with gate_values_headwise (that gate projects to heads)')
        if output_gate_headwise and exists(output_gate_rank):
            raise ValueError('output_gate_rank cannot be set with output_gate_headwise (that gate projects to heads)')

        self.to_v_gate = None
        self.to_v_gate_activation = F.silu if swiglu_values else F.sigmoid
        self.gate_values_headwise = gate_values_headwise
        gate_activation = F.silu if low_rank_silu_gates else None

        if gate_values and (exists(gate_values_rank) or gate_values_headwise):
            # the later upstream form: bias-free, zero-initialized (a half-open gate)
            self.to_v_gate = gate_projection(dim, heads if gate_values_headwise else out_dim, gate_values_rank,
                                             gate_activation)
        elif gate_values:
            self.to_v_gate = nn.Linear(dim, out_dim)
            nn.init.zeros_(self.to_v_gate.weight)
            nn.init.constant_(self.to_v_gate.bias, 10.0)

        # output gate - gate logits from the merged attention output, added to the value gate's (HyGA)

        self.output_gate_headwise = output_gate_headwise
        self.to_output_gate = None
        if output_gate:
            self.to_output_gate = gate_projection(out_dim, heads if output_gate_headwise else out_dim,
                                                  output_gate_rank, gate_activation)

        # per-head value gating - lets a head output nothing (2306.12929)

        self.to_v_head_gate = None
        if gate_value_heads:
            self.to_v_head_gate = nn.Linear(dim, heads)
            nn.init.zeros_(self.to_v_head_gate.weight)
            nn.init.constant_(self.to_v_head_gate.bias, 10.0)

        # qk norm - cosine-sim attention with a fixed or learned temperature (2010.04245, 2302.05442)

        self.qk_norm = qk_norm
        self.qk_norm_groups = qk_norm_groups
        self.qk_norm_scale = qk_norm_scale
        self.qk_norm_dim_scale = qk_norm_dim_scale

        self.qk_norm_q_scale = self.qk_norm_k_scale = 1
        if qk_norm and qk_norm_dim_scale:
            self.qk_norm_q_scale = nn.Parameter(torch.ones(heads, 1, dim_head))
            self.qk_norm_k_scale = nn.Parameter(torch.ones(kv_heads, 1, dim_head))

        if qk_norm and not divisible_by(dim_head, qk_norm_groups):
            raise ValueError(f'dim_head ({dim_head}) must be divisible by qk_norm_groups ({qk_norm_groups})')
        if qk_norm and (dim_head // qk_norm_groups) <= 2:
            raise ValueError('qk norm group dimension (dim_head // qk_norm_groups) must be greater than 2')

        # rmsnorm with learned per-head gains on queries and keys (or keys only), and on values

        if qk_rmsnorm and k_rmsnorm:
            raise ValueError('give either qk_rmsnorm or k_rmsnorm, not both')
        if value_rmsnorm and (kv_heads != heads or value_dim_head != dim_head):
            # its gains are (heads, 1, dim_head), as upstream keeps them, so values must have that shape
            raise ValueError('value_rmsnorm needs kv_heads == heads and value_dim_head == dim_head')

        self.q_rmsnorm = MultiheadRMSNorm(dim_head, heads=heads) if qk_rmsnorm else None
        self.k_rmsnorm = MultiheadRMSNorm(dim_head, heads=kv_heads) if (qk_rmsnorm or k_rmsnorm) else None
        self.value_rmsnorm = MultiheadRMSNorm(dim_head, heads=heads) if value_rmsnorm else None

        # contextual positional encoding (2405.18719)

        cope = None
        if use_cope:
            if not causal:
                raise ValueError('CoPE was designed for causal attention')
            if flash:
                raise ValueError('CoPE is not compatible with flash attention')
            cope = CoPE(
                dim=dim_head,
                heads=heads,
                max_pos=cope_max_pos,
                talking_heads=cope_talking_heads,
                soft_onehot=cope_soft_onehot_pos,
            )

        # data-dependent alibi - forgetting gates as an additive bias (forgetting transformer)

        self.data_dependent_alibi = None
        if data_dependent_alibi:
            dda_kwargs = dict(dim=dim, heads=heads, causal=causal)
            if data_dependent_alibi_per_row:
                dda_kwargs.update(dim_head=data_dependent_alibi_per_row_dim_head)
            dda_klass = PerRowDataDependentAlibi if data_dependent_alibi_per_row else DataDependentAlibi
            self.data_dependent_alibi = dda_klass(**dda_kwargs, **data_dependent_alibi_kwargs)

        # the attention core, talking heads included

        self.attend = Attend(
            heads=heads,
            causal=causal,
            pre_talking_heads=pre_talking_heads,
            post_talking_heads=post_talking_heads,
            pre_scale_post_talking_heads=pre_scale_post_talking_heads,
            dropout=dropout,
            sparse_topk=sparse_topk,
            sparse_topk_straight_through=sparse_topk_straight_through,
            hard=hard,
            qk_norm=qk_norm,
            scale=qk_norm_scale if qk_norm else self.scale,
            l2_distance=l2_distance,
            sigmoid=sigmoid,
            selective=selective,
            custom_attn_fn=custom_attn_fn,
            add_zero_kv=add_zero_kv,
            flash=flash,
            softclamp_logits=softclamp_logits,
            logit_softclamp_value=logit_softclamp_value,
            cope=cope,
            onnxable=onnxable,
            sdp_kwargs=attend_sdp_kwargs,
        )

        # learned attention sink: one zero key / zero value slot per head whose logit is a learned bias, so a
        # query can put weight on nothing. Kept on the core as `attend.head_attn_sink` (upstream's name)

        self.head_learned_sink = head_learned_sink
        if head_learned_sink:
            clash = dict(l2_distance=l2_distance, softclamp_logits=softclamp_logits, laser=laser, use_cope=use_cope,
                         selective=selective)
            clash = [name for name, on in clash.items() if on]
            if clash:
                # these change a zero key's logit, clamp the sink's bias or turn its zero value into a nonzero one
                raise ValueError(f'head_learned_sink cannot be combined with {clash}')
            self.attend.head_attn_sink = nn.Parameter(torch.zeros(heads))

        # normformer head scale (2110.09456)

        self.head_scale = head_scale
        if head_scale:
            self.head_scale_params = nn.Parameter(torch.ones(1, heads, 1, 1))

        self.sparse_topk = sparse_topk

        # memory key / values - learned slots every query can attend to (1907.01470)

        self.num_mem_kv = num_mem_kv
        if num_mem_kv > 0:
            self.mem_k = nn.Parameter(torch.randn(kv_heads, num_mem_kv, dim_head))
            self.mem_v = nn.Parameter(torch.randn(kv_heads, num_mem_kv, dim_head))

        # value residual - mix the first layer's values into this one's, per token and head when learned (2410.17897)

        if learned_value_residual_mix and use_latent_q and dim_latent_q != dim:
            raise ValueError('learned_value_residual_mix reads the query input, so it needs dim_latent_q == dim')

        self.to_value_residual_mix = None
        if learned_value_residual_mix:
            self.to_value_residual_mix = nn.Sequential(nn.Linear(dim, heads), nn.Sigmoid())

        # neutreno - instead of mixing values, add (first layer's values - own values) to the output (2312.00751)

        self.neutreno_value_residual = neutreno_value_residual
        self.neutreno_alpha = neutreno_alpha

        self.attn_on_attn = on_attn

        # hybrid module - a recurrent (or any sequence) module run beside attention, outputs averaged (hymba)

        hybrid_module = deepcopy(hybrid_module) if exists(hybrid_module) else None
        self.hybrid_norms = None
        self.hybrid_mix = None
        self.hybrid_fold_axial_dim = default(hybrid_fold_axial_dim, 1)

        if exists(hybrid_module) and exists(hybrid_fold_axial_dim):
            hybrid_module = FoldAxially(axial_dim=hybrid_fold_axial_dim, fn=hybrid_module)
            # unused in the forward, as upstream; kept so checkpoints load with strict=True
            self.hybrid_mix = LinearNoBias(dim, heads)
            self.hybrid_norms = ModuleList(
                [MultiheadRMSNorm(dim_head, heads=heads), MultiheadRMSNorm(dim_head, heads=heads)]
            )

        self.hybrid_module = hybrid_module
        # for bidirectional attention, the mask can be forwarded to the hybrid module under this kwarg name
        self.hybrid_mask_kwarg = hybrid_mask_kwarg

        # output projection, optionally through a GLU (attention on attention, 1908.06954)

        dim_out = default(dim_out, dim)
        if on_attn:
            self.to_out = nn.Sequential(LinearNoBias(out_dim, dim_out * 2), nn.GLU())
        else:
            self.to_out = LinearNoBias(out_dim, dim_out)

        # how many heads rotary acts on - the last ones, for decoupled rope in multi-latent attention

        rotate_num_heads = default(rotate_num_heads, heads)
        if not (0 < rotate_num_heads <= heads):
            raise ValueError(f'rotate_num_heads ({rotate_num_heads}) must be in [1, heads={heads}]')
        if rotate_num_heads < heads and kv_heads < heads:
            raise ValueError('grouped kv heads are not compatible with partial rotate heads (decoupled rope) yet')
        self.rotate_num_heads = rotate_num_heads

        # selective attention rewrites logits of past rows from future ones, so cached decoding cannot be exact
        self.can_cache_kv = not selective

        self.sublayer_dropout = nn.Dropout(sublayer_dropout) if sublayer_dropout > 0.0 else None

        out_proj = self.to_out[0] if on_attn else self.to_out
        if zero_init_output:
            init_zero_(out_proj)
        elif exists(output_proj_depth):
            # std 1 / sqrt(2 * fan_in * depth)
            nn.init.normal_(out_proj.weight, std=(2 * out_proj.in_features * output_proj_depth) ** -0.5)

    # projections

    def fused_weight(self, names: tuple[str, ...]) -> Tensor | None:
        """The concatenated weight of several bias-free projections, or None where separate matmuls are cheaper."""
        weights = [getattr(self, name).weight for name in names]
        needs_grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)

        if needs_grad:
            # training: concatenate every call so gradients reach each Linear; drop any inference copy
            if not torch.compiler.is_compiling():
                self._fused_weights.clear()
            return cat(weights)
        if torch.compiler.is_compiling():
            # compiled inference: a per-call weight concatenation would cost more than the separate matmuls
            return None
        if not self.cache_fused_weights:
            self._fused_weights.clear()
            return None

        # inference: reuse the concatenation until a weight is moved or updated in place
        key = tuple((w.data_ptr(), w._version, w.dtype) for w in weights)
        cached = self._fused_weights.get(names)
        if cached is None or cached[0] != key:
            cached = (key, cat(weights))
            self._fused_weights[names] = cached
        return cached[1]

    def fused_linear(self, x: Tensor, names: tuple[str, ...]) -> tuple[Tensor, ...]:
        """Run several bias-free projections of the same input as one matmul over their concatenated weights."""
        weight = self.fused_weight(names)
        if weight is None:
            return tuple(F.linear(x, getattr(self, name).weight) for name in names)
        return F.linear(x, weight).split([getattr(self, name).weight.shape[0] for name in names], dim=-1)

    def rotated_qkv(self, x: Tensor, rotary: RotaryTable) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """Self-attention q, k (rotated), v (b, h, n, d) and the unrotated k, with q and k rotated in one pass.

        They leave one matmul side by side and share the positions and the table, so one rotation (one flip, two
        multiplies, an add and a cast, each a kernel forward and backward) serves both. None where the
        projections run as separate matmuls.
        """
        weight = self.fused_weight(('to_q', 'to_k', 'to_v'))
        if weight is None:
            return None
        qk_dim = self.to_q.weight.shape[0] + self.to_k.weight.shape[0]
        qk, v = F.linear(x, weight).split((qk_dim, weight.shape[0] - qk_dim), dim=-1)
        qk = rearrange(qk, 'b n (h d) -> b h n d', d=self.dim_head)
        q, k = rotary.rotate(qk).split((self.heads, self.kv_heads), dim=1)
        k_unrotated = qk[:, self.heads :]
        return q, k, rearrange(v, 'b n (h d) -> b h n d', d=self.value_dim_head), k_unrotated

    # hybrid module

    def run_hybrid_folded(self, fn: Module, x: Tensor, state):
        """Run `fn` on `x` folded axially (every axial_dim-th token forms one sequence), from `state` if given."""
        axial_dim, seq_len = self.hybrid_fold_axial_dim, x.shape[1]
        x = pad_at_dim(x, (0, -seq_len % axial_dim), dim=1)
        x = rearrange(x, 'b (n a) ... -> (b a) n ...', a=axial_dim)

        outputs = fn(x) if state is None else fn(x, state)
        out, state = first_leaf_and_state(outputs)

        out = rearrange(out, '(b a) n ... -> b (n a) ...', a=axial_dim)
        return out[:, :seq_len], state

    def hybrid_forward(self, x: Tensor, mask: Tensor | None, cache: Intermediates | None):
        """Hybrid module output for the new tokens of `x`, and what the next cached call must continue from.

        Causal: the module's recurrent state (e.g. GRU `h_n`) after every complete fold row is kept, with the tokens
        of the incomplete last row; the next call runs on from there, so decoding matches the parallel forward.
        A module that returns no state gets its whole input history replayed instead.

        Not causal (an encoder, or the cross attention of a decoder): one call over the whole input, as upstream;
        the input is kept as history, so that if cached decoding follows (decoder cross attention), the module is
        replayed over it left to right and continued from there.
        """
        module = self.hybrid_module
        cached_hidden = getattr(cache, 'hybrid_hidden', None) if exists(cache) else None

        if not self.causal and not exists(cached_hidden):
            kwargs = {self.hybrid_mask_kwarg: mask} if exists(self.hybrid_mask_kwarg) else dict()
            out, _ = first_leaf_and_state(module(x, **kwargs))
            return out, (None, x)

        fn = module.fn if isinstance(module, FoldAxially) else module
        axial_dim, num_new = self.hybrid_fold_axial_dim, x.shape[1]

        state, pending = None, x[:, :0]
        if exists(cached_hidden):
            state, pending = cached_hidden

        seq = cat((pending, x), dim=1)
        seq_len = seq.shape[1]
        full_len = seq_len - seq_len % axial_dim

        if full_len > 0:
            full_out, full_state = self.run_hybrid_folded(fn, seq[:, :full_len], state)

            if not exists(full_state):
                # stateless module: replay the whole history every call
                out, _ = self.run_hybrid_folded(fn, seq, None)
                return out[:, -num_new:], (None, seq)

            state = full_state

        outs = [full_out] if full_len > 0 else []
        if full_len < seq_len:
            tail_out, _ = self.run_hybrid_folded(fn, seq[:, full_len:], state)
            outs.append(tail_out)

        out = cat(outs, dim=1)[:, -num_new:]
        return out, (state, seq[:, full_len:])

    # data-dependent alibi

    def rotate_qk(self, q: Tensor, k: Tensor, rotary_pos_emb, context_rotary_pos_emb=None) -> tuple[Tensor, Tensor]:
        """Rotary on the last `rotate_num_heads` heads of q and k (b, h, n, d); keys may use the context's own
        positions (2104.09864)."""
        rotate_num_heads, h = self.rotate_num_heads, q.shape[1]
        partial_rotate = rotate_num_heads < h

        q_rotary = k_rotary = RotaryTable.cast(rotary_pos_emb)
        if exists(context_rotary_pos_emb):
            k_rotary = RotaryTable.cast(context_rotary_pos_emb)

        if partial_rotate:
            q_rest, q = q[:, :-rotate_num_heads], q[:, -rotate_num_heads:]
            k_rest, k = k[:, :-rotate_num_heads], k[:, -rotate_num_heads:]

        q = q_rotary.rotate(q)
        k = k_rotary.rotate(k, keys=True)

        if partial_rotate:
            q = cat((q_rest, q), dim=1)
            k = cat((k_rest, k), dim=1)
        return q, k

    def static_decode_refusal(self) -> str | None:
        """None if this layer decodes with a static cache, else the flag that prevents it: the features below read
        their own history in a form the buffers do not keep (they decode with the plain, concatenating cache)."""
        flags = dict(
            attn_data_dependent_alibi=exists(self.data_dependent_alibi),
            attn_use_cope=exists(self.attend.cope),
            attn_use_latent_q=self.use_latent_q,
            attn_use_latent_kv=self.use_latent_kv,
            attn_hybrid_module=exists(self.hybrid_module),
            attn_selective=self.attend.selective,
            # the static buffer's unwritten positions are masked: only the built-in weightings are known to give a
            # masked logit exactly zero weight
            attn_custom_attn_fn=self.attend.has_custom_attn_fn,
        )
        return next((f'`{name}` decodes with the plain cache only' for name, on in flags.items() if on), None)

    def fused_attention_ok(self, q, k, keep_mask, rel_pos, attn_bias, prev_attn, cache, static_kv, pack) -> bool:
        """Whether this call runs on `ops.flash_attention`: packed documents or forget gates (neither needs an
        (i, j) tensor there), on Triton, with nothing else acting on the logits or masking them."""
        dda = self.data_dependent_alibi
        if not (exists(pack) or exists(dda)) or not use_triton(q):
            return False
        plain_dda = not exists(dda) or (self.causal and not isinstance(dda, PerRowDataDependentAlibi))
        dropout = self.attend.dropout if self.training else 0.0
        return (
            plain_dda
            and self.attend.use_sdpa(prev_attn)
            and not self.attend.laser
            and not self.attend.add_zero_kv
            and dropout == 0.0
            and not any(exists(t) for t in (keep_mask, rel_pos, attn_bias, cache, static_kv))
            and self.num_mem_kv == 0
            and not self.head_learned_sink
            and q.shape[-2] == k.shape[-2]
            and max(q.shape[-1], k.shape[-1]) <= 128
        )

    def forget_gates(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Data-dependent alibi's log forget gates (b, h, n); a masked token forgets nothing."""
        dda = self.data_dependent_alibi
        gates = dda.to_forget_gates(x) * dda.post_log_scale
        if exists(mask):
            gates = gates.masked_fill(~rearrange(mask, 'b n -> b 1 n'), 0.0)
        return gates

    def fused_attend(self, q, k, v, gates, pack):
        """Attention of (b, h, n, d) heads through `ops.flash_attention` (layout (b, n, h, d)): packed rows are
        flattened into one row of documents; forget `gates` (b, h, n) go in as the kernel's log forget gates."""
        b = q.shape[0]
        kv_heads = k.shape[1]
        # our query head h reads kv head h % kv_heads, the kernel's h // (h / kv_heads): regroup the query heads
        q = rearrange(q, 'b (g h) n d -> b n (h g) d', h=kv_heads)
        k, v = (rearrange(t, 'b h n d -> b n h d') for t in (k, v))
        g = rearrange(gates, 'b (g h) n -> b n (h g)', h=kv_heads).float() if exists(gates) else None
        cu_seqlens = None
        if exists(pack):
            q, k, v = (rearrange(t, 'b n h d -> 1 (b n) h d') for t in (q, k, v))
            g = rearrange(g, 'b n h -> 1 (b n) h') if exists(g) else None
            cu_seqlens = pack.cu_seqlens
        out = flash_attention(q, k, v, g, scale=self.attend_scale(q), causal=self.causal, cu_seqlens=cu_seqlens)
        out = rearrange(out, '1 (b n) h d -> b n h d', b=b) if exists(pack) else out
        return rearrange(out, 'b n (h g) d -> b (g h) n d', h=kv_heads)

    def head_space(self, gate: Tensor, headwise: bool) -> Tensor:
        """Gate logits (b, n, h) or (b, n, h * d) as (b, h, n, 1) or (b, h, n, d)."""
        if headwise:
            return rearrange(gate, 'b n h -> b h n 1')
        return rearrange(gate, 'b n (h d) -> b h n d', h=self.heads)

    def attend_scale(self, q) -> float:
        return default(self.attend.scale, q.shape[-1] ** -0.5)

    def data_dependent_alibi_bias(self, x: Tensor, cached: Tensor | None, mask: Tensor | None = None):
        """Forgetting-gate bias for the new queries against every key, and the state that extends it next call.

        Causal gates only look back, so the bias against cached keys follows from their cumulative log gates
        (or, per row, their small gate keys), which ride along in `cached_kv` with the keys and values.
        A masked token (`mask` (b, n) False) forgets nothing: its log gate is zero, whatever its input holds.
        """
        dda = self.data_dependent_alibi

        if not self.causal:
            return dda(x, mask=mask), None

        if isinstance(dda, PerRowDataDependentAlibi):
            q, k = dda.to_forget_gates(x)  # (b, h, n, d) each
            if exists(mask):
                # zero gate queries and keys at masked positions: whatever those hold stays out of every bias row
                q, k = (t.masked_fill(~rearrange(mask, 'b n -> b 1 n 1'), 0.0) for t in (q, k))
            if exists(cached):
                k = cat((cached, k), dim=-2)

            i, j = q.shape[-2], k.shape[-2]
            gates = (q @ k.transpose(-1, -2)) * dda.scale
            gates = F.logsigmoid(gates) * dda.post_log_scale
            if exists(mask):
                key_mask = pad_at_dim(mask, (j - i, 0), value=True)
                gates = gates.masked_fill(~rearrange(key_mask, 'b j -> b 1 1 j'), 0.0)

            # new query r sits at position j - i + r; its bias to key c sums its gates over keys c .. (its position - 1)
            future_or_self = torch.ones((i, j), dtype=torch.bool, device=x.device).triu(j - i)
            gates = gates.masked_fill(future_or_self, 0.0)
            bias = gates.flip(-1).cumsum(dim=-1).flip(-1)
            return bias, k

        gates = dda.to_forget_gates(x) * dda.post_log_scale  # (b, h, n)
        if exists(mask):
            gates = gates.masked_fill(~rearrange(mask, 'b n -> b 1 n'), 0.0)
        cum_gates = gates.cumsum(dim=-1)
        cum_gates = rearrange(cum_gates, 'b h n -> b h n 1')

        if exists(cached):
            cum_gates = cum_gates + cached[..., -1:, :]
            all_cum_gates = cat((cached, cum_gates), dim=-2)
        else:
            all_cum_gates = cum_gates

        bias = cum_gates - all_cum_gates.transpose(-1, -2)
        return bias, all_cum_gates

    def forward(
        self,
        x,
        context=None,
        mask=None,
        context_mask=None,
        attn_mask=None,
        rel_pos=None,
        attn_bias=None,
        rotary_pos_emb=None,
        context_rotary_pos_emb=None,
        pos=None,  # custom positions for alibi
        prev_attn=None,
        mem=None,
        mem_mask=None,
        return_intermediates=False,
        cache: Intermediates | None = None,
        value_residual=None,
        static_kv: KeyValueBuffer | None = None,
        pack=None,
    ):
        """`static_kv`: this layer's entry of a `StaticCache` (x_transformers/cache.py) - the call's keys and values are
        written there at their positions and, after the prefill, the queries attend over the whole buffer.
        `pack`: a `Packing` (x_transformers/packing.py) of x's rows, whose documents attend only within themselves."""
        has_context = exists(context)
        if exists(pack):
            clash = dict(context=has_context, mem=exists(mem), cache=exists(cache) or exists(static_kv),
                         mask=exists(mask), hybrid_module=exists(self.hybrid_module))
            clash = [name for name, on in clash.items() if on]
            if clash:
                raise ValueError(f'packed sequences cannot be combined with {clash} in attention')
        if exists(static_kv) and (has_context or exists(mem) or exists(cache)):
            raise ValueError('a static cache serves self attention without memories or another cache')
        h, num_mem_kv = self.heads, self.num_mem_kv

        # hyper-connections may hand queries, keys and values different residual mixes, stacked as (3, b, n, d)

        if self.qkv_receive_diff_residuals:
            if has_context:
                raise ValueError('qkv_receive_diff_residuals only works for self attention')
            if x.ndim != 4 or x.shape[0] != 3:
                raise ValueError(f'qkv_receive_diff_residuals expects x of shape (3, b, n, d), got {tuple(x.shape)}')
            q_input, k_input, v_input = x.unbind(dim=0)
            x = q_input
        else:
            q_input = x
            k_input = v_input = default(context, x)

        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f'Attention expects x of shape (batch, seq, {self.dim}), got {tuple(x.shape)}')
        if not x.is_floating_point():
            raise TypeError(f'Attention expects a floating point x, got {x.dtype}')

        b, n, device = x.shape[0], x.shape[1], x.device

        if has_context and (context.ndim != 3 or context.shape[0] != b or context.shape[-1] != self.dim_kv):
            raise ValueError(f'context must have shape ({b}, seq, {self.dim_kv}), got {tuple(context.shape)}')

        for name, m in (('mask', mask), ('context_mask', context_mask), ('mem_mask', mem_mask)):
            if exists(m) and m.dtype != torch.bool:
                raise TypeError(f'{name} must be a bool tensor (True = keep), got {m.dtype}')

        if exists(mask) and (mask.ndim != 2 or mask.shape[0] != b or mask.shape[-1] < n):
            raise ValueError(f'mask must have shape ({b}, {n}), got {tuple(mask.shape)}')

        mem_len = mem.shape[-2] if exists(mem) else 0
        is_self_qkv = not (has_context or exists(mem) or self.qkv_receive_diff_residuals)

        if exists(mem):
            shared_kv_input = k_input is v_input
            k_input = cat((mem, k_input), dim=-2)
            v_input = k_input if shared_kv_input else cat((mem, v_input), dim=-2)

        # rotary on queries and keys at once - self attention from one projection, the same table for both (no
        # xpos), every head rotated, nothing between projection and rotary (qk norm) nor cached keys to prepend

        rotated_qkv = None
        if exists(rotary_pos_emb):
            rotary_pos_emb = RotaryTable.cast(rotary_pos_emb)
            joint_rotary = (
                is_self_qkv
                and not (self.use_latent_q or self.use_latent_kv or self.qk_norm or exists(cache) or exists(static_kv))
                and not (exists(self.q_rmsnorm) or exists(self.k_rmsnorm))
                and self.rotate_num_heads == h
                and not isinstance(rotary_pos_emb.xpos_scale, Tensor)
            )
            if joint_rotary:
                rotated_qkv = self.rotated_qkv(x, rotary_pos_emb)

        # states beyond keys / values (forget gates, value mixes) ride at the end of cached_kv, in a fixed order
        cached_extras = iter(cache.cached_kv[2:]) if exists(cache) else iter(())
        new_extras = []

        # multi-latent attention - keys and values are decompressed from cached latents (2405.04434)

        cached_kv = None

        # self attention with both latents: one matmul makes the query latent and the key / value latent
        fuse_latent_q = self.use_latent_q and self.use_latent_kv and is_self_qkv

        if self.use_latent_q and not fuse_latent_q:
            q_input = self.to_latent_q(q_input)

        if self.use_latent_kv:
            if self.qkv_receive_diff_residuals:
                raise ValueError('multi-latent attention does not support qkv_receive_diff_residuals')

            latent_names = ('to_latent_kv', 'to_rotateable_k') if exists(self.to_rotateable_k) else ('to_latent_kv',)

            if fuse_latent_q:
                q_input, latent_kv, *rotateable_k = self.fused_linear(x, ('to_latent_q', *latent_names))
            else:
                latent_kv, *rotateable_k = self.fused_linear(k_input, latent_names)

            mem_latent, latent_kv = latent_kv[:, :mem_len], latent_kv[:, mem_len:]

            k_sub_heads = mem_sub_heads = None
            if exists(self.to_rotateable_k):
                k_sub_heads = rearrange(rotateable_k[0], 'b n (h d) -> b h n d', d=self.dim_head)
                mem_sub_heads, k_sub_heads = k_sub_heads[..., :mem_len, :], k_sub_heads[..., mem_len:, :]

            if exists(cache):
                cached_latent_kv, cached_k_sub_heads = cache.cached_kv[:2]
                latent_kv = cat((cached_latent_kv, latent_kv), dim=-2)
                if exists(cached_k_sub_heads):
                    k_sub_heads = cat((cached_k_sub_heads, k_sub_heads), dim=-2)

            cached_kv = (latent_kv, k_sub_heads)

            latent_kv = cat((mem_latent, latent_kv), dim=-2)
            if exists(k_sub_heads):
                k_sub_heads = cat((mem_sub_heads, k_sub_heads), dim=-2)

            q = self.to_q(q_input)
            k, v = self.fused_linear(latent_kv, ('to_k', 'to_v'))

        elif rotated_qkv is not None:
            q, k, v, k_unrotated = rotated_qkv
        elif is_self_qkv and not self.use_latent_q:
            q, k, v = self.fused_linear(x, ('to_q', 'to_k', 'to_v'))
        else:
            q = self.to_q(q_input)
            if k_input is v_input:
                k, v = self.fused_linear(k_input, ('to_k', 'to_v'))
            else:
                k, v = self.to_k(k_input), self.to_v(v_input)

        if rotated_qkv is None:
            q = rearrange(q, 'b n (h d) -> b h n d', h=h)
            k = rearrange(k, 'b n (h d) -> b h n d', d=self.dim_head)
            v = rearrange(v, 'b n (h d) -> b h n d', d=self.value_dim_head)

        # decoupled rope - the rotateable key heads go last, where rotary acts

        if self.use_latent_kv and exists(k_sub_heads):
            k = cat((k, k_sub_heads), dim=1)

        orig_values = v

        # value residual - lerp toward the first layer's values, by a learned per-token gate or by half (2410.17897)

        if exists(value_residual) and not self.neutreno_value_residual:
            mix = 0.5
            if exists(self.to_value_residual_mix):
                mix = rearrange(self.to_value_residual_mix(q_input), 'b n h -> b h n 1')

                # grouped key / values: there is one mix per query head, but values per kv head. Query head h reads
                # kv head h % kv_heads, so each kv head's values take the mean mix of the query heads reading them
                # (broadcasting instead would turn the values into query heads, which no attention path expects)
                if mix.shape[1] != v.shape[1]:
                    mix = rearrange(mix, 'b (g h) n 1 -> b g h n 1', h=v.shape[1]).mean(dim=1)

                # multi-latent values are recomputed for every cached position, so their mixes are kept too
                if self.use_latent_kv:
                    if exists(cache):
                        mix = cat((next(cached_extras), mix), dim=-2)
                    new_extras.append(mix)

            v = value_residual.lerp(v, mix)

        # qk norm - l2-normalized queries and keys, scaled by a fixed temperature and optional learned per-dim gains

        if self.qk_norm:
            q = l2norm(q, groups=self.qk_norm_groups) * self.qk_norm_q_scale
            k = l2norm(k, groups=self.qk_norm_groups) * self.qk_norm_k_scale

        if exists(self.q_rmsnorm):
            q = self.q_rmsnorm(q)
        if exists(self.k_rmsnorm):
            k = self.k_rmsnorm(k)
        if exists(self.value_rmsnorm):
            v = self.value_rmsnorm(v)

        # static cache - keys are rotated once, at their own positions, and written in place; the prefill attends over
        # its own keys like a forward without cache, later calls over the whole buffer under a position mask

        static_buffer = False
        if exists(static_kv):
            if exists(rotary_pos_emb):
                q, k = self.rotate_qk(q, k, rotary_pos_emb, None)
            cached_kv = ()
            if static_kv.cache.fresh:
                static_kv.write(k, v)
            else:
                k, v = static_kv.write(k, v)
                static_buffer = True

        # kv cache - append this call's keys and values to the cached ones (memories stay in front, uncached)

        elif not self.use_latent_kv:
            if exists(cache):
                ck, cv = cache.cached_kv[:2]
                k = cat((k[..., :mem_len, :], ck, k[..., mem_len:, :]), dim=-2)
                v = cat((v[..., :mem_len, :], cv, v[..., mem_len:, :]), dim=-2)

            cached_kv = (k[..., mem_len:, :], v[..., mem_len:, :])
            if rotated_qkv is not None:
                cached_kv = (k_unrotated, v)

        # rotary - on the last rotate_num_heads heads; keys may use the context's own positions (2104.09864)

        if exists(rotary_pos_emb) and rotated_qkv is None and not exists(static_kv):
            q, k = self.rotate_qk(q, k, rotary_pos_emb, context_rotary_pos_emb if has_context else None)

        # key padding mask - over memories, cached keys and new keys

        i, j = q.shape[-2], k.shape[-2]
        input_mask = context_mask

        # which of this call's own n tokens are real (self attention): features that read across positions (data-
        # dependent alibi's gates, selective attention's penalties, the hybrid module) must not read masked ones
        position_mask = None
        if not has_context:
            position_mask = default(context_mask, mask)
            if exists(position_mask) and (position_mask.ndim != 2 or position_mask.shape[-1] < n):
                position_mask = None
            elif exists(position_mask):
                position_mask = position_mask[:, -n:].bool()

        if not exists(input_mask) and not has_context:
            input_mask = mask

            if exists(mem) and (exists(input_mask) or exists(mem_mask)):
                if not exists(mem_mask):
                    mem_mask = torch.ones((b, mem_len), dtype=torch.bool, device=device)
                if not exists(input_mask):
                    input_mask = torch.ones((b, j - mem_len), dtype=torch.bool, device=device)
                input_mask = cat((mem_mask[..., -mem_len:], input_mask), dim=-1)

        if exists(input_mask):
            if input_mask.ndim != 2 or input_mask.shape[0] != b:
                raise ValueError(f'key mask must have shape (batch={b}, keys), got {tuple(input_mask.shape)}')
            if input_mask.shape[-1] > j:
                raise ValueError(f'key mask covers {input_mask.shape[-1]} positions but there are only {j} keys')
            # cached keys before the mask's span are valid
            input_mask = pad_at_dim(input_mask.bool(), (j - input_mask.shape[-1], 0), value=True)

        # memory key / values - prepended learned slots, never masked

        if num_mem_kv > 0:
            mem_k, mem_v = (repeat(t, 'h n d -> b h n d', b=b) for t in (self.mem_k, self.mem_v))

            if self.qk_norm:
                mem_k = l2norm(mem_k) * self.qk_norm_k_scale

            k = cat((mem_k, k), dim=-2)
            v = cat((mem_v, v), dim=-2)

            if exists(input_mask):
                input_mask = pad_at_dim(input_mask, (num_mem_kv, 0), value=True)

        # attention sink - a zero key and value in front; every mask and bias below pads it like a memory slot

        if self.head_learned_sink:
            k, v = (pad_at_dim(t, (1, 0), dim=-2) for t in (k, v))
            if exists(input_mask):
                input_mask = pad_at_dim(input_mask, (1, 0), value=True)
            num_mem_kv += 1

        # masked keys and values are zeroed, not only given zero weight: a zero weight times inf or NaN at a masked
        # position is NaN, which the weighted sum would carry to every query

        if exists(input_mask):
            key_keep = rearrange(input_mask, 'b j -> b 1 j 1')
            k, v = k.masked_fill(~key_keep, 0.0), v.masked_fill(~key_keep, 0.0)

        # a masked query's logits feed selective attention's penalties on later queries, and CoPE turns them into
        # gather indices (a NaN there is an out-of-range index, not just a NaN row): give it zero logits

        if (self.attend.selective or exists(self.attend.cope)) and exists(position_mask):
            q = q.masked_fill(~rearrange(position_mask, 'b n -> b 1 n 1'), 0.0)

        # combine key padding, explicit attention mask and the attend-past window into one keep-mask

        keep_mask = None

        if exists(input_mask):
            keep_mask = rearrange(input_mask, 'b j -> b 1 1 j')

        if exists(attn_mask):
            if not (2 <= attn_mask.ndim <= 4):
                raise ValueError(f'attn_mask must have 2 to 4 dimensions, got shape {tuple(attn_mask.shape)}')
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape)).bool()
            if num_mem_kv > 0 and attn_mask.shape[-1] == j:
                attn_mask = pad_at_dim(attn_mask, (num_mem_kv, 0), value=True)
            keep_mask = attn_mask if not exists(keep_mask) else (keep_mask & attn_mask)

        if static_buffer:
            # written keys of the row, up to each query's position (and within the attend-past window)
            static_keep = static_kv.cache.keep_mask(n, self.max_attend_past)
            static_keep = pad_at_dim(static_keep, (num_mem_kv, 0), value=True)
            keep_mask = static_keep if not exists(keep_mask) else (keep_mask & static_keep)

        elif exists(self.max_attend_past):
            dist = torch.arange(j - i, j, device=device)[:, None] - torch.arange(j, device=device)  # (i, j)
            past_mask = pad_at_dim(dist <= self.max_attend_past, (num_mem_kv, 0), value=True)[None, None]
            keep_mask = past_mask if not exists(keep_mask) else (keep_mask & past_mask)

        # packed documents, forget gates - our flash kernel where no (i, j) mask or bias is needed; otherwise the
        # documents are kept apart by a block-diagonal mask (relative biases restart with it: i - j is the distance
        # within the document, and cumulative forget gates differ by the gates within it)

        fused = self.fused_attention_ok(q, k, keep_mask, rel_pos, attn_bias, prev_attn, cache, static_kv, pack)
        if exists(pack) and not fused:
            # memory slots and the attention sink in front belong to every document
            doc_mask = pad_at_dim(pack.doc_mask(), (num_mem_kv, 0), value=True)
            keep_mask = doc_mask if not exists(keep_mask) else (keep_mask & doc_mask)

        # relative position bias (t5, dynamic, alibi - or alibi at custom positions)

        if exists(rel_pos):
            if exists(attn_bias):
                raise ValueError('give either rel_pos or attn_bias, not both')

            if static_buffer:
                static_cache = static_kv.cache
                attn_bias = rel_pos.forward_positions(static_cache.positions(n), static_cache.key_pos)
            elif exists(pos):
                if not hasattr(rel_pos, 'forward_custom_pos'):
                    raise ValueError('custom positions (pos=) are only supported with alibi')
                attn_bias = rel_pos.forward_custom_pos(pos)
            else:
                attn_bias = rel_pos(i, j)

            attn_bias = pad_at_dim(attn_bias, (num_mem_kv, 0))

        elif exists(attn_bias) and num_mem_kv > 0 and attn_bias.shape[-1] == j:
            attn_bias = pad_at_dim(attn_bias, (num_mem_kv, 0))

        # data-dependent alibi - forgetting transformer's gates as a bias, continued across cached calls

        if exists(self.data_dependent_alibi) and not fused:
            attn_bias, dda_state = self.data_dependent_alibi_bias(x, next(cached_extras, None), position_mask)
            attn_bias = pad_at_dim(attn_bias, (num_mem_kv, 0))

            if exists(dda_state):
                new_extras.append(dda_state)

        if self.head_learned_sink:
            # the zero key's logit is 0: the sink's logit is all bias
            sink = pad_at_dim(rearrange(self.attend.head_attn_sink, 'h -> h 1 1'), (0, k.shape[-2] - 1))
            sink = sink.to(q.dtype)
            attn_bias = sink if not exists(attn_bias) else attn_bias + sink

        # laser - attention over exponentiated (soft-clamped) values

        # exp of values near the soft-clamp (e^15 by default) overflows fp16, and their spread (up to e^30) underflows
        # it: in fp16 this attention runs in fp32 (bf16 has fp32's range)

        laser_dtype = None
        if self.laser:
            if v.dtype == torch.float16:
                laser_dtype = v.dtype
                q, k, v = q.float(), k.float(), v.float()
            v = softclamp(v, self.laser_softclamp_value).exp()

        if fused:
            gates = self.forget_gates(x, position_mask) if exists(self.data_dependent_alibi) else None
            out, intermediates = self.fused_attend(q, k, v, gates, pack), Intermediates()
            # the cumulative gates continue the bias in later cached calls, as the dense path's state does
            if exists(gates) and not exists(pack):
                new_extras.append(rearrange(gates.cumsum(dim=-1), 'b h n -> b h n 1'))
        else:
            out, intermediates = self.attend(
                q, k, v, mask=keep_mask, attn_bias=attn_bias, prev_attn=prev_attn, causal=False if static_buffer else None
            )

        if self.laser:
            out = log(out)
            if exists(laser_dtype):
                out = out.to(laser_dtype)

        # the values, before the residual mix, for value residual learning in later layers

        intermediates.values = orig_values

        # neutreno - a correction toward the first layer's values counters over-smoothing of deep attention

        if self.neutreno_value_residual and exists(value_residual):
            diff_values = (value_residual - orig_values)[..., -n:, :]
            diff_values = repeat(diff_values, 'b kvh n d -> b (r kvh) n d', r=h // self.kv_heads)
            out = out + self.neutreno_alpha * diff_values

        # normformer head scale

        if self.head_scale:
            out = out * self.head_scale_params

        # per-head gating (2306.12929)

        if exists(self.to_v_head_gate):
            head_gate = self.to_v_head_gate(x).sigmoid()
            out = out * rearrange(head_gate, 'b n h -> b h n 1')

        # hybrid module - average its (normalized) output with attention's, per head (hymba)

        if exists(self.hybrid_module):
            hybrid_x = x if not exists(position_mask) else x.masked_fill(~position_mask[..., None], 0.0)
            hybrid_out, hybrid_hidden = self.hybrid_forward(hybrid_x, mask, cache)
            intermediates.hybrid_hidden = hybrid_hidden

            if hybrid_out.ndim == 3:
                hybrid_out = rearrange(hybrid_out, 'b n (h d) -> b h n d', h=h)

            if exists(self.hybrid_norms):
                out_norm, hybrid_out_norm = self.hybrid_norms
                out, hybrid_out = out_norm(out), hybrid_out_norm(hybrid_out)

            out = 0.5 * (out + hybrid_out)

        out = rearrange(out, 'b h n d -> b n (h d)')

        # value gating (alphafold2) from the layer input, plus the output gate from the attention output: their
        # logits add, per head (headwise) or per feature

        if exists(self.to_v_gate) or exists(self.to_output_gate):
            gate = 0.0
            if exists(self.to_v_gate):
                gate = gate + self.head_space(self.to_v_gate(x), self.gate_values_headwise)
            if exists(self.to_output_gate):
                gate = gate + self.head_space(self.to_output_gate(out), self.output_gate_headwise)
            out = rearrange(out, 'b n (h d) -> b h n d', h=h) * self.to_v_gate_activation(gate)
            out = rearrange(out, 'b h n d -> b n (h d)')

        out = self.to_out(out)

        if exists(self.sublayer_dropout):
            out = self.sublayer_dropout(out)

        if exists(mask):
            out = out.masked_fill(~mask[:, -n:, None], 0.0)

        if not return_intermediates:
            return out

        intermediates.cached_kv = (*cached_kv, *new_extras)
        return out, intermediates
