"""Linear-attention and RNN token mixers, one file each, built on `x_transformers.ops`.

`make_mixer(name, dim=..., heads=..., causal=...)` is what `AttentionLayers(linear_attn=name, linear_attn_*=...)`
calls; every mixer has `Attention`'s call contract inside the layer stack (see `mixers/base.py`).
"""

from __future__ import annotations

import inspect

from x_transformers.mixers.base import Mixer, ShortConvolution

MIXERS = {
    "linear": ("x_transformers.mixers.linear", "LinearAttention"),
    "retnet": ("x_transformers.mixers.retnet", "RetNet"),
    "lightning": ("x_transformers.mixers.lightning", "Lightning"),
    "gla": ("x_transformers.mixers.gla", "GLA"),
    "hgrn2": ("x_transformers.mixers.hgrn2", "HGRN2"),
    "deltanet": ("x_transformers.mixers.deltanet", "DeltaNet"),
    "gated_deltanet": ("x_transformers.mixers.gated_deltanet", "GatedDeltaNet"),
    "kda": ("x_transformers.mixers.kda", "KDA"),
    "mamba2": ("x_transformers.mixers.mamba2", "Mamba2"),
    "mingru": ("x_transformers.mixers.mingru", "MinGRU"),
    "hgrn": ("x_transformers.mixers.hgrn", "HGRN"),
    "rwkv6": ("x_transformers.mixers.rwkv6", "RWKV6"),
    "based": ("x_transformers.mixers.based", "Based"),
    "gateloop": ("x_transformers.mixers.gateloop", "GateLoop"),
    "rwkv7": ("x_transformers.mixers.rwkv7", "RWKV7"),
    "gated_deltaproduct": ("x_transformers.mixers.gated_deltaproduct", "GatedDeltaProduct"),
    "comba": ("x_transformers.mixers.comba", "Comba"),
    "gtu": ("x_transformers.mixers.gtu", "GTU"),
}


def mixer_class(name: str):
    if name not in MIXERS:
        raise ValueError(f"unknown linear_attn {name!r}; choose one of {sorted(MIXERS)}")
    module, cls = MIXERS[name]
    return getattr(__import__(module, fromlist=[cls]), cls)


def make_mixer(name: str, *, dim: int, heads: int, causal: bool = True, **kwargs) -> Mixer:
    """Build the mixer `name`; unknown kwargs raise an error that names them and lists the accepted ones."""
    cls = mixer_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "dim", "heads", "causal"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"linear_attn={name!r} got unknown kwargs {unknown} (passed as linear_attn_<name>); "
            f"it accepts {sorted(accepted)}"
        )
    return cls(dim, heads, causal, **kwargs)


__all__ = ["MIXERS", "Mixer", "ShortConvolution", "make_mixer", "mixer_class"]
