"""``site.yaml``: everything one hospital configures, validated into frozen dataclasses.

Sections (kebab-case keys; unknown keys are errors naming the file, the key and the allowed keys)::

    site:        name, seed
    data:        input, labels, cache, workers, min-slices, spacing-tolerance, irregular-spacing,
                 max-gap-factor, axial-tolerance-deg, tilt-tolerance-mm, secret-file
    preprocess:  the keys of lungmae_core.preprocess.PreprocessConfig (size, margin-voxels, ...)
    training:    device, max-local-epochs, batch-size, num-workers
    privacy:     enabled, epsilon, delta, max-grad-norm, noise-multiplier, target-epsilon-per-round, ledger,
                 grad-sample-mode, pretrain-max-grad-norm
    connection:  superlink, root-certificates, auth-key, node-port, metrics-port
    pacs:        url, since, folder, timeout-s, retries, username, password-file, ca-certificates
                 (client.pacs_config; read by `lungmae site pull`)

Relative paths are relative to the folder of the YAML file, so a site folder can be moved as a whole.
None of these values ever leaves the site: the federation only sees weights and aggregate metrics.

Examples:
    >>> cfg = load_site_config("site0/site.yaml")                   # doctest: +SKIP
    >>> cfg.site.name, cfg.data.cache, cfg.preprocess.size          # doctest: +SKIP
    ('site0', PosixPath('/data/site0/cache'), 64)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from client.pacs_config import PacsSection
from lungmae_core.atomic import atomic_write_text
from lungmae_core.config import check, from_mapping, load_yaml, to_mapping
from lungmae_core.dicom import SeriesRules
from lungmae_core.errors import SiteConfigError
from lungmae_core.preprocess import PreprocessConfig
from lungmae_core.privacy import DPConfig

__all__ = [
    "SiteSection",
    "DataSection",
    "TrainingSection",
    "PrivacySection",
    "ConnectionSection",
    "SiteConfig",
    "load_site_config",
    "site_config_from_mapping",
    "write_site_config",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check(condition: bool, message: str) -> None:
    check(condition, message, SiteConfigError)


@dataclasses.dataclass(frozen=True)
class SiteSection:
    """``site``: who this hospital is in the federation.

    Args:
        name: short site name (letters, digits, ``_ . -``; at most 64), shown in the coordinator's report.
        seed: seed for this site's splits and local training randomness. Defaults to 0.
    """

    name: str = "site"
    seed: int = 0

    def __post_init__(self) -> None:
        _check(bool(_NAME.match(self.name)), f"'name' must be 1-64 letters, digits, '_', '.' or '-' starting "
                                             f"with a letter or digit; got {self.name!r}")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """``data``: where the images are, how they are checked, and where the cache goes.

    Args:
        input: folder with the DICOM export and/or NIfTI files. Required for ``site prepare``.
        labels: labels CSV (``patient_id,label``); None for a site without labels (pretraining only).
        cache: folder of the preprocessed cache (samples, manifest.csv, datacard.json).
        workers: processes preparing series in parallel. Defaults to 2.
        min-slices: fewest slices of an acceptable series. Defaults to 32.
        spacing-tolerance: relative deviation of a slice gap from the median still counted uniform. Defaults to 0.1.
        irregular-spacing: ``resample`` (when safe) or ``reject`` for missing slices / uneven spacing.
        max-gap-factor: largest gap, in median gaps, that resampling may bridge. Defaults to 2.0.
        axial-tolerance-deg: largest tilt of the slice normal from the head-foot axis. Defaults to 5.
        tilt-tolerance-mm: largest sideways drift of slice positions (gantry tilt). Defaults to 1.
        secret-file: HMAC key for pseudonyms; defaults to ``<cache>/site-secret.key``.
    """

    input: Path | None = None
    labels: Path | None = None
    cache: Path | None = None
    workers: int = 2
    min_slices: int = 32
    spacing_tolerance: float = 0.1
    irregular_spacing: Literal["resample", "reject"] = "resample"
    max_gap_factor: float = 2.0
    axial_tolerance_deg: float = 5.0
    tilt_tolerance_mm: float = 1.0
    secret_file: Path | None = None

    def __post_init__(self) -> None:
        _check(1 <= self.workers <= 256, f"'workers' must be in [1, 256]; got {self.workers}")
        _check(self.min_slices >= 2, f"'min-slices' must be at least 2; got {self.min_slices}")
        _check(0.0 < self.spacing_tolerance < 1.0,
               f"'spacing-tolerance' must be in (0, 1) (a fraction of the slice spacing); got {self.spacing_tolerance}")
        _check(self.max_gap_factor >= 1.0, f"'max-gap-factor' must be at least 1; got {self.max_gap_factor}")
        _check(0.0 <= self.axial_tolerance_deg < 90.0,
               f"'axial-tolerance-deg' must be in [0, 90); got {self.axial_tolerance_deg}")
        _check(self.tilt_tolerance_mm >= 0.0, f"'tilt-tolerance-mm' must be >= 0; got {self.tilt_tolerance_mm}")

    def series_rules(self) -> SeriesRules:
        """The DICOM eligibility rules these settings describe."""
        return SeriesRules(min_slices=self.min_slices, spacing_tolerance=self.spacing_tolerance,
                           irregular_spacing=self.irregular_spacing, max_gap_factor=self.max_gap_factor,
                           axial_tolerance_deg=self.axial_tolerance_deg, tilt_tolerance_mm=self.tilt_tolerance_mm)

    def secret_path(self) -> Path | None:
        """The pseudonym key file: ``secret-file``, else ``<cache>/site-secret.key`` (None without a cache)."""
        if self.secret_file is not None:
            return self.secret_file
        return None if self.cache is None else self.cache / "site-secret.key"


@dataclasses.dataclass(frozen=True)
class TrainingSection:
    """``training``: local compute limits of this site.

    Args:
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. Defaults to ``auto``.
        max-local-epochs: cap on the local epochs the server may ask for per round. Defaults to 5.
        batch-size: local batch size (memory bound of this site's GPU). Defaults to 2.
        num-workers: DataLoader worker processes. Defaults to 0.
    """

    device: str = "auto"
    max_local_epochs: int = 5
    batch_size: int = 2
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device)),
               f"'device' must be one of 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'; got {self.device!r}")
        _check(self.max_local_epochs >= 1, f"'max-local-epochs' must be at least 1; got {self.max_local_epochs}")
        _check(self.batch_size >= 1, f"'batch-size' must be at least 1; got {self.batch_size}")
        _check(self.num_workers >= 0, f"'num-workers' must be >= 0; got {self.num_workers}")


#: ``privacy``: this site's DP-SGD settings and total budget. The privacy area owns its keys and validation
#: (``lungmae_core.privacy.DPConfig``: enabled, epsilon, delta, max-grad-norm, pretrain-max-grad-norm,
#: noise-multiplier, target-epsilon-per-round, ledger, grad-sample-mode); with ``enabled: true``, ``epsilon``
#: and one of ``noise-multiplier`` / ``target-epsilon-per-round`` are required, ``delta`` defaults to 1 / (10 N) for the
#: site's N scans, and ``ledger`` to ``<cache>/privacy-ledger.json``.
PrivacySection = DPConfig


@dataclasses.dataclass(frozen=True)
class ConnectionSection:
    """``connection``: how this site's SuperNode reaches the coordinator.

    Args:
        superlink: ``host:port`` of the coordinator's SuperLink Fleet API. Defaults to ``127.0.0.1:9092``.
        root-certificates: CA certificate (PEM) for TLS; None means insecure (tests and simulation only).
        auth-key: this site's private key for SuperNode authentication; None disables authentication.
        node-port: local ClientAppIO port of the SuperNode. Defaults to 9094.
        metrics-port: local port for this site's Prometheus metrics; None disables them.
    """

    superlink: str = "127.0.0.1:9092"
    root_certificates: Path | None = None
    auth_key: Path | None = None
    node_port: int = 9094
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):\d{1,5}", self.superlink)),
               f"'superlink' must be 'host:port' (e.g. 'coordinator.example.org:9092'); got {self.superlink!r}")
        _check(0 < int(self.superlink.rsplit(":", 1)[1]) < 65536,
               f"'superlink' port must be in [1, 65535]; got {self.superlink!r}")
        _check(0 < self.node_port < 65536, f"'node-port' must be in [1, 65535]; got {self.node_port}")
        _check(self.metrics_port is None or 0 < self.metrics_port < 65536,
               f"'metrics-port' must be in [1, 65535] or null; got {self.metrics_port}")


@dataclasses.dataclass(frozen=True)
class SiteConfig:
    """A whole ``site.yaml``; see the module docstring for the sections."""

    site: SiteSection = dataclasses.field(default_factory=SiteSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    training: TrainingSection = dataclasses.field(default_factory=TrainingSection)
    privacy: PrivacySection = dataclasses.field(default_factory=PrivacySection)
    connection: ConnectionSection = dataclasses.field(default_factory=ConnectionSection)
    pacs: PacsSection = dataclasses.field(default_factory=PacsSection)
    source: str = dataclasses.field(default="site.yaml", compare=False)

    def with_data(self, **changes: Any) -> SiteConfig:
        """A copy with some ``data`` fields replaced (command-line overrides such as ``--input``)."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **changes))


def require_model_window(cfg: SiteConfig) -> None:
    """Refuse a site whose cubes are windowed otherwise than the federation's models read them.

    The models take HU windowed to [-1000, 200] and scaled to [0, 1] (PAPER.md); the ``tiny`` encoder's
    HU-window ramps turn the cube back into HU with that window. A site whose ``preprocess`` says otherwise
    would train on cubes that mean something else to the model, silently.

    Raises:
        SiteConfigError: naming the keys, their values and the fix.
    """
    from lungmae_core.config import INPUT_HU_MAX, INPUT_HU_MIN

    window = (cfg.preprocess.hu_min, cfg.preprocess.hu_max)
    if window != (INPUT_HU_MIN, INPUT_HU_MAX):
        raise SiteConfigError(
            f"{cfg.source}: preprocess hu-min/hu-max are {window[0]:g}/{window[1]:g}, but the federation's models "
            f"read cubes windowed to {INPUT_HU_MIN:g}/{INPUT_HU_MAX:g} HU (PAPER.md); set hu-min: {INPUT_HU_MIN:g} "
            f"and hu-max: {INPUT_HU_MAX:g}, then run `lungmae site prepare` again")


_SECTIONS: dict[str, type] = {
    "site": SiteSection,
    "data": DataSection,
    "preprocess": PreprocessConfig,
    "training": TrainingSection,
    "privacy": PrivacySection,
    "connection": ConnectionSection,
    "pacs": PacsSection,
}
_PATH_KEYS = {"data": ("input", "labels", "cache", "secret_file"), "privacy": ("ledger",),
              "connection": ("root_certificates", "auth_key"),
              "pacs": ("password_file", "ca_certificates")}


def _resolve(section: Any, name: str, base_dir: Path) -> Any:
    changes = {}
    for key in _PATH_KEYS.get(name, ()):
        value = getattr(section, key)
        if value is not None and not value.is_absolute():
            changes[key] = (base_dir / value).resolve()
    return dataclasses.replace(section, **changes) if changes else section


def site_config_from_mapping(mapping: Mapping[str, Any] | None, *, source: str = "site.yaml",
                             base_dir: str | os.PathLike[str] | None = None) -> SiteConfig:
    """Validate a ``site.yaml``-shaped mapping.

    Args:
        mapping: ``{section: {key: value}}``; missing sections take their defaults.
        source: quoted in errors (the file name).
        base_dir: folder that relative paths are relative to; the current directory when None.

    Raises:
        SiteConfigError: naming ``source``, the section and key, and the allowed keys or values.
    """
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, Mapping):
        raise SiteConfigError(f"{source} must hold a mapping of sections; got {type(mapping).__name__}")
    unknown = [k for k in mapping if str(k).replace("_", "-") not in _SECTIONS]
    if unknown:
        raise SiteConfigError(f"{source}: '{unknown[0]}' is not a known section; allowed sections: "
                              f"{', '.join(_SECTIONS)}")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    sections = {}
    for name, cls in _SECTIONS.items():
        raw = mapping.get(name)
        if raw is None and name in mapping:
            raw = {}
        section = from_mapping(cls, raw, source=f"{source}: '{name}'", error=SiteConfigError)
        sections[name] = _resolve(section, name, base)
    return SiteConfig(**sections, source=source)


def load_site_config(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and validate ``site.yaml``; relative paths are taken relative to its folder.

    Raises:
        SiteConfigError: if the file is missing, not YAML, or any key or value is invalid (the message names
            the file, the section, the key and what is allowed).
    """
    path = Path(path)
    return site_config_from_mapping(load_yaml(path, error=SiteConfigError), source=str(path),
                                    base_dir=path.resolve().parent)


def _relative(value: Any, base: Path) -> Any:
    if isinstance(value, str) and os.path.isabs(value):
        try:
            return os.path.relpath(value, base)
        except ValueError:  # another drive on Windows
            return value
    return value


def write_site_config(cfg: SiteConfig, path: str | os.PathLike[str], *, relative_paths: bool = True) -> Path:
    """Write ``cfg`` as YAML atomically; paths become relative to the file's folder when ``relative_paths``.

    Returns:
        The written path.
    """
    path = Path(path)
    base = path.resolve().parent
    data: dict[str, Any] = {}
    for name in _SECTIONS:
        section = to_mapping(getattr(cfg, name))
        if relative_paths:
            section = {k: _relative(v, base) if k.replace("-", "_") in _PATH_KEYS.get(name, ()) else v
                       for k, v in section.items()}
        data[name] = section
    text = (f"# LungMAE-FL site configuration ({cfg.site.name}); relative paths are relative to this file.\n"
            + yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    atomic_write_text(path, text)
    return path
