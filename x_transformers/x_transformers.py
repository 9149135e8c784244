"""The assembly: `AttentionLayers` builds a stack of attention / feedforward blocks from keyword flags, and the
wrappers (`TransformerWrapper`, `ViTransformerWrapper`, `XTransformer`) put embeddings and heads around it.

The building blocks live in their own files (attend, attention, positional, norms, residual, token_shift,
feedforward); they are re-exported here because x-transformers users import them from this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from random import random, randrange
from contextlib import nullcontext
import inspect

import torch
import torch.nn.functional as F
from torch import nn, Tensor, cat, arange
from torch.amp import autocast
from torch.nn import Module, ModuleList, ModuleDict

import einx
from einops import rearrange, repeat, reduce, pack, unpack
from einops.layers.torch import Rearrange
from loguru import logger

from x_transformers.utils import (
    exists,
    default,
    first,
    is_empty,
    cast_tuple,
    divisible_by,
    at_most_one_of,
    compact,
    identity,
    maybe,
    once,
    pick_and_pop,
    group_dict_by_key,
    string_begins_with,
    group_by_key_prefix,
    groupby_prefix_and_trim,
    max_neg_value,
    log,
    l2norm,
    softclamp,
    pad_at_dim,
    masked_mean,
)
from x_transformers.attend import Attend, Intermediates
from x_transformers.attention import Attention
from x_transformers.cache import StaticCache, module_refusal, static_cache_refusal
from x_transformers.tensor_product_attention import TensorProductAttention
from x_transformers.feedforward import FF_DENSE_ONLY_FLAGS, FeedForward, GLU, ReluSquared, SoLU
from x_transformers.norms import (
    LayerNorm,
    AdaptiveLayerNorm,
    ScaleNorm,
    RMSNorm,
    AdaptiveRMSNorm,
    SimpleRMSNorm,
    MultiheadRMSNorm,
    DynamicTanh,
    Derf,
)
from x_transformers.positional import (
    TokenEmbedding,
    AbsolutePositionalEmbedding,
    ScaledSinusoidalEmbedding,
    RelativePositionBias,
    CoPE,
    DynamicPositionBias,
    AlibiPositionalBias,
    DataDependentAlibi,
    PerRowDataDependentAlibi,
    RotaryEmbedding,
    RotaryTable,
    apply_rotary_pos_emb,
    rotate_half,
)
from x_transformers.residual import Residual, GRUGating, HyperConnection, Scale, LayerScale, AdaptiveLayerScale
from x_transformers.token_shift import ShiftTokens, FoldAxially, shift, shift_tail
from x_transformers.packing import Packing, build_packing, pos_restarts

# b - batch, n - sequence, d - feature dimension, h - heads, s - residual streams

DEFAULT_DIM_HEAD = 64


@dataclass
class LayerIntermediates:
    hiddens: list[Tensor] | None = None  # input of every self-attention block (what Transformer-XL memories store)
    last_hidden: Tensor | None = None  # output of the stack, after the final norm
    attn_intermediates: list[Intermediates] | None = None  # one per attention / mixer block; doubles as the kv cache
    layer_hiddens: list[Tensor] | None = None  # input of every block, plus the stack's output before the final norm
    attn_z_loss: Tensor | None = None
    mems: Tensor | None = None
    memory_tokens: Tensor | None = None
    logit_entropies: Tensor | None = None
    aux_loss: Tensor | None = None  # sum of the (already weighted) mixture-of-experts losses; None without MoE


LinearNoBias = partial(nn.Linear, bias=False)


def __getattr__(name):
    # the autoregressive wrapper imports this module's neighbours, so it is resolved lazily to avoid an import cycle
    if name == "AutoregressiveWrapper":
        from x_transformers.autoregressive_wrapper import AutoregressiveWrapper

        return AutoregressiveWrapper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# small helpers that upstream code imports from this module


class always:
    def __init__(self, val):
        self.val = val

    def __call__(self, *args, **kwargs):
        return self.val


class not_equals:
    def __init__(self, val):
        self.val = val

    def __call__(self, x, *args, **kwargs):
        return x != self.val


class equals:
    def __init__(self, val):
        self.val = val

    def __call__(self, x, *args, **kwargs):
        return x == self.val


def Sequential(*modules):
    return nn.Sequential(*filter(exists, modules))


def or_reduce(masks):
    out, *rest = masks
    for mask in rest:
        out = out | mask
    return out


def init_zero_(layer):
    nn.init.zeros_(layer.weight)
    if exists(layer.bias):
        nn.init.zeros_(layer.bias)


def calc_entropy(t: Tensor, is_prob=False):
    prob = t if is_prob else t.softmax(dim=-1)
    return -(prob * log(prob)).sum(dim=-1)


def calc_z_loss(pre_softmax_attns: list[Tensor], mask=None, weight=1.0):
    # z-loss on the attention logits (ST-MoE, arXiv 2202.08906; PaLM): keeps the log-partition near zero
    lse = sum(attn.logsumexp(dim=-1) for attn in pre_softmax_attns)
    loss = reduce(lse.square(), "b h n -> b n", "sum")

    if not exists(mask):
        return loss.mean() * weight

    return loss[mask].sum() / mask.sum().clamp(min=1e-5) * weight


def dropout_seq(seq, mask, dropout):
    """Structured dropout: keep a random subset of whole tokens (and their mask), dropping the rest."""
    b, n, device = seq.shape[0], seq.shape[1], seq.device
    scores = torch.randn(b, n, device=device)

    if exists(mask):
        scores = scores.masked_fill(~mask, max_neg_value(scores))

    keep_prob = 1.0 - dropout
    num_keep = max(1, int(keep_prob * n))
    keep_indices = scores.topk(num_keep, dim=1).indices
    batch_indices = arange(b, device=device)[:, None]

    seq = seq[batch_indices, keep_indices]

    if exists(mask):
        keep_counts = torch.ceil(mask.sum(dim=-1) * keep_prob).int()
        keep_mask = arange(num_keep, device=device) < keep_counts[:, None]
        mask = mask[batch_indices, keep_indices] & keep_mask

    return seq, mask


class ConcatCombine(Module):
    """U-Net skip: concatenate the hidden of an earlier layer with the current one and project back to `dim`."""

    def __init__(self, dim, prev_layer_ind):
        super().__init__()
        self.prev_layer_ind = prev_layer_ind
        self.combine = LinearNoBias(dim * 2, dim)

    def forward(self, x, prev_layers: list[Tensor]):
        skip = prev_layers[self.prev_layer_ind]
        return self.combine(cat((skip, x), dim=-1))


def add_memory_tokens(x, memory_tokens, mask, mem_every, is_decoder):
    """Learned memory tokens (arXiv:2006.11527) in front of the sequence, or in front of every `mem_every` tokens
    (decoders only). Returns (x, mask, packed_shape) - `remove_memory_tokens` takes them out again."""
    b, n = x.shape[:2]
    if exists(mem_every):
        assert mem_every > 0
        assert is_decoder, "interspersed memory tokens are only for Decoder"
        pad = math.ceil(n / mem_every) * mem_every - n
        x = pad_at_dim(x, (0, pad), dim=-2, value=0.0)
        x = rearrange(x, "b (n m) d -> (b n) m d", m=mem_every)
        if exists(mask):
            # the mask follows the tokens: the end padding is masked, every group's memory tokens are not
            mask = pad_at_dim(mask, (0, pad), dim=-1, value=False)
            mask = rearrange(mask, "b (n m) -> (b n) m", m=mem_every)
            mask = pad_at_dim(mask, (memory_tokens.shape[0], 0), dim=-1, value=True)
            mask = rearrange(mask, "(b n) m -> b (n m)", b=b)

    mem = repeat(memory_tokens, "n d -> b n d", b=x.shape[0])
    x, packed_shape = pack((mem, x), "b * d")

    if not exists(mem_every) and exists(mask):
        mask = pad_at_dim(mask, (memory_tokens.shape[0], 0), dim=-1, value=True)

    if exists(mem_every):
        x = rearrange(x, "(b n) m d -> b (n m) d", b=b)
    return x, mask, packed_shape


def remove_memory_tokens(x, packed_shape, num_mems, mem_every, seq_len):
    """Undo `add_memory_tokens`: returns (x of length `seq_len`, the memory tokens' outputs)."""
    b = x.shape[0]
    if exists(mem_every):
        x = rearrange(x, "b (n m) d -> (b n) m d", m=mem_every + num_mems)
    mem, x = unpack(x, packed_shape, "b * d")
    if exists(mem_every):
        x = rearrange(x, "(b n) m d -> b (n m) d", b=b)
    return x[:, :seq_len], mem


def _accepted_kwargs(fn):
    """Names `fn` accepts, or None when it takes **kwargs (then anything goes)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _check_routed_kwargs(module_cls, kwargs: dict, prefix: str, owner: str):
    accepted = _accepted_kwargs(module_cls)
    if accepted is None:
        return
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        names = ", ".join(prefix + name for name in unknown)
        raise TypeError(f"{owner} got unknown keyword argument(s): {names}")


def _mixer_kwargs_for(name: str, mixer_kwargs: dict, names: set) -> dict:
    """The `linear_attn_` kwargs for mixer `name`. In a stack of one mixer every kwarg is its own (an unknown one is
    an error naming it); in a mixed stack each mixer takes those it accepts, and a kwarg no mixer takes is an error."""
    names = {n for n in names if exists(n)}
    if len(names) <= 1:
        return mixer_kwargs
    from x_transformers.mixers import mixer_class

    accepted = {n: set(inspect.signature(mixer_class(n).__init__).parameters) for n in names}
    unused = sorted(key for key in mixer_kwargs if not any(key in params for params in accepted.values()))
    if unused:
        raise ValueError(f"no mixer of {sorted(names)} takes {', '.join('linear_attn_' + k for k in unused)}")
    return {key: value for key, value in mixer_kwargs.items() if key in accepted[name]}


def _check_bool_mask(name, mask, shape):
    if not exists(mask):
        return
    if mask.dtype != torch.bool:
        raise TypeError(f"`{name}` must be a bool tensor (True = attend), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(mask.shape)}")


def _per_layer(name, value, layer_types):
    """A flag given once for every layer, or as a tuple / list with one entry per layer (in `layer_types` order)."""
    if not isinstance(value, (tuple, list)):
        return (value,) * len(layer_types)
    if len(value) != len(layer_types):
        raise ValueError(
            f"`{name}` has {len(value)} entries but the stack has {len(layer_types)} layers {tuple(layer_types)}; "
            "give one value, or one per layer"
        )
    return tuple(value)


# softmax-attention flags that configs shared between softmax and mixer stacks carry, and that a mixer stack may keep:
# a head size, an SDPA backend choice, and rotary positions (which also switch the absolute positional embedding off,
# their one effect on a mixer stack)
SHARED_ATTENTION_FLAGS = {"dim_head", "flash"}


def _check_softmax_only_flags(layer_types, *, attn_kwargs, cross_attn_kwargs, **flags):
    """Raise a ValueError naming any flag that acts only on softmax attention layers the stack does not have."""
    has_self, has_cross = "a" in layer_types, "c" in layer_types
    attn_kwargs = {key: value for key, value in attn_kwargs.items() if key not in SHARED_ATTENTION_FLAGS}
    # what each flag acts on: self attention only, or any softmax attention (self or cross)
    self_only = {"rel_pos_bias", "dynamic_pos_bias", "alibi_pos_bias", "residual_attn", "qkv_receive_diff_residuals"}
    cross_only = {"cross_residual_attn"}
    unused = []
    for name, on in flags.items():
        if not on:
            continue
        if name in self_only and not has_self:
            unused.append(name)
        elif name in cross_only and not has_cross:
            unused.append(name)
        elif name not in self_only | cross_only and not (has_self or has_cross):
            unused.append(name)
    if not (has_self or has_cross):
        unused += [f"attn_{key}" for key in attn_kwargs]
    if not has_cross:
        unused += [f"cross_attn_{key}" for key in cross_attn_kwargs]
    if unused:
        raise ValueError(
            f"{', '.join(unused)} only act on softmax attention layers, and this stack of linear_attn mixers has "
            f"{'no self-attention layer' if has_cross else 'none'} (layer types {tuple(layer_types)}); keep softmax "
            "layers with `hybrid_pattern` / `softmax_attn_layers`, or drop the flag"
        )


# the stack


class AttentionLayers(Module):
    def __init__(
        self,
        dim,
        depth=None,
        heads=8,
        causal=False,
        cross_attend=False,
        only_cross=False,
        use_scalenorm=False,  # arXiv 1910.05895
        use_rmsnorm=False,  # arXiv 1910.07467
        use_dynamic_tanh=False,  # DyT, arXiv 2503.10622
        use_derf=False,  # Derf, arXiv 2512.10938
        dynamic_tanh_init_alpha=1.0,
        use_simple_rmsnorm=False,  # arXiv 2307.14995
        use_adaptive_layernorm=False,  # arXiv 2212.09748 (DiT)
        use_adaptive_rmsnorm=False,
        use_adaptive_layerscale=False,  # ada-ln-zero, arXiv 2212.09748
        norm_add_unit_offset=True,
        dim_condition=None,
        adaptive_condition_mlp=False,
        adaptive_condition_mlp_expansion=4,
        alibi_pos_bias=False,  # arXiv 2108.12409
        alibi_num_heads=None,
        rel_pos_bias=False,  # T5, arXiv 1910.10683
        rel_pos_num_buckets=32,
        rel_pos_max_distance=128,
        dynamic_pos_bias=False,  # arXiv 2111.09883
        dynamic_pos_bias_log_distance=False,
        dynamic_pos_bias_mlp_depth=2,
        dynamic_pos_bias_norm=False,
        rotary_pos_emb=False,  # arXiv 2104.09864
        rotary_emb_dim=None,
        rotary_xpos=False,  # arXiv 2212.10554
        rotary_interpolation_factor=1.0,  # arXiv 2306.15595
        rotary_xpos_scale_base=512,
        rotary_base_rescale_factor=1.0,
        weight_tie_layers=False,  # arXiv 1807.03819 (universal transformer)
        custom_layers: tuple[str, ...] | None = None,
        layers_execute_order: tuple[int, ...] | None = None,
        sandwich_coef=None,  # arXiv 1911.03864
        par_ratio=None,  # arXiv 1911.03864
        residual_attn=False,  # arXiv 2012.11747
        cross_residual_attn=False,
        macaron=False,  # arXiv 1906.02762
        pre_norm=True,
        pre_norm_has_final_norm=True,
        pre_and_post_norm=False,  # a norm before each block and after each residual add, none at the end
        gate_residual=False,  # arXiv 1910.06764
        scale_residual=False,  # arXiv 2110.09456 (normformer)
        scale_residual_constant=1.0,
        shift_tokens=0,
        sandwich_norm=False,  # arXiv 2105.13290
        softclamp_output=False,
        softclamp_output_value=30.0,
        resi_dual=False,  # arXiv 2304.14802
        resi_dual_scale=1.0,
        zero_init_branch_output=False,
        layer_dropout=0.0,  # arXiv 1909.11556
        cross_attn_tokens_dropout=0.0,
        disable_abs_pos_emb=None,
        use_layerscale=False,  # arXiv 2103.17239
        layerscale_init_value=0.0,
        unet_skips=False,
        num_residual_streams=1,  # arXiv 2409.19606 (hyper-connections)
        qkv_receive_diff_residuals=False,
        reinject_input=False,  # arXiv 1909.01377
        learned_reinject_input_gate=False,
        add_value_residual=False,  # arXiv 2410.17897
        learned_value_residual_mix=True,
        linear_attn: str | tuple | None = None,  # mixer name (x_transformers.mixers), or one per block (None: softmax)
        hybrid_pattern: str | None = None,  # e.g. 'LLLN' tiled over the self-attention blocks
        hybrid_legend: dict[str, str] | None = None,  # letters of `hybrid_pattern` naming mixers, e.g. dict(K='kda')
        softmax_attn_layers: tuple[int, ...] | None = None,
        rel_pos_kwargs: dict = dict(),
        residual_fn_kwargs: dict = dict(),
        **kwargs,
    ):
        super().__init__()
        rotary_pos_emb = rotary_pos_emb or rotary_xpos

        ff_kwargs, kwargs = groupby_prefix_and_trim("ff_", kwargs)
        attn_kwargs, kwargs = groupby_prefix_and_trim("attn_", kwargs)
        cross_attn_kwargs, kwargs = groupby_prefix_and_trim("cross_attn_", kwargs)
        mixer_kwargs, kwargs = groupby_prefix_and_trim("linear_attn_", kwargs)
        user_attn_kwargs = dict(attn_kwargs)

        # tensor product attention (x_transformers/tensor_product_attention.py) in place of Attention for self attention
        tensor_product = attn_kwargs.pop("tensor_product", False)
        tensor_product_kwargs, attn_kwargs = groupby_prefix_and_trim("tensor_product_", attn_kwargs)
        if tensor_product_kwargs and not tensor_product:
            raise ValueError(f"{', '.join('attn_tensor_product_' + k for k in tensor_product_kwargs)} need "
                             "`attn_tensor_product=True`")
        if tensor_product:
            _check_routed_kwargs(TensorProductAttention, tensor_product_kwargs, "attn_tensor_product_", type(self).__name__)
            shared = ("dim_head", "flash", "dropout", "zero_init_output")
            other = sorted(set(attn_kwargs) - set(shared))
            if other:
                raise ValueError(f"tensor product attention does not take {', '.join('attn_' + k for k in other)}")
            tensor_product_kwargs.update({k: attn_kwargs[k] for k in shared if k in attn_kwargs})
            stack_flags = dict(add_value_residual=add_value_residual, residual_attn=residual_attn,
                               qkv_receive_diff_residuals=qkv_receive_diff_residuals)
            given = [name for name, on in stack_flags.items() if on]
            if given:
                raise ValueError(f"tensor product attention does not take {', '.join(given)}")

        if len(kwargs) > 0:
            raise TypeError(f"{type(self).__name__} got unknown keyword argument(s): {', '.join(sorted(kwargs))}")

        owner = type(self).__name__
        _check_routed_kwargs(Attention, attn_kwargs, "attn_", owner)
        _check_routed_kwargs(Attention, cross_attn_kwargs, "cross_attn_", owner)

        dim_head = attn_kwargs.get("dim_head", DEFAULT_DIM_HEAD)
        data_dependent_alibi = attn_kwargs.get("data_dependent_alibi", False)
        flash_attn = attn_kwargs.get("flash", False)

        self.dim = dim
        self.heads = heads
        self.causal = causal
        self.layers = ModuleList([])

        # hyper-connections - several residual streams mixed by learned weights (arXiv 2409.19606)
        assert num_residual_streams > 0, "`num_residual_streams` must be at least 1"
        assert not (num_residual_streams > 1 and gate_residual), "hyper-connections cannot be combined with `gate_residual`"
        assert not (num_residual_streams == 1 and qkv_receive_diff_residuals), "`qkv_receive_diff_residuals` needs `num_residual_streams` > 1"
        self.num_residual_streams = num_residual_streams
        self.stream_emb = nn.Parameter(torch.zeros(num_residual_streams, dim)) if num_residual_streams > 1 else None

        # positions - relative schemes switch the wrapper's absolute embedding off unless told otherwise
        self.disable_abs_pos_emb = default(disable_abs_pos_emb, (rel_pos_bias or rotary_pos_emb))

        # rotary - rotate a slice of each head's q/k by position (arXiv 2104.09864), optionally with xPos decay
        rotary_emb_dim = default(rotary_emb_dim, dim_head // 2)
        assert rotary_emb_dim <= dim_head, f"rotary emb dim {rotary_emb_dim} must be at most the head dimension {dim_head}"
        if rotary_pos_emb and rotary_emb_dim < 32:
            logger.warning("when training a language model, the rotary embedding dimension should be at least 32")
        assert not (rotary_xpos and not causal), "rotary xpos only works with causal attention"
        # xpos scales queries and keys by factors centred on the middle of the sequence, which cancel only in q . k:
        # memory keys (no position) and l2-distance logits (|k|^2) would make every output depend on the sequence's
        # total length, future tokens included
        if rotary_xpos and attn_kwargs.get("num_mem_kv", 0) > 0:
            raise ValueError("rotary_xpos cannot be combined with attn_num_mem_kv (memory keys carry no position for xpos)")
        if rotary_xpos and attn_kwargs.get("l2_distance", False):
            raise ValueError("rotary_xpos cannot be combined with attn_l2_distance (xpos scales only cancel in dot products)")
        if rotary_xpos and attn_kwargs.get("use_cope", False):
            raise ValueError("rotary_xpos cannot be combined with attn_use_cope (CoPE reads the xpos-scaled queries alone)")
        self.rotary_pos_emb = None
        if rotary_pos_emb:
            self.rotary_pos_emb = RotaryEmbedding(
                rotary_emb_dim,
                use_xpos=rotary_xpos,
                scale_base=rotary_xpos_scale_base,
                interpolation_factor=rotary_interpolation_factor,
                base_rescale_factor=rotary_base_rescale_factor,
            )

        # relative position biases - T5 buckets, dynamic MLP bias, or ALiBi; one at most
        assert at_most_one_of(alibi_pos_bias, rel_pos_bias, data_dependent_alibi), "choose at most one of ALiBi, data-dependent ALiBi or T5 relative bias"
        assert at_most_one_of(rel_pos_bias, dynamic_pos_bias, alibi_pos_bias), "choose at most one of T5, ALiBi or dynamic position bias"
        assert rel_pos_num_buckets <= rel_pos_max_distance, "`rel_pos_num_buckets` must not exceed `rel_pos_max_distance`"
        self.rel_pos = None
        if rel_pos_bias:
            assert not flash_attn, "flash attention is not compatible with T5 relative position bias"
            self.rel_pos = RelativePositionBias(
                scale=dim_head**0.5,
                causal=causal,
                heads=heads,
                num_buckets=rel_pos_num_buckets,
                max_distance=rel_pos_max_distance,
                **rel_pos_kwargs,
            )
        elif dynamic_pos_bias:
            assert not flash_attn, "flash attention is not compatible with dynamic position bias"
            self.rel_pos = DynamicPositionBias(
                dim=dim // 4,
                heads=heads,
                log_distance=dynamic_pos_bias_log_distance,
                depth=dynamic_pos_bias_mlp_depth,
                norm=dynamic_pos_bias_norm,
                **rel_pos_kwargs,
            )
        elif alibi_pos_bias:
            alibi_num_heads = default(alibi_num_heads, heads)
            assert alibi_num_heads <= heads, "`alibi_num_heads` must not exceed `heads`"
            self.rel_pos = AlibiPositionalBias(heads=alibi_num_heads, total_heads=heads, **rel_pos_kwargs)

        # resi-dual - post-norm stream plus a separately accumulated, normed-at-the-end pre-norm stream (arXiv 2304.14802)
        assert 0.0 < resi_dual_scale <= 1.0, "`resi_dual_scale` must be in (0, 1]"
        assert not (resi_dual and sandwich_norm), "`resi_dual` cannot be combined with `sandwich_norm`"
        assert not (resi_dual and num_residual_streams > 1), "`resi_dual` cannot be combined with hyper-connections"
        if resi_dual:
            pre_norm = False
        self.resi_dual = resi_dual
        self.resi_dual_scale = resi_dual_scale

        assert not (not pre_norm and sandwich_norm), "sandwich norm needs pre-norm"
        if pre_and_post_norm and not pre_norm:
            raise ValueError(
                "`pre_and_post_norm` adds a post-residual norm to pre-norm blocks; it needs `pre_norm=True` "
                "(and no `resi_dual`)"
            )
        self.pre_and_post_norm = pre_and_post_norm
        self.pre_norm = pre_norm
        self.sandwich_norm = sandwich_norm

        # residual attention - add the previous layer's attention logits to this one's (arXiv 2012.11747)
        assert not (flash_attn and (residual_attn or cross_residual_attn)), "flash attention is not compatible with residual attention"
        self.residual_attn = residual_attn
        self.cross_residual_attn = cross_residual_attn
        self.cross_attend = cross_attend

        # norm choice
        assert at_most_one_of(use_scalenorm, use_rmsnorm, use_dynamic_tanh, use_derf, use_simple_rmsnorm,
                              use_adaptive_layernorm, use_adaptive_rmsnorm), (
            "choose at most one of scalenorm, rmsnorm, dynamic tanh, derf, simple rmsnorm, adaptive layernorm, "
            "adaptive rmsnorm"
        )
        if use_dynamic_tanh and not pre_norm:
            raise ValueError("`use_dynamic_tanh` is only supported with pre-norm (`pre_norm=True`, no `resi_dual`)")
        if dynamic_tanh_init_alpha != 1.0 and not use_dynamic_tanh:
            raise ValueError("`dynamic_tanh_init_alpha` needs `use_dynamic_tanh=True`")
        dim_condition = default(dim_condition, dim)
        dim_condition_mult = adaptive_condition_mlp_expansion if adaptive_condition_mlp else 1
        norm_need_condition = use_adaptive_layernorm or use_adaptive_rmsnorm

        if use_scalenorm:
            norm_class = ScaleNorm
        elif use_rmsnorm:
            norm_class = RMSNorm
        elif use_simple_rmsnorm:
            norm_class = SimpleRMSNorm
        elif use_dynamic_tanh:
            norm_class = partial(DynamicTanh, init_alpha=dynamic_tanh_init_alpha)
        elif use_derf:
            norm_class = Derf
        elif use_adaptive_layernorm:
            norm_class = partial(AdaptiveLayerNorm, dim_condition=dim_condition * dim_condition_mult)
        elif use_adaptive_rmsnorm:
            norm_class = partial(AdaptiveRMSNorm, dim_condition=dim_condition * dim_condition_mult)
        else:
            norm_class = LayerNorm

        norm_fn = partial(norm_class, dim)
        # gammas stored as an offset from one can take weight decay safely
        if not norm_need_condition and norm_add_unit_offset:
            norm_fn = partial(norm_fn, unit_offset=True)

        self.norm_need_condition = norm_need_condition
        self.dim_condition = dim_condition

        # default block
        if cross_attend and not only_cross:
            default_block = ("a", "c", "f")
        elif cross_attend and only_cross:
            default_block = ("c", "f")
        else:
            default_block = ("a", "f")

        # macaron - a half-step feedforward before attention as well as after (arXiv 1906.02762)
        if macaron:
            default_block = ("f",) + default_block

        # layerscale / adaptive layerscale - scale each branch output by a learned (or condition-derived) gamma
        assert at_most_one_of(use_layerscale, use_adaptive_layerscale), "choose at most one of layerscale and adaptive layerscale"
        post_branch_fn = None
        if use_layerscale:
            post_branch_fn = partial(LayerScale, dim=dim, init_value=layerscale_init_value)
            if norm_add_unit_offset:
                post_branch_fn = partial(post_branch_fn, unit_offset=True)
        elif use_adaptive_layerscale:
            post_branch_fn = partial(AdaptiveLayerScale, dim=dim, dim_condition=dim_condition * dim_condition_mult)
        self.post_branch_fn_needs_condition = use_adaptive_layerscale

        # conditioning - an optional MLP expands the condition before the adaptive norms / layerscales consume it
        self.need_condition = norm_need_condition or self.post_branch_fn_needs_condition
        self.adaptive_mlp = nn.Identity()
        if self.need_condition and adaptive_condition_mlp:
            self.adaptive_mlp = nn.Sequential(LinearNoBias(dim_condition, dim_condition * dim_condition_mult), nn.SiLU())

        # zero init branch outputs
        if zero_init_branch_output:
            attn_kwargs = {**attn_kwargs, "zero_init_output": True}
            ff_kwargs = {**ff_kwargs, "zero_init_output": True}

        # weight tying - one block's worth of layers executed `depth` times (a special case of layers_execute_order)
        assert not (exists(layers_execute_order) and exists(custom_layers) and exists(depth)), (
            "do not pass `depth` together with `custom_layers` and `layers_execute_order`"
        )
        assert not (weight_tie_layers and any(map(exists, (custom_layers, par_ratio, sandwich_coef)))), (
            "`weight_tie_layers` cannot be combined with `custom_layers`, `par_ratio` or `sandwich_coef`"
        )
        if weight_tie_layers:
            assert exists(depth), "`depth` must be passed in with `weight_tie_layers = True`"
            assert not exists(layers_execute_order), "`weight_tie_layers` sets its own `layers_execute_order`"
            layers_execute_order = tuple(range(len(default_block))) * depth
            depth = 1

        # layer types, in order
        len_default_block = 1
        if exists(custom_layers):
            layer_types = tuple(custom_layers)
        elif exists(par_ratio):
            # sandwich of parameter-allocated attention first, feedforwards after (PAR transformer, arXiv 2009.04534)
            par_depth = depth * len(default_block)
            assert 1 < par_ratio <= par_depth, "par ratio out of range"
            default_block = tuple(filter(not_equals("f"), default_block))
            par_attn = par_depth // par_ratio
            depth_cut = par_depth * 2 // 3
            par_width = (depth_cut + depth_cut // par_attn) // par_attn
            assert len(default_block) <= par_width, "default block is too large for par_ratio"
            par_block = default_block + ("f",) * (par_width - len(default_block))
            par_head = par_block * par_attn
            layer_types = par_head + ("f",) * (par_depth - len(par_head))
        elif exists(sandwich_coef):
            assert 0 < sandwich_coef <= depth, "sandwich coefficient should be between 1 and the depth"
            layer_types = ("a",) * sandwich_coef + default_block * (depth - sandwich_coef) + ("f",) * sandwich_coef
        else:
            assert exists(depth), "`depth` must be passed in for `Decoder` or `Encoder`"
            layer_types = default_block * depth
            len_default_block = len(default_block)

        # mixed stacks - a mixer per self-attention block, tiled: `linear_attn` as a tuple (None: softmax attention), or
        # a `hybrid_pattern` whose letters the `hybrid_legend` names ('N' softmax, 'L' the `linear_attn` mixer)
        mixer_pattern = None
        if isinstance(linear_attn, (tuple, list)):
            if exists(hybrid_pattern) or exists(softmax_attn_layers) or exists(hybrid_legend):
                raise ValueError("`linear_attn` as a tuple places the mixers itself: drop `hybrid_pattern` / "
                                 "`softmax_attn_layers` / `hybrid_legend`")
            mixer_pattern = tuple(linear_attn)
        elif exists(hybrid_legend):
            if not exists(hybrid_pattern):
                raise ValueError("`hybrid_legend` names the letters of a `hybrid_pattern`, which is missing")
            legend = dict(hybrid_legend)
            if "N" in legend or ("L" in legend and exists(linear_attn)):
                raise ValueError("`hybrid_legend` may not redefine 'N' (softmax) or 'L' (the `linear_attn` mixer)")
            if exists(linear_attn):
                legend["L"] = linear_attn
            unknown = sorted(set(hybrid_pattern) - set(legend) - {"N"})
            if unknown or len(hybrid_pattern) == 0:
                raise ValueError(f"`hybrid_pattern={hybrid_pattern!r}` uses letters {unknown} that `hybrid_legend` "
                                 "does not name")
            mixer_pattern = tuple(None if letter == "N" else legend[letter] for letter in hybrid_pattern)
            hybrid_pattern = None
        if exists(mixer_pattern):
            if len(mixer_pattern) == 0 or not all(name is None or isinstance(name, str) for name in mixer_pattern):
                raise ValueError(f"a mixed stack names a mixer (or None for softmax) per block, got {mixer_pattern!r}")
            if all(name is None for name in mixer_pattern):
                raise ValueError("a mixed stack with no mixer: every entry is None (softmax attention)")
            linear_attn = next(name for name in mixer_pattern if exists(name))

        # linear mixers - swap some or all self-attention blocks for a linear-attention / RNN mixer (layer type 'l')
        if (exists(hybrid_pattern) or exists(softmax_attn_layers)) and not exists(linear_attn):
            raise ValueError("`hybrid_pattern` / `softmax_attn_layers` need `linear_attn` (the mixer name) to be set")
        if exists(hybrid_pattern) and exists(softmax_attn_layers):
            raise ValueError("pass only one of `hybrid_pattern` and `softmax_attn_layers`")
        if exists(hybrid_pattern) and (len(hybrid_pattern) == 0 or not set(hybrid_pattern) <= {"L", "N"}):
            raise ValueError(f"`hybrid_pattern` must be a non-empty string of 'L' (mixer) and 'N' (softmax), got {hybrid_pattern!r}")
        if len(mixer_kwargs) > 0 and not exists(linear_attn):
            raise ValueError(f"`linear_attn_` kwargs given without `linear_attn`: {', '.join('linear_attn_' + k for k in mixer_kwargs)}")
        if exists(linear_attn) and "a" not in layer_types and "l" not in layer_types:
            raise ValueError(
                f"`linear_attn={linear_attn!r}` replaces self-attention blocks, but this stack has none "
                f"(layer types {layer_types}); a mixer cannot cross attend"
            )
        num_self_attn_blocks = sum(1 for t in layer_types if t == "a")
        if exists(softmax_attn_layers):
            softmax_attn_layers = tuple(cast_tuple(softmax_attn_layers))
            bad = [
                i for i in softmax_attn_layers
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_self_attn_blocks
            ]
            if "l" in layer_types:
                raise ValueError(
                    "`softmax_attn_layers` places mixers by index; with 'l' entries in `custom_layers` they are placed"
                )
            if bad:
                raise ValueError(
                    f"`softmax_attn_layers` indexes the {num_self_attn_blocks} self-attention blocks (0 to "
                    f"{num_self_attn_blocks - 1}), got {bad}"
                )
            if len(set(softmax_attn_layers)) != len(softmax_attn_layers):
                raise ValueError(f"`softmax_attn_layers` lists a block twice: {softmax_attn_layers}")
        if (exists(hybrid_pattern) or exists(mixer_pattern)) and "l" in layer_types:
            raise ValueError("`hybrid_pattern` places mixers by pattern; with 'l' entries in `custom_layers` they are placed")
        # explicit 'l' entries in `custom_layers` place the mixers themselves; otherwise 'a' blocks are converted
        layer_mixers = [linear_attn if layer_type == "l" else None for layer_type in layer_types]
        if exists(linear_attn) and "a" in layer_types and "l" not in layer_types:
            new_types, attn_index, layer_mixers = [], 0, []
            for layer_type in layer_types:
                mixer_name = linear_attn
                if layer_type == "a":
                    if exists(mixer_pattern):
                        mixer_name = mixer_pattern[attn_index % len(mixer_pattern)]
                        use_mixer = exists(mixer_name)
                    elif exists(hybrid_pattern):
                        use_mixer = hybrid_pattern[attn_index % len(hybrid_pattern)] == "L"
                    elif exists(softmax_attn_layers):
                        use_mixer = attn_index not in tuple(softmax_attn_layers)
                    else:
                        use_mixer = True
                    layer_type = "l" if use_mixer else "a"
                    attn_index += 1
                new_types.append(layer_type)
                layer_mixers.append(mixer_name if layer_type == "l" else None)
            layer_types = tuple(new_types)
            if exists(mixer_pattern) and "l" not in layer_types:
                raise ValueError(f"`linear_attn={mixer_pattern!r}` over {num_self_attn_blocks} self-attention "
                                 "block(s) places no mixer; add depth")
            if exists(hybrid_pattern) and "N" in hybrid_pattern and "a" not in layer_types:
                raise ValueError(
                    f"`hybrid_pattern={hybrid_pattern!r}` over {num_self_attn_blocks} self-attention block(s) places no "
                    "softmax layer ('N'); shorten the pattern or add depth"
                )
        if "l" in layer_types and not exists(linear_attn):
            raise ValueError("layer type 'l' needs `linear_attn` (the mixer name) to be set")

        # flags that only act on softmax attention must find some: a pure mixer stack would silently ignore them
        if exists(linear_attn):
            _check_softmax_only_flags(
                layer_types,
                attn_kwargs=user_attn_kwargs,
                cross_attn_kwargs=cross_attn_kwargs,
                rel_pos_bias=rel_pos_bias,
                dynamic_pos_bias=dynamic_pos_bias,
                alibi_pos_bias=alibi_pos_bias,
                residual_attn=residual_attn,
                cross_residual_attn=cross_residual_attn,
                add_value_residual=add_value_residual,
                qkv_receive_diff_residuals=qkv_receive_diff_residuals,
            )

        # attn_ keywords reach the cross-attention layers too, where features defined over one sequence cannot work
        if "c" in layer_types:
            cross_kwargs = {**attn_kwargs, **cross_attn_kwargs}
            self_only = [
                name
                for name in ("data_dependent_alibi", "selective", "use_cope", "max_attend_past",
                             "neutreno_value_residual")
                if cross_kwargs.get(name)
            ]
            if self_only:
                raise ValueError(
                    f"{', '.join('attn_' + name for name in self_only)} act on self attention, and attn_ keywords reach "
                    f"the cross-attention layers too, which cannot use them; turn them off there with "
                    + ", ".join(f"cross_attn_{name}={'None' if name == 'max_attend_past' else 'False'}" for name in self_only)
                )

        self.layer_types = layer_types
        self.layers_execute_order = default(layers_execute_order, tuple(range(len(layer_types))))
        bad_order = [i for i in self.layers_execute_order if not isinstance(i, int) or not 0 <= i < len(layer_types)]
        if bad_order:
            raise ValueError(
                f"`layers_execute_order` indexes the {len(layer_types)} layers (0 to {len(layer_types) - 1}), got {bad_order}"
            )

        self.num_attn_layers = sum(1 for t in layer_types if t == "a")

        depth = default(depth, len(self.layers_execute_order))
        self.depth = depth

        # stochastic depth - drop whole layers at random while training (arXiv 1909.11556)
        self.layer_dropouts = _per_layer("layer_dropout", layer_dropout, layer_types)

        # structured dropout of the context tokens for cross attention
        self.cross_attn_tokens_dropout = cross_attn_tokens_dropout

        # token shifting - shift a slice of the features along the sequence before each block (RWKV-style)
        shift_tokens = _per_layer("shift_tokens", shift_tokens, layer_types)
        if any(amount < 0 for amount in shift_tokens):
            raise ValueError(f"`shift_tokens` must be non-negative, got {shift_tokens}")

        # output soft clamping before the final norm (Gemma 2)
        self.softclamp_output = softclamp_output
        self.softclamp_output_value = softclamp_output_value

        self.final_norm = norm_fn() if (pre_norm or resi_dual) and not pre_and_post_norm else nn.Identity()

        # u-net skips - the second half of the blocks concatenates the hidden of its mirror block in the first half
        self.unet_skips = unet_skips
        num_skips = self.depth // len_default_block
        assert not (unet_skips and num_skips == 0), "unet skip connections need a depth of at least 2"
        skip_indices = [i * len_default_block for i in range(num_skips)]
        self.skip_combines = ModuleList([])

        # input re-injection - add a projection of the stack's input to every layer's input (arXiv 1909.01377)
        self.reinject_input = reinject_input
        self.reinject_input_proj = nn.Linear(dim, dim, bias=False) if reinject_input else None
        self.learned_reinject_input_gate = nn.Linear(dim, 1, bias=False) if learned_reinject_input_gate else None

        # value residual - later self-attention blocks mix in the first block's values (arXiv 2410.17897)
        self.add_value_residual = add_value_residual
        learned_value_residual_mix &= add_value_residual
        is_first_self_attn = True

        # mixture of experts feedforwards, imported only when asked for
        moe_cls = None
        if exists(ff_kwargs.get("num_experts")):
            from x_transformers.moe import MoE as moe_cls

            # the routed experts have their own fixed MLP: these FeedForward flags would reach the shared experts only
            dense_only = [name for name in FF_DENSE_ONLY_FLAGS if name in ff_kwargs]
            if dense_only:
                raise ValueError(
                    f"{', '.join('ff_' + name for name in dense_only)} apply to the dense FeedForward only, not with "
                    "`ff_num_experts` (MoE experts)"
                )
        else:
            _check_routed_kwargs(FeedForward, ff_kwargs, "ff_", owner)

        make_mixer = None
        if exists(linear_attn):
            from x_transformers.mixers import make_mixer

        # what each mixer takes from the stack (`Mixer.stack_inputs`), by layer index
        mixer_stack_inputs = {}

        for ind, (layer_type, layer_shift_tokens) in enumerate(zip(self.layer_types, shift_tokens)):
            block_begin = divisible_by(ind, len_default_block)
            block_ind = ind // len_default_block

            if layer_type == "a" and tensor_product:
                layer = TensorProductAttention(dim, heads=heads, causal=causal, **tensor_product_kwargs)
            elif layer_type == "a":
                learned_mix = learned_value_residual_mix and not is_first_self_attn
                layer = Attention(
                    dim,
                    heads=heads,
                    causal=causal,
                    qkv_receive_diff_residuals=qkv_receive_diff_residuals,
                    learned_value_residual_mix=learned_mix,
                    **attn_kwargs,
                )
                is_first_self_attn = False
            elif layer_type == "c":
                layer = Attention(dim, heads=heads, **{**attn_kwargs, **cross_attn_kwargs})
            elif layer_type == "l":
                layer = make_mixer(
                    layer_mixers[ind], **{"dim": dim, "heads": heads, "causal": causal,
                                          **_mixer_kwargs_for(layer_mixers[ind], mixer_kwargs, set(layer_mixers))}
                )
                if zero_init_branch_output:
                    layer.zero_init_output()
                mixer_stack_inputs[ind] = (tuple(getattr(layer, "stack_inputs", ())), getattr(layer, "gate_width", None))
            elif layer_type == "f":
                layer = moe_cls(dim, **ff_kwargs) if exists(moe_cls) else FeedForward(dim, **ff_kwargs)
                layer = Scale(0.5, layer) if macaron else layer
            else:
                raise ValueError(f"invalid layer type {layer_type!r}, expected one of 'a', 'c', 'f', 'l'")

            if layer_shift_tokens > 0:
                lower = 0 if causal else -layer_shift_tokens
                layer = ShiftTokens(range(lower, layer_shift_tokens + 1), layer)

            if exists(post_branch_fn):
                layer = post_branch_fn(layer)

            if num_residual_streams > 1:
                residual_fn = partial(HyperConnection, num_residual_streams=num_residual_streams)
                if layer_type == "a" and qkv_receive_diff_residuals:
                    residual_fn = partial(residual_fn, num_input_views=3)
            elif gate_residual:
                residual_fn = GRUGating
            else:
                residual_fn = Residual

            residual = residual_fn(
                dim,
                layer_index=ind,
                scale_residual=scale_residual,
                scale_residual_constant=scale_residual_constant,
                **residual_fn_kwargs,
            )

            skip_combine = None
            if unet_skips and block_begin and block_ind >= (self.depth / 2):
                skip_combine = ConcatCombine(dim, skip_indices.pop())
            self.skip_combines.append(skip_combine)

            # (pre-branch norm, post-branch norm for sandwich, post-residual norm for post-norm)
            norms = ModuleList([
                norm_fn() if pre_norm else None,
                norm_fn() if sandwich_norm else None,
                norm_fn() if not pre_norm or pre_and_post_norm else None,
            ])

            self.layers.append(ModuleList([norms, layer, residual]))

        # layer-wise learned lower bounds of the forget gates (HGRN): one parameter for the whole stack, a cumulative
        # softmax over the layers that take one
        self.mixer_stack_inputs = {ind: names for ind, (names, _) in mixer_stack_inputs.items()}
        bounded = [(ind, width) for ind, (names, width) in mixer_stack_inputs.items() if "lower_bound" in names]
        self.mixer_lower_bounds = None
        self.lower_bound_index = {ind: k for k, (ind, _) in enumerate(bounded)}
        if bounded:
            from x_transformers.mixers.lower_bounds import LayerLowerBounds

            widths = {width for _, width in bounded}
            if len(widths) != 1:
                raise ValueError(f"learned lower bounds need one gate width across the layers, got {sorted(widths)}")
            self.mixer_lower_bounds = LayerLowerBounds(len(bounded), widths.pop())

        self.has_moe = exists(moe_cls)
        # a shifted token reads the previous tokens' inputs to its layer: a decode step gets them from the cache, where
        # each shifting layer keeps its last `amount` inputs (an entry of layer type 's' in attn_intermediates)
        self.layer_shifts = tuple(shift_tokens)
        self.can_cache_kv = all(getattr(module, "can_cache_kv", True) for module in self._mixing_modules())

    def _mixer_stack_kwargs(self, layer_index: int, first_mixer_values) -> dict:
        """The keyword inputs the mixer at `layer_index` takes from the stack: its learned lower bound, the first
        value-residual mixer's values (None for that first one)."""
        kwargs = {}
        for name in self.mixer_stack_inputs.get(layer_index, ()):
            if name == "lower_bound":
                kwargs[name] = self.mixer_lower_bounds(self.lower_bound_index[layer_index])
            elif name == "value_first":
                kwargs[name] = first_mixer_values
            else:
                raise ValueError(f"layer {layer_index}: the layer stack has no input {name!r} for its mixer")
        return kwargs

    def static_decode_refusal(self) -> str | None:
        """None if these layers decode with a `StaticCache`, else the flag or block that prevents it. Every block
        declares its own support (x_transformers/cache.py); the layer stack adds what it owns itself."""
        flags = dict(
            causal=not self.causal,
            rotary_xpos=exists(self.rotary_pos_emb) and exists(self.rotary_pos_emb.scale),
            rel_pos_bias=exists(self.rel_pos) and not hasattr(self.rel_pos, "forward_positions"),
        )
        name = next((name for name, on in flags.items() if on), None)
        if exists(name):
            return f"`{name}` decodes with the plain cache only" if name != "causal" else "an Encoder does not decode"
        for index, (layer_type, (_, block, _)) in enumerate(zip(self.layer_types, self.layers)):
            # cross attention recomputes its keys and values from the context at every call
            if layer_type == "c":
                continue
            reason = module_refusal(block, f"layer {index}")
            if exists(reason):
                return reason
        return None

    def _mixing_modules(self):
        # wrapped blocks too (token shift, layer scale): their own flags decide
        from x_transformers.mixers.base import Mixer

        for module in self.modules():
            if isinstance(module, (Attention, Mixer)) or type(module).__name__ == "MoE":
                yield module

    def forward(
        self,
        x,
        context=None,
        mask=None,
        context_mask=None,
        attn_mask=None,
        self_attn_kv_mask=None,
        mems=None,
        mem_masks=None,
        seq_start_pos: Tensor | None = None,
        cache: LayerIntermediates | None = None,
        cache_age=1,
        return_hiddens=False,
        rotary_pos_emb=None,
        pos=None,
        context_pos=None,
        attn_bias=None,
        condition=None,
        in_attn_cond=None,  # arXiv 2105.04090
        layers_execute_order: tuple[int, ...] | None = None,
        recurrent_states: list | None = None,
        seq_lens=None,
        cu_seqlens=None,
        flash_pack_seq_kwargs: dict | None = None,
        packing: Packing | None = None,
    ):
        """`recurrent_states`: the linear_attn mixers' states to start from, one per mixer call in execution order, as
        a previous call returned them (`[t.recurrent_state for t in intermediates.attn_intermediates if t.layer_type
        == 'l']`): a long sequence then runs in segments, as Transformer-XL memories do for softmax attention.

        Packed sequences (x_transformers/packing.py): `seq_lens`, `cu_seqlens`, `flash_pack_seq_kwargs`, position
        ids `pos` that restart at 0, or a built `packing`, describe the documents in each row; none of them sees
        another, and positions restart in each."""
        if not torch.is_tensor(x) or x.ndim != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects input of shape (batch, seq, {self.dim}), got {shape}")
        if self.cross_attend and not exists(context):
            raise ValueError("`context` must be passed in when `cross_attend = True`")
        if not self.cross_attend and exists(context):
            raise ValueError("`context` was passed in but the layers were built without `cross_attend = True`")
        if exists(condition) != self.need_condition:
            raise ValueError("`condition` must be passed in exactly when using adaptive layernorm / rmsnorm / layerscale")

        batch, seq_len = x.shape[:2]

        # static cache (x_transformers/cache.py) - x holds only the new tokens, every layer call writes its entry
        static = isinstance(cache, StaticCache)
        static_positions = None
        if static:
            static_cache, cache = cache, None
            # checked at prefill: the network does not change between the steps of one decode
            refusal = self.static_decode_refusal() if static_cache.fresh else None
            if exists(refusal):
                raise ValueError(f"this network cannot decode with a static cache: {refusal}")
            given = dict(mask=mask, attn_mask=attn_mask, mems=mems, recurrent_states=recurrent_states, pos=pos,
                         rotary_pos_emb=rotary_pos_emb, attn_bias=attn_bias)
            clash = [name for name, value in given.items() if exists(value)]
            if clash:
                raise ValueError(f"{clash} cannot be combined with a static cache; use `seq_start_pos` for left padding")
            if static_cache.batch != batch:
                raise ValueError(f"the static cache holds {static_cache.batch} rows, the input has {batch}")
            static_cache.check_room(seq_len)
            if static_cache.fresh:
                static_cache.reset(seq_start_pos)
            static_positions = static_cache.positions(seq_len)
            pos = static_positions

        _check_bool_mask("mask", mask, (batch, seq_len))
        _check_bool_mask("self_attn_kv_mask", self_attn_kv_mask, (batch, seq_len))

        # packed sequences - one description of the documents (offsets, positions) built here, read by every layer
        described = dict(seq_lens=seq_lens, cu_seqlens=cu_seqlens, flash_pack_seq_kwargs=flash_pack_seq_kwargs)
        if exists(packing) and any(exists(value) for value in described.values()):
            raise ValueError("give either a built `packing` or one description of the packed documents, not both")
        if not exists(packing):
            restart_pos = pos if not static and pos_restarts(pos) else None
            packing = build_packing(batch, seq_len, x.device, pos=restart_pos, **described)
        if exists(packing):
            if (packing.batch, packing.seq_len) != (batch, seq_len):
                raise ValueError(f"the packing describes rows of shape {(packing.batch, packing.seq_len)}, x has {(batch, seq_len)}")
            given = dict(cache=exists(cache) or static, mask=mask, self_attn_kv_mask=self_attn_kv_mask, mems=mems,
                         seq_start_pos=seq_start_pos, recurrent_states=recurrent_states, context=context,
                         rotary_pos_emb=rotary_pos_emb)
            clash = [name for name, value in given.items() if value is not None and value is not False]
            if clash:
                raise ValueError(f"packed sequences cannot be combined with {clash} (decode or pad documents unpacked)")
            if any(amount > 0 for amount in self.layer_shifts) or self.num_residual_streams > 1:
                raise ValueError("packed sequences are not supported with shift_tokens or hyper-connections")
            pos = packing.positions
        if exists(context):
            _check_bool_mask("context_mask", context_mask, context.shape[:2])

        # condition for adaptive norms / layerscale
        if exists(condition):
            if condition.shape[-1] != self.dim_condition:
                raise ValueError(f"expected condition dimension {self.dim_condition}, got {condition.shape[-1]}")
            if condition.ndim not in (2, 3):
                raise ValueError(f"`condition` must be (batch, dim) or (batch, seq, dim), got {tuple(condition.shape)}")
            if condition.ndim == 2:
                condition = rearrange(condition, "b d -> b 1 d")
            condition = self.adaptive_mlp(condition)

        norm_kwargs = dict(condition=condition) if self.norm_need_condition else dict()
        block_forward_kwargs = dict(condition=condition) if self.post_branch_fn_needs_condition else dict()

        hiddens = []
        layer_hiddens = []
        intermediates = []
        aux_losses = []

        prev_attn = None
        prev_cross_attn = None

        mems = list(mems) if exists(mems) else [None] * self.num_attn_layers
        mem_masks = list(mem_masks) if exists(mem_masks) else [None] * self.num_attn_layers

        # left-padded sequences - keys before each row's start position are masked out
        left_pad_mask = None
        if exists(seq_start_pos):
            positions = static_positions if static else arange(seq_len, device=x.device, dtype=torch.long)
            left_pad_mask = positions >= seq_start_pos[..., None]
            self_attn_kv_mask = left_pad_mask if not exists(self_attn_kv_mask) else (self_attn_kv_mask & left_pad_mask)

        # token shifting moves features of padding (mask, or left padding) into no real token, in any kind of block
        shift_mask = default(mask, left_pad_mask)

        # rotary positions, shifted back by the length of any Transformer-XL memories
        cross_attn_rotary_pos_emb = dict()
        if exists(self.rotary_pos_emb):
            if not exists(rotary_pos_emb):
                maybe_mem = first(mems, None)
                mem_len = maybe_mem.shape[1] if exists(maybe_mem) else 0
                if not exists(pos):
                    pos = arange(-mem_len, seq_len, device=x.device)
                rotary_pos_emb = self.rotary_pos_emb(pos)

            # cos / sin once per forward, shared by every layer
            rotary_pos_emb = RotaryTable.cast(rotary_pos_emb)

            if exists(context_pos):
                assert self.cross_attend
                cross_attn_rotary_pos_emb.update(
                    rotary_pos_emb=rotary_pos_emb,
                    context_rotary_pos_emb=RotaryTable.cast(self.rotary_pos_emb(context_pos)),
                )

        # kv cache - only the newest `cache_age` tokens are run; keys / values of the rest come from the cache
        attn_cache = []
        if exists(recurrent_states):
            stateless = [m.name for m in self._mixing_modules() if hasattr(m, "stack_inputs") and not m.can_cache_kv]
            if stateless:
                raise ValueError(f"`recurrent_states` cannot continue linear_attn={stateless[0]!r}: it keeps no state")
            if exists(cache):
                raise ValueError("pass either `cache` or `recurrent_states` (the cache holds the mixers' states already)")
            if not self.causal:
                raise ValueError("`recurrent_states` continue causal mixers; they do not apply to an Encoder")
            order = default(layers_execute_order, self.layers_execute_order)
            num_mixer_calls = sum(1 for i in order if self.layer_types[i] == "l")
            if len(recurrent_states) != num_mixer_calls:
                raise ValueError(f"`recurrent_states` needs one state per mixer call ({num_mixer_calls}), got {len(recurrent_states)}")
        iter_recurrent_states = iter(recurrent_states if exists(recurrent_states) else ())

        if exists(cache):
            if not self.causal:
                raise ValueError("`cache` can only be used with causal layers (Decoder)")
            if exists(mask) or exists(attn_mask):
                raise ValueError("`mask` / `attn_mask` cannot be combined with `cache`; use `seq_start_pos` for left padding")
            if exists(context):
                context = context[:, :0]
            if cache_age > 0:
                x = x[:, -cache_age:]
            attn_cache = cache.attn_intermediates

        # the token-shift tails ('s' entries) go to the shifting layers, everything else to its block
        iter_attn_cache = iter([t for t in attn_cache if t.layer_type != "s"])
        iter_shift_cache = iter([t for t in attn_cache if t.layer_type == "s"])

        # the mixers' mask: keep-mask over the whole sequence so far, its last columns aligned with x
        mixer_mask = default(mask, self_attn_kv_mask)

        layers_execute_order = default(layers_execute_order, self.layers_execute_order)
        layer_variables = [
            tuple(variable[i] for i in layers_execute_order)
            for variable in (self.layer_types, self.skip_combines, self.layers, self.layer_dropouts, self.layer_shifts)
        ]
        layer_indices = tuple(layers_execute_order)
        first_mixer_values = None
        pack_kwargs = dict(pack=packing) if exists(packing) else dict()

        # input re-injection (arXiv 1909.01377) or in-attention conditioning (arXiv 2105.04090)
        inp_inject = None
        if self.reinject_input:
            assert not exists(in_attn_cond), "`in_attn_cond` cannot be combined with `reinject_input`"
            inp_inject = self.reinject_input_proj(x)
        elif exists(in_attn_cond):
            inp_inject = in_attn_cond if in_attn_cond.ndim == 3 else rearrange(in_attn_cond, "b d -> b 1 d")

        if exists(inp_inject) and exists(self.learned_reinject_input_gate):
            inp_inject = inp_inject * self.learned_reinject_input_gate(x).sigmoid()

        # hyper-connections - the batch carries `s` residual streams, each seeded with its own learned embedding;
        # every block still sees a (b, n, d) input mixed from the streams, so masks and context stay as they are
        streams = self.num_residual_streams
        is_multistream = streams > 1
        if is_multistream:
            x = einx.add("b n d, s d -> (b s) n d", x, self.stream_emb)

        # resi-dual - the un-normed sum of all branch outputs, normed once at the end (arXiv 2304.14802)
        outer_residual = x * self.resi_dual_scale if self.resi_dual else None

        skip_hiddens = []
        first_self_attn_inter = None
        first_cross_attn_inter = None

        for call_index, (layer_type, skip_combine, (norms, block, residual_fn), layer_dropout, layer_shift) in enumerate(
            zip(*layer_variables)
        ):
            # u-net skips - stash every hidden, combine with the mirrored one where this layer has a combiner
            skip_hiddens.append(x)
            if exists(skip_combine):
                x = skip_combine(x, skip_hiddens)

            # a mixer's starting state (carried over from a previous segment), whether or not the layer runs
            layer_state = next(iter_recurrent_states, None) if layer_type == "l" else None

            # layer dropout - skip the whole layer at random while training
            if self.training and layer_dropout > 0.0 and random() < layer_dropout:
                # a skipped mixer hands its state on unchanged, so the returned states stay one per mixer call
                if exists(recurrent_states) and layer_type == "l" and return_hiddens:
                    intermediates.append(Intermediates(recurrent_state=layer_state, layer_type="l"))
                continue

            if layer_type == "a":
                if return_hiddens:
                    hiddens.append(x)
                layer_mem = mems.pop(0) if mems else None
                layer_mem_mask = mem_masks.pop(0) if mem_masks else None

            # cross-attention token dropout - drop whole context tokens while training
            if layer_type == "c" and self.training and self.cross_attn_tokens_dropout > 0.0:
                context, context_mask = dropout_seq(context, context_mask, self.cross_attn_tokens_dropout)

            x, inner_residual, residual_kwargs = residual_fn.prepare(x)

            if return_hiddens:
                layer_hiddens.append(x)

            pre_norm, post_branch_norm, post_main_norm = norms
            if self.need_condition:
                pre_norm, post_branch_norm, post_main_norm = (
                    maybe(partial)(norm, **norm_kwargs) for norm in (pre_norm, post_branch_norm, post_main_norm)
                )

            if exists(inp_inject):
                x = x + inp_inject

            if exists(pre_norm):
                x = pre_norm(x)
                if layer_type == "a" and exists(layer_mem):
                    layer_mem = pre_norm(layer_mem)

            shift_kwargs = dict()
            if layer_shift > 0:
                if static:
                    shift_entry = static_cache.entry(call_index, "shift")
                    prev_tail = None if static_cache.fresh else shift_entry.state[0]
                else:
                    prev_tail = next(iter_shift_cache, None)
                    prev_tail = prev_tail.recurrent_state[0] if exists(prev_tail) else None
                shift_kwargs = dict(shift_mask=shift_mask, shift_tail=prev_tail)
                block_input = x

            block = partial(block, **block_forward_kwargs, **shift_kwargs)

            # value residual - hand the first self / cross attention's values to the later ones
            self_value_residual = cross_value_residual = None
            if self.add_value_residual:
                self_value_residual = first_self_attn_inter.values if exists(first_self_attn_inter) else None
                cross_value_residual = first_cross_attn_inter.values if exists(first_cross_attn_inter) else None

            inter = None
            if layer_type == "a":
                out, inter = block(
                    x,
                    mask=mask,
                    context_mask=self_attn_kv_mask,
                    attn_mask=attn_mask,
                    rel_pos=self.rel_pos,
                    pos=None if static or exists(packing) else pos,
                    rotary_pos_emb=rotary_pos_emb,
                    prev_attn=prev_attn,
                    cache=next(iter_attn_cache, None),
                    **(dict(static_kv=static_cache.entry(call_index, "kv")) if static else dict()),
                    mem=layer_mem,
                    mem_mask=layer_mem_mask,
                    attn_bias=attn_bias,
                    value_residual=self_value_residual,
                    return_intermediates=True,
                    **pack_kwargs,
                )
            elif layer_type == "c":
                out, inter = block(
                    x,
                    context=context,
                    mask=mask,
                    context_mask=context_mask,
                    prev_attn=prev_cross_attn,
                    cache=next(iter_attn_cache, None),
                    value_residual=cross_value_residual,
                    **cross_attn_rotary_pos_emb,
                    return_intermediates=True,
                )
            elif layer_type == "l":
                layer_cache = next(iter_attn_cache, None)
                if exists(layer_state):
                    layer_cache = Intermediates(recurrent_state=layer_state, layer_type="l")
                if static:
                    state_entry = static_cache.entry(call_index, "state")
                    if not static_cache.fresh:
                        layer_cache = Intermediates(recurrent_state=state_entry.state, layer_type="l")
                stack_kwargs = self._mixer_stack_kwargs(layer_indices[call_index], first_mixer_values)
                out, inter = block(
                    x, mask=mixer_mask, cache=layer_cache, return_intermediates=True, **stack_kwargs, **pack_kwargs
                )
                if "value_first" in stack_kwargs and not exists(first_mixer_values):
                    first_mixer_values = inter.values
                if static:
                    state_entry.store(inter.recurrent_state)
            elif self.has_moe:
                # decoding with a static cache trains no router: no aux loss
                out, aux_loss = block(x, mask=mask, **(dict(with_aux_loss=False) if static else dict()))
                if exists(aux_loss):
                    aux_losses.append(aux_loss)
            else:
                out = block(x)

            if layer_type == "a" and not exists(first_self_attn_inter):
                first_self_attn_inter = inter
            if layer_type == "c" and not exists(first_cross_attn_inter):
                first_cross_attn_inter = inter

            # sandwich norm - also normalize the branch output (arXiv 2105.13290)
            if exists(post_branch_norm):
                out = post_branch_norm(out)

            x = residual_fn(out, inner_residual, **residual_kwargs)

            if self.resi_dual:
                outer_residual = outer_residual + out * self.resi_dual_scale

            if exists(inter) and return_hiddens:
                inter.layer_type = layer_type
                intermediates.append(inter)

            if layer_shift > 0 and (static or (return_hiddens and self.causal)):
                tail = shift_tail(block_input, layer_shift, mask=shift_mask, prev_tail=shift_kwargs["shift_tail"])
                if static:
                    shift_entry.store((tail,))
                else:
                    intermediates.append(Intermediates(recurrent_state=(tail,), layer_type="s"))

            if layer_type == "a" and self.residual_attn:
                prev_attn = inter.pre_softmax_attn
            elif layer_type == "c" and self.cross_residual_attn:
                prev_cross_attn = inter.pre_softmax_attn

            if exists(post_main_norm):
                x = post_main_norm(x)

        if return_hiddens:
            layer_hiddens.append(x)

        if self.softclamp_output:
            x = softclamp(x, self.softclamp_output_value)

        final_norm = self.final_norm
        if self.need_condition:
            final_norm = maybe(partial)(final_norm, **norm_kwargs)

        # hyper-connections - sum the residual streams back into one
        if is_multistream:
            x = reduce(x, "(b s) n d -> b n d", "sum", s=streams)

        if self.resi_dual:
            x = x + final_norm(outer_residual)
        else:
            x = final_norm(x)

        if static:
            static_cache.advance(seq_len)

        if not return_hiddens:
            return x

        return x, LayerIntermediates(
            hiddens=hiddens,
            last_hidden=x,
            attn_intermediates=intermediates,
            layer_hiddens=layer_hiddens,
            aux_loss=sum(aux_losses) if len(aux_losses) > 0 else None,
        )


class Encoder(AttentionLayers):
    def __init__(self, **kwargs):
        assert "causal" not in kwargs, "cannot set causality on encoder"
        super().__init__(causal=False, **kwargs)


class Decoder(AttentionLayers):
    def __init__(self, **kwargs):
        assert "causal" not in kwargs, "cannot set causality on decoder"
        super().__init__(causal=True, **kwargs)


class PrefixDecoder(AttentionLayers):
    """Bidirectional over a prefix of `prefix_attn_len` tokens, causal after it."""

    def __init__(self, **kwargs):
        assert "causal" not in kwargs, "cannot set causality on decoder"
        super().__init__(causal=False, **kwargs)

    def forward(self, x, *args, attn_mask=None, prefix_attn_len=None, **kwargs):
        b, n, device = x.shape[0], x.shape[1], x.device
        allowed = torch.ones((n, n), device=device, dtype=torch.bool).tril()

        if exists(prefix_attn_len):
            if isinstance(prefix_attn_len, int):
                prefix_attn_len = torch.full((b,), prefix_attn_len, device=device)
            prefix_mask = arange(n, device=device) < rearrange(prefix_attn_len, "b -> b 1 1 1")
            allowed = allowed | prefix_mask

        if exists(attn_mask):
            allowed = allowed & attn_mask

        return super().forward(x, *args, attn_mask=allowed, **kwargs)


class CrossAttender(AttentionLayers):
    def __init__(self, **kwargs):
        super().__init__(cross_attend=True, only_cross=True, **kwargs)


# wrappers


class ViTransformerWrapper(Module):
    def __init__(
        self,
        *,
        image_size,
        patch_size,
        attn_layers: Encoder,
        channels=3,
        num_classes=None,
        post_emb_norm=False,
        num_register_tokens=0,  # arXiv 2309.16588
        emb_dropout=0.0,
    ):
        super().__init__()
        assert isinstance(attn_layers, AttentionLayers), "`attn_layers` must be an Encoder"
        assert divisible_by(image_size, patch_size), "image dimensions must be divisible by the patch size"
        dim = attn_layers.dim
        num_patches = (image_size // patch_size) ** 2
        patch_dim = channels * patch_size**2

        self.image_size = image_size
        self.patch_size = patch_size
        self.channels = channels

        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches, dim))

        # register tokens - extra learned tokens the model can use as scratch space, dropped at the output
        self.has_register_tokens = num_register_tokens > 0
        if self.has_register_tokens:
            self.register_tokens = nn.Parameter(torch.randn(num_register_tokens, dim))

        self.patch_to_embedding = nn.Sequential(LayerNorm(patch_dim), nn.Linear(patch_dim, dim), LayerNorm(dim))

        self.post_emb_norm = LayerNorm(dim) if post_emb_norm else nn.Identity()
        self.dropout = nn.Dropout(emb_dropout)

        self.attn_layers = attn_layers

        self.mlp_head = nn.Linear(dim, num_classes) if exists(num_classes) else nn.Identity()

    def forward(self, img, return_embeddings=False, return_logits_and_embeddings=False):
        if not torch.is_tensor(img) or img.ndim != 4 or not img.is_floating_point():
            shape = tuple(img.shape) if torch.is_tensor(img) else type(img).__name__
            raise ValueError(f"ViTransformerWrapper expects a float image batch (batch, channels, height, width), got {shape}")
        b, c, h, w = img.shape
        p = self.patch_size
        if c != self.channels:
            raise ValueError(f"expected {self.channels} image channels, got {c}")
        if not (divisible_by(h, p) and divisible_by(w, p)) or (h // p) * (w // p) > self.pos_embedding.shape[1]:
            raise ValueError(f"image of size {h}x{w} does not fit patch size {p} and image size {self.image_size}")
        assert at_most_one_of(return_embeddings, return_logits_and_embeddings)

        x = rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x = self.patch_to_embedding(x)
        x = x + self.pos_embedding[:, : x.shape[1]]

        x = self.post_emb_norm(x)
        x = self.dropout(x)

        if self.has_register_tokens:
            registers = repeat(self.register_tokens, "n d -> b n d", b=b)
            x, packed_shape = pack((x, registers), "b * d")

        embed = self.attn_layers(x)

        if self.has_register_tokens:
            embed, _ = unpack(embed, packed_shape, "b * d")

        # without `num_classes` the head is an identity, so the mean-pooled embedding comes back
        if return_embeddings:
            return embed

        logits = self.mlp_head(embed.mean(dim=-2))

        if not return_logits_and_embeddings:
            return logits

        return logits, embed


class TransformerWrapper(Module):
    def __init__(
        self,
        *,
        num_tokens,
        max_seq_len,
        attn_layers: AttentionLayers,
        embed_num_tokens: dict[str, int] = dict(),
        emb_dim=None,
        max_mem_len=0,
        shift_mem_down=0,
        emb_dropout=0.0,
        post_emb_norm=False,
        num_memory_tokens=None,  # arXiv 2006.11527
        memory_tokens_interspersed_every=None,
        tie_embedding=False,
        logits_dim=None,
        return_only_embed=False,
        num_output_heads=1,
        use_abs_pos_emb=True,
        scaled_sinu_pos_emb=False,
        l2norm_embed=False,  # fixnorm, arXiv 1710.01329
        recycling=False,  # AlphaFold2
        train_max_recycle_steps=4,
        emb_frac_gradient=1.0,  # arXiv 2105.13290
        attn_z_loss_weight=1e-4,
        average_pool_embed=False,
        use_cls_token=False,
        num_cls_tokens=1,
        attn_pool=False,  # pooling by attention from learned queries
        num_attn_pool_queries=1,
        squeeze_out_last_dim=False,
        token_emb: TokenEmbedding | None = None,
        mixture_of_softmax=False,  # arXiv 1711.03953
        mixture_of_softmax_k=4,
        sigsoftmax_logits=False,  # arXiv 1805.10829
        to_logits: Module | None = None,
    ):
        super().__init__()
        if not isinstance(attn_layers, AttentionLayers):
            raise TypeError(f"`attn_layers` must be an AttentionLayers (Encoder / Decoder / ...), got {type(attn_layers).__name__}")

        dim = attn_layers.dim
        emb_dim = default(emb_dim, dim)
        self.emb_dim = emb_dim
        self.num_tokens = num_tokens
        self.num_cls_tokens = num_cls_tokens

        self.max_seq_len = max_seq_len
        self.max_mem_len = max_mem_len
        self.shift_mem_down = shift_mem_down

        self.l2norm_embed = l2norm_embed

        if not exists(token_emb):
            token_emb = TokenEmbedding(emb_dim, num_tokens, l2norm_embed=l2norm_embed)
        self.token_emb = token_emb

        # absolute positions - off when the layers use relative positions, or max_seq_len is 0
        no_abs_pos_emb = max_seq_len == 0 or not (use_abs_pos_emb and not attn_layers.disable_abs_pos_emb)
        self.has_abs_pos_emb = not no_abs_pos_emb
        if no_abs_pos_emb:
            self.pos_emb = always(0)
        elif scaled_sinu_pos_emb:
            self.pos_emb = ScaledSinusoidalEmbedding(emb_dim)
        else:
            self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len, l2norm_embed=l2norm_embed)
        self.checks_max_seq_len = isinstance(self.pos_emb, AbsolutePositionalEmbedding)

        # extra embeddings summed onto the tokens (e.g. BERT's segment embedding)
        self.embeds = None
        if len(embed_num_tokens) > 0:
            self.embeds = ModuleDict({f"{name}_embed": nn.Embedding(count, emb_dim) for name, count in embed_num_tokens.items()})

        # embedding gradient fraction (CogView, GLM-130B)
        self.emb_frac_gradient = emb_frac_gradient

        self.post_emb_norm = LayerNorm(emb_dim) if post_emb_norm else nn.Identity()
        self.emb_dropout = nn.Dropout(emb_dropout)

        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.attn_layers = attn_layers

        self.init_()

        assert num_output_heads > 0, "`num_output_heads` must be at least 1"
        assert at_most_one_of(average_pool_embed, use_cls_token, attn_pool), "choose at most one of average pooling, cls token and attention pooling"

        # recycling - run the stack several times, feeding back a projection of its last output (AlphaFold2)
        self.recycling = recycling
        self.recycled_proj = LinearNoBias(dim, dim) if recycling else None
        self.train_max_recycle_steps = train_max_recycle_steps

        # cls tokens - prepended learned tokens whose outputs are the pooled representation
        self.cls_token = None
        if use_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(num_cls_tokens, dim))
            nn.init.normal_(self.cls_token, std=0.02)

        # average pooling over the (unmasked) sequence
        self.average_pool_embed = average_pool_embed

        # attention pooling - learned queries cross-attend to the stack's output; one query gives (b, d)
        self.attn_pool = None
        self.num_attn_pool_queries = num_attn_pool_queries
        if attn_pool:
            assert num_attn_pool_queries > 0, "`num_attn_pool_queries` must be at least 1"
            self.attn_pool_queries = nn.Parameter(torch.zeros(num_attn_pool_queries, dim))
            nn.init.normal_(self.attn_pool_queries, std=0.02)
            self.attn_pool = Attention(dim=dim, heads=attn_layers.heads)

        # mixture of softmaxes - k softmaxes mixed by a learned gate (arXiv 1711.03953)
        self.output_is_log_prob = mixture_of_softmax
        self.to_mixture = None
        self.combine_mixture = None
        if mixture_of_softmax:
            assert num_output_heads == 1, "mixture of softmax supports a single output head"
            self.to_mixture = Sequential(
                LinearNoBias(dim, dim * mixture_of_softmax_k),
                Rearrange("... (k d) -> ... k d", k=mixture_of_softmax_k),
            )
            self.combine_mixture = LinearNoBias(dim, mixture_of_softmax_k)

        # sigsoftmax (arXiv 1805.10829)
        self.sigsoftmax_logits = sigsoftmax_logits

        # output head(s)
        logits_dim = default(logits_dim, num_tokens)
        self.has_multiple_heads = num_output_heads > 1

        if return_only_embed:
            self.to_logits = None
        elif tie_embedding:
            assert isinstance(token_emb, TokenEmbedding), "can only tie the embedding when using `TokenEmbedding`"
            self.to_logits = TiedEmbeddingLogits(self)
        elif num_output_heads > 1:
            self.to_logits = ModuleList([LinearNoBias(dim, logits_dim) for _ in range(num_output_heads)])
        else:
            self.to_logits = LinearNoBias(dim, logits_dim) if not exists(to_logits) else to_logits

        # memory tokens - learned tokens prepended to every sequence (Memory Transformer, arXiv 2006.11527)
        num_memory_tokens = default(num_memory_tokens, 0)
        self.num_memory_tokens = num_memory_tokens
        if num_memory_tokens > 0:
            self.memory_tokens = nn.Parameter(torch.randn(num_memory_tokens, dim))
        self.memory_tokens_interspersed_every = memory_tokens_interspersed_every

        self.squeeze_out_last_dim = squeeze_out_last_dim

        self.can_cache_kv = self.num_memory_tokens == 0 and not recycling and self.attn_layers.can_cache_kv
        self.can_cache_kv_outside_max_seq_len = no_abs_pos_emb

    def init_(self):
        if hasattr(self.token_emb, "init_"):
            self.token_emb.init_()

        if self.l2norm_embed and isinstance(self.pos_emb, AbsolutePositionalEmbedding):
            nn.init.normal_(self.pos_emb.emb.weight, std=1e-5)

    def static_decode_refusal(self) -> str | None:
        """None if this network decodes with a `StaticCache` (x_transformers/cache.py), else the flag that prevents
        it."""
        flags = dict(
            num_memory_tokens=self.num_memory_tokens > 0,
            recycling=self.recycling,
            num_cls_tokens=exists(self.cls_token),
            attn_pool=exists(self.attn_pool),
            average_pool_embed=self.average_pool_embed,
        )
        name = next((name for name, on in flags.items() if on), None)
        if exists(name):
            return f"`{name}` decodes with the plain cache only"
        return static_cache_refusal(self.attn_layers)

    def _check_input(self, x, mask, pos):
        if not isinstance(self.token_emb, (TokenEmbedding, nn.Embedding)):
            return
        if not torch.is_tensor(x) or x.ndim != 2:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"TransformerWrapper expects token ids of shape (batch, seq), got {shape}")
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"token ids must be an integer tensor, got dtype {x.dtype}")
        _check_bool_mask("mask", mask, x.shape)
        n = x.shape[1]
        if self.checks_max_seq_len and not exists(pos) and n > self.max_seq_len:
            raise ValueError(
                f"sequence length {n} exceeds max_seq_len {self.max_seq_len} of the absolute positional embedding; "
                "pass a shorter sequence, raise max_seq_len, or use relative positions (e.g. rotary_pos_emb = True)"
            )

    def forward(
        self,
        x,
        return_embeddings=False,
        return_logits_and_embeddings=False,
        return_intermediates=False,
        return_logit_entropies=False,
        mask=None,
        return_mems=False,
        return_attn=False,
        mems=None,
        mem_masks=None,
        recycle_steps=None,
        pos=None,
        prepend_embeds=None,
        prepend_mask=None,
        embed_ids: dict[str, Tensor] = dict(),
        sum_embeds=None,
        return_attn_z_loss=False,
        attn_z_loss_weight=1e-4,
        seq_start_pos=None,
        cache: LayerIntermediates | None = None,
        token_emb_kwargs=dict(),
        to_logits_kwargs=dict(),
        **kwargs,
    ):
        self._check_input(x, mask, pos)

        b, n, device = x.shape[0], x.shape[1], x.device
        num_mems, has_memory_tokens = self.num_memory_tokens, self.num_memory_tokens > 0
        orig_mask = mask

        # packed sequences (x_transformers/packing.py) - absolute positions restart in every document; the layers
        # get the same description
        packing = build_packing(
            b, n, device,
            seq_lens=kwargs.pop("seq_lens", None),
            cu_seqlens=kwargs.pop("cu_seqlens", None),
            pos=pos if pos_restarts(pos) else None,
            flash_pack_seq_kwargs=kwargs.pop("flash_pack_seq_kwargs", None),
        )
        if exists(packing):
            given = dict(cache=cache, mask=mask, mems=mems, seq_start_pos=seq_start_pos, prepend_embeds=prepend_embeds,
                         cls_tokens=self.cls_token, memory_tokens=has_memory_tokens or None)
            clash = [name for name, value in given.items() if exists(value)]
            if clash:
                raise ValueError(f"packed sequences cannot be combined with {clash} (decode or pad documents unpacked)")
            pos = packing.positions
            kwargs["packing"] = packing

        return_hiddens = return_mems | return_attn | return_intermediates | return_attn_z_loss
        return_embeddings = return_embeddings | (not exists(self.to_logits))

        # static cache - the new tokens sit at the cache's positions, rows starting where the prefill said
        static = isinstance(cache, StaticCache)
        if static:
            # checked at prefill: the network does not change between the steps of one decode
            refusal = self.static_decode_refusal() if cache.fresh else None
            if exists(refusal):
                raise ValueError(f"this network cannot decode with a static cache: {refusal}")
            if exists(pos) or exists(mask):
                raise ValueError("`pos` / `mask` cannot be combined with a static cache; use `seq_start_pos` for left padding")
            if cache.fresh:
                cache.reset(seq_start_pos)

        # token + absolute positional embedding (a float `pos` is taken as an external positional embedding); with a
        # static cache the positions are the cache's, counted from each row's start (the layers only need
        # `seq_start_pos` at prefill, to mask the padding: later tokens are all real)
        external_pos_emb = exists(pos) and pos.dtype != torch.long
        emb_pos, emb_start_pos = (cache.positions(n), cache.start) if static else (pos, seq_start_pos)
        pos_emb = pos if external_pos_emb else self.pos_emb(x, pos=emb_pos, seq_start_pos=emb_start_pos)
        x = self.token_emb(x, **token_emb_kwargs) + pos_emb

        # extra embeddings by name
        if exists(self.embeds) != (len(embed_ids) > 0):
            raise ValueError("`embed_ids` must be given exactly when `embed_num_tokens` was set on TransformerWrapper")
        if exists(self.embeds):
            missing = set(self.embeds) - {f"{name}_embed" for name in embed_ids}
            unknown = [name for name in embed_ids if f"{name}_embed" not in self.embeds]
            if missing or unknown:
                raise ValueError(f"`embed_ids` must have exactly the names of `embed_num_tokens`; unknown: {unknown}, missing: {sorted(missing)}")
            for name, embed_id in embed_ids.items():
                x = x + self.embeds[f"{name}_embed"](embed_id)

        # externally summed embeddings (self-conditioning in non-autoregressive training)
        if exists(sum_embeds):
            x = x + sum_embeds

        x = self.post_emb_norm(x)

        # prepended embeddings (PaLI-style image tokens), with the mask extended to cover them
        if exists(prepend_embeds):
            prepend_seq, prepend_dim = prepend_embeds.shape[1:]
            if prepend_dim != x.shape[-1]:
                raise ValueError(f"prepended embeddings must have dimension {x.shape[-1]}, got {prepend_dim}")
            x = cat((prepend_embeds, x), dim=-2)

            if exists(prepend_mask) or exists(mask):
                mask = default(mask, lambda: torch.ones((b, n), device=device, dtype=torch.bool))
                prepend_mask = default(prepend_mask, lambda: torch.ones((b, prepend_seq), device=device, dtype=torch.bool))
                mask = cat((prepend_mask, mask), dim=-1)

        pool_mask = mask

        # embedding gradient fraction (CogView / GLM-130B)
        if self.emb_frac_gradient < 1:
            assert self.emb_frac_gradient > 0
            frac = self.emb_frac_gradient
            x = x * frac + x.detach() * (1 - frac)

        x = self.emb_dropout(x)
        x = self.project_emb(x)

        # cls tokens in front
        if exists(self.cls_token):
            cls_tokens = repeat(self.cls_token, "... -> b ...", b=b)
            x, cls_packed_shape = pack([cls_tokens, x], "b * d")
            if exists(mask):
                mask = F.pad(mask, (self.num_cls_tokens, 0), value=True)

        # memory tokens in front, or in front of every `mem_every` tokens
        if has_memory_tokens:
            mem_seq = x.shape[-2]
            mem_every = self.memory_tokens_interspersed_every
            x, mask, mem_packed_shape = add_memory_tokens(
                x, self.memory_tokens, mask, mem_every, isinstance(self.attn_layers, Decoder)
            )

        # Transformer-XL memories, optionally rotated down by `shift_mem_down` layers (enhanced recurrence)
        if self.shift_mem_down and exists(mems):
            mems_l, mems_r = mems[: self.shift_mem_down], mems[self.shift_mem_down :]
            mems = [*mems_r, *mems_l]

        layer_kwargs = dict(mask=mask, mems=mems, mem_masks=mem_masks, cache=cache, return_hiddens=True, seq_start_pos=seq_start_pos, **kwargs)

        if not self.recycling:
            if exists(recycle_steps) and recycle_steps != 1:
                raise ValueError("`recycle_steps` given but the model was not built with `recycling = True`")
            attended, intermediates = self.attn_layers(x, **layer_kwargs)
        else:
            # recycling - only the last pass gets gradients
            recycle_steps = default(recycle_steps, (randrange(self.train_max_recycle_steps) + 1) if self.training else None)
            if not (exists(recycle_steps) and recycle_steps > 0):
                raise ValueError("`recycle_steps` must be passed in on forward when recycling is on and not training")

            for i in range(recycle_steps):
                is_last = i == (recycle_steps - 1)
                with nullcontext() if is_last else torch.no_grad():
                    recycled = self.recycled_proj(attended.detach()) if i > 0 else 0.0
                    attended, intermediates = self.attn_layers(x + recycled, **layer_kwargs)

        x = attended

        # strip the memory tokens back out
        if has_memory_tokens:
            x, intermediates.memory_tokens = remove_memory_tokens(x, mem_packed_shape, num_mems, mem_every, mem_seq)

        # pooling - average, cls tokens, or attention from learned queries
        if self.average_pool_embed:
            x = masked_mean(x, mask=orig_mask, dim=1)

        if exists(self.cls_token):
            x, _ = unpack(x, cls_packed_shape, "b * d")
            x = x.squeeze(1)

        if exists(self.attn_pool):
            queries = repeat(self.attn_pool_queries, "n d -> b n d", b=x.shape[0])
            x = self.attn_pool(queries, context=x, context_mask=pool_mask)
            if self.num_attn_pool_queries == 1:
                x = rearrange(x, "b 1 d -> b d")

        combine_mixture = None
        if exists(self.to_mixture):
            combine_mixture = self.combine_mixture(x).softmax(dim=-1)
            x = self.to_mixture(x)

        if not return_embeddings:
            if self.has_multiple_heads:
                logits = tuple(fn(x, **to_logits_kwargs) for fn in self.to_logits)
            else:
                logits = self.to_logits(x, **to_logits_kwargs)

            if self.sigsoftmax_logits:
                logits = logits + logits.sigmoid().log()

            # mixture of softmaxes - the output becomes log probabilities
            if exists(combine_mixture):
                with autocast("cuda", enabled=False):
                    prob = logits.softmax(dim=-1)
                    mos = torch.einsum("... k d, ... k -> ... d", prob, combine_mixture)
                    logits = log(mos)

            if self.squeeze_out_last_dim:
                logits = tuple((rearrange(t, "... 1 -> ...") if t.shape[-1] == 1 else t) for t in cast_tuple(logits))
                if not self.has_multiple_heads:
                    logits = first(logits)

        if return_logits_and_embeddings:
            out = (logits, x)
        elif return_embeddings:
            out = x
        else:
            out = logits

        if return_logit_entropies:
            intermediates.logit_entropies = calc_entropy(logits)
            return_intermediates = True

        # attention z-loss over every softmax attention block
        if return_attn_z_loss:
            pre_softmax_attns = [t.pre_softmax_attn for t in intermediates.attn_intermediates if exists(t.pre_softmax_attn)]
            intermediates.attn_z_loss = calc_z_loss(pre_softmax_attns, weight=attn_z_loss_weight)
            return_intermediates = True

        if return_mems:
            hiddens = intermediates.hiddens
            new_mems = [cat(pair, dim=-2) for pair in zip(mems, hiddens)] if exists(mems) else hiddens
            new_mems = [t[..., -self.max_mem_len :, :].detach() for t in new_mems]

            if not return_intermediates:
                return out, new_mems

            intermediates.mems = new_mems

        if return_intermediates:
            return out, intermediates

        if return_attn:
            attn_maps = [t.post_softmax_attn for t in intermediates.attn_intermediates if t.layer_type in ("a", "c")]
            return out, attn_maps

        return out


class TiedEmbeddingLogits:
    """Logits from the token embedding's weight (`tie_embedding`). A plain callable, not a Module, so the embedding
    is not registered (and saved) twice; not a lambda, so the model pickles."""

    def __init__(self, wrapper: TransformerWrapper):
        self.wrapper = wrapper

    def __call__(self, t):
        return t @ self.wrapper.token_emb.emb.weight.t()


class XTransformer(Module):
    """Encoder-decoder: `enc_` kwargs go to the encoder side, `dec_` kwargs to the decoder side."""

    def __init__(self, *, dim, tie_token_emb=False, ignore_index=-100, pad_value=0, cross_attn_tokens_dropout=0.0, **kwargs):
        super().__init__()
        from x_transformers.autoregressive_wrapper import AutoregressiveWrapper

        enc_kwargs, kwargs = groupby_prefix_and_trim("enc_", kwargs)
        dec_kwargs, kwargs = groupby_prefix_and_trim("dec_", kwargs)

        if len(kwargs) > 0:
            raise TypeError(f"XTransformer got unknown keyword argument(s): {', '.join(sorted(kwargs))} (use the enc_ / dec_ prefixes)")
        assert "dim" not in enc_kwargs and "dim" not in dec_kwargs, "set the dimension of both encoder and decoder with `dim`"

        enc_wrapper_kwargs = pick_and_pop(["num_tokens", "max_seq_len"], enc_kwargs)
        enc_wrapper_kwargs["emb_dropout"] = enc_kwargs.pop("emb_dropout", 0)
        enc_wrapper_kwargs["num_memory_tokens"] = enc_kwargs.pop("num_memory_tokens", None)
        enc_wrapper_kwargs["scaled_sinu_pos_emb"] = enc_kwargs.pop("scaled_sinu_pos_emb", False)
        enc_wrapper_kwargs["use_abs_pos_emb"] = enc_kwargs.pop("use_abs_pos_emb", True)

        dec_wrapper_kwargs = pick_and_pop(["num_tokens", "max_seq_len"], dec_kwargs)
        dec_wrapper_kwargs["emb_dropout"] = dec_kwargs.pop("emb_dropout", 0)
        dec_wrapper_kwargs["scaled_sinu_pos_emb"] = dec_kwargs.pop("scaled_sinu_pos_emb", False)
        dec_wrapper_kwargs["use_abs_pos_emb"] = dec_kwargs.pop("use_abs_pos_emb", True)

        # drop encoder tokens when the decoder cross-attends, as regularization (Perceiver AR)
        self.cross_attn_tokens_dropout = cross_attn_tokens_dropout

        self.encoder = TransformerWrapper(
            **enc_wrapper_kwargs,
            return_only_embed=True,
            attn_layers=_with_prefix_errors("enc_", Encoder, dim=dim, **enc_kwargs),
        )

        self.decoder = TransformerWrapper(
            **dec_wrapper_kwargs,
            attn_layers=_with_prefix_errors("dec_", Decoder, dim=dim, cross_attend=True, **dec_kwargs),
        )

        if tie_token_emb:
            self.decoder.token_emb = self.encoder.token_emb

        self.decoder = AutoregressiveWrapper(self.decoder, ignore_index=ignore_index, pad_value=pad_value)

    @torch.no_grad()
    def generate(self, seq_in, seq_out_start, seq_len, mask=None, attn_mask=None, **kwargs):
        encodings = self.encoder(seq_in, mask=mask, attn_mask=attn_mask, return_embeddings=True)
        return self.decoder.generate(seq_out_start, seq_len, context=encodings, context_mask=mask, **kwargs)

    def forward(self, src, tgt, mask=None, attn_mask=None, src_prepend_embeds=None):
        enc = self.encoder(src, mask=mask, attn_mask=attn_mask, prepend_embeds=src_prepend_embeds, return_embeddings=True)

        if exists(src_prepend_embeds) and exists(mask):
            mask = pad_at_dim(mask, (src_prepend_embeds.shape[-2], 0), dim=-1, value=True)

        if self.training and self.cross_attn_tokens_dropout > 0:
            enc, mask = dropout_seq(enc, mask, self.cross_attn_tokens_dropout)

        return self.decoder(tgt, context=enc, context_mask=mask)


def _with_prefix_errors(prefix, layers_cls, **kwargs):
    """Build `layers_cls`, re-raising an unknown-kwarg error with the user's `enc_` / `dec_` spelling."""
    try:
        return layers_cls(**kwargs)
    except TypeError as err:
        message = str(err)
        if "unknown keyword argument" not in message:
            raise
        head, names = message.split(": ", 1)
        names = ", ".join(prefix + name.strip() for name in names.split(","))
        raise TypeError(f"XTransformer got unknown keyword argument(s): {names}") from None
