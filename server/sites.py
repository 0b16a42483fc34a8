"""The site registry: who each connected node is, what it can serve, and who joined or left.

A site's *name* comes from its authenticated node, never from what the site says: with a ``sites``
mapping in ``federation.yaml`` (node id -> name, the ids ``flwr supernode register`` printed for the
sites' registered public keys), a node is named by the mapping and an unmapped node takes no part. Without
a mapping (simulation, tests, insecure trials) a node is called by the name it claims, made unique with its
node id when two claim the same, and flagged ``verified: false`` in ``metrics.json``.

Before each phase the server *queries* every connected site it does not know yet for counts (no data, no
identifiers; :class:`~lungmae_core.contract.QueryReply`); a round samples only the sites that can serve it.
A resumed server first gives the sites it knew before the restart up to ``round-timeout-s`` to reconnect.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from lungmae_core.contract import CROSS_SITE, FINAL, PRETRAIN, QUERY, TRAIN, ContractError, QueryReply
from lungmae_core.errors import LungMAEError

__all__ = ["InsufficientSitesError", "SiteInfo", "SiteRegistry", "SITE_RECORD", "SITE_NAME_KEY"]

log = logging.getLogger(__name__)

#: The query reply's ConfigRecord with the name the site gives itself (display only when unmapped).
SITE_RECORD, SITE_NAME_KEY = "site", "site-name"
_MAX_QUERY_BYTES = 65_536


class InsufficientSitesError(LungMAEError):
    """Fewer sites than the phase's ``min-sites`` can serve it, after waiting ``round-timeout-s``."""


@dataclasses.dataclass
class SiteInfo:
    """What a site said about itself in the query round (counts and settings only) and what it has done."""

    node_id: int
    name: str
    verified: bool = False
    num_unlabelled: int = 0
    num_labelled_train: int = 0
    num_labelled_val: int = 0
    num_labelled_test: int = 0
    dp_enabled: bool = False
    epsilon_budget: float = 0.0
    has_gpu: bool = False
    min_count: int = 10  # policy min-count: counts below it are withheld in metrics.json
    share_local_model: bool = False  # policy share-local-model: asked for a local model in the cross-site step
    error: str = ""
    epsilon: float = 0.0  # the site's total epsilon, as last accepted
    privacy_refused: str = ""  # why the site refused to train (budget, requirement): no more train rounds

    def can_serve(self, phase: str, kind: str) -> bool:
        """Whether the site has the scans a (phase, kind) message needs."""
        if self.error:
            return False
        if kind == TRAIN:
            if phase == PRETRAIN:
                return self.num_unlabelled + self.num_labelled_train > 0
            if phase == CROSS_SITE:
                return self.share_local_model and self.num_labelled_train > 0
            return self.num_labelled_train > 0
        if phase in (FINAL, CROSS_SITE):
            return self.num_labelled_test > 0
        return self.num_labelled_val > 0

    def declared(self, phase: str, kind: str, split: str = "val") -> int:
        """The count a reply's ``num_examples`` may not exceed (from the query: the data card)."""
        if kind == TRAIN:
            return self.num_unlabelled + self.num_labelled_train if phase == PRETRAIN else self.num_labelled_train
        return {"train": self.num_labelled_train, "val": self.num_labelled_val,
                "test": self.num_labelled_test}.get(split, 0)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "node_id"}


class SiteRegistry:
    """Node id -> :class:`SiteInfo`, with the federation's authenticated names and join/leave tracking.

    Args:
        names: ``federation.yaml`` ``sites`` (node id -> site name); empty: names are the sites' claims.
        on_event: ``f(event, **fields)`` for the audit log (``site-joined``, ``site-left``, ``site-refused``).
    """

    def __init__(self, names: Mapping[int, str] | None = None, on_event: Any = None) -> None:
        self.names = dict(names or {})
        self.sites: dict[int, SiteInfo] = {}
        self.on_event = on_event or (lambda event, **fields: None)
        self._connected: set[int] = set()
        self._awaited: set[str] = set()
        self._awaited_grace_s = 0.0

    def await_sites(self, names: set[str] | list[str], grace_s: float) -> None:
        """Have the next :meth:`query` wait up to ``grace_s`` more for these sites once ``min_sites`` is met.

        Why: after the server restarts, every site reconnects on its own retry schedule (the SuperLink may
        hold a crashed connection for about a minute, and a site retries every few seconds), so the first
        site back would otherwise run the resumed rounds alone while the others are a few seconds behind.
        The wait starts once ``min_sites`` able sites are back (the SuperLink then accepts connections again)
        and applies to one query only: a site that is really gone costs one ``grace_s`` per restart.
        """
        self._awaited = set(names)
        self._awaited_grace_s = max(0.0, float(grace_s))

    def __getitem__(self, node: int) -> SiteInfo:
        return self.sites[node]

    def get(self, node: int) -> SiteInfo | None:
        return self.sites.get(node)

    def values(self) -> list[SiteInfo]:
        return list(self.sites.values())

    def name(self, node: int) -> str:
        info = self.sites.get(node)
        if info is not None:
            return info.name
        return self.names.get(node, f"node-{node}")

    def by_name(self, name: str) -> SiteInfo | None:
        return next((s for s in self.sites.values() if s.name == name), None)

    def _identify(self, node: int, claimed: str) -> tuple[str, bool, str]:
        """(name, verified, error) for a node, from the mapping when there is one."""
        if self.names:
            if node in self.names:
                return self.names[node], True, ""
            return f"node-{node}", False, "node is not in federation.yaml sites (unauthenticated node)"
        name = claimed or f"node-{node}"
        if any(s.name == name for s in self.sites.values()):
            name = f"{name}#{node}"
        return name, False, ""

    def _parse(self, reply: Message, node: int) -> SiteInfo:
        content = reply.content
        if list(content.metric_records) != ["metrics"]:
            raise ContractError(f"query reply must hold one MetricRecord 'metrics'; got {list(content.metric_records)}")
        size = content["metrics"].count_bytes()
        if size > _MAX_QUERY_BYTES:
            raise ContractError(f"query reply of {size} bytes exceeds {_MAX_QUERY_BYTES}")
        q = QueryReply.decode(dict(content["metrics"]))
        claimed = ""
        if SITE_RECORD in content.config_records:
            raw = content.config_records[SITE_RECORD].get(SITE_NAME_KEY, "")
            claimed = "".join(ch for ch in str(raw)[:64] if ch.isalnum() or ch in "_.-")
        name, verified, error = self._identify(node, claimed)
        return SiteInfo(node_id=node, name=name, verified=verified, error=error, num_unlabelled=q.num_unlabelled,
                        num_labelled_train=q.num_labelled_train, num_labelled_val=q.num_labelled_val,
                        num_labelled_test=q.num_labelled_test, dp_enabled=q.dp_enabled,
                        epsilon_budget=q.epsilon_budget, has_gpu=q.has_gpu, epsilon=q.epsilon,
                        min_count=q.min_count, share_local_model=q.share_local_model)

    def query(self, grid: Grid, *, phase: str, kind: str, min_sites: int, timeout_s: float,
              config: Mapping[str, Any], poll_s: float = 1.0) -> None:
        """Ask every connected node not yet known what it can serve; wait for ``min_sites`` able ones.

        ``config`` is an encoded :class:`~lungmae_core.contract.RoundConfig` (the site checks its version).

        Raises:
            InsufficientSitesError: naming how many of how many connected sites can serve the phase.
        """
        deadline = time.monotonic() + timeout_s
        grace_deadline: float | None = None
        asked: set[int] = set()  # once per call: a site works through its messages in order, so asking again
        # before it answered would only queue more queries ahead of the next round's messages
        while True:
            new = [n for n in grid.get_node_ids() if n not in self.sites and n not in asked]
            if new:
                asked.update(new)
                messages = [Message(RecordDict({"config": ConfigRecord(dict(config))}), dst_node_id=n,
                                    message_type=QUERY) for n in new]
                end = deadline if grace_deadline is None else grace_deadline  # the wait this call is in
                replies = list(grid.send_and_receive(messages, timeout=max(1.0, end - time.monotonic())))
                by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
                for reply in replies:
                    node = by_id.get(reply.metadata.reply_to_message_id)
                    if node is None or node in self.sites:
                        log.warning("site query: dropped a reply that answers no query of this exchange")
                        continue
                    self._add(node, reply)
            self.track(grid)
            able = [s for s in self.sites.values() if s.can_serve(phase, kind)]
            if len(able) >= min_sites:
                missing = self._awaited - {s.name for s in self.sites.values() if s.node_id in self._connected}
                if not missing:
                    self._awaited = set()
                    return
                if grace_deadline is None:
                    grace_deadline = time.monotonic() + self._awaited_grace_s
                    log.info("waiting up to %.0f s for %s to reconnect", self._awaited_grace_s, sorted(missing))
                if time.monotonic() >= grace_deadline:
                    log.warning("going on without %s: not reconnected within %.0f s", sorted(missing),
                                self._awaited_grace_s)
                    self._awaited = set()
                    return
                time.sleep(poll_s)
                continue
            if time.monotonic() >= deadline:
                connected = len(list(grid.get_node_ids()))
                raise InsufficientSitesError(
                    f"Unable to run {phase} ({kind}) as only {len(able)} of {connected} connected sites can serve "
                    f"it and min-sites is {min_sites}; sites without the needed scans or refused: "
                    f"{sorted(s.name for s in self.sites.values() if not s.can_serve(phase, kind))}")
            time.sleep(poll_s)

    def _add(self, node: int, reply: Message) -> None:
        if reply.has_error():
            name, _, _ = self._identify(node, "")
            info = SiteInfo(node_id=node, name=name, error=(reply.error.reason or "error")[:300])
            log.warning("site query: %s answered with an error: %s", name, info.error)
        else:
            try:
                info = self._parse(reply, node)
            except (ContractError, KeyError, TypeError, ValueError) as exc:
                name, _, _ = self._identify(node, "")
                info = SiteInfo(node_id=node, name=name, error=f"bad query reply: {exc}"[:300])
                log.warning("site query: %s sent a bad reply: %s", name, exc)
        self.sites[node] = info
        if info.error and not info.verified and self.names and node not in self.names:
            self.on_event("site-refused", site=info.name, reason=info.error)
        else:
            self.on_event("site-joined", site=info.name, verified=info.verified, error=info.error[:200])
        if not info.error:
            log.info("site %s%s: %d unlabelled, %d/%d/%d labelled train/val/test, dp %s", info.name,
                     "" if info.verified else " (unverified name)", info.num_unlabelled, info.num_labelled_train,
                     info.num_labelled_val, info.num_labelled_test, "on" if info.dp_enabled else "off")

    def track(self, grid: Grid) -> set[int]:
        """Record nodes that left or came back since the last call; returns the connected node ids."""
        connected = set(grid.get_node_ids())
        for node in sorted(self._connected - connected):
            self.on_event("site-left", site=self.name(node))
        for node in sorted((connected - self._connected) & set(self.sites)):
            if self._connected:
                self.on_event("site-joined", site=self.name(node), rejoined=True)
        self._connected = connected
        return connected

    def able(self, grid: Grid, phase: str, kind: str, *, require_dp: bool) -> list[int]:
        """Connected nodes whose site can serve (phase, kind) (and trains with DP if required)."""
        able = []
        for node in sorted(set(grid.get_node_ids())):
            info = self.sites.get(node)
            if info is None or not info.can_serve(phase, kind):
                continue
            if kind == TRAIN and info.privacy_refused:
                continue
            if require_dp and kind == TRAIN and not info.dp_enabled:
                if not info.privacy_refused:
                    info.privacy_refused = "federation requires DP and the site has privacy.enabled false"
                    log.warning("site %s excluded from training: %s", info.name, info.privacy_refused)
                continue
            able.append(node)
        return able

