"""FedProx hook: the proximal pull mu * (w - w_global) is added right before each optimiser step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.proximal import ProximalHook


class _Inner:
    """Stands for the DP hook: wraps the optimizer as Opacus does (original_optimizer attribute)."""

    def __init__(self) -> None:
        self.called = False

    def make_private(self, model, optimizer, loader):
        self.called = True

        class Wrapped:
            def __init__(self, original):
                self.original_optimizer = original

            def step(self):
                return self.original_optimizer.step()
        return model, Wrapped(optimizer), loader


@pytest.mark.parametrize("inner", [None, _Inner()])
def test_pull_towards_the_global_weights(inner) -> None:
    model = nn.Linear(3, 1, bias=False)
    frozen = nn.Linear(3, 1, bias=False).requires_grad_(False)
    model.add_module("frozen", frozen)
    opt = torch.optim.SGD([model.weight], lr=1.0)
    model, opt, _ = ProximalHook(0.5, inner=inner).make_private(model, opt, None)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # local training moved the weights by +1
    model.weight.grad = torch.zeros_like(model.weight)  # no data gradient this step
    opt.step()
    assert torch.allclose(model.weight, start + 0.5)  # w - lr * mu * (w - w0) = w0 + 1 - 0.5
    assert inner is None or inner.called


def test_mu_must_be_positive() -> None:
    with pytest.raises(ValueError, match="proximal mu must be > 0; got 0"):
        ProximalHook(0)
