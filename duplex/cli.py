"""The ``duplex`` command line.

Every subcommand's options are declared here (argparse only, so ``duplex --help`` is instant); each
runs a ``main(args)`` function imported lazily from the package that owns the work. Errors a user can
fix (bad audio, bad config, a missing model) print one clear line and exit 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from duplex.config import ENGINE_CORES, PROFILES

COMMANDS: dict[str, str] = {
    "simulate": "duplex.simulate:main",
    "serve": "duplex.transport.cli:serve_main",
    "mic": "duplex.transport.cli:mic_main",
    "transcribe": "duplex.asr.cli:transcribe_main",
    "say": "duplex.tts.cli:say_main",
    "bench": "duplex.bench:main",
    "models": "duplex.models:main",
    "doctor": "duplex.doctor:main",
}

BENCHMARKS = ("asr", "llm", "tts", "e2e", "all", "endurance", "transport", "capacity", "turns", "echo", "barge-in",
              "cluster")


def add_agent_options(p: argparse.ArgumentParser, default_profile: str = "pretrained") -> None:
    g = p.add_argument_group("models")
    g.add_argument("--profile", choices=PROFILES, default=default_profile,
                   help=f"which models fill the stages (default: {default_profile}): pretrained = real "
                        "checkpoints; tiny = real architectures, tiny random weights; random = full-size, "
                        "random weights; fake = scripted stages for testing the plumbing")
    g.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    g.add_argument("--asr-model", default=None, help="ASR checkpoint: a .nemo file or a hub name")
    g.add_argument("--asr-latency", default="[70,6]",
                   help="cache-aware attention context [left,right]: [70,0] [70,1] [70,6] [70,13] "
                        "= 80/160/560/1120 ms chunks (default [70,6])")
    g.add_argument("--llm-model", default=None, help="LLM checkpoint: a directory or a hub name")
    g.add_argument("--llm-window", type=int, default=2048, help="attention-sink KV cache size in tokens")
    g.add_argument("--tts-model", default=None, help="TTS checkpoint: a directory or a hub name")
    g.add_argument("--voice", default=None, help="reference clip (WAV, 2-20 s) that sets the agent's voice")
    g.add_argument("--voice-text", default=None, help="transcript of the --voice clip")
    g.add_argument("--system-prompt", default=None, help="the agent's instructions")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    g.add_argument("--engine-slots", type=int, default=None,
                   help="sessions the LLM and TTS engines hold at once (rows of their batched steps; "
                        "default 32 on a GPU, 4 on the CPU)")
    g.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="run the engines' batched steps eagerly instead of as captured CUDA graphs")
    g.add_argument("--compile", dest="compile", action="store_true",
                   help="fuse each decoder layer's kernels with torch.compile at load (GPU only, experimental: "
                        "the first load takes minutes; the CPU never compiles)")
    g.add_argument("--engine-core", choices=ENGINE_CORES, default="thread",
                   help="where the models run: thread = in this process (default); process = a child process "
                        "that owns the device, so sessions, WebRTC and HTTP do not share its interpreter lock")
    g.add_argument("--tools", action="append", default=None, metavar="MODULE:ATTR",
                   help="tools the agent may call while it speaks: a duplex.tools.Tool, an async function or a "
                        "list of them, imported from MODULE (repeatable; see the README's Tools)")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="a TOML file of agent settings (any AgentConfig field; [turn] for turn timings, "
                        "[fake.llm] etc. for the fake stages); options given here override it")
    p.set_defaults(_agent_defaults={dest: p.get_default(dest) for dest in _CLI_FIELDS})


# agent options that are AgentConfig fields of the same name
_CLI_FIELDS = ("profile", "device", "asr_model", "asr_latency", "llm_model", "llm_window", "tts_model", "voice",
               "voice_text", "system_prompt", "seed", "engine_slots", "graphs", "compile", "engine_core", "tools")


def apply_config_file(args: argparse.Namespace) -> None:
    """With ``--config FILE``: every agent option left at its default takes the file's value (so
    commands that read ``args`` directly see it too)."""
    path = getattr(args, "config", None)
    if not path:
        return
    from duplex.config import load_config

    file_config = load_config(path)
    args._file_config = file_config
    for dest, default in args._agent_defaults.items():
        if getattr(args, dest) == default:
            setattr(args, dest, getattr(file_config, dest))


def config_from_args(args: argparse.Namespace):
    """The :class:`~duplex.config.AgentConfig` the agent options (and ``--config FILE``) describe,
    validated."""
    import copy

    from duplex.config import AgentConfig

    if getattr(args, "config", None) and not hasattr(args, "_file_config"):
        apply_config_file(args)
    base = getattr(args, "_file_config", None)
    cfg = copy.deepcopy(base) if base is not None else AgentConfig()
    for dest in _CLI_FIELDS:
        value = getattr(args, dest)
        if dest == "system_prompt" and not value:
            continue
        setattr(cfg, dest, value)
    return cfg.validate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duplex", description="A full-duplex speech agent.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and model loading (= --log-level info)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                        help="duplex's log level (default: info for serve, which logs each session's open and "
                             "close, warning for the other commands)")
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line (for log shippers)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="run a whole conversation from an audio file as if spoken live")
    p.add_argument("input", help="the user's side of the conversation (WAV/FLAC, any rate)")
    p.add_argument("--out", required=True, help="folder for agent.wav, timeline.jsonl, conversation.json")
    p.add_argument("--realtime", action="store_true",
                   help="run on the wall clock (default: virtual clock, as fast as the models compute)")
    p.add_argument("--tail", type=float, default=4.0, help="seconds of silence fed after the file ends")
    add_agent_options(p)

    p = sub.add_parser("serve", help="WebRTC server with a browser client")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-sessions", type=int, default=4, help="concurrent sessions; more get HTTP 503")
    p.add_argument("--token", default=None, help="offers must present this token (the page: open it with "
                   "?token=...); advised whenever --host is not loopback")
    p.add_argument("--admin-token", default=None, help="GET /api/status lists connection ids only to requests "
                   "with Authorization: Bearer <this>")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="bound to loopback, the server answers only requests naming this machine (localhost, an "
                        "IP address) so no web page can reach it by rebinding its own name; also accept this Host "
                        "name (repeatable)")
    p.add_argument("--allowed-origin", action="append", default=None, metavar="ORIGIN",
                   help="offers and candidates are accepted only from the server's own page; also accept them from "
                        "pages of this origin, e.g. https://app.example.com (repeatable; answered with CORS headers)")
    p.add_argument("--cert", default=None, help="TLS certificate (PEM): serve https:// (browsers give the "
                   "microphone only to https:// pages or localhost)")
    p.add_argument("--key", default=None, help="the TLS certificate's private key (PEM)")
    p.add_argument("--output-buffer-ms", type=int, default=None, metavar="MS",
                   help="the agent's voice that may wait for the WebRTC sender (default 200; whole 20 ms frames). "
                        "Not latency: the sender takes each frame at once, so nothing waits unless the server "
                        "stalls, and a barge-in takes back whatever waits (never heard). Smaller loses audio "
                        "in a shorter stall; larger sends a longer stall's backlog in a burst")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="write each session's recording to DIR/<connection id>/ when it ends: audio.wav (stereo: "
                        "the user as received, the agent as played, one clock), transcript.json (both sides, word "
                        "times, the agent's words as heard), events.jsonl, conversation.json")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="spread the sessions over N worker processes (WebRTC, turn-taking, each on a core of its "
                        "own) around one engine core process that steps every session's models together "
                        "(default: one process; --max-sessions counts all workers' sessions)")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="run N agents on Ray Serve (one per GPU where the cluster has them) behind one address; "
                        "needs pip install -e '.[cluster]' (default: one agent in this process, no Ray)")
    p.add_argument("--ray-address", default=None, help="with --replicas: join this Ray cluster (e.g. auto, or "
                   "HEAD:6379 after `ray start --head`) instead of starting one on this machine")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="with --replicas: GPUs each replica takes (default: 1 if the cluster has a GPU per "
                        "replica, else 0)")
    add_agent_options(p)

    p = sub.add_parser("mic", help="talk to the agent at this machine's microphone and speaker")
    p.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    p.add_argument("--input-device", default=None, help="microphone (index or name)")
    p.add_argument("--output-device", default=None, help="speaker (index or name)")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="write the session's recording to DIR when it ends: audio.wav (stereo: you, the agent as "
                        "played), transcript.json, events.jsonl, conversation.json")
    add_agent_options(p)

    p = sub.add_parser("transcribe", help="stream an audio file through the live ASR path")
    p.add_argument("input", help="audio file")
    p.add_argument("--latency", default=None, help="attention context, e.g. [70,1]; overrides --asr-latency")
    p.add_argument("--packet-ms", type=int, default=20, help="size of the audio packets fed (10-20 ms)")
    add_agent_options(p)

    p = sub.add_parser("say", help="speak text through the streaming TTS path into a WAV file")
    p.add_argument("text", help="what to say")
    p.add_argument("--out", required=True, help="output WAV file")
    add_agent_options(p)

    p = sub.add_parser("bench", help="benchmarks that print figures (speed is measured here, not in tests)")
    p.add_argument("what", choices=BENCHMARKS,
                   help="a stage, e2e, all (the stages and e2e), endurance (a long dialogue, on the "
                        "virtual clock or with --realtime on the wall clock; use --profile tiny), turns (turn-taking scenarios; --profile fake "
                        "or tiny), echo (the echo guard of duplex mic in simulated rooms), or "
                        "barge-in (onset to the agent's last sample at a plain WebRTC client's ear), "
                        "cluster (sessions through duplex serve --replicas N), capacity (the e2e sweep of "
                        "concurrent sessions through real WebRTC peers into the server)")
    p.add_argument("--minutes", type=float, default=60.0, help="endurance: minutes of dialogue")
    p.add_argument("--out", default="artifacts/bench", help="folder for JSON results and plots")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and settings (a smoke run)")
    p.add_argument("--realtime", action="store_true", help="turns, endurance: run on the wall clock (default: virtual)")
    p.add_argument("--batch", type=int, nargs="+", default=None, metavar="N",
                   help="llm, tts, cluster, capacity: the batch sizes (concurrent sessions) to measure, "
                        "e.g. --batch 1 8 32")
    p.add_argument("--replicas", type=int, default=None, metavar="N", help="cluster: agent replicas (default 2)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="capacity: the sessions in N worker processes around one engine core, as serve --workers N")
    add_agent_options(p, default_profile="random")

    p = sub.add_parser("doctor", help="check this machine: versions, extras, devices, tools, models, port")
    p.add_argument("--host", default="127.0.0.1", help="the address duplex serve would bind")
    p.add_argument("--port", type=int, default=8080, help="the port duplex serve would use")

    p = sub.add_parser("models", help="fetch or list the pretrained models")
    p.add_argument("action", choices=("pull", "list"))
    add_agent_options(p)
    return parser


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the record's ``extra`` fields."""

    _standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in self._standard})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(args: argparse.Namespace) -> None:
    """Other libraries log warnings only; duplex logs at ``--log-level`` (see its help)."""
    name = args.log_level or ("info" if args.verbose or args.command == "serve" else "warning")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if args.log_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if name != "debug" else logging.INFO)
    logging.getLogger("duplex").setLevel(getattr(logging, name.upper()))


_ran: str | None = None  # the command main() ran last


def main(argv: Sequence[str] | None = None) -> int:
    global _ran
    args = build_parser().parse_args(argv)
    _ran = args.command
    setup_logging(args)
    from duplex.errors import UserError

    module_name, func = COMMANDS[args.command].split(":")
    try:
        apply_config_file(args)
        run = getattr(importlib.import_module(module_name), func)
        return int(run(args) or 0)
    except UserError as exc:
        print(f"duplex {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a package of an extra that is not installed
        from duplex.requirements import missing_module

        print(f"duplex {args.command}: error: {missing_module(exc, f'duplex {args.command}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"duplex {args.command}: interrupted", file=sys.stderr)
        return 130


# Commands whose process may end at once when they return: they have closed every session and the
# models themselves, and the interpreter's own teardown of torch and NeMo takes seconds more.
FAST_EXIT = ("serve", "mic")


def entry() -> None:
    """The ``duplex`` executable: :func:`main`, then a prompt exit after serve/mic."""
    code = main(sys.argv[1:])
    if _ran in FAST_EXIT:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
