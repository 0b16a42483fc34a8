"""``site.yaml``: everything one hospital configures, validated into frozen dataclasses.

Sections (kebab-case keys; unknown keys are errors naming the file, the key and the allowed keys)::

    site:        name, seed, state-dir
    data:        input, labels, cache, workers, min-slices, spacing-tolerance, irregular-spacing,
                 max-gap-factor, axial-tolerance-deg, tilt-tolerance-mm, secret-file, classes, strict-labels
    preprocess:  the keys of lungmae_core.config.PreprocessConfig (size, margin-voxels, ...)
    training:    device, max-local-epochs, batch-size, num-workers
    privacy:     enabled, epsilon, delta, max-grad-norm, noise-multiplier, target-epsilon-per-round, ledger,
                 grad-sample-mode, pretrain-max-grad-norm, finetune-trainable
    connection:  superlink, root-certificates, auth-key, node-port, metrics-port
    trust:       trusted-keys, fab-sha256, client-certificate, client-key, audit-log
    policy:      allowed-models, max-parameters, max-image-size, max-batch-size, max-local-epochs,
                 max-rounds-per-run, evaluation-splits, min-count, max-evaluations-per-run
    pacs:        url, since, folder, timeout-s, retries, username, password-file, ca-certificates
                 (client.pacs_config; read by `lungmae site pull`)

The site's state that must outlive the cache (the privacy ledger and its journal, the pseudonym key) lives in
``site: state-dir``, by default a ``state`` folder beside site.yaml, never inside ``data: cache``: deleting or
rebuilding the cache must neither reset the privacy budget nor change the pseudonyms.

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
from lungmae_core.config import PreprocessConfig, check, from_mapping, load_yaml, to_mapping
from lungmae_core.contract import DEFAULT_CLASSES, ContractError, check_class_names
from lungmae_core.dicom import SeriesRules
from lungmae_core.errors import SiteConfigError
from lungmae_core.privacy import DPConfig

__all__ = [
    "SiteSection",
    "DataSection",
    "TrainingSection",
    "PrivacySection",
    "ConnectionSection",
    "PolicySection",
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
        state-dir: folder of the state that must survive the cache: the privacy ledger, its journal and the
            pseudonym key. Defaults to ``state`` beside site.yaml (for a mapping not read from a file:
            ``<cache>.state`` beside the cache); it must not be inside the cache.
    """

    name: str = "site"
    seed: int = 0
    state_dir: Path | None = None

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
        secret-file: HMAC key for pseudonyms; defaults to ``<state-dir>/site-secret.key``.
        classes: the federation's class list (names, in label order) that the labels CSV must use. Defaults to
            the built-in ``normal, ggo, fibrosis, emphysema``; a consortium with its own classes (UIP, NSIP, ...)
            gives every site the same list as in its ``federation.yaml``.
        strict-labels: refuse to prepare when the labels CSV names a class outside ``classes`` (default: those
            rows stay unlabelled and ``site prepare`` lists every unknown label with its count).
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
    classes: tuple[str, ...] = DEFAULT_CLASSES
    strict_labels: bool = False

    def __post_init__(self) -> None:
        try:
            check_class_names(self.classes, "'classes'")
        except ContractError as exc:
            raise SiteConfigError(str(exc)) from None
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
        """The pseudonym key file: ``secret-file`` (a loaded site.yaml fills in ``<state-dir>/site-secret.key``)."""
        return self.secret_file

    def legacy_secret_path(self) -> Path | None:
        """Where older versions kept the key (``<cache>/site-secret.key``), to carry it over once."""
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
#: noise-multiplier, target-epsilon-per-round, ledger, grad-sample-mode, finetune-trainable); with
#: ``enabled: true``, ``epsilon`` and one of ``noise-multiplier`` / ``target-epsilon-per-round`` are required,
#: ``delta`` defaults to min(1e-5, 1 / (10 N)) for the site's N patients, and ``ledger`` to
#: ``<state-dir>/privacy-ledger.json``.
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


def _builtin_models() -> tuple[str, ...]:
    from lungmae_core.config import MODEL_CONFIGS

    return tuple(MODEL_CONFIGS)


@dataclasses.dataclass(frozen=True)
class PolicySection:
    """``policy``: what this site agrees to do, whatever the coordinator asks (checked before any work).

    The coordinator's round config is a request; a request outside this policy is refused with a reply
    that names the key, and a line in the site's log. Defaults are safe for a hospital that reads nothing.

    Args:
        allowed_models: model config names the site builds. Defaults to the built-in configs.
        max_parameters: largest model (parameters of the MAE or classifier) the site builds. Defaults to 3e8.
        max_image_size: largest cube side (voxels) the site feeds a model. Defaults to 256.
        max_batch_size: largest batch the coordinator may ask for. Defaults to 64.
        max_local_epochs: most local epochs per round the coordinator may ask for (more is refused;
            ``training.max-local-epochs`` silently trims what is allowed). Defaults to 20.
        max_rounds_per_run: most training rounds the site serves in one run. Defaults to 200.
        evaluation_splits: splits the coordinator may ask to evaluate. Defaults to ``val`` and ``test``
            (``train`` only if the site opts in: evaluating on training scans is a membership oracle).
        min_count: a split with fewer scans gets no confusion matrix or score histogram (pooled
            figures only). Defaults to 10.
        max_evaluations_per_run: most evaluation requests the site serves in one run (the cross-site matrix's
            evaluations count too: one per model scored). Defaults to 100.
        share_local_model: whether the site fine-tunes a local copy of the final global classifier on its own
            train split and sends it (as an update) for the cross-site matrix, where every other site scores
            it on its test data. Off by default: a site that does not share still scores the others' models
            and the global one.
    """

    allowed_models: tuple[str, ...] = dataclasses.field(default_factory=_builtin_models)
    max_parameters: int = 300_000_000
    max_image_size: int = 256
    max_batch_size: int = 64
    max_local_epochs: int = 20
    max_rounds_per_run: int = 200
    evaluation_splits: tuple[str, ...] = ("val", "test")
    min_count: int = 10
    max_evaluations_per_run: int = 100
    share_local_model: bool = False

    def __post_init__(self) -> None:
        _check(len(self.allowed_models) >= 1, "'allowed-models' must name at least one model config")
        for key in ("max_parameters", "max_image_size", "max_batch_size", "max_local_epochs", "max_rounds_per_run",
                    "max_evaluations_per_run"):
            _check(getattr(self, key) >= 1, f"'{key.replace('_', '-')}' must be at least 1; got {getattr(self, key)}")
        _check(self.min_count >= 1, f"'min-count' must be at least 1; got {self.min_count}")
        bad = [s for s in self.evaluation_splits if s not in ("train", "val", "test")]
        _check(not bad, f"'evaluation-splits' must be among train, val, test; got {list(self.evaluation_splits)}")


@dataclasses.dataclass(frozen=True)
class TrustSection:
    """``trust``: which app bundles this site runs, the site's TLS client certificate, and its own audit log.

    Args:
        trusted-keys: Ed25519 public keys (PEM) whose signature on an app bundle (FAB) this site accepts,
            normally the consortium's ``signing/fab-signing.pub``.
        fab-sha256: SHA-256 (hex) of app bundles this site accepts even unsigned (an allow-list).
            With neither set, the site refuses every bundle (``client/fab_check.py``).
        client-certificate / client-key: this site's TLS client certificate and key (``lungmae certs --site``),
            presented to the coordinator's proxy (mutual TLS). Both or neither.
        audit-log: the site's own chained log. Defaults to ``<site: state-dir>/site-audit.jsonl``.
    """

    trusted_keys: tuple[Path, ...] = ()
    fab_sha256: tuple[str, ...] = ()
    client_certificate: Path | None = None
    client_key: Path | None = None
    audit_log: Path | None = None

    def __post_init__(self) -> None:
        for value in self.fab_sha256:
            _check(bool(re.fullmatch(r"[0-9a-f]{64}", str(value))),
                   f"'fab-sha256' entries must be 64 lower-case hex digits (sha256sum of the .fab); got {value!r}")
        _check((self.client_certificate is None) == (self.client_key is None),
               "'client-certificate' and 'client-key' must be given together (from `lungmae certs --site NAME`)")


@dataclasses.dataclass(frozen=True)
class SiteConfig:
    """A whole ``site.yaml``; see the module docstring for the sections."""

    site: SiteSection = dataclasses.field(default_factory=SiteSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    training: TrainingSection = dataclasses.field(default_factory=TrainingSection)
    privacy: PrivacySection = dataclasses.field(default_factory=PrivacySection)
    connection: ConnectionSection = dataclasses.field(default_factory=ConnectionSection)
    trust: TrustSection = dataclasses.field(default_factory=TrustSection)
    policy: PolicySection = dataclasses.field(default_factory=PolicySection)
    pacs: PacsSection = dataclasses.field(default_factory=PacsSection)
    source: str = dataclasses.field(default="site.yaml", compare=False)

    def with_data(self, **changes: Any) -> SiteConfig:
        """A copy with some ``data`` fields replaced (command-line overrides such as ``--input``)."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **changes))


def require_model_window(cfg: SiteConfig) -> None:
    """Refuse a site whose cubes are windowed otherwise than the federation's models read them.

    The models take HU windowed to [-1000, 200] and scaled to [0, 1] (docs/model.md); the ``tiny`` encoder's
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
            f"read cubes windowed to {INPUT_HU_MIN:g}/{INPUT_HU_MAX:g} HU (docs/model.md); "
            f"set hu-min: {INPUT_HU_MIN:g} and hu-max: {INPUT_HU_MAX:g}, then run `lungmae site prepare` again")


_SECTIONS: dict[str, type[Any]] = {
    "site": SiteSection,
    "data": DataSection,
    "preprocess": PreprocessConfig,
    "training": TrainingSection,
    "privacy": PrivacySection,
    "connection": ConnectionSection,
    "trust": TrustSection,
    "policy": PolicySection,
    "pacs": PacsSection,
}
_PATH_KEYS = {"site": ("state_dir",), "data": ("input", "labels", "cache", "secret_file"), "privacy": ("ledger",),
              "connection": ("root_certificates", "auth_key"),
              "trust": ("trusted_keys", "client_certificate", "client_key", "audit_log"),
              "pacs": ("password_file", "ca_certificates")}


def _resolve(section: Any, name: str, base_dir: Path) -> Any:
    changes = {}
    for key in _PATH_KEYS.get(name, ()):
        value = getattr(section, key)
        if isinstance(value, tuple):
            changes[key] = tuple(v if v.is_absolute() else (base_dir / v).resolve() for v in value)
        elif value is not None and not value.is_absolute():
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
    return SiteConfig(**_with_state_defaults(sections, Path(base_dir) if base_dir is not None else None, source),
                      source=source)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def _default_state_dir(base: Path | None, cache: Path | None) -> Path:
    """``<base>/state`` beside site.yaml; without a file, ``<cache>.state`` beside the cache (one per cache,
    never shared by two sites), else ``./state``."""
    if base is not None:
        return (base / "state").resolve()
    if cache is not None:
        return cache.parent / f"{cache.name}.state"
    return (Path.cwd() / "state").resolve()


def _with_state_defaults(sections: dict[str, Any], base: Path | None, source: str) -> dict[str, Any]:
    """Fill in ``state-dir``, the key file and the ledger inside it; refuse state inside the cache."""
    site, data, privacy = sections["site"], sections["data"], sections["privacy"]
    state = site.state_dir if site.state_dir is not None else _default_state_dir(base, data.cache)
    if data.cache is not None:
        for key, path in (("site: state-dir", state), ("data: secret-file", data.secret_file),
                          ("privacy: ledger", privacy.ledger)):
            _check(path is None or not _inside(path, data.cache),
                   f"{source}: '{key}' ({path}) is inside the cache {data.cache}; the privacy ledger and the "
                   "pseudonym key must survive deleting the cache, so keep them outside it (the default is a "
                   "'state' folder beside site.yaml)")
    sections["site"] = dataclasses.replace(site, state_dir=state)
    if data.secret_file is None:
        sections["data"] = dataclasses.replace(data, secret_file=state / "site-secret.key")
    if privacy.ledger is None:
        sections["privacy"] = dataclasses.replace(privacy, ledger=state / "privacy-ledger.json")
    return sections


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
