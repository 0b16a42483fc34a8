"""One exchange with the sites: configure, send, collect, validate each reply on its own, aggregate.

:class:`PhaseStrategy` is built once per phase with that phase's :class:`~lungmae_core.contract.RoundConfig`
and serves its training rounds and evaluations. Every reply is hostile until validated
(:meth:`PhaseStrategy._collect`), in this order, each failure dropping *that reply only* with its check:

``replay``     the reply answers a message of this exchange, once, and echoes its round;
``identity``   it comes from the node the message went to;
``size``       its payload is within the byte bound (measured before anything is decoded);
``contract``   it decodes into a ``TrainReply``/``EvalReply`` (keys, types, finite, in range, shapes);
``count``      ``num_examples`` is no larger than the count the site declared in its query;
``privacy``    its epsilon is consistent with ``federation.yaml`` privacy (``require-dp``, per-round limit);
``names`` ... ``norm``  the update matches the global model and its bounds (``server.update_checks``).

Nothing a reply contains can raise out of the round: an unexpected error while checking is a drop too.
A site's aggregation weight (its example count) is capped at ``max-site-share`` of the total
(``server.aggregation.capped_shares``). Site names come from the registry (the authenticated node).

Memory does not grow with the number of sites: replies are pulled one at a time as they arrive
(:func:`server.replies.iter_replies`: ``grid.push_messages``, then ``grid.pull_messages`` of one id at a time), and
each training update is validated, folded into a :class:`~server.streaming_aggregation.StreamingAggregator`
(a running weighted sum; robust methods and the share cap spool updates to disk) and dropped before the
next reply is pulled. A grid without push/pull (the tests' in-process grid) falls back to
``send_and_receive``, which holds every reply.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from lungmae_core.atomic import atomic_path
from lungmae_core.bundle import DEFLATED, layout_nbytes, unbundle
from lungmae_core.contract import (
    EVALUATE,
    PRETRAIN,
    TRAIN,
    ContractError,
    EvalReply,
    RoundConfig,
    TrainReply,
)
from lungmae_core.metrics import auc_from_histograms, pooled_from_confusion
from lungmae_core.privacy import central_dp_epsilon, is_privacy_refusal, secure_generator
from lungmae_core.wire import (
    WireFormatError,
    apply_delta,
    down_compression,
    pack_state,
    packed_layout,
)
from server.aggregation import capped_shares
from server.replies import iter_replies, reply_bytes, state_to_arrays, take_arrays
from server.sites import SiteRegistry
from server.streaming_aggregation import StreamingAggregator
from server.update_checks import Rejection, UpdateRejected, validate_update

__all__ = ["RoundReport", "PhaseStrategy", "pool_evaluations"]

log = logging.getLogger(__name__)

_EVAL_REPLY_BYTES = 1 << 20


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

    def drop(self, site: str, check: str, reason: str, kind: str, phase: str) -> None:
        self.rejected.append(Rejection(site=site, check=check, reason=reason[:300]))
        log.warning("%s %s: reply from %s dropped by the %s check: %s", kind, phase, site, check, reason[:300])


def _weighted(sites: Sequence[tuple[float, Mapping[str, Any]]], key: str) -> float | None:
    """Example-weighted mean of ``key`` over the sites where it is defined (None where none is)."""
    pairs = [(w, float(m[key])) for w, m in sites if m.get(key) is not None]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total > 0 else None


class PhaseStrategy:
    """Sampling, sending, validating and aggregating for one phase.

    Args:
        round_config: the phase's request (rounds change only ``server_round`` and the lr segment).
        sites: the site registry.
        fraction, min_sites: sample ``max(fraction * able, min_sites)`` able sites; fewer valid updates
            than ``min_sites`` keep the global model.
        method, trim: aggregation (``server.aggregation``).
        max_norm: bound on an update's L2 norm.
        max_site_share: cap of one site's share of the example weights.
        max_reply_bytes: byte bound of a train reply (0: twice the fp32 size of the sent part + 1 MiB).
        upload_names: entries sites send back (None: all).
        max_epsilon_per_round, require_dp: ``federation.yaml`` privacy requirements.
        central_dp: (noise multiplier, clip, delta) for server-side DP, or None.
        seed: run seed (site sampling).
        spool_dir: where robust aggregation and the share cap keep updates on disk during a round (each round
            makes and removes its own directory inside; default: the system's temporary directory).
    """

    def __init__(self, round_config: RoundConfig, sites: SiteRegistry, *, fraction: float = 1.0, min_sites: int = 1,
                 method: str = "fedavg", trim: float = 0.2, max_norm: float = 1e3, max_site_share: float = 0.5,
                 max_reply_bytes: int = 0, upload_names: Sequence[str] | None = None,
                 max_epsilon_per_round: float = 0.0, require_dp: bool = False,
                 central_dp: tuple[float, float, float] | None = None, seed: int = 0,
                 spool_dir: str | os.PathLike[str] | None = None) -> None:
        self.round_config = round_config
        self.phase = round_config.phase
        self.sites = sites
        self.fraction, self.min_sites = fraction, min_sites
        self.method, self.trim, self.max_norm = method, trim, max_norm
        self.max_site_share = max_site_share
        self.max_reply_bytes = max_reply_bytes
        self.upload_names = list(upload_names) if upload_names is not None else None
        self._shapes: dict[str, tuple[int, ...]] | None = None  # the global shapes of the round being collected
        self.max_epsilon_per_round, self.require_dp = max_epsilon_per_round, require_dp
        self.central_dp = central_dp
        self.seed = seed
        self.spool_dir = spool_dir

    # ---------------------------------------------------------------------------------------- send
    def _send(self, grid: Grid, nodes: Sequence[int], weights: Mapping[str, torch.Tensor], cfg: RoundConfig,
              kind: str, report: RoundReport, timeout: float) -> tuple[dict[str, int], Iterator[Message]]:
        """Send the model to ``nodes``; returns (message id -> node) and the replies as they arrive.

        Once pushed, the messages (and the packed model they share) are not kept here.
        """
        down = state_to_arrays(pack_state(weights, down_compression(cfg.compression)))
        content = RecordDict({"arrays": down, "config": ConfigRecord(cfg.encode())})
        messages = [Message(content=content, dst_node_id=n, message_type=kind) for n in nodes]
        report.sampled = [self.sites.name(n) for n in nodes]
        report.bytes_down = down.count_bytes() * len(nodes)
        replies = iter_replies(grid, messages, timeout) if messages else iter(())
        return {m.metadata.message_id: m.metadata.dst_node_id for m in messages}, replies

    # ------------------------------------------------------------------------------------ validate
    def _collect(self, sent: Mapping[str, int], replies: Iterable[Message], report: RoundReport, kind: str,
                 cfg: RoundConfig, layout: Mapping[str, Any] | None) -> Iterator[tuple[int, str, Any, Any]]:
        """Validate each reply on its own as it arrives; yields (node, site, decoded reply, decoded update).

        A generator, so that the caller folds each update in and drops it before the next reply is pulled.
        """
        answered: set[int] = set()
        bound = self.max_reply_bytes if kind == TRAIN else _EVAL_REPLY_BYTES
        if kind == TRAIN and bound <= 0 and layout is not None:
            bound = 2 * sum(int(np.prod(shape)) * 4 for shape, _ in layout.values()) + (1 << 20)
        for reply in replies:
            node = sent.get(reply.metadata.reply_to_message_id)
            if node is None or node in answered:
                site = self.sites.name(reply.metadata.src_node_id)
                report.drop(site, "replay", "the reply answers no message of this exchange, or answers one twice",
                            kind, cfg.phase)
                continue
            answered.add(node)
            site = self.sites.name(node)
            # the SuperLink's own error replies (a node that stopped) come from node 1: only replies are checked
            if not reply.has_error() and reply.metadata.src_node_id != node:
                report.drop(site, "identity", f"the reply to {site} comes from node {reply.metadata.src_node_id}",
                            kind, cfg.phase)
                continue
            try:
                item = self._check(node, site, reply, report, kind, cfg, layout, bound)
            except Exception as exc:  # noqa: BLE001  (no reply may raise out of the round)
                report.drop(site, "contract", f"unexpected {type(exc).__name__} while checking the reply", kind,
                            cfg.phase)
                continue
            finally:
                del reply  # the received bytes go before the next reply is pulled
            if item is not None:
                yield item
                del item
        for node in [n for n in sent.values() if n not in answered]:
            report.failed.append({"site": self.sites.name(node), "reason": "no reply within round-timeout-s"})
            log.warning("%s %s: site %s did not reply in time", kind, cfg.phase, self.sites.name(node))

    def _check(self, node: int, site: str, reply: Message, report: RoundReport, kind: str, cfg: RoundConfig,
               layout: Mapping[str, Any] | None, bound: int) -> tuple[int, str, Any, Any] | None:
        if reply.has_error():
            reason = (reply.error.reason or "no reason given").strip().splitlines()
            report.failed.append({"site": site, "reason": (reason[-1] if reason else "")[:300]})
            info = self.sites.get(node)
            if kind == TRAIN and info is not None and is_privacy_refusal(reply.error.reason):
                info.privacy_refused = report.failed[-1]["reason"]
                log.warning("train %s: site %s refused for privacy and is excluded from further training rounds: %s",
                            cfg.phase, site, info.privacy_refused)
            else:
                log.warning("%s %s: site %s failed: %s", kind, cfg.phase, site, report.failed[-1]["reason"])
            return None
        size = reply_bytes(reply)
        report.bytes_up += size
        if size > bound:
            report.drop(site, "size", f"reply of {size} bytes exceeds the bound of {bound} bytes", kind, cfg.phase)
            return None
        content = reply.content
        expected_arrays = ["arrays"] if kind == TRAIN else []
        if list(content.metric_records) != ["metrics"] or list(content.array_records) != expected_arrays:
            report.drop(site, "contract", f"expected MetricRecord 'metrics' and ArrayRecords {expected_arrays}; got "
                        f"{list(content.metric_records)[:3]} and {list(content.array_records)[:3]}", kind, cfg.phase)
            return None
        try:
            raw = dict(content["metrics"])
            decoded = TrainReply.decode(raw) if kind == TRAIN else EvalReply.decode(raw, num_classes=cfg.num_classes)
        except ContractError as exc:
            report.drop(site, "contract", str(exc), kind, cfg.phase)
            return None
        if decoded.server_round != cfg.server_round:
            report.drop(site, "replay", f"the reply is for round {decoded.server_round}, not {cfg.server_round}",
                        kind, cfg.phase)
            return None
        info = self.sites.get(node)
        declared = info.declared(cfg.phase, kind, cfg.split) if info is not None else 0
        if decoded.num_examples > declared:
            report.drop(site, "count", f"num_examples {decoded.num_examples} exceeds the {declared} scans the site "
                        "declared", kind, cfg.phase)
            return None
        if not isinstance(decoded, TrainReply):
            return node, site, decoded, None
        if not self._privacy_ok(info, site, decoded, report):
            return None
        try:
            # a deflated update's layout is bounded by the expected one before anything is inflated (a larger
            # one is a "contract" drop there); a plain one's bytes arrived already, within the size bound, and
            # a wrong layout is left to validate_update, whose "shapes" drop names the tensor
            deflate = cfg.compression in DEFLATED
            packed = unbundle(take_arrays(content.array_records["arrays"]), deflate=deflate,
                              max_bytes=layout_nbytes(layout) if deflate and layout else None)
        except WireFormatError as exc:
            report.drop(site, "contract", str(exc), kind, cfg.phase)
            return None
        try:
            delta = validate_update(site, packed, layout or {}, self.max_norm, shapes=self._shapes)
        except UpdateRejected as exc:
            report.rejected.append(Rejection.from_error(exc))
            log.warning("train %s round %d: %s", cfg.phase, cfg.server_round, exc)
            return None
        return node, site, decoded, delta

    def _privacy_ok(self, info: Any, site: str, reply: TrainReply, report: RoundReport) -> bool:
        """A train reply's ``epsilon`` (finite and >= 0 by the contract) against ``federation.yaml`` privacy.

        The site enforces ``max-epsilon-per-round`` before training; its running total grows by at most that
        much, so a larger jump means the site broke the rule. Under ``require-dp`` a total of 0 after training
        means the site did not train with DP.
        """
        before = info.epsilon if info is not None else 0.0
        grew = reply.epsilon - before
        reason = ""
        if self.max_epsilon_per_round > 0 and grew > self.max_epsilon_per_round * (1 + 1e-6):
            reason = (f"epsilon grew by {grew:.3g} this round, over max-epsilon-per-round "
                      f"{self.max_epsilon_per_round:.3g}")
        elif self.require_dp and not reply.epsilon > 0.0:
            reason = "federation requires DP and the site reports epsilon 0 after training"
        elif self.require_dp and reply.epsilon < before:
            reason = f"epsilon went down from {before:.3g} to {reply.epsilon:.3g}"
        if reason:
            report.drop(site, "privacy", reason, TRAIN, self.phase)
            return False
        if info is not None:
            info.epsilon = max(info.epsilon, reply.epsilon)
        return True

    # -------------------------------------------------------------------------------------- train
    def train_round(self, grid: Grid, weights: dict[str, torch.Tensor], cfg: RoundConfig,
                    timeout: float) -> tuple[dict[str, torch.Tensor] | None, RoundReport]:
        """Sample, send, validate and aggregate one round; ``(None, report)`` when the round is skipped."""
        report = RoundReport(kind=TRAIN)
        t0 = time.perf_counter()
        able = self.sites.able(grid, self.phase, TRAIN, require_dp=self.require_dp)
        if len(able) < self.min_sites:
            report.skipped = True
            report.note = f"only {len(able)} sites can train {self.phase}; min-sites is {self.min_sites}"
            log.warning("round %d skipped: %s", cfg.server_round, report.note)
            return None, report
        n = min(len(able), max(int(len(able) * self.fraction), self.min_sites))
        nodes = sorted(random.Random(self.seed * 100003 + cfg.server_round).sample(able, n))
        log.info("round %d (%s): sampled %s", cfg.server_round, self.phase, [self.sites.name(x) for x in nodes])
        glob = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in weights.items()}
        names = self.upload_names if self.upload_names is not None else list(glob)
        layout = packed_layout({k: glob[k] for k in names}, cfg.compression)
        # a topk update declares its tensors' shapes itself: only the global shapes stop a broadcast
        self._shapes = {k: tuple(glob[k].shape) for k in names}
        sent, replies = self._send(grid, nodes, glob, cfg, TRAIN, report, timeout)
        counts: list[float] = []
        norms: list[float] = []
        clip = self.central_dp[1] if self.central_dp is not None else 0.0
        # central DP: equal weights, no cap (the sensitivity analysis); robust methods ignore weights anyway
        with StreamingAggregator(self.method, self.trim, spool_dir=self.spool_dir,
                                 max_share=1.0 if self.central_dp is not None else self.max_site_share) as agg:
            for _, site, decoded, delta in self._collect(sent, replies, report, TRAIN, cfg, layout):
                report.sites[site] = decoded.metrics()
                counts.append(float(decoded.num_examples))
                if self.central_dp is not None:
                    norms.append(delta.norm)
                    delta.scale_by(min(1.0, clip / (norms[-1] + 1e-12)))  # applied as each tensor is folded in
                agg.add(delta, 1.0 if self.central_dp is not None else counts[-1])
                del delta  # folded in: the update is not kept
            report.replied = list(report.sites)
            report.duration_s = time.perf_counter() - t0
            if len(counts) < self.min_sites:
                report.skipped = True
                report.note = report.note or (f"{len(counts)} valid updates, fewer than min-sites {self.min_sites}; "
                                              "the global model is kept")
                log.warning("round %d: %s", cfg.server_round, report.note)
                return None, report
            agg_update = agg.result()
        shares = capped_shares(counts, self.max_site_share)
        if self.central_dp is not None:
            sigma, clip, delta_dp = self.central_dp
            _add_central_noise(agg_update, len(counts), clip, sigma)
            clipped = sum(1 for x in norms if x > clip)
        new_state = _apply_in_place(glob, agg_update)
        del agg_update
        metrics = [(w, report.sites[s]) for w, s in zip(counts, report.replied, strict=True)]
        report.aggregated = {"num_examples": int(sum(w for w, _ in metrics)),
                             "epsilon": max(float(m["epsilon"]) for _, m in metrics),
                             "max_site_share": float(max(shares)),
                             **{k: _weighted(metrics, k) for k in ("loss", "loss_lung", "loss_non_lung", "accuracy",
                                                                   "train_seconds")
                                if any(m.get(k) is not None for _, m in metrics)}}
        if self.central_dp is not None:
            # server_round counts every round of the schedule so far: an upper bound on the noised releases
            report.aggregated["central_epsilon"] = central_dp_epsilon(sigma, cfg.server_round, delta_dp)
            report.aggregated["central_clipped"] = clipped
        log.info("round %d (%s): aggregated %d updates (%s, largest share %.2f), %d dropped, %d failed; "
                 "%.1f kB down, %.1f kB up", cfg.server_round, self.phase, len(counts), self.method, max(shares),
                 len(report.rejected), len(report.failed), report.bytes_down / 1e3, report.bytes_up / 1e3)
        return new_state, report

    # --------------------------------------------------------------------------------- cross-site
    def local_models(self, grid: Grid, weights: dict[str, torch.Tensor], cfg: RoundConfig,
                     timeout: float, spool: Path) -> tuple[dict[str, Path], RoundReport]:
        """Ask every site that shares one for a local copy fine-tuned from ``weights`` (a cross-site request).

        Each reply is a training reply and passes the same checks (replay ... norm); nothing is aggregated.
        Each valid local model (``global + update``) is written to its own file in ``spool`` (a private
        directory of the caller's) as it arrives, so the server holds one local model at a time, whatever
        the number of sites. Returns ``{site: file}`` for the valid ones and the report (failures, drops,
        bytes); read a file with ``torch.load(file, weights_only=True)``.
        """
        report = RoundReport(kind=TRAIN)
        t0 = time.perf_counter()
        nodes = self.sites.able(grid, cfg.phase, TRAIN, require_dp=self.require_dp)
        if not nodes:
            report.skipped = True
            report.note = "no connected site shares a local model (policy share-local-model) and can train one"
            return {}, report
        glob = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in weights.items()}
        names = self.upload_names if self.upload_names is not None else list(glob)
        layout = packed_layout({k: glob[k] for k in names}, cfg.compression)
        sent, replies = self._send(grid, nodes, glob, cfg, TRAIN, report, timeout)
        models: dict[str, Path] = {}
        for _, site, decoded, delta in self._collect(sent, replies, report, TRAIN, cfg, layout):
            report.sites[site] = decoded.metrics()
            path = spool / f"local-{len(models):04d}.pt"
            # a site's model, derived from its data: owner-only; read back within this step, so no fsync
            with atomic_path(path, 0o600, fsync=False) as tmp:
                torch.save(apply_delta(glob, delta), tmp)
            models[site] = path
            del delta
        report.replied = list(report.sites)
        report.duration_s = time.perf_counter() - t0
        log.info("cross-site: %d local models from %s; %d dropped, %d failed", len(models), sorted(models),
                 len(report.rejected), len(report.failed))
        return models, report

    # ----------------------------------------------------------------------------------- evaluate
    def evaluate(self, grid: Grid, weights: dict[str, torch.Tensor], cfg: RoundConfig, timeout: float) -> RoundReport:
        """Send the model to every site with the split; pooled metrics of the valid replies."""
        report = RoundReport(kind=EVALUATE)
        t0 = time.perf_counter()
        nodes = self.sites.able(grid, cfg.phase, EVALUATE, require_dp=False)
        if not nodes:
            report.skipped = True
            report.note = f"no site has scans to evaluate {cfg.phase}"
            return report
        sent, replies = self._send(grid, nodes, weights, cfg, EVALUATE, report, timeout)
        good = list(self._collect(sent, replies, report, EVALUATE, cfg, None))
        report.duration_s = time.perf_counter() - t0
        if not good:
            report.skipped = True
            report.note = report.note or "no valid evaluation replies"
            return report
        decoded: list[EvalReply] = [d for _, _, d, _ in good]
        for _, site, d, _ in good:
            report.sites[site] = d.metrics()
            if d.confusion_matrix:
                report.sites[site]["confusion_matrix"] = _square(d.confusion_matrix, cfg.num_classes)
        report.aggregated = pool_evaluations(decoded, cfg.num_classes, cfg.phase)
        return report


def _add_central_noise(mean: dict[str, torch.Tensor], n: int, clip: float, sigma: float) -> None:
    """Add ``N(0, (sigma clip / n)^2)`` to the mean of ``n`` clipped updates, in place, tensor by tensor.

    The Gaussian mechanism of :func:`lungmae_core.privacy.central_dp_mean` (the same noise: drawn in float64
    from the OS-seeded :func:`~lungmae_core.privacy.secure_generator`), applied to a mean folded in one update
    at a time instead of a list of all of them.
    """
    generator = secure_generator()
    for name, value in mean.items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64) * (sigma * clip / n)
            mean[name] = (value.double() + noise).to(value.dtype)


def _apply_in_place(glob: Mapping[str, torch.Tensor], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``glob + update`` written into ``update``'s float32 tensors (no third model-sized copy).

    Entries without an update (not uploaded) are the global's own tensors, not copies: the old global is
    never modified in place, so sharing them is safe and saves a model's worth of memory in linear probing.
    Integer entries of the update (buffers) replace the global's value, as in :func:`apply_delta`.
    """
    out: dict[str, torch.Tensor] = {}
    for name, base in glob.items():
        d = update.pop(name, None)
        if d is None:
            out[name] = base
        elif base.is_floating_point():
            out[name] = d.add_(base.float()).to(base.dtype) if d.dtype == torch.float32 else \
                (base.float() + d.float()).to(base.dtype)
        else:
            out[name] = d.to(base.dtype).clone()
    if update:
        raise ValueError(f"Unable to apply the update of {sorted(update)[:3]} as the model has no such key")
    return out


def _square(flat: Sequence[int], k: int) -> list[list[int]]:
    return [list(flat[i * k:(i + 1) * k]) for i in range(k)]


def pool_evaluations(replies: Sequence[EvalReply], num_classes: int, phase: str) -> dict[str, Any]:
    """Pooled figures of several sites' evaluations, without any per-scan value.

    ``loss``, ``accuracy`` and the MAE errors: example-weighted means over the sites where defined (exact
    pooled values). ``balanced_accuracy``, ``weighted_f1``, ``classes_present``: from the summed confusion
    matrices of the sites that sent one (``pooled_num_examples`` scans). ``roc_auc``: one-vs-rest macro AUC of
    the summed score histograms (None unless every class is present).
    """
    metrics = [(float(r.num_examples), r.metrics()) for r in replies]
    out: dict[str, Any] = {"num_examples": int(sum(w for w, _ in metrics))}
    keys = ("loss", "l1_masked", "l1_masked_lung", "baseline_l1_masked", "baseline_l1_masked_lung") \
        if phase == PRETRAIN else ("loss", "accuracy")
    out.update({k: _weighted(metrics, k) for k in keys})
    if phase == PRETRAIN:
        return out
    with_cm = [r for r in replies if r.confusion_matrix]
    out["suppressed_sites"] = sum(1 for r in replies if r.suppressed)
    out["pooled_num_examples"] = sum(r.num_examples for r in with_cm)
    if with_cm:
        cm = np.sum([np.asarray(r.confusion_matrix, dtype=np.int64) for r in with_cm], axis=0)
        pooled = pooled_from_confusion(cm.reshape(num_classes, num_classes))
        out.update({k: pooled[k] for k in ("balanced_accuracy", "weighted_f1", "classes_present")})
        out["confusion_matrix"] = _square([int(v) for v in cm], num_classes)
    else:
        out.update({"balanced_accuracy": None, "weighted_f1": None, "classes_present": 0})
    with_hist = [r for r in replies if r.score_histogram]
    out["roc_auc"] = auc_from_histograms(np.sum([np.asarray(r.score_histogram) for r in with_hist], axis=0),
                                         num_classes)[0] if with_hist else None
    return out

