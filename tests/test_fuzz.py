"""Property-based fuzzing of whole models: random valid flag combinations, random padding and lengths.

Each case draws one configuration from a seeded generator (attention variants, positions, norms, residuals, token
shifts, linear-attention mixers and hybrids, mixture-of-experts feedforwards, memory tokens, cross attention) and
checks, on a tiny model:

- the forward and backward pass are finite (outputs at unmasked positions, every parameter gradient), also with rows
  that are fully masked;
- unmasked outputs do not depend on what masked positions hold: inf, NaN or garbage added to their embeddings;
- some models also run in fp64 (which must compute in fp64, close to fp32) or in half precision (finite);
- wherever the network claims `can_cache_kv`, decoding token by token from the cache (with left padding through
  `seq_start_pos`) gives the logits of the parallel forward.

CI runs XT_FUZZ_EXAMPLES=300 cases (the default); a larger budget, e.g. `XT_FUZZ_EXAMPLES=5000`, runs more, and
XT_FUZZ_SEED moves the whole sequence of cases. A failing case names its seed and configuration, and
`XT_FUZZ_EXAMPLES=1 XT_FUZZ_SEED=<seed>` replays it alone.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.mixers import MIXERS

NUM_EXAMPLES = int(os.environ.get("XT_FUZZ_EXAMPLES", "300"))
FIRST_SEED = int(os.environ.get("XT_FUZZ_SEED", "0"))

NUM_TOKENS, MAX_SEQ_LEN, DIM = 17, 48, 16
BIDIRECTIONAL_MIXERS = ("based", "linear")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: one intra-op thread is several times faster than two that spin against each other (and against
    # whatever else shares the cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# configurations


def maybe(rng, p):
    return rng.random() < p


def sample_config(rng: random.Random) -> dict:
    """One valid (wrapper kwargs, layer kwargs, layers class) combination."""
    causal = maybe(rng, 0.75)
    depth = rng.choice((1, 2))
    heads = rng.choice((2, 2, 4))
    layers = dict(dim=DIM, depth=depth, heads=heads, attn_dim_head=rng.choice((4, 8)) if heads == 4 else 8)
    wrapper = dict(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN)

    # token mixers: softmax attention, a linear mixer everywhere, or a hybrid of both
    mode = rng.choices(("softmax", "mixer", "hybrid"), (0.45, 0.3, 0.25))[0]
    if mode != "softmax":
        layers["linear_attn"] = rng.choice(sorted(MIXERS) if causal else BIDIRECTIONAL_MIXERS)
    if mode == "hybrid":
        depth = layers["depth"] = 2
        if maybe(rng, 0.5):
            layers["hybrid_pattern"] = rng.choice(("LN", "NL"))
        else:
            layers["softmax_attn_layers"] = (rng.randrange(depth),)
    has_softmax = mode != "mixer"

    # positions
    if has_softmax:
        position = rng.choice(("abs", "abs", "rotary", "xpos", "alibi", "t5", "dynamic", "dda", "none"))
        if position == "rotary":
            layers.update(rotary_pos_emb=True)
        elif position == "xpos" and causal:
            layers.update(rotary_xpos=True)
        elif position == "alibi":
            layers.update(alibi_pos_bias=True)
        elif position == "t5":
            layers.update(rel_pos_bias=True)
        elif position == "dynamic":
            layers.update(dynamic_pos_bias=True, dynamic_pos_bias_log_distance=maybe(rng, 0.5))
        elif position == "dda":
            layers.update(attn_data_dependent_alibi=True, attn_data_dependent_alibi_per_row=causal and maybe(rng, 0.3))
        elif position == "none":
            wrapper.update(use_abs_pos_emb=False)
    else:
        wrapper.update(use_abs_pos_emb=maybe(rng, 0.5))
    if wrapper.get("use_abs_pos_emb", True) and maybe(rng, 0.2):
        wrapper.update(scaled_sinu_pos_emb=True)

    # softmax attention variants
    if has_softmax:
        attn = {}
        logits_fn = rng.choice((None, None, None, "sigmoid", "hard", "l2_distance", "sparse_topk"))
        if logits_fn == "l2_distance" and layers.get("rotary_xpos"):
            logits_fn = None
        if logits_fn == "sparse_topk":
            attn["sparse_topk"] = rng.choice((1, 3))
        elif logits_fn:
            attn[logits_fn] = True
        for flag, p in (("qk_norm", 0.15), ("gate_values", 0.1), ("gate_value_heads", 0.1), ("on_attn", 0.1),
                        ("head_scale", 0.1), ("laser", 0.1), ("add_zero_kv", 0.1), ("softclamp_logits", 0.1),
                        ("pre_talking_heads", 0.1), ("post_talking_heads", 0.1)):
            if maybe(rng, p):
                attn[flag] = True
        if maybe(rng, 0.15):
            attn["kv_heads"] = rng.choice((1, heads // 2))
        if maybe(rng, 0.15) and not layers.get("rotary_xpos"):
            attn["num_mem_kv"] = 2
        if maybe(rng, 0.1):
            attn["max_attend_past"] = 3
        if causal and maybe(rng, 0.1):
            attn["selective"] = True
        if causal and maybe(rng, 0.1) and not layers.get("rotary_xpos"):
            attn.update(use_cope=True, cope_max_pos=4)
        if maybe(rng, 0.1) and "kv_heads" not in attn:
            attn.update(use_latent_kv=True, dim_latent_kv=8)
        logit_features = {"sigmoid", "hard", "sparse_topk", "pre_talking_heads", "post_talking_heads", "selective",
                          "softclamp_logits", "use_cope"}
        if maybe(rng, 0.25) and not (logit_features & set(attn)) and not (
            layers.get("rel_pos_bias") or layers.get("dynamic_pos_bias")
        ):
            attn["flash"] = True
        layers.update({f"attn_{key}": value for key, value in attn.items()})
        if maybe(rng, 0.1) and not attn.get("flash"):
            layers.update(residual_attn=True)
        if maybe(rng, 0.15):
            layers.update(add_value_residual=True)
            if maybe(rng, 0.3):
                layers.update(attn_neutreno_value_residual=True)

    # norms and residuals
    layers.update(rng.choice((dict(), dict(), dict(use_rmsnorm=True), dict(use_scalenorm=True),
                              dict(use_simple_rmsnorm=True))))
    structure = rng.choice(("pre", "pre", "pre", "post", "sandwich", "resi_dual"))
    if structure == "post":
        layers.update(pre_norm=False)
    elif structure == "sandwich":
        layers.update(sandwich_norm=True)
    elif structure == "resi_dual":
        layers.update(resi_dual=True)
    residual = rng.choice(("plain", "plain", "gate", "streams", "scale", "layerscale"))
    if residual == "gate":
        layers.update(gate_residual=True)
    elif residual == "streams" and structure != "resi_dual":
        layers.update(num_residual_streams=2)
    elif residual == "scale":
        layers.update(scale_residual=True)
    elif residual == "layerscale":
        layers.update(use_layerscale=True, layerscale_init_value=0.1)
    if layers.get("num_residual_streams") and has_softmax and maybe(rng, 0.3) and "attn_use_latent_kv" not in layers:
        layers.update(qkv_receive_diff_residuals=True)

    # feedforwards
    ff = rng.choice((dict(), dict(ff_glu=True), dict(ff_swish=True, ff_glu=True), dict(ff_relu_squared=True),
                     dict(ff_post_act_ln=True)))
    layers.update(ff, ff_mult=2)
    if maybe(rng, 0.2):
        layers.update(ff_num_experts=rng.choice((2, 3)), ff_top_k=rng.choice((1, 2)))
        if maybe(rng, 0.4):
            layers.update(ff_capacity_factor=rng.choice((0.5, 1.0, 2.0)))
        if maybe(rng, 0.3):
            layers.update(ff_num_shared_experts=1)
        layers.pop("ff_post_act_ln", None)

    # other layer structure
    if maybe(rng, 0.15):
        layers.update(macaron=True)
    if maybe(rng, 0.1):
        layers.update(reinject_input=True)
    if maybe(rng, 0.1):
        layers.update(softclamp_output=True)
    if maybe(rng, 0.1) and has_softmax:
        layers.update(cross_attend=True)
        # features defined over one sequence stay on the self-attention layers
        for name in ("data_dependent_alibi", "selective", "use_cope", "max_attend_past", "neutreno_value_residual"):
            if layers.get(f"attn_{name}"):
                layers[f"cross_attn_{name}"] = None if name == "max_attend_past" else False
    # token shifts, one amount for every layer or one per layer (a block is 'a', 'f', with 'c' and macaron's 'f')
    if maybe(rng, 0.2):
        num_layers = depth * (2 + int(bool(layers.get("macaron"))) + int(bool(layers.get("cross_attend"))))
        layers.update(shift_tokens=rng.choice((1, 2)) if maybe(rng, 0.5) else
                      tuple(rng.choice((0, 1, 2)) for _ in range(num_layers)))
    # u-net skips pair the blocks of the first half with those of the second: two blocks of two layers
    if maybe(rng, 0.1) and depth == 2 and not (layers.get("macaron") or layers.get("cross_attend")):
        layers.update(unet_skips=True)

    # the same block weights run twice
    # (one block's layers, so no per-layer shift tuple sized for `depth` blocks, nor a hybrid indexing them)
    if maybe(rng, 0.05) and mode != "hybrid" and not layers.get("unet_skips"):
        layers.update(weight_tie_layers=True)
        if isinstance(layers.get("shift_tokens"), tuple):
            del layers["shift_tokens"]

    # wrapper
    if maybe(rng, 0.15):
        wrapper.update(num_memory_tokens=2)
        if causal and maybe(rng, 0.3):
            wrapper.update(memory_tokens_interspersed_every=rng.choice((3, 5)))
    if maybe(rng, 0.1):
        wrapper.update(post_emb_norm=True)
    if maybe(rng, 0.1):
        wrapper.update(tie_embedding=True)
    elif maybe(rng, 0.1):
        wrapper.update(emb_dim=12)

    return dict(causal=causal, wrapper=wrapper, layers=layers)


def build(config):
    layers_cls = Decoder if config["causal"] else Encoder
    return TransformerWrapper(**config["wrapper"], attn_layers=layers_cls(**config["layers"]))


def sample_mask(rng, gen, b, n, causal):
    """A padding mask: none, left / right padding, holes, or some rows fully masked."""
    kind = rng.choice(("none", "left", "right", "holes", "full_row"))
    if kind == "none":
        return None
    mask = torch.ones(b, n, dtype=torch.bool)
    for row in range(b):
        pad = rng.randrange(n)
        if kind == "left":
            mask[row, :pad] = False
        elif kind == "right":
            mask[row, n - pad :] = False
        elif kind == "holes":
            mask[row] = torch.rand(n, generator=gen) > 0.3
    if kind == "full_row":
        mask[rng.randrange(b)] = False
    return mask


# checks


def check_forward_backward(model, x, mask, context_kwargs, info):
    model.train()
    logits = model(x, mask=mask, **context_kwargs)
    assert logits.shape == (*x.shape, NUM_TOKENS), info
    keep = mask if mask is not None else torch.ones(x.shape, dtype=torch.bool)
    assert torch.isfinite(logits[keep]).all(), f"non-finite outputs at unmasked positions: {info}"
    loss = logits[keep].square().mean() if keep.any() else logits.sum() * 0.0
    loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), f"non-finite gradient of {name}: {info}"


def check_masked_invariance(model, x, mask, context_kwargs, gen, info):
    """Unmasked outputs stay the same when masked positions hold garbage, inf or NaN (added to their embeddings)."""
    if mask is None or mask.all() or not mask.any():
        return
    model.eval()
    emb_dim = model.emb_dim

    def embeds(fill):
        out = torch.zeros(*x.shape, emb_dim)
        if fill == "garbage":
            garbage = torch.randn(*x.shape, emb_dim, generator=gen) * 100
            return torch.where(mask[..., None], out, garbage)
        return out.masked_fill(~mask[..., None], fill)

    with torch.no_grad():
        ref = model(x, mask=mask, sum_embeds=embeds(0.0), **context_kwargs)
        for fill in ("garbage", float("inf"), float("nan")):
            out = model(x, mask=mask, sum_embeds=embeds(fill), **context_kwargs)
            assert torch.isfinite(out[mask]).all(), f"{fill} at masked positions reached unmasked outputs: {info}"
            torch.testing.assert_close(out[mask], ref[mask], rtol=1e-4, atol=1e-4, msg=lambda m: f"{fill}: {m}\n{info}")


def check_dtypes(model, x, mask, context_kwargs, rng, info, compare=True):
    """fp64 computes in fp64 (close to fp32) and half precision stays finite. `compare=False` for networks that
    choose among near-equal logits, whose choices fp32 rounding may flip."""
    model.eval()
    keep = mask if mask is not None else torch.ones(x.shape, dtype=torch.bool)
    with torch.no_grad():
        ref = model(x, mask=mask, **context_kwargs)
        dtype = rng.choice((torch.float64, torch.float64, torch.bfloat16, torch.float16))
        cast = {key: value.to(dtype) if value.is_floating_point() else value for key, value in context_kwargs.items()}
        out = model.to(dtype)(x, mask=mask, **cast)
        model.float()
    assert out.dtype == dtype, f"{dtype} model returned {out.dtype}: {info}"
    assert torch.isfinite(out[keep]).all(), f"non-finite {dtype} outputs: {info}"
    if dtype == torch.float64 and compare:
        torch.testing.assert_close(out[keep].float(), ref[keep], rtol=1e-3, atol=1e-3, msg=lambda m: f"fp64: {m}\n{info}")


def discontinuous(config) -> bool:
    """Whether the network picks among near-equal logits (top-k attention, arg-max attention, top-k routing): there a
    rounding difference between two ways of computing the same logits can flip a choice."""
    layers = config["layers"]
    routed = layers.get("ff_num_experts") and layers.get("ff_top_k", 2) < layers["ff_num_experts"]
    return bool(layers.get("attn_sparse_topk") or layers.get("attn_hard") or routed)


def check_cached_decoding(model, x, rng, context_kwargs, info, dtype=torch.float32):
    """Token-by-token decoding from the cache gives the parallel forward's logits, with left padding too. Networks
    that choose among near-equal logits compare in fp64, where rounding cannot flip their choices."""
    if not model.can_cache_kv or not model.attn_layers.causal:
        return
    model.eval().to(dtype)
    context_kwargs = {key: value.to(dtype) if value.is_floating_point() else value for key, value in context_kwargs.items()}
    b, n = x.shape
    seq_start_pos = None
    if maybe(rng, 0.5) and n > 1:
        seq_start_pos = torch.tensor([rng.randrange(n) for _ in range(b)])
    with torch.no_grad():
        full = model(x, seq_start_pos=seq_start_pos, **context_kwargs)
        prefill = rng.randrange(1, n + 1)
        logits, cache = model(x[:, :prefill], seq_start_pos=seq_start_pos, return_intermediates=True, **context_kwargs)
        steps = [logits]
        for t in range(prefill, n):
            logits, cache = model(
                x[:, : t + 1], seq_start_pos=seq_start_pos, cache=cache, return_intermediates=True, **context_kwargs
            )
            steps.append(logits[:, -1:])
        stepped = torch.cat(steps, dim=1)
    keep = torch.ones(b, n, dtype=torch.bool)
    if seq_start_pos is not None:
        keep = torch.arange(n) >= seq_start_pos[:, None]
    torch.testing.assert_close(
        stepped[keep], full[keep], rtol=1e-4, atol=1e-4, msg=lambda m: f"cached decoding differs: {m}\n{info}"
    )


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + NUM_EXAMPLES))
def test_random_model(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    config = sample_config(rng)
    info = f"seed {seed}: {config}"

    torch.manual_seed(seed)
    model = build(config)
    # away from the initialization, where zero-init gates hide a missing piece
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)

    # mostly short; sometimes past the 16-token decode threshold of the mixers and across their chunk boundaries
    b, n = rng.randrange(1, 4), (rng.randrange(1, 13) if maybe(rng, 0.8) else rng.randrange(17, 41))
    x = torch.randint(0, NUM_TOKENS, (b, n), generator=gen)
    context_kwargs = {}
    if config["layers"].get("cross_attend"):
        context_mask = torch.rand(b, 5, generator=gen) > 0.3
        context_mask[:, 0] = True
        context = torch.randn(b, 5, DIM, generator=gen)
        context_kwargs = dict(context=context, context_mask=context_mask)

    mask = sample_mask(rng, gen, b, n, config["causal"])
    check_forward_backward(model, x, mask, context_kwargs, info)
    check_masked_invariance(model, x, mask, context_kwargs, gen, info)
    if maybe(rng, 0.2):
        check_dtypes(model, x, mask, context_kwargs, rng, info, compare=not discontinuous(config))
    if discontinuous(config):
        # choices among near-equal logits: in fp64, and on distinct tokens (a repeated token can give a key exactly
        # equal to another, a tie that the last bit of either path decides)
        x = torch.stack([torch.randperm(NUM_TOKENS, generator=gen)[: min(n, NUM_TOKENS)] for _ in range(b)])
        check_cached_decoding(model, x, rng, context_kwargs, info, torch.float64)
    else:
        check_cached_decoding(model, x, rng, context_kwargs, info)
