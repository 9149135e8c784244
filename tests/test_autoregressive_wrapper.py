"""AutoregressiveWrapper: loss, sampling filters, cached vs uncached decoding, variable length prompts, beam search."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from x_transformers import TransformerWrapper, Decoder, XTransformer
from x_transformers.autoregressive_wrapper import (
    AutoregressiveWrapper,
    top_k,
    top_p,
    top_a,
    min_p,
    align_right,
)

NUM_TOKENS = 32

# the cache parity tests also run on a GPU when there is one (logits compared at 1e-4 there)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # these models are tiny; thread start-up costs more than it saves, badly so on a busy CI box
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_decoder(max_seq_len=64, use_abs_pos_emb=True, num_tokens=NUM_TOKENS, depth=2, **attn_kwargs):
    torch.manual_seed(0)
    net = TransformerWrapper(
        num_tokens=num_tokens,
        max_seq_len=max_seq_len,
        use_abs_pos_emb=use_abs_pos_emb,
        attn_layers=Decoder(dim=32, depth=depth, heads=4, attn_dim_head=8, **attn_kwargs),
    )
    return AutoregressiveWrapper(net)


class LogitRecorder:
    """A filter that records the logits it sees and keeps only the argmax, making sampling greedy."""

    def __init__(self):
        self.logits = []

    def __call__(self, logits):
        self.logits.append(logits.clone())
        best = logits.argmax(dim=-1, keepdim=True)
        return torch.full_like(logits, float("-inf")).scatter(-1, best, 0.0)


def generate_with_logits(wrapper, prompts, seq_len, **kwargs):
    recorder = LogitRecorder()
    out = wrapper.generate(prompts, seq_len, temperature=1.0, filter_logits_fn=recorder, **kwargs)
    return out, torch.stack(recorder.logits)


def sequence_log_prob(net, prompts, continuation, **kwargs):
    seq = torch.cat((prompts, continuation), dim=-1)
    log_probs = net(seq[:, :-1], **kwargs).log_softmax(dim=-1)[:, prompts.shape[-1] - 1 :]
    return log_probs.gather(-1, continuation[..., None])[..., 0].sum(dim=-1)


# sampling filters


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k(logits, k=2)
    assert torch.isfinite(out).sum() == 2
    assert torch.equal(torch.isfinite(out), torch.tensor([[False, True, False, True, False]]))
    assert torch.isfinite(top_k(logits, frac_num_tokens=0.5)).sum() == 3


def test_top_p_keeps_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = top_p(probs.log(), thres=0.7)
    # 0.5 alone is under 0.7, so the token crossing the threshold (0.3) is kept too
    assert torch.equal(torch.isfinite(out), torch.tensor([[True, True, False, False]]))
    assert torch.allclose(out[torch.isfinite(out)], probs.log()[0, :2])


def test_top_a_and_min_p():
    probs = torch.tensor([[0.6, 0.3, 0.07, 0.03]])
    logits = probs.log()
    # min_p: keep probs >= 0.1 * 0.6
    assert torch.equal(torch.isfinite(min_p(logits, min_p=0.1)), torch.tensor([[True, True, True, False]]))
    # top_a: keep probs >= 0.5 * 0.6 ** 2 = 0.18
    out = top_a(logits, min_p_pow=2.0, min_p_ratio=0.5)
    assert torch.equal(torch.isfinite(out), torch.tensor([[True, True, False, False]]))


def test_filter_by_name_and_unknown_name():
    wrapper = make_decoder()
    prompts = torch.randint(0, NUM_TOKENS, (2, 4))
    for name in ("top_k", "top_p", "top_a", "min_p"):
        assert wrapper.generate(prompts, 3, filter_logits_fn=name).shape == (2, 3)

    with pytest.raises(ValueError, match="top_q"):
        wrapper.generate(prompts, 3, filter_logits_fn="top_q")


def test_align_right():
    t = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    out = align_right(t, torch.tensor([3, 2]), pad_id=0)
    assert torch.equal(out, torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5]]))


# loss


def test_loss_matches_cross_entropy_and_ignores_index():
    wrapper = make_decoder()
    x = torch.randint(0, NUM_TOKENS, (2, 12))
    x[0, 8:] = -100

    loss, (logits, _) = wrapper(x, return_outputs=True)

    target = x[:, 1:]
    expected = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100)
    assert torch.allclose(loss, expected)
    assert logits.shape == (2, 11, NUM_TOKENS)

    # the ignored positions were fed to the network as padding
    inp = x[:, :-1].masked_fill(x[:, :-1] == -100, 0)
    assert torch.allclose(logits, wrapper.net(inp), atol=1e-6)


def test_loss_with_lens_and_mask():
    wrapper = make_decoder()
    x = torch.randint(0, NUM_TOKENS, (2, 12))
    lens = torch.tensor([12, 7])

    loss, (logits, _) = wrapper(x, return_outputs=True, lens=lens)
    target = x[:, 1:].clone()
    target[1, 6:] = -100
    assert torch.allclose(loss, F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100))

    # a padding mask over the whole sequence gives the same loss (padding is at the end, so causal logits agree)
    mask = torch.arange(12) < lens[:, None]
    assert torch.allclose(wrapper(x, mask=mask), loss, atol=1e-6)


def test_forgetful_causal_mask_trains():
    wrapper = make_decoder()
    wrapper.mask_prob = 0.3
    x = torch.randint(0, NUM_TOKENS, (2, 16))
    loss = wrapper(x)
    loss.backward()
    assert torch.isfinite(loss)


def test_attn_z_loss_is_added():
    wrapper = make_decoder()
    x = torch.randint(0, NUM_TOKENS, (2, 12))
    plain = wrapper(x)
    wrapper.add_attn_z_loss = True
    with_z = wrapper(x)
    assert with_z > plain


class NetWithAuxLoss(nn.Module):
    """Stands in for a mixture-of-experts network that reports an aux loss in its intermediates."""

    max_seq_len = 16
    can_cache_kv = False
    output_is_log_prob = False

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(NUM_TOKENS, NUM_TOKENS)

    def forward(self, x, return_intermediates=False, **kwargs):
        from x_transformers.x_transformers import LayerIntermediates

        return self.emb(x), LayerIntermediates(aux_loss=torch.tensor(0.25))


def test_aux_loss_is_added():
    torch.manual_seed(0)
    wrapper = AutoregressiveWrapper(NetWithAuxLoss())
    x = torch.randint(0, NUM_TOKENS, (2, 8))
    loss, (logits, _) = wrapper(x, return_outputs=True)
    expected = F.cross_entropy(logits.transpose(1, 2), x[:, 1:]) + 0.25
    assert torch.allclose(loss, expected)


# cached decoding equals uncached decoding

CACHE_CONFIGS = dict(
    plain=dict(),
    rotary=dict(rotary_pos_emb=True),
    alibi=dict(alibi_pos_bias=True, use_abs_pos_emb=False),
    memory_kv=dict(attn_num_mem_kv=2),
    grouped_kv_heads=dict(attn_kv_heads=2),
    one_kv_head=dict(attn_one_kv_head=True, rotary_pos_emb=True),
    mla=dict(
        attn_use_latent_kv=True,
        attn_dim_latent_kv=16,
        attn_use_latent_q=True,
        attn_dim_latent_q=16,
        attn_latent_rope_subheads=2,
        rotary_pos_emb=True,
    ),
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CACHE_CONFIGS))
def test_cached_generation_matches_uncached(name, device):
    kwargs = dict(CACHE_CONFIGS[name])
    use_abs_pos_emb = kwargs.pop("use_abs_pos_emb", True)
    wrapper = make_decoder(use_abs_pos_emb=use_abs_pos_emb, **kwargs).to(device)
    assert wrapper.net.can_cache_kv

    prompts = torch.randint(0, NUM_TOKENS, (2, 5), device=device)
    cached, cached_logits = generate_with_logits(wrapper, prompts, 12, cache_kv=True)
    uncached, uncached_logits = generate_with_logits(wrapper, prompts, 12, cache_kv=False)

    assert torch.equal(cached, uncached)
    assert (cached_logits - uncached_logits).abs().max() < (1e-5 if device == "cpu" else 1e-4)

    greedy_cached = wrapper.generate(prompts, 12, temperature=0.0, cache_kv=True)
    assert torch.equal(greedy_cached, wrapper.generate(prompts, 12, temperature=0.0, cache_kv=False))


@pytest.mark.parametrize(
    "wrapper_kwargs, attn_kwargs, generate_kwargs",
    (
        (dict(num_memory_tokens=2), dict(), dict()),
        (dict(), dict(attn_selective=True), dict()),
        (dict(recycling=True), dict(), dict(recycle_steps=2)),
    ),
)
def test_configurations_that_cannot_cache_fall_back(wrapper_kwargs, attn_kwargs, generate_kwargs):
    torch.manual_seed(0)
    net = TransformerWrapper(
        num_tokens=NUM_TOKENS,
        max_seq_len=32,
        attn_layers=Decoder(dim=32, depth=2, heads=2, **attn_kwargs),
        **wrapper_kwargs,
    )
    wrapper = AutoregressiveWrapper(net)
    assert not net.can_cache_kv

    prompts = torch.randint(0, NUM_TOKENS, (2, 4))
    asked_to_cache = wrapper.generate(prompts, 6, temperature=0.0, cache_kv=True, **generate_kwargs)
    assert torch.equal(asked_to_cache, wrapper.generate(prompts, 6, temperature=0.0, cache_kv=False, **generate_kwargs))


def test_cached_generation_with_cross_attention():
    torch.manual_seed(0)
    wrapper = make_decoder(cross_attend=True)
    assert wrapper.net.can_cache_kv

    prompts = torch.randint(0, NUM_TOKENS, (2, 4))
    context = torch.randn(2, 6, 32)
    context_mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])

    kwargs = dict(context=context, context_mask=context_mask)
    cached, cached_logits = generate_with_logits(wrapper, prompts, 10, cache_kv=True, **kwargs)
    uncached, uncached_logits = generate_with_logits(wrapper, prompts, 10, cache_kv=False, **kwargs)

    assert torch.equal(cached, uncached)
    assert (cached_logits - uncached_logits).abs().max() < 1e-5


def test_xtransformer_cached_generation():
    torch.manual_seed(0)
    model = XTransformer(
        dim=32,
        enc_num_tokens=NUM_TOKENS,
        enc_depth=1,
        enc_heads=2,
        enc_max_seq_len=16,
        dec_num_tokens=NUM_TOKENS,
        dec_depth=2,
        dec_heads=2,
        dec_max_seq_len=32,
        dec_rotary_pos_emb=True,
    )
    src = torch.randint(0, NUM_TOKENS, (2, 10))
    src_mask = torch.ones_like(src).bool()
    start = torch.randint(0, NUM_TOKENS, (2, 1))

    cached = model.generate(src, start, 8, mask=src_mask, temperature=0.0, cache_kv=True)
    uncached = model.generate(src, start, 8, mask=src_mask, temperature=0.0, cache_kv=False)
    assert cached.shape == (2, 8)
    assert torch.equal(cached, uncached)


def test_cached_generation_with_hybrid_gru():
    torch.manual_seed(0)
    wrapper = make_decoder(rotary_pos_emb=True, attn_hybrid_module=nn.GRU(32, 4 * 8, batch_first=True))
    assert wrapper.net.can_cache_kv

    prompts = torch.randint(0, NUM_TOKENS, (2, 5))
    cached, cached_logits = generate_with_logits(wrapper, prompts, 10, cache_kv=True)
    uncached, uncached_logits = generate_with_logits(wrapper, prompts, 10, cache_kv=False)

    assert torch.equal(cached, uncached)
    assert (cached_logits - uncached_logits).abs().max() < 1e-5


# variable length prompts


@pytest.mark.parametrize("cache_kv", (True, False))
@pytest.mark.parametrize("pos", ("abs", "rotary", "alibi"))
def test_prompt_list_matches_each_prompt_alone(pos, cache_kv):
    kwargs = dict(
        abs=dict(),
        rotary=dict(rotary_pos_emb=True, use_abs_pos_emb=False),
        alibi=dict(alibi_pos_bias=True, use_abs_pos_emb=False),
    )[pos]
    wrapper = make_decoder(**kwargs)

    prompts = [torch.randint(1, NUM_TOKENS, (n,)) for n in (3, 7, 5)]
    batched, batched_logits = generate_with_logits(wrapper, prompts, 6, cache_kv=cache_kv)
    assert batched.shape == (3, 6)

    for i, prompt in enumerate(prompts):
        alone, alone_logits = generate_with_logits(wrapper, prompt, 6, cache_kv=cache_kv)
        assert alone.shape == (6,)
        assert torch.equal(batched[i], alone)
        assert (batched_logits[:, i] - alone_logits[:, 0]).abs().max() < 1e-4


@pytest.mark.parametrize("cache_kv", (True, False))
def test_prompt_list_slides_past_max_seq_len(cache_kv):
    # the left padding leaves the window as it slides, so each row still matches its prompt decoded alone
    wrapper = make_decoder(max_seq_len=8, use_abs_pos_emb=False, depth=1, rotary_pos_emb=True)
    prompts = [torch.randint(1, NUM_TOKENS, (n,)) for n in (2, 6)]

    batched, batched_logits = generate_with_logits(wrapper, prompts, 10, cache_kv=cache_kv)
    for i, prompt in enumerate(prompts):
        alone, alone_logits = generate_with_logits(wrapper, prompt, 10, cache_kv=cache_kv)
        assert torch.equal(batched[i], alone)
        assert (batched_logits[:, i] - alone_logits[:, 0]).abs().max() < 1e-4


def test_prompt_lens_matches_prompt_list():
    wrapper = make_decoder()
    prompts = [torch.randint(1, NUM_TOKENS, (n,)) for n in (4, 2)]
    right_padded = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)

    from_lens = wrapper.generate(right_padded, 5, temperature=0.0, prompt_lens=torch.tensor([4, 2]))
    assert torch.equal(from_lens, wrapper.generate(prompts, 5, temperature=0.0))


def test_prompt_list_errors():
    wrapper = make_decoder()
    with pytest.raises(ValueError, match="empty"):
        wrapper.generate([], 3)
    with pytest.raises(ValueError, match="prompt_lens"):
        wrapper.generate([torch.tensor([1, 2])], 3, prompt_lens=torch.tensor([2]))
    with pytest.raises(ValueError, match="1-D"):
        wrapper.generate([torch.ones(2, 3, dtype=torch.long)], 3)
    with pytest.raises(TypeError, match="integer"):
        wrapper.generate(torch.zeros(1, 3), 3)


# eos and sliding window


def test_eos_pads_finished_rows():
    wrapper = make_decoder()
    prompts = torch.randint(1, NUM_TOKENS, (4, 3))
    torch.manual_seed(1)
    out = wrapper.generate(prompts, 20, eos_token=5, filter_logits_fn=top_k, filter_kwargs=dict(k=4))

    for row in out:
        is_eos = (row == 5).nonzero()
        if len(is_eos) > 0:
            assert (row[is_eos[0, 0] + 1 :] == wrapper.pad_value).all()


def test_sliding_window_uncached_matches_window_recompute():
    wrapper = make_decoder(max_seq_len=8, rotary_pos_emb=True, use_abs_pos_emb=False)
    prompts = torch.randint(0, NUM_TOKENS, (2, 6))
    out = wrapper.generate(prompts, 10, temperature=0.0, cache_kv=False)

    # each step sees only the last max_seq_len tokens
    seq = prompts
    for _ in range(10):
        logits = wrapper.net(seq[:, -8:])
        seq = torch.cat((seq, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=-1)

    assert torch.equal(out, seq[:, 6:])

    # cached continuation past max_seq_len runs, keeping a window of keys / values
    assert wrapper.generate(prompts, 10, temperature=0.0, cache_kv=True).shape == (2, 10)


@pytest.mark.parametrize("pos", ("rotary", "alibi"))
def test_sliding_window_cached_matches_uncached_for_one_layer(pos):
    # with one layer the cached keys / values do not depend on how far back their own context reached, so a sliding
    # window of cached keys (positions relative to the window) equals recomputing the window from scratch
    kwargs = dict(rotary=dict(rotary_pos_emb=True), alibi=dict(alibi_pos_bias=True))[pos]
    wrapper = make_decoder(max_seq_len=8, use_abs_pos_emb=False, depth=1, **kwargs)
    prompts = torch.randint(0, NUM_TOKENS, (2, 6))

    cached, cached_logits = generate_with_logits(wrapper, prompts, 12, cache_kv=True)
    uncached, uncached_logits = generate_with_logits(wrapper, prompts, 12, cache_kv=False)
    assert torch.equal(cached, uncached)
    assert (cached_logits - uncached_logits).abs().max() < 1e-5


def test_sliding_window_with_absolute_positions_and_cache_errors():
    wrapper = make_decoder(max_seq_len=8)
    prompts = torch.randint(0, NUM_TOKENS, (2, 6))
    with pytest.raises(ValueError, match="max_seq_len"):
        wrapper.generate(prompts, 10, cache_kv=True)
    with pytest.raises(ValueError, match="max_seq_len"):
        wrapper.beam_search(prompts, 10, cache_kv=True)

    # the last sampled token is never read, so filling max_seq_len exactly is fine
    assert wrapper.generate(prompts, 3, cache_kv=True).shape == (2, 3)
    assert wrapper.generate(prompts, 10, cache_kv=False).shape == (2, 10)


def test_contrastive_decoding():
    expert, amateur = make_decoder(), make_decoder()
    prompts = torch.randint(0, NUM_TOKENS, (2, 4))
    assert expert.generate(prompts, 5, amateur_model=amateur).shape == (2, 5)


def test_generate_restores_training_mode():
    wrapper = make_decoder()
    wrapper.train()
    wrapper.generate(torch.randint(0, NUM_TOKENS, (1, 3)), 2)
    assert wrapper.training


# beam search


def test_beam_search_shapes_and_scores():
    wrapper = make_decoder(rotary_pos_emb=True)
    prompts = torch.randint(0, NUM_TOKENS, (2, 4))

    best = wrapper.beam_search(prompts, 6, beams=4)
    assert best.shape == (2, 6)

    beams, scores = wrapper.beam_search(prompts, 6, beams=4, return_beams_and_scores=True)
    assert beams.shape == (4, 2, 6) and scores.shape == (4, 2)
    assert torch.equal(beams[0], best)

    # scores are sorted, and are the total log-probabilities of the returned beams
    assert (scores[:-1] >= scores[1:]).all()
    for k in range(4):
        assert torch.allclose(scores[k], sequence_log_prob(wrapper.net, prompts, beams[k]), atol=1e-4)

    # the best beam is at least as likely as the greedy continuation
    greedy = wrapper.generate(prompts, 6, temperature=0.0)
    assert (scores[0] >= sequence_log_prob(wrapper.net, prompts, greedy) - 1e-4).all()

    # one beam is greedy decoding
    assert torch.equal(wrapper.beam_search(prompts, 6, beams=1), greedy)

    # the cache is reordered along with the beams
    assert torch.equal(wrapper.beam_search(prompts, 6, beams=4, cache_kv=False), best)


BEAM_CACHE_CONFIGS = dict(
    rotary=dict(rotary_pos_emb=True),
    mla=CACHE_CONFIGS["mla"],
    hybrid_gru=dict(attn_hybrid_module=nn.GRU(32, 4 * 8, batch_first=True)),
    hybrid_gru_folded=dict(attn_hybrid_module=nn.GRU(32, 4 * 8, batch_first=True), attn_hybrid_fold_axial_dim=2),
    hybrid_lstm=dict(attn_hybrid_module=nn.LSTM(32, 4 * 8, batch_first=True)),
)


@pytest.mark.parametrize("name", list(BEAM_CACHE_CONFIGS))
def test_beam_search_reorders_cache(name):
    # surviving beams change parents between steps; every decode state must follow them
    wrapper = make_decoder(**BEAM_CACHE_CONFIGS[name])
    assert wrapper.net.can_cache_kv

    prompts = torch.randint(0, NUM_TOKENS, (2, 5))
    cached, cached_scores = wrapper.beam_search(prompts, 6, beams=3, return_beams_and_scores=True, cache_kv=True)
    uncached, uncached_scores = wrapper.beam_search(prompts, 6, beams=3, return_beams_and_scores=True, cache_kv=False)

    assert torch.equal(cached, uncached)
    assert (cached_scores - uncached_scores).abs().max() < 1e-4


def test_beam_search_no_batch_and_stochastic():
    wrapper = make_decoder()
    prompt = torch.randint(0, NUM_TOKENS, (4,))
    assert wrapper.beam_search(prompt, 5, beams=3).shape == (5,)

    beams, scores = wrapper.beam_search(prompt[None], 5, beams=3, stochastic=True, return_beams_and_scores=True)
    assert beams.shape == (3, 1, 5) and scores.shape == (3, 1)
    recomputed = torch.cat([sequence_log_prob(wrapper.net, prompt[None], beam) for beam in beams])
    assert torch.allclose(scores[:, 0], recomputed, atol=1e-4)


def test_beam_search_with_prompt_list_and_context():
    wrapper = make_decoder(cross_attend=True)
    prompts = [torch.randint(1, NUM_TOKENS, (n,)) for n in (2, 5)]
    context = torch.randn(2, 3, 32)

    beams, scores = wrapper.beam_search(prompts, 4, beams=3, context=context, return_beams_and_scores=True)
    assert beams.shape == (3, 2, 4)

    for i, prompt in enumerate(prompts):
        alone = wrapper.beam_search(prompt[None], 4, beams=3, context=context[i : i + 1], return_beams_and_scores=True)
        assert torch.equal(alone[0][:, 0], beams[:, i])


def test_beam_search_eos_freezes_finished_beams():
    wrapper = make_decoder()
    prompts = torch.randint(1, NUM_TOKENS, (2, 3))
    eos = int(wrapper.generate(prompts, 1, temperature=0.0)[0, 0])

    beams, scores = wrapper.beam_search(prompts, 6, beams=3, eos_token=eos, return_beams_and_scores=True)
    for beam in beams.flatten(0, 1):
        is_eos = (beam == eos).nonzero()
        if len(is_eos) > 0:
            assert (beam[is_eos[0, 0] + 1 :] == wrapper.pad_value).all()


# linear-attention mixers (x_transformers.mixers) - recurrent decode state instead of keys / values

MIXER_CONFIGS = dict(
    gated_deltanet=dict(linear_attn="gated_deltanet"),
    gated_deltanet_hybrid=dict(linear_attn="gated_deltanet", hybrid_pattern="LN", rotary_pos_emb=True),
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MIXER_CONFIGS))
def test_linear_attn_cached_generation_matches_parallel(name, device):
    wrapper = make_decoder(use_abs_pos_emb=False, **MIXER_CONFIGS[name]).to(device)
    assert wrapper.net.can_cache_kv

    prompts = torch.randint(0, NUM_TOKENS, (2, 5), device=device)
    cached, cached_logits = generate_with_logits(wrapper, prompts, 10, cache_kv=True)
    parallel, parallel_logits = generate_with_logits(wrapper, prompts, 10, cache_kv=False)

    assert torch.equal(cached, parallel)
    assert (cached_logits - parallel_logits).abs().max() < (1e-5 if device == "cpu" else 1e-4)

    # the recurrent states follow the beams, and left padding of variable length prompts is masked out
    kwargs = dict(beams=3, return_beams_and_scores=True)
    beams, scores = wrapper.beam_search(prompts, 5, cache_kv=True, **kwargs)
    beams_parallel, scores_parallel = wrapper.beam_search(prompts, 5, cache_kv=False, **kwargs)
    assert torch.equal(beams, beams_parallel)
    assert (scores - scores_parallel).abs().max() < 1e-4

    prompt_list = [torch.randint(1, NUM_TOKENS, (n,), device=device) for n in (3, 6)]
    batched = wrapper.generate(prompt_list, 6, temperature=0.0)
    for i, prompt in enumerate(prompt_list):
        assert torch.equal(batched[i], wrapper.generate(prompt, 6, temperature=0.0))


def test_prepend_embeds_train_and_generate():
    wrapper = make_decoder()
    x = torch.randint(0, NUM_TOKENS, (2, 10))
    prepend_embeds = torch.randn(2, 3, 32)
    prepend_mask = torch.tensor([[True, False, True], [True, True, True]])

    # the prepended positions carry no loss: equal to the loss on the token positions' logits alone
    loss, (logits, _) = wrapper(x, prepend_embeds=prepend_embeds, prepend_mask=prepend_mask, return_outputs=True)
    assert logits.shape == (2, 9, NUM_TOKENS)
    assert torch.allclose(loss, F.cross_entropy(logits.transpose(1, 2), x[:, 1:]))
    loss.backward()

    kwargs = dict(temperature=0.0, prepend_embeds=prepend_embeds)
    cached = wrapper.generate(x[:, :2], 8, cache_kv=True, **kwargs)
    assert torch.equal(cached, wrapper.generate(x[:, :2], 8, cache_kv=False, **kwargs))

    # with a mask over the prepended embeddings, decoding falls back to recomputing every step
    masked = wrapper.generate(x[:, :2], 8, prepend_mask=prepend_mask, **kwargs)
    assert torch.equal(masked, wrapper.generate(x[:, :2], 8, prepend_mask=prepend_mask, cache_kv=False, **kwargs))


def _mixer_names():
    # the mixers with a decoding state (gtu has none, and generates without a cache)
    from x_transformers.mixers import MIXERS, mixer_class

    return [name for name in sorted(MIXERS) if mixer_class(name).can_cache_kv]


@pytest.mark.parametrize("name", _mixer_names())
def test_every_mixer_decodes_cached_like_parallel(name):
    wrapper = make_decoder(use_abs_pos_emb=False, linear_attn=name)
    assert wrapper.net.can_cache_kv

    prompts = torch.randint(0, NUM_TOKENS, (2, 5))
    cached = wrapper.generate(prompts, 6, temperature=0.0, cache_kv=True)
    assert torch.equal(cached, wrapper.generate(prompts, 6, temperature=0.0, cache_kv=False))

    kwargs = dict(beams=3, return_beams_and_scores=True)
    beams, scores = wrapper.beam_search(prompts, 4, cache_kv=True, **kwargs)
    beams_parallel, scores_parallel = wrapper.beam_search(prompts, 4, cache_kv=False, **kwargs)
    assert torch.equal(beams, beams_parallel)
    assert (scores - scores_parallel).abs().max() < 1e-4

    prompt_list = [torch.randint(1, NUM_TOKENS, (n,)) for n in (3, 6)]
    batched = wrapper.generate(prompt_list, 5, temperature=0.0)
    for i, prompt in enumerate(prompt_list):
        assert torch.equal(batched[i], wrapper.generate(prompt, 5, temperature=0.0))
