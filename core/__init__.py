"""The engine core in a process of its own: the models of an agent, served to a frontend process.

``duplex serve --engine-core process`` (``AgentConfig.engine_core``) runs the engines (VAD, ASR,
LLM, TTS and their schedulers) in a child process that owns the device, and the sessions, WebRTC
and HTTP in the parent, so the two no longer share one interpreter lock. :mod:`.remote` holds what
the frontend uses (stages whose streams forward every call), :mod:`.process` the child's side, and
:mod:`.wire` the messages between them.
"""
