"""The federation's strategy: phase-aware site sampling, validated updates, robust aggregation.

Sites differ: some hold only unlabelled scans (they can pretrain, not fine-tune), some have no test split.
Before each phase the server *queries* every connected site for counts (no data, no identifiers), and a
round samples only the sites that can serve it, so a phase never waits for a site that cannot take part.

:class:`PhaseStrategy` is a Flower ``FedAvg`` whose ``configure_*`` add the phase, lr, local epochs,
FedProx ``mu`` and compression to each message and send the global model fp16-packed, and whose
``aggregate_*`` decode each site's *update* (local - global), validate it (``server.update_checks``),
combine the valid ones (``server.aggregation``) and keep a :class:`RoundReport` of who took part, who
failed or was rejected (site name and check only) and how many bytes crossed the wire.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from lungmae_core.errors import LungMAEError
from lungmae_core.privacy import (
    MAX_EPSILON_PER_ROUND_KEY, REQUIRE_DP_KEY, central_dp_epsilon, central_dp_mean, is_privacy_refusal,
    secure_generator,
)
from lungmae_core.schema import (
    EVALUATE, FINAL, FINETUNE, PRETRAIN, QUERY, SITE_NAME_KEY, SITE_RECORD, TRAIN, SchemaError,
    check_metrics,
)
from lungmae_core.wire import apply_delta, pack_state, packed_layout

from server.aggregation import aggregate_updates
from server.update_checks import Rejection, UpdateRejected, validate_update

__all__ = [
    "InsufficientSitesError",
    "SiteInfo",
    "RoundReport",
    "PhaseStrategy",
    "query_sites",
    "arrays_to_state",
    "state_to_arrays",
    "pooled_from_confusion",
]

log = logging.getLogger(__name__)


class InsufficientSitesError(LungMAEError):
    """Fewer sites than the phase's ``min-sites`` can serve it, after waiting ``round-timeout-s``."""


def arrays_to_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> name -> NumPy array (no dtype change)."""
    return {k: v.numpy() for k, v in record.items()}


def state_to_arrays(state: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """name -> tensor/array -> ArrayRecord keeping each dtype (bfloat16 is cast to float32)."""
    arrays = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            v = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        arrays[k] = np.array(v, order="C")
    return ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})


@dataclasses.dataclass
class SiteInfo:
    """What a site said about itself in the query round (counts and settings only)."""

    node_id: int
    name: str
    num_unlabelled: int = 0
    num_labelled_train: int = 0
    num_labelled_val: int = 0
    num_labelled_test: int = 0
    dp_enabled: bool = False
    epsilon_budget: float = 0.0
    has_gpu: bool = False
    error: str = ""
    epsilon: float = 0.0  # the site's total epsilon, as last reported
    privacy_refused: str = ""  # why the site refused to train (budget, requirement): no more train rounds

    def can_serve(self, phase: str, kind: str) -> bool:
        """Whether the site has the scans a (phase, kind) message needs."""
        if self.error:
            return False
        if kind == TRAIN:
            if phase == PRETRAIN:
                return self.num_unlabelled + self.num_labelled_train > 0
            return self.num_labelled_train > 0
        if phase == FINAL:
            return self.num_labelled_test > 0
        return self.num_labelled_val > 0

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "node_id"}


@dataclasses.dataclass
class RoundReport:
    """What happened in one train or evaluate exchange (no values from any update)."""

    kind: str
    sampled: list[str] = dataclasses.field(default_factory=list)
    replied: list[str] = dataclasses.field(default_factory=list)
    failed: list[dict[str, str]] = dataclasses.field(default_factory=list)
    rejected: list[Rejection] = dataclasses.field(default_factory=list)
    sites: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    aggregated: dict[str, Any] = dataclasses.field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    skipped: bool = False
    note: str = ""
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rejected"] = [dataclasses.asdict(r) for r in self.rejected]
        return out


def _metrics_dict(record: MetricRecord) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}


def _weighted_mean(sites: Mapping[str, Mapping[str, Any]], skip: Sequence[str] = ()) -> dict[str, Any]:
    """Example-weighted mean of every scalar key; ``num-examples`` summed; lists left out."""
    total = sum(float(m["num-examples"]) for m in sites.values())
    out: dict[str, Any] = {"num-examples": int(total)}
    if not sites:
        return out
    for key, value in next(iter(sites.values())).items():
        if key == "num-examples" or key in skip or isinstance(value, list):
            continue
        if total > 0:
            out[key] = sum(float(m[key]) * float(m["num-examples"]) for m in sites.values()) / total
        else:
            out[key] = sum(float(m[key]) for m in sites.values()) / len(sites)
    return out


def pooled_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and weighted F1 of a (C, C) confusion matrix (rows: truth).

    Pooling the sites' confusion matrices gives exactly the metrics of all test scans together without any
    per-scan value leaving a site. Classes without support are left out of the balanced accuracy.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    if total <= 0:
        return {"accuracy": 0.0, "balanced_accuracy": 0.0, "weighted_f1": 0.0}
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / total),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "weighted_f1": float((f1 * support).sum() / support.sum()),
    }


def _parse_site(reply: Message, node_id: int) -> SiteInfo:
    content = reply.content
    metrics = _metrics_dict(content["metrics"]) if "metrics" in content.metric_records else {}
    check_metrics(QUERY, "", metrics)
    name = f"node-{node_id}"
    if SITE_RECORD in content.config_records:
        raw = content.config_records[SITE_RECORD].get(SITE_NAME_KEY, name)
        name = str(raw)[:64] if raw else name
    return SiteInfo(
        node_id=node_id, name=name,
        num_unlabelled=int(metrics["num-unlabelled"]), num_labelled_train=int(metrics["num-labelled-train"]),
        num_labelled_val=int(metrics["num-labelled-val"]), num_labelled_test=int(metrics["num-labelled-test"]),
        dp_enabled=bool(metrics["dp-enabled"]), epsilon_budget=float(metrics["epsilon-budget"]),
        has_gpu=bool(metrics["has-gpu"]))


def query_sites(
    grid: Grid,
    known: dict[int, SiteInfo],
    *,
    phase: str,
    kind: str,
    min_sites: int,
    timeout_s: float,
    config: Mapping[str, Any] | None = None,
    poll_s: float = 1.0,
) -> dict[int, SiteInfo]:
    """Ask every connected site not yet in ``known`` what it can serve; wait for ``min_sites`` able ones.

    Args:
        grid: the Flower grid.
        known: node id -> site info from earlier queries; updated in place and returned.
        phase, kind: what the coming rounds need (e.g. ``finetune``/``train``).
        min_sites: how many sites able to serve (phase, kind) to wait for.
        timeout_s: give up after this long.
        config: extra message config sent with the query (the phase, the model config).

    Raises:
        InsufficientSitesError: naming how many of how many connected sites can serve the phase.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        new = [n for n in grid.get_node_ids() if n not in known]
        if new:
            record = ConfigRecord({"phase": phase, **(config or {})})
            messages = [Message(RecordDict({"config": record}), dst_node_id=n, message_type=QUERY) for n in new]
            replies = list(grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic())))
            by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
            answered = set()
            for reply in replies:
                node = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                answered.add(node)
                if reply.has_error():
                    known[node] = SiteInfo(node_id=node, name=f"node-{node}", error=reply.error.reason[:300])
                    log.warning("site query: node %s answered with an error: %s", node, known[node].error)
                    continue
                try:
                    info = _parse_site(reply, node)
                except (SchemaError, KeyError, TypeError, ValueError) as exc:
                    known[node] = SiteInfo(node_id=node, name=f"node-{node}", error=f"bad query reply: {exc}")
                    log.warning("site query: node %s sent a bad reply: %s", node, exc)
                    continue
                if any(s.name == info.name for s in known.values()):
                    info.name = f"{info.name}#{node}"
                known[node] = info
                log.info("site %s: %d unlabelled, %d/%d/%d labelled train/val/test, dp %s", info.name,
                         info.num_unlabelled, info.num_labelled_train, info.num_labelled_val,
                         info.num_labelled_test, "on" if info.dp_enabled else "off")
        able = [s for s in known.values() if s.can_serve(phase, kind)]
        if len(able) >= min_sites:
            return known
        if time.monotonic() >= deadline:
            connected = len(list(grid.get_node_ids()))
            raise InsufficientSitesError(
                f"Unable to run {phase} ({kind}) as only {len(able)} of {connected} connected sites can serve it "
                f"and min-sites is {min_sites}; sites without the needed scans: "
                f"{sorted(s.name for s in known.values() if not s.can_serve(phase, kind))}")
        time.sleep(poll_s)


class PhaseStrategy(FedAvg):
    """FedAvg for one phase, with phase-aware sampling, update validation and robust aggregation.

    Args:
        phase: ``pretrain`` or ``finetune``.
        sites: node id -> :class:`SiteInfo` from :func:`query_sites` (read at each round).
        fraction: fraction of the able sites sampled per train round.
        min_sites: fewest valid updates to aggregate; fewer skips the round (the model is kept).
        method: ``fedavg``, ``fedprox``, ``trimmed-mean`` or ``median``.
        trim: trimmed-mean cut per end.
        mu: FedProx proximal weight sent to sites (0 for the others).
        compression: how sites encode their update: ``fp32``, ``fp16`` or ``int8``.
        max_norm: bound on an update's L2 norm.
        seed: run seed; site sampling of round r uses ``Random(seed * 100003 + r)``.
        upload_names: names of the entries sites send back (the trainable part); None: all.
        static_config: values added to every message config (model config, classes, mode, seed).
        max_epsilon_per_round: kept for the record; the sites enforce it on their planned round epsilon.
        require_dp: sample only sites that train with DP.
        central_dp: ``None``, or ``(noise_multiplier, clip, delta)``: aggregate as an equal-weight mean of
            updates clipped to ``clip`` plus Gaussian noise (``lungmae_core.privacy.central_dp_mean``).
    """

    def __init__(self, *, phase: str, sites: Mapping[int, SiteInfo], fraction: float = 1.0, min_sites: int = 1,
                 method: str = "fedavg", trim: float = 0.2, mu: float = 0.0, compression: str = "fp16",
                 max_norm: float = 1e3, seed: int = 0, upload_names: Sequence[str] | None = None,
                 static_config: Mapping[str, Any] | None = None, max_epsilon_per_round: float = 0.0,
                 require_dp: bool = False, central_dp: tuple[float, float, float] | None = None) -> None:
        super().__init__(fraction_train=fraction, fraction_evaluate=1.0, min_train_nodes=min_sites,
                         min_evaluate_nodes=1, min_available_nodes=min_sites)
        self.phase = phase
        self.sites = sites
        self.min_sites = min_sites
        self.method = method
        self.trim = trim
        self.mu = mu if method == "fedprox" else 0.0
        self.compression = compression
        self.max_norm = max_norm
        self.seed = seed
        self.upload_names = list(upload_names) if upload_names is not None else None
        self.static_config = dict(static_config or {})
        self.max_epsilon_per_round = max_epsilon_per_round
        self.require_dp = require_dp
        self.central_dp = central_dp
        self.last_train: RoundReport | None = None
        self.last_evaluate: RoundReport | None = None
        self._global: dict[str, torch.Tensor] = {}
        self._sent: dict[str, int] = {}
        self._messages: list[Message] = []
        self._t0 = 0.0

    # ------------------------------------------------------------------ sampling
    def able_nodes(self, grid: Grid, phase: str, kind: str) -> list[int]:
        """Connected nodes whose site can serve (phase, kind) (and trains with DP if required)."""
        connected = set(grid.get_node_ids())
        able = []
        for node in sorted(connected):
            info = self.sites.get(node)
            if info is None or not info.can_serve(phase, kind):
                continue
            if kind == TRAIN and info.privacy_refused:
                continue
            if self.require_dp and kind == TRAIN and not info.dp_enabled:
                if not info.privacy_refused:
                    info.privacy_refused = "federation requires DP and the site has privacy.enabled false"
                    log.warning("site %s excluded from training: %s", info.name, info.privacy_refused)
                continue
            able.append(node)
        return able

    def _name(self, node: int) -> str:
        info = self.sites.get(node)
        return info.name if info is not None else f"node-{node}"

    def _messages_for(self, nodes: Sequence[int], arrays: ArrayRecord, config: ConfigRecord, kind: str,
                      report: RoundReport) -> list[Message]:
        self._global = {k: torch.from_numpy(np.array(v.numpy(), dtype=np.float32)) if
                        np.issubdtype(v.numpy().dtype, np.floating) else torch.from_numpy(v.numpy().copy())
                        for k, v in arrays.items()}
        down = state_to_arrays(pack_state(self._global, "fp32" if self.compression == "fp32" else "fp16"))
        record = RecordDict({"arrays": down, "config": config})
        messages = [Message(content=record, dst_node_id=n, message_type=kind) for n in nodes]
        report.sampled = [self._name(n) for n in nodes]
        report.bytes_down = down.count_bytes() * len(nodes)
        self._messages = messages
        self._t0 = time.perf_counter()
        return messages

    def _config(self, config: ConfigRecord, server_round: int, phase: str) -> ConfigRecord:
        values = dict(self.static_config)
        values.update(dict(config))
        values.update({"phase": phase, "server-round": server_round, "compression": self.compression,
                       "proximal-mu": float(self.mu), REQUIRE_DP_KEY: bool(self.require_dp),
                       MAX_EPSILON_PER_ROUND_KEY: float(self.max_epsilon_per_round)})
        return ConfigRecord(values)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample ``max(fraction * able, min-sites)`` able sites and send them the global model."""
        report = RoundReport(kind=TRAIN)
        self.last_train = report
        able = self.able_nodes(grid, self.phase, TRAIN)
        if len(able) < self.min_sites:
            report.skipped = True
            report.note = f"only {len(able)} sites can train {self.phase}; min-sites is {self.min_sites}"
            log.warning("round %d skipped: %s", server_round, report.note)
            return []
        n = min(len(able), max(int(len(able) * self.fraction_train), self.min_sites))
        nodes = sorted(random.Random(self.seed * 100003 + server_round).sample(able, n))
        log.info("round %d (%s): sampled %s", server_round, self.phase, [self._name(x) for x in nodes])
        return self._messages_for(nodes, arrays, self._config(config, server_round, self.phase), TRAIN, report)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Send the global model to every site with an evaluation split for the config's phase."""
        phase = str(config.get("phase", self.phase))
        report = RoundReport(kind=EVALUATE)
        self.last_evaluate = report
        nodes = self.able_nodes(grid, phase, EVALUATE)
        if not nodes:
            report.skipped = True
            report.note = f"no site has scans to evaluate {phase}"
            return []
        cfg = self._config(config, server_round, phase)
        cfg["split"] = "test" if phase == FINAL else "val"
        return self._messages_for(nodes, arrays, cfg, EVALUATE, report)

    # --------------------------------------------------------------- aggregation
    def _split(self, replies: Iterable[Message], report: RoundReport, kind: str,
               phase: str) -> list[tuple[str, Message, dict[str, Any]]]:
        """Separate failed replies and replies that break the schema from usable ones."""
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in self._messages}
        usable = []
        replies = list(replies)
        for reply in replies:
            node = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            site = self._name(node)
            report.bytes_up += sum(r.count_bytes() for r in reply.content.array_records.values()) \
                if reply.has_content() else 0
            if reply.has_error():
                reason = (reply.error.reason or "no reason given").strip().splitlines()
                report.failed.append({"site": site, "reason": (reason[-1] if reason else "")[:300]})
                info = self.sites.get(node)
                if kind == TRAIN and info is not None and is_privacy_refusal(reply.error.reason):
                    info.privacy_refused = report.failed[-1]["reason"]
                    log.warning("%s %s: site %s refused for privacy and is excluded from further training "
                                "rounds: %s", kind, phase, site, info.privacy_refused)
                    continue
                log.warning("%s %s: site %s failed: %s", kind, phase, site, report.failed[-1]["reason"])
                continue
            content = reply.content
            try:
                if list(content.metric_records) != ["metrics"]:
                    raise SchemaError(f"expected one MetricRecord 'metrics', got {list(content.metric_records)}")
                metrics = _metrics_dict(content["metrics"])
                check_metrics(kind, phase, metrics)
                if kind == TRAIN and list(content.array_records) != ["arrays"]:
                    raise SchemaError(f"expected one ArrayRecord 'arrays', got {list(content.array_records)}")
            except SchemaError as exc:
                report.rejected.append(Rejection(site=site, check="reply", reason=str(exc)[:300]))
                log.warning("%s %s: update from %s rejected by the reply check: %s", kind, phase, site, exc)
                continue
            if kind == TRAIN and not self._privacy_ok(node, site, metrics, report):
                continue
            usable.append((site, reply, metrics))
        answered = {by_id.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies}
        for node in [m.metadata.dst_node_id for m in self._messages if m.metadata.dst_node_id not in answered]:
            report.failed.append({"site": self._name(node), "reason": "no reply within round-timeout-s"})
            log.warning("%s %s: site %s did not reply in time", kind, phase, self._name(node))
        report.replied = [s for s, _, _ in usable]
        return usable

    def _privacy_ok(self, node: int, site: str, metrics: Mapping[str, Any], report: RoundReport) -> bool:
        """Check a train reply's ``epsilon`` (the site's running total) against ``federation.yaml`` privacy.

        The site enforces ``max-epsilon-per-round`` on the round's own epsilon before training; a composed total
        grows by at most that much, so a larger jump means the site broke the rule. Under ``require-dp`` a
        site that still reports 0 after training did not train with DP.
        """
        info = self.sites.get(node)
        total = float(metrics["epsilon"])
        grew = total - (info.epsilon if info is not None else 0.0)
        reason = ""
        if self.max_epsilon_per_round > 0 and grew > self.max_epsilon_per_round * (1 + 1e-6):
            reason = (f"epsilon grew by {grew:.3g} this round, over max-epsilon-per-round "
                      f"{self.max_epsilon_per_round:.3g}")
        elif self.require_dp and total <= 0.0:
            reason = "federation requires DP and the site reports epsilon 0 after training"
        if reason:
            report.rejected.append(Rejection(site=site, check="privacy", reason=reason))
            log.warning("train %s: update from %s rejected by the privacy check: %s", self.phase, site, reason)
            return False
        if info is not None:
            info.epsilon = max(info.epsilon, total)
        return True

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each update, aggregate the valid ones; None (round skipped) if too few remain."""
        report = self.last_train or RoundReport(kind=TRAIN)
        usable = self._split(replies, report, TRAIN, self.phase)
        names = self.upload_names if self.upload_names is not None else list(self._global)
        layout = packed_layout({k: self._global[k] for k in names}, self.compression)
        updates, weights = [], []
        for site, reply, metrics in usable:
            try:
                delta = validate_update(site, arrays_to_state(reply.content["arrays"]), layout, self.max_norm)
            except UpdateRejected as exc:
                report.rejected.append(Rejection.from_error(exc))
                log.warning("round %d: %s", server_round, exc)
                continue
            updates.append(delta)
            weights.append(float(metrics["num-examples"]))
            report.sites[site] = metrics
        report.replied = list(report.sites)
        report.duration_s = time.perf_counter() - self._t0
        if len(updates) < self.min_sites:
            report.skipped = True
            report.note = report.note or (f"{len(updates)} valid updates, fewer than min-sites {self.min_sites}; "
                                          "the global model is kept")
            log.warning("round %d: %s", server_round, report.note)
            return None, None
        if self.central_dp is not None:
            sigma, clip, delta = self.central_dp
            agg, norms = central_dp_mean(updates, clip=clip, noise_multiplier=sigma,
                                         generator=secure_generator())
            clipped = sum(1 for n in norms if n > clip)
        else:
            agg = aggregate_updates(updates, weights, self.method, self.trim)
        new_state = apply_delta(self._global, agg)
        report.aggregated = _weighted_mean(report.sites, skip=("update-bytes",))
        if self.central_dp is not None:
            # server_round counts every round of the schedule so far: an upper bound on the noised releases
            report.aggregated["central-epsilon"] = central_dp_epsilon(sigma, server_round, delta)
            report.aggregated["central-clipped"] = clipped
            log.info("round %d: central DP, %d of %d updates clipped to %.3g, noise %.3g; central epsilon %.3f "
                     "(delta %.2g)", server_round, clipped, len(updates), clip, sigma * clip / len(updates),
                     report.aggregated["central-epsilon"], delta)
        log.info("round %d (%s): aggregated %d updates (%s), %d rejected, %d failed; %.1f kB down, %.1f kB up",
                 server_round, self.phase, len(updates), self.method, len(report.rejected), len(report.failed),
                 report.bytes_down / 1e3, report.bytes_up / 1e3)
        return state_to_arrays(new_state), MetricRecord({k: v for k, v in report.aggregated.items()})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted means; for classifiers also summed confusion matrix and pooled metrics."""
        report = self.last_evaluate or RoundReport(kind=EVALUATE)
        phase = self._messages[0].content["config"]["phase"] if self._messages else self.phase
        usable = self._split(replies, report, EVALUATE, str(phase))
        report.duration_s = time.perf_counter() - self._t0
        for site, _, metrics in usable:
            report.sites[site] = metrics
        if not report.sites:
            report.skipped = True
            report.note = report.note or "no evaluation replies"
            return None
        agg = _weighted_mean(report.sites, skip=("roc-auc", "roc-auc-valid"))
        first = next(iter(report.sites.values()))
        if "confusion-matrix" in first:
            cm = np.sum([np.asarray(m["confusion-matrix"], dtype=np.int64) for m in report.sites.values()], axis=0)
            side = int(round(len(cm) ** 0.5))
            agg["confusion-matrix"] = [int(v) for v in cm]
            pooled = pooled_from_confusion(cm.reshape(side, side))
            agg.update({k.replace("_", "-"): v for k, v in pooled.items()})
            valid = {s: m for s, m in report.sites.items() if m.get("roc-auc-valid", 0)}
            n = sum(float(m["num-examples"]) for m in valid.values())
            agg["roc-auc"] = sum(float(m["roc-auc"]) * float(m["num-examples"]) for m in valid.values()) / n \
                if n > 0 else 0.0
            agg["roc-auc-valid"] = int(n > 0)
        report.aggregated = agg
        return MetricRecord({k: v for k, v in agg.items()})
