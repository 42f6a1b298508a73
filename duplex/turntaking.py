"""``duplex bench turns``: turn-taking over scripted scenarios of real and synthetic speech.

Scenarios (the user's side; ground truth from the script itself):

- ``jfk``: JFK's 11 s sentence, one utterance whose phrases are separated by 0.7-1 s pauses the agent
  must not talk into;
- ``question``: a complete question (espeak-ng);
- ``pause``: a sentence with a 0.9 s mid-sentence pause; ``um``: one with "um" / "uh" hesitations
  and pauses;
- ``backchannel``: a question, then "yeah" while the agent speaks (it should talk on);
- ``interrupt``: a question, then a real interruption while the agent speaks (it should stop);
- ``noise``: a question, then a 150 ms noise burst (a cough) while the agent speaks (it should go on);
- ``backchannel-led-interrupt``: a question, then "yeah but wait stop that" over the agent in one
  breath (the check of "yeah" says backchannel before the words grow: the words after it must stop it);
- ``backchannel-led-interrupt-comma``: the same with a 120 ms pause after "yeah" (shorter than the
  VAD's hangover).

Speech with known text comes from espeak-ng; without it every such piece is replaced by a cut of JFK's
speech (other audio, other figures): the run says so loudly and ``turns.json`` records it
(``espeak_ng: false`` and the substituted pieces).

With the fake stages (``--profile fake``) every scenario runs under each end-of-turn estimate: ``right``
(0.97 once the user's utterance is complete, 0.05 before), ``wrong`` (0.97 throughout: confident and
wrong mid-utterance), ``low`` (0.3 throughout: wrong but below the threshold) and ``absent`` (no
estimate); the fake ASR recognises the script's own words, and the fake LLM and TTS take no compute
time. With ``--profile tiny`` the real stages run once per scenario (random weights: their estimates
mean nothing). Everything runs on the virtual clock unless ``--realtime``.

With the fake stages the one-turn scenarios (``jfk``, ``question``, ``pause``, ``um``) run once more
with the ``right`` estimate and realistic stage delays (LLM first token 0.15 s, TTS first audio 0.1 s:
``REALISTIC_*``, the bounds the issue sets for a GPU): ``confident_v2v_p50_realistic_s`` (from the VAD's
end of speech) and ``confident_v2v_true_end_p50_realistic_s`` (from the end of the script's last sound,
found by level, so it can fall after a quiet tail the VAD counts as speech), rows under ``realistic``.

Per scenario and in total: voice-to-voice p50/p90, false cut-ins (the agent's audio starting while the
user is mid-utterance, pauses included), missed interruptions, backchannels and noises treated as
interruptions, barge-in latency, the fraction of started speculative replies that were withdrawn, and
talk-over (seconds of agent audio heard while the user was saying words of a turn or an interruption;
runs with the confident and wrong estimate, whose cut-ins are by design, left out of the total).
``<out>/turns.json`` holds ``total`` and ``scenarios``; ``<out>/turns-<scenario>-<estimate>.png`` a
timeline of each run (user speech, agent audio, commits, withdrawals).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from duplex import events as ev
from duplex.audio import SAMPLE_SPEECH, espeak, read_audio
from duplex.errors import AudioFormatError
from duplex.scenario import Say, ScenarioRun, Silence, Step, WaitDone, WaitSpeaking, run_scenario

RATE = 16_000
ESTIMATES = ("right", "wrong", "low", "absent")
AGENT_WORDS = "sure here is what I found about that for you today"
INTERRUPT_WINDOW_S = 2.0  # an interruption not acted on within this is missed
CONFIDENT = ("question", "pause", "um", "jfk")  # scenarios of one user turn: confident v2v
# Stage delays of the realistic runs: the bounds the issue sets for the GPU (LLM first token, TTS
# first audio); the fake runs above take no compute time at all.
REALISTIC_LLM_FIRST_TOKEN_S = 0.15
REALISTIC_TTS_FIRST_AUDIO_S = 0.10


@dataclass
class Piece:
    """One stretch of user audio of a scenario: its words and what it is."""

    kind: str  # "utterance" (part of a user turn), "backchannel", "interrupt", "noise"
    utterance: int  # which user turn it belongs to (pieces of one utterance share it)
    text: str
    last: bool = True  # the utterance's last piece
    voiced_s: float = 0.0  # from the start of its audio to the end of its last sound
    start_s: float = 0.0  # filled in as the scenario runs
    end_s: float = 0.0  # start_s + voiced_s


@dataclass
class Scenario:
    name: str
    steps: list[Step]
    pieces: dict[int, Piece]  # id(Say step) -> its piece

    def spans(self) -> list[tuple[float, float]]:
        """Each user utterance from its first to its last piece (the pauses inside included)."""
        out: dict[int, list[float]] = {}
        for p in self.pieces.values():
            if p.kind == "utterance":
                span = out.setdefault(p.utterance, [p.start_s, p.end_s])
                span[0], span[1] = min(span[0], p.start_s), max(span[1], p.end_s)
        return [(start, end) for _, (start, end) in sorted(out.items())]


def _voiced_s(audio: np.ndarray, frame: int = 320, rms: float = 0.02) -> float:
    """Seconds from the start of ``audio`` to the end of its last 20 ms frame with sound in it."""
    n = len(audio) // frame
    levels = np.sqrt((audio[:n * frame].reshape(n, frame) ** 2).mean(axis=1)) if n else np.zeros(0)
    loud = np.nonzero(levels >= rms)[0]
    return (loud[-1] + 1) * frame / RATE if loud.size else len(audio) / RATE


SUBSTITUTED: list[str] = []  # texts whose espeak-ng speech was replaced by other audio (no espeak-ng)


def _speech(text: str, fallback: np.ndarray) -> np.ndarray:
    try:
        return espeak(text, RATE)
    except AudioFormatError:
        SUBSTITUTED.append(text)
        return fallback


def scenarios(only: list[str] | None = None) -> list[Scenario]:
    SUBSTITUTED.clear()
    jfk, _ = read_audio(SAMPLE_SPEECH, RATE)
    fallback = jfk[int(0.2 * RATE):int(2.3 * RATE)]
    # JFK's four phrases and the pauses between them (0.6-1.2 s), one utterance
    cuts = [(0.0, 2.2, "and so my fellow americans"), (3.2, 4.4, "ask not"),
            (5.35, 7.65, "what your country can do for you"), (8.1, 10.65, "ask what you can do for your country")]
    jfk_parts: list = []
    for i, (a, b, words) in enumerate(cuts):
        if i:
            jfk_parts.append(("silence", 0, "", 0.0, False))  # placeholder, replaced below
        jfk_parts.append(("utterance", 0, words, jfk[int(a * RATE):int(b * RATE)], i == len(cuts) - 1))
    gaps = iter([3.2 - 2.2, 5.35 - 4.4, 8.1 - 7.65])
    jfk_parts = [p if p[0] != "silence" else ("silence", 0, "", next(gaps), False) for p in jfk_parts]
    rng = np.random.default_rng(3)
    cough = (0.3 * rng.standard_normal(int(0.15 * RATE)) * np.hanning(int(0.15 * RATE))).astype(np.float32)
    out: list[Scenario] = []

    def make(name: str, parts: list[tuple[str, int, str, np.ndarray | float, bool]], wait_speaking_before: int = -1,
             tail_s: float = 3.0) -> Scenario:
        """parts: (kind, utterance, text, audio or seconds of silence, last piece of its utterance)."""
        steps: list[Step] = []
        pieces: dict[int, Piece] = {}
        for i, (kind, utt, text, audio, last) in enumerate(parts):
            if i == wait_speaking_before:
                steps += [WaitSpeaking(timeout_s=20.0), Silence(0.6)]
            if isinstance(audio, float):
                steps.append(Silence(audio))
                continue
            step = Say(audio, RATE, label=f"{kind}: {text}")
            pieces[id(step)] = Piece(kind, utt, text, last, voiced_s=_voiced_s(audio))
            steps.append(step)
        steps += [Silence(tail_s), WaitDone(timeout_s=30.0)]
        return Scenario(name, steps, pieces)

    question = ("utterance", 0, "what will the weather be like tomorrow in paris",
                _speech("What will the weather be like tomorrow in Paris?", fallback), True)
    out.append(make("jfk", jfk_parts))
    out.append(make("question", [question]))
    out.append(make("pause", [("utterance", 0, "i would like to book a table",
                               _speech("I would like to book a table", fallback), False),
                              ("silence", 0, "", 0.9, False),
                              ("utterance", 0, "for two people on friday",
                               _speech("for two people on Friday.", fallback), True)]))
    out.append(make("um", [("utterance", 0, "so um", _speech("So, um", fallback), False),
                           ("silence", 0, "", 0.8, False),
                           ("utterance", 0, "i think uh", _speech("I think, uh", fallback), False),
                           ("silence", 0, "", 0.7, False),
                           ("utterance", 0, "we should go tomorrow", _speech("we should go tomorrow.", fallback),
                            True)]))
    out.append(make("backchannel", [question, ("backchannel", 1, "yeah", _speech("yeah", fallback[:8000]), True)],
                    wait_speaking_before=1))
    out.append(make("interrupt", [question, ("interrupt", 1, "no wait stop that is not what i asked",
                                             _speech("No wait, stop, that is not what I asked.", fallback), True)],
                    wait_speaking_before=1))
    out.append(make("noise", [question, ("noise", 1, "", cough, True)], wait_speaking_before=1))
    out.append(make("backchannel-led-interrupt",
                    [question, ("interrupt", 1, "yeah but wait stop that",
                                _speech("Yeah but wait stop that.", fallback), True)], wait_speaking_before=1))
    out.append(make("backchannel-led-interrupt-comma",
                    [question, ("interrupt", 1, "yeah", _speech("yeah", fallback[:8000]), False),
                     ("silence", 1, "", 0.12, False),
                     ("interrupt", 1, "wait stop that", _speech("wait, stop that.", fallback), True)],
                    wait_speaking_before=1))
    return [s for s in out if not only or s.name in only]


# -- one run -------------------------------------------------------------------------------------------


@dataclass
class Truth:
    """What the script says, filled in as it runs (read by the fake stages)."""

    scenario: Scenario
    pushed: Callable[[], float] = lambda: 0.0  # input seconds pushed so far
    speaking: Callable[[], bool] = lambda: False  # whether the VAD hears the user now

    def word_at(self, t: float) -> str | None:
        for p in self.scenario.pieces.values():
            if p.start_s <= t < p.end_s and p.text:
                words = p.text.split()
                return words[min(len(words) - 1, int((t - p.start_s) / (p.end_s - p.start_s) * len(words)))]
        return None

    def complete(self) -> bool:
        """Whether the user's current utterance is over: its last piece is being said, and the speech
        has stopped most of the way through it (or it has been said to its end)."""
        now = self.pushed()
        started = [p for p in self.scenario.pieces.values() if p.start_s <= now and p.end_s > 0]
        if not started:
            return False
        current = max(started, key=lambda p: p.start_s)
        return current.last and (now >= current.end_s or
                                 (not self.speaking() and now >= current.start_s + 0.7 * current.voiced_s))


def _eot(estimate: str, truth: Truth) -> Callable[[str], float | None]:
    def fn(text: str) -> float | None:
        if estimate == "right":
            return 0.97 if truth.complete() else 0.05
        return {"wrong": 0.97, "low": 0.3, "absent": None}[estimate]

    return fn


async def _run(agent, scenario: Scenario, truth: Truth) -> tuple[ScenarioRun, dict[str, int]]:
    session = agent.session()

    def on_step(step: Step, start_s: float) -> None:
        piece = scenario.pieces.get(id(step))
        if piece is not None:
            piece.start_s, piece.end_s = start_s, start_s + piece.voiced_s

    truth.pushed = lambda: session.intake.pushed / RATE
    truth.speaking = lambda: session.policy.user_speaking
    run = await run_scenario(session, scenario.steps, on_step=on_step)
    return run, dict(session.speaking.speculations)


def score(scenario: Scenario, run: ScenarioRun, speculations: dict[str, int]) -> dict[str, Any]:
    """The figures of one run, from its events and the script's ground truth."""
    spans = scenario.spans()
    starts = [e.stream_samples / RATE for e in run.of(ev.AudioOut)]
    false_cut_ins = sum(1 for t in starts for a, b in spans if a < t < b)
    v2v = [m.value for m in run.metrics if m.name == "voice_to_voice_s"]
    barge = run.barge_ins()
    interrupted = [e.stream_samples / RATE for e in run.of(ev.Interrupted)]
    missed = backchannels = noises = 0
    for p in scenario.pieces.values():
        acted = any(p.start_s <= t <= p.end_s + INTERRUPT_WINDOW_S for t in interrupted)
        if p.kind == "interrupt" and not acted:
            missed += 1
        elif p.kind == "backchannel" and acted:
            backchannels += 1
        elif p.kind == "noise" and acted:
            noises += 1
    started = speculations.get("started", 0)
    return {"talk_over_s": round(talk_over_s(scenario, run), 3), "v2v_true_end_s": v2v_true_end(scenario, run),
            "voice_to_voice_s": [round(x, 3) for x in v2v],
            "v2v_p50_s": _q(v2v, 0.5), "v2v_p90_s": _q(v2v, 0.9),
            "false_cut_ins": false_cut_ins, "missed_interruptions": missed,
            "backchannels_interrupted": backchannels, "noise_interrupted": noises,
            "barge_in_s": [round(x, 3) for x in barge], "barge_in_p50_s": _q(barge, 0.5),
            "speculations_started": started, "speculations_withdrawn": speculations.get("withdrawn", 0),
            "wasted_fraction": round(speculations.get("withdrawn", 0) / started, 3) if started else 0.0,
            "replies": len(run.of(ev.ReplyStarted)), "timeouts": run.timeouts,
            "heard": [t.get("heard") for t in run.conversation.get("turns", []) if t["role"] == "assistant"]}


def v2v_true_end(scenario: Scenario, run: ScenarioRun) -> list[float]:
    """Per user turn, seconds from the end of its last sound (the script's truth, not the VAD's end,
    which comes a hangover later and is where ``voice_to_voice_s`` starts) to the next agent audio."""
    outs = sorted(e.stream_samples / RATE for e in run.of(ev.AudioOut))
    out = []
    for _, end in scenario.spans():
        after = [t for t in outs if t >= end]
        if after:
            out.append(round(after[0] - end, 3))
    return out


def talk_over_s(scenario: Scenario, run: ScenarioRun, frame_s: float = 0.02) -> float:
    """Seconds of agent audio heard while the user was saying words of a turn or an interruption
    (backchannels and noises are talked over by design). Input seconds of a frame: it ends at its
    wall time less the run's start, on the virtual clock as on the wall clock."""
    spans = [(p.start_s, p.end_s) for p in scenario.pieces.values() if p.kind in ("utterance", "interrupt")]
    heard = 0.0
    for wall, frame in zip(run.frame_walls, run.frames):
        if np.abs(frame).max() <= 1e-4:
            continue
        end = wall - run.t0
        start = end - frame_s
        heard += sum(max(0.0, min(end, b) - max(start, a)) for a, b in spans)
    return heard


def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(float(np.quantile(values, q)), 3)


def plot(scenario: Scenario, run: ScenarioRun, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 2.6))
    for p in scenario.pieces.values():
        ax.broken_barh([(p.start_s, p.end_s - p.start_s)], (2, 0.8), color="tab:blue" if p.kind == "utterance"
                       else "tab:orange")
        ax.text(p.start_s, 2.9, p.kind if p.kind != "utterance" else p.text[:24], fontsize=7)
    t0 = run.t0
    frame_s = 0.02
    spans, start = [], None
    for i, (wall, frame) in enumerate(zip(run.frame_walls, run.frames)):
        on = bool(np.abs(frame).max() > 1e-4)
        if on and start is None:
            start = wall - t0 - frame_s
        if not on and start is not None:
            spans.append((start, wall - t0 - frame_s - start))
            start = None
    if start is not None:
        spans.append((start, run.frame_walls[-1] - t0 - start))
    ax.broken_barh(spans, (1, 0.8), color="tab:green")
    for e in run.of(ev.ReplyStarted):
        ax.axvline(e.stream_samples / RATE, color="tab:green", ls="--", lw=0.8)
    for m in run.metrics:
        if m.name == "speculation_withdrawn":
            ax.axvline(m.stream_samples / RATE, color="tab:red", ls=":", lw=0.8)
    for e in run.of(ev.Interrupted):
        ax.axvline(e.stream_samples / RATE, color="black", lw=1.0)
    ax.set_yticks([1.4, 2.4], ["agent", "user"])
    ax.set_xlabel("seconds of input (dashed: reply committed, dotted red: speculation withdrawn, black: "
                  "interrupted)", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- the benchmark -------------------------------------------------------------------------------------


async def _agent(profile: str, truth: Truth, estimate: str, config_args, vad,
                 delays: tuple[float, float] | None = None) -> Any:
    from duplex.agent import Agent
    from duplex.config import AgentConfig
    from duplex.fakes import FakeASR, FakeLLM, FakeTTS
    from duplex.stages import Stages

    if profile == "fake":
        config = AgentConfig(profile="fake")
        stages = Stages(vad=vad, asr=FakeASR(word_at=truth.word_at),
                        llm=FakeLLM(replies=[AGENT_WORDS], ttft_s=delays[0] if delays else 0.0, token_s=0.0,
                                    eot_fn=_eot(estimate, truth)),
                        tts=FakeTTS(first_chunk_s=delays[1] if delays else 0.0))
        return Agent(stages, config)
    return await Agent.load(config_args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_bench(args)) if getattr(args, "realtime", False) else _virtual(args)


def _virtual(args: argparse.Namespace) -> dict[str, Any]:
    from duplex.clock import run_virtual

    return run_virtual(_bench(args))


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from duplex.cli import config_from_args

    profile = args.profile if args.profile in ("fake", "tiny") else "fake"
    if args.profile not in ("fake", "tiny"):
        print(f"(bench turns runs the fake or tiny profile; {args.profile!r} asked: using fake)")
    out = Path(args.out)
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    estimates = ESTIMATES if profile == "fake" else ("model",)
    config_args = None
    if profile == "tiny":
        args.profile = "tiny"
        config_args = config_from_args(args)
        config_args.max_reply_tokens, config_args.fixed_lengths = 12, True
    rows: list[dict[str, Any]] = []
    only = ["jfk", "pause", "interrupt"] if args.quick else None
    vad = None
    if profile == "fake":
        from duplex.asr.vad import SileroVAD

        vad = SileroVAD()  # one network for every run (its streams hold the state)
    async def one(scenario: Scenario, estimate: str, delays: tuple[float, float] | None) -> dict[str, Any]:
        truth = Truth(scenario)
        agent = await _agent(profile, truth, estimate, config_args, vad, delays)
        try:
            result, speculations = await _run(agent, scenario, truth)
        finally:
            if profile == "fake":
                for model in (agent.stages.asr, agent.stages.llm, agent.stages.tts):
                    model.worker.close()
            else:
                await agent.aclose()
        figures = {"scenario": scenario.name, "estimate": estimate, **score(scenario, result, speculations)}
        tag = "" if delays is None else "-realistic"
        await asyncio.to_thread(plot, scenario, result, out / f"turns-{scenario.name}-{estimate}{tag}.png",
                                f"{scenario.name}, end-of-turn estimate {estimate} ({profile}"
                                f"{'' if delays is None else ', stage delays %.2f + %.2f s' % delays})")
        print(f"  {scenario.name + tag:11s} {estimate:6s} v2v p50 {_fmt(figures['v2v_p50_s'])} p90 "
              f"{_fmt(figures['v2v_p90_s'])} (true end {_fmt(_q(figures['v2v_true_end_s'], 0.5))})  cut-ins "
              f"{figures['false_cut_ins']}  missed "
              f"{figures['missed_interruptions']}  backchannel->int {figures['backchannels_interrupted']}  "
              f"noise->int {figures['noise_interrupted']}  barge-in {_fmt(figures['barge_in_p50_s'])}  wasted "
              f"{figures['speculations_withdrawn']}/{figures['speculations_started']}  talk-over "
              f"{figures['talk_over_s']:.3f}", flush=True)
        return figures

    for scenario in scenarios(only):
        for estimate in estimates:
            rows.append(await one(scenario, estimate, None))
    # The same confident turns with the stage delays a GPU shows (the runs above have none): what
    # speculation hides, and what it does not.
    realistic: list[dict[str, Any]] = []
    delays = (getattr(args, "llm_first_token_s", None) or REALISTIC_LLM_FIRST_TOKEN_S,
              getattr(args, "tts_first_audio_s", None) or REALISTIC_TTS_FIRST_AUDIO_S)
    if profile == "fake":
        print(f"  realistic stage delays: LLM first token {delays[0]} s, TTS first audio {delays[1]} s")
        for scenario in scenarios([n for n in CONFIDENT if not only or n in only]):
            realistic.append(await one(scenario, "right", delays))
    total = totals(rows)
    if realistic:
        v2v = [x for r in realistic for x in r["voice_to_voice_s"][:1]]
        true_end = [x for r in realistic for x in r["v2v_true_end_s"][:1]]
        total["confident_v2v_p50_realistic_s"] = _q(v2v, 0.5)
        total["confident_v2v_true_end_p50_realistic_s"] = _q(true_end, 0.5)
    print("total: " + ", ".join(f"{k} {v}" for k, v in total.items()))
    substituted = sorted(set(SUBSTITUTED))
    if substituted:
        print("\n" + "!" * 100 + "\n!! espeak-ng is missing: every scripted utterance was replaced by a cut of "
              "JFK's speech, so these\n!! figures are NOT comparable with runs that had it "
              "(apt-get install espeak-ng)\n" + "!" * 100, file=sys.stderr, flush=True)
    return {"profile": profile, "clock": "wall" if getattr(args, "realtime", False) else "virtual",
            "espeak_ng": not substituted, "substituted_audio": substituted, "total": total, "scenarios": rows,
            "realistic": {"llm_first_token_s": delays[0], "tts_first_audio_s": delays[1], "scenarios": realistic}}


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    v2v = [x for r in rows for x in r["voice_to_voice_s"]]
    confident = [x for r in rows if r["estimate"] == "right" and r["scenario"] in CONFIDENT
                 for x in r["voice_to_voice_s"][:1]]
    barge = [x for r in rows for x in r["barge_in_s"]]
    started = sum(r["speculations_started"] for r in rows)
    withdrawn = sum(r["speculations_withdrawn"] for r in rows)
    cut_in_safe = [r for r in rows if r["estimate"] in ("absent", "low", "model")]
    talk_over = sum(r["talk_over_s"] for r in rows if r["estimate"] != "wrong")
    return {"runs": len(rows), "v2v_p50_s": _q(v2v, 0.5), "v2v_p90_s": _q(v2v, 0.9),
            "confident_v2v_p50_s": _q(confident, 0.5),
            "false_cut_ins": sum(r["false_cut_ins"] for r in rows),
            "false_cut_ins_without_a_confident_estimate": sum(r["false_cut_ins"] for r in cut_in_safe),
            "missed_interruptions": sum(r["missed_interruptions"] for r in rows),
            "backchannels_interrupted": sum(r["backchannels_interrupted"] for r in rows),
            "noise_interrupted": sum(r["noise_interrupted"] for r in rows),
            "barge_in_p50_s": _q(barge, 0.5), "wasted_fraction": round(withdrawn / started, 3) if started else 0.0,
            "talk_over_s": round(talk_over, 3)}


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:5.3f}"
