"""Fast cached decoding for decoder-only `TransformerWrapper`s, the gpt-fast way.

The plain cached path of `AutoregressiveWrapper.generate` concatenates every layer's keys / values each step and
runs a full Python forward per token, so it is bound by kernel launches and allocations. Here instead:

- the prompt runs once through the model's own forward (prefill), which hands back its keys / values and the
  mixers' recurrent states; these are copied into buffers preallocated once, `(b, kv_heads, max_len, d)`;
- one decoding step reads the token and its position from static tensors, writes its keys / values in place at
  that position (`index_copy_` with a position tensor), attends over the whole buffer under a position mask (so
  every step has the same shapes), updates the mixers' states in place, samples on the device and advances the
  position, with no host sync;
- on CUDA that step is captured once in a CUDA graph (optionally after `torch.compile`) and replayed per token.

Only the model's own modules and weights are called (`attn.fused_linear`, `attn.attend`, norms, feedforwards,
mixers...), so the step computes what the plain path computes: the same greedy tokens in fp32, and in half
precision the same arithmetic wherever the attention kernel rounds a masked call over the buffer as it rounds the
plain path's call over exactly the keys so far (bit for bit on CPU when Attend forms its logits).

Covered: softmax self attention with rotary (partial too), absolute or no positions, grouped / single kv heads,
qk norm, memory key / values, attend-past windows, head scale, value and per-head gates, sigmoid / hard / sparse
top-k / talking-heads / soft-clamped / l2-distance / zero-kv attention, attn_flash; cross attention (`context`,
`context_mask`); every linear-attention / RNN mixer and hybrids of them; pre-norm residuals; left-padded prompts;
eos; sampling filters. Anything else decodes on the plain path: `supports(net)` names the flag that prevents it
(ALiBi / T5 / dynamic position bias, xPos, CoPE, data-dependent ALiBi, multi-latent attention, laser, value
residual, hybrid-module attention, shift tokens, post-norm, sandwich norm, resi-dual, gated / hyper-connection
residuals, mixture of experts, memory tokens, custom attention functions...).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from loguru import logger
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from x_transformers.attend import Intermediates, one_hot_straight_through, sparse_topk_attn
from x_transformers.attention import Attention
from x_transformers.feedforward import FeedForward
from x_transformers.mixers.base import Mixer
from x_transformers.positional import AbsolutePositionalEmbedding, ScaledSinusoidalEmbedding, rotate_half
from x_transformers.residual import Residual
from x_transformers.utils import exists, l2norm, softclamp

MODES = ("eager", "graph", "compile")

# eager steps run before capturing the CUDA graph (they also warm up cuBLAS and any compilation)
WARMUP_STEPS = 2

# with an eos token, how often (in steps) the host looks whether every row has finished
EOS_CHECK_EVERY = 32

# the buffers' length is rounded up to this, so that nearby lengths reuse one captured graph
LENGTH_MULTIPLE = 128


# what the fast path covers - everything else decodes on the plain cached path


def _attention_unsupported(attn: Attention) -> str | None:
    attend = attn.attend
    fn = attend.attn_fn
    # weightings that give a masked-out (future) column exactly zero weight, as the plain path's missing column
    known_fn = fn in (F.sigmoid, one_hot_straight_through) or (
        isinstance(fn, partial) and fn.func in (F.softmax, sparse_topk_attn)
    )
    is_softmax = isinstance(fn, partial) and fn.func is F.softmax
    flags = dict(
        attn_custom_attn_fn=not known_fn,
        # the flash step is plain SDPA: only what SDPA computes
        attn_flash_with_sigmoid_hard_or_sparse_topk=attend.flash and not is_softmax,
        attn_flash_with_l2_distance_or_add_zero_kv=attend.flash and (attend.l2_distance or attend.add_zero_kv),
        attn_data_dependent_alibi=exists(attn.data_dependent_alibi),
        attn_hybrid_module=exists(attn.hybrid_module),
        attn_neutreno_value_residual=attn.neutreno_value_residual,
        attn_use_latent_q=attn.use_latent_q,
        attn_use_latent_kv=attn.use_latent_kv,
        attn_laser=attn.laser or attend.laser,
        attn_selective=attend.selective,
        attn_use_cope=exists(attend.cope),
        add_value_residual=exists(attn.to_value_residual_mix),
        qkv_receive_diff_residuals=attn.qkv_receive_diff_residuals,
    )
    return next((name for name, on in flags.items() if on), None)


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def supports(net) -> tuple[bool, str]:
    """Whether `net` (a `TransformerWrapper` around a `Decoder`) can decode on the fast path; if not, the reason,
    naming the flag that prevents it."""
    # imported here: x_transformers.py imports the wrappers, which import this file lazily
    from x_transformers.x_transformers import AttentionLayers, TransformerWrapper, always

    if not isinstance(net, TransformerWrapper):
        return False, f"the network is a {type(net).__name__}, the fast path decodes a TransformerWrapper"

    if any(_is_dtensor(p) for p in net.parameters()):
        # FSDP2 all-gathers weights in its forward hooks, which the fast path's own layer loop never calls
        return False, "the parameters are sharded DTensors (FSDP2): the plain path decodes through FSDP's hooks"

    layers = net.attn_layers
    if not isinstance(layers, AttentionLayers):
        return False, f"attn_layers is a {type(layers).__name__}, not a Decoder"

    wrapper_flags = dict(
        can_cache_kv=not net.can_cache_kv,
        num_memory_tokens=net.num_memory_tokens > 0,
        recycling=net.recycling,
        num_cls_tokens=exists(net.cls_token),
        num_attn_pool_queries=exists(net.attn_pool),
        average_pool_embed=net.average_pool_embed,
        mixture_of_softmax=exists(net.to_mixture),
        sigsoftmax_logits=net.sigsoftmax_logits,
        num_output_heads=net.has_multiple_heads,
        embed_num_tokens=exists(net.embeds),
        squeeze_out_last_dim=net.squeeze_out_last_dim,
        logits_dim=not exists(net.to_logits),
        pos_emb=not isinstance(net.pos_emb, (always, AbsolutePositionalEmbedding, ScaledSinusoidalEmbedding)),
    )
    layer_flags = dict(
        causal=not layers.causal,
        cross_residual_attn=layers.cross_attend and layers.cross_residual_attn,
        pre_norm=not layers.pre_norm,
        sandwich_norm=layers.sandwich_norm,
        resi_dual=layers.resi_dual,
        unet_skips=layers.unet_skips,
        reinject_input=layers.reinject_input or exists(layers.learned_reinject_input_gate),
        add_value_residual=layers.add_value_residual,
        num_residual_streams=layers.num_residual_streams > 1,
        use_adaptive_layernorm_or_layerscale=layers.need_condition,
        residual_attn=layers.residual_attn,
        alibi_pos_bias_or_rel_pos_bias_or_dynamic_pos_bias=exists(layers.rel_pos),
        rotary_xpos=exists(layers.rotary_pos_emb) and exists(layers.rotary_pos_emb.scale),
        layers_execute_order_or_weight_tie_layers=list(layers.layers_execute_order) != list(range(len(layers.layers))),
        ff_num_experts=layers.has_moe,
    )
    for name, on in {**wrapper_flags, **layer_flags}.items():
        if on:
            return False, f"`{name}` is not supported by fast decoding"

    for index, (layer_type, (_, block, residual_fn)) in enumerate(zip(layers.layer_types, layers.layers)):
        expected = dict(a=Attention, c=Attention, f=FeedForward, l=Mixer).get(layer_type)
        if not exists(expected):
            return False, f"layer {index} of type {layer_type!r} is not supported by fast decoding"
        if not isinstance(block, expected):
            # ShiftTokens, LayerScale, Scale (macaron) wrap the block
            return False, (
                f"layer {index} is wrapped in {type(block).__name__} (shift_tokens, use_layerscale, macaron...), "
                "not supported by fast decoding"
            )
        if type(residual_fn) is not Residual:
            name = type(residual_fn).__name__
            return False, f"`{name}` residuals (gate_residual, hyper-connections) are not supported by fast decoding"
        if layer_type in ("a", "c"):
            flag = _attention_unsupported(block)
            if exists(flag):
                return False, f"`{flag}` is not supported by fast decoding"
        if layer_type == "l" and not block.causal:
            return False, f"layer {index}: a bidirectional mixer cannot decode"

    return True, ""


# sampling on the device


def sample_next(logits: Tensor, temperature: float, filter_fn: Callable, filter_kwargs: dict) -> Tensor:
    """(b, num_tokens) logits -> (b, 1) token ids, greedy at temperature 0, without a host sync."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = (filter_fn(logits, **filter_kwargs) / temperature).softmax(dim=-1)
    # exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p, unlike torch.multinomial it never syncs
    race = torch.empty_like(probs).exponential_(1)
    return (probs / race).argmax(dim=-1, keepdim=True)


# the decoder


class FastDecoder:
    """Static-cache decoder of one `TransformerWrapper` for a fixed batch size and buffer length.

    Not an `nn.Module`, so that keeping one on the wrapper changes nothing in its state dict. Reuse it across
    `generate` calls with the same batch size: the captured CUDA graph is replayed as long as the buffers, the
    sampling settings and the weights' versions stay the same.
    """

    def __init__(self, net, batch: int, max_len: int, mode: str = "eager"):
        ok, reason = supports(net)
        if not ok:
            raise ValueError(reason)
        if mode not in MODES:
            raise ValueError(f"unknown fast decoding mode {mode!r}, expected one of {MODES}")
        device = next(net.parameters()).device
        if mode != "eager" and device.type != "cuda":
            raise ValueError(f"fast decoding mode {mode!r} needs CUDA, the model is on {device}")

        self.net, self.layers = net, net.attn_layers
        self.batch, self.max_len, self.mode, self.device = batch, max_len, mode, device
        self.requested_mode = mode
        self.has_attention = "a" in self.layers.layer_types

        # static inputs of the step: the token fed, its column, and each row's first real column (left padding)
        self.seq = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.start = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.key_pos = torch.arange(max_len, device=device)

        # per layer index: (keys, values) buffers for attention, (treedef, state leaves) for mixers
        self.kv: dict[int, tuple[Tensor, Tensor]] = {}
        self.states: dict[int, tuple] = {}
        self.rotary_table: dict[str, Tensor] = {}

        self.sampler = None
        self.graph = None
        self.graph_key = None
        self.step_fn = self.decode_step
        self.keep_alive = []

    # prefill - the model's own forward over the prompt, its caches copied into the static buffers

    def _fill_rotary_table(self):
        # cos / sin of every buffer position, once per prefill: the step only gathers its row
        rotary = self.layers.rotary_pos_emb
        if not exists(rotary):
            return
        freqs, _ = rotary(self.key_pos)  # (1, max_len, rot_dim)
        freqs = rearrange(freqs, "1 n d -> 1 1 n d")
        for name, table in (("cos", freqs.cos()), ("sin", freqs.sin())):
            old = self.rotary_table.get(name)
            if old is None or old.shape != table.shape or old.dtype != table.dtype:
                self.rotary_table[name] = table
                self.graph = None
            else:
                old.copy_(table)

    def _rotary(self, positions: Tensor | slice):
        if not self.rotary_table:
            return None
        if isinstance(positions, slice):
            return tuple(self.rotary_table[name][:, :, positions] for name in ("cos", "sin"))
        return tuple(self.rotary_table[name].index_select(2, positions) for name in ("cos", "sin"))

    @staticmethod
    def _rotate(t: Tensor, attn: Attention, rot) -> Tensor:
        """Rotary on the last `rotate_num_heads` heads of t (b, h, n, d), the first rot_dim features (partial)."""
        if not exists(rot):
            return t
        cos, sin = rot
        heads, dim_head, dtype = t.shape[1], t.shape[-1], t.dtype
        rot_heads, rot_dim = min(attn.rotate_num_heads, heads), cos.shape[-1]
        # concatenations only where something passes through unrotated: each is a kernel in the step
        rest, t = t[:, : heads - rot_heads], t[:, heads - rot_heads :]
        t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
        t = t * cos + rotate_half(t) * sin
        if rot_dim < dim_head:
            t = torch.cat((t, t_pass.type_as(t)), dim=-1)
        if rot_heads < heads:
            t = torch.cat((rest.type_as(t), t), dim=1)
        return t.type(dtype)

    def _store(self, index: int, name: str, shape, dtype) -> Tensor:
        # reuse the buffer (and so a captured graph) when it still fits, otherwise start over
        table = self.kv.setdefault(index, {})
        buffer = table.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = torch.zeros(shape, dtype=dtype, device=self.device)
            table[name] = buffer
            self.graph = None
        return buffer

    def _set_context(self, index: int, attn: Attention, kv: tuple[Tensor, Tensor], context_mask: Tensor | None):
        # cross attention reads the context's keys / values, fixed for the whole decode, behind any memory slots
        k, v = kv
        mem = attn.num_mem_kv
        batch, length = k.shape[0], mem + k.shape[-2]
        k_buffer = self._store(index, "k", (batch, k.shape[1], length, k.shape[-1]), k.dtype)
        v_buffer = self._store(index, "v", (batch, v.shape[1], length, v.shape[-1]), v.dtype)
        self._fill_memory_kv(attn, k_buffer, v_buffer)
        k_buffer[:, :, mem:].copy_(k)
        v_buffer[:, :, mem:].copy_(v)

        # a mask only where the plain path has one: an all-true mask could still pick another SDPA kernel
        table = self.kv[index]
        if not exists(context_mask):
            if table.pop("keep", None) is not None:
                self.graph = None
            return
        keep = F.pad(context_mask.bool(), (mem, 0), value=True)
        self._store(index, "keep", (batch, 1, 1, length), torch.bool).copy_(rearrange(keep, "b j -> b 1 1 j"))

    @staticmethod
    def _fill_memory_kv(attn: Attention, k_buffer: Tensor, v_buffer: Tensor):
        # memory key / values (arXiv 1907.01470) sit in the first slots, unrotated, as the plain path prepends them
        mem = attn.num_mem_kv
        if mem == 0:
            return
        mem_k = l2norm(attn.mem_k) * attn.qk_norm_k_scale if attn.qk_norm else attn.mem_k
        k_buffer[:, :, :mem].copy_(mem_k.expand_as(k_buffer[:, :, :mem]))
        v_buffer[:, :, :mem].copy_(attn.mem_v.expand_as(v_buffer[:, :, :mem]))

    def _set_state(self, index: int, state):
        # a tree of tensors and Nones (states a mixer does not keep)
        leaves, treedef = tree_flatten(state)
        if not all(t is None or torch.is_tensor(t) for t in leaves):
            raise TypeError(f"layer {index}: a mixer state must be a tree of tensors for fast decoding")
        old = self.states.get(index)
        fits = exists(old) and old[0] == treedef and all(
            (a is None and b is None) or (exists(a) and exists(b) and a.shape == b.shape and a.dtype == b.dtype)
            for a, b in zip(old[1], leaves)
        )
        if not fits:
            self.states[index] = (treedef, [t.clone() if exists(t) else None for t in leaves])
            self.graph = None
            return
        for buffer, t in zip(old[1], leaves):
            if exists(buffer):
                buffer.copy_(t)

    @torch.no_grad()
    def prefill(
        self,
        prompts: Tensor,
        seq_start_pos: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Run the prompts (b, n), left padded with `seq_start_pos`, fill the buffers; returns the last logits.
        `context` (b, m, dim_context) and its `context_mask` (b, m) feed the cross attention layers."""
        batch, n = prompts.shape
        if batch != self.batch:
            raise ValueError(f"this decoder was built for batch {self.batch}, got prompts of batch {batch}")
        if n >= self.max_len:
            raise ValueError(f"prompt of length {n} leaves no room in buffers of length {self.max_len}")

        if self.layers.cross_attend != exists(context):
            raise ValueError("pass `context` exactly when the decoder has cross attention (cross_attend=True)")
        context_kwargs = dict(context=context, context_mask=context_mask) if exists(context) else dict()
        logits, cache = self.net(prompts, return_intermediates=True, seq_start_pos=seq_start_pos, **context_kwargs)
        inters = iter(cache.attn_intermediates)
        self._fill_rotary_table()
        rot = self._rotary(slice(0, n))

        for index, (layer_type, (_, block, _)) in enumerate(zip(self.layers.layer_types, self.layers.layers)):
            if layer_type == "a":
                # the cache keeps keys before rotary; ours keeps them rotated, once, at their own positions
                k, v = next(inters).cached_kv[:2]
                k = self._rotate(k, block, rot)
                mem = block.num_mem_kv
                length = mem + self.max_len
                k_buffer = self._store(index, "k", (batch, k.shape[1], length, k.shape[-1]), k.dtype)
                v_buffer = self._store(index, "v", (batch, v.shape[1], length, v.shape[-1]), v.dtype)
                self._fill_memory_kv(block, k_buffer, v_buffer)
                k_buffer[:, :, mem : mem + n].copy_(k)
                v_buffer[:, :, mem : mem + n].copy_(v)
            elif layer_type == "c":
                self._set_context(index, block, next(inters).cached_kv[:2], context_mask)
            elif layer_type == "l":
                self._set_state(index, next(inters).recurrent_state)

        self.seq[:, :n].copy_(prompts)
        self.pos.fill_(n)
        self.start.copy_(seq_start_pos if exists(seq_start_pos) else torch.zeros_like(self.start))
        self.done.zero_()
        return logits[:, -1]

    # the one-token step - fixed shapes, static buffers, no host sync

    def _attend(self, index: int, attn: Attention, x: Tensor, keep: Tensor | None, rot) -> Tensor:
        # the model's own fused projection: one matmul, and the very arithmetic of the plain path
        q, k, v = attn.fused_linear(x, ("to_q", "to_k", "to_v"))
        q = rearrange(q, "b n (h d) -> b h n d", h=attn.heads)
        k = rearrange(k, "b n (h d) -> b h n d", d=attn.dim_head)
        v = rearrange(v, "b n (h d) -> b h n d", d=attn.value_dim_head)

        # qk norm - as the model does it, before the cache (arXiv 2010.04245)
        if attn.qk_norm:
            q = l2norm(q, groups=attn.qk_norm_groups) * attn.qk_norm_q_scale
            k = l2norm(k, groups=attn.qk_norm_groups) * attn.qk_norm_k_scale

        q, k = self._rotate(q, attn, rot), self._rotate(k, attn, rot)

        k_buffer, v_buffer = self.kv[index]["k"], self.kv[index]["v"]
        mem = attn.num_mem_kv
        pos = self.pos + mem if mem > 0 else self.pos
        k_buffer.index_copy_(2, pos, k.to(k_buffer.dtype))
        v_buffer.index_copy_(2, pos, v.to(v_buffer.dtype))
        # attend-past window - keys more than max_attend_past behind the query are out of reach
        if exists(attn.max_attend_past):
            keep = keep & (self.key_pos >= self.pos - attn.max_attend_past)
        if mem > 0:
            keep = F.pad(keep, (mem, 0), value=True)
        return self._attend_buffers(attn, x, q, k_buffer, v_buffer, keep)

    def _cross_attend(self, index: int, attn: Attention, x: Tensor) -> Tensor:
        # queries from the new token; keys / values of the context were set at prefill (no rotary without context_pos)
        q = rearrange(attn.to_q(x), "b n (h d) -> b h n d", h=attn.heads)
        if attn.qk_norm:
            q = l2norm(q, groups=attn.qk_norm_groups) * attn.qk_norm_q_scale
        table = self.kv[index]
        return self._attend_buffers(attn, x, q, table["k"], table["v"], table.get("keep"))

    @staticmethod
    def _attend_buffers(attn: Attention, x: Tensor, q: Tensor, k_buffer: Tensor, v_buffer: Tensor, keep) -> Tensor:
        """The attention layer's output for one query token (b, h, 1, d) over its key / value buffers."""
        q = q.to(k_buffer.dtype)
        if not attn.attend.flash:
            # the model's own math attention over the whole buffer, future columns masked out: the arithmetic of the
            # plain path (bf16 logits, fp32 softmax under autocast), bit for bit on CPU, so that half-precision
            # greedy decoding emits the plain path's tokens rather than flipping its many near-ties
            out, _ = attn.attend(q, k_buffer, v_buffer, mask=keep)
        else:
            # attn_flash: SDPA as the plain path, though under a mask it picks another kernel than the plain path's
            # unmasked call. Grouped kv heads - query head h reads kv head h % kv_heads: the groups fold into the
            # query length, so every kv head is read once and never copied
            kv_heads = k_buffer.shape[1]
            q = rearrange(q, "b (g h) 1 d -> b h g d", h=kv_heads)
            scale = attn.attend.scale if exists(attn.attend.scale) else q.shape[-1] ** -0.5
            out = F.scaled_dot_product_attention(q, k_buffer, v_buffer, attn_mask=keep, scale=scale)
            out = rearrange(out, "b h g d -> b (g h) 1 d")

        # normformer head scale, per-head gates (arXiv 2306.12929) - as the model applies them
        if attn.head_scale:
            out = out * attn.head_scale_params
        if exists(attn.to_v_head_gate):
            out = out * rearrange(attn.to_v_head_gate(x).sigmoid(), "b n h -> b h n 1")

        out = rearrange(out, "b h 1 d -> b 1 (h d)")

        # value gating (alphafold2)
        if exists(attn.to_v_gate):
            out = out * attn.to_v_gate_activation(attn.to_v_gate(x))
        return attn.to_out(out)

    def _mix(self, index: int, mixer: Mixer, x: Tensor) -> Tensor:
        # the new token is always real, so the mixer needs no mask; its new state goes back into the buffers
        treedef, buffers = self.states[index]
        state = tree_unflatten(buffers, treedef)
        out, inter = mixer(x, cache=Intermediates(recurrent_state=state), return_intermediates=True)
        new_leaves, new_treedef = tree_flatten(inter.recurrent_state)
        same = new_treedef == treedef and all(
            (a is None) == (b is None) and (a is None or a.shape == b.shape) for a, b in zip(buffers, new_leaves)
        )
        if not same:
            raise RuntimeError(f"layer {index}: the mixer's state changed structure or shape between steps")
        for buffer, t in zip(buffers, new_leaves):
            if exists(buffer) and t is not buffer:
                buffer.copy_(t)
        return out

    def forward_step(self) -> Tensor:
        """Logits (b, num_tokens) of `self.tokens` at column `self.pos`; writes its caches, leaves `pos` as is."""
        net, layers = self.net, self.layers

        x = net.token_emb(self.tokens) + net.pos_emb(self.tokens, pos=self.pos, seq_start_pos=self.start)
        x = net.project_emb(net.post_emb_norm(x))

        # keys at or before the current column and at or after the row's first real token
        keep = None
        if self.has_attention:
            keep = (self.key_pos <= self.pos) & (self.key_pos >= self.start[:, None])
            keep = rearrange(keep, "b j -> b 1 1 j")
        rot = self._rotary(self.pos)

        for index, (layer_type, (norms, block, residual_fn)) in enumerate(zip(layers.layer_types, layers.layers)):
            x, residual, residual_kwargs = residual_fn.prepare(x)
            h = norms[0](x)
            if layer_type == "a":
                out = self._attend(index, block, h, keep, rot)
            elif layer_type == "c":
                out = self._cross_attend(index, block, h)
            elif layer_type == "l":
                out = self._mix(index, block, h)
            else:
                out = block(h)
            x = residual_fn(out, residual, **residual_kwargs)

        if layers.softclamp_output:
            x = softclamp(x, layers.softclamp_output_value)
        x = layers.final_norm(x)
        return net.to_logits(x)[:, -1]

    def decode_step(self):
        """One token: logits, sample, record, advance. Everything stays on the device."""
        temperature, filter_fn, filter_kwargs, eos_token = self.sampler
        logits = self.forward_step()
        sample = sample_next(logits, temperature, filter_fn, filter_kwargs)
        self.seq.index_copy_(1, self.pos + 1, sample)
        if exists(eos_token):
            self.done |= sample[:, 0] == eos_token
        self.tokens.copy_(sample)
        self.pos.add_(1)

    # CUDA graph

    def _weights_version(self):
        return sum(p._version for p in self.net.parameters())

    @staticmethod
    def _autocast():
        # a CUDA graph may not capture autocast's cache of casted weights; warm-up steps run under the same
        # settings as the capture, so that a compiled step is not recompiled inside it
        if not torch.is_autocast_enabled("cuda"):
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)

    def _warm_step(self):
        # real decoding steps, on a side stream as capture wants; compile mode compiles here
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._autocast():
            if self.mode == "compile" and self.step_fn is self.decode_step:
                self.step_fn = torch.compile(self.decode_step, fullgraph=True, dynamic=False)
            try:
                self.step_fn()
            except Exception as error:  # noqa: BLE001 - any compile failure falls back to the eager step
                if self.step_fn is self.decode_step:
                    raise
                logger.warning(f"torch.compile of the decode step failed, capturing it uncompiled: {error}")
                self.mode, self.step_fn = "graph", self.decode_step
                self.step_fn()
        torch.cuda.current_stream().wait_stream(stream)

    @torch.no_grad()
    def run_steps(self, num_steps: int, eos_token=None):
        """`num_steps` decoding steps, replaying the CUDA graph where there is one; stops early (checking every
        EOS_CHECK_EVERY steps) once every row has emitted `eos_token`."""
        key = (self.sampler_key, self._weights_version())
        if self.graph_key != key:
            self.graph = None

        for step in range(num_steps):
            if self.mode == "eager":
                self.decode_step()
            elif exists(self.graph):
                self.graph.replay()
            elif step < WARMUP_STEPS or num_steps - step < 2:
                self._warm_step()
            else:
                self.graph = self._capture_step()
                self.graph_key = key
                if exists(self.graph):
                    self.graph.replay()
                else:
                    self.decode_step()

            if exists(eos_token) and (step + 1) % EOS_CHECK_EVERY == 0 and bool(self.done.all()):
                break

    def _capture_step(self):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), self._autocast():
                self.step_fn()
        except Exception as error:  # noqa: BLE001 - e.g. a custom filter_logits_fn that syncs with the host
            logger.warning(f"the decode step could not be captured in a CUDA graph, decoding eagerly: {error}")
            self.mode, self.step_fn = "eager", self.decode_step
            return None

        # the graph reads the attention layers' concatenated qkv weights by address: hold them, so that a training
        # forward dropping that inference copy cannot free memory the graph still reads (a weight update changes
        # the weights' versions, and a new graph is captured)
        self.keep_alive = [
            entry[1] for _, block, _ in self.layers.layers if isinstance(block, Attention)
            for entry in getattr(block, "_fused_weights", {}).values()
        ]
        return graph

    # generation

    def set_sampler(self, temperature: float, filter_fn: Callable, filter_kwargs: dict, eos_token):
        self.sampler = (temperature, filter_fn, dict(filter_kwargs), eos_token)
        self.sampler_key = (
            temperature,
            filter_fn if temperature != 0.0 else None,
            repr(sorted(filter_kwargs.items())) if temperature != 0.0 else None,
            eos_token,
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: Tensor,
        seq_len: int,
        seq_start_pos: Tensor | None = None,
        temperature: float = 1.0,
        filter_fn: Callable | None = None,
        filter_kwargs: dict = dict(),
        eos_token: int | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Up to `seq_len` new tokens (b, <= seq_len) after the left-padded `prompts` (b, n), exactly as the plain
        path returns them: cut where every row has finished, positions after a row's eos token padded later.
        `context` / `context_mask` feed the cross attention layers, as in the network's forward."""
        n = prompts.shape[1]
        if n + seq_len > self.max_len:
            raise ValueError(f"{n} prompt + {seq_len} new tokens do not fit buffers of length {self.max_len}")
        from x_transformers.autoregressive_wrapper import top_k

        self.set_sampler(temperature, filter_fn or top_k, filter_kwargs, eos_token)

        logits = self.prefill(prompts, seq_start_pos, context=context, context_mask=context_mask)
        sample = sample_next(logits, *self.sampler[:3])
        self.seq[:, n : n + 1].copy_(sample)
        self.tokens.copy_(sample)
        if exists(eos_token):
            self.done |= sample[:, 0] == eos_token

        if seq_len > 1 and not (exists(eos_token) and bool(self.done.all())):
            self.run_steps(seq_len - 1, eos_token)

        out = self.seq[:, n : n + seq_len].clone()
        if exists(eos_token):
            # the plain loop stops at the first step where every row has emitted eos
            is_eos = out == eos_token
            if bool(is_eos.any(dim=-1).all()):
                out = out[:, : int(is_eos.int().argmax(dim=-1).amax()) + 1]
        return out


def fast_decoder_for(wrapper, batch: int, length: int, mode: str) -> FastDecoder:
    """The FastDecoder kept on `wrapper`, rebuilt when the batch, length, mode or device change."""
    max_len = -(-length // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    device = next(wrapper.net.parameters()).device
    decoder = wrapper.__dict__.get("_fast_decoder")
    if not (
        exists(decoder)
        and decoder.net is wrapper.net
        and decoder.batch == batch
        and decoder.max_len >= length
        and decoder.max_len <= 2 * max_len
        and decoder.requested_mode == mode
        and decoder.device == device
    ):
        decoder = FastDecoder(wrapper.net, batch, max_len, mode=mode)
        # a plain attribute, so the wrapper's state dict is unchanged
        wrapper.__dict__["_fast_decoder"] = decoder
    return decoder
