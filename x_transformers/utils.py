"""Small helpers shared by every module of the package."""

from __future__ import annotations

from functools import wraps

import torch
import torch.nn.functional as F
from torch import Tensor


def exists(val):
    return val is not None


def default(val, d):
    if exists(val):
        return val
    return d() if callable(d) else d


def first(it, default=None):
    return it[0] if len(it) > 0 else default


def is_empty(x):
    return len(x) == 0


def cast_tuple(val, depth=1):
    return val if isinstance(val, tuple) else (val,) * depth


def divisible_by(num, den):
    return (num % den) == 0


def at_most_one_of(*bools):
    return sum(map(int, bools)) <= 1


def compact(arr):
    return [x for x in arr if exists(x)]


def identity(t, *args, **kwargs):
    return t


def maybe(fn):
    """Wrap `fn` so that it passes `None` straight through."""

    @wraps(fn)
    def inner(x, *args, **kwargs):
        if not exists(x):
            return x
        return fn(x, *args, **kwargs)

    return inner


def once(fn):
    called = False

    @wraps(fn)
    def inner(*args, **kwargs):
        nonlocal called
        if called:
            return None
        called = True
        return fn(*args, **kwargs)

    return inner


# kwarg routing - `attn_`, `ff_`, `cross_attn_` prefixes, as x-transformers does it


def pick_and_pop(keys, d):
    values = [d.pop(key) for key in keys]
    return dict(zip(keys, values))


def group_dict_by_key(cond, d):
    matched, rest = {}, {}
    for key, value in d.items():
        (matched if cond(key) else rest)[key] = value
    return matched, rest


def string_begins_with(prefix, s):
    return s.startswith(prefix)


def group_by_key_prefix(prefix, d):
    return group_dict_by_key(lambda key: key.startswith(prefix), d)


def groupby_prefix_and_trim(prefix, d):
    """Split `d` into (kwargs that start with `prefix`, with it stripped) and (everything else)."""
    with_prefix, rest = group_by_key_prefix(prefix, d)
    trimmed = {key[len(prefix):]: value for key, value in with_prefix.items()}
    return trimmed, rest


# tensor helpers


def max_neg_value(tensor: Tensor):
    return -torch.finfo(tensor.dtype).max


def log(t: Tensor, eps=1e-20):
    return t.clamp(min=eps).log()


def l2norm(t: Tensor, groups=1):
    if groups == 1:
        return F.normalize(t, p=2, dim=-1)
    *rest, d = t.shape
    t = t.reshape(*rest, groups, d // groups)
    t = F.normalize(t, p=2, dim=-1)
    return t.reshape(*rest, d)


def softclamp(t: Tensor, value: float):
    return (t / value).tanh() * value


def pad_at_dim(t: Tensor, pad: tuple[int, int], dim=-1, value=0.0):
    if pad == (0, 0):
        return t
    dims_from_right = (-dim - 1) if dim < 0 else (t.ndim - dim - 1)
    zeros = (0, 0) * dims_from_right
    return F.pad(t, (*zeros, *pad), value=value)


def masked_mean(t: Tensor, mask: Tensor | None = None, dim=1):
    if not exists(mask):
        return t.mean(dim=dim)
    dims_append = (1,) * (t.ndim - mask.ndim)
    mask = mask.reshape(*mask.shape, *dims_append)
    num = (t * mask).sum(dim=dim)
    den = mask.sum(dim=dim).clamp(min=1.0)
    return num / den
