"""The alert state machine: exact sequences for scripted conditions (hold time, hysteresis, resolution, rate limit)."""

import pytest

from noisescale.alerts import AlertState, Timing, advance


def script(conditions, timing, positions=None):
    """Feed ``conditions`` (a string of T/F, one per evaluation) through ``advance``; returns the phase after each
    evaluation and the transitions as ``(position, kind, notify)`` (``+late``/``suppressed`` when set)."""
    positions = positions or list(range(1, len(conditions) + 1))
    state = AlertState()
    phases, transitions = [], []
    for at, c in zip(positions, conditions, strict=True):
        state, ts = advance(state, c == "T", at, timing)
        phases.append(state.phase[0])  # i(nactive), p(ending), f(iring)
        for t in ts:
            tag = (at, t.kind, t.notify)
            if t.late:
                tag += ("late",)
            if t.suppressed:
                tag += (f"suppressed={t.suppressed}",)
            transitions.append(tag)
    return "".join(phases), transitions


def test_pending_then_firing_after_hold_then_hysteresis_then_resolved():
    phases, ts = script("TTTFTFFF", Timing(hold_for=2, clear_for=2))
    assert phases == "ppfffffi"
    # step 4 clears, step 5 holds again (hysteresis resets), 6-7 clear for 1 step only, 8: clear for 2 -> resolved
    assert ts == [(1, "pending", True), (3, "firing", True), (8, "resolved", True)]


def test_pending_that_gives_up_is_silent_and_starts_again():
    phases, ts = script("TFTTT", Timing(hold_for=2))
    assert phases == "pippf"
    assert ts == [(1, "pending", True), (3, "pending", True), (5, "firing", True)]


def test_no_hold_no_clear_fires_and_resolves_at_once():
    phases, ts = script("TFTT", Timing())
    assert phases == "fiff"
    assert ts == [(1, "firing", True), (2, "resolved", True), (3, "firing", True)]


def test_cooldown_drops_a_firing_that_resolves_before_it_ends_and_counts_it():
    phases, ts = script("TFTFFFFT", Timing(cooldown=5))
    assert phases == "fifiiiif"
    assert ts == [
        (1, "firing", True),
        (2, "resolved", True),
        (3, "firing", False),  # within 5 steps of the firing notified at 1: held back
        (4, "resolved", False),  # ... and resolved before the cooldown ended: dropped
        (8, "firing", True, "suppressed=1"),  # 7 steps after 1: notified, saying one was dropped
    ]


def test_cooldown_notifies_late_a_firing_that_outlasts_it():
    _, ts = script("TFTTTTT", Timing(cooldown=5))
    assert ts == [(1, "firing", True), (2, "resolved", True), (3, "firing", False), (6, "firing", True, "late")]


def test_reminders_while_firing():
    phases, ts = script("TTTTTTTTF", Timing(hold_for=1, repeat_every=3))
    assert phases == "pfffffffi"
    assert ts == [
        (1, "pending", True),
        (2, "firing", True),
        (5, "reminder", True),
        (8, "reminder", True),
        (9, "resolved", True),
    ]


def test_time_counts_in_examples_when_the_batch_size_changes():
    # batch sizes 32, 32, 128, 128: the condition holds from 32 examples on; hold_for=100 examples
    positions = [32, 64, 192, 320]
    phases, ts = script("TTTT", Timing(hold_for=100), positions)
    assert phases == "ppff"
    assert ts == [(32, "pending", True), (192, "firing", True)]


def test_unmeasured_steps_do_not_stretch_the_hold():
    # measured every 10 steps: the hold counts positions, not evaluations
    phases, ts = script("TTT", Timing(hold_for=15), [10, 20, 30])
    assert phases == "ppf" and ts == [(10, "pending", True), (30, "firing", True)]


@pytest.mark.parametrize("conditions", ["TTFTFFTTTFFFF", "TFTFTFTFTF", "TTTTFFFFTTTT"])
def test_state_survives_a_dict_round_trip_mid_sequence(conditions):
    timing = Timing(hold_for=1, clear_for=2, cooldown=4, repeat_every=3)
    state = AlertState()
    straight = []
    for at, c in enumerate(conditions, 1):
        state, ts = advance(state, c == "T", at, timing, value=float(at))
        straight.append((state, ts))
    state = AlertState()
    resumed = []
    for at, c in enumerate(conditions, 1):
        state = AlertState.from_dict(state.to_dict())
        state, ts = advance(state, c == "T", at, timing, value=float(at))
        resumed.append((state, ts))
    assert resumed == straight
