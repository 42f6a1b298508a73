"""The signalling messages of ``/api/offer``, parsed and checked before anything touches aiortc.

Shapes (those of Pipecat's SmallWebRTC clients):

- ``POST /api/offer``: ``{"sdp": str, "type": "offer", "pc_id": str | null, "restart_pc": bool?}``,
  answered with ``{"sdp": str, "type": "answer", "pc_id": str, "secret": str}``; an offer for an open
  ``pc_id`` (renegotiation, ``restart_pc``) must carry that connection's ``secret``;
- ``PATCH /api/offer``: ``{"pc_id": str, "candidates": [{"candidate": str, "sdp_mid": str | null,
  "sdp_mline_index": int | null}, ...], "secret": str}`` (trickle ICE; an empty ``candidate`` ends the list).

Everything a client sends is checked here: JSON shape and types, sizes, and a first look at the SDP
(text, an audio section, no absurd line count), so a malformed or hostile request becomes a
:class:`BadRequest` with a clear message, never an exception inside aiortc's parser.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_SDP_CHARS = 32_000  # Chromium's offers are 3-8 kB
MAX_SDP_LINES = 600
MAX_CANDIDATES = 64  # per PATCH
MAX_CANDIDATE_CHARS = 1_024
_PC_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400); the message says what was wrong."""


@dataclass(frozen=True)
class Offer:
    sdp: str
    type: str
    pc_id: str | None = None
    restart_pc: bool = False
    secret: str | None = None  # the connection's secret, to renegotiate or restart it
    resume: str | None = None  # a new session continues the conversation this token names (transport.resume)


@dataclass(frozen=True)
class Candidate:
    """One remote ICE candidate (RFC 8839 ``candidate-attribute``), or the end of them (``ip`` empty)."""

    sdp_mid: str | None
    sdp_mline_index: int | None
    foundation: str = ""
    component: int = 1
    protocol: str = "udp"
    priority: int = 0
    ip: str = ""
    port: int = 0
    type: str = "host"
    related_address: str | None = None
    related_port: int | None = None
    tcp_type: str | None = None

    @property
    def end_of_candidates(self) -> bool:
        return not self.ip


@dataclass(frozen=True)
class CandidatePatch:
    pc_id: str
    secret: str | None
    candidates: tuple[Candidate, ...]


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRequest("request body is not UTF-8 text") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, and Python's limit on integer digits
        raise BadRequest(f"request body is not valid JSON ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def _pc_id(value: Any, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _PC_ID.match(value):
        raise BadRequest("pc_id must be the string the server answered with")
    return value


def check_sdp(sdp: str) -> None:
    """A first look at an SDP offer: size, line count, a version line and an audio section."""
    if len(sdp) > MAX_SDP_CHARS:
        raise BadRequest(f"sdp is too long ({len(sdp)} characters; at most {MAX_SDP_CHARS})")
    if "\x00" in sdp:
        raise BadRequest("sdp contains NUL characters")
    lines = [line for line in sdp.replace("\r\n", "\n").split("\n") if line]
    if len(lines) > MAX_SDP_LINES:
        raise BadRequest(f"sdp has too many lines ({len(lines)}; at most {MAX_SDP_LINES})")
    if not lines or lines[0].strip() != "v=0":
        raise BadRequest("sdp is not a session description (it must start with 'v=0')")
    bad = next((line for line in lines if len(line) < 2 or line[1] != "="), None)
    if bad is not None:
        raise BadRequest(f"sdp has a malformed line: {bad[:60]!r}")
    mids = [line[6:].strip() for line in lines if line.startswith("a=mid:")]
    if len(mids) != len(set(mids)):
        raise BadRequest("sdp has two media sections with the same a=mid")
    if not any(line.startswith("m=audio ") for line in lines):
        raise BadRequest("the offer has no audio section (m=audio): send the microphone track")


def parse_offer(data: dict[str, Any]) -> Offer:
    sdp, kind = data.get("sdp"), data.get("type")
    if not isinstance(sdp, str) or not sdp:
        raise BadRequest("'sdp' must be a non-empty string")
    if kind != "offer":
        raise BadRequest(f"'type' must be \"offer\", got {kind!r}")
    restart = data.get("restart_pc", False)
    if restart is None:
        restart = False
    if not isinstance(restart, bool):
        raise BadRequest("'restart_pc' must be true or false")
    check_sdp(sdp)
    resume = data.get("resume")
    if resume is not None and (not isinstance(resume, str) or len(resume) > 128):
        raise BadRequest("'resume' must be the resume_token an earlier answer carried")
    return Offer(sdp=sdp, type=kind, pc_id=_pc_id(data.get("pc_id"), required=False), restart_pc=restart,
                 secret=_secret(data.get("secret")), resume=resume)


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 128:
        raise BadRequest("'secret' must be the string the server answered with")
    return value


_HOST = re.compile(r"^[A-Za-z0-9.:%_-]{1,255}$")  # IPv4, IPv6 or an mDNS name


def parse_candidate(text: str, mid: str | None, index: int | None) -> Candidate:
    """Parse ``candidate:<foundation> <component> <protocol> <priority> <ip> <port> typ <type> ...``."""
    text = text.strip().removeprefix("a=").removeprefix("candidate:")
    if not text:
        return Candidate(mid, index)  # end of candidates
    bits = text.split()
    try:
        if len(bits) < 8 or bits[6] != "typ":
            raise ValueError("expected '<foundation> <component> <protocol> <priority> <ip> <port> typ <type>'")
        foundation, component, protocol = bits[0], int(bits[1]), bits[2].lower()
        priority, ip, port, kind = int(bits[3]), bits[4], int(bits[5]), bits[7]
        if not (1 <= component <= 256 and 0 <= priority < 2 ** 32 and 0 <= port < 65536):
            raise ValueError("component, priority or port out of range")
        if protocol not in ("udp", "tcp") or kind not in ("host", "srflx", "prflx", "relay"):
            raise ValueError(f"unknown protocol {protocol!r} or type {kind!r}")
        if not _HOST.match(ip) or len(foundation) > 32:
            raise ValueError(f"bad address {ip[:40]!r}")
        extra = dict(zip(bits[8::2], bits[9::2]))
        rport = extra.get("rport")
        return Candidate(mid, index, foundation, component, protocol, priority, ip, port, kind,
                         related_address=extra.get("raddr"), related_port=int(rport) if rport else None,
                         tcp_type=extra.get("tcptype"))
    except ValueError as exc:
        raise BadRequest(f"malformed ICE candidate {text[:80]!r}: {exc}") from None


def parse_patch(data: dict[str, Any]) -> CandidatePatch:
    pc_id = _pc_id(data.get("pc_id"), required=True)
    raw = data.get("candidates")
    if not isinstance(raw, list):
        raise BadRequest("'candidates' must be a list")
    if len(raw) > MAX_CANDIDATES:
        raise BadRequest(f"too many candidates in one request ({len(raw)}; at most {MAX_CANDIDATES})")
    out: list[Candidate] = []
    for c in raw:
        if not isinstance(c, dict):
            raise BadRequest("each candidate must be an object {candidate, sdp_mid, sdp_mline_index}")
        text, mid, index = c.get("candidate"), c.get("sdp_mid"), c.get("sdp_mline_index")
        if not isinstance(text, str) or len(text) > MAX_CANDIDATE_CHARS:
            raise BadRequest("'candidate' must be a string of at most 1024 characters")
        if mid is not None and (not isinstance(mid, str) or len(mid) > 32):
            raise BadRequest("'sdp_mid' must be a short string or null")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 64):
            raise BadRequest("'sdp_mline_index' must be a small non-negative integer or null")
        if mid is None and index is None:
            raise BadRequest("a candidate needs 'sdp_mid' or 'sdp_mline_index'")
        out.append(parse_candidate(text, mid, index))
    assert pc_id is not None
    return CandidatePatch(pc_id=pc_id, secret=_secret(data.get("secret")), candidates=tuple(out))
