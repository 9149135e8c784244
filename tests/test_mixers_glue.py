"""Mixer outputs, gradients, padded outputs and decode states stay pinned while their PyTorch glue is rewritten.

tests/fixtures/mixers/glue.pt holds the mixers' fp32 CPU outputs as they stood before their PyTorch glue was
rewritten. Regenerate it only on purpose, for a change that is meant to alter the numbers:

    python tests/test_mixers_glue.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from x_transformers.mixers import make_mixer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mixers" / "glue.pt"
DIM, HEADS, BATCH, SEQ, PROMPT, PAD = 32, 2, 2, 21, 5, 3

# (case name, mixer name, kwargs): every mixer's defaults plus the branches its glue takes
CASES = [
    ("linear", "linear", {}),
    ("linear_softmax_conv", "linear", dict(feature_map="softmax", use_short_conv=True)),
    ("linear_bidirectional", "linear", dict(causal=False)),
    ("retnet", "retnet", {}),
    ("retnet_no_rotary", "retnet", dict(rotary=False)),
    ("lightning", "lightning", {}),
    ("gla", "gla", {}),
    ("gla_conv", "gla", dict(use_short_conv=True)),
    ("hgrn2", "hgrn2", {}),
    ("hgrn2_lower_bound", "hgrn2", dict(lower_bound=0.3, output_gate="sigmoid")),
    ("deltanet", "deltanet", {}),
    ("deltanet_no_conv", "deltanet", dict(use_short_conv=False, output_gate="swish")),
    ("gated_deltanet", "gated_deltanet", {}),
    ("gated_deltanet_plain_out", "gated_deltanet", dict(output_norm=False, output_gate=None, conv_size=2)),
    ("mamba2", "mamba2", dict(d_state=8)),
    ("mingru", "mingru", {}),
    ("mingru_expanded", "mingru", dict(expansion_factor=1.5)),
    ("hgrn", "hgrn", {}),
    ("hgrn_lower_bound", "hgrn", dict(lower_bound=0.3)),
    ("rwkv6", "rwkv6", {}),
    ("based", "based", {}),
    ("based_bidirectional", "based", dict(causal=False)),
    ("gateloop", "gateloop", {}),
]


def build(name, kwargs):
    kwargs = dict(kwargs)
    causal = kwargs.pop("causal", True)
    torch.manual_seed(0)
    mixer = make_mixer(name, dim=DIM, heads=HEADS, causal=causal, **kwargs).eval()
    # move every parameter off its init (some start at zero or one) so each path carries a gradient
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, DIM, generator=gen)
    pad = torch.randn(BATCH, PAD, DIM, generator=gen)
    weight = torch.randn(BATCH, SEQ, DIM, generator=gen)
    return x, pad, weight


def run(mixer):
    """Everything the fixture pins for one mixer."""
    x, pad, weight = inputs()
    x = x.clone().requires_grad_()
    out = mixer(x)
    (out * weight).sum().backward()
    result = dict(out=out.detach(), dx=x.grad)
    result.update({f"grad.{n}": p.grad for n, p in mixer.named_parameters()})
    mixer.zero_grad(set_to_none=True)

    with torch.no_grad():
        x = x.detach()
        # left padding, second row only
        padded = torch.cat((pad, x), dim=1)
        mask = torch.ones(BATCH, PAD + SEQ, dtype=torch.bool)
        mask[1, :PAD] = False
        result["padded_out"] = mixer(padded, mask=mask)

        if mixer.causal:
            out, cache = mixer(x[:, :PROMPT], return_intermediates=True)
            steps = [out]
            for t in range(PROMPT, PROMPT + 4):
                out, cache = mixer(x[:, t : t + 1], cache=cache, return_intermediates=True)
                steps.append(out)
            result["stepped_out"] = torch.cat(steps, dim=1)
            for i, s in enumerate(cache.recurrent_state):
                result[f"state.{i}"] = s
    return result


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_mixer_matches_pre_rewrite_fixture(case, fixture):
    _, name, kwargs = next(c for c in CASES if c[0] == case)
    mixer = build(name, kwargs)
    mixer.load_state_dict(fixture[case]["state_dict"], strict=True)
    expected = fixture[case]["result"]
    got = run(mixer)
    assert sorted(got) == sorted(expected)
    for key, ref in expected.items():
        if ref is None:
            assert got[key] is None, key
            continue
        assert got[key].dtype == ref.dtype and got[key].shape == ref.shape, key
        assert rel_err(got[key], ref) < 1e-5, f"{case}: {key} moved by {rel_err(got[key], ref):.2e}"


def write_fixture():
    data = {}
    for case, name, kwargs in CASES:
        mixer = build(name, kwargs)
        data[case] = dict(state_dict=mixer.state_dict(), result=run(mixer))
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, FIXTURE)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1024:.0f} KiB, {len(data)} cases)")


if __name__ == "__main__":
    write_fixture()


# the glue helpers on their own


def test_l2_normalize_matches_f_normalize_with_gradients():
    from x_transformers.mixers.base import l2_normalize

    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: l2_normalize(t), (x,))
    # a zero row (padding) takes F.normalize's eps clamp, the same finite gradient
    x.data[0, 0, 0] = 0.0
    w = torch.randn_like(x)
    (l2_normalize(x) * w).sum().backward()
    dx, x.grad = x.grad, None
    (torch.nn.functional.normalize(x, dim=-1) * w).sum().backward()
    torch.testing.assert_close(dx, x.grad)


def test_short_convolution_matches_shifted_products_and_caches():
    from x_transformers.mixers.base import ShortConvolution

    torch.manual_seed(0)
    conv = ShortConvolution(6, size=4)
    x = torch.randn(2, 9, 6)
    weight = conv.conv.weight[:, 0]  # (d, k)
    padded = torch.nn.functional.pad(x, (0, 0, 3, 0))
    ref = torch.nn.functional.silu(sum(padded[:, i : i + 9] * weight[:, i] for i in range(4)))
    out, cache = conv(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(cache, x[:, -3:])
    # the kernel path (ops.causal_conv1d: Triton on CUDA / under TRITON_INTERPRET=1) and the shifted products agree,
    # gradients, caches and decoding from a cache too
    xs = x.clone().requires_grad_()
    results = []
    for use_kernel in (True, False):
        conv.use_kernel = use_kernel
        out, cache = conv(xs)
        step, step_cache = conv(xs[:, 7:], cache=xs[:, 4:7].detach())
        grads = torch.autograd.grad((out.square().sum() + step.sum()), (xs, conv.conv.weight))
        results.append((out, cache, step, step_cache, *grads))
    conv.use_kernel = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)

    # two tokens with a cache of the past three inputs continue the sequence; a short prompt pads its cache
    out2, cache2 = conv(x[:, 7:], cache=x[:, 4:7])
    torch.testing.assert_close(out2, ref[:, 7:])
    torch.testing.assert_close(cache2, x[:, -3:])
    _, short = conv(x[:, :1])
    assert short.shape == (2, 3, 6) and short[:, :2].abs().sum() == 0


def test_rms_norm_stays_in_the_activation_dtype_under_autocast():
    from x_transformers.mixers.base import rms_norm

    x = torch.randn(3, 16, dtype=torch.bfloat16)
    weight = torch.rand(16) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.rms_norm(x.float(), (16,), weight, 1e-5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["gated_deltanet", "retnet", "mamba2", "hgrn2", "hgrn", "gla"])
def test_bf16_autocast_close_to_fp32_and_decodes(name):
    mixer = build(name, {})
    x = inputs()[0]
    ref = mixer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(x)
        # decoding under autocast keeps one state structure and dtype from step to step
        _, cache = mixer(x[:, :PROMPT], return_intermediates=True)
        _, cache2 = mixer(x[:, PROMPT : PROMPT + 1], cache=cache, return_intermediates=True)
    assert rel_err(out.float(), ref) < 3e-2
    for a, b in zip(cache.recurrent_state, cache2.recurrent_state):
        assert (a is None) == (b is None)
        assert a is None or (a.shape == b.shape and a.dtype == b.dtype)
