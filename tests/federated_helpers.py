"""Helpers for the federated tests: an in-process Flower grid and small prepared synthetic sites.

The grid delivers each instruction to a real ``ClientApp`` in this process (a deep copy, as the wire
would), turns exceptions into error replies as Flower's runtimes do, and lets a test tamper with replies
(a broken or malicious site) or stop the server mid-run (a killed coordinator).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid

_SITES_CACHE: dict[tuple, list[Path]] = {}


def bundle_record(packed: dict[str, Any], *, deflate: bool = False) -> ArrayRecord:
    """Packed arrays -> the ArrayRecord a message carries (one bundle: layout + payload, deflated if asked)."""
    from lungmae_core.bundle import bundle

    return ArrayRecord(array_dict={k: Array(v) for k, v in bundle(packed, deflate=deflate).items()})


def record_arrays(record: ArrayRecord, *, deflate: bool = False) -> dict[str, np.ndarray]:
    """A received bundle ArrayRecord -> the packed arrays it carries (``deflate``: an int8 update's)."""
    from lungmae_core.bundle import unbundle

    return unbundle({k: v.numpy() for k, v in record.items()}, deflate=deflate)


def with_nan(value: np.ndarray) -> np.ndarray:
    """A copy of ``value`` with one NaN: the smallest non-finite update."""
    bad = value.copy()
    bad.flat[0] = np.nan
    return bad


def replace_first_array(record: ArrayRecord, change: Callable[[np.ndarray], np.ndarray]) -> ArrayRecord:
    """A bundle whose first packed array is ``change(array)``: how tests forge a bad but well-formed update."""
    packed = record_arrays(record)
    name = next(iter(packed))
    packed[name] = change(packed[name])
    return bundle_record(packed)


class ServerKilled(RuntimeError):
    """Raised by :class:`InProcessGrid` to stop the ServerApp like a killed process would."""


class InProcessGrid(Grid):
    """A Grid that runs a ClientApp for each node in-process.

    Args:
        client_app: the ClientApp under test.
        node_configs: one node config per node (node ids 101, 102, ...).
        tamper: ``f(node_id, reply) -> reply`` applied to every successful reply (bad-update tests);
            returning None drops the reply, as a round timeout would.
        kill_after: raise :class:`ServerKilled` on this many-th ``send_and_receive`` call (1-based).
        late: node id -> seconds after the grid is made before that node is connected (a site that
            reconnects late, as after a SuperLink restart).
    """

    def __init__(self, client_app: Any, node_configs: Sequence[dict[str, Any]],
                 tamper: Callable[[int, Message], Message] | None = None, kill_after: int | None = None,
                 late: dict[int, float] | None = None) -> None:
        self.client_app = client_app
        self.contexts = {101 + i: Context(run_id=1, node_id=101 + i, node_config=dict(nc), state=RecordDict(),
                                          run_config={}) for i, nc in enumerate(node_configs)}
        self.tamper = tamper
        self.kill_after = kill_after
        self.late = dict(late or {})
        self.born = time.monotonic()
        self.calls = 0
        self.sent: list[Message] = []
        self._ids = itertools.count(1)
        self._run: Any = None

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        age = time.monotonic() - self.born
        return [n for n in self.contexts if age >= self.late.get(n, 0.0)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("the in-process grid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("the in-process grid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self.calls += 1
        if self.kill_after is not None and self.calls >= self.kill_after:
            raise ServerKilled(f"server killed at exchange {self.calls}")
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            self.sent.append(msg)
            delivered = copy.deepcopy(msg)
            try:
                reply = self.client_app(delivered, self.contexts[msg.metadata.dst_node_id])
                if self.tamper is not None:
                    reply = self.tamper(msg.metadata.dst_node_id, reply)
            except Exception as exc:  # what the Flower runtimes do with a ClientApp exception
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=delivered)
            if reply is None:
                continue
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            replies.append(reply)
        return replies


def prepared_sites(root: Path, *, sites: int = 2, scans: int = 5, size: int = 32, seed: int = 0,
                   min_count: int = 1) -> list[Path]:
    """Write and prepare small synthetic hospitals once per test session; return their site.yaml paths.

    Their ``policy.min-count`` is ``min_count`` (1 by default, so their tiny splits still send confusion
    matrices; the policy tests use the shipped default of 10).
    """
    key = (sites, scans, size, seed, min_count)
    if key not in _SITES_CACHE:
        from client.prepare import prepare_site
        from client.site_config import load_site_config, write_site_config
        from lungmae_cli.synth import write_synthetic_sites

        paths = write_synthetic_sites(root, sites=sites, scans_per_site=scans, seed=seed, shape=(40, 64, 64),
                                      preprocess_size=size, workers=1)
        for path in paths:
            cfg = load_site_config(path)
            cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, min_count=min_count))
            write_site_config(cfg, path)
            prepare_site(cfg, workers=1, progress=False)
        _SITES_CACHE[key] = [Path(p) for p in paths]
    return _SITES_CACHE[key]


def broken_site(root: Path) -> Path:
    """A site.yaml whose cache folder does not exist (a site that never ran `lungmae site prepare`)."""
    from client.site_config import DataSection, SiteConfig, SiteSection, write_site_config

    cfg = SiteConfig(site=SiteSection(name="site-broken"), data=DataSection(cache=root / "no-cache"))
    return Path(write_site_config(cfg, root / "broken" / "site.yaml"))


def replace_phases(cfg: Any, **phase_overrides: dict[str, Any]) -> Any:
    phases = cfg.phases
    for name, values in phase_overrides.items():
        phases = dataclasses.replace(phases, **{name: dataclasses.replace(getattr(phases, name), **values)})
    return dataclasses.replace(cfg, phases=phases)
