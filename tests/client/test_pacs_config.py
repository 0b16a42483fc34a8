"""The `pacs` section of site.yaml: defaults, relative paths, and an error naming the key for each bad value."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from client.pacs_config import PacsSection, parse_study_date
from client.pacs_pull import PacsError, PacsPuller, staging_dir
from client.site_config import load_site_config, site_config_from_mapping, write_site_config
from lungmae_core.errors import SiteConfigError


def test_defaults_and_relative_paths_resolve_against_the_yaml_folder(tmp_path: Path) -> None:
    assert site_config_from_mapping({}).pacs == PacsSection()
    (tmp_path / "site.yaml").write_text("pacs:\n  url: https://pacs.example.org/dicom-web\n  since: 2024-01-31\n"
                                        "  username: lungmae\n  password-file: secret/pw.txt\n"
                                        "  ca-certificates: ca.pem\n")
    cfg = load_site_config(tmp_path / "site.yaml")
    assert cfg.pacs.password_file == (tmp_path / "secret" / "pw.txt").resolve()
    assert cfg.pacs.ca_certificates == (tmp_path / "ca.pem").resolve()
    assert load_site_config(write_site_config(cfg, tmp_path / "copy.yaml")).pacs == cfg.pacs  # round trip


@pytest.mark.parametrize("pacs, message", [
    ({"url": "pacs.example.org"}, "'url' must be the DICOMweb root"),
    ({"since": "2024-13-01"}, "'since' must be a date as YYYY-MM-DD or YYYYMMDD; got '2024-13-01'"),
    ({"folder": "../elsewhere"}, "'folder' must be one folder name"),
    ({"timeout-s": 0}, "'timeout-s' must be in (0, 3600]"),
    ({"retries": 0}, "'retries' must be in [1, 10]"),
    ({"username": "x"}, "'username' and 'password-file' go together"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_values_name_the_key(pacs: dict, message: str) -> None:
    with pytest.raises(SiteConfigError, match="pacs") as info:
        site_config_from_mapping({"pacs": pacs}, source="site.yaml")
    assert message in str(info.value)


def test_dates_in_both_forms() -> None:
    assert parse_study_date("2024-02-29", "x") == parse_study_date("20240229", "x") == dt.date(2024, 2, 29)


def test_puller_needs_a_url_and_a_readable_password(tmp_path: Path) -> None:
    with pytest.raises(PacsError, match="'pacs' has no 'url'"):
        PacsPuller(PacsSection(), tmp_path / "import")
    with pytest.raises(PacsError, match="pacs.password-file .* cannot be read"):
        PacsPuller(PacsSection(url="http://127.0.0.1:1/dicom-web", username="u", password_file=tmp_path / "none"),
                   tmp_path / "import")
    assert staging_dir(tmp_path / "import") == tmp_path.resolve() / ".import.pull-staging"


def test_since_as_yaml_date_or_string_is_one_form(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("pacs:\n  since: 2024-01-31\n")     # YAML: a date
    (tmp_path / "b.yaml").write_text("pacs:\n  since: '20240131'\n")     # a string in DICOM's form
    assert load_site_config(tmp_path / "a.yaml").pacs.since == load_site_config(tmp_path / "b.yaml").pacs.since \
        == "2024-01-31"
    (tmp_path / "c.yaml").write_text("pacs:\n  since: 5\n")
    with pytest.raises(SiteConfigError, match="'since' must be a date as YYYY-MM-DD or YYYYMMDD; got 5"):
        load_site_config(tmp_path / "c.yaml")
