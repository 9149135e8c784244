"""The other wrappers: each trains a few steps and generates with the documented shapes; stateful decoding is checked
against its uncached form."""

import pytest
import torch
from torch import nn

from x_transformers import TransformerWrapper, Decoder, Encoder
from x_transformers.belief_state_wrapper import BeliefStateWrapper
from x_transformers.continuous import ContinuousTransformerWrapper, ContinuousAutoregressiveWrapper, GaussianNLL
from x_transformers.dpo import DPO
from x_transformers.entropy_based_tokenizer import EntropyBasedTokenizer
from x_transformers.multi_input import MultiInputTransformerWrapper
from x_transformers.neo_mlp import NeoMLP
from x_transformers.nonautoregressive_wrapper import NonAutoregressiveWrapper
from x_transformers.xl_autoregressive_wrapper import XLAutoregressiveWrapper
from x_transformers.xval import XValTransformerWrapper, XValAutoregressiveWrapper


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # these models are tiny; thread start-up costs more than it saves, badly so on a busy CI box
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_steps(model, loss_fn, steps=4, lr=3e-3):
    """Run a few Adam steps on a fixed batch and return the losses."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    return losses


def small_decoder(num_tokens=32, max_seq_len=32, **kwargs):
    return TransformerWrapper(
        num_tokens=num_tokens,
        max_seq_len=max_seq_len,
        attn_layers=Decoder(dim=32, depth=2, heads=2, attn_dim_head=16, **kwargs),
    )


# xl


@pytest.mark.parametrize("pos", ("rel_pos_bias", "rotary_pos_emb", "alibi_pos_bias"))
def test_xl_wrapper_trains_and_generates_with_memories(pos):
    torch.manual_seed(0)
    net = TransformerWrapper(
        num_tokens=32,
        max_seq_len=8,
        max_mem_len=16,
        use_abs_pos_emb=False,
        attn_layers=Decoder(dim=32, depth=2, heads=2, **{pos: True}),
    )
    wrapper = XLAutoregressiveWrapper(net)
    seq = torch.randint(0, 32, (2, 25))

    losses = train_steps(wrapper, lambda: wrapper(seq))
    assert losses[-1] < losses[0]

    # the loss over segments is a per-token mean: a sequence within one segment gives the plain loss
    short = seq[:, :9]
    logits = net(short[:, :-1])
    expected = nn.functional.cross_entropy(logits.transpose(1, 2), short[:, 1:])
    assert torch.allclose(wrapper(short), expected, atol=1e-6)

    # a prompt longer than a segment catches the memories up; cached decoding equals uncached
    prompt = torch.randint(0, 32, (2, 19))
    cached = wrapper.generate(prompt, 12, temperature=0.0, cache_kv=True)
    uncached = wrapper.generate(prompt, 12, temperature=0.0, cache_kv=False)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)
    assert wrapper.generate(prompt[0], 3).shape == (3,)


# continuous


@pytest.mark.parametrize("probabilistic", (False, True))
def test_continuous_wrapper_trains_and_caches(probabilistic):
    torch.manual_seed(0)
    net = ContinuousTransformerWrapper(
        dim_in=4,
        dim_out=4,
        max_seq_len=16,
        probabilistic=probabilistic,
        attn_layers=Decoder(dim=32, depth=2, heads=2, rotary_pos_emb=True),
    )
    wrapper = ContinuousAutoregressiveWrapper(net)

    x = torch.randn(2, 12, 4)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False

    losses = train_steps(wrapper, lambda: wrapper(x, mask=mask))
    assert losses[-1] < losses[0]

    # only targets inside the mask count: all 11 of the first row, the 7 real ones (vectors 1 .. 7) of the second
    if not probabilistic:
        errors = ((net(x[:, :-1]) - x[:, 1:]) ** 2).mean(dim=-1)  # (b, n - 1)
        expected = torch.cat((errors[0], errors[1, :7])).mean()
        assert torch.allclose(wrapper(x, mask=mask), expected, atol=1e-5)

    out = net(x)
    assert out.shape == ((2, 2, 12, 4) if probabilistic else (2, 12, 4))

    # temperature 0 makes probabilistic sampling return the mean, so cached and uncached agree
    prompt = torch.randn(2, 3, 4)
    cached = wrapper.generate(prompt, 8, temperature=0.0, cache_kv=True)
    uncached = wrapper.generate(prompt, 8, temperature=0.0, cache_kv=False)
    assert cached.shape == (2, 8, 4)
    assert (cached - uncached).abs().max() < 1e-5

    assert wrapper.generate(prompt[0], 5).shape == (5, 4)


def test_gaussian_nll_matches_torch():
    mean, variance, target = torch.randn(3, 5), torch.rand(3, 5) + 0.1, torch.randn(3, 5)
    expected = nn.functional.gaussian_nll_loss(mean, target, variance, full=True, reduction="none")
    assert torch.allclose(GaussianNLL()(torch.stack((mean, variance)), target), expected, atol=1e-6)


def test_continuous_average_pool_and_bad_input():
    net = ContinuousTransformerWrapper(
        dim_in=4, dim_out=3, max_seq_len=16, average_pool_embed=True, attn_layers=Encoder(dim=32, depth=1, heads=2)
    )
    x = torch.randn(2, 6, 4)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    assert net(x, mask=mask).shape == (2, 3)
    assert torch.allclose(net(x, lens=torch.tensor([6, 2])), net(x, mask=mask))

    with pytest.raises(ValueError, match="dim_in"):
        net(torch.randn(2, 6))


# xval


def test_xval_trains_and_generates():
    torch.manual_seed(0)
    net = XValTransformerWrapper(
        num_tokens=8,
        numerical_token_id=7,
        max_seq_len=16,
        attn_layers=Decoder(dim=32, depth=2, heads=2),
    )
    wrapper = XValAutoregressiveWrapper(net)

    ids = torch.randint(0, 8, (2, 12))
    nums = torch.randn(2, 12).masked_fill(ids != 7, float("nan"))

    losses = train_steps(wrapper, lambda: wrapper(ids, nums))
    assert losses[-1] < losses[0]

    loss, breakdown = wrapper(ids, nums, return_loss_breakdown=True)
    assert breakdown.cross_entropy_loss.shape == (2, 11)

    out = wrapper.generate(ids[:, :3], nums[:, :3], 6)
    assert out.sampled_token_ids.shape == out.sampled_numbers.shape == out.is_number_mask.shape == (2, 6)
    assert torch.isnan(out.sampled_numbers[~out.is_number_mask]).all()

    with pytest.raises(ValueError, match="same shape"):
        net(ids, nums[:, :5])

    # a padding mask over the whole sequence equals marking the padded tokens with ignore_index
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    ignored = ids.masked_fill(~mask, -100)
    assert torch.allclose(wrapper(ids, nums, mask=mask), wrapper(ignored, nums), atol=1e-6)


# non autoregressive


@pytest.mark.parametrize("critic", ("none", "self", "separate"))
def test_non_autoregressive_trains_and_generates(critic):
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=17, max_seq_len=12, attn_layers=Encoder(dim=32, depth=2, heads=2))
    token_critic = (
        TransformerWrapper(num_tokens=17, logits_dim=1, max_seq_len=12, attn_layers=Encoder(dim=16, depth=1, heads=2))
        if critic == "separate"
        else None
    )

    wrapper = NonAutoregressiveWrapper(
        net,
        mask_id=16,
        steps=4,
        self_cond=True,
        schedule="cosine",
        self_token_critic=critic == "self",
        token_critic=token_critic,
    )

    seq = torch.randint(0, 16, (2, 12))
    losses = train_steps(wrapper, lambda: wrapper(seq).loss)
    out = wrapper(seq)
    assert (out.critic_loss is None) == (critic == "none")

    sample = wrapper.generate(batch_size=3)
    assert sample.shape == (3, 12) and ((sample >= 0) & (sample < 17)).all()
    assert wrapper.generate().shape == (12,)
    assert len(losses) == 4

    with pytest.raises(ValueError, match="schedule"):
        NonAutoregressiveWrapper(net, mask_id=16, schedule="square")


# dpo


def test_dpo_trains_only_the_policy():
    torch.manual_seed(0)
    model = small_decoder()
    dpo = DPO(model, beta=0.1, pad_id=0)

    preferred = torch.randint(1, 32, (2, 10))
    unpreferred = torch.randint(1, 32, (2, 10))
    prompt_mask = torch.zeros(2, 10, dtype=torch.bool)
    prompt_mask[:, :4] = True

    # policy equals the reference at the start, so the loss is log 2
    loss = dpo(preferred, unpreferred, prompt_mask=prompt_mask)
    assert torch.allclose(loss, torch.tensor(0.6931), atol=1e-4)

    losses = train_steps(dpo, lambda: dpo(preferred, unpreferred, prompt_mask=prompt_mask))
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad for p in dpo.ref_model.parameters())


def test_dpo_loss_counts_only_response_tokens():
    torch.manual_seed(0)
    dpo = DPO(small_decoder(), beta=0.5, pad_id=0)
    with torch.no_grad():
        for param in dpo.policy_model.parameters():
            param.add_(torch.randn_like(param) * 0.05)

    preferred, unpreferred = torch.randint(1, 32, (2, 8)), torch.randint(1, 32, (2, 8))
    unpreferred[0, 6:] = 0  # padding
    prompt_mask = torch.zeros(2, 8, dtype=torch.bool)
    prompt_mask[:, :3] = True

    def mean_log_prob(model, seq):
        # log p(token t | tokens before t), averaged over response tokens that are not padding
        log_probs = model(seq[:, :-1]).log_softmax(dim=-1).gather(-1, seq[:, 1:, None])[..., 0]
        counted = (~prompt_mask & (seq != 0))[:, 1:]
        return (log_probs * counted).sum(dim=-1) / counted.sum(dim=-1)

    policy, ref = dpo.policy_model, dpo.ref_model
    logits_diff = (mean_log_prob(policy, preferred) - mean_log_prob(policy, unpreferred)) - (
        mean_log_prob(ref, preferred) - mean_log_prob(ref, unpreferred)
    )
    expected = -torch.nn.functional.logsigmoid(0.5 * logits_diff).mean()
    assert torch.allclose(dpo(preferred, unpreferred, prompt_mask=prompt_mask), expected, atol=1e-5)


# belief state


@pytest.mark.parametrize("shared_decoder", (True, False))
def test_belief_state_trains_and_generates(shared_decoder):
    torch.manual_seed(0)
    forward_decoder = small_decoder()
    backward_decoder = None if shared_decoder else small_decoder()

    wrapper = BeliefStateWrapper(forward_decoder, backward_decoder, pred_distance=True, backward_ar_loss_weight=0.5)

    seq = torch.randint(0, 32, (2, 10))
    losses = train_steps(wrapper, lambda: wrapper(seq))
    assert losses[-1] < losses[0]

    lens = torch.tensor([10, 6])
    assert torch.isfinite(wrapper(seq, lens=lens))

    prompts = torch.randint(0, 32, (2, 3))
    assert wrapper.generate_with_suffix_cond(prompts, 5, suffix=torch.randint(0, 32, (4,))).shape == (2, 5)
    assert wrapper.generate_with_suffix_cond(prompts, 5, temperature=0.0).shape == (2, 5)

    cached = wrapper.generate_with_suffix_cond(prompts, 5, temperature=0.0, cache_kv=True)
    assert torch.equal(cached, wrapper.generate_with_suffix_cond(prompts, 5, temperature=0.0, cache_kv=False))


def test_belief_state_padding_equals_truncation():
    # a right-padded row with its length gives the loss of the row cut to that length
    torch.manual_seed(0)
    wrapper = BeliefStateWrapper(small_decoder(), pred_distance=True)

    seq = torch.randint(0, 32, (1, 10))
    padded = wrapper(seq, lens=torch.tensor([7]))
    truncated = wrapper(seq[:, :7])
    assert torch.allclose(padded, truncated, atol=1e-5)


def test_belief_state_pair_loss_weights():
    torch.manual_seed(0)
    wrapper = BeliefStateWrapper(small_decoder())
    seq = torch.randint(0, 32, (2, 8))

    unweighted = wrapper(seq)
    weighted = wrapper(seq, loss_weight_by_fb_indices=lambda fb: torch.ones(fb.shape[0]))
    assert torch.allclose(unweighted, weighted, atol=1e-6)


# entropy tokenizer


def test_entropy_based_tokenizer():
    torch.manual_seed(0)
    tokenizer = EntropyBasedTokenizer(small_decoder(), entropy_threshold=3.0)
    seq = torch.randint(0, 32, (2, 16))

    token_lengths = tokenizer(seq)
    assert (token_lengths.sum(dim=-1) == 16).all()

    segments = tokenizer(seq, return_segmented_seq=True)
    assert all(torch.equal(torch.cat(one), row) for one, row in zip(segments, seq))

    # lengths: padding is not tokenized
    lens = torch.tensor([16, 9])
    token_lengths = tokenizer(seq, lens=lens)
    assert torch.equal(token_lengths.sum(dim=-1), lens)

    # a token ends exactly where the decoder's next-token entropy reaches the threshold (here its median)
    probs = tokenizer.decoder(seq).softmax(dim=-1)
    entropies = -(probs * probs.clamp(min=1e-20).log()).sum(dim=-1)
    tokenizer.entropy_threshold = entropies.median().item()
    ends = entropies >= tokenizer.entropy_threshold
    ends[:, -1] = True
    expected = [torch.diff(row.nonzero()[:, 0] + 1, prepend=torch.zeros(1, dtype=torch.long)) for row in ends]
    for got, want in zip(tokenizer(seq), expected):
        assert torch.equal(got[got > 0], want)

    # max token size splits long tokens; a threshold above any entropy gives one token per sequence otherwise
    capped = EntropyBasedTokenizer(tokenizer.decoder, entropy_threshold=100.0, max_token_size=5)
    assert torch.equal(capped(seq[0]), torch.tensor([5, 5, 5, 1]))


# multi input


def test_multi_input_wrapper():
    model = MultiInputTransformerWrapper(
        num_tokens=dict(note=20, pitch=8),
        max_seq_len=32,
        attn_layers=Decoder(dim=32, depth=1, heads=2),
    )
    x = dict(note=torch.randint(0, 20, (2, 10)), pitch=torch.randint(0, 8, (2, 10)))

    logits = model(x)
    assert logits["note"].shape == (2, 10, 20) and logits["pitch"].shape == (2, 10, 8)

    losses = train_steps(model, lambda: sum(l.logsumexp(-1).mean() - l.mean() for l in model(x).values()))
    assert len(losses) == 4

    embed = MultiInputTransformerWrapper(
        num_tokens=dict(note=20, pitch=8),
        max_seq_len=32,
        return_only_embed=True,
        num_memory_tokens=2,
        attn_layers=Decoder(dim=32, depth=1, heads=2),
    )(x)
    assert embed.shape == (2, 10, 32)

    with pytest.raises(ValueError, match="tone"):
        model(dict(note=x["note"], tone=x["pitch"]))


# neo mlp


def test_neo_mlp():
    torch.manual_seed(0)
    mlp = NeoMLP(dim_in=5, dim_hidden=8, dim_out=3, dim_model=32, depth=2)
    x, target = torch.randn(4, 5), torch.randn(4, 3)

    assert mlp(x).shape == (4, 3)
    assert mlp(x[0]).shape == (3,)

    out, (input_embed, hidden_embed, output_embed) = mlp(x, return_embeds=True)
    assert input_embed.shape == (4, 5, 32) and hidden_embed.shape == (4, 8, 32) and output_embed.shape == (4, 3, 32)

    losses = train_steps(mlp, lambda: ((mlp(x) - target) ** 2).mean(), steps=5)
    assert losses[-1] < losses[0]


# classification heads on TransformerWrapper (pooled encoder output to class logits)


@pytest.mark.parametrize(
    "pool_kwargs",
    (
        dict(attn_pool=True),
        dict(attn_pool=True, num_attn_pool_queries=3),
        dict(use_cls_token=True),
        dict(average_pool_embed=True),
    ),
)
def test_classification_head_ignores_padding_and_trains(pool_kwargs):
    torch.manual_seed(0)
    model = TransformerWrapper(
        num_tokens=32, max_seq_len=16, logits_dim=5, attn_layers=Encoder(dim=32, depth=1, heads=2), **pool_kwargs
    )
    x = torch.randint(0, 32, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False

    logits = model(x, mask=mask)
    num_queries = pool_kwargs.get("num_attn_pool_queries", 1)
    assert logits.shape == ((2, 5) if num_queries == 1 else (2, num_queries, 5))

    # padded positions do not reach the pooled output
    x_other_padding = x.masked_fill(~mask, 3)
    assert (model(x_other_padding, mask=mask) - logits).abs().max() < 1e-6

    labels = torch.tensor([1, 4])
    losses = train_steps(
        model, lambda: nn.functional.cross_entropy(model(x, mask=mask).reshape(2, -1, 5).mean(dim=1), labels)
    )
    assert losses[-1] < losses[0]
