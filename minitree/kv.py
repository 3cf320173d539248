"""Step 4: KV compaction. The accepted nodes' keys and values move from their tree slots to
contiguous slots right after the prefix, so the next step sees a plain prefix.
"""

from __future__ import annotations

import torch


def compact(cache: torch.Tensor, base: torch.Tensor, src: torch.Tensor) -> None:
    """Copy slot base + src[k] to slot base + k for k = 0..D in a cache [layers, 2, 1, H, S, D].

    The target passes the accepted path (a node's slot offset is its index), the draft the
    path's draft rows. Gathering first (index_select makes a copy) makes overlapping source
    and destination safe; entries past the accepted length copy junk onto unaccepted slots.
    """
    dst = base + torch.arange(src.numel(), device=src.device)
    cache.index_copy_(4, dst, cache.index_select(4, base + src))
