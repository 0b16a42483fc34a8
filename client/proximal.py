"""FedProx at the site: a proximal pull ``mu * (w - w_global)`` added to every gradient before each step.

FedProx (Li et al., 2020) keeps local models of heterogeneous hospitals close to the global model by adding
``mu/2 * ||w - w_global||^2`` to the local loss. Its gradient does not depend on the data, so it is added
to the (possibly DP-noised) gradient right before the optimiser steps; under DP-SGD this is
post-processing and costs no privacy. It plugs into ``lungmae_core.train`` as a ``PrivacyHook``
(``make_private(model, optimizer, loader)``), wrapping the site's real privacy hook when there is one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["ProximalHook"]


class ProximalHook:
    """Adds ``mu * (w - w0)`` to the gradient of every trainable parameter before each optimiser step.

    Args:
        mu: proximal weight (> 0).
        inner: another hook to apply first (e.g. the Opacus DP-SGD hook), or ``None``.

    Raises:
        ValueError: when ``mu`` is not positive.
    """

    def __init__(self, mu: float, inner: Any | None = None) -> None:
        if not mu > 0:
            raise ValueError(f"proximal mu must be > 0; got {mu}")
        self.mu = float(mu)
        self.inner = inner

    def make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                     loader: DataLoader) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        if self.inner is not None:
            model, optimizer, loader = self.inner.make_private(model, optimizer, loader)
        params = [p for p in model.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in params]
        # Opacus' DPOptimizer sets p.grad (clipped + noised) and then calls the wrapped optimizer's step:
        # patch that inner step so the proximal term is added after the noise.
        target = getattr(optimizer, "original_optimizer", optimizer)
        original_step = target.step
        mu = self.mu

        def step(*args: Any, **kwargs: Any) -> Any:
            with torch.no_grad():
                for p, p0 in zip(params, anchors):
                    if p.grad is not None:
                        p.grad.add_(p - p0, alpha=mu)
            return original_step(*args, **kwargs)

        target.step = step  # type: ignore[method-assign]
        return model, optimizer, loader
