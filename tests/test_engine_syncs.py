"""Host syncs per engine tick, counted on the CPU where a GPU would pay them.

Each sync stops the host until the GPU has drained its queue, so the next tick cannot be launched
while this one runs. Over a real conversation on the tiny profile (every stage the real code), with
each engine stepping as its captured graph would (``graphs.rehearse``), a *step tick* (rows stepping,
no job) may wait for the GPU once: the LLM copies its sampled ids, the ASR its labels (a tick
that only gathers audio for an unfinished chunk copies nothing); the TTS its codes and their audio
together (the frame step decodes its frame, and a frame that ends the segment is told on the device);
the VAD its windows' probabilities and peeks (each session's recurrent state stays on the device).
Jobs (prefills, scores) are eager and are not counted here.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict

import pytest

from duplex.agent import Agent
from duplex.config import AgentConfig
from duplex.e2e import _schedulers, apply_bench_settings, conversation_script
from duplex.scenario import run_scenario
from tests.graph_safety import HostSyncs

BUDGET = {"vad": 1, "llm": 1, "asr": 1, "tts": 1}  # host syncs per step tick
# (the ASR's: one more on a tick whose chunk emitted more labels than its captured step's label steps
# make room for, decoded again by its second captured step; StreamingASR.redecoded counts them. The
# VAD's: one per pass of up to silero.CATCH_UP windows a stream, so one more per second of audio a
# stream fell behind, which a loaded machine can make happen)


@pytest.fixture(scope="module")
def syncs_per_tick() -> dict[str, list[tuple[int, int]]]:
    """Host syncs of every step tick of each engine over one spoken turn and its answer, each with the
    extra syncs it may make: the chunks the tick decoded again (the ASR's), its passes beyond the first
    (the VAD's, behind by more than a pass holds), 0 for the others."""
    found: dict[str, list[tuple[int, int]]] = defaultdict(list)

    async def main() -> None:
        config = AgentConfig(profile="tiny", device="cpu")
        apply_bench_settings(config, quick=True)
        agent = await Agent.load(config)
        for role in ("llm", "tts"):
            model = getattr(agent.stages, role)
            model.engine.graphs.rehearse = True
            model.scheduler.ahead = model.run_ahead.hooks  # their steps run ahead, as on a GPU
        asr = agent.stages.asr
        asr.graphs.rehearse = True
        net, passes = agent.stages.vad.net, [0]
        one_pass = net._pass

        def counted_pass(*args, **kwargs):
            passes[0] += 1
            return one_pass(*args, **kwargs)

        net._pass = counted_pass
        for role, scheduler in _schedulers(agent.stages).items():
            def counted(plan, _tick=scheduler._tick, _role=role):
                if plan.urgent or plan.batches or plan.jobs or not plan.rows:
                    return _tick(plan)
                assert threading.current_thread() is not threading.main_thread()
                before, passes_before = asr.redecoded, passes[0]  # (only the VAD's ticks make passes)
                with HostSyncs() as syncs:
                    out = _tick(plan)
                extra = {"asr": asr.redecoded - before, "vad": max(0, passes[0] - passes_before - 1)}.get(_role, 0)
                found[_role].append((len(syncs.counts), extra))
                return out

            scheduler._tick = counted
        try:
            await run_scenario(agent.session(), conversation_script(quick=True))
        finally:
            await agent.aclose()

    asyncio.run(main())
    return found


@pytest.mark.parametrize("role", sorted(BUDGET))
def test_a_step_tick_waits_for_the_gpu_at_most_its_budget(syncs_per_tick, role):
    """Every step tick of the engine stays within its budget of host syncs (the ASR's one more where the
    tick decoded a chunk again, the VAD's one more per pass beyond its first), and there were many."""
    found = syncs_per_tick[role]
    assert len(found) >= 5, f"the conversation made only {len(found)} {role} step ticks"
    if role == "asr":  # a session's first chunk runs eagerly (its shapes differ): the steady ones count
        first = next(i for i, (n, _) in enumerate(found) if n > 0)
        found = found[first + 1:]
    assert all(n <= BUDGET[role] + extra for n, extra in found), (role, found)
    assert role == "vad" or all(extra <= 1 for _, extra in found), (role, found)
    assert sum(n - extra == 1 for n, extra in found) >= 3, (role, found)  # the counter sees the copy a tick makes
