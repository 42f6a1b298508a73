"""What one VAD tick costs the host: our captured-ready step (``duplex.asr.silero.SileroStep``) against
Silero's TorchScript network called per tick as the VAD did before 2026-12-07, for 8 and 32 streams
with one window each, on one thread, with the kernels each launches (``duplex.engine.opcount``).

    .venv/bin/python tools/vad-step-cost.py [--device cpu] [--ticks 300]

On the CPU both run eagerly; on a GPU with graphs the step is one replay (run it there to compare).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from duplex.asr.silero import CONTEXT, WINDOW
from duplex.asr.vad import SileroVAD, silero_jit_path
from duplex.engine.opcount import count_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ticks", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    vad = SileroVAD(device=args.device, max_batch=64)
    jit = torch.jit.load(str(silero_jit_path()), map_location=args.device)._model.eval()
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for b in (8, 32):
        windows = [rng.standard_normal((1, CONTEXT + WINDOW)).astype(np.float32) * 0.1 for _ in range(b)]
        states = [torch.zeros(2, 128, device=args.device) for _ in range(b)]

        def torchscript() -> None:  # the tick as it was: stack the states, a call per window depth,
            # each stream's state after its last window gathered, one copy back
            x = torch.from_numpy(np.stack([w[0] for w in windows])[None]).to(args.device, non_blocking=True)
            h = torch.stack(states, dim=1)
            out, h2 = jit(x[0], h)
            final = torch.stack([h, h2])[torch.ones(b, dtype=torch.long, device=args.device), :,
                                         torch.arange(b, device=args.device)]
            torch.stack([out[:, 0]]).float().cpu().numpy()
            del final

        rows = [vad.net.rows.take() for _ in range(b)]
        requests = [(row, False, w, None) for row, w in zip(rows, windows)]

        def step() -> None:
            vad.net.run(requests)

        res = {}
        with torch.no_grad():
            for name, fn in (("torchscript", torchscript), ("step", step)):
                fn(), fn()
                sync()
                start = time.perf_counter()
                for _ in range(args.ticks):
                    fn()
                sync()
                res[name] = ((time.perf_counter() - start) / args.ticks * 1e3, sum(count_ops(fn).values()))
        (t_old, ops_old), (t_new, ops_new) = res["torchscript"], res["step"]
        print(f"{b} streams: TorchScript {t_old:.3f} ms/tick ({ops_old} ops), step {t_new:.3f} ms/tick "
              f"({ops_new} ops{', one replay' if vad.net.graphs.replays else ', eager'}): {t_new / t_old:.2f}x")
        for row in rows:
            vad.net.rows.give(row)


if __name__ == "__main__":
    main()
