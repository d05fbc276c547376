"""Processes, clients and parsers shared by the end-to-end tests.

Everything here is bounded: a process that does not print its ready line in time,
an HTTP call that hangs, a condition that never comes true all end in a clear
failure that quotes the process's last log lines, never in a hung test run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import anthropic
import httpx
import openai

REPO_ROOT = Path(__file__).resolve().parent.parent

#: How long a process may take to print its ready line.
START_TIMEOUT = 30.0
#: How long a process may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: The timeout of the tests' own HTTP calls.
HTTP_TIMEOUT = 30.0

#: Credentials the SDKs send; the gateway derives the tenant from them.
OPENAI_API_KEY = "sk-e2e-openai-0000000000000000"
ANTHROPIC_API_KEY = "sk-ant-e2e-0000000000000000"

#: Request headers that describe a connection, not a request: a resent request gets
#: its own.
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "accept-encoding"}

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class MissingBinary(Exception):
    """A binary the tests need has not been built."""


def binary(env_var: str, default: str, build_hint: str) -> Path:
    """The path of a binary from ``env_var`` or ``default`` (relative to the repo root)."""
    path = Path(os.environ.get(env_var) or default)
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise MissingBinary(f"{path} is missing or not executable: build it with `{build_hint}`, or set {env_var}")
    return path


def child_env() -> dict[str, str]:
    """The environment for the processes under test: no ``IDEMGATE_*`` settings of the
    caller's leak into them, and logs are plain text at info level."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMGATE_")}
    env["RUST_LOG"] = os.environ.get("E2E_RUST_LOG", "info")
    env["NO_COLOR"] = "1"
    env.pop("RUST_BACKTRACE", None)
    return env


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Polls ``condition`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child process whose stdout and stderr are read line by line by background
    threads, so the pipes never fill, and kept for failure messages."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._cond = threading.Condition()
        self._open = 2
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env if env is not None else child_env(),
            start_new_session=True,
        )
        for stream_name, stream in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr)):
            threading.Thread(target=self._pump, args=(stream_name, stream), daemon=True).start()

    def _pump(self, stream_name: str, stream: Any) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = ANSI.sub("", raw.decode("utf-8", "replace").rstrip("\r\n"))
                with self._cond:
                    self.lines[stream_name].append(line)
                    self._cond.notify_all()
        finally:
            stream.close()
            with self._cond:
                self._open -= 1
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_line(self, stream_name: str, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first line of ``stream_name`` matching ``pattern``; fails if the process
        exits or ``timeout`` passes first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                lines = self.lines[stream_name]
                for line in lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(lines)
                if self._open == 0 and self.popen.poll() is not None:
                    raise AssertionError(
                        f"{self.name} exited with {self.popen.returncode} before printing /{pattern}/\n{self.tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.name} did not print /{pattern}/ within {timeout}s\n{self.tail()}")
                self._cond.wait(min(remaining, 0.1))

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then the exit code; SIGKILL if it does not exit within ``timeout``."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout}s of SIGTERM\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        if self.alive():
            self.popen.kill()
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:  # pragma: no cover - the kernel did not reap it
            pass

    def tail(self, n: int = 40) -> str:
        with self._cond:
            out = self.lines["stdout"][-n:]
            err = self.lines["stderr"][-n:]
        return (
            f"--- {self.name} ({' '.join(self.argv)}) ---\n"
            + "".join(f"stdout| {line}\n" for line in out)
            + "".join(f"stderr| {line}\n" for line in err)
        )


def http_client(timeout: float = HTTP_TIMEOUT) -> httpx.Client:
    """An httpx client that ignores proxy settings of the environment."""
    return httpx.Client(timeout=timeout, trust_env=False)


class Mock:
    """The ``mock-upstream`` process and its ``/_mock/`` API."""

    def __init__(self, proc: Proc, url: str) -> None:
        self.proc = proc
        self.url = url
        self.http = http_client(10.0)

    def stats(self) -> dict[str, Any]:
        return self.http.get(f"{self.url}/_mock/stats").raise_for_status().json()

    def calls(self, path: str | None = None) -> int:
        stats = self.stats()
        return stats["calls"] if path is None else stats["by_path"].get(path, 0)

    def scenario_calls(self, scenario: str) -> int:
        return self.stats()["by_scenario"].get(scenario, 0)

    def requests(self) -> list[dict[str, Any]]:
        return self.http.get(f"{self.url}/_mock/requests").raise_for_status().json()

    def reset(self) -> None:
        self.http.post(f"{self.url}/_mock/reset").raise_for_status()

    def wait_for_calls(self, n: int, timeout: float = 10.0) -> None:
        wait_until(lambda: self.calls() >= n, timeout, f"the mock upstream to see {n} call(s)")


#: The gateway's ready line: ``... listening listen=127.0.0.1:PORT admin=127.0.0.1:PORT ...``.
LISTENING = (
    r"""^(?=.*\blistening\b)"""
    r"""(?=.*\blisten=["']?(?P<listen>[0-9.]+:\d+))"""
    r"""(?=.*\badmin=["']?(?P<admin>[0-9.]+:\d+))"""
)


@dataclass
class Gateway:
    """A running ``idemgate serve``."""

    proc: Proc
    url: str
    admin_url: str
    args: list[str]
    http: httpx.Client = field(default_factory=http_client)

    def metrics(self) -> str:
        res = self.http.get(f"{self.admin_url}/metrics")
        assert res.status_code == 200, f"/metrics answered {res.status_code}\n{self.proc.tail()}"
        return res.text

    def stop(self) -> int:
        """SIGTERM; returns the exit code."""
        return self.proc.terminate()

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self.proc.kill()

    def post(
        self,
        path: str,
        *,
        body: bytes | str | dict | None = None,
        headers: dict | list | None = None,
        timeout: float = HTTP_TIMEOUT,
        fresh: bool = False,
    ) -> httpx.Response:
        """POSTs to the proxy listener (JSON content type unless ``headers`` says
        otherwise); ``fresh`` uses a connection of its own instead of the pool."""
        if isinstance(body, dict):
            content = json.dumps(body).encode()
        elif isinstance(body, str):
            content = body.encode()
        else:
            content = body or b""
        merged: list[tuple[str, str]] = [("content-type", "application/json")]
        if isinstance(headers, dict):
            merged = [(k, v) for k, v in merged if k.lower() not in {h.lower() for h in headers}]
            merged += list(headers.items())
        elif headers:
            merged += list(headers)
        if fresh:
            with http_client(timeout) as client:
                return client.post(f"{self.url}{path}", content=content, headers=merged)
        return self.http.post(f"{self.url}{path}", content=content, headers=merged, timeout=timeout)


def parse_listening(proc: Proc) -> tuple[str, str]:
    """The proxy and admin addresses from the gateway's ``listening`` log line."""
    match = proc.wait_for_line("stderr", LISTENING)
    return match["listen"], match["admin"]


@dataclass
class Attempt:
    """One HTTP attempt an SDK made, as it went on the wire."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Recorder:
    """Records every attempt of an SDK client (its own retries included) through
    httpx event hooks, and the status and headers of every response."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self.responses: list[tuple[int, dict[str, str]]] = []

    def _on_request(self, request: Any) -> None:
        request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.attempts.append(Attempt(request.method, request.url.raw_path.decode(), headers, request.content))

    def _on_response(self, response: Any) -> None:
        self.responses.append((response.status_code, {k.lower(): v for k, v in response.headers.items()}))

    def http_client(self, sdk: Any) -> Any:
        """An HTTP client for ``sdk`` (the ``openai`` or ``anthropic`` module)."""
        return sdk.DefaultHttpxClient(
            trust_env=False, event_hooks={"request": [self._on_request], "response": [self._on_response]}
        )

    def keys(self) -> list[str | None]:
        return [a.headers.get("idempotency-key") for a in self.attempts]


def resend(gateway: Gateway, attempt: Attempt, drop: tuple[str, ...] = ()) -> httpx.Response:
    """Sends ``attempt`` again, byte for byte, with raw httpx: a duplicate of what the
    SDK sent, credentials and key included."""
    headers = [(k, v) for k, v in attempt.headers.items() if k not in HOP_BY_HOP and k not in drop]
    return gateway.http.request(attempt.method, f"{gateway.url}{attempt.path}", content=attempt.body, headers=headers)


def raw_http(addr: str, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Sends raw bytes (``Connection: close`` expected) and parses the answer, for
    requests httpx refuses to build, such as a header with a non-ASCII byte."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    out, rest = [], data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out)


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric ``name`` in Prometheus text: (labels, value)."""
    samples = []
    pattern = re.compile(r"^" + re.escape(name) + r"(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
    for line in text.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        samples.append((labels, float(match["value"])))
    return samples


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for l, v in metric_samples(text, name) if all(l.get(k) == want for k, want in labels.items()))


def assert_problem(res: httpx.Response | tuple[int, dict[str, str], bytes], status: int) -> dict[str, Any]:
    """Asserts an ``application/problem+json`` answer with ``status``; returns its body."""
    if isinstance(res, tuple):
        code, headers, content = res
    else:
        code, headers, content = res.status_code, {k.lower(): v for k, v in res.headers.items()}, res.content
    assert code == status, f"expected {status}, got {code}: {content[:500]!r}"
    assert headers.get("content-type", "").startswith("application/problem+json"), headers
    body = json.loads(content)
    assert isinstance(body.get("type"), str) and body["type"], body
    if "status" in body:
        assert body["status"] == status, body
    return body


# --- the SDKs -------------------------------------------------------------------

OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-mock-e2e"
CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
RESPONSES_PATH = "/v1/responses"
ANTHROPIC_VERSION = "2023-06-01"

#: The SDK's own key: ``_base_client.py`` generates ``stainless-python-retry-<uuid4>``
#: once per logical request, before the retry loop, but only sends it when the client's
#: ``_idempotency_header`` names a header. Neither SDK sets it; these subclasses do.
IDEMPOTENCY_HEADER = "Idempotency-Key"
SDK_KEY_PREFIX = "stainless-python-retry-"


class IdemOpenAI(openai.OpenAI):
    """``openai.OpenAI`` that sends its per-call idempotency key on every attempt."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._idempotency_header = IDEMPOTENCY_HEADER


class IdemAnthropic(anthropic.Anthropic):
    """``anthropic.Anthropic`` that sends its per-call idempotency key on every attempt."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._idempotency_header = IDEMPOTENCY_HEADER


SDKS = ("openai", "anthropic")


def sdk_client(sdk: str, base_url: str, recorder: Recorder, *, sdk_key: bool = False, **options: Any) -> Any:
    """An ``openai`` or ``anthropic`` client for ``base_url`` (the gateway's or the
    mock's root URL) whose attempts ``recorder`` sees."""
    if sdk == "openai":
        cls = IdemOpenAI if sdk_key else openai.OpenAI
        return cls(base_url=f"{base_url}/v1", api_key=OPENAI_API_KEY, http_client=recorder.http_client(openai), **options)
    cls = IdemAnthropic if sdk_key else anthropic.Anthropic
    return cls(base_url=base_url, api_key=ANTHROPIC_API_KEY, http_client=recorder.http_client(anthropic), **options)


def sdk_path(sdk: str) -> str:
    return CHAT_PATH if sdk == "openai" else MESSAGES_PATH


def sdk_create(client: Any, sdk: str, prompt: str, headers: dict[str, str] | None = None) -> Any:
    """One non-streamed call through the SDK's raw-response interface, so the test
    sees the exact bytes the SDK received: ``.content``, ``.headers``, ``.parse()``."""
    messages = [{"role": "user", "content": prompt}]
    if sdk == "openai":
        return client.chat.completions.with_raw_response.create(
            model=OPENAI_MODEL, messages=messages, extra_headers=headers or {}
        )
    return client.messages.with_raw_response.create(
        model=ANTHROPIC_MODEL, max_tokens=64, messages=messages, extra_headers=headers or {}
    )


def sdk_bytes(raw: Any) -> bytes:
    """The body bytes of an SDK raw response (openai's legacy one has ``.content``,
    anthropic's ``.read()``)."""
    content = getattr(raw, "content", None)
    return content if isinstance(content, bytes) else raw.read()


def sdk_text(sdk: str, parsed: Any) -> str:
    if sdk == "openai":
        return parsed.choices[0].message.content
    return parsed.content[0].text


def chat_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": OPENAI_MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


def messages_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": ANTHROPIC_MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": prompt}], **extra}


def openai_headers(key: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"authorization": f"Bearer {OPENAI_API_KEY}", **extra}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


def anthropic_headers(key: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"x-api-key": ANTHROPIC_API_KEY, "anthropic-version": ANTHROPIC_VERSION, **extra}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


def new_key(label: str) -> str:
    return f"e2e-{label}-{uuid.uuid4()}"


# --- raw bytes under an SDK, usage, prices --------------------------------------


def sdk_httpx(sdk: Any) -> Any:
    """The httpx flavour ``sdk`` (the ``openai`` or ``anthropic`` module) is built on:
    its ``DefaultHttpxClient`` subclasses that module's ``Client`` (``httpx2`` in the
    pinned versions, ``httpx`` in older ones)."""
    import importlib

    base = next(c for c in sdk.DefaultHttpxClient.__mro__[1:] if c.__name__ == "Client")
    return importlib.import_module(base.__module__.split(".")[0])


@dataclass
class Tapped:
    """One response body as the SDK read it off the wire: the bytes, and when each
    piece arrived (``time.monotonic()``)."""

    status: int
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)
    arrivals: list[float] = field(default_factory=list)


def _tapping_transport(httpx_mod: Any, taps: list[Tapped]) -> Any:
    """A transport that hands every response on unchanged while copying its body bytes
    (before any decoding) into a new :class:`Tapped` of ``taps``."""

    class TapStream(httpx_mod.SyncByteStream):
        def __init__(self, inner: Any, tap: Tapped) -> None:
            self._inner = inner
            self._tap = tap

        def __iter__(self) -> Any:
            for chunk in self._inner:
                self._tap.body.extend(chunk)
                self._tap.arrivals.append(time.monotonic())
                yield chunk

        def close(self) -> None:
            self._inner.close()

    class TapTransport(httpx_mod.BaseTransport):
        def __init__(self) -> None:
            self._inner = httpx_mod.HTTPTransport()

        def handle_request(self, request: Any) -> Any:
            response = self._inner.handle_request(request)
            tap = Tapped(response.status_code, {k.lower(): v for k, v in response.headers.items()})
            taps.append(tap)
            return httpx_mod.Response(
                status_code=response.status_code,
                headers=response.headers,
                stream=TapStream(response.stream, tap),
                extensions=response.extensions,
            )

        def close(self) -> None:
            self._inner.close()

    return TapTransport()


class StreamRecorder(Recorder):
    """A :class:`Recorder` that also keeps the raw body bytes of every response, as the
    SDK consumed them (``taps``, one per attempt), so a streamed call's bytes can be
    compared with its replay's without a second request."""

    def __init__(self) -> None:
        super().__init__()
        self.taps: list[Tapped] = []

    def http_client(self, sdk: Any) -> Any:
        return sdk.DefaultHttpxClient(
            trust_env=False,
            transport=_tapping_transport(sdk_httpx(sdk), self.taps),
            event_hooks={"request": [self._on_request], "response": [self._on_response]},
        )


TOKEN_KINDS = ("input", "cached_input", "output", "reasoning")


def tokens_saved(text: str) -> dict[str, float]:
    """``idemgate_tokens_saved_total`` by ``kind`` (0 for a kind not exported yet)."""
    return {kind: metric_sum(text, "idemgate_tokens_saved_total", kind=kind) for kind in TOKEN_KINDS}


def cost_saved(text: str, currency: str = "USD") -> float:
    return metric_sum(text, "idemgate_cost_saved_total", currency=currency)


def write_config(path: Path, text: str) -> Path:
    """Writes a TOML config file for ``--config``; returns its path."""
    path.write_text(text)
    return path


# --- shared stores: Redis, Redis Cluster, PostgreSQL ------------------------------

#: The servers of the shared-store tests: (label, environment variable, default URL).
#: ``scripts/services`` (sourced by ``scripts/test``) starts them and exports the URLs;
#: the cluster has no default, as a developer's machine runs none by itself.
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "redis": ("Redis", "IDEMGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
    "redis-cluster": ("Redis Cluster", "IDEMGATE_TEST_REDIS_CLUSTER_URL", None),
    "postgres": ("PostgreSQL", "IDEMGATE_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
}

#: How long a probe of a backend server may take.
PROBE_TIMEOUT = 2.0


def in_ci() -> bool:
    """Whether this run is CI's, where a backend that cannot be reached is a failure
    (the same rule as ``idemgate_testkit::backend::in_ci``)."""
    value = os.environ.get("CI", "")
    return value not in ("", "0", "false")


def url_hosts(url: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` pairs of ``scheme://[user[:pass]@]h1:p1[,h2:p2...][/db]``."""
    rest = url.split("://", 1)[1] if "://" in url else url
    authority = re.split(r"[/?]", rest, maxsplit=1)[0]
    hosts = authority.rsplit("@", 1)[-1]
    out = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{url!r} names no host:port")
        out.append((host.strip("[]"), int(port)))
    return out


def resp_command(host: str, port: int, *args: str, timeout: float = PROBE_TIMEOUT) -> bytes:
    """Sends one Redis command and returns its raw reply (a simple string, an error or
    a bulk string, without the trailing CRLF)."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
    )
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(payload)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"$"):
            size = int(data.split(b"\r\n", 1)[0][1:])
            header = len(data.split(b"\r\n", 1)[0]) + 2
            while size >= 0 and len(data) < header + size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data[header : header + max(size, 0)]
        return data.split(b"\r\n", 1)[0]


def cleanup_tool(tool: str, what: str) -> bool:
    """Whether ``tool`` is installed to clean ``what`` up; without it, a warning (the
    records expire with their TTL), or a failure under CI, which installs it."""
    import shutil

    if shutil.which(tool):
        return True
    assert not in_ci(), f"{tool} is not installed: CI needs it to clean up {what}"
    print(f"WARNING: {tool} is not installed: {what} is left behind until it expires")
    return False


def delete_redis_keys(url: str, prefix: str) -> None:
    """Deletes every key under ``prefix`` (``{prefix:...}``) on each node of ``url``
    (a cluster's keys are scanned and deleted on the node that holds them)."""
    if not cleanup_tool("redis-cli", f"the Redis keys under {prefix}"):
        return
    for host, port in url_hosts(url):
        cli = ["redis-cli", "-h", host, "-p", str(port)]
        found = subprocess.run([*cli, "--scan", "--pattern", f"{{{prefix}:*"], capture_output=True, text=True, timeout=30)
        assert found.returncode == 0, f"redis-cli --scan on {host}:{port}: {found.stderr}"
        # One key per command: a cluster refuses keys of different slots in one.
        commands = "".join(f"UNLINK {key}\n" for key in found.stdout.split())
        done = subprocess.run(cli, input=commands, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "ERR" not in done.stdout, f"redis-cli UNLINK on {host}:{port}: {done.stdout}{done.stderr}"


def drop_schema(url: str, schema: str) -> None:
    """Drops ``schema`` and everything in it from the database of ``url``."""
    assert re.fullmatch(r"[a-z0-9_]+", schema), schema
    if not cleanup_tool("psql", f"the PostgreSQL schema {schema}"):
        return
    done = subprocess.run(
        ["psql", url, "-v", "ON_ERROR_STOP=1", "-qc", f"DROP SCHEMA IF EXISTS {schema} CASCADE"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, f"psql could not drop schema {schema}: {done.stderr}"


def probe_redis(host: str, port: int) -> str | None:
    """``None`` when a Redis server answers ``PING`` at ``host:port``, else why not."""
    try:
        reply = resp_command(host, port, "PING")
    except OSError as err:
        return f"{host}:{port}: {err}"
    if reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH"):
        return None
    return f"{host}:{port} answered PING with {reply[:80]!r}"


def probe_redis_cluster(url: str) -> str | None:
    """``None`` when every node of ``url`` answers and the cluster is ``ok``."""
    for host, port in url_hosts(url):
        why = probe_redis(host, port)
        if why:
            return why
        try:
            info = resp_command(host, port, "CLUSTER", "INFO")
        except OSError as err:
            return f"{host}:{port}: {err}"
        if b"cluster_state:ok" not in info:
            return f"{host}:{port} is not in a healthy cluster: {info[:120]!r}"
    return None


def probe_postgres(url: str) -> str | None:
    """``None`` when a PostgreSQL server at ``url`` accepts a session for its user and
    database (it asks for a password or says it is ready), else why not."""
    import struct
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    user = unquote(parts.username or "postgres")
    database = unquote(parts.path.lstrip("/")) or user
    params = f"user\0{user}\0database\0{database}\0\0".encode()
    startup = struct.pack("!ii", 8 + len(params), 196608) + params
    def read_message(sock: socket.socket) -> tuple[bytes, bytes]:
        head = b""
        while len(head) < 5:
            chunk = sock.recv(5 - len(head))
            if not chunk:
                raise OSError("the server closed the connection")
            head += chunk
        kind, size = head[:1], struct.unpack("!i", head[1:])[0]
        body = b""
        while len(body) < size - 4:
            chunk = sock.recv(size - 4 - len(body))
            if not chunk:
                raise OSError("the server closed the connection")
            body += chunk
        return kind, body

    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as sock:
            sock.settimeout(PROBE_TIMEOUT)
            sock.sendall(startup)
            while True:
                kind, body = read_message(sock)
                if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                    return None  # it asks for a password: the server is there
                if kind == b"Z":
                    sock.sendall(b"X" + struct.pack("!i", 4))
                    return None
                if kind == b"E":
                    fields = {f[:1].decode(): f[1:].decode("utf-8", "replace") for f in body.split(b"\0") if f}
                    return f"{host}:{port}: {fields.get('M', 'error')}"
                if kind not in (b"R", b"S", b"K", b"N"):
                    return f"{host}:{port} answered {kind + body[:40]!r}, not as PostgreSQL"
    except (OSError, struct.error) as err:
        return f"{host}:{port}: {err}"


def probe_backend(name: str, url: str) -> str | None:
    """``None`` when the ``name`` backend (a key of :data:`BACKENDS`) answers at ``url``."""
    try:
        if name == "redis":
            (host, port), *_ = url_hosts(url)
            return probe_redis(host, port)
        if name == "redis-cluster":
            return probe_redis_cluster(url)
        return probe_postgres(url)
    except ValueError as err:
        return str(err)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A ``redis-server`` of one test, in the foreground (its log is kept), on a fixed
    port and directory so that it can be killed and started again on the same data.

    ``persistent`` runs it with an append-only file fsynced on every write: a SIGKILL
    loses nothing, and a restart loads every record back."""

    def __init__(self, binary_path: str, directory: Path, persistent: bool = True) -> None:
        self.binary = binary_path
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []

    @property
    def proc(self) -> Proc | None:
        return self.procs[-1] if self.procs else None

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        argv += ["--save", "", "--protected-mode", "no", "--daemonize", "no"]
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        proc = Proc(f"redis-server #{len(self.procs) + 1}", argv, env={"PATH": os.environ.get("PATH", "")})
        self.procs.append(proc)
        try:
            proc.wait_for_line("stdout", r"Ready to accept connections", timeout=15)
            wait_until(lambda: probe_redis("127.0.0.1", self.port) is None, 5, f"redis-server to answer on {self.port}")
        except AssertionError:
            proc.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, its port refuses connections."""
        if self.proc:
            self.proc.kill()

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()

    def tail(self, n: int = 30) -> str:
        return "".join(p.tail(n) for p in self.procs)
