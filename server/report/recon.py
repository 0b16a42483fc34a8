"""MAE reconstructions for the report, computed at the server on a synthetic phantom (never on hospital data).

Scans of a hospital never leave it, so the report cannot show how the MAE reconstructs *their* CT. Instead
the server generates a built-in phantom (``lungmae_core.synthetic.phantoms``), preprocesses it exactly as a site
would (``lungmae_core.preprocess``), masks it with the run's mask ratio and runs the last pretrain
checkpoint of the run on it. The figure shows input, masked input and reconstruction in three orthogonal
slices, and the same masked L1 the sites report (``evaluate_mae``), next to the trivial "average patch"
predictor's, on one phantom per class.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from lungmae_core.errors import LungMAEError
from server.report import plots
from server.report.data import Reconstruction, RunRecord, norm_key

if TYPE_CHECKING:
    from torch.utils.data import Dataset

__all__ = ["find_mae_checkpoint", "load_mae", "phantom_samples", "lung_centre", "reconstruct",
           "phantom_reconstruction"]

logger = logging.getLogger(__name__)

#: The phantom shown: a fibrotic chest has visible structure in every slice. Fixed so reports compare.
PHANTOM_LABEL = "fibrosis"
PHANTOM_SEED = 20250806
MAE_LATEST = "mae-latest.pt"  # server/checkpoints.py keeps the newest pretrain checkpoint under this name


def _load(path: Path) -> Any:
    # weights_only: a checkpoint holds tensors and plain values; never unpickle arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_mae_state(state: Mapping[str, Any]) -> bool:
    return any(str(k).startswith("decoder.") for k in state) and any(str(k).startswith("encoder.") for k in state)


def _checkpoint_parts(obj: Any) -> tuple[Mapping[str, Any], Mapping[str, Any] | None, str, int | None] | None:
    """(state dict, model args, phase, server round) of a loaded checkpoint, or None if it is not one.

    The server's checkpoints (``server/checkpoints.py``) are ``{"weights", "phase", "server_round",
    "model_args", ...}``; ``model_args`` holds the ``ModelConfig`` mapping (flat or under ``"model"``).
    """
    if not isinstance(obj, Mapping):
        return None
    state = next((obj[k] for k in ("weights", "model", "state_dict") if isinstance(obj.get(k), Mapping)), None)
    if state is None:
        return None
    args = obj.get("model_args", obj.get("model_config"))
    phase = str(obj.get("phase", ""))
    server_round = obj.get("server_round", obj.get("round"))
    return (state, args if isinstance(args, Mapping) else None, phase,
            server_round if isinstance(server_round, int) and not isinstance(server_round, bool) else None)


def find_mae_checkpoint(run: RunRecord) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in the run that holds the MAE (encoder and decoder), loaded.

    ``checkpoints/mae-latest.pt`` (the newest pretrain checkpoint, which the server keeps through pruning)
    is tried first; then the step files from the newest back, stopping at the first MAE state dict (after
    the hand-off they hold the classifier).

    Returns:
        ``(path, checkpoint mapping)`` or ``None`` when no checkpoint holds an MAE.
    """
    files = list(reversed(run.checkpoints))
    files.sort(key=lambda p: 0 if p.name == MAE_LATEST else 1)  # stable sort: newest step first after it
    for path in files:
        if path.suffix not in (".pt", ".pth", ".ckpt"):
            continue
        try:
            obj = _load(path)
        except Exception as exc:  # a corrupt or foreign file: say so and keep looking
            logger.warning("Skipping checkpoint %s as it cannot be loaded: %s", path.name, exc)
            continue
        parts = _checkpoint_parts(obj)
        if parts is not None and _is_mae_state(parts[0]):
            return path, dict(obj)
    return None


def _model_config_mapping(args: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ModelConfig`` fields of a checkpoint's ``model_args`` (extra entries such as ``num_classes`` dropped)."""
    from lungmae_core.config import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in ("model", "model_config", "config"):
        if isinstance(args.get(key), Mapping):
            args = args[key]
            break
    return {k: v for k, v in args.items() if norm_key(k) in fields}


def load_mae(checkpoint: Mapping[str, Any], run_config: Mapping[str, Any]) -> tuple[torch.nn.Module, Any, int | None]:
    """Rebuild the MAE of a checkpoint: architecture from its ``model_args`` (else the run config), weights loaded.

    Returns:
        ``(model in eval mode, ModelConfig, server round or None)``.

    Raises:
        ConfigError: the checkpoint's model args are not a valid ``ModelConfig``.
        WeightsMismatchError / RuntimeError: the weights do not fit that architecture.
    """
    from lungmae_core.config import ModelConfig, from_mapping, model_config
    from lungmae_core.model import build_mae

    parts = _checkpoint_parts(checkpoint)
    assert parts is not None
    state, args, _, server_round = parts
    if args is not None and _model_config_mapping(args):
        cfg = from_mapping(ModelConfig, _model_config_mapping(args), source="checkpoint 'model_args'")
    elif isinstance(run_config.get("model_config"), Mapping):  # what the runner writes to run_config.json
        cfg = from_mapping(ModelConfig, _model_config_mapping(run_config["model_config"]),
                           source="run_config.json 'model_config'")
    else:
        federation = run_config.get("federation", run_config)
        model = federation.get("model", "tiny") if isinstance(federation, Mapping) else "tiny"
        cfg = model_config(model.get("name", "tiny") if isinstance(model, Mapping) else str(model))
    mae = build_mae(cfg)
    tensors = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in state.items()}
    mae.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=True)
    mae.eval()
    return mae, cfg, server_round


def phantom_samples(img_size: int, *, seed: int = PHANTOM_SEED) -> list[dict[str, torch.Tensor]]:
    """One synthetic chest CT per class, preprocessed as a site would, the shown label first.

    Each comes from a different simulated scanner (``scanner_for_site(i)``), so the set has some of the
    variety of a federation. Items are dataset items as ``evaluate_mae`` takes them:
    ``{"image": (1, S, S, S) float32 in [0, 1], "lung_mask": (1, S, S, S) float32 0/1}``.
    """
    from lungmae_core.config import PreprocessConfig
    from lungmae_core.preprocess import preprocess_volume
    from lungmae_core.synthetic.phantoms import PHANTOM_CLASSES, generate_phantom
    from lungmae_core.synthetic.scanners import scanner_for_site

    labels = [PHANTOM_LABEL] + [c for c in PHANTOM_CLASSES if c != PHANTOM_LABEL]
    items = []
    for i, label in enumerate(labels):
        scanner = scanner_for_site(i)
        # Acquire at about twice the output resolution, not more: same anatomy and field of view, and a
        # 32^3 model's phantoms take 0.2 s instead of 1.5 s each.
        scale = min(1.0, 2.0 * img_size / max(scanner.shape))
        shape = tuple(max(32, round(n * scale)) for n in scanner.shape)
        phantom = generate_phantom(label, seed=seed + i, scanner=scanner, shape=shape)
        cfg = PreprocessConfig(size=img_size)  # the crop margin is in mm: the same whatever the grid
        sample = preprocess_volume(phantom.to_volume(), cfg)
        items.append({"image": torch.from_numpy(np.asarray(sample.image, dtype=np.float32)),
                      "lung_mask": torch.from_numpy(np.asarray(sample.lung_mask, dtype=np.float32))})
    return items


def lung_centre(lung: np.ndarray) -> tuple[int, int, int]:
    """For each axis of a ``(D, H, W)`` lung mask, the plane with the most lung: slices that show the lungs.

    (The volume's centre would put the sagittal plane through the mediastinum, between the lungs.)
    """
    assert lung.ndim == 3, lung.shape
    if not lung.any():
        return lung.shape[0] // 2, lung.shape[1] // 2, lung.shape[2] // 2
    d, h, w = (int(np.argmax(lung.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3))
    return d, h, w


def reconstruct(mae: Any, image: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mask ``image`` with the model's mask ratio, run the MAE, and paste its predictions into the masked patches.

    Args:
        mae: an ``MAE3D`` in eval mode.
        image: ``(S, S, S)`` float32 in [0, 1] (HU window [-1000, 200]).
        seed: seeds the random mask, so a report renders the same twice.

    Returns:
        ``masked (S, S, S)`` with NaN in the masked patches, and ``reconstruction (S, S, S)``: visible
        patches from the input, masked ones as predicted (clipped to [0, 1]).
    """
    imgs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]  # (1, 1, S, S, S)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pred, mask = mae(imgs, generator=generator)  # (1, L, P), (1, L) 0 keep / 1 masked
        target = mae.patchify(imgs)  # (1, L, P)
        hidden = mask[..., None].bool()  # (1, L, 1)
        recon = mae.unpatchify(torch.where(hidden, pred.clamp(0.0, 1.0), target))[0, 0]  # (S, S, S)
        masked = mae.unpatchify(target.masked_fill(hidden, float("nan")))[0, 0]  # (S, S, S)
    return masked.numpy(), recon.numpy()


def phantom_reconstruction(run: RunRecord, *, seed: int = 0) -> tuple[Reconstruction | None, str]:
    """The report's reconstruction figure and phantom metrics, or ``None`` and the sentence saying why.

    The metrics are ``evaluate_mae``'s on the phantom set (one phantom per class): the MAE's masked L1 next
    to the "average patch" predictor's, computed exactly as the sites compute theirs.

    Never raises for a run that simply lacks an MAE checkpoint (e.g. a run stopped before its first
    pretrain round); a checkpoint that exists but does not load is named (file name only) in the sentence.
    """
    from lungmae_core.train import evaluate_mae

    found = find_mae_checkpoint(run)
    if found is None:
        return None, ("The run directory holds no checkpoint with the MAE (encoder and decoder), so no "
                      "reconstruction can be shown; the server keeps one after each pretrain round.")
    path, checkpoint = found
    try:
        mae, cfg, server_round = load_mae(checkpoint, run.run_config)
    except Exception as exc:  # the page must still render; say what went wrong
        logger.warning("Unable to rebuild the MAE from %s: %s", path, exc)
        return None, (f"The MAE checkpoint {path.name} could not be rebuilt ({type(exc).__name__}), so no "
                      "reconstruction is shown.")
    try:
        items = phantom_samples(cfg.img_size)
    except LungMAEError as exc:  # e.g. a cube too small for the classical lung mask of the phantom
        logger.warning("Unable to prepare the phantoms at %d^3: %s", cfg.img_size, exc)
        return None, (f"The synthetic phantoms could not be preprocessed to {cfg.img_size}^3 "
                      f"({type(exc).__name__}: {exc}), so no reconstruction is shown.")
    masked, recon = reconstruct(mae, items[0]["image"][0].numpy(), seed=seed)
    # a list is a map-style dataset as far as the DataLoader goes (len and indexing)
    metrics = evaluate_mae(mae, cast("Dataset[Any]", items), device="cpu", seed=seed, batch_size=len(items))
    when = f"after server round {server_round}" if server_round is not None else f"from {path.name}"
    uri = plots.reconstruction_figure(items[0]["image"][0].numpy(), masked, recon,
                                      title=f"synthetic {PHANTOM_LABEL} phantom, MAE {when}",
                                      centre=lung_centre(items[0]["lung_mask"][0].numpy()))
    text = (f"A synthetic chest CT ({PHANTOM_LABEL} phantom) preprocessed to {cfg.img_size}^3 as at a site; "
            f"{round(cfg.mask_ratio * 100)}% of its {cfg.num_patches} patches of {cfg.patch_size}^3 voxels are "
            f"masked (orange) and predicted by the MAE {when} (model {cfg.name}). Axial, coronal and sagittal "
            f"slices through the lungs, window [-1000, 200] HU. The phantom row of the table below scores the same MAE "
            f"on {len(items)} phantoms, one per class.")
    return Reconstruction(figure_uri=uri, metrics={k: float(v) for k, v in metrics.items()},
                          description=text), ""
