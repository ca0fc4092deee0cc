"""A real Orthanc DICOMweb server for the tests (Debian's ``orthanc`` + ``orthanc-dicomweb``), and a TCP relay.

:class:`Orthanc` starts ``Orthanc`` on 127.0.0.1 with free HTTP and DICOM ports, a temporary storage folder and
a configuration of its own (never the system service's), loads DICOM files through its REST API
(``POST /instances``) and stops it. :class:`Relay` sits between a client and the server: it records what the
client sends (to see headers on the wire) and can cut answers off part-way (a transfer cut in the middle).
Nothing here answers in the server's place.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                "/usr/lib/*/orthanc/libOrthancDicomWeb.so*", "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*")


def orthanc_binary() -> str | None:
    """The Orthanc executable (Debian puts it in /usr/sbin, which may not be on PATH)."""
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                            if Path(p).exists()), None)


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared library (``dpkg -L orthanc-dicomweb``)."""
    try:
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=20)
        for line in listed.stdout.splitlines():
            if "libOrthancDicomWeb.so" in line and Path(line).is_file():
                return line
    except (OSError, subprocess.SubprocessError):
        pass
    for pattern in PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def missing() -> str | None:
    """Why Orthanc cannot run here (None: it can)."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Orthanc:
    """One Orthanc process with its own configuration and storage under ``root``."""

    def __init__(self, root: Path, users: dict[str, str] | None = None, lua: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.users = users
        self.http_port = free_port()
        self.dicom_port = free_port()
        config = {
            "Name": "text3dsam-test", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "RemoteAccessAllowed": False,
            "HttpServerEnabled": True, "DicomServerEnabled": True, "StorageCompression": False,
            "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
            "Plugins": [dicomweb_plugin()], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpCompressionEnabled": False, "ConcurrentJobs": 1, "HttpThreadsCount": 8,
        }
        if lua:
            (self.root / "filter.lua").write_text(lua)
            config["LuaScripts"] = [str(self.root / "filter.lua")]
        self.config = self.root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def _request(self, method: str, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_json(self, path: str):
        status, body = self._request("GET", path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body) if body.strip() else []

    def start(self, timeout: float = 60.0) -> Orthanc:
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 (kept open while the process runs)
        self.process = subprocess.Popen([orthanc_binary(), str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.root)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                if self._request("GET", "/system")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not start in time")

    def load(self, files: Iterable[Path]) -> int:
        """Upload DICOM files (``POST /instances``); the number uploaded."""
        count = 0
        for path in files:
            status, body = self._request("POST", "/instances", Path(path).read_bytes())
            assert status == 200, (path, status, body[:300])
            count += 1
        return count

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class Relay:
    """A TCP relay on 127.0.0.1 in front of ``port``: records the bytes clients send (``sent``) and, for the first
    ``cut_connections`` connections, closes the connection after ``cut_after`` bytes of the answer. With
    ``certificate`` and ``key`` (PEM files) it terminates TLS, like a reverse proxy in front of a PACS (Debian's
    Orthanc 1.10.1 itself crashes on its first HTTPS connection)."""

    def __init__(self, port: int, cut_after: int | None = None, cut_connections: int = 0,
                 certificate: Path | None = None, key: Path | None = None) -> None:
        self.target = port
        self.cut_after = cut_after
        self.cut_connections = cut_connections
        self.sent = bytearray()
        self.connections = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._tls = None
        if certificate is not None:
            import ssl

            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(str(certificate), str(key))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def dicomweb(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}/dicom-web"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._tls is not None:
                try:
                    client = self._tls.wrap_socket(client, server_side=True)
                except OSError:  # the client refused our certificate
                    client.close()
                    continue
            with self._lock:
                number = self.connections
                self.connections += 1
            cut = self.cut_after if self.cut_after is not None and number < self.cut_connections else None
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, upstream, True, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False, cut), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool, cut: int | None) -> None:
        passed = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if record:
                    with self._lock:
                        self.sent.extend(data)
                if cut is not None and passed + len(data) >= cut:
                    sink.sendall(data[: cut - passed])
                    with self._lock:
                        self.cuts += 1
                    break
                sink.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._stopped = True
        self._server.close()
