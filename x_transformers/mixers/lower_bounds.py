"""Layer-wise learned lower bounds of the forget gates (HGRN, arXiv:2311.04823; HGRN2, arXiv:2404.07904).

One parameter `(num_layers, width)` for the whole stack; a softmax over the layers and its cumulative sum, shifted so
that the first layer's bound is exactly 0, give bounds that rise with depth towards 1:

    gamma = cumsum(softmax(P, dim=0), dim=0) - softmax(P, dim=0)[0],    lb_i = gamma[i]    (0 <= lb_i < 1)

Lower layers may forget fast (short-range mixing), upper ones are kept long-range. Each mixer built with
`lower_bound='learned'` takes its layer's bound, a tensor of its `gate_width`, as the `lower_bound` input:

    bounds = LayerLowerBounds(num_layers, mixer.gate_width)
    out = mixer(x, lower_bound=bounds(layer_index))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerLowerBounds(nn.Module):
    def __init__(self, num_layers: int, width: int):
        super().__init__()
        if num_layers < 1 or width < 1:
            raise ValueError(f"LayerLowerBounds needs num_layers >= 1 and width >= 1, got {num_layers}, {width}")
        self.num_layers = num_layers
        self.width = width
        # equal logits: the bounds start evenly spread, layer i at i / num_layers
        self.logits = nn.Parameter(torch.zeros(num_layers, width))

    def all_bounds(self) -> Tensor:
        """(num_layers, width): every layer's bound, the first row exactly 0. Computed in fp32 at least: the
        differences between the deep layers' bounds near 1 would vanish in half precision."""
        logits = self.logits.to(torch.promote_types(self.logits.dtype, torch.float32))
        probs = logits.softmax(dim=0)
        return probs.cumsum(dim=0) - probs[:1]

    def forward(self, layer: int) -> Tensor:
        """Layer `layer`'s bound (width,)."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"LayerLowerBounds: layer {layer} out of range for {self.num_layers} layers")
        return self.all_bounds()[layer]
