"""Model worker threads: where model compute runs, off the event loop.

One worker per model on a device. :class:`ModelWorker` runs jobs one at a time in order on its own
thread; :class:`BatchWorker` additionally gathers the requests that are waiting from all sessions and
runs them as one batched step. On CUDA each worker thread issues its work on its own stream, so the
ASR, LLM and TTS workers overlap on one GPU instead of queueing behind each other.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")
In = TypeVar("In")
Out = TypeVar("Out")


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


class BatchWorker(Generic[In, Out]):
    """Batches the requests of many sessions into one step on a :class:`ModelWorker` thread.

    ``step`` takes the waiting requests (at most ``max_batch``) and returns one result per request,
    in order. Requests that arrive while a step runs form the next batch. A request whose caller was
    cancelled while waiting is dropped before the step.
    """

    def __init__(self, name: str, step: Callable[[Sequence[In]], Sequence[Out]], *, device: str = "cpu",
                 max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.worker = ModelWorker(name, device)
        self._step = step
        self.max_batch = max_batch
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batch_sizes: list[int] = []  # one entry per step, for benchmarks and tests

    async def submit(self, request: In) -> Out:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._start(loop)
        future: asyncio.Future[Out] = loop.create_future()
        self._pending.append((request, future))
        assert self._wake is not None
        self._wake.set()
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending = []
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._dispatch(), name=f"batch-{self.worker.name}")

    async def _dispatch(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                live = [(r, f) for r, f in self._pending if not f.done()]
                batch, self._pending = live[: self.max_batch], live[self.max_batch :]
                if not batch:
                    break
                self.batch_sizes.append(len(batch))
                try:
                    results = await self.worker.run(self._step, [r for r, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"{self.worker.name}: step returned {len(results)} results "
                                           f"for {len(batch)} requests")
                except asyncio.CancelledError:
                    for _, f in batch:
                        f.cancel()
                    raise
                except Exception as exc:  # the failure belongs to the callers, not to this loop
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(exc)
                    continue
                for (_, f), result in zip(batch, results):
                    if not f.done():
                        f.set_result(result)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.worker.close()
