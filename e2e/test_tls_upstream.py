"""An https upstream whose certificate chains to a private CA (an in-house model
server, a corporate proxy): trusted with ``--upstream-ca-file``, refused without it,
and a file that holds no usable certificate stops the gateway at its start."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    CHAT_PATH,
    Recorder,
    assert_problem,
    chat_body,
    new_key,
    openai_headers,
    sdk_bytes,
    sdk_client,
    sdk_create,
    wait_until,
)


def make_ca_and_leaf(dir: Path) -> tuple[Path, Path, Path]:
    """A CA, and a leaf for 127.0.0.1 that it signed: (ca.pem, leaf.pem, leaf.key)."""

    def openssl(*args: str) -> None:
        done = subprocess.run(["openssl", *args], cwd=dir, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=e2e private CA", "-days", "2")
    openssl("req", "-new", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=127.0.0.1")
    (dir / "leaf.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext",
    )
    return dir / "ca.pem", dir / "leaf.pem", dir / "leaf.key"


class TlsTerminator:
    """Accepts TLS on 127.0.0.1 with the leaf certificate and pipes each connection's
    plaintext to the mock upstream; counts the handshakes that completed."""

    def __init__(self, leaf: Path, key: Path, upstream: str) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(leaf, key)
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}"
        self.handshakes = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        with self.lock:
            self.handshakes += 1
        plain = socket.create_connection(self.upstream)
        threading.Thread(target=pipe, args=(plain, tls), daemon=True).start()
        pipe(tls, plain)

    def close(self) -> None:
        self.listener.close()


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def private_tls(mock, tmp_path: Path) -> Iterator[tuple[TlsTerminator, Path]]:
    ca, leaf, key = make_ca_and_leaf(tmp_path)
    terminator = TlsTerminator(leaf, key, mock.url)
    try:
        yield terminator, ca
    finally:
        terminator.close()


def test_an_upstream_behind_a_private_ca_is_trusted_with_the_ca_file(mock, gateways, private_tls):
    terminator, ca = private_tls
    gateway = gateways.start("--upstream", terminator.url, "--upstream-ca-file", str(ca), upstream=False)
    rec = Recorder()
    client = sdk_client("openai", gateway.url, rec, max_retries=0)
    key = new_key("private-ca")
    prompt = f"over a private CA {uuid.uuid4()}"

    first = sdk_create(client, "openai", prompt, {"Idempotency-Key": key})
    assert first.status_code == 200
    assert first.headers["idempotent-replayed"] == "false"
    assert mock.calls() == 1, "the call went through the TLS terminator to the mock"
    assert terminator.handshakes == 1

    again = sdk_create(client, "openai", prompt, {"Idempotency-Key": key})
    assert again.headers["idempotent-replayed"] == "true"
    assert sdk_bytes(again) == sdk_bytes(first)
    assert mock.calls() == 1

    # Another call reuses the pooled TLS connection: no second handshake.
    other = sdk_create(client, "openai", f"another {uuid.uuid4()}", {"Idempotency-Key": new_key("private-ca")})
    assert other.status_code == 200
    assert (mock.calls(), terminator.handshakes) == (2, 1)


def test_without_the_ca_file_the_upstream_is_refused_and_the_key_released(mock, gateways, private_tls):
    terminator, _ = private_tls
    gateway = gateways.start("--upstream", terminator.url, upstream=False)
    key = new_key("untrusted")
    body = chat_body(f"untrusted {uuid.uuid4()}")
    for _ in range(2):
        refused = gateway.post(CHAT_PATH, body=body, headers=openai_headers(key))
        problem = assert_problem(refused, 502)
        assert problem["type"].endswith("upstream-unreachable"), problem
        assert refused.headers.get("x-should-retry") == "true"
    # Each attempt executed (the key was released), and no request reached the mock.
    assert terminator.handshakes == 0
    assert mock.calls() == 0
    # The client is told the upstream was unreachable; the operator's log says why.
    wait_until(lambda: "certificate" in gateway.proc.tail(200), 5, "the TLS failure in the gateway's log")
    assert "TLS handshake" in gateway.proc.tail(200), gateway.proc.tail(200)


@pytest.mark.parametrize(
    "content, reason",
    [
        ("no certificate in here\n", "holds no PEM certificate"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "cannot be a trust anchor"),
    ],
)
def test_a_ca_file_without_a_usable_certificate_stops_the_start(idemgate_bin, tmp_path, content, reason):
    bad = tmp_path / "ca.pem"
    bad.write_text(content)
    for command in ("check-config", "serve"):
        done = subprocess.run(
            [str(idemgate_bin), command, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
             "--store", "memory://", "--upstream-ca-file", str(bad)],
            capture_output=True, text=True, timeout=30,
        )
        assert done.returncode != 0, done.stdout
        assert "upstream-ca-file" in done.stderr and str(bad) in done.stderr and reason in done.stderr, done.stderr
