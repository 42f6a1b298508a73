"""The barge-in bench through a real aiortc peer: it measures what it says and the cut is clean."""

from __future__ import annotations


async def test_barge_in_bench_measures_the_ear_and_the_cut_has_no_click():
    """One barge-in over loopback (fake models, a plain client that mutes nothing itself): the bench
    finds the onset and the agent's last audible sample at the client, the server's own figure and
    the split between the way in and the way out; the agent's audio at the client has no click,
    the cut included (a 10 ms fade), no frame was dropped and the reply had no underrun."""
    from duplex.transport.barge_bench import measure_webrtc

    row, = await measure_webrtc(runs=1, prefetch=2, lead_s=0.6)
    print(row)
    assert row["ear_ms"] is not None and row["server_ms"] is not None
    assert row["out_ms"] > 40  # the client's jitter buffer alone holds two 20 ms frames
    assert row["clicks"] == 0 and row["dropped"] == 0 and row["underruns"] == 0
