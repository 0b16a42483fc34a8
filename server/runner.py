"""Walks the phase plan over a Flower grid: query, rounds, hand-off, final evaluation, checkpoints, metrics.

The ServerApp's ``main`` only builds a :class:`FederationRunner` and calls :meth:`FederationRunner.run`;
everything a round does is here, in the order of the plan (``server.schedule``). After each step the
runner writes an atomic checkpoint and one line of ``metrics.jsonl``, then refreshes ``metrics.json``, so
a restarted server continues with the step after the last complete one (at most one round lost).

Run directory (CONTRACTS.md): ``run_config.json``, ``state.json``, ``checkpoints/``, ``metrics.jsonl``,
``metrics.json``, ``audit.jsonl``, ``model/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from lungmae_core.config import model_config, to_mapping
from lungmae_core.heads import DEFAULT_POOLING, ILDClassifier, set_trainable, transfer_encoder
from lungmae_core.model import build_mae
from lungmae_core.schema import EVALUATE, FINAL, FINETUNE, PRETRAIN, TRAIN

from server.audit import AuditLog
from server.checkpoints import (
    Checkpoint, CheckpointStore, atomic_write_json, atomic_write_text, code_version, export_model,
)
from server.federation_config import FederationConfig, config_hash, federation_to_mapping
from server.prometheus import FederationMetrics
from server.schedule import Step, phase_plan, steps_after
from server.strategy import (
    InsufficientSitesError, PhaseStrategy, RoundReport, SiteInfo, query_sites, state_to_arrays,
)

__all__ = ["FederationRunner", "RUN_FILES"]

log = logging.getLogger(__name__)

RUN_FILES = ("run_config.json", "state.json", "checkpoints", "metrics.jsonl", "metrics.json", "model")
_PROGRESS = Callable[[Step, dict[str, Any]], None]


def _state_of(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()}


class FederationRunner:
    """Runs (or resumes) one federated run described by a :class:`FederationConfig`.

    Args:
        cfg: the federation config.
        grid: the Flower grid (simulation, deployment, or the in-process grid of the tests).
        progress: called after every step with the step and its ``metrics.jsonl`` record (the CLI's
            per-round progress line); optional.
    """

    def __init__(self, cfg: FederationConfig, grid: Grid, *, progress: _PROGRESS | None = None) -> None:
        self.cfg = cfg
        self.grid = grid
        self.progress = progress
        self.run_dir = Path(cfg.run_dir)
        self.store = CheckpointStore(self.run_dir)
        self.hash = config_hash(cfg)
        self.model_cfg = model_config(cfg.model.name, **cfg.model.overrides)
        self.plan = phase_plan(cfg.phases)
        self.sites: dict[int, SiteInfo] = {}
        self.history: list[dict[str, Any]] = []
        self.counters: dict[str, Any] = {"rejected": {}, "failed": {}, "rounds_by_site": {}}
        self.final: dict[str, Any] | None = None
        self.audit = AuditLog(self.run_dir / "audit.jsonl" if cfg.server.audit_log else None)
        self.prom = FederationMetrics(cfg.server.metrics_port or None)
        self._joined: set[int] = set()
        self._connected: set[int] = set()  # node ids connected at the last site check (audit: site-left)

    # ---------------------------------------------------------------------------------- models
    @property
    def static_config(self) -> dict[str, Any]:
        return {"model-config": json.dumps(to_mapping(self.model_cfg)), "num-classes": self.cfg.num_classes,
                "finetune-mode": self.cfg.phases.finetune.mode, "seed": self.cfg.seed,
                "require-dp": bool(self.cfg.privacy.require_dp),
                "max-epsilon-per-round": float(self.cfg.privacy.max_epsilon_per_round)}

    def _classifier(self) -> ILDClassifier:
        return ILDClassifier(self.model_cfg, self.cfg.num_classes)

    def handoff(self, mae_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep the MAE encoder, drop the decoder, add a freshly initialised (seeded) classifier head."""
        torch.manual_seed(self.cfg.seed + 7919)
        clf = self._classifier()
        loaded = transfer_encoder(mae_state, clf)
        log.info("hand-off: %d encoder tensors transferred, decoder dropped, new %d-class head",
                 len(loaded), self.cfg.num_classes)
        return {k: v.detach().clone() for k, v in clf.state_dict().items()}

    def upload_names(self, phase: str) -> list[str] | None:
        """Entries sites send back: all, or only the trainable part under linear probing."""
        if phase == FINETUNE and self.cfg.phases.finetune.mode == "linear-probe":
            return set_trainable(self._classifier(), "linear-probe")
        return None

    # ------------------------------------------------------------------------------- run dir
    def _fresh_start(self) -> tuple[int, str, dict[str, torch.Tensor]]:
        if not self.cfg.resume:
            for name in ("state.json", "metrics.jsonl", "metrics.json"):
                (self.run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
        mae = build_mae(self.model_cfg, seed=self.cfg.seed)
        return -1, PRETRAIN, {k: v.detach().clone() for k, v in mae.state_dict().items()}

    def _restore(self) -> tuple[int, str, dict[str, torch.Tensor]]:
        ckpt = self.store.load_latest(self.hash) if self.cfg.resume else None
        if ckpt is None:
            step, phase, weights = self._fresh_start()
            self.audit.record("run-started", config_hash=self.hash, phases=[s.name for s in self.plan])
            return step, phase, weights
        self.history = list(ckpt.history)
        self.counters = dict(ckpt.strategy_state.get("counters", self.counters))
        self.final = ckpt.extra.get("final")
        atomic_write_text(self.run_dir / "metrics.jsonl",
                          "".join(json.dumps(r, default=str) + "\n" for r in self.history))
        log.info("resuming %s after step %d (%s, round %d)", self.run_dir, ckpt.step_index,
                 self.plan[ckpt.step_index].name, ckpt.server_round)
        self.audit.record("run-resumed", config_hash=self.hash, phase=ckpt.phase, server_round=ckpt.server_round)
        return ckpt.step_index, ckpt.phase, dict(ckpt.weights)

    def _checkpoint(self, step: Step, phase: str, weights: dict[str, torch.Tensor]) -> None:
        server_round = step.server_round or max([r["round"] for r in self.history], default=0)
        ckpt = Checkpoint(step_index=step.index, phase=phase, server_round=server_round, weights=weights,
                          strategy_state={"counters": self.counters,
                                          "sites": {str(k): v.summary() for k, v in self.sites.items()}},
                          history=self.history, config_hash=self.hash,
                          model_args={"model": to_mapping(self.model_cfg), "num_classes": self.cfg.num_classes,
                                      "kind": "mae" if phase == PRETRAIN else "classifier"},
                          extra={"final": self.final} if self.final is not None else {})
        path = self.store.save(ckpt)
        self.prom.checkpoint_written(phase, server_round)
        self.audit.record("checkpoint-written", phase=phase, server_round=server_round, file=path.name)

    def _write_summary(self, status: str) -> None:
        phases: dict[str, list[dict[str, Any]]] = {}
        for rec in self.history:
            phases.setdefault(rec["phase"], []).append({
                "round": rec["round"], "phase_round": rec["phase_round"],
                "train": rec["train"]["aggregated"], "evaluate": rec["evaluate"]["aggregated"],
                "train_sites": rec["train"]["sites"], "evaluate_sites": rec["evaluate"]["sites"]})
        summary = {"status": status, "config_hash": self.hash, "class_names": list(self.cfg.classes),
                   "phases": phases, "sites": {s.name: s.summary() for s in self.sites.values()},
                   "counters": self.counters,
                   "bytes": {"down": sum(r["bytes"]["down"] for r in self.history),
                             "up": sum(r["bytes"]["up"] for r in self.history)}}
        if self.final is not None:
            summary["final"] = self.final
        atomic_write_json(self.run_dir / "metrics.json", summary)

    def _write_run_config(self) -> None:
        atomic_write_json(self.run_dir / "run_config.json", {
            "federation": federation_to_mapping(self.cfg), "config_hash": self.hash,
            "model_config": to_mapping(self.model_cfg), "class_names": list(self.cfg.classes),
            "plan": [s.name for s in self.plan], "code_version": code_version()})

    # ---------------------------------------------------------------------------------- steps
    def _ensure_sites(self, phase: str, kind: str, min_sites: int, timeout_s: float | None = None) -> None:
        query_sites(self.grid, self.sites, phase=phase, kind=kind, min_sites=min_sites,
                    timeout_s=self.cfg.round_timeout_s if timeout_s is None else timeout_s,
                    config=self.static_config)
        connected = set(self.grid.get_node_ids())
        self.prom.sites_connected(len(connected))
        for node in sorted(self._connected - connected):
            self.audit.record("site-left", site=self.sites[node].name if node in self.sites else f"node-{node}")
        for node in sorted((connected - self._connected) & self._joined):
            self.audit.record("site-joined", site=self.sites[node].name if node in self.sites else f"node-{node}",
                              rejoined=True)
        self._connected = connected
        for info in self.sites.values():
            if info.node_id not in self._joined:
                self._joined.add(info.node_id)
                self.audit.record("site-joined", site=info.name, error=info.error[:200])

    def _strategy(self, phase: str) -> PhaseStrategy:
        pcfg = getattr(self.cfg.phases, phase) if phase in (PRETRAIN, FINETUNE) else self.cfg.phases.finetune
        return PhaseStrategy(
            phase=phase, sites=self.sites, fraction=pcfg.fraction, min_sites=pcfg.min_sites,
            method=self.cfg.strategy.name, trim=self.cfg.strategy.trim, mu=self.cfg.strategy.mu,
            compression=self.cfg.compression, max_norm=self.cfg.update_checks.max_norm, seed=self.cfg.seed,
            upload_names=self.upload_names(phase), static_config=self.static_config,
            max_epsilon_per_round=self.cfg.privacy.max_epsilon_per_round, require_dp=self.cfg.privacy.require_dp,
            central_dp=(self.cfg.privacy.central_dp_noise_multiplier, self.cfg.privacy.central_dp_clip,
                        self.cfg.privacy.central_dp_delta) if self.cfg.privacy.central_dp else None)

    def _evaluate(self, strategy: PhaseStrategy, server_round: int, arrays: ArrayRecord,
                  phase: str) -> RoundReport:
        messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord({"phase": phase}),
                                                    self.grid))
        replies = self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout_s) if messages else []
        strategy.aggregate_evaluate(server_round, replies)
        assert strategy.last_evaluate is not None
        return strategy.last_evaluate

    def _train_round(self, step: Step, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                                  dict[str, Any]]:
        t0 = time.perf_counter()
        pcfg = getattr(self.cfg.phases, step.phase)
        self._ensure_sites(step.phase, TRAIN, pcfg.min_sites)
        strategy = self._strategy(step.phase)
        arrays = state_to_arrays(weights)
        config = ConfigRecord({"lr": float(pcfg.lr), "local-epochs": int(pcfg.local_epochs),
                               "phase-round": step.phase_round, "phase-rounds": step.phase_rounds})
        messages = list(strategy.configure_train(step.server_round, arrays, config, self.grid))
        replies = self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout_s) if messages else []
        new_arrays, _ = strategy.aggregate_train(step.server_round, replies)
        train = strategy.last_train or RoundReport(kind=TRAIN, skipped=True, note="not configured")
        if new_arrays is not None:
            weights = _state_of(new_arrays)
            arrays = new_arrays
        evaluate = RoundReport(kind=EVALUATE, skipped=True, note="not scheduled")
        if step.evaluate:
            evaluate = self._evaluate(strategy, step.server_round, arrays, step.phase)
        record = self._record(step, train, evaluate, time.perf_counter() - t0)
        return weights, record

    def _record(self, step: Step, train: RoundReport, evaluate: RoundReport, duration: float) -> dict[str, Any]:
        rejected = [dataclasses.asdict(r) for r in train.rejected + evaluate.rejected]
        failed = train.failed + evaluate.failed
        for r in rejected:
            by_site = self.counters["rejected"].setdefault(r["site"], {})
            by_site[r["check"]] = by_site.get(r["check"], 0) + 1
        for f in failed:
            self.counters["failed"][f["site"]] = self.counters["failed"].get(f["site"], 0) + 1
        for site in train.sites:
            self.counters["rounds_by_site"][site] = self.counters["rounds_by_site"].get(site, 0) + 1
        record = {
            "round": step.server_round, "phase": step.phase, "phase_round": step.phase_round,
            "phase_rounds": step.phase_rounds, "step": step.index,
            "train": {"aggregated": train.aggregated, "sites": train.sites},
            "evaluate": {"aggregated": evaluate.aggregated, "sites": evaluate.sites},
            "participation": {"sampled": train.sampled, "replied": train.replied,
                              "failed": [f["site"] for f in failed], "rejected": [r["site"] for r in rejected]},
            "failures": failed, "rejected_updates": rejected,
            "bytes": {"down": train.bytes_down + evaluate.bytes_down, "up": train.bytes_up + evaluate.bytes_up},
            "skipped": train.skipped, "note": train.note, "duration_s": round(duration, 3),
        }
        self.prom.round_finished(
            step.phase, step.server_round, duration_s=duration, sampled=len(train.sampled),
            replied=len(train.replied) + len(train.rejected), failed=len(train.failed),
            rejected={r["check"]: sum(1 for x in rejected if x["check"] == r["check"]) for r in rejected},
            bytes_sent=record["bytes"]["down"], bytes_received=record["bytes"]["up"],
            train_metrics=train.aggregated, eval_metrics={k: v for k, v in evaluate.aggregated.items()
                                                          if not isinstance(v, list)})
        for site in train.replied:
            self.audit.record("update-accepted", site=site, phase=step.phase, server_round=step.server_round,
                              num_examples=int(train.sites.get(site, {}).get("num-examples", 0)))
        for r in rejected:
            self.audit.record("update-rejected", site=r["site"], phase=step.phase, server_round=step.server_round,
                              check=r["check"], reason=r["reason"][:300])
        self.audit.record("round-finished", phase=step.phase, server_round=step.server_round,
                          replied=len(train.replied), failed=len(failed), rejected=len(rejected),
                          duration_s=round(duration, 3))
        for site, m in train.sites.items():
            info = next((s for s in self.sites.values() if s.name == site), None)
            self.prom.site_epsilon(site, float(m.get("epsilon", 0.0)), info.epsilon_budget if info else None)
        return record

    def _final(self, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Evaluate the final global classifier on every site's test split; per-site, pooled, cross-site."""
        final: dict[str, Any] = {"class_names": list(self.cfg.classes), "sites": {}, "pooled": {},
                                 "cross_site": {}, "note": ""}
        try:
            # the sites are known by now: do not hold the run for a test split nobody has
            self._ensure_sites(FINAL, EVALUATE, 1, timeout_s=min(30.0, self.cfg.round_timeout_s))
        except InsufficientSitesError as exc:  # no site has a test split: the run finishes without final scores
            final["note"] = str(exc)
            log.warning("final evaluation skipped: %s", exc)
            return final
        strategy = self._strategy(FINETUNE)
        report = self._evaluate(strategy, 0, state_to_arrays(weights), FINAL)
        n = self.cfg.num_classes

        def snake(m: dict[str, Any]) -> dict[str, Any]:
            out = {k.replace("-", "_"): v for k, v in m.items() if k != "confusion-matrix"}
            if "confusion-matrix" in m:
                cm = list(m["confusion-matrix"])
                out["confusion_matrix"] = [cm[i * n:(i + 1) * n] for i in range(n)]
            if not m.get("roc-auc-valid", 1):
                out["roc_auc"] = None
            return out

        final["sites"] = {site: snake(m) for site, m in report.sites.items()}
        final["pooled"] = snake(report.aggregated) if report.aggregated else {}
        final["cross_site"] = {site: {k: v for k, v in m.items() if k in (
            "accuracy", "balanced_accuracy", "weighted_f1", "roc_auc", "num_examples")}
            for site, m in final["sites"].items()}
        final["failures"] = report.failed
        final["rejected"] = [dataclasses.asdict(r) for r in report.rejected]
        final["bytes"] = {"down": report.bytes_down, "up": report.bytes_up}
        final["note"] = report.note
        mae_rounds = [r for r in self.history if r["phase"] == PRETRAIN and r["evaluate"]["aggregated"]]
        if mae_rounds:
            final["mae"] = {k.replace("-", "_"): v for k, v in mae_rounds[-1]["evaluate"]["aggregated"].items()}
        pooled = final["pooled"]
        log.info("final: pooled accuracy %.3f, balanced accuracy %.3f over %d test scans at %d sites",
                 pooled.get("accuracy", float("nan")), pooled.get("balanced_accuracy", float("nan")),
                 int(pooled.get("num_examples", 0)), len(final["sites"]))
        return final

    def _export(self, weights: dict[str, torch.Tensor]) -> Path:
        participating = sorted({s for r in self.history for s in r["train"]["sites"]})
        return export_model(self.run_dir, weights, {
            "kind": "ILDClassifier", "model_config": to_mapping(self.model_cfg), "pooling": DEFAULT_POOLING,
            "class_names": list(self.cfg.classes), "finetune_mode": self.cfg.phases.finetune.mode,
            "federation": federation_to_mapping(self.cfg), "config_hash": self.hash,
            "rounds": [{"round": r["round"], "phase": r["phase"], "train": r["train"]["aggregated"],
                        "evaluate": r["evaluate"]["aggregated"], "participants": r["participation"]["replied"]}
                       for r in self.history],
            "participating_sites": participating, "final": self.final})

    # ------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Run the remaining steps of the plan; returns the ``metrics.json`` summary.

        Raises:
            CheckpointError: when resuming from a corrupt checkpoint or under a different config.
            InsufficientSitesError: when a phase cannot find ``min-sites`` able sites within the timeout.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_run_config()
        completed, phase, weights = self._restore()
        try:
            for step in steps_after(self.plan, completed):
                self.prom.set_phase(step.phase, round_timeout_s=self.cfg.round_timeout_s)
                record: dict[str, Any] = {}
                if step.kind == "handoff":
                    weights, phase = self.handoff(weights), FINETUNE
                elif step.kind == "train":
                    weights, record = self._train_round(step, weights)
                    phase = step.phase
                    self.history.append(record)
                else:
                    self.final = self._final(weights)
                    self._export(weights)
                self._checkpoint(step, phase, weights)
                if record:
                    with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(record, default=str) + "\n")
                self._write_summary("running")
                if self.progress is not None:
                    self.progress(step, record)
        except BaseException as exc:
            self.audit.record("run-finished", status="failed" if not isinstance(exc, KeyboardInterrupt)
                              else "stopped", rounds=len(self.history))
            raise
        finally:
            self.prom.close()
        self._write_summary("completed")
        self.audit.record("run-finished", status="completed", rounds=len(self.history))
        return json.loads((self.run_dir / "metrics.json").read_text(encoding="utf-8"))
