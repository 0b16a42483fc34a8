"""Atomic per-round checkpoints, resume from the last complete round, and the final model export.

Layout under the run directory::

    state.json                      last complete step: index, phase, round, checkpoint file + sha256
    checkpoints/step-0003.pt        weights, phase, round, strategy state, metrics so far, config hash
    checkpoints/mae-latest.pt       the newest pretrain checkpoint (hard link), kept for the report
    model/model.pt + manifest.json  the exported final model (see :func:`export_model`)

Every file is written to a temporary name in the same folder, flushed and renamed over the target
(``os.replace``), and ``state.json`` is replaced only after its checkpoint is complete, so a server killed
at any instant leaves the previous complete round to resume from: at most one round is lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lungmae_core.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from lungmae_core.errors import LungMAEError

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "CheckpointStore",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "sha256_file",
    "code_version",
    "export_model",
]

log = logging.getLogger(__name__)
FORMAT = 1
KEEP_LAST = 2
MAE_LATEST = "mae-latest.pt"  # the newest pretrain checkpoint, kept through pruning (for the report)


class CheckpointError(LungMAEError):
    """A checkpoint or ``state.json`` is unreadable, corrupt, or from a different configuration."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def code_version() -> str:
    """``lungmae-fl <version>`` plus the git commit of the source tree when it is a checkout."""
    try:
        version = metadata.version("lungmae-fl")
    except metadata.PackageNotFoundError:
        version = "unknown"
    commit = ""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
        if out.returncode == 0:
            commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"lungmae-fl {version}" + (f" (git {commit})" if commit else "")


@dataclasses.dataclass
class Checkpoint:
    """What a checkpoint holds (and what resume needs).

    Args:
        step_index: index of the last completed step of the phase plan.
        phase: phase of the weights: ``pretrain`` (MAE weights) or ``finetune`` (classifier weights).
        server_round: last completed federated round (0 before any round).
        weights: name -> float32 tensor, the global model.
        strategy_state: plain values the strategy needs to continue (counters, robust-aggregation state).
        history: the per-round records written so far (the lines of ``metrics.jsonl``).
        config_hash: :func:`server.federation_config.config_hash` of the run's config.
        model_args: the ``ModelConfig`` mapping and the number of classes, to rebuild the model.
        extra: anything else to carry over (e.g. the final results).
    """

    step_index: int
    phase: str
    server_round: int
    weights: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]
    history: list[dict[str, Any]]
    config_hash: str
    model_args: dict[str, Any]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class CheckpointStore:
    """Saves and finds checkpoints of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.state_path = self.run_dir / "state.json"

    def save(self, ckpt: Checkpoint) -> Path:
        """Write the checkpoint, then point ``state.json`` at it; prune all but the last two.

        Returns:
            The checkpoint's path.
        """
        t0 = time.perf_counter()
        path = self.dir / f"step-{ckpt.step_index:04d}.pt"
        payload = {"format": FORMAT, **dataclasses.asdict(ckpt)}
        payload["weights"] = {k: v.detach().cpu().contiguous() for k, v in ckpt.weights.items()}
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        atomic_write_json(self.state_path, {
            "format": FORMAT,
            "step_index": ckpt.step_index,
            "phase": ckpt.phase,
            "server_round": ckpt.server_round,
            "checkpoint": str(path.relative_to(self.run_dir)),
            "sha256": sha256_file(path),
            "config_hash": ckpt.config_hash,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        if ckpt.phase == "pretrain":
            self._keep_mae(path)
        self._prune(keep=path)
        log.info("checkpoint %s written in %.2f s", path.name, time.perf_counter() - t0)
        return path

    def _keep_mae(self, path: Path) -> None:
        """Point ``checkpoints/mae-latest.pt`` at the newest pretrain checkpoint (a hard link: no copy).

        Pruning keeps only the last two steps, so after the hand-off no step file holds the MAE any more;
        the report's reconstructions (``server/report/recon.py``) need the final MAE, so it survives here.
        """
        tmp = self.dir / f".{MAE_LATEST}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # file systems without hard links: copy
            tmp.write_bytes(path.read_bytes())
        os.replace(tmp, self.dir / MAE_LATEST)

    def _prune(self, keep: Path) -> None:
        files = sorted(self.dir.glob("step-*.pt"))
        for old in files[:-KEEP_LAST]:
            if old != keep:
                old.unlink(missing_ok=True)

    def read_state(self) -> dict[str, Any] | None:
        """The parsed ``state.json``, or None when the run has not completed a step yet."""
        if not self.state_path.exists():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"Unable to read {self.state_path} as it is not valid JSON: {exc}") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"Unable to resume from {self.state_path} as it holds a "
                                  f"{type(state).__name__}, not a JSON object")
        for key in ("step_index", "checkpoint", "sha256", "config_hash"):
            if key not in state:
                raise CheckpointError(f"Unable to resume from {self.state_path} as it has no '{key}'")
        return state

    def load_latest(self, expected_hash: str | None = None) -> Checkpoint | None:
        """Load the checkpoint ``state.json`` points to, verifying its sha256 and config hash.

        Returns:
            The checkpoint, or None when there is none yet.

        Raises:
            CheckpointError: corrupt/missing checkpoint file, or a config hash other than ``expected_hash``.
        """
        state = self.read_state()
        if state is None:
            return None
        if expected_hash is not None and state["config_hash"] != expected_hash:
            raise CheckpointError(
                f"Unable to resume from {self.run_dir} as it was started with another federation config "
                f"(hash {state['config_hash'][:12]}, now {expected_hash[:12]}); use a new run-dir or set "
                "resume: false to start over")
        path = self.run_dir / state["checkpoint"]
        if not path.exists():
            raise CheckpointError(f"Unable to resume as {path} named in {self.state_path} is missing")
        digest = sha256_file(path)
        if digest != state["sha256"]:
            raise CheckpointError(f"Unable to resume as {path} is corrupt (sha256 {digest[:12]} != "
                                  f"{state['sha256'][:12]} recorded in state.json)")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for damaged files
            raise CheckpointError(f"Unable to load {path}: {exc}") from exc
        if payload.get("format") != FORMAT:
            raise CheckpointError(f"Unable to load {path} as it has format {payload.get('format')}, not {FORMAT}")
        fields = {f.name for f in dataclasses.fields(Checkpoint)}
        return Checkpoint(**{k: v for k, v in payload.items() if k in fields})


def export_model(run_dir: Path, weights: Mapping[str, torch.Tensor], manifest: Mapping[str, Any]) -> Path:
    """Export the final global model as ``model/model.pt`` plus ``model/manifest.json``.

    The manifest gets the code version, the creation time and the sha256 and size of ``model.pt`` on top
    of what the caller passes (config, config hash, per-round metrics, participating sites).

    Returns:
        The path of ``manifest.json``.
    """
    out = Path(run_dir) / "model"
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.pt"
    with atomic_path(model_path) as tmp:
        torch.save({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp)
    full = dict(manifest)
    full.update({
        "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {"model.pt": {"sha256": sha256_file(model_path), "bytes": model_path.stat().st_size}},
        "num_parameters": int(sum(v.numel() for v in weights.values())),
    })
    manifest_path = out / "manifest.json"
    atomic_write_json(manifest_path, full)
    return manifest_path
