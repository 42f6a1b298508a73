"""The barge-in bench through a real aiortc peer: it measures what it says and the cut is clean."""

from __future__ import annotations


async def test_barge_in_bench_measures_the_ear_and_the_cut_has_no_click():
    """One barge-in over loopback (fake models, a plain client that mutes nothing itself): the bench
    finds the onset and the agent's last audible sample at the client, the server's own figure and
    the split between the way in and the way out; the cut makes no click (a 10 ms fade from where
    the audio that went out ended). Drops and underruns are printed, not asserted: a loaded CI
    machine may stall the sender."""
    from duplex.transport.barge_bench import measure_webrtc

    row, = await measure_webrtc(runs=1, prefetch=2, lead_s=0.6)
    print(row)
    assert row["ear_ms"] is not None and row["server_ms"] is not None
    assert row["out_ms"] > 40  # the client's jitter buffer alone holds two 20 ms frames
    assert row["cut_clicks"] == 0


async def test_barge_in_on_the_sound_card_path_takes_back_what_waits_without_a_click():
    """The same through duplex mic's path on a simulated sound card: the barge-in is found, the
    speaker's queue gives back what it held beyond one block (the session plays it again on resume)
    and the speaker plays on from the kept block into the fade without a click (were the taken-back
    frames not rewound, or resampled again from the wrong state, the waveform would jump there)."""
    from duplex.transport.barge_bench import measure_mic

    row, = await measure_mic(runs=1, lead_s=0.6)
    print(row)
    assert row["ear_ms"] is not None and row["server_ms"] is not None
    assert row["cut_clicks"] == 0


async def test_barge_in_over_the_realtime_socket_tells_the_client_and_stops_its_audio():
    """The same over /v1/realtime: a client streaming its microphone and playing each audio delta as
    it comes is told output_audio_buffer.cleared after the onset, and the server sends no audible
    audio after that (the pause stopped the reply's frames at their source, not only in the client)."""
    from duplex.transport.barge_bench import measure_realtime

    row, = await measure_realtime(runs=1, lead_s=0.6)
    print(row)
    assert row["told_ms"] is not None and row["told_ms"] > 0
    assert row["late_deltas"] == 0
