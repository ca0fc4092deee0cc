"""DICOMweb end to end against a real Orthanc server (Debian's orthanc + orthanc-dicomweb) on 127.0.0.1:
``pacs search`` (QIDO-RS), study/series URLs as ``segment`` inputs (WADO-RS), ``--store`` (STOW-RS),
``--skip-existing`` against the server, credentials, and the faults (server down, 404, refused STOW, cut
transfers). No mock server: where the wire must be observed or cut, a TCP relay sits in front of Orthanc."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA
from orthanc import Orthanc, Relay, missing
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.io import dicomweb, expand_inputs, select_shard

pytest.importorskip("dicomweb_client", reason="the 'pacs' extra (dicomweb-client) is not installed")
pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

SERIES = DATA / "dicom" / "dicom2nifti" / "siemens_anatomical_001" / "dicom"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1725697665093567298250232455"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1725697665093567298250232554"
SECRET = "tok-Zq8v3-never-print-me"
#: Orthanc refuses STOW-RS requests (HTTP 403) and keeps answering the others.
REFUSE_STOW = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if method == 'POST' and string.find(uri, '/dicom-web/', 1, true) == 1 then
    return false
  end
  return true
end
"""
#: Orthanc drops every SEG it receives, while its DICOMweb plugin still answers STOW-RS with success.
DROP_SEG = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.Modality == 'SEG' then
    return false
  end
  return true
end
"""

runner = CliRunner()


def run(*args, input: str | None = None, env: dict[str, str] | None = None):
    return runner.invoke(app, [*map(str, args)], input=input, env=env)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch):
    for name in ("DICOMWEB_TOKEN", "DICOMWEB_USER", "DICOMWEB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dicomweb, "BACKOFF_S", 0.05)  # the retry schedule, shortened; its count stays 3


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """Orthanc loaded with the shared Siemens MR series (4 instances)."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        assert server.load(sorted(SERIES.iterdir())) == 4
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def refusing(tmp_path_factory):
    """Two more Orthancs with the same series: one refuses STOW-RS (HTTP 403), one silently drops SEGs."""
    servers = [Orthanc(tmp_path_factory.mktemp("orthanc_refusing"), lua=REFUSE_STOW),
               Orthanc(tmp_path_factory.mktemp("orthanc_dropping"), lua=DROP_SEG)]
    try:
        for server in servers:
            server.start().load(sorted(SERIES.iterdir()))
        yield servers
    finally:
        for server in servers:
            server.stop()


def seg_series(server: Orthanc) -> list[dict]:
    return server.get_json(f"/dicom-web/studies/{STUDY_UID}/series?Modality=SEG")


def labels_of(path: Path) -> tuple[np.ndarray, tuple]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), (image.GetSize(), image.GetSpacing(), image.GetOrigin(),
                                           image.GetDirection())


@pytest.mark.slow
def test_round_trip_retrieve_segment_store_and_skip(orthanc, small_checkpoint, tmp_path, monkeypatch):
    """The issue's acceptance: the URL gives the label map of the local folder, one SEG goes back referencing the
    source series, a rerun with --skip-existing stores nothing new."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    local = run("segment", SERIES, "brain", "-m", small_checkpoint, "-o", tmp_path / "local" / "seg.nii.gz")
    assert local.exit_code == 0, local.output
    url = f"{orthanc.dicomweb}/studies/{STUDY_UID}"
    remote = run("segment", url, "brain", "--dicom-seg", "--store", "-o", tmp_path / "out", "-m", small_checkpoint)
    assert remote.exit_code == 0, remote.output
    out = tmp_path / "out" / f"{STUDY_UID}.nii.gz"
    assert remote.stdout.strip().splitlines() == [str(out)]
    a, grid_a = labels_of(tmp_path / "local" / "seg.nii.gz")
    b, grid_b = labels_of(out)
    assert grid_a == grid_b
    np.testing.assert_array_equal(a, b)

    sidecar = json.loads(out.with_name(f"{STUDY_UID}.json").read_text())
    assert sidecar["input"] == url
    web = sidecar["dicomweb"]
    assert (web["server"], web["study"], web["series"], web["instances"]) == (orthanc.dicomweb, STUDY_UID,
                                                                              SERIES_UID, 4)
    stored = web["store"]
    assert stored["server"] == orthanc.dicomweb and stored["http_status"] == 200
    [sop] = stored["sop_instance_uids"]
    assert stored["objects"] == {"dicom_seg": f"{STUDY_UID}.seg.dcm"}

    [seg] = seg_series(orthanc)
    seg_uid = seg["0020000E"]["Value"][0]
    [meta] = orthanc.get_json(f"/dicom-web/studies/{STUDY_UID}/series/{seg_uid}/metadata")
    assert meta["00080018"]["Value"] == [sop]
    referenced = [item["0020000E"]["Value"][0] for item in meta["00081115"]["Value"]]  # ReferencedSeriesSequence
    assert referenced == [SERIES_UID]
    assert not list(temporary.glob("text3dsam-dicomweb-*")), "temporary series copies left behind"

    # A rerun into another folder: the server already holds this SEG, so nothing is computed or stored.
    again = run("segment", url, "brain", "--dicom-seg", "--store", "--skip-existing", "-o", tmp_path / "again",
                "-m", small_checkpoint)
    assert again.exit_code == 0, again.output
    assert "0 done, 1 skipped, 0 failed" in again.stderr and "server holds its DICOM outputs" in again.stderr
    assert not (tmp_path / "again").exists() or not any((tmp_path / "again").iterdir())
    [still] = seg_series(orthanc)
    assert still["00201209"]["Value"] == [1]  # one instance in the one SEG series
    # Other prompts are another result: not skipped (checked without storing it).
    other = run("segment", url, "brain", "skull", "--dicom-seg", "--skip-existing", "-o", tmp_path / "other", "-m",
                small_checkpoint)
    assert other.exit_code == 0, other.output
    assert "1 done, 0 skipped" in other.stderr and (tmp_path / "other" / f"{STUDY_UID}.seg.dcm").exists()
    assert len(seg_series(orthanc)) == 1


@pytest.mark.slow
def test_rtstruct_store_and_skip(tmp_path, small_checkpoint):
    """--rtstruct --store: the RT Structure Set goes back referencing the series; --skip-existing finds it, but
    not for a run that also wants a DICOM-SEG (not stored yet)."""
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        server.load(sorted(SERIES.iterdir()))
        url = f"{server.dicomweb}/studies/{STUDY_UID}/series/{SERIES_UID}"
        first = run("segment", url, "brain", "--rtstruct", "--store", "-o", tmp_path / "a", "-m", small_checkpoint)
        assert first.exit_code == 0, first.output
        sidecar = json.loads((tmp_path / "a" / f"{SERIES_UID}.json").read_text())
        assert sidecar["dicomweb"]["store"]["objects"] == {"rtstruct": f"{SERIES_UID}.rtstruct.dcm"}
        [rt] = server.get_json(f"/dicom-web/studies/{STUDY_UID}/series?Modality=RTSTRUCT")
        assert rt["0020000E"]["Value"] == sidecar["dicomweb"]["store"]["series_instance_uids"]
        again = run("segment", url, "brain", "--rtstruct", "--skip-existing", "-o", tmp_path / "b", "-m",
                    small_checkpoint)
        assert again.exit_code == 0 and "0 done, 1 skipped" in again.stderr, again.output
        both = run("segment", url, "brain", "--rtstruct", "--dicom-seg", "--skip-existing", "-o", tmp_path / "c",
                   "-m", small_checkpoint)
        assert both.exit_code == 0 and "1 done, 0 skipped" in both.stderr, both.output
    finally:
        server.stop()


def test_pacs_search_lists_the_study(orthanc):
    result = run("pacs", "search", orthanc.dicomweb)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"{orthanc.dicomweb}/studies/{STUDY_UID}"]
    result = run("pacs", "search", orthanc.dicomweb, "--json", "--modality", "MR", "--study-date",
                 "20160101-20161231", "--patient-id", "dicom2nifti", "--limit", "5")
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["url"] == f"{orthanc.dicomweb}/studies/{STUDY_UID}"
    assert record["StudyInstanceUID"] == STUDY_UID
    assert "MR" in record["ModalitiesInStudy"]
    assert record["StudyDate"] == "20160309"
    assert record["NumberOfStudyRelatedInstances"] >= 4
    for filters in (["--modality", "CT"], ["--study-date", "20200101-"], ["--accession", "NOPE"]):
        result = run("pacs", "search", orthanc.dicomweb, *filters)
        assert result.exit_code == 0 and result.stdout == "", (filters, result.output)
    bad = run("pacs", "search", orthanc.dicomweb, "--study-date", "2016")
    assert bad.exit_code == 2


def test_search_piped_into_segment_and_stdin_urls(orthanc, small_checkpoint, tmp_path):
    """`pacs search URL | segment -`: the whole workflow; a bad URL among them fails alone."""
    found = run("pacs", "search", orthanc.dicomweb, "--modality", "MR")
    assert found.exit_code == 0
    listed = found.stdout + f"{orthanc.dicomweb}/studies/1.2.3.4.5\n"
    result = run("segment", "-", "brain", "-o", tmp_path / "segs", "-m", small_checkpoint, input=listed)
    assert result.exit_code == 1, result.output
    assert (tmp_path / "segs" / f"{STUDY_UID}.nii.gz").exists()
    [line] = error_lines(result)
    assert f"{orthanc.dicomweb}/studies/1.2.3.4.5" in line and "no such study" in line
    assert not (tmp_path / "segs" / "1.2.3.4.5.nii.gz").exists()


def test_missing_series_is_one_line_with_http_404(orthanc, small_checkpoint, tmp_path):
    url = f"{orthanc.dicomweb}/studies/{STUDY_UID}/series/1.2.3.999"
    result = run("segment", url, "brain", "-o", tmp_path / "out", "-m", small_checkpoint)
    assert result.exit_code == 1
    [line] = error_lines(result)
    assert url in line and "HTTP 404" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    study = f"{orthanc.dicomweb}/studies/{STUDY_UID}"
    result = run("segment", study, "brain", "--series", "1.2.3.999", "-o", tmp_path / "out", "-m", small_checkpoint)
    assert result.exit_code == 1
    [line] = error_lines(result)
    assert line.startswith(f"error: {study}: ") and "--series 1.2.3.999: not a series of this study" in line


def test_study_series_choice_skips_non_image_series(orthanc, monkeypatch):
    """For a study URL: the image series with the most instances, never SEG/RTSTRUCT/SR/PR however large."""
    client = dicomweb.Client(orthanc.dicomweb)
    src = dicomweb.DicomWebSource(f"{orthanc.dicomweb}/studies/{STUDY_UID}")
    assert client.choose_series(src) == SERIES_UID  # the real listing

    def entry(uid, modality, count):
        return {"0020000E": {"vr": "UI", "Value": [uid]}, "00080060": {"vr": "CS", "Value": [modality]},
                "00201209": {"vr": "IS", "Value": [count]}}

    listing = [entry("1.1", "SEG", 900), entry("1.2", "SR", 800), entry("1.3", "PR", 700),
               entry("1.4", "RTSTRUCT", 600), entry("1.5", "CT", 20), entry("1.6", "CT", 120), entry("1.7", "MR", 50)]
    monkeypatch.setattr(client, "series_of", lambda study, modality=None: listing)
    assert client.choose_series(src) == "1.6"
    assert client.choose_series(src, "1.7") == "1.7"


def test_server_stopped_exits_1_with_one_line(tmp_path, small_checkpoint):
    server = Orthanc(tmp_path / "orthanc").start()
    server.load(sorted(SERIES.iterdir()))
    url = f"{server.dicomweb}/studies/{STUDY_UID}"
    server.stop()
    result = run("segment", url, "brain", "--dicom-seg", "--store", "-o", tmp_path / "out", "-m", small_checkpoint)
    assert result.exit_code == 1
    [line] = error_lines(result)
    assert url in line and "connection refused" in line and "after 3 retries" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # --skip-existing asks the server first: that failure is the same one line.
    result = run("segment", url, "brain", "--dicom-seg", "--store", "--skip-existing", "-o", tmp_path / "out", "-m",
                 small_checkpoint)
    assert result.exit_code == 1
    [line] = error_lines(result)
    assert line.startswith(f"error: {url}: ") and "connection refused" in line


@pytest.mark.slow
def test_refused_stow_leaves_no_outputs(orthanc, refusing, small_checkpoint, tmp_path):
    """A SEG the server refuses (HTTP 403), or answers with success but drops: one line with the URL and the
    HTTP status, exit 1, no local outputs; with --store-to the input's own server receives nothing."""
    forbidding, dropping = refusing
    for source, extra, target, status in ((forbidding, [], forbidding, "HTTP 403"),
                                          (orthanc, ["--store-to", dropping.dicomweb], dropping, "HTTP 200")):
        out = tmp_path / f"out{len(extra)}"
        before = len(seg_series(orthanc))
        result = run("segment", f"{source.dicomweb}/studies/{STUDY_UID}", "brain", "--dicom-seg", "--store", *extra,
                     "-o", out, "-m", small_checkpoint)
        assert result.exit_code == 1, result.output
        [line] = error_lines(result)
        assert f"{target.dicomweb}/studies" in line and "STOW-RS store" in line and status in line, line
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
        assert len(seg_series(orthanc)) == before
        assert seg_series(target) == []


def test_store_usage_errors(orthanc, small_checkpoint, tmp_path):
    url = f"{orthanc.dicomweb}/studies/{STUDY_UID}"
    result = run("segment", url, "brain", "--store", "-o", tmp_path / "a", "-m", small_checkpoint)
    assert result.exit_code == 2 and "--dicom-seg" in result.output
    result = run("segment", SERIES, "brain", "--dicom-seg", "--store", "-o", tmp_path / "b", "-m", small_checkpoint)
    assert result.exit_code == 2 and "--store-to" in result.output
    result = run("segment", SERIES, "brain", "--dicom-seg", "--store-to", "ftp://x/y", "-o", tmp_path / "c")
    assert result.exit_code == 2
    result = run("segment", "https://example.org/not/dicomweb", "brain", "-o", tmp_path / "d")
    assert result.exit_code == 1 and "not a DICOMweb study or series URL" in result.output
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))


def test_basic_auth_against_orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc", users={"alice": "s3cret-pw"}).start()
    try:
        server.load(sorted(SERIES.iterdir()))
        refused = run("pacs", "search", server.dicomweb)
        assert refused.exit_code == 1
        [line] = error_lines(refused)
        assert "HTTP 401" in line and server.dicomweb in line
        ok = run("pacs", "search", server.dicomweb, env={"DICOMWEB_USER": "alice", "DICOMWEB_PASSWORD": "s3cret-pw"})
        assert ok.exit_code == 0, ok.output
        assert ok.stdout.splitlines() == [f"{server.dicomweb}/studies/{STUDY_UID}"]
        inline = run("pacs", "search", server.dicomweb.replace("http://", "http://alice:s3cret-pw@"))
        assert inline.exit_code == 0, inline.output
        assert inline.stdout.splitlines() == [f"{server.dicomweb}/studies/{STUDY_UID}"]  # no credentials shown
        wrong = run("pacs", "search", server.dicomweb.replace("http://", "http://alice:wrong-pw@"))
        assert wrong.exit_code == 1 and "HTTP 401" in wrong.output and "wrong-pw" not in wrong.output
    finally:
        server.stop()


def test_bearer_token_on_the_wire_and_nowhere_else(orthanc, small_checkpoint, tmp_path):
    relay = Relay(orthanc.http_port)
    try:
        result = run("pacs", "search", relay.dicomweb, "--dicomweb-token", SECRET)
        assert result.exit_code == 0, result.output
        assert f"Authorization: Bearer {SECRET}".encode() in bytes(relay.sent)
        assert SECRET not in result.output
        relay.sent.clear()
        url = f"{relay.dicomweb}/studies/{STUDY_UID}"
        done = run("--debug", "segment", url, "brain", "-o", tmp_path / "out", "-m", small_checkpoint,
                   env={"DICOMWEB_TOKEN": SECRET})
        assert done.exit_code == 0, done.output
        assert f"Authorization: Bearer {SECRET}".encode() in bytes(relay.sent)
        failed = run("--debug", "segment", f"{url}/series/1.2.3.999", "brain", "-o", tmp_path / "bad", "-m",
                     small_checkpoint, "--dicomweb-token", SECRET)
        assert failed.exit_code == 1 and "HTTP 404" in failed.output
        for text in (done.output, failed.output, *(p.read_text(errors="replace") for p in
                                                   (tmp_path / "out").iterdir())):
            assert SECRET not in text
        assert "Credentials(token)" in repr(dicomweb.credentials(SECRET))
    finally:
        relay.close()


def test_cut_transfer_is_retried_then_reported(orthanc, small_checkpoint, tmp_path):
    url_of = lambda relay: f"{relay.dicomweb}/studies/{STUDY_UID}/series/{SERIES_UID}"  # noqa: E731
    once = Relay(orthanc.http_port, cut_after=3000, cut_connections=1)
    try:
        result = run("segment", url_of(once), "brain", "-o", tmp_path / "once", "-m", small_checkpoint)
        assert result.exit_code == 0, result.output
        assert once.cuts == 1 and once.connections >= 2
    finally:
        once.close()
    always = Relay(orthanc.http_port, cut_after=3000, cut_connections=99)
    try:
        result = run("segment", url_of(always), "brain", "-o", tmp_path / "always", "-m", small_checkpoint)
        assert result.exit_code == 1
        [line] = error_lines(result)
        assert url_of(always) in line and "transfer cut off" in line and "after 3 retries" in line
        assert always.cuts == 4  # the first try and 3 retries
        assert not (tmp_path / "always").exists() or not any((tmp_path / "always").iterdir())
    finally:
        always.close()


def test_connection_refused_is_retried_until_the_server_is_up(tmp_path, monkeypatch):
    monkeypatch.setattr(dicomweb, "BACKOFF_S", 0.5)  # waits 0.5, 1, 2 s: the server starts within them
    server = Orthanc(tmp_path / "orthanc")
    starter = threading.Timer(0.3, server.start)
    t0 = time.monotonic()
    starter.start()
    try:
        result = run("pacs", "search", server.dicomweb)
        assert result.exit_code == 0, result.output
        assert time.monotonic() - t0 > 0.3
    finally:
        starter.join()
        server.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_tls_is_verified_and_requests_ca_bundle_honoured(tmp_path, monkeypatch):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"), "-out",
                    str(tmp_path / "cert.pem")], check=True, capture_output=True)
    server = Orthanc(tmp_path / "orthanc").start()
    relay = Relay(server.http_port, certificate=tmp_path / "cert.pem", key=tmp_path / "key.pem")
    try:
        server.load(sorted(SERIES.iterdir()))
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        untrusted = run("pacs", "search", relay.dicomweb)
        assert untrusted.exit_code == 1
        [line] = error_lines(untrusted)
        assert relay.dicomweb in line and "certificate not verified" in line and "REQUESTS_CA_BUNDLE" in line
        trusted = run("pacs", "search", relay.dicomweb, env={"REQUESTS_CA_BUNDLE": str(tmp_path / "cert.pem")})
        assert trusted.exit_code == 0, trusted.output
        assert trusted.stdout.splitlines() == [f"{relay.dicomweb}/studies/{STUDY_UID}"]
    finally:
        relay.close()
        server.stop()


def test_shard_splits_urls_like_files():
    urls = [f"http://127.0.0.1:9/dicom-web/studies/1.2.{n}" for n in range(5)]
    items = expand_inputs(urls)
    assert [str(i.path) for i in items] == urls and [i.stem for i in items] == [f"1.2.{n}" for n in range(5)]
    shards = [select_shard(items, f"{i}/2") for i in (1, 2)]
    assert sorted(str(i.path) for s in shards for i in s) == sorted(urls)
    assert not {str(i.path) for i in shards[0]} & {str(i.path) for i in shards[1]}
    auto = select_shard(items, "auto", {"RANK": "1", "WORLD_SIZE": "2"})
    assert [str(i.path) for i in auto] == [str(i.path) for i in shards[1]]


def test_urls_never_show_credentials():
    src = dicomweb.DicomWebSource("https://bob:pw123@pacs.example.org:8443/dicom-web/studies/1.2.3?token=abc")
    assert str(src) == "https://pacs.example.org:8443/dicom-web/studies/1.2.3"
    assert src.base == "https://pacs.example.org:8443/dicom-web"
    assert "pw123" not in repr(src) and "abc" not in str(src)
    assert dicomweb.credentials(None, "https://bob:pw123@h/x", environ={}).user == "bob"
    assert dicomweb.credentials(None, None, environ={"DICOMWEB_TOKEN": "t"}).token == "t"
    env = {"DICOMWEB_USER": "u", "DICOMWEB_PASSWORD": "p"}
    assert (dicomweb.credentials(None, None, environ=env).user, dicomweb.credentials("x", None, environ=env).token) \
        == ("u", "x")


def test_retry_rule_for_http_statuses(orthanc):
    """502/503/504 are retried 3 times (then one line with the status); other statuses are not retried."""
    import requests

    client = dicomweb.Client(orthanc.dicomweb)

    def failing(statuses):
        calls = []

        def action():
            calls.append(1)
            status = statuses[min(len(calls), len(statuses)) - 1]
            if status == 200:
                return "ok"
            response = requests.Response()
            response.status_code, response.reason = status, "Whatever"
            raise requests.HTTPError(response=response)

        return action, calls

    action, calls = failing([503, 502, 200])
    assert client.call("X", orthanc.dicomweb, action) == "ok" and len(calls) == 3
    action, calls = failing([504])
    with pytest.raises(dicomweb.DicomWebError, match=r"X failed: HTTP 504 Whatever after 3 retries") as info:
        client.call("X", orthanc.dicomweb, action)
    assert len(calls) == 4 and info.value.status == 504
    action, calls = failing([404])
    with pytest.raises(dicomweb.DicomWebError, match="HTTP 404"):
        client.call("X", orthanc.dicomweb, action)
    assert len(calls) == 1
