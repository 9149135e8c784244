"""Plumbing shared by every linear-attention / RNN token mixer.

A mixer is called like `Attention` inside `AttentionLayers`:

    out = mixer(x, mask=None, cache=None)
    out, intermediates = mixer(x, mask=mask, cache=cache, return_intermediates=True)

`mask` is `(b, m)` bool with m >= n (True keeps a token) whose last n columns line up with `x`; during cached
decoding it covers the whole sequence so far. `cache` is the `Intermediates` the same layer returned on the previous
call: its `recurrent_state` carries the kernel state `[b, h, k, v]` (fp32) and the short-convolution states, so
one decoding step costs the same whatever the context length.

Padding never leaks into the state: masked positions get zero keys/values/inputs and a zero log-gate (no decay),
so a left-padded row ends in exactly the state of the same row without padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn import Module

from x_transformers.attend import Intermediates
from x_transformers.ops import causal_conv1d
from x_transformers.ops.common.utils import use_triton
from x_transformers.utils import default, exists

# up to this many new tokens the token-by-token kernel is used (decoding), above it the chunked one
RECURRENT_MAX_TOKENS = 16


def masked_fill_zero(t: Tensor | None, mask: Tensor | None):
    """Zero `t` (b, n, ...) where `mask` (b, n) is False. Selects rather than multiplies, so that inf or NaN at a
    masked position becomes zero too (0 * inf is NaN)."""
    if not exists(t) or not exists(mask):
        return t
    mask = mask.reshape(*mask.shape, *((1,) * (t.ndim - 2)))
    return t.masked_fill(~mask, 0.0)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of gates, kernels and recurrent states: fp32 for half precision and fp32 activations, fp64 for fp64
    ones (a fp64 model keeps its precision end to end, e.g. for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def upcast(t: Tensor, like: Tensor | None = None) -> Tensor:
    """`t` in the accumulation dtype of `like` (default: of `t` itself)."""
    return t.to(acc_dtype((like if exists(like) else t).dtype))


def autocast_input(x: Tensor) -> Tensor:
    """`x` in the autocast dtype when autocast is on: one cast serves every projection of the mixer (autocast would
    cast the same activation again for each Linear that reads it, and again for each of their gradients)."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMS norm in x's own dtype (fp32 statistics): with the weight in that dtype too, CUDA runs one fused kernel
    each way instead of upcasting a bf16 activation to fp32 and back."""
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, weight.shape, weight.to(x.dtype), eps)


def fused_linear(x: Tensor, *layers: nn.Linear | None) -> list[Tensor | None]:
    """Bias-free Linears that read the same input, as one matmul: one launch forward, and one input gradient
    instead of a sum of one per layer backward. Returns one output per layer (None for a None layer)."""
    used = [layer for layer in layers if exists(layer)]
    if len(used) == 1:
        outs = iter([used[0](x)])
    else:
        weight = torch.cat([layer.weight for layer in used])
        outs = iter(F.linear(x, weight).split([layer.out_features for layer in used], dim=-1))
    return [next(outs) if exists(layer) else None for layer in layers]


class L2Norm(torch.autograd.Function):
    """`x / max(|x|, eps)` over the last dim with a hand-written backward: one reduction and one product each way
    (autograd of F.normalize runs some ten elementwise passes over the full tensor in its backward). Written with
    `setup_context`, so torch.func transforms (vmap, grad) take it too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, eps: float):
        with torch.autocast(x.device.type, enabled=False):
            # statistics in fp32 at least, whatever the activation dtype
            acc = acc_dtype(x.dtype)
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
            inv = norm.clamp_min(eps).reciprocal().to(x.dtype)
            return x * inv, inv

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, inv = output
        ctx.mark_non_differentiable(inv)
        ctx.save_for_backward(y, inv)

    @staticmethod
    def backward(ctx, dy: Tensor, _):
        y, inv = ctx.saved_tensors
        with torch.autocast(dy.device.type, enabled=False):
            # d/dx (x / |x|) = (dy - y <y, dy>) / |x|; the sum accumulates in fp32 even for half-precision inputs
            dot = (dy * y).sum(-1, keepdim=True)
            dx = torch.addcmul(dy, y, dot, value=-1.0) * inv
        return dx, None


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    return L2Norm.apply(x, eps)[0]


class ShortConvolution(Module):
    """Causal depthwise 1-D convolution (kernel `size`) with a decode cache of the last `size - 1` inputs.

    Used before the kernel by DeltaNet / gated DeltaNet / Mamba2 and wherever `use_short_conv=True`: it gives the
    mixer cheap local token mixing (arXiv:2406.06484, section 3.2).
    """

    # the Triton kernel (ops.causal_conv1d, SiLU fused in) wherever the ops run Triton (CUDA, TRITON_INTERPRET=1), the
    # shifted products elsewhere; True / False force either (the op's own fallback off CUDA is a grouped conv1d)
    use_kernel: bool | None = None

    def __init__(self, dim: int, size: int = 4, activation: bool = True):
        super().__init__()
        if size < 1:
            raise ValueError(f"conv_size must be >= 1, got {size}")
        self.size = size
        self.activation = activation
        self.conv = nn.Conv1d(dim, dim, size, groups=dim, bias=False)

    def forward(self, x: Tensor, cache: Tensor | None = None, activation: bool | None = None, pack=None):
        # x: (b, n, d), cache: (b, size - 1, d) of the inputs before x; `pack`: x is (1, tokens, d) of packed
        # documents (`Packing`, flattened), each convolved from a zero window (no cache comes out)
        act = default(activation, self.activation)
        if exists(pack) and exists(cache):
            raise ValueError("ShortConvolution: packed documents start from zero windows, no cache")
        if default(self.use_kernel, use_triton(x)):
            # one kernel each way, where the shifted products take ~6 elementwise passes forward and ~20 backward
            out, new_cache = causal_conv1d(
                x, self.conv.weight[:, 0], activation="silu" if act else None, cache=cache,
                cu_seqlens=pack.cu_seqlens if exists(pack) else None,
            )
            return out, (None if exists(pack) else new_cache)
        n, past = x.shape[1], self.size - 1
        if exists(cache):
            x = torch.cat((cache.to(x.dtype), x), dim=1)
        positions = pack.positions.reshape(1, -1, 1) if exists(pack) else None
        out = self.shifted_products(x, n, pad=not exists(cache), positions=positions)
        if exists(pack):
            return (F.silu(out) if act else out), None
        new_cache = x[:, x.shape[1] - past :] if x.shape[1] >= past else F.pad(x, (0, 0, past - x.shape[1], 0))
        return (F.silu(out) if act else out), new_cache

    def shifted_products(self, x: Tensor, n: int, pad: bool, positions: Tensor | None = None) -> Tensor:
        # the causal sum over the `size` most recent inputs, one fused multiply-add pass per tap (on CPU this beats a
        # depthwise conv, whose bf16 backward is ~3x slower). `positions` (1, n, 1), each token's position in its
        # document: a tap reaching `lag` tokens back reads zero where that lies before the document's start
        if pad:
            x = F.pad(x, (0, 0, self.size - 1, 0))
        weight = rearrange(self.conv.weight, "d 1 k -> k d").to(x.dtype)
        out = None
        for i in range(self.size):
            tap, lag = x[:, i : i + n], self.size - 1 - i
            if exists(positions) and lag > 0:
                tap = tap.masked_fill(positions < lag, 0.0)
            out = tap * weight[i] if out is None else torch.addcmul(out, tap, weight[i])
        return out


class QKVProjection(Module):
    """Query / key / value projections (one matmul) split into heads, with an optional short causal convolution."""

    def __init__(self, dim: int, heads: int, dim_k: int, dim_v: int, use_short_conv=False, conv_size=4, with_q=True):
        super().__init__()
        self.heads = heads
        self.splits = [heads * d for d in ((dim_k, dim_k, dim_v) if with_q else (dim_k, dim_v))]
        self.with_q = with_q
        self.to_qkv = nn.Linear(dim, sum(self.splits), bias=False)
        self.conv = ShortConvolution(sum(self.splits), conv_size) if use_short_conv else None

    def forward(self, x: Tensor, conv_state: Tensor | None = None, pack=None):
        """Returns (q, k, v) as (b, n, h, d) (q is None without `with_q`) and the new conv state. `pack`: x holds
        flattened packed documents (see `Mixer.mix_packed`), whose convolution windows restart at each start."""
        new_conv_state = None
        qkv = self.to_qkv(x)
        if exists(self.conv):
            # one convolution (SiLU fused on CUDA) over all parts
            qkv, new_conv_state = self.conv(qkv, cache=conv_state, pack=pack)
        projs = qkv.split(self.splits, dim=-1)
        projs = [rearrange(t, "b n (h d) -> b n h d", h=self.heads) for t in projs]
        if not self.with_q:
            projs = [None, *projs]
        return (*projs, new_conv_state)


class HeadOutput(Module):
    """Per-head output norm, optional gate, merge heads and project back to the model dimension."""

    def __init__(self, dim: int, heads: int, dim_v: int, norm: bool = True, gate: str | None = "swish"):
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(dim_v, eps=1e-5) if norm else None
        self.gate_kind = gate
        if gate not in (None, "swish", "sigmoid"):
            raise ValueError(f"output gate must be None, 'swish' or 'sigmoid', got {gate!r}")
        self.to_gate = nn.Linear(dim, heads * dim_v, bias=False) if exists(gate) else None
        self.to_out = nn.Linear(heads * dim_v, dim, bias=False)

    def forward(self, o: Tensor, x: Tensor, gate: Tensor | None = None) -> Tensor:
        # o: (b, n, h, dv) in the kernel's output dtype, x: (b, n, dim) the mixer's input, for the gate (unless the
        # mixer projected the gate logits `gate` (b, n, h * dv) already, in one matmul with its other projections)
        if exists(self.norm):
            o = rms_norm(o, self.norm.weight, self.norm.eps)
        o = rearrange(o.to(x.dtype), "b n h d -> b n (h d)")
        if exists(self.to_gate):
            g = gate if exists(gate) else self.to_gate(x)
            o = o * (F.silu(g) if self.gate_kind == "swish" else g.sigmoid())
        return self.to_out(o)


class Mixer(Module):
    """Base class: mask / cache plumbing around `mix`, which subclasses implement.

    `mix(x, mask, state, want_state)` gets the input `(b, n, dim)`, the mask aligned with it (or None), the state
    tuple of the previous call (or None) and returns `(out, new_state_tuple_or_None)`.

    Inputs that come from elsewhere in the stack are named in `stack_inputs` (e.g. RWKV-7's `value_first`, the first
    mixer layer's values): the layer stack passes them as keyword arguments, `mix` takes them as keyword
    arguments, and may return a third element, a dict of outputs for the stack (e.g. `{"values": v}`), which land on
    the returned `Intermediates`.
    """

    # keyword inputs this mixer takes from the layer stack, beyond x / mask / cache
    stack_inputs: tuple[str, ...] = ()

    # how packed documents (`pack`) run: "cu_seqlens" - flattened to one row, the kernels and the short convolution
    # restart at every document start (`mix` takes `pack`); "padded" - scattered into a right-padded batch of one
    # document per row and gathered back (exact for any `mix`, but documents x longest document of work)
    packed_path = "padded"

    name = "mixer"
    bidirectional = False
    # cast the input to the autocast dtype once, for all projections (off where the glue mixes it with fp32 weights)
    cast_input = True

    def __init__(self, dim: int, heads: int, causal: bool = True):
        super().__init__()
        if heads < 1 or dim < 1:
            raise ValueError(f"linear_attn='{self.name}': dim and heads must be positive, got {dim}, {heads}")
        if not causal and not self.bidirectional:
            raise ValueError(
                f"linear_attn='{self.name}' is a causal recurrence with no bidirectional form; "
                "use it in a Decoder, or use linear_attn='linear' or 'based' in an Encoder"
            )
        self.dim = dim
        self.heads = heads
        self.causal = causal

    def mix(self, x: Tensor, mask: Tensor | None, state: tuple | None, want_state: bool):
        raise NotImplementedError

    # whether the mixer's state after a call lets the next call continue the sequence (an FFT convolution over the
    # whole sequence, say, has no such state)
    can_cache_kv = True

    def static_decode_refusal(self):
        if not self.causal:
            return f"linear_attn='{self.name}' is bidirectional: no incremental decoding"
        if not self.can_cache_kv:
            return f"linear_attn='{self.name}' has no recurrent form: no incremental decoding"
        return None

    def zero_init_output(self):
        """Zero the final projection back to `dim`, so the block starts as the identity in the residual stream
        (`zero_init_branch_output` of the layer stack)."""
        for name in ("out.to_out", "to_out", "out_proj"):
            try:
                layer = self.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(layer, nn.Linear):
                nn.init.zeros_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
                return
        raise ValueError(
            f"linear_attn={self.name!r} has no output projection to zero (zero_init_branch_output); "
            "for mingru give it one with linear_attn_expansion_factor != 1"
        )

    def forward(
        self, x: Tensor, mask: Tensor | None = None, cache=None, return_intermediates: bool = False, pack=None, **kwargs
    ):
        """`pack`: a `Packing` (x_transformers/packing.py) of x's rows: its documents never mix, each starts from a
        zero state, a fresh short-convolution window and token shift (on the mixer's `packed_path`)."""
        unknown = sorted(set(kwargs) - set(self.stack_inputs))
        if unknown:
            raise TypeError(f"linear_attn='{self.name}' got unexpected inputs {unknown}; it takes {list(self.stack_inputs)}")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"linear_attn='{self.name}' expects x of shape (batch, seq, {self.dim}), got {tuple(x.shape)}"
            )
        n = x.shape[1]
        if exists(mask):
            if mask.ndim != 2 or mask.shape[0] != x.shape[0] or mask.shape[1] < n:
                raise ValueError(f"mask must be (batch, >= {n}) to go with x {tuple(x.shape)}, got {tuple(mask.shape)}")
            mask = mask[:, -n:]
        state = cache.recurrent_state if exists(cache) else None
        if exists(state) and not self.causal:
            raise ValueError(f"linear_attn='{self.name}' in an Encoder has no decoding cache")
        if not x.is_floating_point():
            raise TypeError(f"linear_attn='{self.name}' expects a floating point x, got {x.dtype}")
        x = autocast_input(x) if self.cast_input else x
        if exists(pack):
            if exists(state) or exists(mask):
                raise ValueError(f"linear_attn='{self.name}': packed documents take no cache and no mask")
            result = self.mix_packed(x, pack, **kwargs)
        elif x.shape[0] == 0:
            result = self.mix_empty_batch(x, mask, state, return_intermediates, **kwargs)
        else:
            result = self.mix(x, mask, state, want_state=return_intermediates, **kwargs)
        out, new_state, outputs = (*result, {}) if len(result) == 2 else result
        if not return_intermediates:
            return out
        inter = Intermediates(recurrent_state=new_state, layer_type="l")
        for name, value in outputs.items():
            setattr(inter, name, value)
        return out, inter

    def packs_by_cu_seqlens(self) -> bool:
        """Whether packed documents take the "cu_seqlens" path (see `packed_path`)."""
        if self.packed_path not in ("cu_seqlens", "padded"):
            raise ValueError(f"linear_attn='{self.name}': packed_path must be 'cu_seqlens' or 'padded', "
                             f"got {self.packed_path!r}")
        return self.packed_path == "cu_seqlens"

    def mix_packed(self, x: Tensor, pack, **kwargs):
        """`mix` over packed documents, exactly as if each ran alone, on the mixer's `packed_path`."""
        if self.packs_by_cu_seqlens():
            return self.mix_cu_seqlens(x, pack, **kwargs)
        return self.mix_padded(x, pack, **kwargs)

    def mix_cu_seqlens(self, x: Tensor, pack, **kwargs):
        """The rows of x flattened into one sequence of b * n tokens, which `pack.cu_seqlens` indexes: `mix` passes
        `pack` on to the kernels (`run_kernel`) and the short convolution; everything else is per token. Inputs from
        the stack laid out like x are flattened too, outputs laid out like the flat row unflattened. No state comes
        out: a packed batch does not continue."""
        b, n = x.shape[:2]
        like = lambda t, rows: torch.is_tensor(t) and t.ndim >= 2 and t.shape[:2] == rows  # noqa: E731
        flat = lambda t: t.reshape(1, b * n, *t.shape[2:]) if like(t, (b, n)) else t  # noqa: E731
        out, _, *outputs = self.mix(flat(x), None, None, False, pack=pack, **{k: flat(t) for k, t in kwargs.items()})
        outputs = {
            name: t.reshape(b, n, *t.shape[2:]) if like(t, (1, b * n)) else t
            for name, t in (outputs[0] if outputs else {}).items()
        }
        return out.reshape(b, n, *out.shape[2:]), None, outputs

    def mix_padded(self, x: Tensor, pack, **kwargs):
        """`mix` over packed documents, exactly as if each ran alone: they are scattered into a right-padded batch
        of one document per row (padding masked) and gathered back. Inputs from the stack laid out like x are
        scattered too, outputs laid out like the padded batch gathered back. No state comes out: a packed batch
        does not continue."""
        b, n = x.shape[:2]
        like_x = lambda t: torch.is_tensor(t) and t.ndim >= 2 and t.shape[:2] == (b, n)  # noqa: E731
        padded, keep = pack.to_padded(x)
        kwargs = {name: pack.to_padded(t)[0] if like_x(t) else t for name, t in kwargs.items()}
        out, _, *outputs = self.mix(padded, keep, None, False, **kwargs)
        rows = padded.shape[:2]
        outputs = {
            name: pack.from_padded(t) if torch.is_tensor(t) and t.ndim >= 2 and t.shape[:2] == rows else t
            for name, t in (outputs[0] if outputs else {}).items()
        }
        return pack.from_padded(out), None, outputs

    def mix_empty_batch(self, x: Tensor, mask: Tensor | None, state: tuple | None, want_state: bool, **kwargs):
        """`mix` of a batch of size 0: one zero row is run and cut off again, so that every kernel sees a real
        batch and the outputs, states (and gradients) keep their shapes and dtypes."""

        def one_more(t, fill):
            if not torch.is_tensor(t):
                return t
            return torch.cat((t, t.new_full((1, *t.shape[1:]), fill)))

        mask = one_more(mask, True)
        state = tuple(one_more(t, 0) for t in state) if exists(state) else None
        # only batch-first inputs (a first layer's values, say) get the extra row, not per-layer parameters
        kwargs = {name: one_more(t, 0) if torch.is_tensor(t) and t.ndim >= 2 else t for name, t in kwargs.items()}
        out, new_state, *outputs = self.mix(one_more(x, 0), mask, state, want_state, **kwargs)
        if exists(new_state):
            new_state = tuple(t[:0] if torch.is_tensor(t) else t for t in new_state)
        outputs = {name: t[:0] if torch.is_tensor(t) else t for name, t in (outputs[0] if outputs else {}).items()}
        return out[:0], new_state, outputs


def pick_state(state: tuple | None, index: int):
    return state[index] if exists(state) else None


def run_kernel(chunk_fn, recurrent_fn, *args, initial_state=None, want_state=False, pack=None, **kwargs):
    """Token-by-token kernel for a few new tokens (decoding), chunked kernel otherwise. `pack`: the inputs are
    flattened packed documents (batch 1), each run from a zero state through the kernel's `cu_seqlens`."""
    n = args[0].shape[1]
    fn = recurrent_fn if n <= RECURRENT_MAX_TOKENS else chunk_fn
    if exists(pack):
        if exists(initial_state):
            raise ValueError("packed documents start from zero states: no initial_state")
        kwargs["cu_seqlens"] = pack.cu_seqlens
    return fn(*args, initial_state=initial_state, output_final_state=want_state, **kwargs)
