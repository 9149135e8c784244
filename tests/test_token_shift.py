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


def test_shift_tail_continues_the_sequence():
    # a decode step given the tail of the inputs before it shifts in what the whole sequence would
    from x_transformers.token_shift import shift_tail

    fn = ShiftTokens((0, 1, 2), torch.nn.Identity())
    x = torch.randn(2, 7, 6)
    mask = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])
    whole = fn(x, shift_mask=mask)
    tail = shift_tail(x[:, :4], 2, mask=mask[:, :4])
    assert tail.shape == (2, 2, 6)
    steps = []
    for t in range(4, 7):
        steps.append(fn(x[:, t : t + 1], shift_mask=mask[:, : t + 1], shift_tail=tail))
        tail = shift_tail(x[:, t : t + 1], 2, mask=mask[:, : t + 1], prev_tail=tail)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole[:, 4:])
    # the first tokens' tail is padded with zeros; masked inputs enter it as zeros
    assert (shift_tail(x[:, :1], 2)[:, 0] == 0).all()
    assert (shift_tail(x[:, :2], 2, mask=mask[:, :2])[0] == 0).all()


def test_shift_mask_covers_blocks_without_a_mask_kwarg():
    record = Record()
    x = torch.ones(1, 3, 2)
    out = ShiftTokens((0, 1), record)(x, shift_mask=torch.tensor([[False, True, True]]))
    assert out[0, :, 1].tolist() == [0.0, 0.0, 1.0]
    assert "shift_mask" not in record.seen[1]
