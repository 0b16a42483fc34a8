"""The experiment's two non-neural baselines: global lung-HU histogram and hand-made zone/texture features.

Both read the prepared cubes (``image (1, S, S, S)`` in [0, 1] = HU window [-1000, 200], ``lung_mask``) a site
already has, so they run on the built-in phantoms and on any prepared cache alike, and both feed a
multinomial logistic regression (:func:`fit_logistic`). They answer two questions about a dataset before any
network is trained:

- **Global histogram** (12 bins of lung HU in [-1000, -100], mean, std: 14 features): can the classes be told
  apart without looking at where anything is? On the basic phantoms it reaches 0.71-0.88 balanced accuracy;
  the experiment phantoms are built so that it stays near chance (the tests require <= 0.6).
- **Zone / texture** (dense and low-attenuation fractions in lower/middle/upper thirds and in the periphery vs
  the core; how blob-like the dense voxels are; cyst size and walls; fine-scale HU energy): is the signal
  there for an image model to find? The tests require >= 0.85 on the experiment phantoms.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from lungmae_core.config import INPUT_HU_MAX, INPUT_HU_MIN

__all__ = ["histogram_features", "zone_texture_features", "fit_logistic", "LogisticModel", "features_of"]

_HIST_EDGES = np.linspace(-1000.0, -100.0, 13)


def _lung_hu(image: np.ndarray, lung_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(HU cube, boolean lung mask)`` from a ``(1, S, S, S)`` sample."""
    hu = np.asarray(image, np.float32)[0] * (INPUT_HU_MAX - INPUT_HU_MIN) + INPUT_HU_MIN
    return hu, np.asarray(lung_mask)[0] > 0


def histogram_features(image: np.ndarray, lung_mask: np.ndarray) -> np.ndarray:
    """14 features: the lung-HU histogram (12 bins, fractions) plus mean and standard deviation (in 100 HU)."""
    hu, lung = _lung_hu(image, lung_mask)
    values = hu[lung]
    if values.size == 0:
        return np.zeros(14)
    hist = np.histogram(np.clip(values, -1000.0, -100.0), bins=_HIST_EDGES)[0] / values.size
    return np.concatenate([hist, [values.mean() / 100.0, values.std() / 100.0]])


def zone_texture_features(image: np.ndarray, lung_mask: np.ndarray) -> np.ndarray:
    """17 features of where dense and low-attenuation lung lies and what it looks like (see module doc)."""
    hu, lung = _lung_hu(image, lung_mask)
    if lung.sum() < 10:
        return np.zeros(17)
    median = float(np.median(hu[lung]))
    dense = lung & (hu > median + 150.0)
    low = lung & (hu < -920.0)
    # Zones: thirds of the lungs' height (axis 0 points superior) and periphery vs core (distance to the
    # lung boundary, relative to the scan's own largest distances).
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    rel = (np.arange(lung.shape[0]) - zs[0]) / max(zs[-1] - zs[0], 1)
    height = np.broadcast_to(rel[:, None, None], lung.shape)
    edt = ndimage.distance_transform_edt(lung)
    peripheral = lung & (edt <= max(np.percentile(edt[lung], 40), 1.0))
    zones = [lung & (height < 1 / 3), lung & (height >= 1 / 3) & (height < 2 / 3), lung & (height >= 2 / 3),
             peripheral, lung & ~peripheral]
    frac = [float(dense[z].mean()) if z.any() else 0.0 for z in zones]
    frac += [float(low[z].mean()) if z.any() else 0.0 for z in zones]
    # Texture: blob-like dense voxels have dense neighbours on all sides; walls and lines have fewer.
    neigh = ndimage.uniform_filter(dense.astype(np.float32), size=3)
    blobness = float(neigh[dense].mean()) if dense.any() else 0.0
    # Cysts: low components with a dense rim; air-trapping lobules are larger and rimless.
    labels, n_low = ndimage.label(low)
    mean_size = float(low.sum()) / max(n_low, 1)
    rim = ndimage.binary_dilation(low) & ~low
    rim_dense = float(dense[rim].mean()) if rim.any() else 0.0
    fine = hu - ndimage.gaussian_filter(hu, 1.0)
    energy = float(fine[lung].std()) / 100.0
    spread_dense = float(np.std(height[dense])) if dense.any() else 0.0
    return np.asarray(frac + [blobness, np.log1p(mean_size), rim_dense, energy, n_low / max(lung.sum(), 1) * 1e3,
                              spread_dense, float(dense.mean())], dtype=np.float64)


def features_of(kind: str, samples: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Feature matrix ``(N, F)`` of ``kind`` (``"histogram"`` or ``"zone-texture"``) for ``(image, mask)`` pairs."""
    fn = histogram_features if kind == "histogram" else zone_texture_features
    return np.stack([fn(image, mask) for image, mask in samples])


class LogisticModel:
    """A fitted multinomial logistic regression on standardised features (see :func:`fit_logistic`)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, K)``."""
        z = torch.as_tensor((np.asarray(x, np.float64) - self.mean) / self.std, dtype=torch.float64)
        return torch.softmax(z @ self.weight + self.bias, dim=1).numpy()


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, *, l2: float = 1.0) -> LogisticModel:
    """Class-balanced multinomial logistic regression with an L2 penalty, fitted to convergence by L-BFGS.

    Features are standardised on the training data; ``l2`` is the penalty on the weights per training
    example (sklearn's ``C = 1 / l2``). Deterministic: the same data give the same model.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.int64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    xt = torch.as_tensor((x - mean) / std, dtype=torch.float64)
    yt = torch.as_tensor(y)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    cw = torch.as_tensor(np.divide(len(y), num_classes * counts, out=np.zeros(num_classes), where=counts > 0))
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ weight + bias, yt, weight=cw)
        loss = loss + 0.5 * l2 * (weight ** 2).sum() / len(y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return LogisticModel(mean, std, weight.detach(), bias.detach())
