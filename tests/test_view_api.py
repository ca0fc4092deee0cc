"""``text3dsam view``'s API through the ASGI test client: encode once, label map on the input grid, safety."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA
from typer.testing import CliRunner

pytest.importorskip("starlette", reason="the view extra (starlette) is not installed")
pytest.importorskip("httpx", reason="httpx (for Starlette's TestClient) is not installed")
from starlette.testclient import TestClient

from text3dsam_cli.cli import app as cli_app
from text3dsam_cli.inference import Segmenter
from text3dsam_cli.io import read_volume
from text3dsam_cli.quality import assess_labels
from text3dsam_cli.view import ViewSession
from text3dsam_cli.view.app import STATIC_FILES, create_app

CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
BASE = "http://127.0.0.1:8765"


class EncoderCounter:
    """Counts forward calls of the model's image encoder (a hook, removed afterwards)."""

    def __init__(self, model):
        self.calls = 0
        self._handle = model.image_encoder.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1

    def remove(self):
        self._handle.remove()


def authorized(app, **kwargs) -> TestClient:
    """A test client of ``app`` that sends the app's access token with every request."""
    return TestClient(app, base_url=kwargs.pop("base_url", BASE),
                      headers={"Authorization": f"Bearer {app.state.token}"}, **kwargs)


@pytest.fixture(scope="module")
def ct_session(small_model):
    segmenter = Segmenter(small_model, device="cpu", mode="whole")
    return ViewSession(segmenter, read_volume(CT))


@pytest.fixture()
def client(ct_session):
    with authorized(create_app(ct_session), raise_server_exceptions=False) as c:
        yield c


def _post(client, prompts):
    return client.post("/api/segment", json={"prompts": prompts})


def test_second_request_decodes_only_the_new_prompt(small_model):
    """The image is encoded once per server; a request adding a prompt decodes only that prompt.

    Counted, not timed: forward calls of the image encoder, and the prompts each decoder call is given (a fresh
    server and Segmenter: nothing cached from other tests).
    """
    session = ViewSession(Segmenter(small_model, device="cpu", mode="whole"), read_volume(CT))
    encoder = EncoderCounter(small_model)
    decoded: list[int] = []
    decoder = small_model.seg_decoder.register_forward_hook(lambda module, args, out: decoded.append(len(args[1])))
    try:
        with authorized(create_app(session)) as client:
            first = _post(client, ["liver"])
            calls_after_first, decoded_after_first = encoder.calls, list(decoded)
            second = _post(client, ["liver", "spleen"])
            third = _post(client, ["spleen", "liver", "aorta"])
    finally:
        encoder.remove()
        decoder.remove()
    assert first.status_code == second.status_code == third.status_code == 200, first.text
    assert calls_after_first == 1 and decoded_after_first == [1]
    assert encoder.calls == 1  # the later requests never ran the image encoder
    assert decoded == [1, 1, 1]  # liver; then spleen alone; then aorta alone
    assert first.json()["timings"]["encode"] > 0
    assert second.json()["timings"]["encode"] == 0 == third.json()["timings"]["encode"]
    labels = second.json()["labels"]
    assert [(r["label"], r["prompt"]) for r in labels] == [(1, "liver"), (2, "spleen")]
    assert {"voxels", "volume_ml", "components"} <= set(labels[0])
    assert [r["prompt"] for r in third.json()["labels"]] == ["spleen", "liver", "aorta"]


def test_label_map_is_on_the_input_grid_and_equals_segment(client, small_checkpoint, tmp_path):
    answer = _post(client, ["liver", "spleen"])
    assert answer.status_code == 200, answer.text
    download = client.get("/api/labels.nii.gz")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/gzip"
    served = tmp_path / "served.nii.gz"
    served.write_bytes(download.content)

    written = tmp_path / "seg.nii.gz"
    result = CliRunner().invoke(cli_app, ["segment", str(CT), "liver", "spleen", "-m", str(small_checkpoint),
                                          "--device", "cpu", "--mode", "whole", "-o", str(written)])
    assert result.exit_code == 0, result.output
    a, b, ct = (sitk.ReadImage(str(p)) for p in (served, written, CT))
    for image in (a, b):
        assert image.GetSize() == ct.GetSize()
        assert image.GetSpacing() == ct.GetSpacing()
        assert image.GetOrigin() == ct.GetOrigin()
        assert image.GetDirection() == ct.GetDirection()
    assert a.GetPixelID() == b.GetPixelID()
    served_labels, written_labels = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
    assert np.array_equal(served_labels, written_labels)
    rows = {r["label"]: r for r in answer.json()["labels"]}
    for value in (1, 2):
        assert rows[value]["voxels"] == int((written_labels == value).sum())

    sidecar = client.get("/api/sidecar.json")
    assert sidecar.status_code == 200
    ours, theirs = sidecar.json(), json.loads((tmp_path / "seg.json").read_text())
    assert ours["labels"] == theirs["labels"]
    assert ours["prompts"] == theirs["prompts"] and ours["geometry"] == theirs["geometry"]
    assert ours["modality"] == theirs["modality"]


def test_image_is_the_scan_on_its_own_grid(client):
    download = client.get("/api/image.nii.gz")
    assert download.status_code == 200
    import gzip

    import nibabel as nib

    image = nib.Nifti1Image.from_bytes(gzip.decompress(download.content))
    original = nib.load(str(CT))
    np.testing.assert_allclose(image.affine, original.affine, atol=1e-4)
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(original.dataobj))


def test_page_and_assets_are_served_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text
    for name in STATIC_FILES:
        response = client.get(f"/static/{name}")
        assert response.status_code == 200, name
    script = client.get("/static/app.js").text
    assert 'from "/static/niivue/niivue.js"' in script
    assert "https://" not in script and "http://" not in script
    assert "0.69.0" in client.get("/static/niivue/VERSION").text
    info = client.get("/api/info").json()
    assert info["modality"]["modality"] == "CT" and "soft tissue" in info["window_presets"]


@pytest.mark.parametrize("path", [
    "/static/../view/session.py", "/static/%2e%2e/%2e%2e/pyproject.toml", "/static/..%2f..%2fpyproject.toml",
    "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/static/niivue/../../app.py", "/etc/passwd",
    "/static/index.html/..", "/api/../pyproject.toml", "/static/C:%5cWindows%5cwin.ini", "/static/niivue",
    "/static/niivue/index.js.map", "/static/niivue/niivue.js.map", "/static/__init__.py",
])
def test_no_other_file_is_served(client, path):
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code)
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()


@pytest.mark.parametrize(("body", "content_type", "status"), [
    (b"{not json", "application/json", 400),
    (b'["liver"]', "application/json", 400),
    (b'{"prompt": ["liver"]}', "application/json", 400),
    (b'{"prompts": "liver"}', "application/json", 400),
    (b'{"prompts": [1, 2]}', "application/json", 400),
    (b'{"prompts": ["  "]}', "application/json", 400),
    (b'{"prompts": ["liver", "liver"]}', "application/json", 400),
    (b'{"prompts": ["liver"], "extra": 1}', "application/json", 400),
    (json.dumps({"prompts": ["x"] * 65}).encode(), "application/json", 400),
    (json.dumps({"prompts": ["x" * 501]}).encode(), "application/json", 400),
    (b'{"prompts": ["' + b"x" * 70000 + b'"]}', "application/json", 413),
    (b'{"prompts": ["liver"]}', "text/plain", 415),
])
def test_bad_requests_get_json_4xx(client, body, content_type, status):
    response = client.post("/api/segment", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]
    assert "Traceback" not in response.text


def test_wrong_method_wrong_host_and_early_sidecar_are_json_errors(small_model):
    session = ViewSession(Segmenter(small_model, device="cpu", mode="whole"), read_volume(CT))
    with authorized(create_app(session)) as client:
        assert client.get("/api/segment").status_code == 405
        assert client.get("/api/segment").json()["error"]
        early = client.get("/api/sidecar.json")
        assert early.status_code == 400 and "no prompts" in early.json()["error"]
        empty = client.get("/api/labels.nii.gz")  # before any prompt: an all-zero map on the input grid
        assert empty.status_code == 200
        assert client.get("/api/vocabulary?limit=x").status_code == 400
    with authorized(create_app(session), base_url="http://evil.example:8765") as client:
        response = client.get("/api/info")
        assert response.status_code == 400 and response.json()["error"] == "invalid Host header"


def test_a_bug_is_a_json_500_without_traceback(ct_session, monkeypatch):
    def broken(prompts):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(ct_session, "segment", broken)
    with authorized(create_app(ct_session), raise_server_exceptions=False) as client:
        response = _post(client, ["liver"])
    assert response.status_code == 500
    assert response.json()["error"].startswith("internal error (RuntimeError)")
    assert "secret" not in response.text and "Traceback" not in response.text


def test_no_prompts_clears_the_map(client):
    assert _post(client, ["liver"]).status_code == 200
    cleared = _post(client, [])
    assert cleared.status_code == 200 and cleared.json()["labels"] == []
    assert client.get("/api/sidecar.json").status_code == 400


def test_vocabulary_suggestions(client):
    answer = client.get("/api/vocabulary", params={"q": "kidney", "modality": "CT", "limit": 5})
    assert answer.status_code == 200, answer.text
    suggestions = answer.json()["suggestions"]
    assert 0 < len(suggestions) <= 5
    assert "kidney" in suggestions[0]["name"].lower()
    assert all(s["modality"] == "CT" for s in suggestions)
    everything = client.get("/api/vocabulary", params={"limit": 200}).json()["suggestions"]
    assert len(everything) > len(suggestions)
    assert client.get("/api/vocabulary", params={"q": "x" * 201}).status_code == 400


def test_legend_components_are_the_quality_report():
    """The legend counts components with segment's quality report (26-connectivity)."""
    labels = np.zeros((5, 5, 5), dtype=np.uint8)
    assert assess_labels(labels, [1], 1.0)[1]["components"] == 0
    labels[0, 0, 0] = labels[1, 1, 1] = 1  # diagonal neighbours: one component (26-connectivity)
    labels[4, 4, 4] = 1
    assert assess_labels(labels, [1], 1.0)[1]["components"] == 2


def test_segment_encoded_matches_segment(small_model):
    """encode once + segment_encoded gives exactly segment's labels, in both strategies."""
    volume = read_volume(CT)
    from text3dsam_cli.pipeline import prepare_scan

    scan = prepare_scan(volume)
    for mode in ("whole", "sliding"):
        segmenter = Segmenter(small_model, device="cpu", mode=mode, spacing=(3.0, 3.0, 3.0))
        direct = segmenter.segment(scan.image, ["liver", "spleen"], spacing=scan.spacing)
        encoded = segmenter.encode(scan.image, scan.spacing)
        first = segmenter.segment_encoded(encoded, ["spleen"], [2])
        both = segmenter.segment_encoded(encoded, ["liver", "spleen"])
        assert np.array_equal(both.labels, direct.labels), mode
        assert set(encoded.logits) == {"liver", "spleen"}
        assert first.labels.shape == direct.labels.shape
        assert {"text", "encode", "decode", "upsample", "total"} <= set(direct.timings)


# -- the command ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_view_command_warns_for_other_hosts_and_refuses_a_busy_port(small_checkpoint):
    runner = CliRunner()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(cli_app, ["view", str(CT), "-m", str(small_checkpoint), "--no-browser",
                                         "--port", str(port)])
    assert result.exit_code == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.output
    result = runner.invoke(cli_app, ["view", str(CT), "-m", str(small_checkpoint), "--no-browser",
                                     "--host", "0.0.0.0", "--port", "0"])
    assert "warning: listening on 0.0.0.0" in " ".join(result.output.split())
    assert result.exit_code == 2


def test_view_command_names_a_bad_input(small_checkpoint, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    for path in (broken, tmp_path / "missing.nii.gz"):
        result = CliRunner().invoke(cli_app, ["view", str(path), "-m", str(small_checkpoint), "--no-browser",
                                              "--port", str(_free_port())])
        assert result.exit_code != 0
        assert str(path) in " ".join(result.output.split()) and "Traceback" not in result.output


def test_view_command_refuses_a_folder_of_several_inputs(small_checkpoint, tmp_path):
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(CT.read_bytes())
    result = CliRunner().invoke(cli_app, ["view", str(tmp_path), "-m", str(small_checkpoint), "--no-browser",
                                          "--port", str(_free_port())])
    assert result.exit_code == 2
    assert "one scan is needed" in result.output


@pytest.mark.slow
def test_view_command_serves_on_loopback_opens_the_browser_and_stops_on_ctrl_c(small_checkpoint, tmp_path):
    port = _free_port()
    opened = tmp_path / "opened.txt"
    fake_browser = tmp_path / "browser.py"  # what $BROWSER names is what webbrowser.open runs
    fake_browser.write_text(f"import sys, pathlib; pathlib.Path({str(opened)!r}).write_text(sys.argv[1])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "BROWSER": f"{sys.executable} {fake_browser} %s"}
    proc = subprocess.Popen([sys.executable, "-m", "text3dsam_cli", "view", str(CT), "-m", str(small_checkpoint),
                             "--device", "cpu", "--port", str(port)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while not (any("viewer at" in line for line in lines) and opened.exists()):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        printed = re.search(r"viewer at (http://\S+)", "".join(lines)).group(1)
        token = printed.split("?token=", 1)[1]
        assert printed == f"{url}?token={token}" and len(token) >= 40  # secrets.token_urlsafe(32)
        assert opened.read_text() == printed
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /static/../../../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        assert raw.startswith(b"HTTP/1.1 404") and b"root:" not in raw
        import httpx

        assert httpx.post(f"{url}api/segment", json={"prompts": ["liver"]}, timeout=30).status_code == 403
        answer = httpx.post(f"{url}api/segment", json={"prompts": ["liver"]}, timeout=120,
                            headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.json()["timings"]["encode"] == 0  # encoded at start-up
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    text = "".join(lines)
    assert "viewer stopped" in text and "Traceback" not in text


# -- who may use the API (issue 19, item 2) -----------------------------------------------------------------------
API_ROUTES = [("GET", "/api/info"), ("POST", "/api/segment"), ("GET", "/api/labels.nii.gz"),
              ("GET", "/api/image.nii.gz"), ("GET", "/api/sidecar.json"), ("GET", "/api/vocabulary")]


def test_every_api_request_needs_the_token_static_files_do_not(ct_session):
    app = create_app(ct_session)
    token = app.state.token
    assert len(token) >= 40  # secrets.token_urlsafe(32)
    assert create_app(ct_session).state.token != token  # one per server
    with TestClient(app, base_url=BASE) as anonymous:
        for method, path in API_ROUTES:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"},
                            {"Authorization": f"Bearer {token[:-1]}"}, {"Cookie": f"text3dsam_view_8765={token}x"}):
                response = anonymous.request(method, path, headers=headers, json={"prompts": ["liver"]})
                assert response.status_code == 403, (path, headers, response.status_code)
                assert response.headers["content-type"] == "application/json"
                assert "token" in response.json()["error"]
        assert anonymous.get("/").status_code == 200
        assert anonymous.get("/static/app.js").status_code == 200
        assert anonymous.get("/", params={"token": "wrong"}).status_code == 403
    with TestClient(app, base_url=BASE, headers={"Authorization": f"Bearer {token}"}) as client:
        assert client.get("/api/info").status_code == 200


def test_opening_the_page_with_the_token_sets_a_strict_http_only_cookie(ct_session):
    app = create_app(ct_session, token="a-given_token.1~")
    with TestClient(app, base_url=BASE) as browser:
        opened = browser.get("/?token=a-given_token.1~", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/"  # token out of the address bar
        cookie = opened.headers["set-cookie"]
        assert cookie.startswith("text3dsam_view_8765=a-given_token.1~;")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert browser.get("/api/info").status_code == 200  # the cookie jar now holds it
        assert browser.get("/").status_code == 200
    with pytest.raises(Exception, match="--token"):
        create_app(ct_session, token="has space")


def test_cross_origin_and_non_json_posts_are_refused_and_change_nothing(ct_session):
    app = create_app(ct_session)
    with authorized(app, raise_server_exceptions=False) as client:
        assert _post(client, ["liver"]).status_code == 200
        before = client.get("/api/labels.nii.gz").content
        # the probe: a simple (no-preflight) cross-site POST, token or not
        for headers in ({"Origin": "http://evil.example", "Content-Type": "text/plain; application/json"},
                        {"Origin": "http://evil.example", "Content-Type": "application/json"},
                        {"Origin": "null", "Content-Type": "application/json"},
                        {"Origin": "http://127.0.0.1:9999", "Content-Type": "application/json"},
                        {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"},
                        {"Sec-Fetch-Site": "same-site", "Content-Type": "application/json"}):
            response = client.post("/api/segment", content=b'{"prompts":["kidney"]}', headers=headers)
            assert response.status_code == 403, (headers, response.text)
        for content_type in ("text/plain; application/json", "text/plain", "application/json-patch+json",
                             "application/x-www-form-urlencoded", "multipart/form-data", ""):
            response = client.post("/api/segment", content=b'{"prompts":["kidney"]}',
                                   headers={"Content-Type": content_type})
            assert response.status_code == 415, (content_type, response.text)
        assert client.get("/api/labels.nii.gz").content == before  # the session's map is untouched
        assert client.get("/api/sidecar.json").json()["prompts"] == {"liver": 1}
        same = client.post("/api/segment", content=b'{"prompts":[]}', headers={
            "Origin": BASE, "Sec-Fetch-Site": "same-origin", "Content-Type": "application/json; charset=utf-8"})
        assert same.status_code == 200, same.text


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"prompts": ' + b"[" * 30000 + b"]" * 30000 + b"}", 400, "nested too deeply"),
    (b'{"prompts": ["\\ud800 liver"]}', 400, "unpaired surrogate"),
    (b'{"prompts": ["\\udfff"]}', 400, "unpaired surrogate"),
])
def test_deep_nesting_and_unpaired_surrogates_are_400(client, body, status, message):
    response = client.post("/api/segment", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_host_header_is_parsed_strictly(ct_session):
    app = create_app(ct_session, allowed_hosts=["127.0.0.1", "localhost", "127.0.0.2"])
    with authorized(app) as client:
        for host in ("127.0.0.1:8765", "127.0.0.1", "LOCALHOST:8765", "127.0.0.2:8765"):
            assert client.get("/api/info", headers={"Host": host}).status_code == 200, host
        for host in ("127.0.0.1:8765@evil.com", "evil.com#@127.0.0.1", "127.0.0.1:8765/x", "127.0.0.1:abc",
                     "127.0.0.1:99999", "127.0.0.1 evil.com", "", "evil.com", "127.0.0.3:8765", "user@127.0.0.1"):
            response = client.get("/api/info", headers={"Host": host})
            assert response.status_code == 400, host
            assert response.json()["error"] == "invalid Host header"


def _raw_exchange(port: int, head: bytes, body_chunks=None, host: str = "127.0.0.2") -> tuple[bytes, int]:
    """Send ``head`` (+ chunks until the server answers); the answer and how many body bytes went out."""
    sent = 0
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        raw = b""
        for chunk in body_chunks or []:
            with contextlib.suppress(BlockingIOError):
                raw += sock.recv(65536)
            if raw:
                break
            try:
                sock.sendall(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            time.sleep(0.002)
        sock.setblocking(True)
        try:
            while chunk := sock.recv(65536):
                raw += chunk
                if b"\r\n\r\n" in raw and raw.rstrip().endswith(b"}"):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    return raw, sent


def test_real_server_on_127_0_0_2_with_a_given_token_and_bounded_bodies(ct_session):
    """The printed address works for --host 127.0.0.2; big bodies are refused before they are read."""
    import httpx

    from text3dsam_cli.view.server import make_server

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.2", 0))
        except OSError:
            pytest.skip("127.0.0.2 is not a loopback address here")
        port = sock.getsockname()[1]
    server, url = make_server(ct_session, "127.0.0.2", port, token="given-token")
    assert url == f"http://127.0.0.2:{port}/?token=given-token"
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        with httpx.Client(timeout=60, follow_redirects=True) as browser:
            page = browser.get(url)  # follows the redirect to / with the cookie set
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            assert str(page.url) == f"http://127.0.0.2:{port}/"
            assert browser.get(f"http://127.0.0.2:{port}/api/info").status_code == 200
        assert httpx.get(f"http://127.0.0.2:{port}/api/info").status_code == 403

        auth = b"Authorization: Bearer given-token\r\nContent-Type: application/json\r\n"
        start = f"POST /api/segment HTTP/1.1\r\nHost: 127.0.0.2:{port}\r\n".encode()
        # 300 MB announced, nothing sent: answered at once (the server does not wait to read it)
        raw, _ = _raw_exchange(port, start + auth + b"Content-Length: 300000000\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 413"), raw[:200]
        # a chunked body that never ends: refused after about 64 KB
        chunk = b"4000\r\n" + b"[" * 0x4000 + b"\r\n"
        raw, sent = _raw_exchange(port, start + auth + b"Transfer-Encoding: chunked\r\n\r\n", [chunk] * 2000)
        assert raw.startswith(b"HTTP/1.1 413"), raw[:200]
        print(f"chunked body: {sent} bytes sent before the 413")
        assert sent < 4 * 1024 * 1024, sent  # the sender stopped long before its 32 MB
        raw, _ = _raw_exchange(port, f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}@evil.com\r\n"
                               "Authorization: Bearer given-token\r\nConnection: close\r\n\r\n".encode())
        assert raw.startswith(b"HTTP/1.1 400") and b"invalid Host header" in raw
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_view_command_refuses_a_token_that_cannot_go_in_a_url(small_checkpoint):
    for token in ("has space", "semi;colon", "é", ""):
        result = CliRunner().invoke(cli_app, ["view", str(CT), "-m", str(small_checkpoint), "--no-browser",
                                              "--port", str(_free_port()), "--token", token])
        assert result.exit_code == 2, (token, result.output)
        assert "--token" in result.output and "Traceback" not in result.output


def test_printed_address_carries_the_token_and_the_bound_host():
    from text3dsam_cli.view.server import allowed_hosts, url_for

    assert url_for("127.0.0.2", 9000, "abc") == "http://127.0.0.2:9000/?token=abc"
    assert url_for("::1", 9000, "abc") == "http://[::1]:9000/?token=abc"
    assert url_for("0.0.0.0", 9000, "abc") == "http://127.0.0.1:9000/?token=abc"
    assert "127.0.0.2" in allowed_hosts("127.0.0.2") and allowed_hosts("0.0.0.0") == ["*"]
