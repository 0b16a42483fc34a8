"""The site's privacy-budget ledger: one JSON file recording every DP-SGD round this site has ever trained.

The promise a hospital's data protection officer signs is "at most epsilon (at delta), in total". The ledger
keeps it across rounds, both phases, restarts and crashes:

* before a round trains, :meth:`PrivacyLedger.reserve` composes the round's planned ``(sigma, q, steps)``
  with everything already recorded; if the total epsilon would exceed the budget it raises
  :class:`~lungmae_core.errors.PrivacyBudgetExceeded` and records nothing but the refusal;
* otherwise it writes the round as ``reserved`` (file written to a temporary name, fsynced and renamed)
  *before* the first training step, so a process killed at any later point leaves a ledger that already
  counts the round in full: it can over-count a round that never released weights, never under-count;
* after training, :meth:`PrivacyLedger.settle` replaces the planned steps by the steps really taken (never
  more than planned) and marks the round ``trained``; only then may the client send its weights.

Epsilon is recomputed from the whole history with Opacus' RDP accountant at the ledger's ``delta``, which is
fixed when the ledger is created (from ``site.yaml`` or ``1 / (10 N)``), so every number the site reports is
stated at the same delta. A ledger that cannot be read is an error, never an empty history.

File format (``format: lungmae-privacy-ledger/1``)::

    {"format": ..., "site": "north", "delta": 1e-05, "accountant": "rdp",
     "entries": [{"id": 1, "phase": "pretrain", "server_round": 1, "noise_multiplier": 1.1,
                  "sample_rate": 0.25, "steps": 8, "planned_steps": 8, "max_grad_norm": 1.0,
                  "status": "trained", "epsilon_total": 0.93, "reserved_at": "...", "settled_at": "..."}],
     "refusals": [{"phase": "finetune", "server_round": 7, "epsilon_spent": 2.9,
                   "epsilon_would_be": 3.4, "budget": 3.0, "at": "..."}]}
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lungmae_core.errors import LungMAEError, PrivacyBudgetExceeded
from lungmae_core.privacy import RoundPlan, epsilon_for

__all__ = ["LEDGER_FORMAT", "LedgerError", "LedgerEntry", "PrivacyLedger"]

logger = logging.getLogger(__name__)

LEDGER_FORMAT = "lungmae-privacy-ledger/1"
_STATUSES = ("reserved", "trained")


class LedgerError(LungMAEError):
    """The privacy ledger is unreadable, malformed or inconsistent; the site must not train until it is fixed."""


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """One DP-SGD round in the ledger.

    Args:
        id: 1, 2, ... in the order rounds were reserved.
        phase: ``"pretrain"`` or ``"finetune"`` (free text; it is only reported).
        server_round: the federation's round number.
        noise_multiplier, sample_rate, steps: the accountant's ``(sigma, q, T)``; ``steps`` is the planned
            count while ``reserved`` and the count really taken once ``trained``.
        planned_steps: the steps reserved before training.
        max_grad_norm: ``C`` (reported; epsilon does not depend on it).
        status: ``"reserved"`` (counted in full: the process may have died after releasing weights) or
            ``"trained"``.
        epsilon_total: the site's total epsilon at the ledger's delta once this entry was written.
        reserved_at, settled_at: UTC ISO-8601 times.
    """

    id: int
    phase: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    planned_steps: int
    max_grad_norm: float
    status: str
    epsilon_total: float
    reserved_at: str
    settled_at: str | None = None

    @property
    def history(self) -> tuple[float, float, int]:
        """``(noise_multiplier, sample_rate, steps)`` for the accountant."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class PrivacyLedger:
    """The site's privacy ledger file; every method re-reads the file under an exclusive lock.

    Args:
        path: the ledger file (created with its directory on the first reservation).
        budget_epsilon: the site's total budget (``site.yaml`` privacy ``epsilon``).
        delta: the budget's delta; used to create a new ledger. An existing ledger keeps its own delta
            unless ``delta`` is given explicitly and differs, which is an error (the DPO signed one pair).
        site: the site's name, written into a new ledger.

    Raises:
        LedgerError: when the file exists but cannot be parsed or fails validation.

    Examples:
        >>> ledger = PrivacyLedger(tmp / "privacy-ledger.json", budget_epsilon=3.0, delta=1e-5, site="north")
        >>> entry = ledger.reserve(plan, phase="pretrain", server_round=1)   # raises when over budget
        >>> ledger.settle(entry.id, steps_taken=privacy.steps_taken)        # before the weights leave
        >>> ledger.epsilon_spent()
    """

    def __init__(self, path: str | os.PathLike[str], *, budget_epsilon: float, delta: float | None,
                 site: str = "") -> None:
        if not (isinstance(budget_epsilon, (int, float)) and math.isfinite(budget_epsilon) and budget_epsilon > 0):
            raise LedgerError(f"Unable to open the privacy ledger {path} as the budget epsilon must be > 0; "
                              f"got {budget_epsilon!r}")
        self.path = Path(path)
        self.budget_epsilon = float(budget_epsilon)
        self._delta_arg = delta
        self.site = site
        data = self._read()
        if data is not None and delta is not None and not math.isclose(data["delta"], delta, rel_tol=1e-9):
            raise LedgerError(
                f"Unable to use the privacy ledger {self.path} as it states epsilons at delta {data['delta']:g} "
                f"but site.yaml now sets delta {delta:g}; a budget is one (epsilon, delta) pair. Restore the "
                "original delta, or start a new ledger only with your data protection officer's consent")

    # -- reading and writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on ``<ledger>.lock`` so two processes of one site never interleave."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+") as lock:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - Windows: no advisory locks; one process per site
                yield
                return
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any] | None:
        """The validated file content, or ``None`` when there is no ledger yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LedgerError(f"Unable to read the privacy ledger {self.path} as {exc.strerror or exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LedgerError(
                f"Unable to read the privacy ledger {self.path} as it is not valid JSON (line {exc.lineno}: "
                f"{exc.msg}). It is never written in place, so this is outside damage: restore it from backup; "
                "training stays refused until then") from exc
        return self._validate(data)

    def _validate(self, data: Any) -> dict[str, Any]:
        where = f"privacy ledger {self.path}"
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise LedgerError(f"Unable to read the {where} as its 'format' is {found!r}; expected {LEDGER_FORMAT!r}")
        delta = data.get("delta")
        if not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise LedgerError(f"Unable to read the {where} as its 'delta' is {delta!r}; expected a number in (0, 1)")
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise LedgerError(f"Unable to read the {where} as 'entries' is not a list")
        fields = {f.name for f in dataclasses.fields(LedgerEntry)}
        required = fields - {"settled_at"}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not required <= set(entry) or not set(entry) <= fields:
                keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise LedgerError(f"Unable to read the {where} as entry {i + 1} has keys {keys}; "
                                  f"expected {sorted(required)}")
            sigma, q, steps = entry["noise_multiplier"], entry["sample_rate"], entry["steps"]
            if not (isinstance(sigma, (int, float)) and sigma > 0 and isinstance(q, (int, float)) and 0 < q <= 1
                    and isinstance(steps, int) and steps >= 0 and entry["status"] in _STATUSES):
                raise LedgerError(
                    f"Unable to read the {where} as entry {i + 1} has noise_multiplier {sigma!r}, sample_rate "
                    f"{q!r}, steps {steps!r}, status {entry['status']!r}; expected sigma > 0, q in (0, 1], "
                    f"steps >= 0 and status in {_STATUSES}")
        data.setdefault("refusals", [])
        return data

    def _write(self, data: dict[str, Any]) -> None:
        """Write atomically: temporary file in the same directory, fsync, rename, fsync the directory."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.path.parent)

    def _load_or_new(self) -> dict[str, Any]:
        data = self._read()
        if data is not None:
            return data
        if self._delta_arg is None:
            raise LedgerError(f"Unable to create the privacy ledger {self.path} without a delta")
        return {"format": LEDGER_FORMAT, "site": self.site, "delta": float(self._delta_arg),
                "accountant": "rdp", "created_at": _now(), "entries": [], "refusals": []}

    # -- queries ------------------------------------------------------------------------------------
    @property
    def delta(self) -> float | None:
        """The delta all epsilons are stated at (the file's, else the one a new ledger will get)."""
        data = self._read()
        return float(data["delta"]) if data is not None else self._delta_arg

    def entries(self) -> list[LedgerEntry]:
        """Every recorded round, oldest first."""
        data = self._read()
        return [] if data is None else [LedgerEntry(**e) for e in data["entries"]]

    def history(self) -> list[tuple[float, float, int]]:
        """The accountant history of every recorded round (reserved ones in full)."""
        return [e.history for e in self.entries()]

    def epsilon_spent(self) -> float:
        """Total epsilon at :attr:`delta` of everything recorded; 0.0 for a new ledger."""
        delta = self.delta
        return 0.0 if delta is None else epsilon_for(self.history(), delta)

    def epsilon_with(self, plan: RoundPlan) -> float:
        """Total epsilon if ``plan`` were trained next (what :meth:`reserve` compares with the budget)."""
        delta = self.delta
        assert delta is not None
        return epsilon_for(self.history() + [plan.history], delta)

    def refusals(self) -> list[dict[str, Any]]:
        """The rounds this site refused, oldest first (phase, round, epsilons, budget, time)."""
        data = self._read()
        return [] if data is None else list(data["refusals"])

    # -- the two writes around a round --------------------------------------------------------------
    def reserve(self, plan: RoundPlan, *, phase: str, server_round: int) -> LedgerEntry:
        """Record ``plan`` as spent before training it, or refuse if it would exceed the budget.

        Raises:
            PrivacyBudgetExceeded: with the spent, would-be and budget epsilons; the refusal is recorded.
            LedgerError: when the ledger cannot be read or written.
        """
        with self._locked():
            data = self._load_or_new()
            delta = float(data["delta"])
            if not math.isclose(plan.delta, delta, rel_tol=1e-9):
                raise LedgerError(f"Unable to reserve a round planned at delta {plan.delta:g} in the privacy ledger "
                                  f"{self.path}, which states epsilons at delta {delta:g}")
            history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in data["entries"]]
            spent = epsilon_for(history, delta)
            would_be = epsilon_for(history + [plan.history], delta)
            if would_be > self.budget_epsilon:
                data["refusals"].append({"phase": phase, "server_round": int(server_round),
                                         "epsilon_spent": spent, "epsilon_would_be": would_be,
                                         "budget": self.budget_epsilon, "at": _now()})
                self._write(data)
                raise PrivacyBudgetExceeded(
                    f"Unable to train {phase} round {server_round} as it would bring this site's privacy spend "
                    f"to epsilon {would_be:.3f}, over its budget {self.budget_epsilon:.3f} (delta {delta:.2g}); "
                    f"spent so far: {spent:.3f} in {len(history)} round(s)")
            entry = LedgerEntry(
                id=1 + max((e["id"] for e in data["entries"]), default=0), phase=str(phase),
                server_round=int(server_round), noise_multiplier=float(plan.noise_multiplier),
                sample_rate=float(plan.sample_rate), steps=int(plan.steps), planned_steps=int(plan.steps),
                max_grad_norm=float(plan.max_grad_norm), status="reserved", epsilon_total=would_be,
                reserved_at=_now())
            data["entries"].append(dataclasses.asdict(entry))
            data["budget_epsilon"] = self.budget_epsilon
            self._write(data)
        logger.info("privacy ledger: reserved %s round %d (epsilon %.3f -> %.3f of %.3f)", phase, server_round,
                    spent, would_be, self.budget_epsilon)
        return entry

    def settle(self, entry_id: int, *, steps_taken: int) -> LedgerEntry:
        """Replace a reservation's planned steps by the steps really taken; call before releasing weights.

        Raises:
            LedgerError: for an unknown entry, or more steps than were reserved (the DP hook stops training
                before that can happen, so this means the ledger was bypassed).
        """
        with self._locked():
            data = self._load_or_new()
            matches = [e for e in data["entries"] if e["id"] == entry_id]
            if not matches:
                raise LedgerError(f"Unable to settle round entry {entry_id} in the privacy ledger {self.path} as "
                                  "it has no such entry")
            entry = matches[0]
            if not 0 <= steps_taken <= entry["planned_steps"]:
                raise LedgerError(
                    f"Unable to settle ledger entry {entry_id} with {steps_taken} DP-SGD steps as only "
                    f"{entry['planned_steps']} were reserved; the round spent more than the ledger allowed")
            entry.update(steps=int(steps_taken), status="trained", settled_at=_now())
            history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in data["entries"]]
            entry["epsilon_total"] = epsilon_for(history, float(data["delta"]))
            self._write(data)
            return LedgerEntry(**entry)
