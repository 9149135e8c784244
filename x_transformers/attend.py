"""Attend: the softmax attention core.

Takes already projected queries, keys and values `(b, h, n, d)` and returns the attended values plus an
`Intermediates` record. Two paths compute the same thing:

- the SDPA path: `F.scaled_dot_product_attention`, with masks, causality and additive biases folded into one
  `attn_mask`. `flash=True` always takes it; without flash it is taken whenever no feature needs the logits;
- the explicit path: logits and weights formed in full, needed by every feature that touches them (talking heads,
  sparse top-k, hard, sigmoid, selective attention, CoPE, logit soft-clamping, l2 distance, residual attention,
  a custom attention function).

Without flash, the SDPA path still hands back the attention maps of the explicit path: `Intermediates` computes
them from the saved queries and keys when they are first read (return_attn, attention z-loss, user code), so a
forward that never reads them never forms a (b, h, i, j) tensor.

Rows whose keys are all masked out return zeros on both paths (never NaN, also in the backward pass), without a
host-device sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn import Module

from x_transformers.utils import at_most_one_of, default, exists, softclamp

# F.scaled_dot_product_attention takes enable_gqa from torch 2.5
SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)

# b - batch, h - heads, i - query positions, j - key positions, d - head dimension

# `sdp_kwargs` flag -> the name of its torch.nn.attention.SDPBackend member
SDPA_BACKEND_NAMES = dict(
    enable_flash="FLASH_ATTENTION",
    enable_mem_efficient="EFFICIENT_ATTENTION",
    enable_math="MATH",
    enable_cudnn="CUDNN_ATTENTION",
)


class LazyAttnMap:
    """An attention map field of `Intermediates`: set like a plain attribute, or computed on first read.

    The SDPA path leaves `attn_maps_fn`, which returns all three maps of the explicit path from the queries and
    keys it saved; the first read of any map calls it once and stores the three.
    """

    def __set_name__(self, owner, name):
        self.slot = f"_{name}"

    def __get__(self, inter, owner=None):
        if inter is None:
            return self
        maps_fn = inter.__dict__.get("attn_maps_fn")
        if maps_fn is not None:
            inter.attn_maps_fn = None
            inter.qk_similarities, inter.pre_softmax_attn, inter.post_softmax_attn = maps_fn()
        return inter.__dict__.get(self.slot)

    def __set__(self, inter, value):
        inter.__dict__[self.slot] = value


@dataclass(init=False)
class Intermediates:
    values: Tensor | None = None
    cached_kv: tuple[Tensor, Tensor] | None = None
    layer_type: str | None = None
    # ours: the hybrid module's state, so that cached decoding can carry it forward
    hybrid_hidden: Tensor | tuple | None = None
    # ours: decode state of a linear-attention / RNN mixer
    recurrent_state: tuple | None = None
    # ours: () -> the three maps below, left by the SDPA path (see LazyAttnMap)
    attn_maps_fn: Callable | None = field(default=None, repr=False)

    # The three attention maps are attributes, not dataclass fields: code that walks a module's output through its
    # dataclass fields would read them and so compute them, a (b, h, n, n) map per layer on every forward. FSDP2
    # does exactly that for the outputs of the blocks it wraps (to hook their tensors for backward).
    qk_similarities = LazyAttnMap()
    pre_softmax_attn = LazyAttnMap()
    post_softmax_attn = LazyAttnMap()

    def __init__(
        self,
        qk_similarities: Tensor | None = None,
        pre_softmax_attn: Tensor | None = None,
        post_softmax_attn: Tensor | None = None,
        values: Tensor | None = None,
        cached_kv: tuple[Tensor, Tensor] | None = None,
        layer_type: str | None = None,
        hybrid_hidden: Tensor | tuple | None = None,
        recurrent_state: tuple | None = None,
        attn_maps_fn: Callable | None = None,
    ):
        # upstream's field order for positional arguments, then ours
        self.qk_similarities, self.pre_softmax_attn, self.post_softmax_attn = (
            qk_similarities, pre_softmax_attn, post_softmax_attn
        )
        self.values, self.cached_kv, self.layer_type = values, cached_kv, layer_type
        self.hybrid_hidden, self.recurrent_state, self.attn_maps_fn = hybrid_hidden, recurrent_state, attn_maps_fn

    def to_tuple(self):
        return (self.qk_similarities, self.pre_softmax_attn, self.post_softmax_attn)


# masks


def causal_keep_mask(i: int, j: int, device=None) -> Tensor:
    """(i, j) bool, True where query i may see key j; queries are the last i of the j positions."""
    q_pos = torch.arange(j - i, j, device=device)
    k_pos = torch.arange(j, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def create_causal_mask(i: int, j: int, device=None) -> Tensor:
    """(i, j) bool, True where the key lies in the future of the query (upstream's convention)."""
    return ~causal_keep_mask(i, j, device=device)


# logit -> attention functions


def one_hot_straight_through(logits: Tensor, temperature=1.0) -> Tensor:
    # forward: a one-hot on the arg-max key; backward: the gradient of a tempered softmax
    index = logits.argmax(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(logits).scatter(-1, index, 1.0)
    soft = (logits / temperature).softmax(dim=-1)
    return one_hot + soft - soft.detach()


def sparse_topk_attn(logits: Tensor, sparse_topk: int, temperature=1.0, straight_through=False) -> Tensor:
    mask_value = -torch.finfo(logits.dtype).max
    # a top-k larger than the number of keys simply keeps every key
    k = min(sparse_topk, logits.shape[-1])
    kth_largest = logits.topk(k, dim=-1).values[..., -1:]
    keep = (logits >= kth_largest) & (logits > mask_value)
    topk_attn = logits.masked_fill(~keep, mask_value).softmax(dim=-1)

    if not straight_through:
        return topk_attn

    soft = (logits / temperature).softmax(dim=-1)
    return topk_attn.detach() + soft - soft.detach()


def selective_attn(sim: Tensor, sim_head_gate: Tensor | None = None, no_mask_sos=True) -> Tensor:
    """Selective attention, arXiv 2410.02703 section 3.3.

    Each token i may lower the logits that every later query gives to an earlier key j, by relu(gate[i, j]);
    the penalties accumulate down the query axis. The gate defaults to the first head's logits.
    """
    i, j = sim.shape[-2:]
    gate = F.relu(default(sim_head_gate, sim[:, 0]))  # (b, i, j)

    # a token never masks itself, nor the keys from before this chunk (kv cache), nor (optionally) the sos key
    q_pos = torch.arange(j - i, j, device=sim.device)
    k_pos = torch.arange(j, device=sim.device)
    blocked = (k_pos[None, :] == q_pos[:, None]) | (k_pos[None, :] < (j - i))
    if no_mask_sos:
        blocked = blocked | (k_pos[None, :] == (j - i))
    gate = gate.masked_fill(blocked, 0.0)

    # token i's gate only affects queries after it: shift down one row, then accumulate
    gate = F.pad(gate, (0, 0, 1, -1), value=0.0)
    gate = gate.cumsum(dim=-2)
    return sim - gate[:, None]


def qk_l2_dist_squared(q: Tensor, k: Tensor) -> Tensor:
    # ||q - k||^2 = |q|^2 + |k|^2 - 2 q.k, in one matmul-friendly form
    if k.ndim == 3:
        k = k[:, None]
    qk = q @ k.transpose(-1, -2)
    q_sq = q.pow(2).sum(dim=-1, keepdim=True)
    k_sq = k.pow(2).sum(dim=-1)[..., None, :]
    return (q_sq + k_sq - 2 * qk).clamp(min=0.0)


# main class


class Attend(Module):
    def __init__(
        self,
        *,
        dropout=0.0,
        causal=False,
        heads=None,
        pre_talking_heads=False,  # arXiv 2003.02436
        post_talking_heads=False,  # arXiv 2003.02436
        pre_scale_post_talking_heads=False,
        sparse_topk=None,  # arXiv 1912.11637
        sparse_topk_straight_through=False,
        scale=None,
        qk_norm=False,  # arXiv 2010.04245
        l2_distance=False,  # arXiv 2006.04710
        sigmoid=False,  # arXiv 2409.04431
        custom_attn_fn: Callable | None = None,
        flash=False,  # arXiv 2205.14135
        softclamp_logits=False,  # gemma 2, arXiv 2408.00118
        logit_softclamp_value=50.0,
        add_zero_kv=False,  # "attention is off by one", evanmiller.org
        selective=False,  # arXiv 2410.02703
        hard=False,
        cope=None,  # arXiv 2405.18719
        onnxable=False,
        sdp_kwargs: dict = dict(enable_flash=True, enable_math=True, enable_mem_efficient=True),
        laser=False,  # arXiv 2411.03493
        laser_softclamp_value=15.0,
    ):
        super().__init__()
        self.scale = scale
        self.causal = causal
        # our causal mask is built from aranges only, so it exports to onnx either way
        self.onnxable = onnxable

        is_sparse_topk = exists(sparse_topk)
        talking_heads = pre_talking_heads or post_talking_heads or pre_scale_post_talking_heads
        flash_incompatible = dict(
            sigmoid=sigmoid,
            hard=hard,
            sparse_topk=is_sparse_topk,
            talking_heads=talking_heads,
            selective=selective,
            softclamp_logits=softclamp_logits,
            cope=exists(cope),
        )
        clashes = [name for name, on in flash_incompatible.items() if on]
        if flash and clashes:
            raise ValueError(f"flash attention cannot be combined with {', '.join(clashes)} (these act on the logits)")
        if not at_most_one_of(sigmoid, hard, l2_distance, is_sparse_topk):
            raise ValueError("choose at most one of sigmoid, hard, l2_distance and sparse_topk attention")
        if talking_heads and not exists(heads):
            raise ValueError("talking heads need `heads`")

        # attention function - what turns logits into weights
        self.has_custom_attn_fn = exists(custom_attn_fn)
        if exists(custom_attn_fn):
            self.attn_fn = custom_attn_fn
        elif sigmoid:
            self.attn_fn = F.sigmoid
        elif hard:
            self.attn_fn = one_hot_straight_through
        elif is_sparse_topk:
            self.attn_fn = partial(
                sparse_topk_attn, sparse_topk=sparse_topk, straight_through=sparse_topk_straight_through
            )
        elif qk_norm:
            # logits of l2-normed q, k are bounded, softmax in the input precision is safe
            self.attn_fn = partial(F.softmax, dim=-1)
        else:
            self.attn_fn = partial(F.softmax, dim=-1, dtype=torch.float32)

        # dropout on the attention weights
        self.dropout = dropout
        self.attn_dropout = nn.Dropout(dropout)

        # talking heads - 1x1 convolutions mixing heads, before and / or after the softmax, identity at init
        def talking_heads_conv(on):
            if not on:
                return None
            conv = nn.Conv2d(heads, heads, 1, bias=False)
            nn.init.dirac_(conv.weight)
            return conv

        self.pre_softmax_talking_heads = talking_heads_conv(pre_talking_heads)
        self.post_softmax_talking_heads = talking_heads_conv(post_talking_heads)
        # mixed pre-softmax logits used to scale the post-softmax weights
        self.pre_scale_post_talking_heads = talking_heads_conv(pre_scale_post_talking_heads)

        # selective attention
        if selective and not causal:
            raise ValueError("selective attention is only defined for causal attention")
        self.selective = selective

        # l2 distance attention
        self.l2_distance = l2_distance

        # zero key / value - lets a query attend to nothing
        self.add_zero_kv = add_zero_kv

        # logit soft clamping
        if softclamp_logits and logit_softclamp_value <= 0:
            raise ValueError("logit_softclamp_value must be positive")
        self.softclamp_logits = softclamp_logits
        self.logit_softclamp_value = logit_softclamp_value

        # contextual positional encoding, a module of positional.CoPE
        self.cope = cope

        # laser - attend over exp(values), take the log of the result
        self.laser = laser
        self.laser_softclamp_value = laser_softclamp_value

        # flash - torch's fused SDPA kernels, with the backends the user allows
        self.flash = flash

        # without flash, SDPA still serves every call that needs no logit-level feature (same function, fused)
        needs_logits = dict(flash_incompatible, l2_distance=l2_distance, custom_attn_fn=exists(custom_attn_fn))
        self.logit_features = [name for name, on in needs_logits.items() if on]
        unknown = set(sdp_kwargs) - set(SDPA_BACKEND_NAMES)
        if unknown:
            raise ValueError(f"unknown sdp_kwargs {sorted(unknown)}, expected some of {sorted(SDPA_BACKEND_NAMES)}")
        # backend names, not SDPBackend members: those do not pickle, and the module must (torch.save, deepcopy)
        self.sdpa_backend_names = [SDPA_BACKEND_NAMES[name] for name, on in sdp_kwargs.items() if on]

    @property
    def sdpa_backends(self) -> list:
        return [getattr(torch.nn.attention.SDPBackend, name) for name in self.sdpa_backend_names]

    def sdp_context_manager(self):
        return torch.nn.attention.sdpa_kernel(self.sdpa_backends)

    # shared input handling

    def _keep_mask(self, mask, i, j, device, causal):
        """Combine the key padding / attention mask and causality into one bool (..., i, j) or None."""
        if causal:
            causal_keep = causal_keep_mask(i, j, device=device)
            mask = causal_keep if not exists(mask) else (mask & causal_keep)
        return mask

    def flash_attn(self, q, k, v, mask=None, attn_bias=None, causal=None):
        batch, heads, i, d = q.shape
        j = k.shape[-2]

        kv_heads = k.shape[1]
        causal = default(causal, self.causal) and i > 1
        scale = default(self.scale, d**-0.5)

        # l2 distance as a dot product: [2q, |q|^2, -1] . [k, -1, |k|^2] = -||q - k||^2
        if self.l2_distance:
            q_sq = q.pow(2).sum(dim=-1, keepdim=True)
            k_sq = k.pow(2).sum(dim=-1, keepdim=True)
            q = torch.cat((2 * q, q_sq, -torch.ones_like(q_sq)), dim=-1)
            k = torch.cat((k, -torch.ones_like(k_sq), k_sq), dim=-1)

        # SDPA's own is_causal aligns top-left, so use it only for square, otherwise unmasked attention
        use_is_causal = causal and i == j and not exists(mask) and not exists(attn_bias)
        keep = self._keep_mask(mask, i, j, q.device, causal and not use_is_causal)

        # fully masked rows - unmask them so the kernel stays finite, zero their output below
        row_is_masked = None
        if exists(keep):
            row_is_masked = ~keep.any(dim=-1, keepdim=True)
            keep = keep | row_is_masked

        attn_mask = keep
        if exists(attn_bias):
            attn_bias = attn_bias.to(q.dtype)
            if exists(keep):
                attn_bias = attn_bias.masked_fill(~keep, -torch.finfo(q.dtype).max / 2)
            attn_mask = attn_bias

        if exists(attn_mask) and attn_mask.ndim == 4:
            attn_mask = attn_mask.expand(batch, heads, i, j)

        # grouped query attention - SDPA's enable_gqa reads kv head h // groups, ours h % kv_heads, so the query
        # heads are regrouped (a copy of q, not of every kv head); only where the fused kernel takes it natively
        use_gqa = kv_heads != heads and self._sdpa_gqa_ok(q, attn_mask)
        if use_gqa:
            q = rearrange(q, "b (g h) i d -> b (h g) i d", h=kv_heads)
        elif kv_heads != heads:
            k, v = (t.repeat(1, heads // kv_heads, 1, 1) for t in (k, v))

        gqa_kwargs = dict(enable_gqa=True) if use_gqa else dict()

        with self.sdp_context_manager():
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=use_is_causal,
                scale=scale,
                **gqa_kwargs,
            )

        if use_gqa:
            out = rearrange(out, "b (h g) i d -> b (g h) i d", h=kv_heads)

        return out, row_is_masked, Intermediates()

    def _sdpa_gqa_ok(self, q: Tensor, attn_mask: Tensor | None) -> bool:
        # torch >= 2.5 has enable_gqa; on CUDA only the flash kernel (half precision, no mask) runs it without
        # materializing the kv heads, every other backend would repeat them anyway, or fall back to math
        if not SDPA_HAS_GQA or exists(attn_mask):
            return False
        if q.device.type != "cuda":
            return True
        flash_allowed = torch.nn.attention.SDPBackend.FLASH_ATTENTION in self.sdpa_backends
        return flash_allowed and q.dtype in (torch.float16, torch.bfloat16)

    def forward(self, q, k, v, mask=None, attn_bias=None, prev_attn=None, causal=None):
        """
        q: (b, h, i, d); k, v: (b, kv_heads, j, d) or (b, j, d) for a single kv head
        mask: bool, True = attend; (b, j) key padding or broadcastable to (b, h, i, j)
        attn_bias: additive, broadcastable to (b, h, i, j); prev_attn: logits of the previous layer
        causal: overrides the module's causality for this call (False where `mask` states it already: queries
        anywhere among the keys, as with a static decoding cache)
        returns out (b, h, i, d_v) and Intermediates
        """
        if q.ndim != 4:
            raise ValueError(f"queries must be (batch, heads, seq, dim_head), got shape {tuple(q.shape)}")
        if k.ndim == 3:
            k, v = k[:, None], v[:, None]

        heads, kv_heads, i, j = q.shape[1], k.shape[1], q.shape[-2], k.shape[-2]

        if exists(mask):
            if mask.dtype != torch.bool:
                raise TypeError(f"attention mask must be bool (True = attend), got {mask.dtype}")
            if mask.ndim == 2:
                mask = mask[:, None, None, :]
            if mask.ndim != 4 or mask.shape[-1] != j:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not match {j} keys; expected (batch, {j}) "
                    f"or a shape broadcastable to (batch, heads, {i}, {j})"
                )

        # grouped query attention - query head h reads kv head h % kv_heads (upstream's head order)
        if heads % kv_heads != 0:
            raise ValueError(f"{heads} query heads are not divisible by {kv_heads} key / value heads")

        # laser - softmax over exp(v) then log, sharper gradients for the values (arXiv 2411.03493)
        if self.laser:
            v = softclamp(v, self.laser_softclamp_value).exp()

        # zero key / value - a slot of zeros that queries may attend to, to attend to nothing
        if self.add_zero_kv:
            k, v = (F.pad(t, (0, 0, 1, 0), value=0.0) for t in (k, v))
            if exists(mask):
                mask = F.pad(mask, (1, 0), value=True)
            if exists(attn_bias):
                attn_bias = F.pad(attn_bias, (1, 0), value=0.0)
            j += 1

        if self.flash and exists(prev_attn):
            raise ValueError("residual attention (prev_attn) needs the math path, it is not compatible with flash")

        if self.flash or self.use_sdpa(prev_attn):
            out, row_is_masked, intermediates = self.flash_attn(q, k, v, mask=mask, attn_bias=attn_bias, causal=causal)
            # the maps of the explicit path, formed only if read (flash returns none, as upstream)
            if not self.flash:
                intermediates.attn_maps_fn = partial(self.attn_maps, q, k, mask, attn_bias, causal)
        else:
            out, row_is_masked, intermediates = self.math_attn(q, k, v, mask, attn_bias, prev_attn, causal)

        if self.laser:
            out = out.clamp(min=1e-20).log()

        # rows that could attend to nothing return zeros
        if exists(row_is_masked):
            out = out.masked_fill(row_is_masked, 0.0)

        return out, intermediates

    def use_sdpa(self, prev_attn=None) -> bool:
        """Whether a call without flash can take the SDPA path: no feature acts on the logits."""
        return not self.logit_features and not exists(prev_attn)

    def attn_maps(self, q, k, mask, attn_bias, causal=None) -> tuple[Tensor, Tensor, Tensor]:
        """qk_similarities, pre_softmax_attn and post_softmax_attn of the explicit path, for the SDPA path's
        lazy maps."""
        return self.attn_weights(q, k, mask, attn_bias, None, causal)[2].to_tuple()

    def math_attn(self, q, k, v, mask, attn_bias, prev_attn, causal=None):
        b, h, i, _ = q.shape
        kv_heads, j = k.shape[-3:-1]

        attn, row_is_masked, intermediates, pre_to_post_scale = self.attn_weights(
            q, k, mask, attn_bias, prev_attn, causal
        )

        attn = self.attn_dropout(attn)

        if exists(self.post_softmax_talking_heads):
            attn = self._mix_heads(self.post_softmax_talking_heads, attn)

        if exists(self.pre_scale_post_talking_heads):
            attn = attn * pre_to_post_scale

        # grouped kv heads broadcast over query heads viewed as (groups, kv_heads), without copies
        out = (attn.reshape(b, h // kv_heads, kv_heads, i, j) @ v[:, None]).reshape(b, h, i, v.shape[-1])
        return out, row_is_masked, intermediates

    def attn_weights(self, q, k, mask, attn_bias, prev_attn, causal=None):
        """The explicit path up to the softmax: weights (b, h, i, j), fully masked rows, the maps, and the
        pre-softmax talking heads' scale for the weights (or None)."""
        (b, h, i, d), (kv_heads, j), device = q.shape, k.shape[-3:-1], q.device
        scale = default(self.scale, d**-0.5)
        causal = default(causal, self.causal) and i > 1

        # grouped kv heads broadcast over query heads viewed as (groups, kv_heads), without copies
        q_grouped = q.reshape(b, h // kv_heads, kv_heads, i, d)
        k = k[:, None]

        if self.l2_distance:
            sim = -qk_l2_dist_squared(q_grouped, k)
        else:
            sim = q_grouped @ k.transpose(-1, -2)

        sim = sim.reshape(b, h, i, j)

        sim = sim * scale

        # residual attention - add the previous layer's logits, arXiv 2012.11747
        if exists(prev_attn):
            sim = sim + prev_attn

        # every step below makes a new tensor, so this needs no copy
        qk_similarities = sim

        # talking heads - mix the logits across heads, arXiv 2003.02436
        pre_to_post_scale = None
        if exists(self.pre_scale_post_talking_heads):
            pre_to_post_scale = self._mix_heads(self.pre_scale_post_talking_heads, sim)

        if exists(self.pre_softmax_talking_heads):
            sim = sim + self._mix_heads(self.pre_softmax_talking_heads, sim)

        if exists(attn_bias):
            sim = sim + attn_bias

        # logit soft clamp - tanh-bound the logits, gemma 2
        if self.softclamp_logits:
            sim = softclamp(sim, self.logit_softclamp_value)

        keep = self._keep_mask(mask, i, j, device, causal)
        row_is_masked = None
        if exists(keep):
            sim = sim.masked_fill(~keep, -torch.finfo(sim.dtype).max)
            row_is_masked = ~keep.any(dim=-1, keepdim=True)

        # contextual positions - logits gated into fractional positions, arXiv 2405.18719
        if exists(self.cope):
            sim = sim + self.cope(q, sim)

        # selective attention - tokens mask themselves from the future, arXiv 2410.02703
        if self.selective:
            sim = selective_attn(sim)

        pre_softmax_attn = sim
        attn = self.attn_fn(sim).type(sim.dtype)

        intermediates = Intermediates(
            qk_similarities=qk_similarities,
            pre_softmax_attn=pre_softmax_attn,
            post_softmax_attn=attn,
        )
        return attn, row_is_masked, intermediates, pre_to_post_scale

    @staticmethod
    def _mix_heads(conv: nn.Conv2d, t: Tensor) -> Tensor:
        # a 1x1 conv over the heads axis is a matmul with its (heads_out, heads_in) kernel
        # (in the logits' dtype: fp16 laser attention runs in fp32 with the model's fp16 weights)
        return torch.einsum("b h i j, g h -> b g i j", t, rearrange(conv.weight, "g h 1 1 -> g h").to(t.dtype))
