"""Model worker threads: where model compute runs, off the event loop.

One worker per model on a device. :class:`ModelWorker` runs jobs one at a time in order on its own
thread; an engine's :class:`~duplex.engine.scheduler.Scheduler` drives one, running a batched step
for every session that needs one and single-session jobs between steps. On CUDA each worker thread
issues its work on its own stream, so the ASR, LLM and TTS workers overlap on one GPU instead of
queueing behind each other.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def configure_torch(device: str) -> None:
    """Process-wide torch settings for running models on ``device`` (idempotent)."""
    if device.startswith("cuda"):
        import torch

        # cuDNN's attention plans its graph per shape on the host (~1.7 ms per call, measured on an
        # H100): with a KV length that changes at every decode step, that dominated LLM and TTS
        # steps. Flash / memory-efficient SDPA need no planning.
        torch.backends.cuda.enable_cudnn_sdp(False)


def _init_thread(device: str) -> None:
    import torch

    torch.set_grad_enabled(False)
    if device.startswith("cuda"):
        configure_torch(device)
        index = torch.device(device).index  # "cuda" has none: set_device() refuses it
        torch.cuda.set_device(torch.cuda.current_device() if index is None else index)
        # The current stream is per thread: this worker's kernels go on a stream of their own.
        torch.cuda.set_stream(torch.cuda.Stream())


class ModelWorker:
    """A single thread that runs one model's jobs in order."""

    def __init__(self, name: str, device: str = "cpu") -> None:
        self.name = name
        self.device = device
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"duplex-{name}", initializer=_init_thread, initargs=(device,)
        )

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the worker thread and await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
