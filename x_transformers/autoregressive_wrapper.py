"""Next-token training and decoding (sampling, greedy, beam search) around a decoder `TransformerWrapper`."""

from __future__ import annotations

from functools import wraps
from math import ceil, log
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat, pack, unpack
from torch import Tensor, tensor
from torch.nn import Module
from torch.nn.utils.rnn import pad_sequence

from loguru import logger

from x_transformers.utils import exists, default, identity, cast_tuple, pad_at_dim
from x_transformers.utils import log as safe_log

# helpers


def join(arr, delimiter=", "):
    return delimiter.join(arr)


def eval_decorator(fn):
    """Run `fn` in eval mode and restore the previous train / eval state afterwards."""

    @wraps(fn)
    def inner(self, *args, **kwargs):
        was_training = self.training
        self.eval()
        out = fn(self, *args, **kwargs)
        self.train(was_training)
        return out

    return inner


def gumbel_noise(t: Tensor):
    uniform = torch.rand_like(t)
    return -safe_log(-safe_log(uniform))


def align_right(t: Tensor, lens: Tensor, pad_id=0):
    """Move each row's first `lens[i]` entries to the right end of the row, padding on the left with `pad_id`."""
    batch, seq_len, device = *t.shape[:2], t.device

    assert lens.ndim == 1 and lens.shape[0] == batch, "`prompt_lens` must be 1-D with one length per prompt"
    assert int(lens.amax()) <= seq_len, "a prompt length exceeds the prompt tensor length"

    pad_lens = seq_len - lens
    max_pad_len = int(pad_lens.amax())

    t = pad_at_dim(t, (max_pad_len, 0), dim=1, value=pad_id)

    # row i is read starting at column (max_pad_len - pad_lens[i]) of the left-padded tensor
    offsets = max_pad_len - pad_lens
    cols = torch.arange(seq_len, device=device) + offsets[:, None]
    rows = torch.arange(batch, device=device)[:, None]
    return t[rows, cols]


def on_cuda(t: Tensor) -> bool:
    # the one place fast decoding's auto mode looks at the device (tests pretend to be on CUDA through it)
    return t.device.type == "cuda"


# decode cache surgery - the cache is a `LayerIntermediates`; every tensor it carries for decoding is batch-first


def _map_tensors(obj, fn):
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(el, fn) for el in obj)
    return obj


def _map_hybrid_hidden(hidden, fn):
    # the attention layer keeps (rnn state, pending tokens): the state of a torch RNN is (layers, batch * axial, dim),
    # batch folded with the axial dimension on dim 1; the pending tokens not yet fed to it are (batch, n, dim)
    if not (isinstance(hidden, tuple) and len(hidden) == 2 and torch.is_tensor(hidden[1])):
        return _map_tensors(hidden, fn)

    state, pending = hidden
    batch = pending.shape[0]

    def map_state(t):
        t = rearrange(t, "l (b a) ... -> b l a ...", b=batch)
        t = fn(t)
        return rearrange(t, "b l a ... -> l (b a) ...")

    return _map_tensors(state, map_state), fn(pending)


def map_cache_batch(cache, fn):
    """Apply `fn` to the batch dimension (moved to dim 0) of every decode state in the cache, in place."""
    for inter in cache.attn_intermediates:
        if exists(inter.cached_kv):
            inter.cached_kv = _map_tensors(inter.cached_kv, fn)
        if exists(getattr(inter, "hybrid_hidden", None)):
            inter.hybrid_hidden = _map_hybrid_hidden(inter.hybrid_hidden, fn)
        if exists(getattr(inter, "recurrent_state", None)):
            inter.recurrent_state = _map_tensors(inter.recurrent_state, fn)
    return cache


def trim_cached_kv(cache, length: int):
    """Keep only the last `length` cached keys / values of every self-attention layer (sliding window)."""
    for inter in cache.attn_intermediates:
        if inter.layer_type == "a" and exists(inter.cached_kv):
            inter.cached_kv = _map_tensors(inter.cached_kv, lambda t: t[..., -length:, :])
    return cache


# sampling filters - each takes logits (b, num_tokens) and returns them with the rejected entries at -inf


def top_p(logits: Tensor, thres=0.9):
    """Nucleus sampling: keep the smallest set of tokens whose probabilities sum past `thres`."""
    sorted_logits, sorted_indices = logits.sort(dim=-1, descending=True)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)

    # shift right by one so the token that crosses the threshold is kept
    remove = F.pad(cum_probs > thres, (1, -1), value=False)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return sorted_logits.scatter(-1, sorted_indices, sorted_logits)


def top_k(logits: Tensor, frac_num_tokens=0.1, k: int | None = None):
    """Keep the `k` highest logits (default: a `frac_num_tokens` fraction of the vocabulary)."""
    num_tokens = logits.shape[-1]
    k = default(k, ceil(frac_num_tokens * num_tokens))
    k = max(min(k, num_tokens), 1)

    values, indices = logits.topk(k, dim=-1)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(-1, indices, values)


def top_a(logits: Tensor, min_p_pow=2.0, min_p_ratio=0.02):
    """Top-a: drop tokens whose probability is below `min_p_ratio * max_prob ** min_p_pow`."""
    probs = logits.softmax(dim=-1)
    limit = probs.amax(dim=-1, keepdim=True).pow(min_p_pow) * min_p_ratio
    return logits.masked_fill(probs < limit, float("-inf"))


def min_p(logits: Tensor, min_p=0.1):
    """Min-p sampling (arXiv:2407.01082): drop tokens whose probability is below `min_p * max_prob`."""
    probs = logits.softmax(dim=-1)
    limit = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < limit, float("-inf"))


FILTER_LOGITS_FN = dict(top_p=top_p, top_k=top_k, top_a=top_a, min_p=min_p)


def contrastive_decode_fn(expert_logits: Tensor, amateur_logits: Tensor, alpha=0.1, beta=0.5):
    """Contrastive decoding (arXiv:2210.15097), in the logit form of arXiv:2309.09117 appendix A, algorithm 2."""
    # only tokens within a factor alpha of the expert's best token stay eligible
    cutoff = log(alpha) + expert_logits.amax(dim=-1, keepdim=True)
    diffs = (1 + beta) * expert_logits - beta * amateur_logits
    return diffs.masked_fill(expert_logits < cutoff, -torch.finfo(expert_logits.dtype).max)


def _resolve_filter(filter_logits_fn):
    if isinstance(filter_logits_fn, str):
        if filter_logits_fn not in FILTER_LOGITS_FN:
            raise ValueError(
                f"unknown filter_logits_fn {filter_logits_fn!r}, only {join(FILTER_LOGITS_FN.keys())} are available"
            )
        return FILTER_LOGITS_FN[filter_logits_fn]
    if not callable(filter_logits_fn):
        raise TypeError("filter_logits_fn must be a callable or one of " + join(FILTER_LOGITS_FN.keys()))
    return filter_logits_fn


def check_generate_args(seq_len, temperature=1.0):
    """Clear errors for a bad number of new tokens or temperature (0 new tokens is fine: an empty result)."""
    integer_tensor = torch.is_tensor(seq_len) and seq_len.ndim == 0 and not seq_len.is_floating_point()
    if isinstance(seq_len, bool) or not (isinstance(seq_len, int) or integer_tensor):
        raise TypeError(f"seq_len (the number of tokens to generate) must be an int, got {seq_len!r}")
    if int(seq_len) < 0:
        raise ValueError(f"seq_len (the number of tokens to generate) must be >= 0, got {int(seq_len)}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    return int(seq_len)


def check_prompt_length(prompt_len: int):
    if prompt_len == 0:
        raise ValueError("prompts must hold at least one token (start from a BOS token to generate from nothing)")


def mask_after_eos(out: Tensor, eos_token: int, pad_value):
    """Replace every token after the first `eos_token` of each row with `pad_value`."""
    is_eos = out == eos_token
    after_eos = F.pad(is_eos, (1, -1), value=False).cumsum(dim=-1) > 0
    return out.masked_fill(after_eos, pad_value)


# autoregressive wrapper


class AutoregressiveWrapper(Module):
    def __init__(
        self,
        net,
        ignore_index=-100,
        pad_value=0,
        mask_prob=0.0,  # forgetful causal mask, arXiv:2210.13432
        add_attn_z_loss=False,  # attention logit z-loss, arXiv:2202.08906
    ):
        super().__init__()
        self.pad_value = pad_value
        self.ignore_index = ignore_index

        self.net = net
        self.max_seq_len = net.max_seq_len

        # forgetful causal mask - randomly hide a fraction of past tokens from attention while training
        assert 0.0 <= mask_prob < 1.0, "mask_prob must be in [0, 1)"
        self.mask_prob = mask_prob

        self.add_attn_z_loss = add_attn_z_loss

    # prompt preparation shared by generate and beam_search

    def _prepare_prompts(self, prompts, prompt_lens):
        if isinstance(prompts, (list, tuple)):
            if len(prompts) == 0:
                raise ValueError("prompts cannot be an empty list")
            if exists(prompt_lens):
                raise ValueError("prompt_lens is derived from the list of prompts, do not pass both")
            if any(p.ndim != 1 for p in prompts):
                raise ValueError("a list of prompts must hold 1-D token id tensors")

            prompt_lens = tensor([p.shape[0] for p in prompts], device=prompts[0].device)
            if int(prompt_lens.amin()) == 0:
                check_prompt_length(0)
            prompts = pad_sequence(list(prompts), batch_first=True, padding_value=self.pad_value)

        if not torch.is_tensor(prompts):
            raise TypeError("prompts must be a tensor of token ids or a list of 1-D tensors")
        if prompts.is_floating_point() or prompts.is_complex():
            raise TypeError(f"prompts must be integer token ids, got {prompts.dtype}")

        if prompts.ndim == 0:
            raise ValueError("prompts must be token ids of shape (seq,) or (batch, seq), got a scalar")
        check_prompt_length(prompts.shape[-1])
        prompts, packed_shape = pack([prompts], "* n")
        seq_len = prompts.shape[-1]

        # variable length prompts are left padded, and the network told where each one starts
        seq_start_pos = None
        if exists(prompt_lens):
            if prompt_lens.numel() > 0 and not (1 <= int(prompt_lens.amin()) and int(prompt_lens.amax()) <= seq_len):
                raise ValueError(f"prompt_lens must lie in [1, {seq_len}] (the prompt tensor's length), got {prompt_lens.tolist()}")
            prompts = align_right(prompts, prompt_lens, pad_id=self.pad_value)
            seq_start_pos = seq_len - prompt_lens

        return prompts, packed_shape, seq_start_pos

    def _should_cache(self, cache_kv, net_kwargs):
        # a padding mask (`mask`, `prepend_mask`) cannot be combined with the cache by the network; decode uncached
        has_mask = any(exists(net_kwargs.get(key)) for key in ("mask", "prepend_mask"))
        return cache_kv and self.net.can_cache_kv and not has_mask

    def _check_cache_window(self, total_len, should_cache, restrict_to_max_seq_len):
        # fail before decoding rather than midway
        if should_cache and restrict_to_max_seq_len and total_len > self.max_seq_len:
            if not self.net.can_cache_kv_outside_max_seq_len:
                raise ValueError(
                    f"decoding reads {total_len} tokens, past max_seq_len ({self.max_seq_len}), where the network "
                    "cannot use cached key / values, most likely because it has an absolute positional embedding; "
                    "use rotary or ALiBi positions, or generate with cache_kv=False"
                )

    def _window(self, out, cache, seq_start_pos, restrict_to_max_seq_len):
        """The slice of `out` fed to the network this step, with the cache trimmed to it and the prompts' start
        positions (`seq_start_pos`, relative to the start of `out`) moved to be relative to the window."""
        max_seq_len = self.max_seq_len

        if not restrict_to_max_seq_len or out.shape[-1] <= max_seq_len:
            return out, cache, seq_start_pos

        # sliding window - keep the last max_seq_len tokens, and the keys / values of all but the newest of them
        num_dropped = out.shape[-1] - max_seq_len

        if exists(cache):
            cache = trim_cached_kv(cache, max_seq_len - 1)

        if exists(seq_start_pos):
            seq_start_pos = (seq_start_pos - num_dropped).clamp(min=0)

        return out[:, -max_seq_len:], cache, seq_start_pos

    def _fast_decode_mode(
        self, fast_decode, cache_kv, should_cache, amateur_model, net_kwargs, prompts, seq_len, restrict_to_max_seq_len
    ):
        """The fast decoding mode to use ('eager', 'graph', 'compile') or None for the plain path.

        fast_decode: None - on CUDA when supported; True - always ('graph' on CUDA, 'eager' on CPU), raising if
        not supported; a mode name - that mode, raising if not supported; False - never.
        """
        from x_transformers.fast_decode import MODES, supports

        if fast_decode is False:
            return None
        if not (fast_decode is None or fast_decode is True or fast_decode in MODES):
            raise ValueError(f"fast_decode must be None, True, False or one of {MODES}, got {fast_decode!r}")

        is_cuda = on_cuda(prompts)
        ok, reason = supports(self.net)
        has_attention = ok and "a" in self.net.attn_layers.layer_types
        # the plain path slides a window once past max_seq_len, re-rotating cached keys; the static cache does not.
        # An absolute positional embedding has no positions past max_seq_len at all
        has_abs_pos = getattr(self.net, "checks_max_seq_len", False)
        last_len = prompts.shape[-1] + seq_len - 1 if (has_attention or has_abs_pos) else prompts.shape[-1]
        past_max_len = last_len > self.max_seq_len and (restrict_to_max_seq_len or has_abs_pos)

        # cross attention's context is the one network kwarg the static decoder takes
        context_kwargs = ("context", "context_mask") if getattr(getattr(self.net, "attn_layers", None), "cross_attend", False) else ()
        other_kwargs = sorted(set(net_kwargs) - set(context_kwargs))

        blockers = dict(
            cache_kv=not cache_kv,
            amateur_model=exists(amateur_model),
            network_kwargs=len(other_kwargs) > 0,
            can_cache_kv=not should_cache,
            restrict_to_max_seq_len=past_max_len,
        )
        blocker = next((name for name, on in blockers.items() if on), None)
        if ok and exists(blocker):
            ok = False
            reason = f"fast decoding does not support `{blocker}`" + (
                f" ({', '.join(other_kwargs)})" if blocker == "network_kwargs" else ""
            )
            if blocker == "restrict_to_max_seq_len":
                reason = (
                    "fast decoding cannot slide past max_seq_len; raise max_seq_len "
                    "(or, with rotary positions, pass restrict_to_max_seq_len=False)"
                )

        if fast_decode is None:
            # auto - CUDA graphs need CUDA; on CPU the plain path stays as it was
            if not is_cuda:
                return None
            failed = self.__dict__.get("_fast_decode_failed", False)
            if failed or not ok:
                reason = "it failed earlier on this wrapper" if failed else reason
                logger.debug(f"fast decoding off, decoding on the plain cached path: {reason}")
                return None
            return "graph"
        if not ok:
            raise ValueError(reason)
        if fast_decode is True:
            return "graph" if is_cuda else "eager"
        return fast_decode

    @torch.no_grad()
    @eval_decorator
    def generate(
        self,
        prompts: list[Tensor] | Tensor,
        seq_len,
        eos_token=None,
        temperature=1.0,
        prompt_lens: Tensor | None = None,
        filter_logits_fn: str | Callable = top_k,
        restrict_to_max_seq_len=True,
        amateur_model: Module | tuple[Module] | None = None,
        filter_kwargs: dict = dict(),
        contrastive_decode_kwargs: dict | tuple[dict] = dict(beta=0.5, alpha=0.1),
        cache_kv=True,
        fast_decode: bool | str | None = None,  # None: on CUDA when supported; True: forced; False: plain path
        **kwargs,
    ):
        """`seq_len` new tokens (b, seq_len) after `prompts`, sampled at `temperature` (0: greedy).

        fast_decode - a static kv cache written in place and a CUDA-graph decode step (x_transformers/fast_decode.py):
        None (default) uses it on CUDA whenever the configuration is supported (`fast_decode.supports`)
        and decodes on the plain cached path otherwise, saying why in a debug log; True forces it (on CPU as an
        eager static-cache step) and raises a ValueError naming what is unsupported; 'eager', 'graph' or 'compile'
        pick the step; False keeps the plain path. Greedy tokens equal the plain path's (exactly in fp32); sampling
        draws from the same distribution through another random stream.
        """
        seq_len = check_generate_args(seq_len, temperature)
        greedy = temperature == 0.0
        filter_logits_fn = _resolve_filter(filter_logits_fn)

        prompts, packed_shape, prompt_start_pos = self._prepare_prompts(prompts, prompt_lens)
        prompt_len = prompts.shape[-1]

        should_cache = self._should_cache(cache_kv, kwargs)
        self._check_cache_window(prompt_len + seq_len - 1, should_cache, restrict_to_max_seq_len)

        # fast decoding - static kv cache and a CUDA-graph step (x_transformers/fast_decode.py), same tokens
        fast_mode = self._fast_decode_mode(
            fast_decode, cache_kv, should_cache, amateur_model, kwargs, prompts, seq_len, restrict_to_max_seq_len
        )
        if exists(fast_mode):
            from x_transformers.fast_decode import fast_decoder_for

            try:
                decoder = fast_decoder_for(self, prompts.shape[0], prompt_len + seq_len, fast_mode)
                out = decoder.generate(
                    prompts,
                    seq_len,
                    seq_start_pos=prompt_start_pos,
                    temperature=temperature,
                    filter_fn=filter_logits_fn,
                    filter_kwargs=filter_kwargs,
                    eos_token=eos_token,
                    **{key: value for key, value in kwargs.items() if key in ("context", "context_mask")},
                )
            except Exception as error:
                # asked for explicitly: the error is the answer; chosen automatically: decode on the plain path,
                # and do not try again on this wrapper
                if exists(fast_decode):
                    raise
                logger.warning(f"fast decoding failed, decoding on the plain path from now on: {error!r}")
                self.__dict__.pop("_fast_decoder", None)
                self.__dict__["_fast_decode_failed"] = True
            else:
                if exists(eos_token):
                    out = mask_after_eos(torch.cat((prompts, out), dim=-1), eos_token, self.pad_value)[:, prompt_len:]
                (out,) = unpack(out, packed_shape, "* n")
                return out

        # contrastive decoding - one or more amateur models whose preferences are subtracted; filtering is off
        amateurs = []
        if exists(amateur_model):
            amateur_model = cast_tuple(amateur_model)
            contrastive_decode_kwargs = cast_tuple(contrastive_decode_kwargs, len(amateur_model))
            assert len(amateur_model) == len(contrastive_decode_kwargs), "one contrastive_decode_kwargs per amateur"

            filter_logits_fn = identity

            for amateur, amateur_kwargs in zip(amateur_model, contrastive_decode_kwargs):
                amateur = amateur.net if isinstance(amateur, AutoregressiveWrapper) else amateur
                amateur.eval()
                amateurs.append(dict(net=amateur, cache=None, kwargs=amateur_kwargs))

        out = prompts
        cache = None
        is_done = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)

        for _ in range(seq_len):
            x, cache, seq_start_pos = self._window(out, cache, prompt_start_pos, restrict_to_max_seq_len)

            logits, new_cache = self.net(
                x, return_intermediates=True, cache=cache, seq_start_pos=seq_start_pos, **kwargs
            )

            if should_cache:
                cache = new_cache

            logits = logits[:, -1]

            for amateur in amateurs:
                amateur_cache = amateur["cache"]
                if exists(amateur_cache) and x.shape[-1] == self.max_seq_len and restrict_to_max_seq_len:
                    amateur_cache = trim_cached_kv(amateur_cache, self.max_seq_len - 1)

                amateur_logits, next_amateur_cache = amateur["net"](
                    x, return_intermediates=True, cache=amateur_cache, seq_start_pos=seq_start_pos, **kwargs
                )
                amateur_logits = amateur_logits[:, -1]

                assert amateur_logits.shape == logits.shape, "amateur and expert logits differ in shape"
                logits = contrastive_decode_fn(logits, amateur_logits, **amateur["kwargs"])

                if cache_kv and amateur["net"].can_cache_kv:
                    amateur["cache"] = next_amateur_cache

            if greedy:
                sample = logits.argmax(dim=-1, keepdim=True)
            else:
                filtered_logits = filter_logits_fn(logits, **filter_kwargs)
                probs = (filtered_logits / temperature).softmax(dim=-1)
                sample = torch.multinomial(probs, 1)

            out = torch.cat((out, sample), dim=-1)

            if not exists(eos_token):
                continue

            is_done = is_done | (sample[:, 0] == eos_token)
            if is_done.all():
                break

        # rows that finished early are padded after their eos token
        if exists(eos_token):
            out = mask_after_eos(out, eos_token, self.pad_value)

        out = out[:, prompt_len:]
        (out,) = unpack(out, packed_shape, "* n")
        return out

    @torch.no_grad()
    @eval_decorator
    def beam_search(
        self,
        prompts: list[Tensor] | Tensor,
        seq_len,
        beams=4,
        return_beams_and_scores=False,
        eos_token=None,
        temperature=1.0,
        stochastic=False,  # gumbel top-k sampling of the beams, arXiv:1903.06059
        prompt_lens: Tensor | None = None,
        filter_logits_fn: str | Callable = identity,
        restrict_to_max_seq_len=True,
        filter_kwargs: dict = dict(),
        cache_kv=True,
        **kwargs,
    ):
        """Keep the `beams` sequences of highest total log-probability; returns the best, or all with their scores."""
        assert beams >= 1, "beams must be at least 1"
        seq_len = check_generate_args(seq_len, temperature)
        filter_logits_fn = _resolve_filter(filter_logits_fn)

        prompts, packed_shape, prompt_start_pos = self._prepare_prompts(prompts, prompt_lens)
        batch, prompt_len = prompts.shape
        device = prompts.device

        should_cache = self._should_cache(cache_kv, kwargs)
        self._check_cache_window(prompt_len + seq_len - 1, should_cache, restrict_to_max_seq_len)

        out = prompts
        cache = None
        scores = torch.zeros((batch, 1), device=device)  # (b, current beams)
        is_done = torch.zeros((batch, 1), dtype=torch.bool, device=device)

        for _ in range(seq_len):
            x, cache, seq_start_pos = self._window(out, cache, prompt_start_pos, restrict_to_max_seq_len)

            logits, new_cache = self.net(
                x, return_intermediates=True, cache=cache, seq_start_pos=seq_start_pos, **kwargs
            )

            if should_cache:
                cache = new_cache

            logits = logits[:, -1]  # (b * curr_beams, num_tokens)
            log_probs = logits.log_softmax(dim=-1)

            # a finished beam (eos emitted) can only extend with padding, at no cost, so its score is frozen
            if exists(eos_token):
                done = rearrange(is_done, "b k -> (b k) 1")
                frozen = torch.full_like(log_probs, float("-inf"))
                frozen[:, self.pad_value] = 0.0
                log_probs = torch.where(done, frozen, log_probs)

            # candidate scores for every (beam, token) extension
            candidate_scores = rearrange(scores, "b k -> (b k) 1") + log_probs

            # stochastic beam search ranks candidates by perturbed (gumbel) scores, plain beam search by the scores
            ranking = candidate_scores
            if stochastic and temperature > 0.0:
                ranking = filter_logits_fn(logits, **filter_kwargs) / temperature
                ranking = ranking.log_softmax(dim=-1) + gumbel_noise(ranking)
                ranking = rearrange(scores, "b k -> (b k) 1") + ranking
                if exists(eos_token):
                    ranking = torch.where(done, frozen + rearrange(scores, "b k -> (b k) 1"), ranking)

            num_tokens = logits.shape[-1]
            ranking = rearrange(ranking, "(b k) v -> b (k v)", b=batch)
            candidate_scores = rearrange(candidate_scores, "(b k) v -> b (k v)", b=batch)

            num_keep = min(beams, ranking.shape[-1])
            top_indices = ranking.topk(num_keep, dim=-1).indices  # (b, beams)

            scores = candidate_scores.gather(-1, top_indices)
            parent_beam = top_indices // num_tokens
            next_token = top_indices % num_tokens

            # reorder the sequences and every decode state by the parent beam each survivor came from
            curr_beams = is_done.shape[-1]
            batch_offset = torch.arange(batch, device=device)[:, None] * curr_beams
            flat_parent = rearrange(parent_beam + batch_offset, "b k -> (b k)")

            out = torch.cat((out[flat_parent], rearrange(next_token, "b k -> (b k) 1")), dim=-1)

            if exists(cache):
                cache = map_cache_batch(cache, lambda t: t[flat_parent])

            # beams of one prompt share its left padding
            if exists(prompt_start_pos) and prompt_start_pos.shape[0] != out.shape[0]:
                prompt_start_pos = repeat(prompt_start_pos, "b -> (b k)", k=num_keep)

            is_done = is_done.gather(-1, parent_beam)
            if exists(eos_token):
                is_done = is_done | (next_token == eos_token)
                if is_done.all():
                    break

            # beam-expanded kwargs (e.g. cross attention context) follow the first expansion
            if curr_beams == 1 and num_keep > 1:
                kwargs = {key: _repeat_batch(value, batch, num_keep) for key, value in kwargs.items()}

        if exists(eos_token):
            out = mask_after_eos(out, eos_token, self.pad_value)

        out = rearrange(out[:, prompt_len:], "(b k) n -> b k n", b=batch)
        (out,) = unpack(out, packed_shape, "* k n")

        if not return_beams_and_scores:
            return out[..., 0, :]

        scores = rearrange(scores, "b k -> k b")
        out = rearrange(out, "... k n -> k ... n")
        return out, scores

    def forward(self, x, return_outputs=False, lens: Tensor | None = None, **kwargs):
        seq, ignore_index, add_attn_z_loss = x.shape[1], self.ignore_index, self.add_attn_z_loss

        inp, target = x[:, :-1], x[:, 1:]
        inp = torch.where(inp == ignore_index, self.pad_value, inp)

        # padding - tokens at or past each sequence length (or outside `mask`) are not predicted
        if exists(lens):
            positions = torch.arange(seq - 1, device=x.device)
            target = target.masked_fill(positions >= (lens[:, None] - 1), ignore_index)

        # a mask over the whole sequence: the inputs take all but its last column, the targets all but its first
        mask = kwargs.get("mask", None)
        if exists(mask):
            target_mask = mask
            if mask.shape[-1] == seq:
                target_mask = mask[:, 1:]
                kwargs["mask"] = mask[:, :-1]
            target = target.masked_fill(~target_mask, ignore_index)

        # forgetful causal mask - arXiv:2210.13432, hide a random subset of past tokens (never the first) as keys
        if self.mask_prob > 0.0:
            rand = torch.randn(inp.shape, device=x.device)
            rand[:, 0] = -torch.finfo(rand.dtype).max
            num_mask = min(int(seq * self.mask_prob), seq - 1)
            indices = rand.topk(num_mask, dim=-1).indices
            kv_mask = ~torch.zeros_like(inp, dtype=torch.bool).scatter(1, indices, True)
            kwargs.update(self_attn_kv_mask=kv_mask)

        logits, intermediates = self.net(inp, return_intermediates=True, return_attn_z_loss=add_attn_z_loss, **kwargs)

        # logits of prepended embeddings (`prepend_embeds`) predict nothing
        logits = logits[:, -target.shape[1] :]

        loss_fn = F.nll_loss if getattr(self.net, "output_is_log_prob", False) else F.cross_entropy
        loss = loss_fn(rearrange(logits, "b n c -> b c n"), target, ignore_index=ignore_index)

        # auxiliary losses - attention z-loss (arXiv:2202.08906) and mixture-of-experts balance / router losses
        if add_attn_z_loss:
            loss = loss + intermediates.attn_z_loss

        aux_loss = getattr(intermediates, "aux_loss", None)
        if exists(aux_loss):
            loss = loss + aux_loss

        if not return_outputs:
            return loss

        return loss, (logits, intermediates)


def _repeat_batch(value, batch, beams):
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return repeat(value, "b ... -> (b k) ...", k=beams)
    return value
