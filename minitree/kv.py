"""Step 4: KV compaction. The accepted nodes' keys and values move from their tree slots to
contiguous slots right after the prefix, so the next step sees a plain prefix.
"""

from __future__ import annotations

import torch


def compact(caches: list[torch.Tensor], base: torch.Tensor, path: torch.Tensor) -> None:
    """Copy slot base + path[k] to slot base + k for k = 0..D, in every cache [layers, 2, 1, H, S, D].

    Gathering first (index_select makes a copy) makes overlapping source and destination
    safe; entries past the accepted length copy unaccepted slots onto unaccepted slots.
    """
    src = base + path
    dst = base + torch.arange(path.numel(), device=path.device)
    for cache in caches:
        cache.index_copy_(4, dst, cache.index_select(4, src))
