"""The phase plan of a federated run: pretrain -> hand-off -> finetune -> final evaluation [-> cross-site].

Pure functions, no Flower: the ServerApp walks the plan step by step, checkpoints after each step and,
on restart, continues with the steps after the last completed one. Server rounds are numbered across
the whole run (pretrain rounds 1..N, finetune rounds N+1..N+M), so a round number alone says the phase.

Examples:
    >>> from server.federation_config import PhasesSection, PhaseConfig
    >>> phases = PhasesSection(pretrain=PhaseConfig(rounds=2), finetune=PhaseConfig(rounds=1))
    >>> [s.name for s in phase_plan(phases)]
    ['pretrain 1/2', 'pretrain 2/2', 'hand-off', 'finetune 1/1', 'final evaluation']
    >>> phase_for_round(3, phases)
    'finetune'
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from lungmae_core.contract import FINETUNE, PRETRAIN
from lungmae_core.errors import LungMAEError
from server.federation_config import PhasesSection

__all__ = ["Step", "ScheduleError", "phase_plan", "phase_for_round", "steps_after", "total_rounds"]

StepKind = Literal["train", "handoff", "final", "cross-site"]


class ScheduleError(LungMAEError, ValueError):
    """A round or step number outside the plan (e.g. a checkpoint from a longer schedule)."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the plan.

    Args:
        index: position in the plan, from 0 (what ``state.json`` records as completed).
        kind: ``train`` (one federated round), ``handoff`` (MAE encoder -> classifier), ``final`` or
            ``cross-site`` (local fine-tuning at the consenting sites, every model scored at every site).
        phase: ``pretrain`` or ``finetune`` for rounds; ``finetune`` for the hand-off, final and cross-site steps.
        server_round: round number across the run (from 1) for ``train`` steps; 0 otherwise.
        phase_round: round within its phase (from 1); 0 for other steps.
        phase_rounds: number of rounds of the phase.
        evaluate: whether the sites evaluate the new global model on their validation split after it.
    """

    index: int
    kind: StepKind
    phase: str
    server_round: int = 0
    phase_round: int = 0
    phase_rounds: int = 0
    evaluate: bool = False

    @property
    def name(self) -> str:
        if self.kind == "train":
            return f"{self.phase} {self.phase_round}/{self.phase_rounds}"
        return {"handoff": "hand-off", "final": "final evaluation"}.get(self.kind, "cross-site evaluation")


def total_rounds(phases: PhasesSection) -> int:
    """Number of federated training rounds of the run (pretrain + finetune)."""
    return phases.pretrain.rounds + phases.finetune.rounds


def phase_for_round(server_round: int, phases: PhasesSection) -> str:
    """The phase of ``server_round`` (1-based, numbered across the run).

    Raises:
        ScheduleError: when the round is outside 1..pretrain+finetune rounds.
    """
    total = total_rounds(phases)
    if not 1 <= server_round <= total:
        raise ScheduleError(f"server round {server_round} is outside the schedule's rounds 1..{total}")
    return PRETRAIN if server_round <= phases.pretrain.rounds else FINETUNE


def phase_plan(phases: PhasesSection, *, cross_site: bool = False) -> list[Step]:
    """All steps of the run in order (``cross_site``: a cross-site step after the final evaluation).

    The hand-off and the final evaluation happen only when there are finetune rounds; a run with
    finetune rounds but no pretrain rounds starts the classifier from a randomly initialised encoder
    (the from-scratch baseline) and still has its hand-off step, which then builds that classifier.
    """
    steps: list[Step] = []
    server_round = 0

    def add(kind: StepKind, phase: str, **kw: int | bool) -> None:
        steps.append(Step(index=len(steps), kind=kind, phase=phase, **kw))  # type: ignore[arg-type]

    for phase, cfg in ((PRETRAIN, phases.pretrain), (FINETUNE, phases.finetune)):
        if phase == FINETUNE and cfg.rounds > 0:
            add("handoff", FINETUNE)
        for r in range(1, cfg.rounds + 1):
            server_round += 1
            evaluate = cfg.evaluate_every > 0 and (r % cfg.evaluate_every == 0 or r == cfg.rounds)
            add("train", phase, server_round=server_round, phase_round=r, phase_rounds=cfg.rounds,
                evaluate=evaluate)
    if phases.finetune.rounds > 0:
        add("final", FINETUNE)
        if cross_site:
            add("cross-site", FINETUNE)
    return steps


def steps_after(plan: list[Step], completed_index: int) -> list[Step]:
    """The steps still to run when step ``completed_index`` is the last completed one (-1: none).

    Raises:
        ScheduleError: when ``completed_index`` is not in the plan (a state from another schedule).
    """
    if not -1 <= completed_index < len(plan):
        raise ScheduleError(
            f"completed step {completed_index} is not in this schedule of {len(plan)} steps; "
            "was the run started with a different federation config?")
    return plan[completed_index + 1:]
