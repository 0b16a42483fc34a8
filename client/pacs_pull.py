"""Pull CT series from the hospital's PACS over DICOMweb into the site's import folder.

`lungmae site pull` asks the PACS (QIDO-RS) for the CT studies of a date range, lists each study's series,
and retrieves (WADO-RS) the CT series not yet pulled into ``<data.input>/<pacs.folder>/<study>/<series>/``,
where `lungmae site prepare` finds them like any folder export. The HTTP side is ``dicomweb-client``'s.

Guarantees, because a pull may be interrupted at any moment (network, PACS restart, Ctrl-C):

* **Nothing partial is ever visible in the import folder.** Instances are written (atomically, mode 0600:
  they are patient data) into a staging folder beside the import folder,
  ``<input parent>/.<input name>.pull-staging/<series>/``, and a series folder is renamed into the import
  folder only when every instance the PACS listed is there. ``site prepare`` never sees half a series.
* **Resumable.** Instances already staged by an interrupted pull are kept; the next pull fetches only the
  missing ones (one WADO-RS request per instance) instead of the whole series again.
* **Deduplicated by UID.** A series whose folder (named by its Series Instance UID) is already in the import
  folder is skipped; UIDs from the server are checked to be UIDs (digits and dots) before they name a path.
* **CT only.** Studies are queried with ModalitiesInStudy=CT; every series and every retrieved instance is
  checked again (a PACS may ignore the filter, a study may hold scouts' dose screens as ``OT``), and a
  series with any non-CT instance is dropped whole, with a message.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from client.pacs_config import PacsSection
from lungmae_core.atomic import atomic_path
from lungmae_core.errors import LungMAEError

if TYPE_CHECKING:  # dicomweb-client (and requests) load only when a pull starts
    from dicomweb_client.api import DICOMwebClient

_T = TypeVar("_T")

__all__ = ["PacsError", "PacsPuller", "PullPlan", "PullReport", "SeriesRef", "staging_dir"]

logger = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# The DICOMweb JSON tags read from QIDO-RS answers (PS3.18 F.2).
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_STUDY_DATE, _MODALITIES, _MODALITY = "00080020", "00080061", "00080060"
_N_INSTANCES, _SERIES_NUMBER = "00201209", "00200011"
_PAGE = 500  # QIDO-RS results per request
_CT_IMAGE_STORAGE = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}


class PacsError(LungMAEError):
    """The PACS cannot be reached, refuses us, answers too slowly or answers something that is not DICOMweb."""


@dataclasses.dataclass(frozen=True)
class SeriesRef:
    """One CT series the PACS lists, as QIDO-RS describes it."""

    study_uid: str
    series_uid: str
    study_date: str
    series_number: int | None
    n_instances: int | None


@dataclasses.dataclass
class PullPlan:
    """What a query found: the series to fetch, those already pulled, and what was skipped and why."""

    date_range: str
    studies: int = 0
    to_fetch: list[SeriesRef] = dataclasses.field(default_factory=list)
    already_pulled: int = 0
    skipped: Counter[str] = dataclasses.field(default_factory=Counter)  # reason -> count


@dataclasses.dataclass
class PullReport:
    """What a pull did; :meth:`summary` is what `lungmae site pull` prints."""

    plan: PullPlan
    pulled_series: int = 0
    files_written: int = 0
    files_resumed: int = 0
    failed: list[tuple[SeriesRef, str]] = dataclasses.field(default_factory=list)
    destination: Path | None = None

    def summary(self) -> str:
        """Human-readable lines: counts, skips with their reasons, and each failed series with why."""
        p = self.plan
        lines = [(f"PACS query (StudyDate {p.date_range}, CT): {p.studies} studies; {p.already_pulled} series already "
                  f"pulled, {len(p.to_fetch)} to fetch."),
                 (f"Pulled {self.pulled_series} series ({self.files_written} files written, {self.files_resumed} kept "
                  f"from an interrupted pull) into {self.destination}.")]
        if p.skipped:
            lines.append("Skipped:")
            lines += [f"  {n:4d}  {reason}" for reason, n in sorted(p.skipped.items(), key=lambda kv: -kv[1])]
        if self.failed:
            lines.append(f"Failed ({len(self.failed)} series; nothing of them is in the import folder, "
                         "rerun `lungmae site pull` to retry):")
            lines += [f"  study {s.study_uid} series {s.series_uid}: {why}" for s, why in self.failed]
        return "\n".join(lines)


def staging_dir(input_dir: Path) -> Path:
    """Where series are assembled: a hidden sibling of the import folder (same file system, so a rename)."""
    input_dir = Path(input_dir).resolve()
    return input_dir.parent / f".{input_dir.name}.pull-staging"


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or []
    return values[0] if values else None


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value") or [])


def _uid(value: Any, what: str) -> str:
    """``value`` if it is a DICOM UID, else :class:`PacsError` (it names folders: no '/', no '..')."""
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        raise PacsError(f"The PACS answered a {what} that is not a DICOM UID ({str(value)[:80]!r}); refusing to "
                        "use it as a folder name")
    return value


def _date_range(since: dt.date | None, until: dt.date | None) -> str:
    """DICOM range matching for StudyDate (PS3.4 C.2.2.2.5): ``since-until``, either end open."""
    fmt = "%Y%m%d"
    return f"{since.strftime(fmt) if since else ''}-{until.strftime(fmt) if until else ''}"


class PacsPuller:
    """Query and retrieve CT series from one DICOMweb server into one import folder.

    Args:
        pacs: the ``pacs`` section (``url`` required).
        input_dir: the import folder (``data.input``); series go to ``input_dir / pacs.folder``.
        progress: show a tqdm bar (files) while retrieving.
        source: the site.yaml path, quoted in configuration errors.
    """

    def __init__(self, pacs: PacsSection, input_dir: Path, *, progress: bool = True, source: str = "site.yaml"):
        if pacs.url is None:
            raise PacsError(f"{source}: 'pacs' has no 'url'; set pacs.url to the DICOMweb root of the PACS "
                            "(e.g. https://pacs.example.org/dicom-web)")
        self.pacs = pacs
        self.url = pacs.url.rstrip("/")
        self.dest = Path(input_dir) / pacs.folder
        self.staging = staging_dir(Path(input_dir))
        self.progress = progress
        self._client = self._make_client(source)

    def _make_client(self, source: str) -> DICOMwebClient:
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        if self.pacs.username is not None:
            if self.pacs.password_file is None:
                raise PacsError(f"{source}: pacs.username is set but pacs.password-file is not")
            try:
                password = self.pacs.password_file.read_text(encoding="utf-8").splitlines()[0]
            except (OSError, IndexError) as exc:
                raise PacsError(f"{source}: pacs.password-file {self.pacs.password_file} cannot be read or is empty "
                                f"({exc})") from exc
            session.auth = (self.pacs.username, password)
        if self.pacs.ca_certificates is not None:
            if not self.pacs.ca_certificates.is_file():
                raise PacsError(f"{source}: pacs.ca-certificates {self.pacs.ca_certificates} is not a file")
            session.verify = str(self.pacs.ca_certificates)
        # 64 KiB reads (the library's default is 1 MB): instances are written as soon as they arrive, so a
        # transfer that stalls has staged all it fully received.
        client = DICOMwebClient(self.url, session=session, timeout=self.pacs.timeout_s, chunk_size=1 << 16)
        client.set_http_retry_params(retry=True, max_attempts=self.pacs.retries, wait_exponential_multiplier=500)
        return client

    # -- errors ---------------------------------------------------------------------------------------------

    def _fatal(self, exc: Exception, doing: str) -> PacsError:
        """Turn a transport or protocol failure into one message saying what to check."""
        import requests

        if isinstance(exc, requests.exceptions.Timeout) or "timed out" in str(exc).lower():
            return PacsError(f"The PACS at {self.url} did not answer within {self.pacs.timeout_s:g} s while {doing} "
                             "(pacs.timeout-s); it may be overloaded. Nothing partial was left in the import folder; "
                             "rerun later or raise pacs.timeout-s")
        if isinstance(exc, requests.exceptions.SSLError):
            return PacsError(f"TLS with the PACS at {self.url} failed while {doing}: {exc}; set pacs.ca-certificates "
                             "to the hospital CA bundle")
        if isinstance(exc, requests.exceptions.ConnectionError):
            return PacsError(f"Unable to reach the PACS at {self.url} while {doing} ({type(exc).__name__}); is the "
                             "DICOMweb server running and is pacs.url right?")
        if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
            code = exc.response.status_code
            if code in (401, 403):
                return PacsError(f"The PACS at {self.url} refused us (HTTP {code}) while {doing}; check pacs.username "
                                 "and pacs.password-file, and that this user may query and retrieve")
            return PacsError(f"The PACS at {self.url} answered HTTP {code} while {doing}; is pacs.url the DICOMweb "
                             "root (QIDO-RS /studies must be below it)?")
        return PacsError(f"The PACS at {self.url} gave an answer we cannot read while {doing}: {exc}")

    def _call(self, doing: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        import requests

        try:
            return fn(*args, **kwargs)
        except (requests.exceptions.RequestException, ValueError) as exc:
            raise self._fatal(exc, doing) from exc

    # -- query ----------------------------------------------------------------------------------------------

    def _search(self, doing: str, fn: Callable[..., list[dict[str, Any]]], uid_tag: str,
                **kwargs: Any) -> list[dict[str, Any]]:
        """All results of a QIDO-RS search, paged with limit/offset.

        dicomweb-client's own ``get_remaining`` loops for ever on servers that ignore ``offset`` without a
        ``limit`` (Orthanc does); here every page has a limit, and a page that brings no new UID ends the
        paging, whatever the server does with ``offset``.
        """
        results: list[dict[str, Any]] = []
        seen: set[Any] = set()
        offset = 0
        while True:
            page = self._call(doing, fn, limit=_PAGE, offset=offset, **kwargs)
            fresh = [item for item in page if _value(item, uid_tag) not in seen]
            seen.update(_value(item, uid_tag) for item in fresh)
            results += fresh
            if len(page) < _PAGE or not fresh:
                return results
            offset += len(page)

    def plan(self, since: dt.date | None, until: dt.date | None = None) -> PullPlan:
        """QIDO-RS: the CT studies with StudyDate in [since, until], their series, and what to fetch.

        Raises:
            PacsError: when the server cannot be reached, refuses us, is too slow or answers garbage.
        """
        plan = PullPlan(date_range=_date_range(since, until))
        studies = self._search("searching for CT studies", self._client.search_for_studies, _STUDY_UID,
                               search_filters={"StudyDate": plan.date_range, "ModalitiesInStudy": "CT"},
                               fields=["StudyInstanceUID", "StudyDate", "ModalitiesInStudy"])
        for study in studies:
            study_uid = _uid(_value(study, _STUDY_UID), "Study Instance UID")
            modalities = [str(m) for m in _values(study, _MODALITIES)]
            if modalities and "CT" not in modalities:  # the server ignored the filter
                plan.skipped[f"study without CT (modalities {'/'.join(sorted(modalities))})"] += 1
                continue
            plan.studies += 1
            series_list = self._search("listing the series of a study", self._client.search_for_series,
                                       _SERIES_UID, study_instance_uid=study_uid,
                                       fields=["Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances"])
            for item in series_list:
                series_uid = _uid(_value(item, _SERIES_UID), "Series Instance UID")
                modality = str(_value(item, _MODALITY) or "?")
                if modality != "CT":
                    plan.skipped[f"series of modality {modality}, not CT"] += 1
                    continue
                if (self.dest / study_uid / series_uid).is_dir():
                    plan.already_pulled += 1
                    continue
                n = _value(item, _N_INSTANCES)
                number = _value(item, _SERIES_NUMBER)
                plan.to_fetch.append(SeriesRef(study_uid, series_uid, str(_value(study, _STUDY_DATE) or ""),
                                               None if number is None else int(number), None if n is None else int(n)))
        logger.info("PACS %s: %d CT studies in %s, %d series to fetch, %d already pulled", self.url, plan.studies,
                    plan.date_range, len(plan.to_fetch), plan.already_pulled)
        return plan

    # -- retrieve -------------------------------------------------------------------------------------------

    def fetch(self, plan: PullPlan) -> PullReport:
        """WADO-RS: retrieve each planned series into staging, then move it into the import folder whole.

        A series the PACS no longer has (404) or that turns out not to be CT is reported and skipped; the
        others go on. Transport failures (server down, timeout) stop the pull with :class:`PacsError`;
        what was staged stays staged for the next pull.
        """
        from tqdm.auto import tqdm

        report = PullReport(plan=plan, destination=self.dest)
        total = sum(s.n_instances or 0 for s in plan.to_fetch) or None
        with tqdm(total=total, desc="Pulling from PACS", unit="file", disable=not self.progress) as bar:
            for ref in plan.to_fetch:
                try:
                    written, resumed = self._fetch_series(ref, bar)
                except _SeriesFailed as exc:
                    report.failed.append((ref, str(exc)))
                    logger.warning("Series %s of study %s not pulled: %s", ref.series_uid, ref.study_uid, exc)
                    continue
                report.pulled_series += 1
                report.files_written += written
                report.files_resumed += resumed
        try:
            self.staging.rmdir()  # only when empty: staged instances of failed series stay for the next pull
        except OSError:
            pass
        return report

    def _instances(self, ref: SeriesRef) -> list[str]:
        try:
            items = self._search("listing the instances of a series", self._client.search_for_instances, _SOP_UID,
                                 study_instance_uid=ref.study_uid, series_instance_uid=ref.series_uid,
                                 fields=["SOPInstanceUID"])
        except PacsError as exc:
            cause = exc.__cause__
            if getattr(getattr(cause, "response", None), "status_code", None) == 404:
                raise _SeriesFailed("the PACS no longer has this series (HTTP 404); it was deleted or moved since "
                                    "the query") from exc
            raise
        return [_uid(_value(item, _SOP_UID), "SOP Instance UID") for item in items]

    def _fetch_series(self, ref: SeriesRef, bar: Any) -> tuple[int, int]:  # bar: a tqdm progress bar
        import requests

        expected = self._instances(ref)
        if not expected:
            raise _SeriesFailed("the PACS no longer lists any instance of this series (HTTP 404 or an empty "
                                "answer): it was deleted or moved since the query")
        stage = self.staging / ref.series_uid
        stage.mkdir(parents=True, exist_ok=True)
        have = {p.stem for p in stage.glob("*.dcm")}
        missing = [sop for sop in expected if sop not in have]
        resumed = len(expected) - len(missing)
        bar.update(resumed)
        written = 0
        try:
            for ds in self._retrieve(ref, missing, resumed_from=len(have)):
                sop = self._check_instance(ds, ref)
                if sop in have:
                    continue
                with atomic_path(stage / f"{sop}.dcm", mode=0o600) as tmp:
                    ds.save_as(tmp, enforce_file_format=True)
                have.add(sop)
                written += 1
                bar.update(1)
        except _SeriesFailed:
            shutil.rmtree(stage, ignore_errors=True)  # never resume into a series we refused
            raise
        except requests.exceptions.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                raise _SeriesFailed("the PACS no longer has this series (HTTP 404 on WADO-RS); it was deleted or "
                                    "moved since the query") from exc
            raise self._fatal(exc, "retrieving a series") from exc
        except (requests.exceptions.RequestException, ValueError) as exc:
            raise self._fatal(exc, "retrieving a series") from exc
        still_missing = [sop for sop in expected if sop not in have]
        if still_missing:
            raise _SeriesFailed(f"the PACS listed {len(expected)} instances but sent "
                                f"{len(expected) - len(still_missing)}; the staged ones are kept for the next pull")
        final = self.dest / ref.study_uid / ref.series_uid
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage, final)  # the whole series appears at once
        return written, resumed

    def _retrieve(self, ref: SeriesRef, missing: list[str], resumed_from: int) -> Iterator[Any]:
        """The missing instances: one streamed series request when nothing was staged, else one per instance."""
        media = (("application/dicom", "*"),)  # as stored: no transcoding on the PACS
        if not missing:
            return iter(())
        if resumed_from == 0:
            return self._client.iter_series(ref.study_uid, ref.series_uid, media_types=media)
        return (self._client.retrieve_instance(ref.study_uid, ref.series_uid, sop, media_types=media)
                for sop in missing)

    @staticmethod
    def _check_instance(ds: Any, ref: SeriesRef) -> str:
        sop = _uid(str(getattr(ds, "SOPInstanceUID", "")), "SOP Instance UID")
        if str(getattr(ds, "SeriesInstanceUID", "")) != ref.series_uid:
            raise _SeriesFailed("the PACS sent an instance of another series; refusing the series")
        modality = str(getattr(ds, "Modality", "?"))
        sop_class = str(getattr(ds, "SOPClassUID", ""))
        if modality != "CT" or sop_class not in _CT_IMAGE_STORAGE:
            raise _SeriesFailed(f"an instance is modality {modality} (SOP class {sop_class or '?'}), not CT image "
                                "storage, although the PACS lists the series as CT; the series is skipped whole")
        return sop


class _SeriesFailed(Exception):
    """One series cannot be pulled; the others can."""

