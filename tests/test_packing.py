"""Packed sequences: a packed batch gives the logits and input gradients of its documents run one by one, for softmax
attention with every position scheme and for every mixer; the three ways of describing the documents agree; bad
descriptions and unsupported combinations are refused; the fused forgetting-attention path equals the dense one."""

import pytest
import torch

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.mixers import MIXERS, Mixer, make_mixer, mixer_class
from x_transformers.packing import build_packing

DIM, HEADS, TOKENS = 32, 2, 40
# documents of length 1 and shorter than any kernel block (16, 64), and one across a chunk boundary of 16
LENS = [3, 1, 17, 1, 6]
LENS_ROW2 = [10, 12, 6]


def make_model(layers_cls=Decoder, max_seq_len=64, **layer_kwargs):
    torch.manual_seed(0)
    layers = layers_cls(dim=DIM, depth=2, heads=HEADS, attn_dim_head=16, **layer_kwargs)
    return TransformerWrapper(num_tokens=TOKENS, max_seq_len=max_seq_len, attn_layers=layers).eval()


def embed_grad_run(model, x, **kwargs):
    """Logits and the gradient of a fixed projection of them w.r.t. the token embeddings (the input gradient)."""
    emb = model.token_emb.emb if hasattr(model.token_emb, "emb") else model.token_emb
    emb.weight.grad = None
    logits = model(x, **kwargs)
    weights = torch.linspace(-1, 1, logits.shape[-1])
    (logits * weights).sum().backward()
    return logits.detach(), emb.weight.grad.clone()


def check_packed_equals_separate(model, rows):
    """rows: per row, its document lengths; every row has the same total."""
    torch.manual_seed(1)
    x = torch.randint(0, TOKENS, (len(rows), sum(rows[0])))
    packed, packed_grad = embed_grad_run(model, x, seq_lens=rows)

    emb = model.token_emb.emb
    emb.weight.grad = None
    weights = torch.linspace(-1, 1, TOKENS)
    outs = []
    for row, lens in zip(x, rows):
        docs = [model(doc[None]) for doc in row.split(lens)]
        outs.append(torch.cat(docs, dim=1))
    separate = torch.cat(outs)
    (separate * weights).sum().backward()
    # relative to the whole tensor: the packed rows and the lone documents may take different kernels (chunked
    # vs token by token), whose fp32 sums differ in order
    assert rel_err(packed, separate.detach()) < 1e-4
    assert rel_err(packed_grad, emb.weight.grad) < 1e-4


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-8)).item()


POSITIONS = {
    "absolute": dict(),
    "rotary": dict(rotary_pos_emb=True, rotary_emb_dim=16),
    "rotary_xpos": dict(rotary_xpos=True, rotary_emb_dim=16),
    "alibi": dict(alibi_pos_bias=True),
    "t5": dict(rel_pos_bias=True),
    "dynamic": dict(dynamic_pos_bias=True),
    "forgetting": dict(attn_data_dependent_alibi=True),
    "forgetting_per_row": dict(attn_data_dependent_alibi=True, attn_data_dependent_alibi_per_row=True),
    "grouped_kv_rotary": dict(attn_kv_heads=1, rotary_pos_emb=True, rotary_emb_dim=16),
}


@pytest.mark.parametrize("name", sorted(POSITIONS))
def test_softmax_attention_packed_equals_documents(name):
    check_packed_equals_separate(make_model(**POSITIONS[name]), [LENS])


def test_softmax_attention_packed_rows():
    # batch > 1: every row its own set of documents
    check_packed_equals_separate(make_model(rotary_pos_emb=True, rotary_emb_dim=16), [LENS, LENS_ROW2])


def test_encoder_packed_equals_documents():
    check_packed_equals_separate(make_model(Encoder, rel_pos_bias=True), [LENS, LENS_ROW2])


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mixer_packed_equals_documents(name):
    # a hybrid stack: mixer, softmax attention, feedforwards - rows of their own documents
    model = make_model(linear_attn=name, hybrid_pattern="LN", rotary_pos_emb=True, rotary_emb_dim=16)
    check_packed_equals_separate(model, [LENS, LENS_ROW2])


CU_SEQLENS_MIXERS = sorted(name for name in MIXERS if mixer_class(name).packed_path == "cu_seqlens")


def test_packed_paths_declared():
    # every mixer names its path; the recurrences with a cu_seqlens kernel take it
    for name in MIXERS:
        assert mixer_class(name).packed_path in ("cu_seqlens", "padded"), name
    converted = {"gated_deltanet", "deltanet", "gla", "mamba2", "retnet", "lightning", "linear"}
    assert converted <= set(CU_SEQLENS_MIXERS)


def refuse_padded(monkeypatch):
    def padded(self, *args, **kwargs):
        raise AssertionError(f"linear_attn={self.name!r} took the padded path")

    monkeypatch.setattr(Mixer, "mix_padded", padded)


@pytest.mark.parametrize("name", CU_SEQLENS_MIXERS)
def test_cu_seqlens_mixer_skips_padding(monkeypatch, name):
    # documents of length 1 and below the conv width, across rows: the kernels' own cu_seqlens, no padded batch
    refuse_padded(monkeypatch)
    model = make_model(linear_attn=name, hybrid_pattern="LN", rotary_pos_emb=True, rotary_emb_dim=16)
    check_packed_equals_separate(model, [LENS, LENS_ROW2])


@pytest.mark.parametrize(
    "name, lens",
    [
        ("gated_deltanet", [[3, 1, 17], [2, 19]]),
        ("mamba2", [[3, 1, 17], [2, 19]]),
        ("retnet", [[3, 1, 17], [2, 19]]),
        # 12 tokens in all: the token-by-token kernel
        ("gated_deltaproduct", [[3, 1, 2], [6]]),
    ],
)
def test_cu_seqlens_mixer_triton(monkeypatch, name, lens):
    # the Triton kernels (interpreted on CPU) with cu_seqlens, the short convolution's included, against the
    # padded path on the same kernels: outputs and input gradients
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    mixer = make_mixer(name, dim=16, heads=2).double()
    n = sum(lens[0])
    x = torch.randn(2, n, 16, dtype=torch.float64, requires_grad=True)
    packing = build_packing(2, n, "cpu", seq_lens=lens)
    out = mixer(x, pack=packing)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    expected = mixer.mix_padded(x, packing)[0]
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    # the kernels keep fp32 states and accumulators whatever the input dtype
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["gla", "rwkv7", "gtu"])
def test_bidirectional_or_stack_input_mixer_direct(name):
    # the mixer alone, through its `pack` input: outputs of each document equal its solo run
    torch.manual_seed(0)
    mixer = make_mixer(name, dim=DIM, heads=HEADS).eval()
    x = torch.randn(1, sum(LENS), DIM)
    packing = build_packing(1, x.shape[1], x.device, seq_lens=LENS)
    out = mixer(x, pack=packing) if name != "rwkv7" else mixer(x, pack=packing, value_first=None)
    solo = [mixer(doc) if name != "rwkv7" else mixer(doc, value_first=None) for doc in x.split(LENS, dim=1)]
    torch.testing.assert_close(out, torch.cat(solo, dim=1), atol=2e-5, rtol=1e-4)


def test_three_descriptions_agree():
    model = make_model(rotary_pos_emb=True, rotary_emb_dim=16, linear_attn="gla", hybrid_pattern="LN")
    x = torch.randint(0, TOKENS, (1, sum(LENS)))
    by_lens = model(x, seq_lens=LENS)
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()])
    by_cu = model(x, cu_seqlens=cu)
    pos = torch.cat([torch.arange(n) for n in LENS])[None]
    by_pos = model(x, pos=pos)
    by_flash_kwargs = model(x, flash_pack_seq_kwargs=dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=17, max_seqlen_k=17))
    for other in (by_cu, by_pos, by_flash_kwargs):
        torch.testing.assert_close(other, by_lens)
    # tensor seq_lens, zeros ignored, per row
    both = model(x.repeat(2, 1), seq_lens=torch.tensor([[*LENS, 0], [*LENS, 0]]))
    torch.testing.assert_close(both, by_lens.repeat(2, 1, 1))


def test_packing_description():
    packing = build_packing(2, 5, "cpu", seq_lens=[[2, 3], [1, 0, 4]])
    assert packing.cu_seqlens.tolist() == [0, 2, 5, 6, 10]
    assert packing.positions.tolist() == [[0, 1, 0, 1, 2], [0, 0, 1, 2, 3]]
    assert packing.doc_ids.tolist() == [[0, 0, 1, 1, 1], [2, 3, 3, 3, 3]]
    assert packing.max_seqlen == 4
    x = torch.randn(2, 5, 3)
    padded, keep = packing.to_padded(x)
    assert padded.shape == (4, 4, 3) and keep.sum() == 10
    torch.testing.assert_close(packing.from_padded(padded), x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_lens=[[2, 3], [6]]), "sums to 5, the rows have 6"),
        (dict(seq_lens=[3, 3]), "a flat seq_lens describes one row"),
        (dict(cu_seqlens=torch.tensor([0, 3, 6])), "batch 1"),
        (dict(seq_lens=[[3, 3], [3, 3]], cu_seqlens=torch.tensor([0, 6])), "one way only"),
        (dict(seq_lens=[[3.0, 3], [6]]), "list of lists of ints"),
    ],
)
def test_bad_descriptions_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_packing(2, 6, "cpu", **kwargs)
    with pytest.raises(ValueError, match="rise from 0"):
        build_packing(1, 6, "cpu", cu_seqlens=torch.tensor([0, 4, 3, 6]))
    with pytest.raises(ValueError, match="count up by 1"):
        build_packing(1, 4, "cpu", pos=torch.tensor([0, 1, 0, 2]))


def test_packing_refused_with_cache_and_mask():
    model = make_model()
    x = torch.randint(0, TOKENS, (1, 6))
    with pytest.raises(ValueError, match="packed sequences cannot be combined with \\['mask'\\]"):
        model(x, seq_lens=[3, 3], mask=torch.ones(1, 6, dtype=torch.bool))
    _, cache = model(x[:, :3], return_intermediates=True)
    with pytest.raises(ValueError, match="packed sequences cannot be combined with \\['cache'\\]"):
        model(x, seq_lens=[3, 3], cache=cache)
    shifted = make_model(shift_tokens=1)
    with pytest.raises(ValueError, match="shift_tokens"):
        shifted(x, seq_lens=[3, 3])


def test_flash_pack_seq_flag_accepted():
    model = make_model(attn_flash_pack_seq=True)
    x = torch.randint(0, TOKENS, (1, 6))
    torch.testing.assert_close(model(x, seq_lens=[2, 4])[:, :2], model(x[:, :2]))


@pytest.mark.parametrize("packed, forget", [(False, True), (True, True), (True, False)])
def test_forgetting_attention_fused_equals_dense(monkeypatch, packed, forget):
    """attn_data_dependent_alibi through ops.flash_attention (forget gates as g) vs today's dense bias, forward and
    backward; grouped kv heads exercise the head regrouping."""
    from x_transformers.attention import Attention

    pytest.importorskip("triton")
    # the Triton kernels on CPU (tests/conftest.py set the interpreter up); `use_triton` reads this at each call
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    attn = Attention(dim=16, heads=4, kv_heads=2, dim_head=16, causal=True, data_dependent_alibi=forget)
    x = torch.randn(2, 9, 16, requires_grad=True)
    packing = build_packing(2, 9, "cpu", seq_lens=[[4, 5], [1, 8]]) if packed else None
    kwargs = dict(pack=packing) if packed else dict()

    assert attn.fused_attention_ok(x[:, None], x[:, None], None, None, None, None, None, None, packing)
    fused = attn(x, **kwargs)
    grads_fused = torch.autograd.grad(fused.square().sum(), [x, *attn.parameters()], allow_unused=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dense = attn(x, **kwargs)
    grads_dense = torch.autograd.grad(dense.square().sum(), [x, *attn.parameters()], allow_unused=True)
    torch.testing.assert_close(fused, dense, atol=1e-4, rtol=1e-3)
    for a, b in zip(grads_fused, grads_dense):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_pack_data_builder():
    from x_transformers.training import document_positions, packed_targets

    text = b"ab\n\ncde\n\n\n\nf"
    windows = torch.tensor([list(text), list(text[3:] + text[:3])])
    pos = document_positions(windows, b"\n\n")
    # row 0: "ab\n\n" | "cde\n\n" | "\n" | "\n" | "f": a document ends where a separator does (in a run of
    # newlines, at every one after the first)
    assert pos[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0, 0]
    # row 1 starts inside a separator: the cut first document starts the row
    assert pos[1].tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 0, 1, 2, 3]
    targets = packed_targets(windows, pos)
    # no target is the first token of a document
    assert (targets[0] == -100).tolist() == [p == 0 for p in pos[0, 1:].tolist()]
    assert targets[0, 0] == ord("b") and targets[0, 3] == -100


def test_train_enwik8_pack_loss_ignores_boundaries():
    import train_enwik8

    model = make_model()
    from x_transformers import AutoregressiveWrapper

    wrapper = AutoregressiveWrapper(model)
    x = torch.randint(0, TOKENS, (2, 9))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1], list(range(9))])
    loss = train_enwik8.lm_loss(wrapper, x, pos)
    # the same loss from the documents one by one, over the targets inside each document
    logits = torch.cat([model(d[None]) for d in x[0, :-1].split([3, 4, 1])], dim=1)
    logits = torch.cat((logits, model(x[1:, :-1])))
    target = x[:, 1:].masked_fill(pos[:, 1:] == 0, -100)
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_short_convolution_restarts_per_document(monkeypatch, use_kernel):
    # the shifted products (positions mask the taps) and the Triton kernel (cu_seqlens): each document convolved
    # from a zero window, as alone; documents shorter than the window included
    from x_transformers.mixers.base import ShortConvolution

    if use_kernel:
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    conv = ShortConvolution(8, size=4).double()
    conv.use_kernel = use_kernel
    lens = [[2, 1, 6], [5, 4]]
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    packing = build_packing(2, 9, "cpu", seq_lens=lens)
    out, cache = conv(x.reshape(1, 18, 8), pack=packing)
    solo = [conv(doc[None])[0] for doc in x.reshape(18, 8).split([2, 1, 6, 5, 4])]
    assert cache is None
    torch.testing.assert_close(out, torch.cat(solo, dim=1))
    with pytest.raises(ValueError, match="no cache"):
        conv(x.reshape(1, 18, 8), cache=torch.zeros(1, 3, 8, dtype=torch.float64), pack=packing)


def test_encoder_bidirectional_mixers_packed():
    # non-causal linear / based sum over the whole row: they keep the padded path, still exact
    for name in ("linear", "based"):
        assert not make_mixer(name, dim=DIM, heads=HEADS, causal=False).packs_by_cu_seqlens()
        assert make_mixer(name, dim=DIM, heads=HEADS).packs_by_cu_seqlens()
        check_packed_equals_separate(make_model(Encoder, linear_attn=name, hybrid_pattern="LN"), [LENS, LENS_ROW2])


def test_bad_packed_path_and_initial_state_refused(monkeypatch):
    from x_transformers.mixers.base import run_kernel
    from x_transformers.ops import chunk_simple_gla, fused_recurrent_simple_gla

    mixer = make_mixer("gla", dim=DIM, heads=HEADS)
    monkeypatch.setattr(mixer, "packed_path", "varlen")
    with pytest.raises(ValueError, match="packed_path must be"):
        mixer(torch.randn(1, 4, DIM), pack=build_packing(1, 4, "cpu", seq_lens=[1, 3]))
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="no initial_state"):
        run_kernel(chunk_simple_gla, fused_recurrent_simple_gla, q, q, q, None,
                   initial_state=torch.zeros(2, 2, 8, 8), pack=build_packing(1, 4, "cpu", seq_lens=[1, 3]))
