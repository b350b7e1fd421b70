"""DegradationPolicy: every transition, what each state allows, and the transition log."""

from __future__ import annotations

import logging

import pytest

from fleet.control import Confidence, DegradationConfig, DegradationPolicy, State

CFG = DegradationConfig(pause_below=0.5, recover_above=0.7, recover_checks=3, max_consecutive_failures=2)


def conf(value: float, novel: bool = False, known: bool = True, **components: float) -> Confidence:
    return Confidence(value, [f"test {value}"], dict(components), known=known, is_novel=novel)


GOOD, LOW, NOVEL = conf(0.9), conf(0.2), conf(0.1, novel=True, ood_distance_confidence=0.1)


def test_starts_normal_and_moves():
    p = DegradationPolicy(CFG)
    assert p.state is State.NORMAL and p.may_move and not p.needs_human and p.velocity_scale == 1.0
    assert p.update(GOOD) is State.NORMAL and len(p.transitions) == 0


def test_normal_to_paused_on_low_confidence():
    p = DegradationPolicy(CFG)
    assert p.update(LOW, tick=7, t=1.5) is State.PAUSED
    assert not p.may_move and p.needs_human
    tr = p.transitions[-1]
    assert (tr.source, tr.target, tr.tick, tr.t) == (State.NORMAL, State.PAUSED, 7, 1.5) and "0.20 < 0.5" in tr.reason
    assert p.update(GOOD) is State.PAUSED  # confidence does not unpause: a human does


def test_paused_to_human_to_normal():
    p = DegradationPolicy(CFG)
    p.update(LOW)
    assert p.human_takeover(tick=9) is State.HUMAN and p.may_move and not p.needs_human
    assert p.update(LOW) is State.HUMAN  # ignored while the human drives
    assert p.human_release(tick=20) is State.NORMAL
    assert [(t.source, t.target) for t in p.transitions] == [
        (State.NORMAL, State.PAUSED),
        (State.PAUSED, State.HUMAN),
        (State.HUMAN, State.NORMAL),
    ]


def test_release_without_takeover_is_refused():
    with pytest.raises(ValueError, match="human_release: expected state 'human'"):
        DegradationPolicy(CFG).human_release()


def test_more_than_n_consecutive_failures_escalate():
    p = DegradationPolicy(CFG)  # N = 2
    p.episode_end(False), p.episode_end(False)
    assert p.state is State.NORMAL and p.consecutive_failures == 2
    p.episode_end(True)  # a success breaks the streak
    assert p.consecutive_failures == 0
    for _ in range(2):
        p.episode_end(False)
    assert p.episode_end(False) is State.ESCALATED
    assert not p.may_move and p.needs_human and "3 consecutive failed episodes > 2" in p.transitions[-1].reason


def test_escalated_is_left_only_by_reset():
    p = DegradationPolicy(CFG)
    p.human_takeover()
    for _ in range(3):
        p.episode_end(False)  # failures escalate from any state, the human's too
    assert p.state is State.ESCALATED
    assert p.update(GOOD) is State.ESCALATED and p.episode_end(True) is State.ESCALATED
    with pytest.raises(ValueError, match="escalated"):
        p.human_takeover()
    assert p.reset(reason="operator cleared") is State.NORMAL and p.consecutive_failures == 0
    assert p.transitions[-1].reason == "operator cleared"


def test_novel_scene_goes_conservative_and_recovers_after_m_good_checks():
    p = DegradationPolicy(CFG)
    assert p.update(NOVEL) is State.CONSERVATIVE  # slows down rather than pausing
    assert p.may_move and p.velocity_scale == 0.5
    p.update(GOOD), p.update(GOOD)
    p.update(conf(0.6))  # between the thresholds: the streak restarts, no pause
    assert p.state is State.CONSERVATIVE
    p.update(GOOD), p.update(GOOD)
    assert p.state is State.CONSERVATIVE
    assert p.update(GOOD) is State.NORMAL and p.velocity_scale == 1.0
    assert "for 3 checks" in p.transitions[-1].reason


def test_novelty_again_restarts_the_recovery_streak():
    p = DegradationPolicy(CFG)
    p.update(NOVEL), p.update(GOOD), p.update(GOOD)
    p.update(NOVEL)
    p.update(GOOD), p.update(GOOD)
    assert p.state is State.CONSERVATIVE


def test_conservative_pauses_on_low_confidence():
    p = DegradationPolicy(CFG)
    p.update(NOVEL)
    assert p.update(LOW) is State.PAUSED


def test_novel_with_another_weak_signal_pauses():
    p = DegradationPolicy(CFG)
    unsure = conf(0.1, novel=True, ood_distance_confidence=0.1, disagreement_confidence=0.2)
    assert p.update(unsure) is State.PAUSED


def test_unknown_confidence_policy():
    unknown = conf(1.0, known=False)
    assert DegradationPolicy(CFG).update(unknown) is State.NORMAL
    strict = DegradationConfig(unknown_is_low=True)
    assert DegradationPolicy(strict).update(unknown) is State.PAUSED


def test_transitions_are_bounded_and_logged(caplog):
    p = DegradationPolicy(DegradationConfig(history=2))
    with caplog.at_level(logging.INFO, logger="fleet.control.degradation"):
        p.update(LOW), p.human_takeover(), p.human_release()
    assert len(p.transitions) == 2 and p.transitions[0].target is State.HUMAN
    assert "normal -> paused" in caplog.text and "human -> normal" in caplog.text
    assert p.transitions[-1].to_dict() == {"from": "human", "to": "normal", "reason": "human released control"} | {
        "tick": None,
        "t": None,
    }


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pause_below": 1.5}, "pause_below"),
        ({"pause_below": 0.8, "recover_above": 0.7}, "recover_above"),
        ({"recover_checks": 0}, "recover_checks"),
        ({"max_consecutive_failures": 0}, "max_consecutive_failures"),
        ({"conservative_velocity_scale": 0.0}, "conservative_velocity_scale"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DegradationConfig(**kwargs)


def test_bad_arguments():
    p = DegradationPolicy(CFG)
    with pytest.raises(ValueError, match="conf"):
        p.update(0.3)
    with pytest.raises(ValueError, match="success"):
        p.episode_end(1)
