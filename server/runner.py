"""The federation as one phase loop: query, configure, send, collect, validate, aggregate, checkpoint.

The ServerApp's ``main`` only builds a :class:`FederationRunner` and calls :meth:`FederationRunner.run`.
The run walks the plan (``server.schedule``); the round config of each phase is built once from the
contract (:class:`~lungmae_core.contract.RoundConfig`) and only its round number and lr segment change
per round. The exchange itself (sampling, the checks on every reply, capped aggregation) is
``server.strategy``; who the sites are is ``server.sites``; Prometheus and the audit log are
``server.telemetry``. After each step the runner writes an atomic checkpoint and one
:class:`~lungmae_core.contract.RoundRecord` line of ``metrics.jsonl``, then refreshes ``metrics.json``, so
a restarted server continues with the step after the last complete one (at most one round lost).

Run directory (docs/CONTRACTS.md): ``run_config.json``, ``state.json``, ``checkpoints/``, ``metrics.jsonl``,
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

import torch
from flwr.serverapp import Grid

from lungmae_core.config import model_config, to_mapping
from lungmae_core.contract import (
    CROSS_SITE,
    EVALUATE,
    FINAL,
    FINETUNE,
    PRETRAIN,
    TRAIN,
    RoundConfig,
    RoundRecord,
)
from lungmae_core.heads import ILDClassifier, set_trainable, transfer_encoder
from lungmae_core.model import build_mae
from server.checkpoints import (
    Checkpoint,
    CheckpointStore,
    atomic_write_json,
    atomic_write_text,
    code_version,
    export_model,
)
from server.cross_site import GLOBAL_MODEL
from server.cross_site_step import SPOOL_PREFIX as CROSS_SITE_SPOOL
from server.cross_site_step import cross_site_matrix, run_cross_site
from server.federation_config import FederationConfig, config_hash, federation_to_mapping
from server.schedule import Step, phase_plan, steps_after
from server.sites import InsufficientSitesError, SiteRegistry
from server.strategy import PhaseStrategy, RoundReport
from server.streaming_aggregation import SPOOL_PREFIX as AGGREGATION_SPOOL
from server.telemetry import Telemetry

__all__ = ["FederationRunner", "RUN_FILES"]

log = logging.getLogger(__name__)

RUN_FILES = ("run_config.json", "state.json", "checkpoints", "metrics.jsonl", "metrics.json", "model")
_PROGRESS = Callable[[Step, dict[str, Any]], None]
#: Offset of the hand-off head's generator seed from the run seed (a local generator: the global torch
#: generator is left alone).
HEAD_SEED_OFFSET = 7919


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
        self.plan = phase_plan(cfg.phases, cross_site=cfg.cross_site.enabled)
        self.telemetry = Telemetry(self.run_dir / "audit.jsonl" if cfg.server.audit_log else None,
                                   cfg.server.metrics_port or None)
        self.sites = SiteRegistry(cfg.site_names, on_event=self.telemetry.event)
        self.history: list[dict[str, Any]] = []
        self.counters: dict[str, Any] = {"rejected": {}, "failed": {}, "rounds_by_site": {}}
        self.final: dict[str, Any] | None = None
        self._strategy: PhaseStrategy | None = None

    # -------------------------------------------------------------------------------- requests
    def round_config(self, phase: str) -> RoundConfig:
        """The phase's request, built once per phase from the contract."""
        pcfg = getattr(self.cfg.phases, phase) if phase in (PRETRAIN, FINETUNE) else self.cfg.phases.finetune
        lr, epochs = float(pcfg.lr), int(pcfg.local_epochs)
        if phase == CROSS_SITE:  # the local copies: the cross-site section's epochs and lr (0: the finetune lr)
            lr, epochs = float(self.cfg.cross_site.lr or pcfg.lr), int(self.cfg.cross_site.local_epochs)
        return RoundConfig(
            phase=phase, server_round=0, model_name=self.cfg.model.name, model_config=to_mapping(self.model_cfg),
            class_names=tuple(self.cfg.classes), pooling=self.cfg.model.pooling,
            finetune_mode=self.cfg.phases.finetune.mode, lr=lr, local_epochs=epochs,
            phase_rounds=pcfg.rounds if phase in (PRETRAIN, FINETUNE) else 0,
            proximal_mu=float(self.cfg.strategy.mu) if self.cfg.strategy.name == "fedprox" else 0.0,
            compression=self.cfg.compression, seed=self.cfg.seed, require_dp=bool(self.cfg.privacy.require_dp),
            max_epsilon_per_round=float(self.cfg.privacy.max_epsilon_per_round),
            split="test" if phase in (FINAL, CROSS_SITE) else "val")

    def strategy(self, phase: str) -> PhaseStrategy:
        """The phase's exchange logic (kept while the phase lasts)."""
        if self._strategy is not None and self._strategy.phase == phase:
            return self._strategy
        pcfg = getattr(self.cfg.phases, phase) if phase in (PRETRAIN, FINETUNE) else self.cfg.phases.finetune
        privacy, checks = self.cfg.privacy, self.cfg.update_checks
        self._strategy = PhaseStrategy(
            self.round_config(phase), self.sites, fraction=pcfg.fraction, min_sites=pcfg.min_sites,
            method=self.cfg.strategy.name, trim=self.cfg.strategy.trim, max_norm=checks.max_norm,
            max_site_share=checks.max_site_share, max_reply_bytes=checks.max_reply_bytes,
            upload_names=self.upload_names(phase), max_epsilon_per_round=privacy.max_epsilon_per_round,
            require_dp=privacy.require_dp, seed=self.cfg.seed,
            spool_dir=self.run_dir,  # robust methods / the share cap: updates on the run's disk, not in memory
            central_dp=(privacy.central_dp_noise_multiplier, privacy.central_dp_clip, privacy.central_dp_delta)
            if privacy.central_dp else None)
        return self._strategy

    # ---------------------------------------------------------------------------------- models
    def _classifier(self) -> ILDClassifier:
        with torch.random.fork_rng(devices=[]):  # the encoder is replaced at hand-off; leave the global RNG be
            return ILDClassifier(self.model_cfg, self.cfg.num_classes, self.cfg.model.pooling)

    def handoff(self, mae_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep the MAE encoder, drop the decoder, add a classifier head drawn from a local seeded generator."""
        clf = self._classifier()
        loaded = transfer_encoder(mae_state, clf)
        gen = torch.Generator().manual_seed(self.cfg.seed + HEAD_SEED_OFFSET)
        with torch.no_grad():
            torch.nn.init.trunc_normal_(clf.head.weight, std=0.02, generator=gen)
            torch.nn.init.zeros_(clf.head.bias)
            if clf.cls_token is not None:
                torch.nn.init.trunc_normal_(clf.cls_token.weight, std=0.02, generator=gen)
        log.info("hand-off: %d encoder tensors transferred, decoder dropped, new %d-class head (%s pooling)",
                 len(loaded), self.cfg.num_classes, self.cfg.model.pooling)
        return {k: v.detach().clone() for k, v in clf.state_dict().items()}

    def upload_names(self, phase: str) -> list[str] | None:
        """Entries sites send back: all, or only the trainable part under linear probing."""
        if phase in (FINETUNE, CROSS_SITE) and self.cfg.phases.finetune.mode == "linear-probe":
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
            self.telemetry.event("run-started", config_hash=self.hash, phases=[s.name for s in self.plan])
            return step, phase, weights
        self.history = [RoundRecord.decode(r).encode() for r in ckpt.history]
        self.counters = dict(ckpt.strategy_state.get("counters", self.counters))
        self.final = ckpt.extra.get("final")
        atomic_write_text(self.run_dir / "metrics.jsonl",
                          "".join(json.dumps(r, default=str) + "\n" for r in self.history))
        log.info("resuming %s after step %d (%s, round %d)", self.run_dir, ckpt.step_index,
                 self.plan[ckpt.step_index].name, ckpt.server_round)
        self.telemetry.event("run-resumed", config_hash=self.hash, phase=ckpt.phase, server_round=ckpt.server_round)
        known = ckpt.strategy_state.get("sites", {})
        self.sites.await_sites({str(s["name"]) for s in known.values() if isinstance(s, dict) and s.get("name")
                                and not s.get("error") and not s.get("privacy_refused")},
                               grace_s=self.cfg.round_timeout_s)
        return ckpt.step_index, ckpt.phase, dict(ckpt.weights)

    def _checkpoint(self, step: Step, phase: str, weights: dict[str, torch.Tensor]) -> None:
        server_round = step.server_round or max([r["round"] for r in self.history], default=0)
        ckpt = Checkpoint(step_index=step.index, phase=phase, server_round=server_round, weights=weights,
                          strategy_state={"counters": self.counters,
                                          "sites": {str(s.node_id): s.summary() for s in self.sites.values()}},
                          history=self.history, config_hash=self.hash,
                          model_args={"model": to_mapping(self.model_cfg), "num_classes": self.cfg.num_classes,
                                      "pooling": self.cfg.model.pooling,
                                      "kind": "mae" if phase == PRETRAIN else "classifier"},
                          extra={"final": self.final} if self.final is not None else {})
        path = self.store.save(ckpt)
        self.telemetry.prom.checkpoint_written(phase, server_round)
        self.telemetry.event("checkpoint-written", phase=phase, server_round=server_round, file=path.name)

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

    def _remove_stale_spools(self) -> None:
        """Delete spool folders a killed ServerApp left in the run dir (site updates, local models: no use
        to anyone once their round is gone, and up to sites x model in size)."""
        for stale in sorted([*self.run_dir.glob(AGGREGATION_SPOOL + "*"), *self.run_dir.glob(CROSS_SITE_SPOOL + "*")]):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
                log.info("removed %s, left by a ServerApp that stopped mid-step", stale.name)

    def _write_run_config(self) -> None:
        atomic_write_json(self.run_dir / "run_config.json", {
            "federation": federation_to_mapping(self.cfg), "config_hash": self.hash,
            "model_config": to_mapping(self.model_cfg), "class_names": list(self.cfg.classes),
            "plan": [s.name for s in self.plan], "code_version": code_version()})

    # ---------------------------------------------------------------------------------- steps
    def _ensure_sites(self, phase: str, kind: str, min_sites: int, timeout_s: float | None = None) -> None:
        self.sites.query(self.grid, phase=phase, kind=kind, min_sites=min_sites,
                         timeout_s=self.cfg.round_timeout_s if timeout_s is None else timeout_s,
                         config=self.strategy(phase).round_config.encode())
        self.telemetry.prom.sites_connected(len(self.sites.track(self.grid)))

    def _train_round(self, step: Step, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                                  dict[str, Any]]:
        t0 = time.perf_counter()
        pcfg = getattr(self.cfg.phases, step.phase)
        self._ensure_sites(step.phase, TRAIN, pcfg.min_sites)
        strategy = self.strategy(step.phase)
        cfg = strategy.round_config.with_round(step.server_round, phase_round=step.phase_round)
        self.telemetry.event("round-started", phase=step.phase, server_round=step.server_round)
        new, train = strategy.train_round(self.grid, weights, cfg, self.cfg.round_timeout_s)
        if new is not None:
            weights = new
        evaluate = RoundReport(kind=EVALUATE, skipped=True, note="not scheduled")
        if step.evaluate:
            evaluate = strategy.evaluate(self.grid, weights, cfg, self.cfg.round_timeout_s)
        duration = time.perf_counter() - t0
        record = self._record(step, train, evaluate, duration)
        self.telemetry.round_finished(record, duration)
        for site, m in train.sites.items():
            info = self.sites.by_name(site)
            self.telemetry.site_epsilon(site, float(m.get("epsilon", 0.0)), info.epsilon_budget if info else None)
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
        return RoundRecord(
            round=step.server_round, phase=step.phase, phase_round=step.phase_round, phase_rounds=step.phase_rounds,
            step=step.index, train={"aggregated": train.aggregated, "sites": train.sites},
            evaluate={"aggregated": evaluate.aggregated, "sites": evaluate.sites},
            participation={"sampled": train.sampled, "replied": train.replied,
                           "failed": [f["site"] for f in failed], "rejected": [r["site"] for r in rejected]},
            failures=failed, rejected_updates=rejected,
            bytes={"down": train.bytes_down + evaluate.bytes_down, "up": train.bytes_up + evaluate.bytes_up},
            skipped=train.skipped, note=train.note, duration_s=round(duration, 3)).encode()

    def _final(self, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Evaluate the final global classifier on every site's test split; per-site and pooled."""
        final: dict[str, Any] = {"class_names": list(self.cfg.classes), "sites": {}, "pooled": {},
                                 "cross_site": {}, "note": ""}
        try:
            # the sites are known by now: do not hold the run for a test split nobody has
            self._ensure_sites(FINAL, EVALUATE, 1, timeout_s=min(30.0, self.cfg.round_timeout_s))
        except InsufficientSitesError as exc:  # no site has a test split: the run finishes without final scores
            final["note"] = str(exc)
            log.warning("final evaluation skipped: %s", exc)
            return final
        report = self.strategy(FINAL).evaluate(self.grid, weights, self.round_config(FINAL),
                                               self.cfg.round_timeout_s)
        final["sites"] = report.sites
        final["pooled"] = report.aggregated
        # the global model's row; the cross-site step (when enabled) adds the sites' local models
        final["cross_site"] = cross_site_matrix(self.sites, {(GLOBAL_MODEL, s): m for s, m in report.sites.items()},
                                                [GLOBAL_MODEL], {})
        final["failures"] = report.failed
        final["rejected"] = [dataclasses.asdict(r) for r in report.rejected]
        final["bytes"] = {"down": report.bytes_down, "up": report.bytes_up}
        final["note"] = report.note
        self.telemetry.final_drops(final["rejected"])
        mae_rounds = [r for r in self.history if r["phase"] == PRETRAIN and r["evaluate"]["aggregated"]]
        if mae_rounds:
            final["mae"] = dict(mae_rounds[-1]["evaluate"]["aggregated"])
        pooled = final["pooled"]
        if pooled:
            log.info("final: pooled accuracy %s, balanced accuracy %s over %d test scans at %d sites",
                     _fmt(pooled.get("accuracy")), _fmt(pooled.get("balanced_accuracy")),
                     int(pooled.get("num_examples", 0)), len(final["sites"]))
        return final

    def _cross_site(self, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The cross-site step (``server.cross_site_step``); never fails the run."""
        final = dict(self.final or {})
        global_scores = final.get("sites", {})
        try:  # after a restart the registry is empty: ask the sites again (no wait for absent test splits)
            self._ensure_sites(CROSS_SITE, EVALUATE, 1, timeout_s=min(30.0, self.cfg.round_timeout_s))
        except InsufficientSitesError as exc:
            log.warning("cross-site evaluation skipped: %s", exc)
            scores = {(GLOBAL_MODEL, s): m for s, m in global_scores.items()}
            final["cross_site"] = cross_site_matrix(self.sites, scores, [GLOBAL_MODEL], {"skipped": str(exc)})
            return final
        final["cross_site"], drops = run_cross_site(self.strategy(CROSS_SITE), self.grid, self.sites, weights,
                                                    global_scores, self.cfg.round_timeout_s)
        self.telemetry.final_drops(drops)
        return final

    def _export(self, weights: dict[str, torch.Tensor]) -> Path:
        participating = sorted({s for r in self.history for s in r["train"]["sites"]})
        return export_model(self.run_dir, weights, {
            "kind": "ILDClassifier", "model_config": to_mapping(self.model_cfg), "pooling": self.cfg.model.pooling,
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
        self._remove_stale_spools()
        self._write_run_config()
        completed, phase, weights = self._restore()
        try:
            for step in steps_after(self.plan, completed):
                self.telemetry.prom.set_phase(step.phase, round_timeout_s=self.cfg.round_timeout_s)
                record: dict[str, Any] = {}
                if step.kind == "handoff":
                    weights, phase = self.handoff(weights), FINETUNE
                elif step.kind == "train":
                    weights, record = self._train_round(step, weights)
                    phase = step.phase
                    self.history.append(record)
                elif step.kind == "cross-site":
                    self.final = self._cross_site(weights)
                    self._export(weights)
                else:
                    self.final = self._final(weights)
                    if not self.cfg.cross_site.enabled:
                        self._export(weights)
                self._checkpoint(step, phase, weights)
                if record:
                    with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(record, default=str) + "\n")
                self._write_summary("running")
                if self.progress is not None:
                    self.progress(step, record)
        except BaseException as exc:
            self.telemetry.event("run-finished", status="failed" if not isinstance(exc, KeyboardInterrupt)
                                 else "stopped", rounds=len(self.history))
            raise
        finally:
            self.telemetry.close()
        self._write_summary("completed")
        self.telemetry.event("run-finished", status="completed", rounds=len(self.history))
        summary: dict[str, Any] = json.loads((self.run_dir / "metrics.json").read_text(encoding="utf-8"))
        return summary


def _fmt(value: Any) -> str:
    return "undefined" if value is None else f"{float(value):.3f}"
