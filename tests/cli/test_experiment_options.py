"""`lungmae experiment` options: a phantom draw other than the default, and refusals of what makes no sense."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungmae_cli.main import main


@pytest.mark.parametrize(("argv", "says"), [
    (["--data-seed", "-1"], "--data-seed must be 0 or more; got -1"),
    (["--data-seed", "1", "--site", "a/site.yaml"], "--data-seed draws built-in phantoms"),
    (["--quick", "--profile", "tiny"], "contradict each other"),
])
def test_contradictory_or_out_of_range_options_are_refused_before_any_work(
        argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "--out", str(tmp_path / "out"), *argv]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_another_data_seed_draws_other_patients(tmp_path: Path) -> None:
    from lungmae_core.experiment.data import PhantomPlan, build_phantom_sites

    plan = PhantomPlan(labelled_sites=1, unlabelled_sites=0, k_max=1, test_per_class=0, heldout_per_class=0,
                       size=24, shape_scale=0.3)
    first = build_phantom_sites(plan, tmp_path, workers=1)
    again = build_phantom_sites(plan, tmp_path, workers=1)
    other = build_phantom_sites(PhantomPlan(**{**plan.__dict__, "data_seed": 1}), tmp_path, workers=1)
    assert (first.sites[0].images == again.sites[0].images).all()
    assert not (first.sites[0].images == other.sites[0].images).all()
    assert list(first.sites[0].labels) == list(other.sites[0].labels)  # the same classes, other patients


def test_a_site_without_a_cache_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("site: {name: a}\ndata: {input: dicom}\n")
    assert main(["experiment", "--profile", "tiny", "--out", str(tmp_path / "out"), "--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert f"{site}: data: 'cache' is not set" in err and "lungmae site prepare --config" in err
