"""How close a step comes to the memory-bandwidth floor: the bytes it must read once, over the time it took.

A decode step (LLM token, TTS frame) reads every weight once and each row's K/V once; at small batch
nothing else matters, so ``bytes / bandwidth`` is the fastest the step can be. Benchmarks print the
fraction of that floor each batch reaches beside its timings. The bandwidth is measured here, once
per device, with a large device-to-device copy (bytes read plus bytes written), as the GPU's own
ceiling; on the CPU the benchmarks report no fraction.
"""

from __future__ import annotations

import functools
from typing import Any


def weight_bytes(*modules: Any) -> int:
    """Bytes of the parameters of ``modules`` (shared ones counted once)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            key = p.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += p.untyped_storage().nbytes()
    return total


@functools.cache
def bandwidth(device: str) -> float | None:
    """Bytes per second a large copy moves on ``device`` (read plus write; None off CUDA)."""
    if not device.startswith("cuda"):
        return None
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)  # 1 GiB: far past the L2
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / seconds


def floor_fraction(step_bytes: int, step_s: float, device: str) -> float | None:
    """The fraction of the bandwidth floor a step of ``step_bytes`` reached in ``step_s`` (None off CUDA)."""
    bw = bandwidth(device)
    if bw is None or step_s <= 0:
        return None
    return round(step_bytes / bw / step_s, 4)
