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
fixed when the ledger is created (from ``site.yaml`` or ``min(1e-5, 1 / (10 N))`` for ``N`` patients), so
every number the site reports is stated at the same delta. The unit of accounting is the pseudonymous
patient (``unit: patient``): sampling and clipping are per patient (``lungmae_core.privacy.PatientSampled``).

The ledger cannot silently restart. Beside it, a journal (``privacy-journal.json``, append-only, hash-chained,
written atomically) records that this site has started DP work, and every reset. When the journal (or any
other witness the site names, such as a marker in its cache) shows earlier DP work but the ledger is
missing, DP training is refused until an operator runs ``lungmae site ledger reset --reason ...``, which
archives what is left of the old ledger, records who, when and why in the journal and starts a new one. A
ledger that cannot be read is an error, never an empty history.

File format (``format: lungmae-privacy-ledger/2``)::

    {"format": ..., "site": "north", "delta": 1e-05, "accountant": "rdp", "unit": "patient",
     "entries": [{"id": 1, "phase": "pretrain", "server_round": 1, "run": "4711", "unit": "patient",
                  "num_units": 58, "noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 8,
                  "planned_steps": 8, "max_grad_norm": 0.2, "status": "trained", "epsilon_total": 0.93,
                  "reserved_at": "...", "settled_at": "..."}],
     "refusals": [{"phase": "finetune", "server_round": 7, "epsilon_spent": 2.9,
                   "epsilon_would_be": 3.4, "budget": 3.0, "at": "..."}],
     "resets": [{"event": "reset", "reason": "...", "by": "...", "at": "...", ...}]}
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import getpass
import hashlib
import json
import logging
import math
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lungmae_core.atomic import atomic_write_json
from lungmae_core.errors import LungMAEError, PrivacyBudgetExceeded
from lungmae_core.privacy import PRIVACY_UNIT, RoundPlan, epsilon_for

__all__ = ["LEDGER_FORMAT", "JOURNAL_NAME", "RESET_COMMAND", "LedgerError", "LedgerMissingError", "LedgerEntry",
           "PrivacyLedger"]

logger = logging.getLogger(__name__)

LEDGER_FORMAT = "lungmae-privacy-ledger/2"
_OLD_FORMATS = ("lungmae-privacy-ledger/1",)
_STATUSES = ("reserved", "trained")
#: The journal file beside the ledger: evidence of DP work that outlives a deleted ledger.
JOURNAL_NAME = "privacy-journal.json"
JOURNAL_FORMAT = "lungmae-privacy-journal/1"
#: What an operator runs to start a new ledger on purpose (named in every refusal about a lost ledger).
RESET_COMMAND = "lungmae site ledger reset --config site.yaml --reason '...'"


class LedgerError(LungMAEError):
    """The privacy ledger is unreadable, malformed or inconsistent; the site must not train until it is fixed."""


class LedgerMissingError(LedgerError, PrivacyBudgetExceeded):
    """The ledger is gone while the site's state shows earlier DP work: refuse until an explicit reset.

    A :class:`PrivacyBudgetExceeded` too (the spent budget is unknown, so no round fits in it): the ClientApp
    answers it as a privacy refusal, whose text goes to the server, so the message names no path.
    """


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """One DP-SGD round in the ledger.

    Args:
        id: 1, 2, ... in the order rounds were reserved.
        phase: ``"pretrain"`` or ``"finetune"`` (free text; it is only reported).
        server_round: the federation's round number.
        run: the federation run (Flower run id) the round belonged to; ``""`` when unknown.
        unit: what one record of the accounting is (``"patient"``).
        num_units: patients the round sampled from.
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
    run: str = ""
    unit: str = PRIVACY_UNIT
    num_units: int = 0

    @property
    def history(self) -> tuple[float, float, int]:
        """``(noise_multiplier, sample_rate, steps)`` for the accountant."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _event_hash(event: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(event, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: Any) -> None:
    """Atomically (temporary file, fsync, rename; lungmae_core.atomic), owner-only, then fsync the folder."""
    atomic_write_json(path, data, mode=0o600)
    _fsync_dir(path.parent)


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
        witnesses: other files whose existence proves this site did DP work before (e.g. a marker the gate
            keeps in the cache); the journal beside the ledger is always one.

    Raises:
        LedgerError: when the file exists but cannot be parsed or fails validation.

    Examples:
        >>> ledger = PrivacyLedger(tmp / "privacy-ledger.json", budget_epsilon=3.0, delta=1e-5, site="north")
        >>> entry = ledger.reserve(plan, phase="pretrain", server_round=1)   # raises when over budget
        >>> ledger.settle(entry.id, steps_taken=privacy.steps_taken)        # before the weights leave
        >>> ledger.epsilon_spent()
    """

    def __init__(self, path: str | os.PathLike[str], *, budget_epsilon: float, delta: float | None,
                 site: str = "", witnesses: Sequence[str | os.PathLike[str]] = ()) -> None:
        if not (isinstance(budget_epsilon, (int, float)) and math.isfinite(budget_epsilon) and budget_epsilon > 0):
            raise LedgerError(f"Unable to open the privacy ledger {path} as the budget epsilon must be > 0; "
                              f"got {budget_epsilon!r}")
        self.path = Path(path)
        self.budget_epsilon = float(budget_epsilon)
        self._delta_arg = delta
        self.site = site
        self.journal_path = self.path.with_name(JOURNAL_NAME)
        self.witnesses = [Path(w) for w in witnesses]
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
        if isinstance(data, dict) and data.get("format") in _OLD_FORMATS:
            raise LedgerError(
                f"Unable to use the {where} as it is in the old format {data['format']!r}, which accounted per scan, "
                "not per patient (a patient with several scans spent more than it says). Keep it as evidence and "
                f"start a patient-level ledger with: {RESET_COMMAND} (the reset archives the old file and records "
                "its epsilon in the journal)")
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
        required = {f.name for f in dataclasses.fields(LedgerEntry)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
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
        data.setdefault("resets", [])
        return data

    def _write(self, data: dict[str, Any]) -> None:
        """Write atomically: temporary file in the same directory, fsync, rename, fsync the directory."""
        _write_json(self.path, data)

    def _new(self) -> dict[str, Any]:
        if self._delta_arg is None:
            raise LedgerError(f"Unable to create the privacy ledger {self.path} without a delta")
        return {"format": LEDGER_FORMAT, "site": self.site, "delta": float(self._delta_arg),
                "accountant": "rdp", "unit": PRIVACY_UNIT, "created_at": _now(), "entries": [], "refusals": [],
                "resets": []}

    def _load_or_new(self) -> dict[str, Any]:
        """The ledger, or a new one when this site has no trace of earlier DP work (else refuse)."""
        data = self._read()
        if data is not None:
            return data
        self._refuse_if_lost()
        data = self._new()
        events = self.journal()
        if events and events[-1].get("event") == "reset":
            data["resets"] = [{k: events[-1].get(k) for k in ("reason", "by", "at", "archived",
                                                               "epsilon_spent_before")}]
        self._journal_append({"event": "created", "ledger": self.path.name, "delta": data["delta"],
                              "unit": PRIVACY_UNIT})
        return data

    def _refuse_if_lost(self) -> None:
        """Raise :class:`LedgerMissingError` when there is no ledger but evidence of earlier DP work."""
        evidence = self.prior_dp_evidence()
        if evidence:
            logger.error("privacy ledger %s is missing; evidence of earlier DP work: %s", self.path,
                         "; ".join(evidence))
            raise LedgerMissingError(
                f"Unable to train with DP as the site's privacy ledger ({self.path.name}) is missing while its "
                "state shows earlier DP work: a lost ledger would restart the budget at zero. Restore the ledger "
                f"from backup, or start a new one deliberately with: {RESET_COMMAND}")

    # -- the journal: evidence that survives the ledger -------------------------------------------------
    def journal(self) -> list[dict[str, Any]]:
        """The journal's events, oldest first ([] when there is none).

        Raises:
            LedgerError: when the journal is unreadable or its hash chain is broken.
        """
        try:
            data = json.loads(self.journal_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, json.JSONDecodeError) as exc:
            raise LedgerError(f"Unable to read the privacy journal {self.journal_path} as {exc}; restore it from "
                              "backup (DP training stays refused until then)") from exc
        events = data.get("events") if isinstance(data, dict) and data.get("format") == JOURNAL_FORMAT else None
        if not isinstance(events, list):
            raise LedgerError(f"Unable to read the privacy journal {self.journal_path} as it is not a "
                              f"{JOURNAL_FORMAT} file with an 'events' list")
        previous = ""
        for i, event in enumerate(events):
            if not isinstance(event, dict) or event.get("prev") != previous or \
                    event.get("hash") != _event_hash({k: v for k, v in event.items() if k != "hash"}):
                raise LedgerError(f"Unable to trust the privacy journal {self.journal_path} as event {i + 1} does "
                                  "not continue its hash chain (edited or truncated); restore it from backup")
            previous = event["hash"]
        return events

    def _journal_append(self, event: dict[str, Any]) -> dict[str, Any]:
        events = self.journal()
        record = {**event, "at": _now(), "site": self.site, "prev": events[-1]["hash"] if events else ""}
        record["hash"] = _event_hash(record)
        _write_json(self.journal_path, {"format": JOURNAL_FORMAT, "events": [*events, record]})
        return record

    def prior_dp_evidence(self) -> list[str]:
        """Why this site is known to have done DP work before (journal, witness files); [] if none.

        Nothing counts after a reset that no ledger has followed yet: the operator has acknowledged the loss.
        """
        events = self.journal()
        if events and events[-1].get("event") == "reset":
            return []
        reasons = [f"the journal {self.journal_path} records {len(events)} event(s)"] if events else []
        return reasons + [f"{w} exists" for w in self.witnesses if w.exists()]

    def reset(self, *, reason: str, operator: str | None = None) -> dict[str, Any]:
        """Give up the current ledger on purpose: archive it and record who, when and why in the journal.

        The old ledger (when present, readable or not) is renamed to ``<ledger>.reset-<UTC time>`` and its
        spent epsilon (when readable) goes into the journal; the next DP round then starts a new ledger,
        which carries the reset in its ``resets``. Logged at WARNING: a reset gives the site a fresh budget,
        which only its data protection officer may decide.

        Raises:
            LedgerError: for a reason shorter than 3 characters, or an unreadable journal.
        """
        reason = (reason or "").strip()
        if len(reason) < 3:
            raise LedgerError("Unable to reset the privacy ledger without a reason; pass --reason 'why, who agreed'")
        by = operator or _operator()
        with self._locked():
            spent: float | None = None
            entries: int | None = None
            archived = None
            if self.path.exists():
                with contextlib.suppress(LedgerError):
                    old = self._read()
                    if old is not None:
                        entries = len(old["entries"])
                        spent = epsilon_for([(e["noise_multiplier"], e["sample_rate"], e["steps"])
                                             for e in old["entries"]], float(old["delta"]))
                stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
                target = self.path.with_name(f"{self.path.name}.reset-{stamp}")
                os.replace(self.path, target)
                _fsync_dir(self.path.parent)
                archived = target.name
            event = self._journal_append({"event": "reset", "reason": reason, "by": by, "archived": archived,
                                          "epsilon_spent_before": spent, "entries_before": entries})
        logger.warning("privacy ledger %s reset by %s: %s (archived %s, epsilon spent before %s)", self.path, by,
                       reason, archived or "nothing", "unknown" if spent is None else f"{spent:.3f}")
        return event

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
        """Total epsilon at :attr:`delta` of everything recorded; 0.0 for a new ledger.

        Raises:
            LedgerMissingError: when the ledger is missing but the site did DP work before (0.0 would lie).
        """
        if not self.path.exists():
            self._refuse_if_lost()
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

    def summary(self) -> dict[str, Any]:
        """What ``lungmae site ledger show`` prints: totals and, per (run, phase), that group's own epsilon.

        A group's epsilon is its rounds composed alone; groups compose to the total (which is less than the
        sum of the groups' epsilons, as RDP composes sub-additively in epsilon).
        """
        data = self._read()
        entries = [] if data is None else [LedgerEntry(**e) for e in data["entries"]]
        delta = float(data["delta"]) if data is not None else self._delta_arg
        groups: dict[tuple[str, str], list[LedgerEntry]] = {}
        for entry in entries:
            groups.setdefault((entry.run, entry.phase), []).append(entry)
        spent = 0.0 if delta is None else epsilon_for([e.history for e in entries], delta)
        return {
            "ledger": str(self.path), "exists": data is not None, "delta": delta, "unit": PRIVACY_UNIT,
            "budget": self.budget_epsilon, "spent": spent, "remaining": max(0.0, self.budget_epsilon - spent),
            "groups": [{"run": run, "phase": phase, "rounds": len(items),
                        "steps": sum(e.steps for e in items),
                        "patients": max(e.num_units for e in items),
                        "reserved_unsettled": sum(e.status == "reserved" for e in items),
                        "epsilon": 0.0 if delta is None else epsilon_for([e.history for e in items], delta)}
                       for (run, phase), items in groups.items()],
            "refusals": [] if data is None else list(data["refusals"]),
            "resets": [] if data is None else list(data["resets"]),
            "evidence": self.prior_dp_evidence() if data is None else [],
        }

    # -- the two writes around a round --------------------------------------------------------------
    def reserve(self, plan: RoundPlan, *, phase: str, server_round: int, run: str = "") -> LedgerEntry:
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
                reserved_at=_now(), run=str(run), unit=PRIVACY_UNIT, num_units=int(plan.num_samples))
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
