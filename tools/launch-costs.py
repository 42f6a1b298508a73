"""What a kernel launch, a graph-replayed kernel and a host sync cost on this machine (tools/gpu-check.sh runs it first).

The engines' figures are predicted from op counts (duplex.engine.opcount) times these costs, so they
are measured on the machine the figures come from: microseconds of host time per eager op (a tiny
in-place add, launched 2,000 times), of GPU time per kernel inside a CUDA graph (1,000 tiny adds
captured once, replayed), and per host sync (an empty synchronize, and a one-number copy to the host).
On the CPU only the eager op is measured.

    .venv/bin/python tools/launch-costs.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def eager_op_us(device: str, n: int = 2000) -> float:
    x = torch.zeros(16, device=device)
    for _ in range(100):
        x.add_(1.0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        x.add_(1.0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def graph_kernel_us(n: int = 1000, replays: int = 20) -> float:
    x = torch.zeros(16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            x.add_(1.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            x.add_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * n)


def sync_us(n: int = 1000) -> tuple[float, float]:
    x = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        torch.cuda.synchronize()
    empty = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    for _ in range(n):
        x.item()
    return empty, (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    figures: dict[str, float | None] = {"eager_op_us": round(eager_op_us(args.device), 2),
                                        "graph_kernel_us": None, "sync_us": None, "item_us": None}
    if args.device.startswith("cuda"):
        figures["graph_kernel_us"] = round(graph_kernel_us(), 2)
        empty, item = sync_us()
        figures["sync_us"], figures["item_us"] = round(empty, 2), round(item, 2)
    print(f"launch costs on {args.device}: " + ", ".join(f"{k} {v}" for k, v in figures.items() if v is not None))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
