"""Transports: the WebRTC server and its browser client, the local microphone, files."""

from duplex.requirements import require

require("aiohttp", "aiortc")
