"""The site's Flower ClientApp: answer the server's query, train and evaluate on the local prepared cache.

Three message handlers, registered with Flower's ``ClientApp`` decorators: :func:`query`, :func:`train` and
:func:`evaluate` (a cross-site request is a ``train`` or ``evaluate`` with phase ``cross-site``). Each one
goes through :func:`serve`:

1. the site (``client.site_state.Site``: the validated ``site.yaml``) is built from the Context, once per
   process (deployment: ``node_config["site-config"]``; simulation: ``site_configs[partition-id]`` through
   the :class:`~client.site_state.SimulatedSites` mod that :func:`make_client_app` adds);
2. the request is decoded (``lungmae_core.contract.RoundConfig``: version, keys and bounds) and checked
   against the site's ``policy`` (``client.policy``) *before any work*;
3. only then does the work run (``client.local_rounds``: build the phase's model, load the global weights,
   train or evaluate on the site's cache, reply with the packed update and the contract's metrics).

Nothing else leaves the site: a refusal names the rule it applies; other errors are reduced to a fixed
sentence naming the site and the kind of problem; details (paths) stay in the site log. Every exchange, sent
or refused, lands in the site's own hash-chained log (``client.site_audit``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.local_rounds import SITE_NAME_KEY, SITE_RECORD, answer_query, evaluate_round, train_round
from client.policy import POLICY_REFUSAL_CODE, PolicyRefusal, Usage, check_request
from client.privacy_gate import PrivacyRequirementNotMet, refusal_reason
from client.site_audit import record_exchange, record_site_event
from client.site_state import SimulatedSites, Site, site_for
from lungmae_core.contract import EVALUATE, QUERY, TRAIN, ContractError, RoundConfig
from lungmae_core.errors import (
    CacheError,
    ConfigError,
    LungMAEError,
    NonFiniteLossError,
    PrivacyBudgetExceeded,
    SiteConfigError,
)
from lungmae_core.privacy import PRIVACY_REFUSAL_CODE

__all__ = ["make_client_app", "app", "query", "train", "evaluate", "serve", "SiteUnavailable",
           "CONTRACT_ERROR_CODE", "SITE_RECORD", "SITE_NAME_KEY"]

#: Flower error code of a request that breaks the contract (wrong version, missing key, value out of bounds).
CONTRACT_ERROR_CODE = 4002

#: The work of one message kind, given the site and the checked request.
SiteWork = Callable[[Message, Site, RoundConfig], Message]

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


def _request(msg: Message, kind: str, site: Site, context: Context) -> RoundConfig:
    """Decode the request and check it against the site's policy (counting it); raises before any work."""
    if "config" not in msg.content.config_records:
        raise ContractError("the message has no ConfigRecord 'config'", "config")
    cfg = RoundConfig.decode(dict(msg.content.config_records["config"]))
    classes = site.config.data.classes
    if tuple(cfg.class_names) != tuple(classes):
        log.warning("site %s refuses the %s request (data.classes): the federation's classes %s differ from this "
                    "site's %s", site.name, kind, list(cfg.class_names), list(classes))
        raise PolicyRefusal("data.classes", f"the federation's classes ({', '.join(cfg.class_names)}) are not this "
                                            f"site's ({', '.join(classes)}); its labels mean other classes")
    if kind == QUERY:
        return cfg
    usage = Usage.load(context.state)
    check_request(site.policy, kind, cfg, dp_enabled=site.dp_enabled, usage=usage, site_name=site.name)
    usage.save(context.state)
    return cfg


def _refusal(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def serve(kind: str, msg: Message, context: Context, work: SiteWork) -> Message:
    """Serve one message of ``kind``: site, request check, ``work``; refusals and failures as the server sees them.

    A policy, contract or privacy refusal becomes an error reply (its code and a reason written to be sent).
    Any other failure raises :class:`SiteUnavailable` with the site's name and a fixed sentence (Flower turns
    it into an error reply); the details go to the site's log only.

    Raises:
        SiteUnavailable: the site could not do the work.
    """
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("LUNGMAE_CLIENT_THREADS", "1"))))
    site_name, site = "site", None
    try:
        site = site_for(context)
        site_name = site.name
        reply = work(msg, site, _request(msg, kind, site, context))
    except PolicyRefusal as exc:  # logged by client.policy; nothing was done
        reply = _refusal(msg, POLICY_REFUSAL_CODE, f"{exc} (site {site_name!r})")
    except ContractError as exc:
        log.warning("site %s refuses the %s message: it breaks the contract: %s", site_name, kind, exc)
        reply = _refusal(msg, CONTRACT_ERROR_CODE, f"contract error: {exc} (site {site_name!r})")
    except (PrivacyBudgetExceeded, PrivacyRequirementNotMet) as exc:
        log.warning("site %s refuses the %s message: %s", site_name, kind, exc)
        reply = _refusal(msg, PRIVACY_REFUSAL_CODE, f"{refusal_reason(exc)} (site {site_name!r})")
    except Exception as exc:
        log.exception("site %s could not serve the %s message", site_name, kind)
        records = msg.content.config_records
        phase = str(records["config"].get("phase", "")) if "config" in records else ""
        failure = SiteUnavailable(f"site {site_name!r} cannot serve {kind} {phase}: {_public_reason(exc)}")
        if site is not None:  # the site's own chained log keeps what it was asked and why it failed
            record_site_event(site.config, "failed", message_type=msg.metadata.message_type, phase=phase,
                              reason=str(failure))
        raise failure from None
    # what the coordinator asked and what left (or why not), in the site's own hash-chained log
    return reply if site is None else record_exchange(site.config, msg, reply)


def query(msg: Message, context: Context) -> Message:
    """What the site can serve: scan counts, DP state, the policy the server plans with, its display name."""
    return serve(QUERY, msg, context, answer_query)


def train(msg: Message, context: Context) -> Message:
    """One round of local training (pretrain, finetune or a cross-site local model); replies with the update."""
    return serve(TRAIN, msg, context, train_round)


def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on the requested split of the site's cache."""
    return serve(EVALUATE, msg, context, evaluate_round)


def make_client_app(site_configs: Sequence[str | os.PathLike[str]] | None = None) -> ClientApp:
    """Build a ClientApp with the :func:`query`, :func:`train` and :func:`evaluate` handlers.

    Args:
        site_configs: simulation only: one ``site.yaml`` per virtual SuperNode, indexed by the node's
            ``partition-id``. ``None`` (deployment): the node config key ``site-config`` names the file.

    Returns:
        A ``ClientApp`` serving ``query``, ``train`` and ``evaluate`` messages.
    """
    mods: list[Mod] = [] if site_configs is None else [SimulatedSites.of(site_configs)]
    client_app = ClientApp(mods=mods)
    client_app.query()(query)
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


#: The deployed ClientApp (``pyproject.toml`` ``[tool.flwr.app.components] clientapp``).
app = make_client_app()
