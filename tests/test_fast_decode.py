"""Fast decoding (x_transformers/fast_decode.py): the static-cache step against the plain cached path.

On CPU the same static-cache step runs without CUDA graphs; the CUDA-graph and compiled modes are checked at the
bottom when a GPU is present.
"""

import pytest
import torch
from loguru import logger

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper, XTransformer
from x_transformers.attend import Attend
from x_transformers.fast_decode import FastDecoder, supports
from x_transformers.mixers import MIXERS, mixer_class

NUM_TOKENS = 40

CONFIGS = dict(
    rotary=dict(rotary_pos_emb=True),
    absolute=dict(),
    layernorm_partial_rotary_gqa_qk_norm_glu=dict(
        rotary_pos_emb=True, rotary_emb_dim=8, attn_kv_heads=2, attn_qk_norm=True, ff_glu=True
    ),
    rmsnorm_one_kv_head_relu_squared=dict(
        use_rmsnorm=True, attn_one_kv_head=True, ff_relu_squared=True, attn_dim_head=8, ff_mult=2
    ),
    swish_tied=dict(rotary_pos_emb=True, ff_swish=True, ff_glu=True, tie_embedding=True),
    memory_kv_gqa_qk_norm=dict(rotary_pos_emb=True, attn_num_mem_kv=3, attn_kv_heads=2, attn_qk_norm=True),
    gates_head_scale_attend_past=dict(
        attn_head_scale=True, attn_gate_value_heads=True, attn_gate_values=True, attn_max_attend_past=4
    ),
    sigmoid_talking_heads=dict(attn_sigmoid=True, attn_pre_talking_heads=True, attn_post_talking_heads=True),
    sparse_topk_softclamp=dict(attn_sparse_topk=3, attn_softclamp_logits=True, attn_logit_softclamp_value=2.0),
    hard_pre_scale_post_talking_heads=dict(attn_hard=True, attn_pre_scale_post_talking_heads=True),
    l2_distance_zero_kv=dict(attn_l2_distance=True, attn_add_zero_kv=True, rotary_pos_emb=True),
    flash_gqa_memory_kv=dict(attn_flash=True, attn_kv_heads=2, attn_num_mem_kv=2, rotary_pos_emb=True),
    hybrid_gated_deltanet=dict(linear_attn="gated_deltanet", hybrid_pattern="LN", rotary_pos_emb=True),
    hybrid_mamba2_gqa=dict(linear_attn="mamba2", hybrid_pattern="NL", attn_kv_heads=2),
    # flags the layer stack runs around the blocks: the same forward serves the cache
    alibi_shift_tokens=dict(alibi_pos_bias=True, shift_tokens=1),
    sandwich_gate_residual_value_residual=dict(sandwich_norm=True, gate_residual=True, add_value_residual=True),
    post_norm_laser_moe=dict(pre_norm=False, attn_laser=True, ff_num_experts=4),
    t5_bias_l2=dict(rel_pos_bias=True, attn_l2_distance=True),
    dynamic_bias_hyper_connections=dict(dynamic_pos_bias=True, num_residual_streams=2),
)

# every mixer kind, alone (depth 2); the hybrids above mix them with softmax layers
MIXER_CONFIGS = {f"mixers_only_{name}": dict(linear_attn=name) for name in MIXERS if mixer_class(name).can_cache_kv}


def build(max_seq_len=64, tie_embedding=False, perturb=True, **kwargs):
    net = TransformerWrapper(
        num_tokens=NUM_TOKENS,
        max_seq_len=max_seq_len,
        tie_embedding=tie_embedding,
        attn_layers=Decoder(dim=32, depth=2, heads=4, **kwargs),
    )
    # away from the initialization, where zero-init gates and identity talking heads would hide a missing piece
    with torch.no_grad():
        for param in net.parameters() if perturb else ():
            param.add_(torch.randn_like(param) * 0.1)
    return AutoregressiveWrapper(net).eval()


def plain_and_fast_logits(model, prompts, tokens, seq_start_pos=None, **context_kwargs):
    """Logits for the prompt's last position, then for each of `tokens` (b, t) fed one at a time."""
    net = model.net
    decoder = FastDecoder(net, prompts.shape[0], 64)

    with torch.no_grad():
        logits, cache = net(prompts, return_intermediates=True, seq_start_pos=seq_start_pos, **context_kwargs)
        plain = [logits[:, -1]]
        fast = [decoder.prefill(prompts, seq_start_pos, **context_kwargs)]

        seq = prompts
        for token in tokens.unbind(dim=1):
            seq = torch.cat((seq, token[:, None]), dim=1)
            logits, cache = net(
                seq, return_intermediates=True, cache=cache, seq_start_pos=seq_start_pos, **context_kwargs
            )
            plain.append(logits[:, -1])

            decoder.tokens.copy_(token[:, None])
            fast.append(decoder.forward_step())

    return torch.stack(plain, dim=1), torch.stack(fast, dim=1)


@pytest.mark.parametrize("name", list(CONFIGS) + list(MIXER_CONFIGS))
def test_logits_and_greedy_match_plain_path(name):
    torch.manual_seed(0)
    model = build(**{**CONFIGS, **MIXER_CONFIGS}[name])
    assert supports(model.net) == (True, "")

    prompts = torch.randint(0, NUM_TOKENS, (2, 5))
    tokens = torch.randint(0, NUM_TOKENS, (2, 6))
    plain, fast = plain_and_fast_logits(model, prompts, tokens)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)

    plain_out = model.generate(prompts, 10, temperature=0.0, fast_decode=False)
    fast_out = model.generate(prompts, 10, temperature=0.0, fast_decode=True)
    assert torch.equal(fast_out, plain_out)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rotary_pos_emb=True),
        dict(attn_num_mem_kv=2, attn_kv_heads=2, attn_qk_norm=True, attn_flash=True, attn_gate_values=True),
        dict(linear_attn="gated_deltanet", hybrid_pattern="LN"),
    ],
)
@pytest.mark.parametrize("with_mask", [False, True])
def test_cross_attention_matches_plain_path(kwargs, with_mask):
    torch.manual_seed(18)
    model = build(cross_attend=True, **kwargs)
    assert supports(model.net) == (True, "")
    prompts, context = torch.randint(0, NUM_TOKENS, (3, 5)), torch.randn(3, 7, 32)
    context_mask = (torch.rand(3, 7) > 0.4).index_fill(1, torch.tensor([0]), True) if with_mask else None
    context_kwargs = dict(context=context, context_mask=context_mask)

    plain, fast = plain_and_fast_logits(model, prompts, torch.randint(0, NUM_TOKENS, (3, 6)), **context_kwargs)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)

    plain_out = model.generate(prompts, 10, temperature=0.0, fast_decode=False, **context_kwargs)
    fast_out = model.generate(prompts, 10, temperature=0.0, fast_decode=True, **context_kwargs)
    assert torch.equal(fast_out, plain_out)

    # a new context of another length in the same decoder
    context_kwargs = dict(context=torch.randn(3, 4, 32), context_mask=context_mask[:, :4] if with_mask else None)
    assert torch.equal(
        model.generate(prompts, 10, temperature=0.0, fast_decode=True, **context_kwargs),
        model.generate(prompts, 10, temperature=0.0, fast_decode=False, **context_kwargs),
    )


def test_encoder_decoder_generate():
    torch.manual_seed(19)
    model = XTransformer(
        dim=32, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_heads=4, enc_max_seq_len=16,
        dec_num_tokens=NUM_TOKENS, dec_depth=2, dec_heads=4, dec_max_seq_len=32, dec_rotary_pos_emb=True,
    ).eval()
    src, start = torch.randint(0, NUM_TOKENS, (2, 9)), torch.randint(0, NUM_TOKENS, (2, 1))
    src_mask = torch.ones(2, 9, dtype=torch.bool).index_fill(1, torch.tensor([7, 8]), False)
    plain = model.generate(src, start, 12, mask=src_mask, temperature=0.0, fast_decode=False)
    fast = model.generate(src, start, 12, mask=src_mask, temperature=0.0, fast_decode=True)
    assert torch.equal(fast, plain)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rotary_pos_emb=True, attn_softclamp_logits=True, attn_logit_softclamp_value=50.0),
        dict(linear_attn="gated_deltanet", hybrid_pattern="LN", attn_kv_heads=2, attn_qk_norm=True, attn_sparse_topk=8),
    ],
)
def test_bf16_autocast_is_bit_identical_where_attention_forms_its_logits(kwargs):
    # the step runs the model's own Attend: where it takes the explicit path (any logit feature), it rounds exactly
    # as the plain path does, the masked future columns adding exact zeros, so bf16 logits agree to the bit on CPU
    # (the SDPA path's kernel may round a masked call differently from the plain path's unmasked one: near-ties flip)
    torch.manual_seed(16)
    model = build(**kwargs)
    prompts = torch.randint(0, NUM_TOKENS, (3, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, fast = plain_and_fast_logits(model, prompts, torch.randint(0, NUM_TOKENS, (3, 10)))
        ragged = [prompt[:n] for prompt, n in zip(prompts, (2, 7, 4))]
        plain_out, fast_out = (model.generate(ragged, 16, temperature=0.0, fast_decode=mode) for mode in (False, True))
    assert plain.dtype == torch.bfloat16 and torch.equal(fast, plain)
    assert torch.equal(fast_out, plain_out)


@pytest.mark.parametrize("name", ["rotary", "absolute", "memory_kv_gqa_qk_norm", "hybrid_gated_deltanet"])
def test_left_padded_prompts(name):
    torch.manual_seed(1)
    model = build(**CONFIGS[name])
    prompts = [torch.randint(0, NUM_TOKENS, (n,)) for n in (2, 6, 4)]

    plain_out = model.generate(prompts, 10, temperature=0.0, fast_decode=False)
    fast_out = model.generate(prompts, 10, temperature=0.0, fast_decode=True)
    assert torch.equal(fast_out, plain_out)

    # logits too, with the start positions the wrapper derives
    padded, _, start = model._prepare_prompts(prompts, None)
    plain, fast = plain_and_fast_logits(model, padded, torch.randint(0, NUM_TOKENS, (3, 4)), start)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_eos_stops_and_pads_like_plain_path(monkeypatch):
    # look for finished rows often, so that the early stop happens within this short decode
    monkeypatch.setattr("x_transformers.fast_decode.EOS_CHECK_EVERY", 4)
    torch.manual_seed(2)
    model = build(perturb=False, **CONFIGS["rotary"])
    prompts = torch.randint(0, NUM_TOKENS, (3, 4))[1:]

    # an eos token every row emits early (greedy decodes of this seed share one), so decoding stops early
    free = model.generate(prompts, 24, temperature=0.0, fast_decode=False)
    eos = min(set.intersection(*(set(row[:4].tolist()) for row in free)))

    plain_out = model.generate(prompts, 24, temperature=0.0, eos_token=eos, fast_decode=False)
    fast_out = model.generate(prompts, 24, temperature=0.0, eos_token=eos, fast_decode=True)
    assert plain_out.shape[1] < 24
    assert torch.equal(fast_out, plain_out)


def test_sampling_respects_filters_and_reuses_the_decoder():
    torch.manual_seed(3)
    model = build(**CONFIGS["rotary"])
    prompts = torch.randint(0, NUM_TOKENS, (4, 3))

    top_1 = dict(filter_logits_fn="top_k", filter_kwargs=dict(k=1))
    out = model.generate(prompts, 16, temperature=1.0, fast_decode=True, **top_1)
    decoder = model._fast_decoder
    # top-1 sampling is greedy
    assert torch.equal(out, model.generate(prompts, 16, temperature=0.0, fast_decode=False))

    out = model.generate(prompts, 16, temperature=0.7, filter_logits_fn="min_p", fast_decode=True)
    assert out.shape == (4, 16) and out.min() >= 0 and out.max() < NUM_TOKENS
    assert model._fast_decoder is decoder
    # the decoder is a plain attribute: the state dict is unchanged
    assert not any("fast" in key for key in model.state_dict())


def test_continues_past_max_seq_len_without_window():
    torch.manual_seed(4)
    model = build(max_seq_len=8, **CONFIGS["rotary"])
    prompts = torch.randint(0, NUM_TOKENS, (2, 6))
    kwargs = dict(temperature=0.0, restrict_to_max_seq_len=False)
    assert torch.equal(
        model.generate(prompts, 10, fast_decode=True, **kwargs),
        model.generate(prompts, 10, fast_decode=False, **kwargs),
    )
    # the plain path would slide its window and re-rotate cached keys: the static cache does not, so it refuses
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompts, 10, temperature=0.0, fast_decode=True)
    assert model.generate(prompts, 10, temperature=0.0).shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(rotary_pos_emb=True, rotary_xpos=True), "rotary_xpos"),
        (dict(attn_data_dependent_alibi=True), "attn_data_dependent_alibi"),
        (dict(attn_use_cope=True), "attn_use_cope"),
        (dict(attn_use_latent_kv=True, attn_dim_latent_kv=16), "attn_use_latent_kv"),
        (dict(attn_custom_attn_fn=lambda sim: sim.softmax(dim=-1)), "attn_custom_attn_fn"),
    ],
)
def test_unsupported_flags_fall_back_or_raise(kwargs, flag):
    torch.manual_seed(5)
    model = build(**kwargs)
    ok, reason = supports(model.net)
    assert not ok and flag in reason

    prompts = torch.randint(0, NUM_TOKENS, (2, 3))
    with pytest.raises(ValueError, match=flag):
        model.generate(prompts, 4, temperature=0.0, fast_decode=True)

    # auto falls back to the plain path, same tokens
    assert torch.equal(
        model.generate(prompts, 4, temperature=0.0, fast_decode=None),
        model.generate(prompts, 4, temperature=0.0, fast_decode=False),
    )


def test_generate_level_fallbacks_and_errors():
    torch.manual_seed(6)
    model = build(**CONFIGS["rotary"])
    prompts = torch.randint(0, NUM_TOKENS, (2, 3))

    with pytest.raises(ValueError, match="cache_kv"):
        model.generate(prompts, 4, cache_kv=False, fast_decode=True)
    with pytest.raises(ValueError, match="amateur_model"):
        model.generate(prompts, 4, amateur_model=build(**CONFIGS["rotary"]), fast_decode=True)
    with pytest.raises(ValueError, match="must be None, True, False"):
        model.generate(prompts, 4, fast_decode="fastest")
    # CUDA graphs need CUDA
    with pytest.raises(ValueError, match="needs CUDA"):
        model.generate(prompts, 4, fast_decode="graph")

    # auto is CUDA only: on CPU the plain path runs and no decoder is built
    model.generate(prompts, 4)
    assert "_fast_decoder" not in model.__dict__


def _mode(model, fast_decode, prompts, seq_len=4, cache_kv=True, amateur=None, **net_kwargs):
    should_cache = model._should_cache(cache_kv, net_kwargs)
    return model._fast_decode_mode(fast_decode, cache_kv, should_cache, amateur, net_kwargs, prompts, seq_len, True)


def test_switch_auto_force_off(monkeypatch):
    torch.manual_seed(14)
    supported, unsupported = build(**CONFIGS["rotary"]), build(attn_use_cope=True)
    prompts = torch.randint(0, NUM_TOKENS, (2, 3))

    # on CPU: auto keeps the plain path, True runs the static-cache step eagerly, a mode name is that mode
    assert _mode(supported, None, prompts) is None
    assert _mode(supported, True, prompts) == "eager"
    assert _mode(supported, "eager", prompts) == "eager"
    assert _mode(supported, False, prompts) is None

    # on CUDA (pretended): auto is the CUDA graph where supported, the plain path with a debug log otherwise
    monkeypatch.setattr("x_transformers.autoregressive_wrapper.on_cuda", lambda t: True)
    messages = []
    sink = logger.add(messages.append, level="DEBUG", format="{message}")
    try:
        assert _mode(supported, None, prompts) == "graph"
        assert _mode(supported, True, prompts) == "graph"
        assert _mode(supported, "compile", prompts) == "compile"
        assert _mode(supported, False, prompts) is None
        assert not messages

        assert _mode(unsupported, None, prompts) is None
        assert _mode(supported, None, prompts, cache_kv=False) is None
        assert _mode(supported, None, prompts, seq_len=80) is None
        assert _mode(supported, None, prompts, context=torch.randn(2, 3, 32)) is None
    finally:
        logger.remove(sink)
    logged = "".join(messages)
    for reason in ("attn_use_cope", "cache_kv", "max_seq_len", "network_kwargs` (context)"):
        assert reason in logged

    # and forcing it names what is unsupported
    with pytest.raises(ValueError, match="attn_use_cope"):
        _mode(unsupported, True, prompts)
    with pytest.raises(ValueError, match="cache_kv"):
        _mode(supported, "graph", prompts, cache_kv=False)


def test_auto_decodes_fast_on_cuda(monkeypatch):
    # generate() with the default fast_decode, pretending to be on CUDA; the step runs eagerly instead of in a graph
    from x_transformers import fast_decode

    build_decoder = fast_decode.fast_decoder_for
    modes = []

    def eager_decoder_for(wrapper, batch, length, mode):
        modes.append(mode)
        return build_decoder(wrapper, batch, length, "eager")

    monkeypatch.setattr("x_transformers.autoregressive_wrapper.on_cuda", lambda t: True)
    monkeypatch.setattr(fast_decode, "fast_decoder_for", eager_decoder_for)

    torch.manual_seed(15)
    model = build(**CONFIGS["memory_kv_gqa_qk_norm"])
    prompts = torch.randint(0, NUM_TOKENS, (3, 4))
    out = model.generate(prompts, 12, temperature=0.0)
    assert modes == ["graph"] and "_fast_decoder" in model.__dict__
    assert torch.equal(out, model.generate(prompts, 12, temperature=0.0, fast_decode=False))
    assert modes == ["graph"]


def test_graph_bookkeeping_with_a_stand_in_graph():
    # the CUDA-graph control flow on CPU: warm-up steps, one capture, replays; recapture on new weights / sampler
    from x_transformers.fast_decode import WARMUP_STEPS, fast_decoder_for

    class StandInGraph:
        def __init__(self, fn):
            self.fn, self.replays = fn, 0

        def replay(self):
            self.replays += 1
            self.fn()

    torch.manual_seed(12)
    model = build(**CONFIGS["rotary"])
    prompts = torch.randint(0, NUM_TOKENS, (3, 5))
    decoder = fast_decoder_for(model, 3, 5 + 12, "eager")
    decoder.mode = "graph"
    calls = dict(warm=0, capture=0)

    def warm_step():
        calls["warm"] += 1
        decoder.decode_step()

    def capture_step():
        calls["capture"] += 1
        return StandInGraph(decoder.decode_step)

    decoder._warm_step, decoder._capture_step = warm_step, capture_step

    def both(**kwargs):
        plain = model.generate(prompts, 12, temperature=0.0, fast_decode=False, **kwargs)
        fast = model.generate(prompts, 12, temperature=0.0, fast_decode="eager", **kwargs)
        assert model._fast_decoder is decoder and torch.equal(fast, plain)
        return plain

    both()
    assert calls == dict(warm=WARMUP_STEPS, capture=1) and decoder.graph.replays == 11 - WARMUP_STEPS
    both()
    assert calls["capture"] == 1 and decoder.graph.replays == 2 * 11 - WARMUP_STEPS

    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.01)
    plain = both()
    assert calls["capture"] == 2

    both(eos_token=int(plain[0, 3]))
    assert calls["capture"] == 3


def test_not_a_transformer_wrapper():
    ok, reason = supports(torch.nn.Linear(2, 2))
    assert not ok and "Linear does not declare static-cache decoding" in reason


def test_fsdp2_sharded_model_decodes_on_the_plain_path(tmp_path):
    """Under FSDP2 the weights are sharded DTensors, all-gathered by hooks the fast path's layer loop never calls:
    `supports` says so, and auto-mode generation takes the plain path (same tokens as the unsharded model) once the
    root group is gathered (the training scripts' `root_gathered`)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from x_transformers.training import root_gathered

    torch.manual_seed(0)
    model = AutoregressiveWrapper(TransformerWrapper(
        num_tokens=NUM_TOKENS, max_seq_len=32, attn_layers=Decoder(dim=16, depth=2, heads=2, rotary_pos_emb=True)
    ))
    prompt = torch.randint(0, NUM_TOKENS, (1, 4))
    expected = model.generate(prompt, 6, temperature=0.0, cache_kv=True, fast_decode=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))  # CPU weights, also on a machine with a GPU
        for layer in model.net.attn_layers.layers:
            fully_shard(layer[1], mesh=mesh)
        fully_shard(model, mesh=mesh)
        ok, reason = supports(model.net)
        assert not ok and "DTensor" in reason
        with root_gathered(model):
            with pytest.raises(ValueError, match="DTensor"):
                model.generate(prompt, 6, temperature=0.0, cache_kv=True, fast_decode=True)
            out = model.generate(prompt, 6, temperature=0.0, cache_kv=True)
    finally:
        dist.destroy_process_group()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_gqa_matches_math_path(causal):
    # the SDPA path regroups query heads for enable_gqa: query head h must still read kv head h % kv_heads
    torch.manual_seed(7)
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    flash, _ = Attend(flash=True, causal=causal)(q, k, v)
    math, _ = Attend(flash=False, causal=causal)(q, k, v)
    torch.testing.assert_close(flash, math, atol=1e-5, rtol=0)


# GPU: the CUDA graph and compiled steps


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("mode", ["graph", "compile"])
@pytest.mark.parametrize(
    "name", ["layernorm_partial_rotary_gqa_qk_norm_glu", "hybrid_gated_deltanet", "alibi_shift_tokens", "post_norm_laser_moe"]
)
def test_cuda_graph_matches_plain_path(mode, name):
    torch.manual_seed(8)
    model = build(max_seq_len=256, **CONFIGS[name]).cuda()
    prompts = torch.randint(0, NUM_TOKENS, (4, 7), device="cuda")

    plain_out = model.generate(prompts, 60, temperature=0.0, fast_decode=False)
    for _ in range(2):  # the second call replays the captured graph
        assert torch.equal(model.generate(prompts, 60, temperature=0.0, fast_decode=mode), plain_out)
    assert model.generate(prompts, 60, temperature=0.0).shape == plain_out.shape  # auto takes the fast path
    assert model._fast_decoder.graph is not None


@cuda
def test_cuda_graph_cross_attention():
    torch.manual_seed(20)
    model = build(max_seq_len=256, cross_attend=True, rotary_pos_emb=True, attn_kv_heads=2).cuda()
    prompts = torch.randint(0, NUM_TOKENS, (3, 6), device="cuda")
    for length in (9, 9, 5):  # the second call replays the graph, a new context length captures another
        context = torch.randn(3, length, 32, device="cuda")
        context_mask = torch.rand(3, length, device="cuda") > 0.3
        context_mask[:, 0] = True
        kwargs = dict(temperature=0.0, context=context, context_mask=context_mask)
        plain_out = model.generate(prompts, 40, fast_decode=False, **kwargs)
        assert torch.equal(model.generate(prompts, 40, **kwargs), plain_out)
        assert model._fast_decoder.graph is not None


@cuda
def test_cuda_graph_replay_has_no_host_sync():
    torch.manual_seed(9)
    model = build(max_seq_len=256, **CONFIGS["rotary"]).cuda()
    prompts = torch.randint(0, NUM_TOKENS, (2, 5), device="cuda")
    model.generate(prompts, 20, temperature=1.0, fast_decode="graph")

    decoder = model._fast_decoder
    decoder.prefill(prompts)
    torch.cuda.set_sync_debug_mode("error")
    try:
        decoder.run_steps(20)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_cuda_graph_sees_weight_updates():
    torch.manual_seed(10)
    model = build(max_seq_len=256, **CONFIGS["rotary"]).cuda()
    prompts = torch.randint(0, NUM_TOKENS, (2, 5), device="cuda")
    model.generate(prompts, 20, temperature=0.0, fast_decode="graph")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert torch.equal(
        model.generate(prompts, 20, temperature=0.0, fast_decode="graph"),
        model.generate(prompts, 20, temperature=0.0, fast_decode=False),
    )


@cuda
def test_sdpa_gqa_flash_matches_math_path_with_grads():
    # bf16 on CUDA takes the flash kernel with enable_gqa; outputs and gradients as the math path's
    torch.manual_seed(11)
    q = torch.randn(2, 8, 64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grads = []
    for flash in (True, False):
        out, _ = Attend(flash=flash, causal=True)(q, k, v)
        out.float().square().sum().backward()
        grads.append((out.detach().float(), *(t.grad.float().clone() for t in (q, k, v))))
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def test_benchmark_smoke(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fast_decode.py"
    spec = importlib.util.spec_from_file_location("bench_fast_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    report = bench.main(["--smoke", "--json", str(tmp_path / "fast_decode.json")])
    (case,) = report["cases"]
    assert [r["mode"] for r in case["results"]] == ["off", "eager"]
    assert all(r["tokens_per_s"] > 0 and r["tokens_match_off"] == 1.0 for r in case["results"])
    assert all(r["rows_diverged"] == 0 for r in case["results"])
    assert (tmp_path / "fast_decode.json").exists()

    # the gap report: row 1 leaves the reference at its third token
    torch.manual_seed(17)
    model = build(**CONFIGS["rotary"])
    prompts, reference = torch.randint(0, NUM_TOKENS, (2, 4)), torch.randint(0, NUM_TOKENS, (2, 6))
    out = reference.clone()
    out[1, 2:] = (reference[1, 2:] + 1) % NUM_TOKENS
    gaps, spacing = bench.divergence_gaps(model, prompts, reference, out, "fp32", torch.device("cpu"))
    # the forward over the diverged row alone, as divergence_gaps runs it (a batch of another size may round apart)
    logits = model.net(torch.cat((prompts, reference), dim=-1)[1:2])[0, 4 + 2 - 1]
    assert gaps == pytest.approx([(logits[reference[1, 2]] - logits[out[1, 2]]).item()])
    assert spacing > 0 and bench.divergence_gaps(model, prompts, reference, reference, "fp32", None) == ([], None)


def test_auto_mode_falls_back_to_plain_path_when_fast_path_fails(monkeypatch):
    from x_transformers.fast_decode import FastDecoder

    def broken(self, *args, **kwargs):
        raise RuntimeError("broken on purpose")

    # pretend auto mode picked the fast path (as on CUDA), and make it fail
    monkeypatch.setattr(FastDecoder, "generate", broken)
    monkeypatch.setattr(
        AutoregressiveWrapper,
        "_fast_decode_mode",
        lambda self, fast_decode, *args: None
        if fast_decode is False or self.__dict__.get("_fast_decode_failed")
        else "eager",
    )
    torch.manual_seed(13)
    model = build(**CONFIGS["rotary"])
    prompts = torch.randint(0, NUM_TOKENS, (2, 4))

    expected = model.generate(prompts, 6, temperature=0.0, fast_decode=False)
    assert torch.equal(model.generate(prompts, 6, temperature=0.0, fast_decode=None), expected)
    assert model._fast_decode_failed

    # asked for explicitly, the error surfaces
    del model.__dict__["_fast_decode_failed"]
    with pytest.raises(RuntimeError, match="broken on purpose"):
        model.generate(prompts, 6, temperature=0.0, fast_decode=True)
