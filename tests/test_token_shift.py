"""Token shifting and axial folding."""

import pytest
import torch

from x_transformers.token_shift import FoldAxially, ShiftTokens, shift


class Record(torch.nn.Module):
    def forward(self, t, **kwargs):
        self.seen = (t, kwargs)
        return t


def test_shift_moves_along_sequence_and_zero_fills():
    t = torch.arange(1.0, 5.0)[None, :, None]  # (1, 4, 1)
    assert shift(t, 1)[0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert shift(t, -1)[0, :, 0].tolist() == [2.0, 3.0, 4.0, 0.0]
    assert shift(t, 0) is t
    assert (shift(t, 10) == 0).all() and (shift(t, -10) == 0).all()


def test_shift_does_not_leak_padding():
    t = torch.ones(1, 4, 1)
    mask = torch.tensor([[True, False, True, True]])
    assert shift(t, 1, mask=mask)[0, :, 0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_shift_tokens_splits_features_and_passes_kwargs():
    record = Record()
    x = torch.randn(2, 5, 7)  # 7 features over 3 shifts: chunks of 2, 2, 2, and a rest of 1
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = ShiftTokens((0, 1, -1), record)(x, mask=mask)
    torch.testing.assert_close(out[..., :2], x[..., :2])
    torch.testing.assert_close(out[:, 1:, 2:4], x[:, :-1, 2:4])
    torch.testing.assert_close(out[:, :-1, 4:6], x[:, 1:, 4:6])
    torch.testing.assert_close(out[..., 6:], x[..., 6:])
    assert record.seen[1]["mask"] is mask


@pytest.mark.parametrize("seq_len", (6, 7))
def test_fold_axially_runs_fn_on_interleaved_subsequences(seq_len):
    # a causal cumulative sum, folded by 3, sums every third position
    cumsum = FoldAxially(3, torch.nn.Identity())
    cumsum.fn = type("CumSum", (torch.nn.Module,), dict(forward=lambda self, t: (t.cumsum(dim=1), "aux")))()
    x = torch.randn(2, seq_len, 4)
    out, aux = cumsum(x)
    assert out.shape == x.shape and aux == "aux"
    for p in range(seq_len):
        torch.testing.assert_close(out[:, p], x[:, p % 3 :: 3][:, : p // 3 + 1].sum(dim=1))
    plain = FoldAxially(1, torch.nn.Identity())
    assert plain(x) is x
