"""What the LLM decode step's length buckets save: the step of young dialogues (each row holding
~100 positions) over the 256-position bucket against the same step over the whole 2,048-token window,
for batches 1, 8 and 32, with a model of Qwen2.5-1.5B's layer geometry (hidden 1536, 12 query and 2
K/V heads of 128, MLP 8960; random weights, ``--layers`` of them, a small vocabulary) and the bytes
each must read (weights, and per row the K/V that attention reads).

    .venv/bin/python tools/llm-length-cost.py [--device cpu] [--layers 2] [--steps 20]

On the CPU the steps run eagerly, as there; on a GPU with ``--graphs`` each bucket is captured.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--graphs", action="store_true", help="capture each bucket (CUDA)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, Qwen2Config

    from duplex.llm.engine import DecodeRequest, Draw, Engine
    from duplex.llm.tiny import build_tokenizer

    tokenizer = build_tokenizer("qwen2")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=args.window * 2, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device)
    engine = Engine(model, tokenizer, args.device, window=args.window, slots=32, graphs=args.graphs)
    engine.capture()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"# {args.layers} layers of Qwen2.5-1.5B's geometry, {dtype}, {args.device}, torch {torch.__version__}, "
          f"window {args.window}, length buckets {engine.graphs.lengths}, graphs {engine.graphs.captured}")
    slots = [engine.new_slot() for _ in range(32)]
    g = torch.Generator().manual_seed(0)
    for slot in slots:
        engine.prefill(slot, torch.randint(0, engine.vocab, (100,), generator=g).tolist())
    whole = engine.graphs.lengths
    for b in (1, 8, 32):
        requests = [DecodeRequest(slot, 5, Draw(0.0, 1.0, 0, 1)) for slot in slots[:b]]
        times = {}
        for name, lengths in (("bucket", whole), ("whole window", (engine.kv.columns,))):
            engine.graphs.lengths = lengths
            engine.decode(requests)  # warm
            samples = []
            for _ in range(args.steps):
                sync()
                start = time.perf_counter()
                engine.decode(requests)
                sync()
                samples.append(time.perf_counter() - start)
            times[name] = (statistics.median(samples), engine.graphs.last[1])
        engine.graphs.lengths = whole
        (bucket_s, bucket_n), (whole_s, whole_n) = times["bucket"], times["whole window"]
        layers = engine.step_bytes(b, 0)  # weights only
        kv_bytes = lambda n: b * engine.kv.slot_nbytes() * n // engine.kv.columns  # noqa: E731
        # attention reads each row's K/V over the length once (the step's rows are 0..b-1: a view)
        print(f"batch {b:>2}: step over {bucket_n} positions {bucket_s * 1e3:.2f} ms, over {whole_n} "
              f"{whole_s * 1e3:.2f} ms (x{whole_s / bucket_s:.2f}); bytes moved per step "
              f"{(layers + kv_bytes(bucket_n)) / 1e6:.0f} MB vs {(layers + kv_bytes(whole_n)) / 1e6:.0f} MB "
              f"(x{(layers + kv_bytes(whole_n)) / (layers + kv_bytes(bucket_n)):.2f})", flush=True)


if __name__ == "__main__":
    main()
