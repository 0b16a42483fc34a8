"""Only approved code runs at a site: check each app bundle (FAB) before any of its code is imported.

Whatever app the coordinator submits is shipped to every SuperNode as a FAB (a zip of the app's code), and
Flower's ``flwr-clientapp`` process unpacks it and imports its ClientApp, with the site's cache, pseudonym
key and privacy ledger within reach. The site therefore decides which bundles run (``site.yaml``
``trust:``): a bundle passes if a trusted Ed25519 key signed it (``trusted-keys``; the consortium signs with
``lungmae server run --signing-key``, the signature travels as the run config value ``fab-signature``) or if
its SHA-256, computed here from the bytes, is on the allow-list (``fab-sha256``). Anything else is refused,
and the refusal is written to the site's own chained log (``client/site_audit.py``) and to the SuperNode log.

Where the check sits (Flower 1.42): Flower's own ``flower-supernode --trusted-entities`` verifies only
bundles that carry verification records, and the SuperLink attaches those only to apps from Flower's hub;
a bundle submitted with ``flwr run`` has none (``flwr/superlink/servicer/control/control_handlers.py``
starts every local FAB with an empty verification dict), so ``--trusted-entities`` would refuse every run.
The SuperNode itself never imports the bundle (it reads only its ``pyproject.toml``); the first process that
does is ``flwr-clientapp``, started by name (``PATH``) by ``flower-superexec``
(``flwr/supercore/superexec/executor/subprocess_executor.py``). `lungmae site start` therefore puts a
directory first on the SuperNode's ``PATH`` holding a ``flwr-clientapp`` that runs :func:`clientapp_main`:
Flower's own ``flwr-clientapp``, with the step that pulls the task input
(``flwr.supernode.runtime.run_clientapp``) changed in one place: ``install_from_fab`` first checks the
bundle's bytes against the site's policy, so a refused bundle is never written to disk nor imported. The
refusal is an exception inside Flower's own try block, so the coordinator gets an error reply naming it.

Examples:
    >>> policy = FabPolicy.from_site_config(load_site_config("site.yaml"))
    >>> policy.check(fab_bytes, signature)          # raises FabRefused naming the rule
    'signed by fab-signing.pub'
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client.site_audit import record_site_event, site_audit_path
from lungmae_core.atomic import atomic_write_text
from lungmae_core.errors import LungMAEError
from lungmae_core.signing import fab_sha256, load_public_key, verify_fab

__all__ = ["FabPolicy", "FabRefused", "SIGNATURE_KEY", "SITE_CONFIG_ENV", "clientapp_main", "install_launcher"]

logger = logging.getLogger(__name__)

#: Run config key that carries the consortium's signature of the FAB (set by `lungmae server run`).
SIGNATURE_KEY = "fab-signature"
#: Environment variable through which `lungmae site start` tells the launcher which site.yaml holds the policy.
SITE_CONFIG_ENV = "LUNGMAE_SITE_CONFIG"


class FabRefused(LungMAEError):
    """The app bundle is neither signed by a trusted key nor on the site's allow-list."""


@dataclasses.dataclass(frozen=True)
class FabPolicy:
    """What bundles a site runs.

    Args:
        trusted_keys: Ed25519 public key files.
        allowed_sha256: hex SHA-256 digests of bundles allowed without a signature.
        audit_log: where refusals and acceptances are recorded (None: not recorded).
    """

    trusted_keys: tuple[Path, ...] = ()
    allowed_sha256: frozenset[str] = frozenset()
    audit_log: Path | None = None

    @classmethod
    def from_site_config(cls, cfg: Any) -> FabPolicy:
        """The policy of a loaded ``SiteConfig`` (its ``trust`` section); every key file must be readable.

        Raises:
            SigningKeyError: naming a trusted key file that is missing or not an Ed25519 public key.
        """
        trust = cfg.trust
        for key in trust.trusted_keys:
            load_public_key(key)
        return cls(tuple(trust.trusted_keys), frozenset(trust.fab_sha256), site_audit_path(cfg))

    def check(self, fab: bytes, signature: str | None) -> str:
        """Accept or refuse ``fab``; returns why it was accepted.

        Raises:
            FabRefused: naming the digest and what the policy trusts.
        """
        digest = fab_sha256(fab)
        if not self.trusted_keys and not self.allowed_sha256:
            raise FabRefused(f"app bundle sha256 {digest} refused: site.yaml 'trust' names no trusted key and no "
                             "fab-sha256, so this site runs no app (add the consortium's fab-signing.pub to "
                             "trust: trusted-keys)")
        if signature and self.trusted_keys:
            signer = verify_fab(fab, signature, self.trusted_keys)
            if signer is not None:
                return f"signed by {signer}"
        if digest in self.allowed_sha256:
            return "sha256 on the allow-list"
        why = ("it carries no signature" if not signature else
               "its signature does not verify with any trusted key (the bundle was changed after signing, or "
               "signed by another key)")
        raise FabRefused(f"app bundle sha256 {digest} refused: {why}, and its sha256 is not in trust: fab-sha256 "
                         f"(trusted keys: {', '.join(p.name for p in self.trusted_keys) or 'none'})")

    def enforce(self, fab: bytes, run_config: Any, *, run_id: int | None = None,
                message_type: str | None = None) -> str:
        """:meth:`check` and record the outcome in the site's log; re-raises a refusal."""
        signature = run_config.get(SIGNATURE_KEY) if hasattr(run_config, "get") else None
        signature = str(signature) if signature else None
        digest = fab_sha256(fab)
        try:
            reason = self.check(fab, signature)
        except FabRefused as exc:
            logger.error("lungmae: %s", exc)
            if self.audit_log is not None:
                record_site_event(self.audit_log, "fab-refused", run_id=run_id, message_type=message_type,
                                  fab_sha256=digest, reason=str(exc))
            raise
        if self.audit_log is not None:
            record_site_event(self.audit_log, "fab-accepted", run_id=run_id, message_type=message_type,
                              fab_sha256=digest, reason=reason)
        return reason


def _policy_from_env() -> FabPolicy:
    from client.site_config import load_site_config

    path = os.environ.get(SITE_CONFIG_ENV)
    if not path:
        raise FabRefused(f"app bundle refused: ${SITE_CONFIG_ENV} is not set, so this ClientApp launcher does not "
                         "know the site's policy (start the site with `lungmae site start`)")
    return FabPolicy.from_site_config(load_site_config(path))


def clientapp_main(argv: Sequence[str] | None = None) -> None:
    """``flwr-clientapp`` with the bundle check in front of the install: see the module docstring."""
    import importlib

    # (the package flwr.supernode.cli re-exports a function of the same name as this module)
    flwr_clientapp = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    # Any: two of its module-level names are replaced below; Flower does not export them as an API
    runtime: Any = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    original_pull, original_install = runtime.pull_task_input, runtime.install_from_fab
    pulled: dict[str, Any] = {}

    def remembering_pull_task_input(client: Any) -> Any:
        message, context, run, fab = original_pull(client)
        pulled.update(message=message, context=context, run=run)
        return message, context, run, fab

    def checked_install_from_fab(content: bytes, *args: Any, **kwargs: Any) -> Any:
        # Raising here (not in the pull) keeps Flower's error path: the coordinator gets an error reply.
        context, run, message = pulled.get("context"), pulled.get("run"), pulled.get("message")
        policy = _policy_from_env()
        reason = policy.enforce(content, getattr(context, "run_config", {}),
                                run_id=getattr(run, "run_id", None),
                                message_type=getattr(getattr(message, "metadata", None), "message_type", None))
        logger.warning("lungmae: app bundle sha256 %s accepted (%s)", fab_sha256(content), reason)
        return original_install(content, *args, **kwargs)

    runtime.pull_task_input = remembering_pull_task_input
    runtime.install_from_fab = checked_install_from_fab
    if argv is not None:
        sys.argv = ["flwr-clientapp", *argv]
    flwr_clientapp.flwr_clientapp()


def install_launcher(directory: Path, warm_socket: Path | None = None) -> Path:
    """Write the ``flwr-clientapp`` launcher into ``directory`` (to be put first on the SuperNode's PATH).

    Args:
        directory: where (created 0700).
        warm_socket: the warm ClientApp process's socket (``client/warm_clientapp.py``). With it, the launcher
            imports only the standard library and has the warm process fork the task (falling back to
            :func:`clientapp_main` in its own process when that process is absent or refuses); without it, the
            launcher runs :func:`clientapp_main` itself.

    Returns:
        The launcher's path.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    launcher = directory / "flwr-clientapp"
    root = Path(__file__).resolve().parents[1]
    if warm_socket is None:
        body = "from client.fab_check import clientapp_main\nclientapp_main()\n"
    else:
        body = ("from client.warm_clientapp import launcher_main\n"
                f"sys.exit(launcher_main({str(warm_socket)!r}))\n")
    atomic_write_text(launcher,  # never a half-written launcher where Flower looks for flwr-clientapp
                      f"#!{sys.executable}\n"
                      "# Written by `lungmae site start`: Flower's flwr-clientapp, checking the app bundle first.\n"
                      "import sys\n"
                      f"sys.path.insert(0, {str(root)!r})\n" + body, mode=stat.S_IRWXU)
    return launcher
