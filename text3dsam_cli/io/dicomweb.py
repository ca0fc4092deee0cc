"""DICOMweb: studies and series on a server as inputs (QIDO-RS, WADO-RS) and outputs stored back (STOW-RS).

A DICOMweb URL ``http[s]://HOST/.../studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]`` is an input like
a DICOM folder: :func:`read_source` picks the series (for a study: the image series with the most instances,
never SEG, RTSTRUCT, SR, PR, ...), retrieves it with WADO-RS into a temporary folder and reads that folder with
the local DICOM reader, so geometry, orientation and modality follow the same rules as for files.
:func:`store_files` sends DICOM outputs with STOW-RS; :func:`find_stored` finds, with QIDO-RS and the instances'
metadata, a SEG / RTSTRUCT this tool already made from a series with the same prompts (``--skip-existing``).

The client is ``dicomweb-client`` (optional extra ``pacs``) on a ``requests`` session: TLS is verified
(``REQUESTS_CA_BUNDLE`` honoured), a bearer token (``--dicomweb-token`` / ``$DICOMWEB_TOKEN``) or basic auth
(``$DICOMWEB_USER`` / ``$DICOMWEB_PASSWORD``, or ``user:password@`` in the URL) goes into the session, never into
a message, a log line or a sidecar: every URL shown is :func:`display_url` (no credentials, no query).
Connection errors, cut transfers and HTTP 502/503/504 are retried :data:`RETRIES` times with exponential backoff;
every other failure is one :class:`DicomWebError` line naming the URL and the HTTP status.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from text3dsam_cli.errors import InputError, UsageError

if TYPE_CHECKING:
    import requests
    from dicomweb_client.api import DICOMwebClient

    from text3dsam_cli.io.volume import Volume

T = TypeVar("T")

#: Message when the optional dependency is missing.
MISSING_CLIENT = "DICOMweb needs dicomweb-client: pip install 'text3dsam-cli[pacs]'"
#: How often a transient failure (connection refused or reset, a cut transfer, HTTP 502/503/504) is retried.
RETRIES = 3
#: First wait before a retry, in seconds; it doubles with every retry (1, 2, 4 s).
BACKOFF_S = 1.0
RETRY_STATUSES = frozenset({502, 503, 504})
#: Seconds to wait for a connection and between bytes of an answer.
TIMEOUT_S = (10.0, 120.0)
#: Series modalities that never hold the image to segment (the choice for a study URL skips them).
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "SR", "PR", "KO", "DOC", "RTPLAN", "RTDOSE", "RTRECORD",
                                  "REG", "FID", "PLAN"})
#: The InputItem kind of a DICOMweb input.
KIND = "dicomweb"

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SOPInstanceUID": "00080018",
         "Modality": "00080060", "ModalitiesInStudy": "00080061", "StudyDate": "00080020",
         "NumberOfStudyRelatedInstances": "00201208", "NumberOfSeriesRelatedInstances": "00201209",
         "PatientID": "00100020", "AccessionNumber": "00080050", "StudyDescription": "00081030",
         "SeriesDescription": "0008103E", "Manufacturer": "00080070"}


class DicomWebError(InputError):
    """A DICOMweb request that failed: the message names the URL (without credentials) and the HTTP status."""

    def __init__(self, message: str, url: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message, url)


def is_url(text: str | os.PathLike[str]) -> bool:
    """Whether an input argument is an http(s) URL (and so must be a DICOMweb study or series)."""
    return isinstance(text, (str, DicomWebSource)) and str(text).lower().startswith(("http://", "https://"))


def display_url(url: str) -> str:
    """``url`` without user name, password, query or fragment: the only form of a URL that is ever shown."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/")


@dataclass(frozen=True)
class Credentials:
    """How to authenticate: a bearer token, else a user name and password, else nothing. Never printed."""

    token: str | None = None
    user: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        kind = "token" if self.token else "basic" if self.user else "none"
        return f"Credentials({kind})"

    def secrets(self) -> list[str]:
        """The secret strings, to scrub from any text that leaves this module."""
        return [s for s in (self.token, self.password) if s]


def credentials(token: str | None = None, url: str | None = None,
                environ: Mapping[str, str] | None = None) -> Credentials:
    """The credentials for a request: ``token`` (``--dicomweb-token``), else ``$DICOMWEB_TOKEN``, else the
    ``user:password@`` of ``url``, else ``$DICOMWEB_USER`` / ``$DICOMWEB_PASSWORD``."""
    env = os.environ if environ is None else environ
    token = token or env.get("DICOMWEB_TOKEN") or None
    if token:
        return Credentials(token=token)
    if url:
        parts = urlsplit(url)
        if parts.username:
            return Credentials(user=unquote(parts.username), password=unquote(parts.password or ""))
    if env.get("DICOMWEB_USER"):
        return Credentials(user=env["DICOMWEB_USER"], password=env.get("DICOMWEB_PASSWORD", ""))
    return Credentials()


def _base_of(url: str) -> str:
    """The service root of a URL given as a base, a study or a series URL (credentials kept: used to connect)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    cut = path.find("/studies")
    if cut >= 0 and (len(path) == cut + len("/studies") or path[cut + len("/studies")] == "/"):
        path = path[:cut]
    netloc = parts.netloc
    return f"{parts.scheme}://{netloc}{path}"


class DicomWebSource(os.PathLike):
    """A study or series on a DICOMweb server, standing where an input path stands (``InputItem.path``).

    ``str()`` and ``os.fspath()`` give the URL without credentials, so messages, sidecars and sorting
    (``--shard``) use it like a file name. The temporary folders of retrieved series are kept on the object
    until :meth:`release`.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url.strip())
        shown = display_url(url.strip())
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise InputError("not a DICOMweb URL (expected http[s]://HOST/.../studies/<StudyInstanceUID>"
                             "[/series/<SeriesInstanceUID>])", shown)
        match = re.search(r"/studies/([^/]+)(?:/series/([^/]+))?/?$", parts.path)
        if match is None:
            raise InputError("not a DICOMweb study or series URL (expected .../studies/<StudyInstanceUID>"
                             "[/series/<SeriesInstanceUID>])", shown)
        for uid in filter(None, match.groups()):
            if not _UID.match(uid) or len(uid) > 64:
                raise InputError(f"{uid!r} is not a DICOM UID", shown)
        self.url = shown
        self.study: str = match.group(1)
        self.series: str | None = match.group(2)
        self._connect_url = url.strip()
        self._folders: list[tempfile.TemporaryDirectory] = []

    @property
    def base(self) -> str:
        """The service root, without credentials (``http://host/dicom-web``)."""
        return display_url(_base_of(self._connect_url))

    @property
    def name(self) -> str:
        """The last UID of the URL (the output stem)."""
        return self.series or self.study

    @property
    def parent(self) -> PurePosixPath:
        """Server and path above the UID, as a path (only its names are used: to tell equal stems apart)."""
        parts = urlsplit(self.url)
        return PurePosixPath("/", f"{parts.hostname}_{parts.port or ''}".rstrip("_"),
                             *[p for p in parts.path.split("/")[:-1] if p])

    def resolve(self) -> DicomWebSource:
        return self

    def exists(self) -> bool:
        return True

    def is_file(self) -> bool:
        return False

    def is_dir(self) -> bool:
        return False

    def __fspath__(self) -> str:
        return self.url

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"DicomWebSource({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DicomWebSource) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def client(self, token: str | None = None) -> Client:
        """A client for this source's server (credentials: :func:`credentials`)."""
        return Client(_base_of(self._connect_url), credentials(token, self._connect_url))

    def release(self) -> None:
        """Remove the temporary copies of the series retrieved for this input."""
        while self._folders:
            self._folders.pop().cleanup()


def require_client() -> None:
    """Raise ``UsageError`` when dicomweb-client is not installed."""
    import importlib.util

    if importlib.util.find_spec("dicomweb_client") is None:
        raise UsageError(MISSING_CLIENT)


def _reason(exc: BaseException) -> str:
    """A short, credential-free reason for a transport failure."""
    import requests

    text = str(exc).lower()
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS failure (certificate not verified: set REQUESTS_CA_BUNDLE to your CA bundle)" \
            if "certificate" in text or "verify" in text else "TLS failure"
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError) or "incomplete" in text or "ended" in text:
        return "transfer cut off"
    if "refused" in text:
        return "connection refused"
    if "reset" in text:
        return "connection reset"
    if "name or service not known" in text or "nodename" in text or "resolve" in text:
        return "host not found"
    if isinstance(exc, OSError) and getattr(exc, "strerror", None):
        return str(exc.strerror)
    return "cannot connect"


class Client:
    """One DICOMweb service: ``dicomweb-client`` on a ``requests`` session with our credentials and retries."""

    def __init__(self, base_url: str, creds: Credentials | None = None) -> None:
        require_client()
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.base = display_url(_base_of(base_url))
        self._creds = creds or Credentials()
        session = requests.Session()
        session.verify = True  # requests takes $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE per request
        if self._creds.token:
            session.headers["Authorization"] = f"Bearer {self._creds.token}"
        elif self._creds.user:
            session.auth = (self._creds.user, self._creds.password or "")
        self.session = session
        self.last_status: int | None = None

        def remember(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
            self.last_status = response.status_code
            return response

        connect = _base_of(base_url)
        parts = urlsplit(connect)
        if parts.username:  # credentials travel in the session, never in the URL (nor in its messages)
            host = parts.hostname or ""
            connect = f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
        self.dicomweb: DICOMwebClient = DICOMwebClient(connect, session=session, callback=remember,
                                                       timeout=TIMEOUT_S)
        self.dicomweb.set_http_retry_params(retry=False)  # retries are ours (call), with connection errors too

    def __repr__(self) -> str:
        return f"Client({self.base!r}, {self._creds!r})"

    def _scrub(self, text: str) -> str:
        for secret in self._creds.secrets():
            text = text.replace(secret, "***")
        return text

    def call(self, what: str, url: str, action: Callable[[], T]) -> T:
        """Run ``action`` (one DICOMweb transaction), retrying transient failures; failures become one
        :class:`DicomWebError` naming ``url`` (shown without credentials), ``what`` and the HTTP status."""
        import requests

        shown = display_url(url)
        for attempt in range(RETRIES + 1):
            self.last_status = None
            try:
                return action()
            except requests.exceptions.HTTPError as exc:
                response = exc.response
                status = response.status_code if response is not None else self.last_status
                if status in RETRY_STATUSES and attempt < RETRIES:
                    time.sleep(BACKOFF_S * 2 ** attempt)
                    continue
                reason = (response.reason if response is not None else "") or ""
                hint = " (check the credentials: --dicomweb-token, $DICOMWEB_TOKEN or $DICOMWEB_USER/" \
                       "$DICOMWEB_PASSWORD)" if status in (401, 403) else ""
                retried = f" after {RETRIES} retries" if status in RETRY_STATUSES else ""
                raise DicomWebError(self._scrub(f"{what} failed: HTTP {status} {reason}{retried}{hint}".rstrip()),
                                    shown, status) from None
            except requests.exceptions.SSLError as exc:
                raise DicomWebError(f"{what} failed: {_reason(exc)}", shown) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError, ConnectionError) as exc:
                if attempt < RETRIES:
                    time.sleep(BACKOFF_S * 2 ** attempt)
                    continue
                raise DicomWebError(f"{what} failed: {_reason(exc)} (after {RETRIES} retries; no HTTP status)",
                                    shown) from None
            except ValueError as exc:  # an answer dicomweb-client cannot parse
                raise DicomWebError(self._scrub(f"{what} failed: unexpected answer ({str(exc)[:200]}; HTTP "
                                                f"{self.last_status})"), shown, self.last_status) from None
        raise AssertionError("unreachable")

    # -- QIDO-RS ---------------------------------------------------------------------------------------------

    def search_studies(self, filters: Mapping[str, str], limit: int | None = None) -> list[dict[str, Any]]:
        """Studies matching ``filters`` (QIDO-RS attribute: value), as :func:`study_record` dicts."""
        fields = ["StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "PatientID",
                  "AccessionNumber", "StudyDescription"]
        found = self.call("QIDO-RS study search", f"{self.base}/studies", lambda: self.dicomweb.search_for_studies(
            fields=fields, search_filters=dict(filters) or None, limit=limit))
        return [study_record(self.base, entry) for entry in found][: limit or None]

    def series_of(self, study: str, modality: str | None = None) -> list[dict[str, Any]]:
        """The series of a study (raw DICOM JSON, QIDO-RS)."""
        fields = ["Modality", "NumberOfSeriesRelatedInstances", "SeriesDescription"]
        filters = {"Modality": modality} if modality else None
        url = f"{self.base}/studies/{study}"
        return self.call("QIDO-RS series search", url, lambda: self.dicomweb.search_for_series(
            study_instance_uid=study, fields=fields, search_filters=filters))

    def choose_series(self, src: DicomWebSource, series_uid: str | None = None) -> str:
        """The series to segment: the URL's, else ``series_uid`` (``--series``), else the image series of the
        study with the most instances (never SEG, RTSTRUCT, SR, PR, ...)."""
        if src.series:
            return src.series
        listed = self.series_of(src.study)
        if not listed:
            raise DicomWebError("no such study on the server (QIDO-RS finds no series in it)", src.url)
        uids = [value(entry, "SeriesInstanceUID") for entry in listed]
        if series_uid:
            if series_uid not in uids:
                raise DicomWebError(f"--series {series_uid}: not a series of this study", src.url, 404)
            return series_uid
        images = [(int(value(e, "NumberOfSeriesRelatedInstances") or 0), value(e, "SeriesInstanceUID"))
                  for e in listed if str(value(e, "Modality") or "").upper() not in NON_IMAGE_MODALITIES]
        if not images:
            raise DicomWebError("the study holds no image series (only "
                                f"{', '.join(sorted({str(value(e, 'Modality')) for e in listed}))})", src.url)
        images.sort(key=lambda pair: (-pair[0], pair[1]))
        return images[0][1]

    # -- WADO-RS ---------------------------------------------------------------------------------------------

    def retrieve_series(self, study: str, series: str, folder: Path) -> int:
        """Write every instance of a series into ``folder`` byte for byte (WADO-RS, transfer syntax as stored);
        the count. The multipart answer must end with its closing boundary: a transfer cut in the middle (which a
        server closing the connection instead of sending a length cannot show otherwise) is retried."""
        url = f"{self.base}/studies/{study}/series/{series}"

        def fetch() -> int:
            for old in folder.iterdir():  # a retried transfer starts again from nothing
                old.unlink()
            return _save_multipart(self.session, self.dicomweb._get_series_url(  # the client's URL rule
                _retrieve_transaction(), study, series), folder)

        count = self.call("WADO-RS retrieve", url, fetch)
        if count == 0:
            raise DicomWebError("HTTP 404: the series holds no instances", url, 404)
        return count

    def metadata(self, study: str, series: str) -> list[Any]:
        """The instances' metadata of a series (WADO-RS metadata) as pydicom datasets, without bulk data."""
        import pydicom

        url = f"{self.base}/studies/{study}/series/{series}"
        found = self.call("WADO-RS metadata", url, lambda: self.dicomweb.retrieve_series_metadata(study, series))
        return [pydicom.Dataset.from_json(entry, bulk_data_uri_handler=lambda *args: b"") for entry in found]

    # -- STOW-RS ---------------------------------------------------------------------------------------------

    def store(self, files: Sequence[Path]) -> dict[str, Any]:
        """Send DICOM files with STOW-RS: ``{"server", "http_status", "sop_instance_uids", ...}``; a refused
        instance raises :class:`DicomWebError` with the HTTP status."""
        import pydicom

        datasets = [pydicom.dcmread(f) for f in files]
        url = f"{self.base}/studies"
        answer = self.call("STOW-RS store", url, lambda: self.dicomweb.store_instances(datasets))
        status = self.last_status
        failed = list(answer.get("FailedSOPSequence", []) or [])
        stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("ReferencedSOPSequence", [])
                  or []}
        wanted = [str(ds.SOPInstanceUID) for ds in datasets]
        missing = [uid for uid in wanted if uid not in stored]
        if failed or (stored and missing) or (status is not None and status >= 300):
            reason = ""
            if failed:
                reason = f": failure reason {failed[0].get('FailureReason', '?')}"
            raise DicomWebError(f"STOW-RS store refused by the server (HTTP {status}{reason})", url, status)
        for ds in datasets:  # some servers answer success for an instance they drop (Orthanc's filters)
            study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
            listed = self.call("QIDO-RS check of the stored instance", url, lambda: self.dicomweb.search_for_instances(
                study, series, search_filters={"SOPInstanceUID": sop}))  # noqa: B023 (called at once)
            if not any(value(entry, "SOPInstanceUID") == sop for entry in listed):
                raise DicomWebError(f"STOW-RS store refused by the server: it answered HTTP {status} but does not "
                                    f"hold instance {sop} afterwards", url, status)
        return {"server": self.base, "http_status": status, "sop_instance_uids": wanted,
                "series_instance_uids": sorted({str(ds.SeriesInstanceUID) for ds in datasets}),
                "study_instance_uid": str(datasets[0].StudyInstanceUID) if datasets else None}

    def find_stored(self, study: str, source_series: str, prompts: Sequence[str], algorithm: str,
                    kinds: Iterable[str]) -> dict[str, str]:
        """``{kind: SOPInstanceUID}`` of the SEG (``dicom_seg``) / RTSTRUCT (``rtstruct``) objects on the server
        that this tool made from ``source_series`` with the same ``prompts`` and ``algorithm`` (model name)."""
        found: dict[str, str] = {}
        for kind in kinds:
            modality = {"dicom_seg": "SEG", "rtstruct": "RTSTRUCT"}[kind]
            for entry in self.series_of(study, modality):
                series = value(entry, "SeriesInstanceUID")
                for ds in self.metadata(study, series):
                    if _made_from(ds, kind, source_series, prompts, algorithm):
                        found[kind] = str(ds.SOPInstanceUID)
                        break
                if kind in found:
                    break
        return found


class IncompleteTransfer(ConnectionError):
    """A multipart answer that ended before its closing boundary (retried like a reset connection)."""


def _retrieve_transaction() -> Any:
    from dicomweb_client.web import _Transaction

    return _Transaction.RETRIEVE


def _save_multipart(session: requests.Session, url: str, folder: Path) -> int:
    """GET a ``multipart/related; type="application/dicom"`` answer and write each part's body to ``folder``
    (``000001.dcm``, ...) as it streams in; raises :class:`IncompleteTransfer` when the closing boundary is
    missing and ``requests.HTTPError`` for an HTTP error status."""
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    with session.get(url, headers={"Accept": accept}, stream=True, timeout=TIMEOUT_S) as response:
        response.raise_for_status()
        media, *params = [p.strip() for p in response.headers.get("Content-Type", "").split(";")]
        boundary = next((v.strip('"') for k, _, v in (p.partition("=") for p in params)
                         if k.strip().lower() == "boundary"), None)
        if media.lower() != "multipart/related" or not boundary:
            raise ValueError(f"expected a multipart/related answer, got {media or 'no Content-Type'}")
        delimiter = b"\r\n--" + boundary.encode("latin-1")
        buffer = bytearray(b"\r\n")  # so the first boundary reads as a delimiter too
        count, started, closed = 0, False, False
        for chunk in response.iter_content(chunk_size=1 << 20):
            buffer += chunk
            while not closed:
                at = buffer.find(delimiter)
                if at < 0 or len(buffer) < at + len(delimiter) + 2:
                    break
                if started:  # the part before this delimiter: headers, blank line, body
                    head_end = buffer.find(b"\r\n\r\n", 0, at)
                    if head_end < 0:
                        raise ValueError("a multipart part without headers")
                    count += 1
                    (folder / f"{count:06d}.dcm").write_bytes(bytes(buffer[head_end + 4:at]))
                started = True
                closed = buffer[at + len(delimiter):at + len(delimiter) + 2] == b"--"
                del buffer[:at + len(delimiter)]
        if not closed:
            raise IncompleteTransfer(f"incomplete multipart answer: no closing boundary after {count} instance(s)")
    return count


def value(entry: Mapping[str, Any], keyword: str) -> Any:
    """The first value of ``keyword`` in a DICOM JSON object (None when absent); PN as its alphabetic text."""
    item = entry.get(_TAGS[keyword]) or {}
    values = item.get("Value") or []
    if not values:
        return None
    first = values[0]
    if isinstance(first, dict) and "Alphabetic" in first:
        return first["Alphabetic"]
    return first


def study_record(base: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """One ``pacs search`` result: the study URL and its main attributes."""
    uid = value(entry, "StudyInstanceUID")
    modalities = (entry.get(_TAGS["ModalitiesInStudy"]) or {}).get("Value") or []
    count = value(entry, "NumberOfStudyRelatedInstances")
    return {"url": f"{base}/studies/{uid}", "StudyInstanceUID": uid, "ModalitiesInStudy": list(modalities),
            "StudyDate": value(entry, "StudyDate"),
            "NumberOfStudyRelatedInstances": int(count) if count not in (None, "") else None,
            "PatientID": value(entry, "PatientID"), "AccessionNumber": value(entry, "AccessionNumber"),
            "StudyDescription": value(entry, "StudyDescription")}


def _made_from(ds: Any, kind: str, source_series: str, prompts: Sequence[str], algorithm: str) -> bool:
    """Whether a SEG / RTSTRUCT (metadata dataset) was made by this tool from ``source_series`` with ``prompts``
    by the model named ``algorithm``."""
    from text3dsam_cli.io.dicomseg import MANUFACTURER, _long_string, _short_text

    if str(ds.get("Manufacturer", "")) != MANUFACTURER or str(ds.get("ManufacturerModelName", "")) != \
            _long_string(algorithm, "Text3DSAM"):
        return False
    if kind == "dicom_seg":
        referenced = {str(s.get("SeriesInstanceUID", "")) for s in ds.get("ReferencedSeriesSequence", [])}
        texts = sorted(str(s.get("SegmentDescription", s.get("SegmentLabel", ""))) for s in
                       ds.get("SegmentSequence", []))
    else:
        referenced = {str(series.get("SeriesInstanceUID", "")) for frame in
                      ds.get("ReferencedFrameOfReferenceSequence", []) for study in
                      frame.get("RTReferencedStudySequence", []) for series in
                      study.get("RTReferencedSeriesSequence", [])}
        texts = sorted(str(r.get("ROIDescription", r.get("ROIName", ""))) for r in
                       ds.get("StructureSetROISequence", []))
    expected = sorted(_short_text(p) or _long_string(p, "") for p in prompts)
    return source_series in referenced and texts == expected


# -- the segment pipeline's hooks -------------------------------------------------------------------------------


def read_source(src: DicomWebSource, series_uid: str | None = None, token: str | None = None) -> Volume:
    """Retrieve the series of a DICOMweb input into a temporary folder (kept until ``src.release()``, since
    DICOM-SEG / RTSTRUCT writing reads the source headers) and read it as a local DICOM series.

    The volume's ``meta["dicomweb"]`` records the server, study, series, instance count and retrieval time."""
    from text3dsam_cli.io.readers import read_volume

    client = src.client(token)
    t0 = time.perf_counter()
    series = client.choose_series(src, series_uid)
    folder = tempfile.TemporaryDirectory(prefix="text3dsam-dicomweb-")
    try:
        count = client.retrieve_series(src.study, series, Path(folder.name))
        retrieve_s = time.perf_counter() - t0
        volume = read_volume(folder.name)
    except BaseException:
        folder.cleanup()
        raise
    src._folders.append(folder)
    volume.path = src  # type: ignore[assignment]  # messages name the URL, not the temporary folder
    volume.meta["dicomweb"] = {"server": client.base, "study": src.study, "series": series, "instances": count,
                               "retrieve_s": round(retrieve_s, 4)}
    return volume


def check_store(paths: Iterable[Any], store: bool, store_to: str | None, wants_dicom: bool) -> None:
    """Usage errors of ``--store`` / ``--store-to`` for these inputs (before any model is loaded)."""
    paths = list(paths)
    if any(isinstance(p, DicomWebSource) for p in paths):
        require_client()
    if not (store or store_to):
        return
    require_client()
    if not wants_dicom:
        raise UsageError("--store sends the DICOM outputs: give --dicom-seg and/or --rtstruct")
    if store_to:
        if not is_url(store_to):
            raise UsageError(f"--store-to {display_url(store_to) if '://' in store_to else store_to}: not an "
                             "http(s) DICOMweb URL")
        return
    local = [p for p in paths if not isinstance(p, DicomWebSource)]
    if local:
        raise UsageError(f"--store: {local[0]} did not come from a DICOMweb server; give --store-to URL")


def store_target(item_path: Any, store_to: str | None, token: str | None) -> Client:
    """The client of the server outputs go to: ``--store-to``, else the input's own server."""
    if store_to:
        return Client(store_to, credentials(token, store_to))
    if isinstance(item_path, DicomWebSource):
        return item_path.client(token)
    raise UsageError(f"--store: {item_path} did not come from a DICOMweb server; give --store-to URL")


def store_outputs(item_path: Any, written: Mapping[str, str], kinds: Iterable[str], store_to: str | None,
                  token: str | None) -> dict[str, Any]:
    """STOW-RS the DICOM outputs (``written[kind]`` for each of ``kinds``); the sidecar's ``store`` record."""
    files = [Path(written[k]) for k in kinds if k in written]
    client = store_target(item_path, store_to, token)
    t0 = time.perf_counter()
    record = client.store(files)
    record["objects"] = {k: Path(written[k]).name for k in kinds if k in written}
    record["store_s"] = round(time.perf_counter() - t0, 4)
    return record


def already_stored(item_path: Any, series_uid: str | None, prompts: Sequence[str], algorithm: str,
                   kinds: Sequence[str], store_to: str | None, token: str | None) -> bool:
    """``--skip-existing`` for a DICOMweb input: whether the target server already holds, for each of ``kinds``,
    an object this tool made from the input's series with these prompts and this model."""
    if not isinstance(item_path, DicomWebSource) or not kinds or not prompts:
        return False
    source_client = item_path.client(token)
    series = source_client.choose_series(item_path, series_uid)
    target = store_target(item_path, store_to, token)
    found = target.find_stored(item_path.study, series, prompts, algorithm, kinds)
    return all(k in found for k in kinds)


def release(paths: Iterable[Any]) -> None:
    """Remove the temporary series copies of these inputs (no-op for local inputs)."""
    for path in paths:
        if isinstance(path, DicomWebSource):
            path.release()
