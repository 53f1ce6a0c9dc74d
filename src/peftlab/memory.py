"""Peak memory of this process: CUDA's max allocated on a GPU, the resident set size on CPU.

The RSS peak (``ru_maxrss``) never goes down within a process, so comparisons of methods run
each method in its own process (``peftlab compare`` does).
"""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory(device: torch.device | str) -> dict:
    """``{"kind": "cuda_max_allocated" | "process_rss", "bytes": N}`` for the given device."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": "process_rss", "bytes": int(rss if sys.platform == "darwin" else rss * 1024)}  # Linux: KiB
