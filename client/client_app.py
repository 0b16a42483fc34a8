"""The site's Flower ClientApp: answer the server's query, train and evaluate on the local prepared cache.

One ClientApp serves every phase; the message config says which. A handler loads the site config
(``node_config["site-config"]`` in deployment, ``site_configs[partition-id]`` in simulation), decodes the
request (``lungmae_core.contract.RoundConfig``: version, keys and bounds) and checks it against the site's
``policy`` (``client.policy``) *before any work*. Only then does it build the phase's model, load the global
weights, run ``lungmae_core.train`` on the site's cache and reply with the packed *update* (local - global,
only the trainable part under linear probing) plus the contract's aggregate metrics
(``TrainReply``/``EvalReply``). Under DP no training loss or accuracy is released; per-class counts
(confusion matrix, score histograms) only for splits of at least ``policy.min-count`` scans.

Nothing else leaves the site: a refusal names the rule it applies; other errors are reduced to a fixed
sentence naming the site and the kind of problem; details (paths) stay in the site log.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.policy import POLICY_REFUSAL_CODE, PolicyRefusal, Usage, check_request
from client.privacy_gate import PrivacyRequirementNotMet, refusal_reason
from client.site_audit import record_exchange, record_site_event
from lungmae_core.contract import (
    EVALUATE,
    PRETRAIN,
    QUERY,
    TRAIN,
    ContractError,
    EvalReply,
    QueryReply,
    RoundConfig,
    TrainReply,
)
from lungmae_core.errors import (
    CacheError,
    ConfigError,
    LungMAEError,
    NonFiniteLossError,
    PrivacyBudgetExceeded,
    SiteConfigError,
)
from lungmae_core.privacy import PRIVACY_REFUSAL_CODE

__all__ = ["make_client_app", "app", "SiteUnavailable", "CONTRACT_ERROR_CODE", "SITE_RECORD", "SITE_NAME_KEY"]

#: Flower error code of a request that breaks the contract (wrong version, missing key, value out of bounds).
CONTRACT_ERROR_CODE = 4002
#: The ConfigRecord of a query reply with the name the site gives itself: display only, never its identity
#: (the server names a site from its authenticated node).
SITE_RECORD, SITE_NAME_KEY = "site", "site-name"

log = logging.getLogger(__name__)


class SiteUnavailable(LungMAEError):
    """What the server sees when a site cannot serve a message: site name and kind of problem only."""


_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (CacheError, "its prepared cache is missing, empty or unreadable (run `lungmae site prepare`)"),
    (SiteConfigError, "its site.yaml is invalid (run `lungmae site preflight`)"),
    (PrivacyBudgetExceeded, "its privacy budget would be exceeded"),
    (NonFiniteLossError, "local training diverged (non-finite loss)"),
    (ConfigError, "the message's configuration is invalid for this site"),
)


def _public_reason(exc: BaseException) -> str:
    if isinstance(exc, LungMAEError) and str(exc).startswith("privacy refusal"):
        return str(exc)  # the privacy gate's refusal text is written to be sent (no paths, no data)
    for cls, sentence in _REASONS:
        if isinstance(exc, cls):
            return sentence
    return f"{type(exc).__name__} during local work (details in the site's log)"


def _site_config_path(context: Context, site_configs: Sequence[Path] | None) -> Path:
    node = context.node_config
    if site_configs is not None:
        index = node.get("partition-id")
        if not isinstance(index, int) or not 0 <= index < len(site_configs):
            raise SiteConfigError(f"node config partition-id {index!r} does not index the {len(site_configs)} "
                                  "site configs given to make_client_app")
        return Path(site_configs[index])
    path = node.get("site-config") or os.environ.get("LUNGMAE_SITE_CONFIG", "")
    if not path:
        raise SiteConfigError("this SuperNode has no site config: start it with "
                              "--node-config 'site-config=\"/path/to/site.yaml\"'")
    return Path(str(path))


def _load_site(context: Context, site_configs: Sequence[Path] | None) -> Any:
    from client.site_config import load_site_config

    return load_site_config(_site_config_path(context, site_configs))


def _seed(cfg: RoundConfig, site_name: str) -> int:
    """Generator seed from (run seed, server round, site): any round can be replayed."""
    key = f"{cfg.seed}:{cfg.server_round}:{site_name}"
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def _datasets(site: Any, cfg: RoundConfig, size: int, split: str, labelled: bool) -> Any:
    from client.site_config import require_model_window
    from lungmae_core.data import CachedVolumes

    require_model_window(site)
    if site.data.cache is None:
        raise CacheError("site.yaml has no data.cache directory")
    return CachedVolumes(site.data.cache, size=size, splits=(split,), labelled_only=labelled,
                         class_names=cfg.class_names)


def _counts(site: Any) -> dict[str, int]:
    """Accepted scans per kind from the cache manifest (no volume is loaded)."""
    from lungmae_core.manifest import read_manifest

    cache = site.data.cache
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


def _privacy_gate(site: Any) -> Any:
    """The site's DP settings and ledger (``client.privacy_gate``); cheap when DP is disabled."""
    from client.privacy_gate import PrivacyGate

    return PrivacyGate.for_site_config(site)


def _build_model(cfg: RoundConfig) -> tuple[Any, Any]:
    import torch  # noqa: F401  (deferred: ClientApp processes import this module first)

    from lungmae_core.config import ModelConfig, from_mapping
    from lungmae_core.heads import ILDClassifier
    from lungmae_core.model import MAE3D

    mcfg = from_mapping(ModelConfig, cfg.model_config, source="model-config")
    if cfg.phase == PRETRAIN:
        return MAE3D(mcfg), mcfg
    return ILDClassifier(mcfg, cfg.num_classes, cfg.pooling), mcfg


def _load_global(model: Any, msg: Message) -> dict[str, Any]:
    from lungmae_core.wire import unpack_state

    received = unpack_state({k: v.numpy() for k, v in msg.content["arrays"].items()})
    model.load_state_dict(received, strict=True)
    return received


def _lr_segment(cfg: RoundConfig) -> Any:
    """This round's segment of one warmup + cosine curve over the whole phase (None: one curve per round)."""
    from lungmae_core.train import WarmupCosine

    r, n = cfg.phase_round, cfg.phase_rounds
    if not 1 <= r <= n:
        return None
    return WarmupCosine(0.1, (r - 1) / n, r / n)


def _device(site: Any) -> Any:
    from lungmae_core.train import resolve_device

    return resolve_device(site.training.device)


def _request(msg: Message, kind: str, site: Any, context: Context) -> RoundConfig:
    """Decode the request and check it against the site's policy (counting it); raises before any work."""
    if "config" not in msg.content.config_records:
        raise ContractError("the message has no ConfigRecord 'config'", "config")
    cfg = RoundConfig.decode(dict(msg.content["config"]))
    if tuple(cfg.class_names) != tuple(site.data.classes):
        log.warning("site %s refuses the %s request (data.classes): the federation's classes %s differ from this "
                    "site's %s", site.site.name, kind, list(cfg.class_names), list(site.data.classes))
        raise PolicyRefusal("data.classes", f"the federation's classes ({', '.join(cfg.class_names)}) are not this "
                                            f"site's ({', '.join(site.data.classes)}); its labels mean other classes")
    if kind == QUERY:
        return cfg
    usage = Usage.load(context.state)
    check_request(site.policy, kind, cfg, dp_enabled=bool(site.privacy.enabled), usage=usage,
                  site_name=site.site.name)
    usage.save(context.state)
    return cfg


def _reply(msg: Message, metrics: dict[str, Any], packed: dict[str, Any] | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if packed is not None:
        content["arrays"] = ArrayRecord(array_dict={k: Array(v) for k, v in packed.items()})
    return Message(content, reply_to=msg)


def make_client_app(site_configs: Sequence[Path] | None = None) -> ClientApp:
    """Build the ClientApp.

    Args:
        site_configs: simulation only: one ``site.yaml`` per virtual SuperNode, indexed by the node's
            ``partition-id``. ``None`` (deployment): the node config key ``site-config`` names the file.

    Returns:
        A ``ClientApp`` with ``query``, ``train`` and ``evaluate`` handlers.
    """
    client_app = ClientApp()

    def guarded(kind: str, handler: Any) -> Any:
        def run(msg: Message, context: Context) -> Message:
            import torch

            torch.set_num_threads(max(1, int(os.environ.get("LUNGMAE_CLIENT_THREADS", "1"))))
            site_name, site = "site", None
            try:
                site = _load_site(context, site_configs)
                site_name = site.site.name
                reply = handler(msg, site, _request(msg, kind, site, context))
            except PolicyRefusal as exc:  # logged by client.policy; nothing was done
                reply = Message(Error(code=POLICY_REFUSAL_CODE, reason=f"{exc} (site {site_name!r})"), reply_to=msg)
            except ContractError as exc:
                log.warning("site %s refuses the %s message: it breaks the contract: %s", site_name, kind, exc)
                reply = Message(Error(code=CONTRACT_ERROR_CODE, reason=f"contract error: {exc} (site {site_name!r})"),
                                reply_to=msg)
            except (PrivacyBudgetExceeded, PrivacyRequirementNotMet) as exc:
                log.warning("site %s refuses the %s message: %s", site_name, kind, exc)
                reply = Message(Error(code=PRIVACY_REFUSAL_CODE, reason=f"{refusal_reason(exc)} (site {site_name!r})"),
                                reply_to=msg)
            except Exception as exc:
                log.exception("site %s could not serve the %s message", site_name, kind)
                phase = msg.content["config"].get("phase", "") if "config" in msg.content.config_records else ""
                failure = SiteUnavailable(f"site {site_name!r} cannot serve {kind} {phase}: {_public_reason(exc)}")
                if site is not None:  # the site's own chained log keeps what it was asked and why it failed
                    record_site_event(site, "failed", message_type=msg.metadata.message_type, phase=phase,
                                      reason=str(failure))
                raise failure from None
            # what the coordinator asked and what left (or why not), in the site's own hash-chained log
            return reply if site is None else record_exchange(site, msg, reply)
        return run

    def query(msg: Message, site: Any, cfg: RoundConfig) -> Message:
        import torch

        counts = _counts(site)
        reply = QueryReply(
            num_unlabelled=counts["num-unlabelled"], num_labelled_train=counts["num-labelled-train"],
            num_labelled_val=counts["num-labelled-val"], num_labelled_test=counts["num-labelled-test"],
            dp_enabled=bool(site.privacy.enabled), epsilon=_privacy_gate(site).epsilon_spent(),
            epsilon_budget=float(site.privacy.epsilon if site.privacy.enabled else 0.0),
            has_gpu=bool(torch.cuda.is_available() and site.training.device != "cpu"),
            min_count=int(site.policy.min_count), share_local_model=bool(site.policy.share_local_model))
        out = _reply(msg, reply.encode())
        out.content[SITE_RECORD] = ConfigRecord({SITE_NAME_KEY: site.site.name})
        return out

    def train(msg: Message, site: Any, cfg: RoundConfig) -> Message:
        from client.privacy_gate import PrivacyRequirement
        from lungmae_core.config import TrainConfig
        from lungmae_core.train import class_weights_from_labels, train_classifier, train_mae
        from lungmae_core.wire import pack_state, packed_nbytes, state_delta

        config = msg.content["config"]
        phase = cfg.phase
        model, mcfg = _build_model(cfg)
        received = _load_global(model, msg)
        epochs = min(cfg.local_epochs, site.training.max_local_epochs)
        if epochs < cfg.local_epochs:
            log.warning("site '%s': the server asked for %d local epochs; training %d (site.yaml training: "
                        "max-local-epochs)", site.site.name, cfg.local_epochs, epochs)
        overrides = dict(lr=cfg.lr, epochs=epochs, batch_size=cfg.batch_size or site.training.batch_size,
                         num_workers=site.training.num_workers)
        seed, device, t0 = _seed(cfg, site.site.name), _device(site), time.perf_counter()
        schedule = _lr_segment(cfg)
        if phase == PRETRAIN:
            data = _datasets(site, cfg, mcfg.img_size, "train", labelled=False)
            tcfg = TrainConfig.pretrain_defaults(**overrides)
        else:
            data = _datasets(site, cfg, mcfg.img_size, "train", labelled=True)
            weights = class_weights_from_labels(data.labels, cfg.num_classes)
            tcfg = TrainConfig.finetune_defaults(**overrides, finetune_mode=cfg.finetune_mode)
        # DP-SGD: the round's full cost is in the ledger before the first step and its real steps after the
        # last, so both are on disk before any weight leaves (a refusal raises here and becomes the reply).
        gate = _privacy_gate(site)
        with gate.round(phase=phase, server_round=cfg.server_round, dataset=data,
                        batch_size=tcfg.batch_size, epochs=tcfg.epochs, max_steps=tcfg.max_steps,
                        requirement=PrivacyRequirement.from_config(config), run=str(msg.metadata.run_id)) as privacy:
            if phase == PRETRAIN:
                out = train_mae(model, data, tcfg, device=device, seed=seed, privacy=privacy, lr_schedule=schedule,
                                proximal_mu=cfg.proximal_mu)
                values = {"loss": out["loss"], "loss_lung": out["loss_lung"], "loss_non_lung": out["loss_non_lung"]}
            else:
                out = train_classifier(model, data, tcfg, class_weights=weights, device=device, seed=seed,
                                       privacy=privacy, lr_schedule=schedule, proximal_mu=cfg.proximal_mu)
                values = {"loss": out["loss"], "accuracy": out["accuracy"]}
        if site.privacy.enabled:  # unnoised figures of the training scans: not accounted, so not released
            values = {}
        trained = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        names = [n for n, p in model.named_parameters() if p.requires_grad] \
            if phase != PRETRAIN and cfg.finetune_mode == "linear-probe" else list(trained)
        update = state_delta({k: trained[k] for k in names}, received)
        if cfg.compression in ("int8", "topk"):  # lossy: what was dropped is added back next round (error feedback)
            from lungmae_core.error_feedback import ErrorFeedback

            packed = ErrorFeedback(site.site.state_dir, tag=f"{msg.metadata.run_id}/{phase}").pack(update,
                                                                                                 cfg.compression)
        else:
            packed = pack_state(update, cfg.compression)
        reply = TrainReply(server_round=cfg.server_round, num_examples=int(out["num_examples"]),
                           epsilon=gate.epsilon_spent(), train_seconds=time.perf_counter() - t0,
                           update_bytes=packed_nbytes(packed), **values)
        return _reply(msg, reply.encode(), packed)

    def evaluate(msg: Message, site: Any, cfg: RoundConfig) -> Message:
        from lungmae_core.train import evaluate_classifier, evaluate_mae

        model, mcfg = _build_model(cfg)
        _load_global(model, msg)
        device, batch = _device(site), site.training.batch_size
        data = _datasets(site, cfg, mcfg.img_size, cfg.split, labelled=True)
        epsilon = _privacy_gate(site).epsilon_spent()
        if cfg.phase == PRETRAIN:
            out = evaluate_mae(model, data, device=device, seed=_seed(cfg, site.site.name), batch_size=batch)
            reply = EvalReply(server_round=cfg.server_round, num_examples=int(out["num_examples"]), epsilon=epsilon,
                              **{k: out[k] for k in ("l1_masked", "l1_masked_lung", "baseline_l1_masked",
                                                     "baseline_l1_masked_lung")})
            return _reply(msg, reply.encode())
        out = evaluate_classifier(model, data, num_classes=cfg.num_classes, device=device, batch_size=batch)
        n = int(out["num_examples"])
        suppressed = n < site.policy.min_count
        if suppressed:
            log.info("site %s: %d %s scans < policy.min-count %d: no confusion matrix or score histogram sent",
                     site.site.name, n, cfg.split, site.policy.min_count)
        reply = EvalReply(
            server_round=cfg.server_round, num_examples=n, epsilon=epsilon, classes_present=out["classes_present"],
            suppressed=suppressed,
            confusion_matrix=() if suppressed else tuple(v for row in out["confusion_matrix"] for v in row),
            score_histogram=() if suppressed else tuple(out["score_histogram"]),
            loss=out["loss"], accuracy=out["accuracy"], balanced_accuracy=out["balanced_accuracy"],
            weighted_f1=out["weighted_f1"], roc_auc=out["roc_auc"])
        return _reply(msg, reply.encode())

    client_app.query()(guarded(QUERY, query))
    client_app.train()(guarded(TRAIN, train))
    client_app.evaluate()(guarded(EVALUATE, evaluate))
    return client_app


app = make_client_app()
