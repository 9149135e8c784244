"""Fast decoding: a thin driver around the model's own forward and a static cache, the gpt-fast way.

The network decodes through its ordinary `forward(tokens, cache=StaticCache(...))` (x_transformers/cache.py): the
modules write their keys / values and states into preallocated buffers at the tokens' positions, so one decoding
step has the same shapes and buffer addresses every time. This file only

- allocates the cache and the step's static inputs (the fed token, the output sequence, the finished rows),
- runs the prompt once (prefill), then steps of one token: forward, sample on the device, record - no host sync,
- on CUDA captures the step once in a CUDA graph (optionally after `torch.compile`) and replays it per token.

What decodes here is what the modules declare (`static_decode_refusal`, an allow list); `supports(net)` names the
flag or module that prevents it, and `AutoregressiveWrapper.generate` then decodes on the plain cached path.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from loguru import logger
from torch import Tensor

from x_transformers.cache import StaticCache, static_cache_refusal
from x_transformers.utils import exists

MODES = ("eager", "graph", "compile")

# eager steps run before capturing the CUDA graph (they also warm up cuBLAS and any compilation)
WARMUP_STEPS = 2

# with an eos token, how often (in steps) the host looks whether every row has finished
EOS_CHECK_EVERY = 32

# the buffers' length is rounded up to this, so that nearby lengths reuse one captured graph
LENGTH_MULTIPLE = 128


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def supports(net) -> tuple[bool, str]:
    """Whether `net` can decode on the fast path; if not, the reason, naming the flag that prevents it."""
    if any(_is_dtensor(p) for p in net.parameters()):
        # FSDP2 all-gathers weights in forward hooks, which a replayed CUDA graph would skip
        return False, "the parameters are sharded DTensors (FSDP2): the plain path decodes through FSDP's hooks"
    reason = static_cache_refusal(net)
    if exists(reason):
        return False, reason
    # the step samples one id per row from (b, num_tokens) logits
    heads = dict(
        num_output_heads=getattr(net, "has_multiple_heads", False),
        squeeze_out_last_dim=getattr(net, "squeeze_out_last_dim", False),
        logits_dim=not exists(getattr(net, "to_logits", None)),
    )
    name = next((name for name, on in heads.items() if on), None)
    if exists(name):
        return False, f"`{name}`: fast decoding samples token ids from one head of logits"
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
    """Static-cache decoder of one network for a fixed batch size and buffer length.

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

        self.net = net
        self.batch, self.max_len, self.mode, self.device = batch, max_len, mode, device
        self.requested_mode = mode
        self.cache = StaticCache(batch, max_len, device)

        # static inputs and outputs of the step: the token fed, the sequence so far, the rows that emitted eos
        self.seq = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        # cross attention's context, fixed for a whole decode: the step reads it from here
        self.context_kwargs: dict[str, Tensor] = {}

        self.sampler = None
        self.sampler_key = None
        self.graph = None
        self.graph_key = None
        self.step_fn = self.decode_step
        self.keep_alive = []

    def _set_context(self, context: Tensor | None, context_mask: Tensor | None):
        given = dict(context=context, context_mask=context_mask)
        for name, t in given.items():
            old = self.context_kwargs.get(name)
            if not exists(t):
                if exists(old):
                    del self.context_kwargs[name]
                    self.graph = None
            elif exists(old) and old.shape == t.shape and old.dtype == t.dtype:
                old.copy_(t)
            else:
                self.context_kwargs[name] = t.clone()
                self.graph = None

    @torch.no_grad()
    def prefill(
        self,
        prompts: Tensor,
        seq_start_pos: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Run the prompts (b, n), left padded with `seq_start_pos`, through the network into the cache; returns
        the last logits. `context` (b, m, dim_context) and its `context_mask` (b, m) feed the cross attention."""
        batch, n = prompts.shape
        if batch != self.batch:
            raise ValueError(f"this decoder was built for batch {self.batch}, got prompts of batch {batch}")
        if n >= self.max_len:
            raise ValueError(f"prompt of length {n} leaves no room in buffers of length {self.max_len}")

        self._set_context(context, context_mask)
        self.cache.reset(seq_start_pos)
        logits = self.net(prompts, cache=self.cache, seq_start_pos=seq_start_pos, **self.context_kwargs)

        self.seq[:, :n].copy_(prompts)
        self.done.zero_()
        return logits[:, -1]

    # the one-token step - fixed shapes, static buffers, no host sync

    def forward_step(self) -> Tensor:
        """Logits (b, num_tokens) of `self.tokens` at the cache's position; advances the cache by one."""
        return self.net(self.tokens, cache=self.cache, **self.context_kwargs)[:, -1]

    def decode_step(self):
        """One token: logits, sample, record. Everything stays on the device."""
        temperature, filter_fn, filter_kwargs, eos_token = self.sampler
        logits = self.forward_step()
        sample = sample_next(logits, temperature, filter_fn, filter_kwargs)
        # the cache now stands at the sampled token's position
        self.seq.index_copy_(1, self.cache.pos, sample)
        if exists(eos_token):
            self.done |= sample[:, 0] == eos_token
        self.tokens.copy_(sample)

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
        settings = (self.sampler_key, self._weights_version())
        for step in range(num_steps):
            # a buffer the cache reallocates (a state changing shape or dtype) moves what the graph reads
            key = (*settings, self.cache.version)
            if self.graph_key != key:
                self.graph = None

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
        # capture records one step's kernels without running them: the position advances once per replay
        pos = self.cache.pos.clone()
        try:
            with torch.cuda.graph(graph), self._autocast():
                self.step_fn()
        except Exception as error:  # noqa: BLE001 - e.g. a custom filter_logits_fn that syncs with the host
            self.cache.pos.copy_(pos)
            if self.step_fn is not self.decode_step:
                # a compiled step may compile again inside the capture (a guard that failed): capture it uncompiled
                logger.warning(f"the compiled decode step could not be captured, capturing it uncompiled: {error}")
                self.mode, self.step_fn = "graph", self.decode_step
                return self._capture_step()
            logger.warning(f"the decode step could not be captured in a CUDA graph, decoding eagerly: {error}")
            self.mode, self.step_fn = "eager", self.decode_step
            return None
        self.cache.pos.copy_(pos)

        # the graph reads the attention layers' concatenated qkv weights by address: hold them, so that a training
        # forward dropping that inference copy cannot free memory the graph still reads (a weight update changes
        # the weights' versions, and a new graph is captured)
        self.keep_alive = [
            entry[1] for module in self.net.modules() for entry in getattr(module, "_fused_weights", {}).values()
        ]
        return graph

    # generation

    def set_sampler(self, temperature: float, filter_fn: Callable | None, filter_kwargs: dict, eos_token):
        filter_fn = filter_fn if exists(filter_fn) else no_filter
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

        self.set_sampler(temperature, filter_fn, filter_kwargs, eos_token)

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


def no_filter(logits: Tensor, **kwargs) -> Tensor:
    return logits


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
