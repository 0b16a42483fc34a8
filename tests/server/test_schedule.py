"""The phase plan, without Flower."""

from __future__ import annotations

import pytest

from server.federation_config import PhaseConfig, PhasesSection
from server.schedule import ScheduleError, phase_for_round, phase_plan, steps_after, total_rounds


@pytest.mark.parametrize("pre, fine, names", [
    (2, 1, ["pretrain 1/2", "pretrain 2/2", "hand-off", "finetune 1/1", "final evaluation"]),
    (0, 2, ["hand-off", "finetune 1/2", "finetune 2/2", "final evaluation"]),
    (1, 0, ["pretrain 1/1"]),
])
def test_plan_order(pre: int, fine: int, names: list[str]) -> None:
    phases = PhasesSection(pretrain=PhaseConfig(rounds=pre), finetune=PhaseConfig(rounds=fine))
    plan = phase_plan(phases)
    assert [s.name for s in plan] == names
    assert [s.index for s in plan] == list(range(len(plan)))
    rounds = [s.server_round for s in plan if s.kind == "train"]
    assert rounds == list(range(1, total_rounds(phases) + 1))
    assert all(phase_for_round(s.server_round, phases) == s.phase for s in plan if s.kind == "train")


def test_evaluate_every() -> None:
    phases = PhasesSection(pretrain=PhaseConfig(rounds=4, evaluate_every=3),
                           finetune=PhaseConfig(rounds=2, evaluate_every=0))
    plan = phase_plan(phases)
    assert [s.evaluate for s in plan if s.kind == "train"] == [False, False, True, True, False, False]


def test_steps_after_and_errors() -> None:
    phases = PhasesSection(pretrain=PhaseConfig(rounds=1), finetune=PhaseConfig(rounds=1))
    plan = phase_plan(phases)
    assert steps_after(plan, -1) == plan
    assert [s.name for s in steps_after(plan, 1)] == ["finetune 1/1", "final evaluation"]
    assert steps_after(plan, len(plan) - 1) == []
    with pytest.raises(ScheduleError, match="completed step 9 is not in this schedule of 4 steps"):
        steps_after(plan, 9)
    with pytest.raises(ScheduleError, match=r"server round 3 is outside the schedule's rounds 1..2"):
        phase_for_round(3, phases)


def test_cross_site_step_follows_the_final_evaluation() -> None:
    phases = PhasesSection(pretrain=PhaseConfig(rounds=1), finetune=PhaseConfig(rounds=1))
    plan = phase_plan(phases, cross_site=True)
    assert [s.name for s in plan][-2:] == ["final evaluation", "cross-site evaluation"]
    assert plan[-1].kind == "cross-site" and plan[-1].index == len(plan) - 1
    # no classifier, no matrix: a pretrain-only plan has neither step
    assert [s.kind for s in phase_plan(PhasesSection(pretrain=PhaseConfig(rounds=1),
                                                     finetune=PhaseConfig(rounds=0)), cross_site=True)] == ["train"]
