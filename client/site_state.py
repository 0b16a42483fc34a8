"""The site a ClientApp process serves: its validated ``site.yaml`` and what follows from it, built from the Context.

Every message handler starts from the same few facts: which ``site.yaml`` this SuperNode was started with, the
site's name, policy, privacy settings and compute device. :func:`site_for` builds them once per process into
one :class:`Site` (Flower's example apps do the same with their data partition), keyed by the file and its
modification time, so a simulation process that serves many rounds reads and validates ``site.yaml`` once and
an edited file is read again.

Where the file comes from:

* deployment: the SuperNode's node config key ``site-config``
  (``flower-supernode --node-config 'site-config="/path/to/site.yaml"'``), else the environment variable
  ``LUNGMAE_SITE_CONFIG``;
* simulation: :class:`SimulatedSites`, a ClientApp mod, puts one file per virtual SuperNode (indexed by
  its ``partition-id``) under that key before the handler runs.

What is deliberately *not* kept across messages: the privacy gate (its ledger and the patient count behind
the DP delta are checked against the files as they are when each message arrives; cheap without DP), and any
randomness for DP noise (drawn from the OS when each round's training starts, ``lungmae_core.dp_sampling``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from client.privacy_gate import PrivacyGate
from lungmae_core.errors import SiteConfigError

if TYPE_CHECKING:  # imported when a message needs them, not when Flower loads the app (DICOM, scipy, torch)
    import torch

    from client.site_config import PolicySection, SiteConfig

__all__ = ["Site", "SimulatedSites", "site_for", "site_config_path", "SITE_CONFIG_KEY", "SITE_CONFIG_ENV"]

log = logging.getLogger(__name__)

#: The node config key naming this SuperNode's ``site.yaml``.
SITE_CONFIG_KEY = "site-config"
#: The environment variable read when the node config has no ``site-config``.
SITE_CONFIG_ENV = "LUNGMAE_SITE_CONFIG"
#: Set by :class:`SimulatedSites` instead of ``site-config`` when a node's partition id names no file.
_SITE_CONFIG_ERROR_KEY = "lungmae-site-config-error"


@dataclasses.dataclass(frozen=True)
class Site:
    """One site as a ClientApp process knows it.

    Args:
        config: the validated ``site.yaml``.
        source: the file it was read from.
    """

    config: SiteConfig
    source: Path

    @property
    def name(self) -> str:
        """The name the site gives itself (display and its own logs; the server names sites by node)."""
        return self.config.site.name

    @property
    def policy(self) -> PolicySection:
        """What the site agrees to do, whatever the coordinator asks (``site.yaml`` ``policy``)."""
        return self.config.policy

    @property
    def dp_enabled(self) -> bool:
        """Whether the site trains with DP-SGD (``site.yaml`` ``privacy: enabled``)."""
        return bool(self.config.privacy.enabled)

    @functools.cached_property
    def device(self) -> torch.device:
        """The compute device ``training.device`` names, checked to exist on this machine (once)."""
        from lungmae_core.train import resolve_device

        return resolve_device(self.config.training.device)

    def privacy_gate(self) -> PrivacyGate:
        """The site's DP settings and ledger (``client.privacy_gate``), opened for one message."""
        return PrivacyGate.for_site_config(self.config)


def site_config_path(context: Context) -> Path:
    """The ``site.yaml`` this SuperNode serves, from its node config (or the environment).

    Raises:
        SiteConfigError: when neither names one (or, in simulation, the partition id indexes no file).
    """
    error = context.node_config.get(_SITE_CONFIG_ERROR_KEY)
    if error:
        raise SiteConfigError(str(error))
    path = context.node_config.get(SITE_CONFIG_KEY) or os.environ.get(SITE_CONFIG_ENV, "")
    if not path:
        raise SiteConfigError(f"this SuperNode has no site config: start it with --node-config "
                              f"'{SITE_CONFIG_KEY}=\"/path/to/site.yaml\"' (or set {SITE_CONFIG_ENV})")
    return Path(str(path))


_SITES: dict[Path, tuple[tuple[int, int], Site]] = {}
_SITES_LOCK = threading.Lock()


def site_for(context: Context) -> Site:
    """The :class:`Site` of the SuperNode that received the message (read once per process and file version).

    Raises:
        SiteConfigError: when no site.yaml is named, or the file is missing or invalid (nothing is cached then).
    """
    from client.site_config import load_site_config

    path = site_config_path(context)
    try:
        stat = path.stat()
    except OSError:  # load_site_config says which file is missing, in its own words
        return Site(load_site_config(path), path)
    version = (stat.st_mtime_ns, stat.st_size)
    with _SITES_LOCK:
        cached = _SITES.get(path)
    if cached is not None and cached[0] == version:
        return cached[1]
    site = Site(load_site_config(path), path)
    with _SITES_LOCK:
        _SITES[path] = (version, site)
    return site


@dataclasses.dataclass(frozen=True)
class SimulatedSites:
    """A ClientApp mod for simulation: virtual SuperNode ``partition-id`` i serves ``site_configs[i]``.

    Flower's simulation gives each virtual SuperNode only ``partition-id`` and ``num-partitions`` in its node
    config; this mod hands the handler a copy of the Context whose node config also names the site's file
    (``site-config``), as a deployed SuperNode's would. The run's ``state`` is the same object, so what the
    handler records there (the policy's usage counts) persists as usual.

    Args:
        site_configs: one ``site.yaml`` per virtual SuperNode.
    """

    site_configs: tuple[Path, ...]

    @classmethod
    def of(cls, site_configs: Sequence[str | os.PathLike[str]]) -> SimulatedSites:
        return cls(tuple(Path(p) for p in site_configs))

    def path_of(self, context: Context) -> Path:
        """The file of the node's ``partition-id``.

        Raises:
            SiteConfigError: when the partition id does not index the files.
        """
        index = context.node_config.get("partition-id")
        if not isinstance(index, int) or not 0 <= index < len(self.site_configs):
            raise SiteConfigError(f"node config partition-id {index!r} does not index the {len(self.site_configs)} "
                                  "site configs given to make_client_app")
        return self.site_configs[index]

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        routed = copy.copy(context)
        routed.node_config = dict(context.node_config)
        try:
            routed.node_config[SITE_CONFIG_KEY] = str(self.path_of(context))
        except SiteConfigError as exc:  # the handler reports it like any other unusable site.yaml
            routed.node_config[_SITE_CONFIG_ERROR_KEY] = str(exc)
        return call_next(msg, routed)
