"""``duplex bench capacity``'s measurement: real aiortc peers in child processes talking to the server.

Proves the row of one size is measured from every process: every peer got a session and a whole
answer, voice-to-voice at the peer's ear is a positive figure for each of them (the children's clock
and the server's are one), the input lag was sampled from the server's sessions, CPU is reported for
the server and for the peers' processes, and the sessions are gone before the next size starts.
"""

from __future__ import annotations

from tests.transport_fixtures import load_agent, running_server



async def test_a_size_of_the_sweep_is_measured_through_real_peers(monkeypatch):
    """Two peers, one per child process (as 64 peers are spread over eight processes of eight)."""
    from duplex.transport import capacity
    from duplex.transport.capacity import measure

    monkeypatch.setattr(capacity, "PEERS_PER_PROCESS", 1)
    agent = await load_agent()
    try:
        async with running_server(agent, max_sessions=4) as (server, url):
            row = await measure(server, agent, url, 2)
            assert not server.peers, "the sessions of a size must be closed before the next size starts"
    finally:
        await agent.aclose()
    assert row["sessions"] == 2 and row["no_session"] == 0 and row["unanswered"] == 0, row
    assert row["peer_processes"] == 2, row
    assert len(row["voice_to_voice_s"]) == 2 and all(0.0 < x < 10.0 for x in row["voice_to_voice_s"]), row
    assert row["input_lag_max_s"] >= row["input_lag_p99_s"] >= 0.0
    assert row["underruns"] == 0 and row["real_time"], row
    assert set(row["cpu_s_per_s"]) == {"server", "peers"} and all(v > 0 for v in row["cpu_s_per_s"].values())


async def test_the_sweep_runs_through_serve_workers_around_one_engine_core():
    """``bench capacity --workers 2``: the peers' sessions run in two worker processes around one
    engine core, as ``duplex serve --workers 2`` runs them; the row is measured from the workers
    (every peer answered, voice-to-voice at each ear) and reports the workers' and the core's CPU."""
    from duplex.cli import build_parser
    from duplex.transport.capacity import _bench

    args = build_parser().parse_args(["bench", "capacity", "--profile", "fake", "--device", "cpu", "--batch", "2",
                                      "--workers", "2"])
    result = await _bench(args)
    row, = result["concurrency"]
    assert result["workers"] == 2 and row["sessions"] == 2, result
    assert row["no_session"] == 0 and row["unanswered"] == 0 and len(row["voice_to_voice_s"]) == 2, row
    assert {"server", "workers", "core", "peers"} <= set(row["cpu_s_per_s"]), row
    assert row["cpu_s_per_s"]["workers"] > 0 and row["cpu_s_per_s"]["core"] > 0, row
