"""Batched, static-shape model engines shared by the LLM and the TTS.

- :mod:`duplex.engine.decoder`: a lean forward of Llama-family decoder layers over slot KV buffers
  (one row per session, fixed shapes, per-row positions and masks);
- :mod:`duplex.engine.sampling`: sampling inside the step (temperature, top-k, top-p) with per-row,
  counter-based noise, so a session draws the same tokens alone or in any batch;
- :mod:`duplex.engine.graphs`: one CUDA graph per batch-size bucket over static buffers (eager on CPU);
- :mod:`duplex.engine.scheduler`: the asyncio scheduler that owns an engine's worker thread: rows
  stepped together (continuous batching), single-session jobs between steps, deadlines, failures
  isolated to the row that caused them.
"""
