"""The static decoding cache: fixed-size buffers that the modules write in place, gpt-fast style.

`TransformerWrapper.forward(tokens, cache=StaticCache(...))` runs the model's ordinary forward over new tokens only:
the prompt once (prefill), then one token per call. Every layer call owns one entry of the cache, in execution
order, and keeps there what its next call needs:

- softmax attention: keys (rotated) and values, `(b, kv_heads, max_len, d)`, written at the tokens' positions;
  queries attend over the whole buffer under a position mask, so every decoding step has the same shapes;
- linear-attention / RNN mixers: their recurrent and short-convolution states, copied in place;
- token shift: the last inputs that the next token shifts in.

The position of the next token lives on the device (`pos`), so a decoding step reads no host value: the step can be
captured in a CUDA graph and replayed, every buffer at a fixed address. `start` holds each row's first real
position (left-padded prompts).

Modules that can decode this way say so (`static_decode_refusal()` returns None); a module that cannot names the
flag that prevents it, and `static_cache_refusal(net)` reports the first such reason for a whole network.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from x_transformers.utils import exists


class KeyValueBuffer:
    """Keys and values of one self-attention call site, `(b, kv_heads, max_len, d)`, allocated on first write."""

    def __init__(self, cache: StaticCache):
        self.cache = cache
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (b, kv_heads, n, d) at the positions of this call's tokens; returns the whole buffers."""
        cache = self.cache
        fits = exists(self.k) and all(
            buffer.shape[:2] == t.shape[:2] and buffer.shape[-1] == t.shape[-1] and buffer.dtype == t.dtype
            for buffer, t in ((self.k, k), (self.v, v))
        )
        if not fits:
            self.k = k.new_zeros(*k.shape[:2], cache.max_len, k.shape[-1])
            self.v = v.new_zeros(*v.shape[:2], cache.max_len, v.shape[-1])
            cache.buffers_changed()
        positions = cache.positions(k.shape[-2])
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        return self.k, self.v


class StateBuffer:
    """A tree of state tensors (a mixer's recurrent / convolution states, a token-shift tail), updated in place."""

    def __init__(self, cache: StaticCache):
        self.cache = cache
        self.treedef = None
        self.leaves: list[Tensor | None] | None = None

    @property
    def state(self):
        return tree_unflatten(self.leaves, self.treedef) if exists(self.leaves) else None

    def store(self, state):
        leaves, treedef = tree_flatten(state)
        if not all(t is None or torch.is_tensor(t) for t in leaves):
            raise TypeError("a decoding state must be a tree of tensors (and Nones)")
        fits = exists(self.leaves) and treedef == self.treedef and all(
            (a is None and b is None) or (exists(a) and exists(b) and a.shape == b.shape and a.dtype == b.dtype)
            for a, b in zip(self.leaves, leaves)
        )
        if not fits:
            self.treedef, self.leaves = treedef, [t.clone() if exists(t) else None for t in leaves]
            self.cache.buffers_changed()
            return
        for buffer, t in zip(self.leaves, leaves):
            if exists(buffer) and t is not buffer:
                buffer.copy_(t)


ENTRY_KINDS = dict(kv=KeyValueBuffer, state=StateBuffer, shift=StateBuffer)


class StaticCache:
    """Decoding cache of one network for `batch` rows and up to `max_len` positions.

    `reset()` (or a new cache) before each prompt. The forward that receives the cache advances `pos` by the number
    of tokens it ran.
    """

    def __init__(self, batch: int, max_len: int, device: torch.device | str | None = None):
        if batch < 1 or max_len < 1:
            raise ValueError(f"a static cache needs a positive batch and length, got {batch} and {max_len}")
        self.batch, self.max_len = batch, max_len
        self.device = torch.device(device) if exists(device) else torch.device("cpu")
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.start = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.key_pos = torch.arange(max_len, device=self.device)
        self.entries: dict[tuple[int, str], object] = {}
        # the first forward after a reset starts at position 0: it attends over its own keys only, exactly as a
        # forward without cache does
        self.fresh = True
        # bumped whenever a buffer is (re)allocated, so that a captured CUDA graph knows it is stale
        self.version = 0
        # positions and masks of the current call, built once and shared by every layer
        self.call_tensors: dict = {}

    def reset(self, seq_start_pos: Tensor | None = None):
        self.call_tensors.clear()
        self.pos.zero_()
        if exists(seq_start_pos):
            self.start.copy_(seq_start_pos)
        else:
            self.start.zero_()
        self.fresh = True

    def buffers_changed(self):
        self.version += 1

    def entry(self, index: int, kind: str):
        """The entry of the `index`-th layer call (execution order) of kind "kv" (self attention), "state" (a mixer)
        or "shift" (a token-shift tail). Cross attention keeps nothing: it reads the context at every call."""
        key = (index, kind)
        if key not in self.entries:
            self.entries[key] = ENTRY_KINDS[kind](self)
        return self.entries[key]

    def _per_call(self, key, make):
        if key not in self.call_tensors:
            self.call_tensors[key] = make()
        return self.call_tensors[key]

    def positions(self, n: int) -> Tensor:
        """Positions (n,) of the tokens of the current call."""
        return self._per_call(("positions", n), lambda: self.pos + torch.arange(n, device=self.pos.device))

    def check_room(self, n: int):
        """Before a call of n tokens: at prefill (where the position is known without a host sync) the tokens must
        fit the buffers."""
        if self.fresh and n > self.max_len:
            raise ValueError(f"{n} tokens do not fit a static cache of length {self.max_len}")

    def keep_mask(self, n: int, max_attend_past: int | None = None) -> Tensor:
        """(b, 1, n, max_len) bool: key j is visible to the call's query i when it is written (j <= position of i),
        in the row (j >= its start) and, with an attend-past window, near enough."""
        def make():
            query_pos = self.positions(n)[:, None]
            keep = (self.key_pos <= query_pos) & (self.key_pos >= self.start[:, None, None])
            if exists(max_attend_past):
                keep = keep & (self.key_pos >= query_pos - max_attend_past)
            return keep[:, None]

        return self._per_call(("keep", n, max_attend_past), make)

    def advance(self, n: int):
        self.pos.add_(n)
        self.fresh = False
        self.call_tensors.clear()


def static_cache_refusal(net) -> str | None:
    """None if `net` decodes with a `StaticCache`, else why not, naming the flag or module that prevents it."""
    refusal = getattr(net, "static_decode_refusal", None)
    if not callable(refusal):
        return f"{type(net).__name__} does not declare static-cache decoding"
    return refusal()


def module_refusal(module, where: str) -> str | None:
    """The refusal of one block of a layer stack, prefixed with where it sits."""
    reason = static_cache_refusal(module)
    return f"{where}: {reason}" if exists(reason) else None


__all__ = ["StaticCache", "static_cache_refusal", "module_refusal"]
