"""The turn-taking and barge-in policy as a pure state machine (no audio, no models)."""

import pytest

from duplex.config import TurnConfig
from duplex.turns import (CancelReply, CheckBargeIn, EndTurn, Interrupt, Pause, Phase, Resume, Speculate, TurnPolicy,
                          Withdraw)

R = 16_000


def s(seconds: float) -> int:
    return int(seconds * R)


def test_turn_ends_after_long_silence_without_completeness_signal():
    """With words, a closed utterance and no sign the message is complete, the turn ends only after
    max_silence_s of silence, and the action carries the text and where speech stopped."""
    p = TurnPolicy(TurnConfig(speculate=False, min_silence_s=0.3, max_silence_s=1.0))
    p.speech_started(s(0.5))
    p.transcript("what time")
    assert p.speech_stopped(s(2.0)) == []
    assert p.final("what time is it") == []
    assert p.advance(s(2.9)) == []
    assert p.advance(s(3.0)) == [EndTurn("what time is it", s(2.0))]
    assert p.phase is Phase.THINKING


def test_llm_estimate_or_eou_token_shortens_the_wait():
    """A high end-of-turn probability for the current text (or an EOU final) ends the turn after
    min_silence_s; an estimate for stale text is ignored."""
    p = TurnPolicy(TurnConfig(speculate=False, min_silence_s=0.3, max_silence_s=1.0))
    p.speech_started(0)
    p.speech_stopped(s(1.0))
    p.final("book a table")
    p.eot_estimate(0.9, "book a")  # stale: for older text
    assert p.advance(s(1.3)) == []
    assert p.eot_estimate(0.9, "book a table") == [EndTurn("book a table", s(1.0))]

    q = TurnPolicy(TurnConfig(speculate=False, min_silence_s=0.3, max_silence_s=1.0))
    q.speech_started(0)
    q.speech_stopped(s(1.0))
    q.advance(s(1.35))
    assert q.final("thanks", eou=True) == [EndTurn("thanks", s(1.0))]


def test_no_turn_without_words_or_before_the_final():
    """Noise (speech with no words) never ends a turn, and the turn waits for the ASR's final."""
    p = TurnPolicy(TurnConfig(speculate=False, max_silence_s=0.5))
    p.speech_started(0)
    p.speech_stopped(s(0.3))
    p.final("")
    assert p.advance(s(5)) == []
    p.speech_started(s(5))
    p.transcript("hello")
    p.speech_stopped(s(6))
    assert p.advance(s(7)) == []  # ASR has not closed the utterance yet
    assert p.final("hello") == [EndTurn("hello", s(6))]


def test_user_going_on_while_agent_thinks_cancels_reply_and_keeps_words():
    """Speech during THINKING cancels the unheard reply; the next turn holds all the user's words."""
    p = TurnPolicy(TurnConfig(speculate=False, max_silence_s=0.5))
    p.speech_started(0)
    p.speech_stopped(s(1))
    p.final("I want")
    assert p.advance(s(1.5)) == [EndTurn("I want", s(1))]
    assert p.speech_started(s(1.6)) == [CancelReply()]
    p.speech_stopped(s(2.5))
    p.final("a pizza")
    assert p.advance(s(3.0)) == [EndTurn("I want a pizza", s(2.5))]


def _speaking_policy(**cfg) -> TurnPolicy:
    p = TurnPolicy(TurnConfig(speculate=False, max_silence_s=0.5, **cfg))
    p.speech_started(0)
    p.speech_stopped(s(1))
    p.final("hi")
    p.advance(s(1.5))
    p.reply_audible()
    assert p.phase is Phase.SPEAKING
    return p


def test_barge_in_pauses_then_words_interrupt():
    """Speech over the agent pauses at once; words that are not a backchannel interrupt, and they
    start the user's next turn."""
    p = _speaking_policy()
    assert p.speech_started(s(3)) == [Pause(s(3))]
    assert p.transcript("stop") == [CheckBargeIn("stop")]
    assert p.transcript("stop please") == []  # one check at a time
    assert p.barge_in_verdict(False, "stop") == [CheckBargeIn("stop please")]  # about older words: ask again
    assert p.barge_in_verdict(False, "stop please") == [Interrupt("stop please")]
    assert p.phase is Phase.LISTENING
    p.speech_stopped(s(4))
    assert p.final("stop please") == []
    assert p.advance(s(4.5)) == [EndTurn("stop please", s(4))]


def test_false_interruption_resumes_after_quiet():
    """A barge-in with no words resumes once the speech has been over for false_interruption_s."""
    p = _speaking_policy(false_interruption_s=0.6)
    p.speech_started(s(3))
    p.speech_stopped(s(3.2))
    p.final("")
    assert p.advance(s(3.7)) == []
    assert p.advance(s(3.8)) == [Resume()]
    assert p.phase is Phase.SPEAKING


def test_backchannel_resumes_and_is_not_a_turn():
    """A backchannel verdict resumes playback, and its words never become a user turn."""
    p = _speaking_policy()
    p.speech_started(s(3))
    assert p.transcript("mm-hm") == [CheckBargeIn("mm-hm")]
    assert p.barge_in_verdict(True, "mm-hm") == [Resume()]
    p.speech_stopped(s(3.4))
    assert p.final("mm-hm") == []
    p.reply_finished()
    assert p.advance(s(10)) == []
    assert p.user_text == ""


def test_words_without_speech_are_ignored():
    """ASR output on silence (no VAD speech) neither interrupts the agent nor becomes a turn."""
    p = _speaking_policy()
    assert p.transcript("under under") == []
    assert p.final("under under") == []
    assert p.phase is Phase.SPEAKING
    p.reply_finished()
    assert p.transcript("under") == [] and p.advance(s(20)) == [] and p.user_text == ""


def test_a_stale_backchannel_verdict_never_swallows_an_interruption():
    """Regression: paused on "yeah", a check starts for "yeah"; the words grow to "yeah but wait stop
    that" while it runs; its verdict "backchannel" is about words the user has gone beyond, so it is
    dropped and the check is asked again about the words now, whose verdict interrupts."""
    p = _speaking_policy()
    p.speech_started(s(3))
    assert p.transcript("yeah") == [CheckBargeIn("yeah")]
    assert p.transcript("yeah but wait stop that") == []
    assert p.barge_in_verdict(True, "yeah") == [CheckBargeIn("yeah but wait stop that")]
    assert p.phase is Phase.PAUSED and p.user_text == "yeah but wait stop that"
    assert p.barge_in_verdict(False, "yeah but wait stop that") == [Interrupt("yeah but wait stop that")]
    p.speech_stopped(s(5))
    p.final("yeah but wait stop that")
    assert p.advance(s(6)) == [EndTurn("yeah but wait stop that", s(5))]


def test_a_failed_check_yields_and_no_pause_outlives_its_bound():
    """Regression: a check that fails (verdict None) counts as an interruption, and a check that never
    answers cannot freeze the session: after max_pause_s the policy yields (words) or resumes (none),
    a late verdict is dropped, and turns end again."""
    p = _speaking_policy()
    p.speech_started(s(3))
    p.transcript("hold on")
    assert p.barge_in_verdict(None, "hold on") == [Interrupt("hold on")]

    q = _speaking_policy(max_pause_s=2.0)
    q.speech_started(s(3))
    assert q.transcript("wait") == [CheckBargeIn("wait")]
    q.speech_stopped(s(3.5))
    q.final("wait")
    assert q.advance(s(4.9)) == []  # the check is still out
    assert q.advance(s(5.0)) == [Interrupt("wait")]
    assert q.barge_in_verdict(True, "wait") == []  # too late
    assert q.advance(s(6)) == [EndTurn("wait", s(3.5))]

    r = _speaking_policy(max_pause_s=2.0, false_interruption_s=5.0)
    r.speech_started(s(3))  # a noise with no words, and a long false-interruption wait
    assert r.advance(s(5.0)) == [Resume()] and r.phase is Phase.SPEAKING


def _speaking(p: TurnPolicy) -> None:
    """The agent is speaking its reply to a first turn (from 3 s)."""
    p.speech_started(0)
    p.transcript("tell me a story")
    p.speech_stopped(s(1))
    p.final("tell me a story")
    assert p.advance(s(3)) == [EndTurn("tell me a story", s(1))]
    p.reply_audible()


def test_a_backchannel_interrupt_in_one_breath_pauses_again_and_interrupts():
    """The user says "yeah but wait stop that" in one breath: the check of "yeah" answers backchannel
    before the words grow and the agent resumes, but the words that follow in the same utterance are
    new speech over it: it pauses again at once, checks the whole utterance and yields; the turn
    holds every word."""
    p = TurnPolicy(TurnConfig())
    _speaking(p)
    assert p.speech_started(s(4)) == [Pause(s(4))]
    assert p.transcript("yeah") == [CheckBargeIn("yeah")]
    assert p.barge_in_verdict(True, "yeah") == [Resume()]
    assert p.transcript("yeah") == []  # the judged words again: nothing new
    assert p.transcript("yeah but wait") == [Pause(s(4)), CheckBargeIn("yeah but wait")]
    assert p.phase is Phase.PAUSED
    assert p.transcript("yeah but wait stop that") == []  # one check at a time
    assert p.barge_in_verdict(False, "yeah but wait") == [CheckBargeIn("yeah but wait stop that")]  # grown: ask again
    assert p.barge_in_verdict(False, "yeah but wait stop that") == [Interrupt("yeah but wait stop that")]
    p.speech_stopped(s(6))
    p.final("yeah but wait stop that")
    assert p.user_text == "yeah but wait stop that" and p.phase is Phase.LISTENING


def test_a_backchannel_then_words_after_a_comma_pause_interrupt_too():
    """"yeah, ... wait stop": the VAD ends the speech after "yeah" and hears it start again before
    the ASR closes the utterance; the new words pause the agent again and are checked. A plain
    backchannel ("mm-hm") whose final adds nothing leaves the agent speaking and nothing in the turn."""
    p = TurnPolicy(TurnConfig())
    _speaking(p)
    p.speech_started(s(4))
    p.transcript("yeah")
    assert p.barge_in_verdict(True, "yeah") == [Resume()]
    p.speech_stopped(s(4.4))
    assert p.speech_started(s(4.6)) == [Pause(s(4.6))]  # speech again: paused at once (as any speech)
    assert p.transcript("yeah wait stop") == [CheckBargeIn("yeah wait stop")]
    assert p.barge_in_verdict(False, "yeah wait stop") == [Interrupt("yeah wait stop")]

    q = TurnPolicy(TurnConfig())
    _speaking(q)
    q.speech_started(s(4))
    q.transcript("mm-hm")
    assert q.barge_in_verdict(True, "mm-hm") == [Resume()]
    q.speech_stopped(s(4.5))
    assert q.final("mm-hm") == [] and q.user_text == "" and q.phase is Phase.SPEAKING
    assert q.advance(s(8)) == [] and q.phase is Phase.SPEAKING


def test_the_issue_reproduction_pauses_and_keeps_the_words():
    """Issue 21's policy-only reproduction: "yeah" judged a backchannel, then the partial "yeah but
    wait stop that" of the same utterance. It was ignored (the agent talked over the user and the
    words were lost); it pauses the agent at the speech's onset and asks about the whole utterance."""
    p = TurnPolicy(TurnConfig())
    _speaking(p)
    p.speech_started(s(4))
    p.transcript("yeah")
    assert p.barge_in_verdict(True, "yeah") == [Resume()]
    assert p.transcript("yeah but wait stop that") == [Pause(s(4)), CheckBargeIn("yeah but wait stop that")]
    assert p.phase is Phase.PAUSED and p.user_text == "yeah but wait stop that"


@pytest.mark.parametrize("comma_pause", [False, True], ids=["one-breath", "comma-pause"])
@pytest.mark.parametrize("slow_check", [False, True], ids=["fast-check", "slow-check"])
def test_a_backchannel_led_interruption_is_never_talked_over(comma_pause: bool, slow_check: bool):
    """"yeah ... but wait stop that" over the agent, in one breath or with a comma pause shorter than
    the VAD's hangover (the speech stops and starts again before the ASR closes the utterance), with
    a check that answers before the words grow (fast) or after (slow: its verdict about "yeah" is
    stale). Whatever the order, the agent is paused from the moment the new words arrive until the
    interruption, never resumed under them, and the next turn holds every word."""
    p = TurnPolicy(TurnConfig())
    _speaking(p)
    assert p.speech_started(s(4)) == [Pause(s(4))]
    assert p.transcript("yeah") == [CheckBargeIn("yeah")]
    onset = s(4)
    actions: list = []
    if not slow_check:
        assert p.barge_in_verdict(True, "yeah") == [Resume()]
    if comma_pause:
        actions += p.speech_stopped(s(4.3))
        actions += p.speech_started(s(4.45))
        onset = s(4.45)
    actions += p.transcript("yeah but wait stop that")
    if slow_check:
        actions += p.barge_in_verdict(True, "yeah")  # about older words: asked again
    else:
        assert actions[0] == Pause(onset)
    assert actions[-1] == CheckBargeIn("yeah but wait stop that")
    assert Resume() not in actions and p.phase is Phase.PAUSED
    assert p.barge_in_verdict(False, "yeah but wait stop that") == [Interrupt("yeah but wait stop that")]
    p.speech_stopped(s(6))
    p.final("yeah but wait stop that")
    assert p.advance(s(8)) == [EndTurn("yeah but wait stop that", s(6))]


def test_only_the_exact_words_judged_are_dropped():
    """What counts as the backchannel is the exact words judged, not how many there were: "yeah
    yeah" judged, a revision to "yeah wait" is new speech; the judged words again (in any case or
    punctuation) or the start of them are not."""
    p = TurnPolicy(TurnConfig())
    _speaking(p)
    p.speech_started(s(4))
    p.transcript("yeah yeah")
    assert p.barge_in_verdict(True, "yeah yeah") == [Resume()]
    assert p.transcript("yeah") == [] and p.transcript("Yeah, yeah.") == []
    assert p.transcript("yeah wait") == [Pause(s(4)), CheckBargeIn("yeah wait")]

    q = TurnPolicy(TurnConfig())
    _speaking(q)
    q.speech_started(s(4))
    q.transcript("okay")
    assert q.barge_in_verdict(True, "okay") == [Resume()]
    q.speech_stopped(s(4.4))
    assert q.final("Okay.") == [] and q.user_text == "" and q.phase is Phase.SPEAKING


def test_a_voiced_window_pauses_at_once_and_its_end_before_speech_resumes():
    """The VAD's first voiced window over the agent pauses it (barge-in one window in, not
    min_speech_ms later). If that voice ends before it is speech (a click, a cough), the agent
    resumes after onset_hold_s of quiet (a dip inside the first syllable does not resume it), and the
    quiet since the last utterance does not resume it early; if it becomes
    speech, the pause is that speech's: no second pause, a dip inside the speech does not resume."""
    p = _speaking_policy(false_interruption_s=0.6, onset_hold_s=0.1)
    assert p.voice_edge(s(3), True) == [Pause(s(3))]
    assert p.advance(s(3.02)) == []  # 2 s after the last speech ended: still paused
    assert p.voice_edge(s(3.032), False) == []
    assert p.voice_edge(s(3.1), True) == []  # back within onset_hold_s: a dip, still paused
    assert p.voice_edge(s(3.132), False) == []
    assert p.advance(s(3.2)) == []
    assert p.advance(s(3.232)) == [Resume()]  # onset_hold_s of quiet: it was no speech
    assert p.phase is Phase.SPEAKING
    assert p.voice_edge(s(4), True) == [Pause(s(4))]
    assert p.speech_started(s(4)) == []
    assert p.voice_edge(s(4.3), False) == []
    assert p.phase is Phase.PAUSED
    assert p.transcript("stop") == [CheckBargeIn("stop")]
    assert p.voice_edge(s(5), True) == [] and p.voice_edge(s(6), False) == []  # not speaking: no pause


def test_speculation_starts_at_the_first_silent_window_and_goes_when_the_voice_returns():
    """A reply is speculated once the voice has been quiet speculate_after_s inside speech, well
    before SpeechStopped (min_silence_ms: the LLM and TTS work hides behind that wait too); a
    shorter dip does not; the voice coming back before the speech ended withdraws it; the stop that
    follows does not speculate the same words twice."""
    p = TurnPolicy(TurnConfig(speculate=True, speculate_after_s=0.064))
    p.speech_started(s(0.5))
    p.transcript("what time")
    assert p.voice_edge(s(0.8), False) == [] and p.advance(s(0.832)) == []
    assert p.voice_edge(s(0.832), True) == []  # a 32 ms dip between words: no guess
    assert p.voice_edge(s(1.0), False) == []
    assert p.advance(s(1.064)) == [Speculate("what time")]
    assert p.voice_edge(s(1.1), True) == [Withdraw()]  # a pause inside the sentence
    p.transcript("what time is it")
    assert p.voice_edge(s(1.6), False) == []
    assert p.advance(s(1.664)) == [Speculate("what time is it")]
    assert p.speech_stopped(s(1.6)) == []  # already speculated on these words
    assert p.final("what time is it") == []
    assert p.voice_edge(s(2.5), False) == [] and p.voice_edge(s(2.6), True) == []  # after the stop: the VAD's business
