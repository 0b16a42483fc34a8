"""The site's Flower ClientApp: answer the server's query, train and evaluate on the local prepared cache.

One ClientApp serves every phase; the message config says which (``lungmae_core.schema``). A handler loads
the site config (``node_config["site-config"]`` in deployment, ``site_configs[partition-id]`` in
simulation), builds the phase's model from the message's model config, loads the global weights, runs
``lungmae_core.train`` on the site's cache and replies with the packed *update* (local - global, only the
trainable part under linear probing) plus aggregate metrics. Nothing else leaves the site: errors are
reduced to a fixed sentence naming the site and the kind of problem; details (paths) stay in the site log.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lungmae_core.errors import (
    CacheError, ConfigError, LungMAEError, NonFiniteLossError, PrivacyBudgetExceeded, SiteConfigError,
)
from client.privacy_gate import PrivacyRequirementNotMet, refusal_reason
from lungmae_core.privacy import PRIVACY_REFUSAL_CODE
from lungmae_core.schema import (
    EVALUATE, FINAL, PRETRAIN, QUERY, SITE_NAME_KEY, SITE_RECORD, TRAIN, build_metrics, config_value,
)

__all__ = ["make_client_app", "app", "SiteUnavailable"]

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


def _seed(config: Any, site_name: str) -> int:
    """Generator seed from (run seed, server round, site): any round can be replayed."""
    key = f"{config_value(config, 'seed', int, 0)}:{config.get('server-round', 0)}:{site_name}"
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def _datasets(site: Any, size: int, split: str, labelled: bool) -> Any:
    from lungmae_core.data import CachedVolumes

    from client.site_config import require_model_window

    require_model_window(site)
    if site.data.cache is None:
        raise CacheError("site.yaml has no data.cache directory")
    return CachedVolumes(site.data.cache, size=size, splits=(split,), labelled_only=labelled)


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


def _build_model(config: Any) -> tuple[Any, Any]:
    import torch  # noqa: F401  (deferred: ClientApp processes import this module first)

    from lungmae_core.config import ModelConfig, from_mapping
    from lungmae_core.heads import ILDClassifier
    from lungmae_core.model import MAE3D

    mcfg = from_mapping(ModelConfig, json.loads(config_value(config, "model-config", str)), source="model-config")
    if config_value(config, "phase", str) == PRETRAIN:
        return MAE3D(mcfg), mcfg
    return ILDClassifier(mcfg, config_value(config, "num-classes", int)), mcfg


def _load_global(model: Any, msg: Message) -> dict[str, Any]:
    from lungmae_core.wire import unpack_state

    received = unpack_state({k: v.numpy() for k, v in msg.content["arrays"].items()})
    model.load_state_dict(received, strict=True)
    return received


def _lr_segment(config: Any) -> Any:
    """This round's segment of one warmup + cosine curve over the whole phase (None: one curve per round)."""
    from lungmae_core.train import WarmupCosine

    r, n = config.get("phase-round"), config.get("phase-rounds")
    if not isinstance(r, int) or not isinstance(n, int) or not 1 <= r <= n:
        return None
    return WarmupCosine(0.1, (r - 1) / n, r / n)


def _device(site: Any) -> Any:
    from lungmae_core.train import resolve_device

    return resolve_device(site.training.device)


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
            site_name = "site"
            try:
                site = _load_site(context, site_configs)
                site_name = site.site.name
                return handler(msg, site)
            except (PrivacyBudgetExceeded, PrivacyRequirementNotMet) as exc:
                log.warning("site %s refuses the %s message: %s", site_name, kind, exc)
                return Message(Error(code=PRIVACY_REFUSAL_CODE, reason=f"{refusal_reason(exc)} (site {site_name!r})"),
                               reply_to=msg)
            except Exception as exc:
                log.exception("site %s could not serve the %s message", site_name, kind)
                raise SiteUnavailable(f"site {site_name!r} cannot serve {kind} "
                                      f"{msg.content['config'].get('phase', '')}: {_public_reason(exc)}") from None
        return run

    def query(msg: Message, site: Any) -> Message:
        import torch

        counts = _counts(site)
        metrics = build_metrics(QUERY, "", {
            "num-examples": counts["num-unlabelled"] + counts["num-labelled-train"], **counts,
            "dp-enabled": int(site.privacy.enabled), "epsilon": _privacy_gate(site).epsilon_spent(),
            "epsilon-budget": float(site.privacy.epsilon if site.privacy.enabled else 0.0),
            "has-gpu": int(torch.cuda.is_available() and site.training.device != "cpu")})
        reply = _reply(msg, metrics)
        reply.content[SITE_RECORD] = ConfigRecord({SITE_NAME_KEY: site.site.name})
        return reply

    def train(msg: Message, site: Any) -> Message:
        from lungmae_core.config import TrainConfig
        from lungmae_core.train import class_weights_from_labels, train_classifier, train_mae
        from lungmae_core.wire import pack_state, packed_nbytes, state_delta

        from client.privacy_gate import PrivacyRequirement
        from client.proximal import ProximalHook

        config = msg.content["config"]
        phase = config_value(config, "phase", str)
        model, mcfg = _build_model(config)
        received = _load_global(model, msg)
        asked = config_value(config, "local-epochs", int)
        epochs = min(asked, site.training.max_local_epochs)
        if epochs < asked:
            log.warning("site '%s': the server asked for %d local epochs; training %d (site.yaml training: "
                        "max-local-epochs)", site.site.name, asked, epochs)
        overrides = dict(lr=config_value(config, "lr", float), epochs=epochs, batch_size=site.training.batch_size,
                         num_workers=site.training.num_workers)
        mu = config_value(config, "proximal-mu", float, 0.0)
        seed, device, t0 = _seed(config, site.site.name), _device(site), time.perf_counter()
        schedule = _lr_segment(config)
        if phase == PRETRAIN:
            data = _datasets(site, mcfg.img_size, "train", labelled=False)
            tcfg = TrainConfig.pretrain_defaults(**overrides)
        else:
            mode = config_value(config, "finetune-mode", str, "full")
            data = _datasets(site, mcfg.img_size, "train", labelled=True)
            weights = class_weights_from_labels(data.labels, config_value(config, "num-classes", int))
            tcfg = TrainConfig.finetune_defaults(**overrides, finetune_mode=mode)
        # DP-SGD: the round's full cost is in the ledger before the first step and its real steps after the
        # last, so both are on disk before any weight leaves (a refusal raises here and becomes the reply).
        gate = _privacy_gate(site)
        with gate.round(phase=phase, server_round=int(config.get("server-round", 0)), dataset=data,
                        batch_size=tcfg.batch_size, epochs=tcfg.epochs, max_steps=tcfg.max_steps,
                        requirement=PrivacyRequirement.from_config(config), run=str(msg.metadata.run_id)) as privacy:
            hook = ProximalHook(mu, inner=privacy) if mu > 0 else privacy
            if phase == PRETRAIN:
                out = train_mae(model, data, tcfg, device=device, seed=seed, privacy=hook, lr_schedule=schedule)
                values = {"train-loss": out["loss"], "train-loss-lung": out["loss_lung"],
                          "train-loss-non-lung": out["loss_non_lung"]}
            else:
                out = train_classifier(model, data, tcfg, class_weights=weights, device=device, seed=seed,
                                       privacy=hook, lr_schedule=schedule)
                values = {"train-loss": out["loss"], "train-accuracy": out["accuracy"]}
        trained = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        names = [n for n, p in model.named_parameters() if p.requires_grad] \
            if phase != PRETRAIN and config.get("finetune-mode") == "linear-probe" else list(trained)
        packed = pack_state(state_delta({k: trained[k] for k in names}, received),
                            config_value(config, "compression", str, "fp16"))
        metrics = build_metrics(TRAIN, phase, {"num-examples": int(out["num_examples"]), **values,
                                               "epsilon": gate.epsilon_spent(),
                                               "train-seconds": time.perf_counter() - t0,
                                               "update-bytes": packed_nbytes(packed)})
        return _reply(msg, metrics, packed)

    def evaluate(msg: Message, site: Any) -> Message:
        from lungmae_core.train import evaluate_classifier, evaluate_mae

        config = msg.content["config"]
        phase = config_value(config, "phase", str)
        split = config_value(config, "split", str, "test" if phase == FINAL else "val")
        model, mcfg = _build_model(config)
        _load_global(model, msg)
        device, batch = _device(site), site.training.batch_size
        data = _datasets(site, mcfg.img_size, split, labelled=True)
        if phase == PRETRAIN:
            out = evaluate_mae(model, data, device=device, seed=_seed(config, site.site.name), batch_size=batch)
            values = {k.replace("_", "-"): out[k] for k in ("l1_masked", "l1_masked_lung", "baseline_l1_masked",
                                                            "baseline_l1_masked_lung")}
        else:
            num_classes = config_value(config, "num-classes", int)
            out = evaluate_classifier(model, data, num_classes=num_classes, device=device, batch_size=batch)
            values = {"loss": out["loss"], "accuracy": out["accuracy"], "balanced-accuracy": out["balanced_accuracy"],
                      "weighted-f1": out["weighted_f1"], "roc-auc": out["roc_auc"],
                      "roc-auc-valid": int(out.get("roc_auc_classes", 1) > 0),
                      "confusion-matrix": out["confusion_matrix"]}
        metrics = build_metrics(EVALUATE, phase, {"num-examples": int(out["num_examples"]), **values,
                                                  "epsilon": _privacy_gate(site).epsilon_spent()})
        return _reply(msg, metrics)

    client_app.query()(guarded(QUERY, query))
    client_app.train()(guarded(TRAIN, train))
    client_app.evaluate()(guarded(EVALUATE, evaluate))
    return client_app


app = make_client_app()
