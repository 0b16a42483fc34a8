"""`lungmae synth`: write synthetic hospitals (DICOM trees of chest CT phantoms, labels.csv, site.yaml).

Each site ``DIR/site<i>/`` gets a DICOM export (``dicom/``) as its scanner profile would write it, with a
scout per study, a dose screen and a stray text file mixed in, a ``labels.csv`` and a ready ``site.yaml``
whose ``data`` section points at them (cache in ``DIR/site<i>/cache``). Then, per site::

    lungmae site prepare --config DIR/site0/site.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae synth`."""
    parser.add_argument("--out", type=Path, required=True, help="output folder; one sub-folder per site")
    parser.add_argument("--sites", type=int, default=3, help="number of hospitals (3)")
    parser.add_argument("--scans-per-site", type=int, default=12, help="patients (one CT study each) per site (12)")
    parser.add_argument("--seed", type=int, default=0, help="seed: same arguments, same files, UIDs included (0)")
    parser.add_argument("--slices", type=int, default=None,
                        help="slices per series (default: the site's scanner, about 100)")
    parser.add_argument("--matrix", type=int, default=None,
                        help="rows = columns per slice (default: the site's scanner, about 160)")
    parser.add_argument("--labelled-fraction", type=parse_fractions, default=(1.0,), metavar="F[,F...]",
                        help="fraction of patients listed in labels.csv: one value for every site or one per "
                             "site, comma-separated (1.0)")
    parser.add_argument("--unlabelled-sites", type=int, default=0,
                        help="extra hospitals with no labels at all (an empty labels.csv): they take part in "
                             "MAE pretraining only (0)")
    parser.add_argument("--preprocess-size", type=int, default=64,
                        help="cube side written to site.yaml 'preprocess: size' (64 for the tiny model; paper 128)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating phantoms (2)")


def parse_fractions(text: str) -> tuple[float, ...]:
    """``"0.5"`` or ``"1,0.25,0"`` -> a tuple of floats (argparse type of ``--labelled-fraction``)."""
    try:
        return tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or comma-separated numbers in [0, 1]; got {text!r}") from None


def site_fractions(labelled_fraction: float | Sequence[float], sites: int, unlabelled_sites: int = 0) -> list[float]:
    """One labelled fraction per site: the labelled sites' (one value for all, or one each), then 0s.

    Raises:
        ConfigError: for a list whose length is neither 1 nor ``sites``, or a value outside [0, 1].
    """
    from lungmae_core.config import check

    values = [float(labelled_fraction)] if isinstance(labelled_fraction, (int, float)) else list(labelled_fraction)
    check(len(values) in (1, sites),
          f"--labelled-fraction needs one value or one per site ({sites}); got {len(values)}: {values}")
    for v in values:
        check(0.0 <= v <= 1.0, f"--labelled-fraction must be in [0, 1]; got {v}")
    check(unlabelled_sites >= 0, f"--unlabelled-sites must be >= 0; got {unlabelled_sites}")
    per_site = values * sites if len(values) == 1 else values
    return per_site + [0.0] * unlabelled_sites


def write_synthetic_sites(out: Path, *, sites: int, scans_per_site: int, seed: int = 0,
                          shape: Sequence[int] | None = None, labelled_fraction: float | Sequence[float] = 1.0,
                          unlabelled_sites: int = 0, preprocess_size: int = 64, workers: int = 2,
                          progress: bool = False) -> list[Path]:
    """Write ``sites`` (+ ``unlabelled_sites``) synthetic hospitals under ``out``; return their ``site.yaml`` paths.

    Args:
        out: output folder (``out/site<i>/``).
        sites: number of hospitals with labels.
        scans_per_site: patients per hospital.
        seed: run seed.
        shape: ``(D, H, W)`` per series; None keeps each scanner's default.
        labelled_fraction: fraction of patients in each labels.csv: one value, or one per labelled site.
        unlabelled_sites: extra hospitals (indices after the labelled ones) whose labels.csv is empty: they
            can pretrain the MAE but have nothing to fine-tune on.
        preprocess_size: ``preprocess: size`` of each site.yaml.
        workers: phantom-generating processes.
        progress: show tqdm bars.

    Raises:
        ConfigError: for a non-positive count or bad preprocessing size.
    """
    import dataclasses
    from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

    from client.site_config import DataSection, PolicySection, SiteConfig, SiteSection, write_site_config
    from lungmae_core.config import PreprocessConfig, check
    from lungmae_core.synthetic.dicom_writer import write_site

    check(sites >= 1, f"--sites must be at least 1; got {sites}")
    check(scans_per_site >= 1, f"--scans-per-site must be at least 1; got {scans_per_site}")
    fractions = site_fractions(labelled_fraction, sites, unlabelled_sites)
    check(workers >= 1, f"--workers must be at least 1; got {workers}")

    def one_site(index: int, pool: Executor | None) -> Path:
        root = Path(out) / f"site{index}"
        result = write_site(root, site_index=index, n_scans=scans_per_site, seed=seed, shape=shape,
                            labelled_fraction=fractions[index], workers=workers, progress=progress, pool=pool)
        cfg = SiteConfig(site=SiteSection(name=f"site{index}", seed=seed + index),
                         data=DataSection(input=result.dicom_dir.resolve(), labels=result.labels_csv.resolve(),
                                          cache=(root / "cache").resolve(), workers=workers,
                                          min_slices=min(32, shape[0] if shape else 32)),
                         preprocess=dataclasses.replace(PreprocessConfig(), size=preprocess_size),
                         # synthetic phantoms protect no patient: send per-class counts even for tiny splits, so
                         # the simulation's pooled metrics are exact (a hospital keeps the default of 10), and
                         # share a local model for the cross-site matrix (a hospital opts in itself)
                         policy=PolicySection(min_count=1, share_local_model=True))
        return write_site_config(cfg, root / "site.yaml")

    if workers == 1:
        return [one_site(index, None) for index in range(len(fractions))]
    # One process pool for every study of every site (one thread per site feeds it), so no core idles
    # between sites.
    with ProcessPoolExecutor(max_workers=workers) as pool, ThreadPoolExecutor(max_workers=len(fractions)) as feeders:
        paths = list(feeders.map(lambda index: one_site(index, pool), range(len(fractions))))
    return paths


def run(args: argparse.Namespace) -> int:
    """Write the sites and print where they are."""
    from lungmae_core.config import check
    from lungmae_core.synthetic.scanners import scanner_for_site

    shape = None
    if args.slices is not None or args.matrix is not None:
        base = scanner_for_site(0)
        shape = (args.slices or base.n_slices, args.matrix or base.matrix, args.matrix or base.matrix)
        check(min(shape) >= 16, f"--slices and --matrix must be at least 16; got {shape[0]} and {shape[1]}")
    paths = write_synthetic_sites(args.out, sites=args.sites, scans_per_site=args.scans_per_site, seed=args.seed,
                                  shape=shape, labelled_fraction=args.labelled_fraction,
                                  unlabelled_sites=args.unlabelled_sites, preprocess_size=args.preprocess_size,
                                  workers=args.workers, progress=True)
    fractions = site_fractions(args.labelled_fraction, args.sites, args.unlabelled_sites)
    for index, path in enumerate(paths):
        scanner = scanner_for_site(index)
        print(f"site{index}: {args.scans_per_site} studies ({fractions[index]:.0%} labelled), {scanner.manufacturer} "
              f"{scanner.model}, {scanner.patient_position}, {scanner.slice_thickness_mm:g} mm slices -> {path}")
    print(f"Next: lungmae site prepare --config {paths[0]}")
    return 0
