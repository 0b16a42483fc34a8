"""The Flower ServerApp: reads the federation config and runs the phase plan (``server.runner``).

Thin on purpose: the schedule, strategy, update checks and checkpoints live in their own modules, so the
same code runs under ``flwr.simulation.run_simulation`` (where ``context.run_config`` is empty and the
config is injected through :func:`make_server_app`), under ``flwr run`` on a real SuperLink (where the
run config from pyproject names the ``federation.yaml``), and in the tests' in-process grid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation_config import FederationConfig, federation_from_run_config

__all__ = ["make_server_app", "app"]

log = logging.getLogger(__name__)


def make_server_app(federation: FederationConfig | None = None, *,
                    progress: Callable[..., None] | None = None) -> ServerApp:
    """Build the ServerApp.

    Args:
        federation: the config to run. ``None``: read it at run time from ``context.run_config``
            (``federation-config`` path plus the overrides declared in pyproject ``[tool.flwr.app.config]``).
        progress: called after every step with ``(step, record)``, e.g. by ``lungmae simulate``.

    Returns:
        A ``ServerApp`` whose main runs (or resumes) the federation and returns when the plan is done.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from server.process_memory import return_large_frees_to_os
        from server.runner import FederationRunner  # torch import deferred to run time

        return_large_frees_to_os()
        cfg = federation if federation is not None else federation_from_run_config(context.run_config)
        log.info("federation run %s: %s, strategy %s, run dir %s", context.run_id, cfg.model.name,
                 cfg.strategy.name, cfg.run_dir)
        FederationRunner(cfg, grid, progress=progress).run()

    return server_app


app = make_server_app()
