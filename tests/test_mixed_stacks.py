"""Mixed stacks: a different linear-attention mixer per layer (`linear_attn` as a tuple, or a `hybrid_pattern` with a
`hybrid_legend`), softmax attention where the entry is None / 'N'."""

import pytest
import torch

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper
from x_transformers.cache import StaticCache


def build(**kwargs):
    return TransformerWrapper(
        num_tokens=40, max_seq_len=64, attn_layers=Decoder(dim=32, depth=4, heads=2, **kwargs)
    ).eval()


def mixer_names(net):
    return [getattr(block, "name", "softmax") for (_, block, _), t in zip(net.attn_layers.layers, net.attn_layers.layer_types)
            if t in ("a", "l")]


def test_tuple_places_one_mixer_per_block_and_tiles():
    assert mixer_names(build(linear_attn=("gated_deltanet", "kda", "mamba2", None))) == [
        "gated_deltanet", "kda", "mamba2", "softmax"]
    assert mixer_names(build(linear_attn=("gla", None))) == ["gla", "softmax", "gla", "softmax"]


def test_pattern_with_legend():
    net = build(hybrid_pattern="GLN", hybrid_legend=dict(G="gla"), linear_attn="hgrn2")
    assert mixer_names(net) == ["gla", "hgrn2", "softmax", "gla"]


def test_shared_mixer_kwargs_go_to_the_mixers_that_take_them():
    # expand_v is a GLA / gated DeltaNet keyword; hgrn takes none of it
    from x_transformers.mixers import make_mixer

    net = build(linear_attn=("gla", "hgrn"), linear_attn_expand_v=2.0)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(net.attn_layers.layers[0][1]) == shapes(make_mixer("gla", dim=32, heads=2, expand_v=2.0))
    assert shapes(net.attn_layers.layers[2][1]) == shapes(make_mixer("hgrn", dim=32, heads=2))
    with pytest.raises(ValueError, match="no mixer of"):
        build(linear_attn=("gla", "hgrn"), linear_attn_nonsense=1)


@pytest.mark.parametrize("kwargs", [
    dict(linear_attn=("gated_deltanet", "mamba2", None)),
    dict(hybrid_pattern="RGN", hybrid_legend=dict(R="rwkv6", G="gla"), rotary_pos_emb=True, shift_tokens=1),
])
def test_mixed_stack_decodes_like_its_parallel_forward(kwargs):
    torch.manual_seed(0)
    net = build(**kwargs)
    x = torch.randint(0, 40, (2, 20))
    cache = StaticCache(2, 32)
    stepped = torch.cat([net(x[:, :17], cache=cache)] + [net(x[:, t : t + 1], cache=cache) for t in range(17, 20)], 1)
    torch.testing.assert_close(stepped, net(x), atol=1e-5, rtol=1e-5)

    model = AutoregressiveWrapper(net)
    expected = model.generate(x[:, :5], 6, temperature=0.0, cache_kv=False)
    assert torch.equal(model.generate(x[:, :5], 6, temperature=0.0, fast_decode=False), expected)
    assert torch.equal(model.generate(x[:, :5], 6, temperature=0.0, fast_decode="eager"), expected)


def test_mixed_stack_errors():
    with pytest.raises(ValueError, match="no mixer"):
        build(linear_attn=(None, None))
    with pytest.raises(ValueError, match="places the mixers itself"):
        build(linear_attn=("gla", None), hybrid_pattern="LN")
    with pytest.raises(ValueError, match="does not name"):
        build(hybrid_pattern="GX", hybrid_legend=dict(G="gla"))
    with pytest.raises(ValueError, match="hybrid_pattern"):
        build(hybrid_legend=dict(G="gla"))
    with pytest.raises(ValueError, match="unknown linear_attn"):
        build(linear_attn=("gla", "nope"))
