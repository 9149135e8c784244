"""Token and positional embeddings, and positional biases on the attention logits.

Embeddings added to the input: TokenEmbedding, AbsolutePositionalEmbedding, ScaledSinusoidalEmbedding.
Biases added to the logits `(h, i, j)`: RelativePositionBias (T5), DynamicPositionBias, AlibiPositionalBias,
DataDependentAlibi, PerRowDataDependentAlibi; CoPE adds a contextual term. Rotary (with xPos) rotates q and k.
Queries are always the last `i` of the `j` key positions (the kv-cache convention).
"""

from __future__ import annotations

import math

import einx
import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import Tensor, nn
from torch.amp import autocast
from torch.nn import Module, ModuleList

from x_transformers.norms import LayerNorm
from x_transformers.ops.rotary.naive import naive_rotary
from x_transformers.utils import default, divisible_by, exists, l2norm, pad_at_dim


def _sequential(*modules):
    return nn.Sequential(*[m for m in modules if exists(m)])


def _positions(i: int, j: int, device=None) -> tuple[Tensor, Tensor]:
    """Query positions (i,) and key positions (j,), queries being the last i of j positions."""
    return torch.arange(j - i, j, device=device), torch.arange(j, device=device)


def _relative_distance(i: int, j: int, device=None) -> Tensor:
    """(i, j) key position minus query position, queries being the last i of j positions."""
    q_pos, k_pos = _positions(i, j, device)
    return k_pos[None, :] - q_pos[:, None]


# embeddings


def check_token_ids(ids: Tensor, num_tokens: int):
    """A clear error for token ids outside [0, num_tokens). Checked where it costs no device sync and no graph break
    (CPU tensors, eager, outside torch.func transforms, which cannot read a value); a CUDA embedding lookup stops
    out-of-range ids with its own device-side assert."""
    if ids.is_cuda or ids.numel() == 0 or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    if torch._C._functorch.is_functorch_wrapped_tensor(ids):
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_tokens:
        raise ValueError(f"token ids must lie in [0, {num_tokens}) (num_tokens = {num_tokens}), got ids from {lo} to {hi}")


class TokenEmbedding(Module):
    def __init__(self, dim, num_tokens, l2norm_embed=False):
        super().__init__()
        self.l2norm_embed = l2norm_embed
        self.emb = nn.Embedding(num_tokens, dim)

    def forward(self, x):
        # float ids are accepted as upstream does (generation may build float prompts), and cast to long
        x = x.long()
        check_token_ids(x, self.emb.num_embeddings)
        token_emb = self.emb(x)
        return l2norm(token_emb) if self.l2norm_embed else token_emb

    def init_(self):
        # l2norm_embed: tiny init, the l2norm alone decides the scale
        if self.l2norm_embed:
            nn.init.normal_(self.emb.weight, std=1e-5)
            return
        nn.init.kaiming_normal_(self.emb.weight)


class AbsolutePositionalEmbedding(Module):
    def __init__(self, dim, max_seq_len, l2norm_embed=False):
        super().__init__()
        self.scale = dim**-0.5 if not l2norm_embed else 1.0
        self.max_seq_len = max_seq_len
        self.l2norm_embed = l2norm_embed
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, x, pos=None, seq_start_pos=None):
        seq_len = x.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds the absolute positional embedding's max_seq_len "
                f"{self.max_seq_len}; raise max_seq_len or use relative positions (e.g. rotary_pos_emb=True)"
            )

        pos = default(pos, lambda: torch.arange(seq_len, device=x.device))

        # left-padded sequences - positions count from each sequence's first real token
        if exists(seq_start_pos):
            pos = (pos - seq_start_pos[..., None]).clamp(min=0)

        pos_emb = self.emb(pos) * self.scale
        return l2norm(pos_emb) if self.l2norm_embed else pos_emb


class ScaledSinusoidalEmbedding(Module):
    """Fixed sinusoids times one learned scalar, arXiv 2202.10447."""

    def __init__(self, dim, theta=10000):
        super().__init__()
        if not divisible_by(dim, 2):
            raise ValueError(f"sinusoidal embedding dimension must be even, got {dim}")
        self.scale = nn.Parameter(torch.ones(1) * dim**-0.5)

        half_dim = dim // 2
        inv_freq = theta ** -(torch.arange(half_dim).float() / half_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, pos=None, seq_start_pos=None):
        seq_len = x.shape[1]
        pos = default(pos, lambda: torch.arange(seq_len, device=x.device))

        if exists(seq_start_pos):
            pos = pos - seq_start_pos[..., None]

        emb = pos[..., None].type_as(self.inv_freq) * self.inv_freq  # (n, d/2) or (b, n, d/2)
        emb = torch.cat((emb.sin(), emb.cos()), dim=-1)
        return emb * self.scale


# biases on the attention logits


class RelativePositionBias(Module):
    """T5 relative position bias, arXiv 1910.10683: a learned scalar per head and log-spaced distance bucket."""

    def __init__(self, scale, causal=False, num_buckets=32, max_distance=128, heads=8):
        super().__init__()
        self.scale = scale
        self.causal = causal
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    @staticmethod
    def _relative_position_bucket(relative_position, causal=True, num_buckets=32, max_distance=128):
        # distance of the key behind the query; bidirectional splits the buckets between past and future
        n = -relative_position
        bucket = torch.zeros_like(n)

        if not causal:
            num_buckets //= 2
            bucket = bucket + (n < 0).long() * num_buckets
            n = n.abs()
        else:
            n = n.clamp(min=0)

        # half the buckets are exact small distances, the rest log-spaced up to max_distance
        max_exact = num_buckets // 2
        is_small = n < max_exact

        log_ratio = torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
        large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
        large = large.clamp(max=num_buckets - 1)

        return bucket + torch.where(is_small, n, large)

    @property
    def device(self):
        return next(self.parameters()).device

    def forward(self, i, j):
        return self.forward_positions(*_positions(i, j, self.device))

    def forward_positions(self, pos_i: Tensor, pos_j: Tensor) -> Tensor:
        """(h, i, j) bias of queries at positions pos_i (i,) over keys at pos_j (j,) - for a static decoding cache,
        where the keys are a whole buffer and the queries sit anywhere in it."""
        rel_pos = pos_j[None, :] - pos_i[:, None]
        bucket = self._relative_position_bucket(
            rel_pos, causal=self.causal, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        bias = rearrange(self.relative_attention_bias(bucket), "i j h -> h i j")
        return bias * self.scale


class CoPE(Module):
    """Contextual position encoding, arXiv 2405.18719 (appendix B).

    Positions are counted by sigmoid gates of the logits, summed from the key up to the query, so a query can
    count e.g. words or sentences instead of tokens; fractional positions interpolate learned embeddings.
    """

    def __init__(self, dim, heads, max_pos, soft_onehot=False, talking_heads=False, soft_onehot_temp=5e-2):
        super().__init__()
        self.max_pos = max_pos
        self.pos_emb = nn.Parameter(torch.zeros(max_pos, dim))

        self.talking_heads = nn.Conv2d(heads, heads, 1, bias=False) if talking_heads else None
        self.soft_onehot = soft_onehot
        self.soft_onehot_temp = soft_onehot_temp

        if soft_onehot:
            self.register_buffer("positions", torch.arange(max_pos))

    def forward(self, query, attn_logits):
        if exists(self.talking_heads):
            i, j = attn_logits.shape[-2:]
            weight = self.talking_heads.weight.to(attn_logits.dtype)
            attn_logits = F.conv2d(attn_logits, weight)
            future = _relative_distance(i, j, device=attn_logits.device) > 0
            attn_logits = attn_logits.masked_fill(future, -torch.finfo(attn_logits.dtype).max)

        # position of key j seen from query i = sum of gates from j to the end (masked keys gate 0)
        gates = attn_logits.sigmoid()
        pos = gates.flip(-1).cumsum(dim=-1).flip(-1)
        pos = pos.clamp(max=self.max_pos - 1)

        logits_int = torch.einsum("b h n d, p d -> b h n p", query, self.pos_emb.to(query.dtype))

        if self.soft_onehot:
            # a softmax over the integer positions by distance, instead of linear interpolation
            dist = (pos[..., None] - self.positions.type_as(pos)).abs()
            soft_onehot_pos = F.softmax(-dist / self.soft_onehot_temp, dim=-1)
            return torch.einsum("b h i j p, b h i p -> b h i j", soft_onehot_pos, logits_int)

        pos_floor = pos.floor()
        w = pos - pos_floor
        logits_floor = logits_int.gather(-1, pos_floor.long())
        logits_ceil = logits_int.gather(-1, pos.ceil().long())
        return logits_ceil * w + logits_floor * (1 - w)


class DynamicPositionBias(Module):
    """A small MLP from relative distance to a bias per head (SwinV2's continuous position bias, arXiv 2111.09883)."""

    def __init__(self, dim, *, heads, depth, log_distance=False, norm=False):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth of the dynamic position bias MLP must be at least 1, got {depth}")
        self.log_distance = log_distance

        self.mlp = ModuleList([])
        self.mlp.append(_sequential(nn.Linear(1, dim), LayerNorm(dim) if norm else None, nn.SiLU()))
        for _ in range(depth - 1):
            self.mlp.append(_sequential(nn.Linear(dim, dim), nn.LayerNorm(dim) if norm else None, nn.SiLU()))
        self.mlp.append(nn.Linear(dim, heads))

    @property
    def device(self):
        return next(self.parameters()).device

    def distance_table(self, j: int) -> Tensor:
        """(2j - 1, h): the bias of every query-minus-key distance in [-(j-1), j-1]."""
        dtype = self.mlp[-1].weight.dtype
        device = self.mlp[-1].weight.device

        # the MLP runs once per distinct distance, then is gathered. Distances and the first projection in fp32 at
        # least (bf16 holds integers exactly only up to 256), the rest in the MLP's dtype
        acc = torch.promote_types(dtype, torch.float32)
        pos = torch.arange(-j + 1, j, device=device, dtype=acc)[:, None]
        if self.log_distance:
            pos = torch.sign(pos) * torch.log(pos.abs() + 1)

        first, *rest = self.mlp[0]
        pos = F.linear(pos, first.weight.to(acc), first.bias.to(acc)).to(dtype)
        for layer in (*rest, *self.mlp[1:]):
            pos = layer(pos)
        return pos

    def forward(self, i, j):
        indices = -_relative_distance(i, j, device=self.device) + (j - 1)
        return rearrange(self.distance_table(j)[indices], "i j h -> h i j")

    def forward_positions(self, pos_i: Tensor, pos_j: Tensor) -> Tensor:
        """(h, i, j) bias of queries at positions pos_i (i,) over keys at pos_j (j,), all within 0..j-1 (a static
        decoding cache's buffer): the table has a fixed shape whatever pos_i holds."""
        j = pos_j.shape[-1]
        indices = (pos_i[:, None] - pos_j[None, :]).clamp(-(j - 1), j - 1) + (j - 1)
        return rearrange(self.distance_table(j)[indices], "i j h -> h i j")


class AlibiPositionalBias(Module):
    """ALiBi, arXiv 2108.12409: a linear penalty on distance with a fixed geometric slope per head.

    Only the first `heads` of `total_heads` get a bias, the others stay unbiased (zeros).
    """

    def __init__(self, heads, total_heads=None, slopes: list[int] | None = None, **kwargs):
        super().__init__()
        self.heads = heads
        self.total_heads = default(total_heads, heads)

        slopes = Tensor(default(slopes, lambda: self._get_slopes(heads)))
        self.register_buffer("slopes", rearrange(slopes, "h -> h 1 1"), persistent=False)
        self.register_buffer("bias", None, persistent=False)

    @property
    def device(self):
        return self.slopes.device

    @staticmethod
    def _get_slopes(heads):
        def power_of_2_slopes(n):
            start = 2 ** (-(2 ** -(math.log2(n) - 3)))
            return [start * start**k for k in range(n)]

        if math.log2(heads).is_integer():
            return power_of_2_slopes(heads)

        # otherwise: the slopes of the power of 2 below, then every other slope of the power of 2 above
        closest = 2 ** math.floor(math.log2(heads))
        return power_of_2_slopes(closest) + power_of_2_slopes(2 * closest)[0::2][: heads - closest]

    def _pad_heads(self, bias):
        return pad_at_dim(bias, (0, self.total_heads - bias.shape[-3]), dim=-3)

    def forward_custom_pos(self, pos_i: Tensor, pos_j: Tensor | None = None):
        """Bias for explicit positions: pos_i (i,) or (b, i); pos_j defaults to pos_i."""
        pos_j = default(pos_j, pos_i)
        bias = -einx.subtract("... j, ... i -> ... i j", pos_j, pos_i).abs()
        if bias.ndim == 3:
            bias = rearrange(bias, "b i j -> b 1 i j")
        return self._pad_heads(bias * self.slopes)

    def forward(self, i, j):
        # cheap to build, and building it fresh keeps forward free of module state (torch.compile friendly)
        bias = -_relative_distance(i, j, device=self.device).abs()
        return self._pad_heads(bias * self.slopes)

    def forward_positions(self, pos_i: Tensor, pos_j: Tensor) -> Tensor:
        return self.forward_custom_pos(pos_i, pos_j)


class DataDependentAlibi(Module):
    """Forgetting transformer, https://openreview.net/forum?id=q2Lnyegkr8: an ALiBi whose decay is gated by the data.

    The bias for query i and key j is the sum of log forget gates of the tokens between them.
    """

    def __init__(self, dim, heads, causal=True, bias_init=5.0, post_log_scale=1.0):
        super().__init__()
        self.causal = causal

        # bidirectional needs a second set of gates for the reverse direction
        linear = nn.Linear(dim, heads * (1 if causal else 2))
        nn.init.constant_(linear.bias, bias_init)
        self.to_forget_gates = nn.Sequential(linear, Rearrange("b n h -> b h n"), nn.LogSigmoid())

        self.post_log_scale = post_log_scale

    def forward(self, x, mask=None):
        log_gates = self.to_forget_gates(x) * self.post_log_scale
        # a masked token (mask False) forgets nothing, whatever its input holds
        if exists(mask):
            log_gates = log_gates.masked_fill(~mask[:, None, :], 0.0)
        cum = log_gates.cumsum(dim=-1)

        if self.causal:
            return einx.subtract("b h i, b h j -> b h i j", cum, cum)

        forward_cum, backward_cum = cum.chunk(2, dim=1)
        past = einx.subtract("b h i, b h j -> b h i j", forward_cum, forward_cum)
        future = einx.subtract("b h j, b h i -> b h i j", backward_cum, backward_cum)
        return past.tril() + future.triu()


class PerRowDataDependentAlibi(Module):
    """Data-dependent ALiBi whose forget gates come from small query / key projections, one per (i, j) pair."""

    def __init__(self, dim, heads, causal=True, dim_head=8, post_log_scale=1.0):
        super().__init__()
        if not causal:
            raise ValueError("per-row data dependent alibi is only implemented for causal attention")

        self.scale = dim_head**-0.5
        linear = nn.Linear(dim, heads * dim_head * 2, bias=False)
        self.to_forget_gates = nn.Sequential(linear, Rearrange("b n (qk h d) -> qk b h n d", qk=2, d=dim_head))
        self.post_log_scale = post_log_scale

    def forward(self, x):
        q, k = self.to_forget_gates(x)
        log_gates = F.logsigmoid((q @ k.transpose(-1, -2)) * self.scale) * self.post_log_scale

        # bias[i, j] = sum of log gates (i, t) for j <= t < i
        n = x.shape[-2]
        strictly_lower = torch.ones((n, n), dtype=torch.bool, device=x.device).tril(-1)
        log_gates = log_gates.masked_fill(~strictly_lower, 0.0)
        return log_gates.flip(-1).cumsum(dim=-1).flip(-1)


# rotary


class RotaryEmbedding(Module):
    """Rotary embedding, arXiv 2104.09864 (interleaved pairs), with xPos, arXiv 2212.10554, position
    interpolation, arXiv 2306.15595, and NTK-aware base rescaling."""

    def __init__(
        self,
        dim,
        use_xpos=False,
        scale_base=512,
        interpolation_factor=1.0,
        base=10000,
        base_rescale_factor=1.0,
    ):
        super().__init__()
        # NTK-aware rescale of the base, to stretch to longer contexts without fine-tuning (reddit user bloc97)
        if base_rescale_factor != 1.0:
            if dim <= 2:
                raise ValueError(f"rotary_base_rescale_factor needs a rotary dimension above 2, got {dim}")
            base *= base_rescale_factor ** (dim / (dim - 2))

        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

        if interpolation_factor < 1.0:
            raise ValueError(f"rotary interpolation_factor must be >= 1, got {interpolation_factor}")
        self.interpolation_factor = interpolation_factor

        if not use_xpos:
            self.register_buffer("scale", None)
            return

        # xpos - per-frequency decay, applied as scale to q and 1 / scale to k
        self.scale_base = scale_base
        self.register_buffer("scale", (torch.arange(0, dim, 2) + 0.4 * dim) / (1.4 * dim))

    def forward_from_seq_len(self, seq_len):
        return self.forward(torch.arange(seq_len, device=self.inv_freq.device))

    @autocast("cuda", enabled=False)
    def forward(self, t):
        """t: positions (n,) or (b, n) -> freqs (1 or b, n, dim) and an xpos scale of the same shape (or 1.)"""
        if t.ndim == 1:
            t = t[None]

        freqs = t.type_as(self.inv_freq)[..., None] * self.inv_freq
        # position interpolation - a division only where it changes something (each op is a kernel launch)
        if self.interpolation_factor != 1.0:
            freqs = freqs / self.interpolation_factor
        freqs = freqs.repeat_interleave(2, dim=-1)

        if not exists(self.scale):
            return freqs, 1.0

        # centre the xpos exponent on the middle position, to keep scales near 1
        max_pos = t.max() + 1
        power = (t - (max_pos // 2)) / self.scale_base
        scale = self.scale ** power[..., None]
        return freqs, scale.repeat_interleave(2, dim=-1)


def rotate_half(x):
    """Rotate each interleaved pair (x1, x2) -> (-x2, x1)."""
    x = rearrange(x, "... (d r) -> ... d r", r=2)
    x1, x2 = x.unbind(dim=-1)
    return rearrange(torch.stack((-x2, x1), dim=-1), "... d r -> ... (d r)")


class RotaryTable:
    """cos / sin of every position for rotary (and xPos), built once per forward and shared by every layer.

    Rotating is then `t * cos + swap_pairs(t) * sin`: the rotate-half sign is folded into sin, and features past
    the rotary dimension (GPT-J partial rotary) get cos 1, sin 0, so whole heads rotate without slicing or
    concatenation - each of those is a kernel launch in the forward and another in the backward, in every layer.
    The math stays in float32, as the rotation angles need.
    """

    def __init__(self, freqs: Tensor, xpos_scale: Tensor | float = 1.0):
        self.freqs = freqs  # (1 or b, n, rot_dim), float32
        self.xpos_scale = xpos_scale  # (1 or b, n, rot_dim) or 1.
        self._tables = {}

    @classmethod
    def cast(cls, rotary) -> RotaryTable:
        """A table from itself or from RotaryEmbedding's (freqs, xpos_scale)."""
        return rotary if isinstance(rotary, cls) else cls(*rotary)

    def table(self, dim: int, keys: bool) -> tuple[Tensor, Tensor]:
        # xpos - queries scaled up, keys down, so that q.k decays with distance (arXiv 2212.10554)
        key = (dim, keys and isinstance(self.xpos_scale, Tensor))
        if key not in self._tables:
            freqs, scale = self.freqs, self.xpos_scale
            rot_dim = freqs.shape[-1]
            if rot_dim > dim or rot_dim % 2:
                raise ValueError(f"rotary dimension {rot_dim} must be even and at most the head dimension {dim}")
            cos, sin = freqs.cos(), freqs.sin()
            if isinstance(scale, Tensor):
                scale = scale.reciprocal() if keys else scale
                cos, sin = cos * scale, sin * scale
            # (x1, x2) swapped is (x2, x1); times (-sin, sin) it is rotate_half's (-x2, x1) times sin
            # made on the device (no host-to-device copy: the step may be captured in a CUDA graph)
            sign = (torch.arange(rot_dim, device=sin.device) % 2 * 2 - 1).to(sin.dtype)
            sin = sin * sign
            if rot_dim < dim:
                cos = F.pad(cos, (0, dim - rot_dim), value=1.0)
                sin = F.pad(sin, (0, dim - rot_dim), value=0.0)
            self._tables[key] = (cos, sin)
        return self._tables[key]

    def rotate(self, t: Tensor, keys=False) -> Tensor:
        """Rotate t (b, h, n, d) or (b, n, d) at the last n positions of the table (kv-cache convention)."""
        cos, sin = self.table(t.shape[-1], keys)
        seq_len = t.shape[-2]
        cos, sin = cos[..., -seq_len:, :], sin[..., -seq_len:, :]
        if t.is_cuda and not torch.compiler.is_compiling() and not (cos.requires_grad or sin.requires_grad):
            from x_transformers.ops.common.utils import fused_kernels_enabled

            if fused_kernels_enabled():
                # one Triton pass forward and one backward instead of ~5 float32 kernels each (torch.compile fuses
                # the formula by itself)
                from x_transformers.ops.rotary import fused_rotary

                return fused_rotary(t, cos, sin)
        return naive_rotary(t, cos, sin)


def apply_rotary_pos_emb(t, freqs, scale=1):
    """Rotate the first freqs.shape[-1] features of t (b, h, n, d) or (b, n, d); the rest pass through (GPT-J
    partial rotary). Only the last n positions of freqs are used, for kv-cached decoding."""
    return RotaryTable(freqs, scale).rotate(t)
