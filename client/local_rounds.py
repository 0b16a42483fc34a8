"""The work behind each ClientApp message, once the request passed the site's checks.

:func:`answer_query` counts the site's scans, :func:`train_round` trains the phase's model on the site's cache
and packs the *update* (local - global; only the trainable part under linear probing), :func:`evaluate_round`
scores the global model on one split. Each takes the received message, the :class:`~client.site_state.Site`
and the decoded, policy-checked :class:`~lungmae_core.contract.RoundConfig`, and returns the reply with the
contract's aggregate metrics (``QueryReply`` / ``TrainReply`` / ``EvalReply``). A cross-site request is a
``train`` (a locally fine-tuned copy of the final model, only with the site's consent) or an ``evaluate``
(scoring another site's model) with phase ``cross-site``; the same functions serve it.

What may leave the site: under DP no training loss or accuracy (unnoised figures of the training scans);
per-class counts (confusion matrix, score histograms) only for splits of at least ``policy.min-count`` scans.

torch and the training code are imported inside the functions: Flower loads the ClientApp module in every
short-lived ClientApp process before it knows which message it serves.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.site_state import Site
from lungmae_core.contract import PRETRAIN, EvalReply, QueryReply, RoundConfig, TrainReply
from lungmae_core.errors import CacheError, SiteConfigError

if TYPE_CHECKING:
    import torch

    from lungmae_core.config import ModelConfig
    from lungmae_core.data import CachedVolumes
    from lungmae_core.train import WarmupCosine

__all__ = ["answer_query", "train_round", "evaluate_round", "SITE_RECORD", "SITE_NAME_KEY"]

#: The ConfigRecord of a query reply with the name the site gives itself: display only, never its identity
#: (the server names a site from its authenticated node).
SITE_RECORD, SITE_NAME_KEY = "site", "site-name"

log = logging.getLogger(__name__)


def _seed(cfg: RoundConfig, site_name: str) -> int:
    """Generator seed from (run seed, server round, site): any round can be replayed."""
    key = f"{cfg.seed}:{cfg.server_round}:{site_name}"
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def _datasets(site: Site, cfg: RoundConfig, size: int, split: str, labelled: bool) -> CachedVolumes:
    from client.site_config import require_model_window
    from lungmae_core.data import CachedVolumes

    require_model_window(site.config)
    if site.config.data.cache is None:
        raise CacheError("site.yaml has no data.cache directory")
    return CachedVolumes(site.config.data.cache, size=size, splits=(split,), labelled_only=labelled,
                         class_names=cfg.class_names)


def _counts(site: Site) -> dict[str, int]:
    """Accepted scans per kind from the cache manifest (no volume is loaded)."""
    from lungmae_core.manifest import read_manifest

    cache = site.config.data.cache
    if cache is None or not (Path(cache) / "manifest.csv").is_file():
        raise CacheError(f"Unable to answer the query as the cache {cache} has no manifest.csv")
    rows = [r for r in read_manifest(cache) if r.accepted]
    if not rows:
        raise CacheError(f"Unable to answer the query as the cache {cache} has no accepted scan")
    out = {"num-unlabelled": sum(1 for r in rows if not r.label and r.split == "train"),
           "num-labelled-train": sum(1 for r in rows if r.label and r.split == "train")}
    for split in ("val", "test"):
        out[f"num-labelled-{split}"] = sum(1 for r in rows if r.label and r.split == split)
    return out


def _build_model(cfg: RoundConfig) -> tuple[torch.nn.Module, ModelConfig]:
    from lungmae_core.config import ModelConfig, from_mapping
    from lungmae_core.heads import ILDClassifier
    from lungmae_core.model import MAE3D

    mcfg = from_mapping(ModelConfig, cfg.model_config, source="model-config")
    if cfg.phase == PRETRAIN:
        return MAE3D(mcfg), mcfg
    return ILDClassifier(mcfg, cfg.num_classes, cfg.pooling), mcfg


def _load_global(model: torch.nn.Module, msg: Message, cfg: RoundConfig) -> dict[str, torch.Tensor]:
    """Load the received global weights into ``model``; returns them.

    The request must carry one bundle (``lungmae_core.bundle.bundle``) whose layout is exactly what this
    model packs to under the run's down-link encoding: every name, shape and dtype, checked before any
    value is read, so a server cannot slip in integer or oversized arrays that a permissive load would
    cast or broadcast.

    Raises:
        ContractError: (field ``arrays``) no bundle, a malformed one, or a layout other than the model's.
    """
    from lungmae_core.bundle import unbundle
    from lungmae_core.contract import ContractError
    from lungmae_core.wire import WireFormatError, down_compression, packed_layout, unpack_state

    records = msg.content.array_records
    if list(records) != ["arrays"]:
        raise ContractError(f"the request must carry exactly one ArrayRecord 'arrays' (the global model); got "
                            f"{list(records)[:3]}", "arrays")
    try:
        packed = unbundle({k: v.numpy() for k, v in records["arrays"].items()})
    except (WireFormatError, ValueError, TypeError) as exc:
        raise ContractError(f"the global model (ArrayRecord 'arrays'): {exc}", "arrays") from None
    expected = packed_layout(model.state_dict(), down_compression(cfg.compression))
    got = {k: (tuple(v.shape), str(v.dtype)) for k, v in packed.items()}
    if got != expected:
        wrong = [k for k in got if k not in expected] + [k for k in expected if got.get(k) != expected[k]]
        shown = ", ".join(f"{k!r}: " + ("unexpected" if k not in expected else "missing" if k not in got else
                                         f"{got[k]} (expected {expected[k]})") for k in wrong[:3])
        raise ContractError(f"the global model (ArrayRecord 'arrays') does not match the requested model-config: "
                            f"{len(wrong)} arrays differ, e.g. {shown}", "arrays")
    received = unpack_state(packed)
    model.load_state_dict(received, strict=True)
    return received


def _lr_segment(cfg: RoundConfig) -> WarmupCosine | None:
    """This round's segment of one warmup + cosine curve over the whole phase (None: one curve per round)."""
    from lungmae_core.train import WarmupCosine

    r, n = cfg.phase_round, cfg.phase_rounds
    if not 1 <= r <= n:
        return None
    return WarmupCosine(0.1, (r - 1) / n, r / n)


def _reply(msg: Message, metrics: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> Message:
    """The reply: the contract's encoded metrics (checked by its encoder) and, for training, the update bundle."""
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})
    return Message(content, reply_to=msg)


def answer_query(msg: Message, site: Site, cfg: RoundConfig) -> Message:
    """What the site can serve: scan counts, DP state and the policy the server plans with (no data)."""
    import torch

    counts = _counts(site)
    privacy = site.config.privacy
    reply = QueryReply(
        num_unlabelled=counts["num-unlabelled"], num_labelled_train=counts["num-labelled-train"],
        num_labelled_val=counts["num-labelled-val"], num_labelled_test=counts["num-labelled-test"],
        dp_enabled=site.dp_enabled, epsilon=site.privacy_gate().epsilon_spent(),
        epsilon_budget=float(privacy.epsilon if privacy.enabled and privacy.epsilon is not None else 0.0),
        has_gpu=bool(torch.cuda.is_available() and site.config.training.device != "cpu"),
        min_count=int(site.policy.min_count), share_local_model=bool(site.policy.share_local_model))
    out = _reply(msg, reply.encode())
    out.content[SITE_RECORD] = ConfigRecord({SITE_NAME_KEY: site.name})
    return out


def train_round(msg: Message, site: Site, cfg: RoundConfig) -> Message:
    """Train one round of ``cfg.phase`` on the site's train split; reply with the packed update."""
    from client.privacy_gate import PrivacyRequirement
    from lungmae_core.bundle import DEFLATED, bundle, payload_nbytes
    from lungmae_core.config import TrainConfig
    from lungmae_core.train import class_weights_from_labels, train_classifier, train_mae
    from lungmae_core.wire import pack_state, state_delta

    phase, training = cfg.phase, site.config.training
    model, mcfg = _build_model(cfg)
    received = _load_global(model, msg, cfg)
    epochs = min(cfg.local_epochs, training.max_local_epochs)
    if epochs < cfg.local_epochs:
        log.warning("site '%s': the server asked for %d local epochs; training %d (site.yaml training: "
                    "max-local-epochs)", site.name, cfg.local_epochs, epochs)
    batch_size = cfg.batch_size or training.batch_size
    seed, device, t0 = _seed(cfg, site.name), site.device, time.perf_counter()
    schedule = _lr_segment(cfg)
    labelled = phase != PRETRAIN
    data = _datasets(site, cfg, mcfg.img_size, "train", labelled=labelled)
    if labelled:
        weights = class_weights_from_labels(data.labels, cfg.num_classes)
        tcfg = TrainConfig.finetune_defaults(lr=cfg.lr, epochs=epochs, batch_size=batch_size,
                                             num_workers=training.num_workers, finetune_mode=cfg.finetune_mode)
    else:
        tcfg = TrainConfig.pretrain_defaults(lr=cfg.lr, epochs=epochs, batch_size=batch_size,
                                             num_workers=training.num_workers)
    # DP-SGD: the round's full cost is in the ledger before the first step and its real steps after the
    # last, so both are on disk before any weight leaves (a refusal raises here and becomes the reply).
    gate = site.privacy_gate()
    requirement = PrivacyRequirement.from_config(msg.content.config_records["config"])
    with gate.round(phase=phase, server_round=cfg.server_round, dataset=data, batch_size=tcfg.batch_size,
                    epochs=tcfg.epochs, max_steps=tcfg.max_steps, requirement=requirement,
                    run=str(msg.metadata.run_id)) as privacy:
        if labelled:
            out = train_classifier(model, data, tcfg, class_weights=weights, device=device, seed=seed,
                                   privacy=privacy, lr_schedule=schedule, proximal_mu=cfg.proximal_mu)
        else:
            out = train_mae(model, data, tcfg, device=device, seed=seed, privacy=privacy, lr_schedule=schedule,
                            proximal_mu=cfg.proximal_mu)
    trained = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    names = [n for n, p in model.named_parameters() if p.requires_grad] \
        if labelled and cfg.finetune_mode == "linear-probe" else list(trained)
    update = state_delta({k: trained[k] for k in names}, received)
    if cfg.compression in ("int8", "topk"):  # lossy: what was dropped is added back next round (error feedback)
        from lungmae_core.error_feedback import ErrorFeedback

        state_dir = site.config.site.state_dir
        if state_dir is None:  # load_site_config always sets it (default: state/ beside site.yaml)
            raise SiteConfigError("site.yaml has no site.state-dir for the error-feedback residual")
        packed = ErrorFeedback(state_dir, tag=f"{msg.metadata.run_id}/{phase}").pack(update, cfg.compression)
    else:
        packed = pack_state(update, cfg.compression)

    arrays = bundle(packed, deflate=cfg.compression in DEFLATED)
    del packed

    def released(key: str) -> float | None:
        """A training figure, or None under DP: unnoised figures of the training scans are not accounted."""
        return None if site.dp_enabled else float(out[key])

    reply = TrainReply(server_round=cfg.server_round, num_examples=int(out["num_examples"]),
                       epsilon=gate.epsilon_spent(), train_seconds=time.perf_counter() - t0,
                       update_bytes=payload_nbytes(arrays), loss=released("loss"),
                       loss_lung=released("loss_lung") if not labelled else None,
                       loss_non_lung=released("loss_non_lung") if not labelled else None,
                       accuracy=released("accuracy") if labelled else None)
    return _reply(msg, reply.encode(), arrays)


def evaluate_round(msg: Message, site: Site, cfg: RoundConfig) -> Message:
    """Score the received model on ``cfg.split`` of the site's cache (MAE: masked L1; classifier: metrics)."""
    from lungmae_core.train import evaluate_classifier, evaluate_mae

    model, mcfg = _build_model(cfg)
    _load_global(model, msg, cfg)
    device, batch = site.device, site.config.training.batch_size
    data = _datasets(site, cfg, mcfg.img_size, cfg.split, labelled=True)
    epsilon = site.privacy_gate().epsilon_spent()
    if cfg.phase == PRETRAIN:
        mae = evaluate_mae(model, data, device=device, seed=_seed(cfg, site.name), batch_size=batch)
        reply = EvalReply(server_round=cfg.server_round, num_examples=int(mae["num_examples"]), epsilon=epsilon,
                          l1_masked=float(mae["l1_masked"]), l1_masked_lung=float(mae["l1_masked_lung"]),
                          baseline_l1_masked=float(mae["baseline_l1_masked"]),
                          baseline_l1_masked_lung=float(mae["baseline_l1_masked_lung"]))
        return _reply(msg, reply.encode())
    out = evaluate_classifier(model, data, num_classes=cfg.num_classes, device=device, batch_size=batch)
    n = int(out["num_examples"])
    suppressed = n < site.policy.min_count
    if suppressed:
        log.info("site %s: %d %s scans < policy.min-count %d: no confusion matrix or score histogram sent",
                 site.name, n, cfg.split, site.policy.min_count)
    reply = EvalReply(
        server_round=cfg.server_round, num_examples=n, epsilon=epsilon, classes_present=out["classes_present"],
        suppressed=suppressed,
        confusion_matrix=() if suppressed else tuple(v for row in out["confusion_matrix"] for v in row),
        score_histogram=() if suppressed else tuple(out["score_histogram"]),
        loss=out["loss"], accuracy=out["accuracy"], balanced_accuracy=out["balanced_accuracy"],
        weighted_f1=out["weighted_f1"], roc_auc=out["roc_auc"])
    return _reply(msg, reply.encode())
