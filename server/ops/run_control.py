"""Submit the federation to a running SuperLink and follow it to the end, resuming after restarts.

Flower's own CLI is the interface (``flwr run`` / ``flwr list`` / ``flwr stop`` with ``--format json``):
``flwr run --stream`` exits 0 even when the run fails, so we read the run's status instead. When the
SuperLink disappears and comes back (a restart of the coordinator), the old run is dead but still listed as
running for a minute; we stop it and submit the federation again, and the ServerApp resumes from the run
directory's last complete checkpoint (``state.json``), so at most one round is lost.

The run we follow is remembered in ``<run-dir>/flwr-run.json`` so that a restarted `lungmae server run`
follows the same run instead of starting a second one.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lungmae_core.atomic import atomic_write_text, read_json_object
from lungmae_core.errors import LungMAEError

__all__ = ["FlwrCLI", "FlwrCLIError", "RunFollower", "RUN_RECORD"]

log = logging.getLogger(__name__)

RUN_RECORD = "flwr-run.json"
_ACTIVE = ("pending", "starting", "running")


class FlwrCLIError(LungMAEError):
    """The Flower CLI refused a request (other than the SuperLink being unreachable)."""


class FlwrCLI:
    """Thin wrapper over the ``flwr`` command with JSON output, for one named connection.

    Args:
        connection: the connection name in ``$FLWR_HOME/config.toml``. Defaults to ``lungmae``.
        env: environment of the ``flwr`` processes (telemetry off).
        executable: the Flower CLI program.
        timeout_s: limit for one CLI call.
    """

    def __init__(self, connection: str = "lungmae", env: Mapping[str, str] | None = None,
                 executable: str = "flwr", timeout_s: float = 120.0) -> None:
        self.connection = connection
        self.env = dict(os.environ if env is None else env)
        self.executable = executable
        self.timeout_s = timeout_s

    def _call(self, args: Sequence[str]) -> dict[str, Any] | None:
        """Run ``flwr <args> --format json``; None when the SuperLink is unreachable."""
        cmd = [self.executable, *args, "--format", "json"]
        try:
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=self.timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            log.warning("`%s` did not answer within %.0f s", " ".join(cmd[:3]), self.timeout_s)
            return None
        text = proc.stdout.strip()
        start = text.find("{")
        try:
            data = json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise FlwrCLIError(f"Unable to read the answer of `{' '.join(cmd)}` (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        if not data.get("success", False):
            message = str(data.get("error-message", ""))
            if "unavailable" in message.lower():  # "Connection to the SuperLink is unavailable."
                return None
            raise FlwrCLIError(f"`flwr {' '.join(args[:2])}` failed: {message.strip()[-800:]}")
        return data

    def submit(self, app_dir: Path, run_config: Mapping[str, str]) -> int | None:
        """``flwr run``: upload the app and start a run; returns its id (None: SuperLink unreachable)."""
        overrides = " ".join(f'{k}={json.dumps(str(v))}' for k, v in run_config.items())
        data = self._call(["run", str(app_dir), self.connection, "--run-config", overrides])
        return None if data is None else int(data["run-id"])

    def run_status(self, run_id: int) -> dict[str, Any] | None:
        """The run's entry of ``flwr list`` (keys ``status``, ``status-details``, ``elapsed``, ...)."""
        data = self._call(["list", self.connection, "--run-id", str(run_id)])
        if data is None:
            return None
        runs = data.get("runs", [])
        if not runs:
            raise FlwrCLIError(f"The SuperLink does not know run {run_id} (was its --database replaced?)")
        run: dict[str, Any] = runs[0]
        return run

    def stop(self, run_id: int) -> bool:
        """``flwr stop``; False when the SuperLink is unreachable or the run had already finished."""
        try:
            return self._call(["stop", str(run_id), self.connection]) is not None
        except FlwrCLIError as exc:
            log.info("flwr stop %s: %s", run_id, exc)
            return False

    def nodes(self) -> list[dict[str, Any]] | None:
        """``flwr supernode list``: registered SuperNodes with their ``status`` (``online``, ``registered``...)."""
        data = self._call(["supernode", "list", self.connection])
        return None if data is None else list(data.get("nodes", []))

    def run_log(self, run_id: int) -> str:
        """The ServerApp's log of the run (``flwr log --show``), for error reports."""
        cmd = [self.executable, "log", str(run_id), self.connection, "--show"]
        try:
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=self.timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            return ""
        return proc.stdout


class RunFollower:
    """Submit the federation once and follow it to completion, resubmitting after SuperLink restarts.

    Args:
        cli: the Flower CLI wrapper.
        app_dir: the project directory holding ``pyproject.toml`` (the Flower app).
        federation_config: absolute path of ``federation.yaml`` (passed as run config ``federation-config``).
        run_dir: the federation's run directory (``state.json``, ``metrics.jsonl``, ``flwr-run.json``).
        max_restarts: how many times a dead run is resubmitted before giving up. Defaults to 3.
        poll_s: seconds between status polls. Defaults to 5.
        unreachable_limit_s: how long the SuperLink may stay unreachable before giving up. Defaults to 1 h.
        say: where progress lines go. Defaults to ``print``.
    """

    def __init__(self, cli: FlwrCLI, app_dir: Path, federation_config: Path, run_dir: Path, *,
                 max_restarts: int = 3, poll_s: float = 5.0, unreachable_limit_s: float = 3600.0,
                 say: Callable[[str], None] = print, run_config: Mapping[str, str] | None = None) -> None:
        self.cli = cli
        self.app_dir = Path(app_dir)
        self.federation_config = Path(federation_config).resolve()
        self.run_dir = Path(run_dir)
        self.max_restarts = max_restarts
        self.poll_s = poll_s
        self.unreachable_limit_s = unreachable_limit_s
        self.say = say
        self.extra_run_config = dict(run_config or {})  # e.g. the app bundle's signature (fab-signature)
        self.restarts = 0
        self._last_progress: tuple[Any, ...] | None = None

    # ------------------------------------------------------------------------------------ run record
    def _record(self, run_id: int) -> None:
        path = self.run_dir / RUN_RECORD
        atomic_write_text(path, json.dumps({"run_id": run_id, "restarts": self.restarts,
                                            "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                            "federation_config": str(self.federation_config)}, indent=1))

    def recorded_run(self) -> int | None:
        """The run id of ``flwr-run.json``, if any."""
        data = read_json_object(self.run_dir / RUN_RECORD)
        return None if not data or "run_id" not in data else int(data["run_id"])

    def _submit(self) -> int:
        deadline = time.monotonic() + self.unreachable_limit_s
        while True:
            run_id = self.cli.submit(self.app_dir, {"federation-config": str(self.federation_config),
                                                    **self.extra_run_config})
            if run_id is not None:
                self._record(run_id)
                self.say(f"submitted run {run_id} (federation {self.federation_config.name}"
                         f"{f', restart {self.restarts}' if self.restarts else ''})")
                return run_id
            if time.monotonic() > deadline:
                raise FlwrCLIError("Unable to submit the federation as the SuperLink stayed unreachable for "
                                   f"{self.unreachable_limit_s:.0f} s; is `lungmae server start` running?")
            time.sleep(self.poll_s)

    # ------------------------------------------------------------------------------------ progress
    def _report_progress(self) -> None:
        state = read_json_object(self.run_dir / "state.json")
        if not state:
            return
        key = (state.get("phase"), state.get("server_round"), state.get("step_index"))
        if key != self._last_progress:
            self._last_progress = key
            self.say(f"checkpoint: phase {key[0]} round {key[1]} (step {key[2]}) at {state.get('saved_at', '?')}")

    # ------------------------------------------------------------------------------------ follow
    def follow(self, resume_existing: bool = True) -> int:
        """Follow (or submit) the run until it completes.

        Returns:
            0 when the run completed; 1 when it failed or was stopped by someone else; 3 when the SuperLink
            stayed unreachable longer than ``unreachable_limit_s``.
        """
        run_id = self.recorded_run() if resume_existing else None
        if run_id is not None:
            try:
                status = self.cli.run_status(run_id)
            except FlwrCLIError as exc:  # e.g. the SuperLink's database was replaced
                self.say(f"recorded run {run_id} is unknown to the SuperLink ({exc}); submitting a new run")
                status, run_id = {"status": "finished:unknown"}, None
            if run_id is not None and (status is None or status["status"] in _ACTIVE):
                self.say(f"following run {run_id} recorded in {self.run_dir / RUN_RECORD}")
            elif run_id is not None and status is not None and status["status"] != "finished:completed":
                run_id = None  # failed or stopped earlier: submit again, the ServerApp resumes
        if run_id is None:
            run_id = self._submit()
        unreachable_since: float | None = None
        lost_contact = stopped_by_us = False
        while True:
            status = self.cli.run_status(run_id)
            now = time.monotonic()
            if status is None:
                if unreachable_since is None:
                    unreachable_since = now
                    self.say("SuperLink unreachable; waiting for it to come back")
                elif now - unreachable_since > self.unreachable_limit_s:
                    self.say(f"SuperLink unreachable for {now - unreachable_since:.0f} s; giving up")
                    return 3
                time.sleep(self.poll_s)
                continue
            if unreachable_since is not None:
                self.say(f"SuperLink back after {now - unreachable_since:.0f} s")
                unreachable_since, lost_contact = None, True
            self._report_progress()
            state, details = status["status"], str(status.get("status-details", ""))
            if state == "finished:completed":
                self.say(f"run {run_id} completed in {float(status.get('elapsed', 0)):.0f} s"
                         f"{f' after {self.restarts} restart(s)' if self.restarts else ''}")
                return 0
            if state.startswith("finished"):
                resumable = stopped_by_us or lost_contact or "heartbeat" in details.lower()
                if resumable and self.restarts < self.max_restarts:
                    self.restarts += 1
                    self.say(f"run {run_id} ended ({state}: {details}); resubmitting, the ServerApp resumes from "
                             "the last checkpoint")
                    run_id = self._submit()
                    lost_contact = stopped_by_us = False
                    continue
                tail = "\n".join(self.cli.run_log(run_id).splitlines()[-30:])
                self.say(f"run {run_id} ended: {state} ({details}). Last lines of its log:\n{tail}")
                return 1
            if lost_contact and state in _ACTIVE:
                # The SuperLink restarted under this run: its ServerApp process is gone, though the run is
                # still listed as running until Flower misses its heartbeat. Stop it and resubmit now.
                self.say(f"run {run_id} lost its ServerApp when the SuperLink restarted; stopping it to resume")
                stopped_by_us = self.cli.stop(run_id) or True
                lost_contact = False
            time.sleep(self.poll_s)
