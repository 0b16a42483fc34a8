"""Per-sample gradient clipping in one backward pass: book-keeping with mixed ghost norms (Bu et al. 2023).

DP-SGD needs ``sum_i clip(g_i)``, the sum of every sample's gradient scaled to norm at most ``C``. Opacus'
hooks mode instantiates every per-sample gradient (``B x`` each weight matrix), its ghost mode runs a second
backward pass. The book-keeping (BK) method (Bu, Wang, Zha, Karypis, "Differentially Private Optimization on
Large Model at Small Cost", ICML 2023) needs neither: during the ordinary backward pass it keeps, per layer,
the input activations ``a`` (B, T, d) (autograd keeps them anyway) and the output gradients ``g`` (B, T, p);
after it, it

1. computes each sample's gradient norm per layer, choosing per layer the cheaper of
   * the *ghost norm* ``||g_i^T a_i||^2 = sum_{s,t} (a_is . a_it)(g_is . g_it)``: ``O(B T^2 (d + p))``, and
   * *instantiation* ``G_i = g_i^T a_i`` then its norm: ``O(B T d p)``
   (mixed ghost clipping: short encoder sequences take the ghost norm, the decoder's 512 tokens with a
   narrow width instantiate);
2. forms the clip factors ``c_i = min(1, C / (||g_i|| + 1e-6))`` from the norms summed over all layers
   (Opacus' flat clipping, same epsilon);
3. writes ``sum_i c_i g_i^T a_i`` into ``p.grad`` as one matmul ``(c * g)^T a`` (ghost layers) or
   ``sum_i c_i G_i`` (instantiated layers), which Opacus' ``DPOptimizerFastGradientClipping`` then noises,
   scales and steps.

Linear layers run through :class:`_BookkeepingLinear`, whose backward pass computes the input gradient
only: the weight gradient autograd would sum over the batch is replaced by the clipped sum of step 3.

Supported layers: ``nn.Linear`` (any leading dims after the batch), ``nn.LayerNorm`` (affine),
:class:`~lungmae_core.model.LearnedPositionEmbedding` and :class:`~lungmae_core.model.LearnedToken`;
:func:`unsupported_parameters` lists any other parameter-holding module.

Contract with the training loop (what ``lungmae_core.train`` does under DP): the loss is the *mean* over
the batch of per-sample losses, the forward pass sees each sample independently (no batch statistics), and
``optimizer.step()`` follows every backward pass (a Poisson-empty batch steps without a backward pass:
every gradient is then zero and only noise is added).

Examples:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 1))
    >>> clipper = BookkeepingClipper(net, max_grad_norm=0.1)
    >>> net(torch.randn(5, 4)).pow(2).squeeze(1).mean().backward()
    >>> norms = clipper.clip_and_sum()  # p.grad now holds sum_i clip(g_i)
    >>> norms.shape, float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm()) <= 5 * 0.1 + 1e-6
    (torch.Size([5]), True)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lungmae_core.model import LearnedPositionEmbedding, LearnedToken

__all__ = ["BookkeepingClipper", "unsupported_parameters", "bookkeeping_optimizer", "make_private_bookkeeping",
           "CLIP_EPS"]

log = logging.getLogger(__name__)

#: Added to the norm before dividing, as Opacus' flat clipping does.
CLIP_EPS = 1e-6
SUPPORTED = (nn.Linear, nn.LayerNorm, LearnedPositionEmbedding, LearnedToken)
Mode = Literal["mixed", "ghost", "instantiate"]


def unsupported_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters held by modules this clipper cannot handle."""
    out: list[str] = []
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own and not isinstance(module, SUPPORTED):
            out.extend(f"{name}.{n} ({type(module).__name__})" for n in own)
    return out


class _Capture:
    """One module's activation and output gradient of the current step."""

    __slots__ = ("module", "a", "g")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.a: torch.Tensor | bool | None = None  # the input activation (True: captured, not needed)
        self.g: torch.Tensor | None = None  # the output gradient


class _BookkeepingLinear(torch.autograd.Function):
    """``F.linear`` whose backward gives the input's gradient only and keeps ``(a, g)`` for the clipper.

    Autograd would otherwise also compute the batch-summed weight gradient ``g^T a``, which DP-SGD throws
    away: skipping it is what makes the book-keeping step cost about as much as the non-private one.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                cap: _Capture) -> torch.Tensor:
        ctx.cap = cap
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        x, weight = ctx.saved_tensors
        cap = ctx.cap
        if cap.g is not None:
            raise RuntimeError("a Linear layer ran twice before the optimizer step; book-keeping clipping needs "
                               "one forward and one backward pass per step")
        cap.a, cap.g = x.detach(), g.detach()
        gx = (g @ weight.to(g.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        return gx, None, None, None


class BookkeepingClipper:
    """Hooks on ``model`` that turn one ordinary backward pass into ``p.grad = sum_i clip(g_i)``.

    Args:
        model: the network (its parameter-holding modules must all be supported).
        max_grad_norm: ``C``.
        mode: ``"mixed"`` (per layer the cheaper of ghost norm and instantiation), or force one of them.
        loss_reduction: ``"mean"`` (the loss is the batch mean of per-sample losses: output gradients are
            multiplied by the batch size) or ``"sum"``.

    Raises:
        ValueError: a trainable parameter in an unsupported module (all listed), or a bad ``mode``.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, mode: Mode = "mixed",
                 loss_reduction: Literal["mean", "sum"] = "mean") -> None:
        if mode not in ("mixed", "ghost", "instantiate"):
            raise ValueError(f"clipping mode must be mixed, ghost or instantiate; got {mode!r}")
        bad = unsupported_parameters(model)
        if bad:
            raise ValueError("Unable to clip per sample in one backward pass as these parameters are in "
                             f"unsupported layers: {', '.join(bad)}")
        self.model, self.max_grad_norm, self.mode = model, float(max_grad_norm), mode
        self.loss_reduction = loss_reduction
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.captures: list[_Capture] = []
        self._handles: list[Any] = []
        self.choices: dict[str, str] = {}
        self._patched: list[nn.Linear] = []
        for name, module in model.named_modules():
            if isinstance(module, SUPPORTED) and any(p.requires_grad for p in module.parameters(recurse=False)):
                cap = _Capture(module)
                self.captures.append(cap)
                if isinstance(module, nn.Linear) and module.weight.requires_grad:
                    # an instance attribute over the class's forward until remove(); mypy cannot type that
                    module.forward = self._linear_forward(module, cap)  # type: ignore[method-assign, assignment]
                    self._patched.append(module)
                else:
                    self._handles.append(module.register_forward_hook(self._forward_hook(cap, name)))

    @staticmethod
    def _linear_forward(module: nn.Linear, cap: _Capture) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if module.training and torch.is_grad_enabled():
                # torch leaves Function.apply unannotated
                out: torch.Tensor = _BookkeepingLinear.apply(  # type: ignore[no-untyped-call]
                    x, module.weight, module.bias, cap)
                return out
            return F.linear(x, module.weight, module.bias)

        return forward

    def _forward_hook(self, cap: _Capture, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            if not (module.training and torch.is_grad_enabled() and output.requires_grad):
                return
            if cap.a is not None or cap.g is not None:
                raise RuntimeError(f"{name} ran twice before the optimizer step; book-keeping clipping needs one "
                                   "forward and one backward pass per step")
            cap.a = inputs[0].detach() if isinstance(module, (nn.Linear, nn.LayerNorm)) else True

            def grad_hook(grad: torch.Tensor) -> None:
                cap.g = grad.detach()

            output.register_hook(grad_hook)  # type: ignore[no-untyped-call]  # torch leaves it unannotated

        return hook

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._patched:
            del module.forward  # the class's forward again
        self._patched.clear()

    def reset(self) -> None:
        for cap in self.captures:
            cap.a = cap.g = None

    # -- per layer --------------------------------------------------------------------------------------------
    def _linear(self, cap: _Capture) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
        """Per-sample squared norms of a Linear's parameters, and the function writing its clipped sums.

        Both from the output gradient as autograd gave it (no scaled copy of it: the loss reduction's scale
        is folded into the norms and the clip factors by :meth:`clip_and_sum`).
        """
        module: nn.Linear = cap.module  # type: ignore[assignment]
        assert isinstance(cap.a, torch.Tensor) and cap.g is not None  # clip_and_sum skips layers not captured
        a, g = cap.a, cap.g
        if a.dtype != g.dtype:  # autocast: the gradient in bf16/fp16, the saved input in fp32
            a, g = a.float(), g.float()
        b = g.shape[0]
        a, g = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])  # (B, T, d), (B, T, p)
        t, d, p = a.shape[1], a.shape[2], g.shape[2]
        ghost = self.mode == "ghost" or (self.mode == "mixed" and t * (d + p) < d * p)
        self.choices[f"Linear{tuple(module.weight.shape)} T={t}"] = "ghost" if ghost else "instantiate"
        if ghost:
            aa = torch.bmm(a, a.transpose(1, 2))
            gg = torch.bmm(g, g.transpose(1, 2))
            sq = aa.view(b, -1).mul_(gg.view(b, -1)).sum(dim=1).clamp_min(0)  # in place: no (B, T, T) temporary
            del aa, gg
            per_sample_w = None
        else:
            per_sample_w = torch.bmm(g.transpose(1, 2), a)  # (B, p, d)
            flat = per_sample_w.view(b, -1)
            sq = torch.linalg.vector_norm(flat, dim=1).square()  # one pass, no squared copy
        gb = g.sum(dim=1) if module.bias is not None else None  # (B, p)
        if gb is not None:
            sq = sq + gb.pow(2).sum(dim=1)

        def write(c: torch.Tensor) -> None:
            if module.weight.requires_grad:
                if per_sample_w is None:
                    w = (g * c.view(b, 1, 1)).reshape(-1, p).t() @ a.reshape(-1, d)
                else:  # sum_i c_i G_i as one (1, B) x (B, p d) product: one pass over the per-sample gradients
                    w = (c.view(1, b).to(per_sample_w.dtype) @ per_sample_w.view(b, -1)).view(p, d)
                module.weight.grad = w.to(module.weight.dtype)
            if gb is not None and module.bias.requires_grad:
                module.bias.grad = (c @ gb).to(module.bias.dtype)

        return sq, write

    def _layer_norm(self, cap: _Capture) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
        module: nn.LayerNorm = cap.module  # type: ignore[assignment]
        assert isinstance(cap.a, torch.Tensor) and cap.g is not None  # clip_and_sum skips layers not captured
        g = cap.g
        b = g.shape[0]
        x_hat = F.layer_norm(cap.a, module.normalized_shape, eps=module.eps)
        dims = tuple(range(1, g.dim() - len(module.normalized_shape)))
        gw = (g * x_hat).sum(dim=dims) if dims else g * x_hat  # (B, *normalized_shape)
        gb = g.sum(dim=dims) if dims else g
        sq = gw.reshape(b, -1).pow(2).sum(1) + gb.reshape(b, -1).pow(2).sum(1)

        def write(c: torch.Tensor) -> None:
            if module.weight.requires_grad:
                module.weight.grad = torch.tensordot(c, gw, dims=1).to(module.weight.dtype)
            if module.bias is not None and module.bias.requires_grad:
                module.bias.grad = torch.tensordot(c, gb, dims=1).to(module.bias.dtype)

        return sq, write

    def _token(self, cap: _Capture) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
        """Position embedding ``x + w`` and learned token ``w.expand(B, ...)``: the per-sample gradient is g_i."""
        module = cap.module
        assert cap.g is not None  # clip_and_sum skips layers not captured
        g = cap.g
        b = g.shape[0]
        sq = g.reshape(b, -1).pow(2).sum(1)

        def write(c: torch.Tensor) -> None:
            module.weight.grad = torch.tensordot(c, g, dims=1).reshape(module.weight.shape).to(module.weight.dtype)

        return sq, write

    # -- the step ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def clip_and_sum(self) -> torch.Tensor:
        """After ``loss.backward()``: set every parameter's ``grad`` to ``sum_i clip(g_i)``.

        Parameters that the backward pass did not reach (or all of them, for an empty batch) get zeros.

        Returns:
            the per-sample gradient norms before clipping, (B,) (empty for an empty batch).
        """
        parts: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = []
        batch = None
        scale = 1.0
        for cap in self.captures:
            if cap.g is None or cap.a is None:
                continue
            b = cap.g.shape[0]
            if batch is None:
                batch = b
            elif b != batch:
                raise RuntimeError(f"{type(cap.module).__name__} saw batch {b}, another layer {batch}: the "
                                   "first dimension of every layer's input must be the batch")
            # the per-sample gradients are ``scale`` times what the output gradients give (a mean loss)
            scale = float(b) if self.loss_reduction == "mean" else 1.0
            if isinstance(cap.module, nn.Linear):
                parts.append(self._linear(cap))
            elif isinstance(cap.module, nn.LayerNorm):
                parts.append(self._layer_norm(cap))
            else:
                parts.append(self._token(cap))
        for p in self.params:
            p.grad = None
        if not parts:
            self.reset()
            for p in self.params:
                p.grad = torch.zeros_like(p)
            return torch.zeros(0)
        norms = torch.stack([sq for sq, _ in parts]).sum(0).sqrt() * scale
        factor = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        for sq, write in parts:
            write((factor * scale).to(sq.dtype))  # clip(scale g_i) = (factor_i scale) g_i
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.reset()
        return norms


def bookkeeping_optimizer(optimizer: torch.optim.Optimizer, clipper: BookkeepingClipper, *,
                          noise_multiplier: float, expected_batch_size: int,
                          generator: torch.Generator | None = None, secure_mode: bool = False) -> Any:
    """Opacus' ``DPOptimizerFastGradientClipping`` fed by ``clipper``: ``step()`` clips, noises, scales, steps.

    Two copies Opacus makes are skipped because the clipper writes a fresh ``p.grad`` every step: the deep
    copy of ``p.grad`` into ``summed_grad``, and (outside Opacus' secure mode) the separate noise tensor,
    which is drawn straight into the clipped sum (same distribution: ``N(0, (sigma C)^2)`` per coordinate).
    The optimizer has a ``clipper`` attribute.
    """
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class BookkeepingDPOptimizer(DPOptimizerFastGradientClipping):  # type: ignore[misc]  # opacus is untyped
        def pre_step(self, closure: Any = None) -> Any:
            clipper.clip_and_sum()
            return super().pre_step(closure)

        def accumulate(self) -> None:
            for p in self.params:
                if p.summed_grad is not None:
                    p.summed_grad.add_(p.grad.data)
                else:
                    p.summed_grad = p.grad.data

        def add_noise(self) -> None:
            if self.secure_mode:
                super().add_noise()
                return
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)  # Opacus' guard: zero_grad() between steps
                noise = torch.empty_like(p.summed_grad).normal_(0.0, std, generator=self.generator)
                p.grad = noise.add_(p.summed_grad).view_as(p)
                _mark_as_processed(p.summed_grad)

    dp_optimizer = BookkeepingDPOptimizer(optimizer, noise_multiplier=noise_multiplier,
                                          max_grad_norm=clipper.max_grad_norm,
                                          expected_batch_size=expected_batch_size, loss_reduction="mean",
                                          generator=generator, secure_mode=secure_mode)
    dp_optimizer.clipper = clipper
    return dp_optimizer


def make_private_bookkeeping(engine: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                             loader: torch.utils.data.DataLoader[Any], *, noise_multiplier: float,
                             max_grad_norm: float, noise_generator: torch.Generator | None = None,
                             mode: Mode = "mixed") -> tuple[nn.Module, Any, Any]:
    """Opacus' ``PrivacyEngine.make_private`` with book-keeping clipping instead of per-sample gradients.

    Same Poisson loader, noise (``DPOptimizerFastGradientClipping``: ``N(0, (sigma C)^2)`` on the clipped
    sum, divided by the expected batch) and accountant hook as Opacus; the model is returned unwrapped with
    the clipper's hooks attached (its state dict keys do not change).

    Args:
        engine: an ``opacus.PrivacyEngine`` (its accountant records the steps).
        model, optimizer, loader: the non-private ones; ``loader.generator`` seeds the Poisson sampler.
        noise_multiplier, max_grad_norm: sigma and C.
        noise_generator: the noise's generator (``None``: Opacus' default).
        mode: see :class:`BookkeepingClipper`.

    Returns:
        ``(model, dp_optimizer, dp_loader)`` as ``engine.make_private`` returns them.
    """
    from opacus.data_loader import DPDataLoader

    clipper = BookkeepingClipper(model, max_grad_norm, mode=mode)
    dp_loader = DPDataLoader.from_data_loader(loader, generator=loader.generator)
    sample_rate = 1 / len(dp_loader)
    expected_batch_size = int(len(dp_loader.dataset) * sample_rate)

    dp_optimizer = bookkeeping_optimizer(optimizer, clipper, noise_multiplier=noise_multiplier,
                                         expected_batch_size=expected_batch_size, generator=noise_generator,
                                         secure_mode=engine.secure_mode)
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return model, dp_optimizer, dp_loader
