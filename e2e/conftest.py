"""Fixtures: the mock upstream process, a factory of gateway processes, and the
clean-up that kills every process a test started, whatever its outcome."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from helpers import (
    BACKENDS,
    Gateway,
    MissingBinary,
    Mock,
    PrivateRedis,
    Proc,
    binary,
    delete_redis_keys,
    drop_schema,
    http_client,
    in_ci,
    parse_listening,
    probe_backend,
)


def required_binary(env_var: str, default: str, build_hint: str) -> Path:
    """The binary's path, or a test failure that says how to build it."""
    message = None
    try:
        return binary(env_var, default, build_hint)
    except MissingBinary as err:
        message = str(err)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def mock_upstream_bin() -> Path:
    return required_binary("MOCK_UPSTREAM_BIN", "target/debug/mock-upstream", "cargo build -p idemgate-testkit")


@pytest.fixture(scope="session")
def idemgate_bin() -> Path:
    return required_binary("IDEMGATE_BIN", "target/debug/idemgate", "cargo build -p idemgate-cli")


@pytest.fixture(scope="session")
def mock_process(mock_upstream_bin: Path) -> Iterator[Mock]:
    """One mock upstream for the session; each test resets it through ``mock``."""
    proc = Proc("mock-upstream", [str(mock_upstream_bin), "--listen", "127.0.0.1:0"])
    try:
        match = proc.wait_for_line("stdout", r"^mock-upstream listening on (?P<url>http://127\.0\.0\.1:\d+)$")
        yield Mock(proc, match["url"])
    finally:
        proc.kill()


@pytest.fixture
def mock(mock_process: Mock) -> Mock:
    """The mock upstream with its counters and recorded requests at zero."""
    assert mock_process.proc.alive(), f"the mock upstream died\n{mock_process.proc.tail()}"
    mock_process.reset()
    return mock_process


class Gateways:
    """Starts ``idemgate serve`` processes in front of the mock; kills them at the end
    of the test."""

    def __init__(self, bin_path: Path, mock: Mock, tmp_path: Path) -> None:
        self.bin = bin_path
        self.mock = mock
        self.default_store = f"sqlite://{tmp_path / 'idemgate.db'}"
        self.started: list[Gateway] = []

    def start(self, *args: str, store: str | None = None, upstream: bool = True) -> Gateway:
        """A gateway on ports 0 with ``args`` added; ``store`` defaults to a SQLite file
        in the test's temporary directory, the same for every gateway of the test."""
        argv = [
            str(self.bin),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--store",
            store or self.default_store,
            "--log-format",
            "text",
        ]
        if upstream:
            argv += ["--upstream", self.mock.url]
        argv += list(args)
        proc = Proc(f"idemgate #{len(self.started) + 1}", argv)
        try:
            listen, admin = parse_listening(proc)
        except AssertionError:
            proc.kill()
            raise
        gateway = Gateway(proc=proc, url=f"http://{listen}", admin_url=f"http://{admin}", args=list(args))
        self.started.append(gateway)
        return gateway

    def close(self) -> None:
        for gateway in self.started:
            gateway.kill()
            gateway.http.close()


@pytest.fixture
def gateways(idemgate_bin: Path, mock: Mock, tmp_path: Path) -> Iterator[Gateways]:
    factory = Gateways(idemgate_bin, mock, tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def gateway(gateways: Gateways) -> Gateway:
    """A gateway with the default settings and a fresh SQLite file."""
    return gateways.start()


@pytest.fixture
def http():
    with http_client() as client:
        yield client


# --- shared stores ----------------------------------------------------------------


def unavailable(message: str) -> None:
    """A backend the test needs is missing: under CI (``CI`` set) the test fails, as CI
    never skips a backend test; elsewhere it is skipped with ``message``."""
    if in_ci():
        pytest.fail(f"{message} (CI never skips a backend test)", pytrace=False)
    pytest.skip(message)


def backend_url(name: str) -> str:
    """The URL of the ``name`` backend (a key of ``helpers.BACKENDS``) from its
    environment variable or default, once its server answers; otherwise the test is
    skipped, or fails under CI."""
    label, env, default = BACKENDS[name]
    url = os.environ.get(env) or default
    if not url:
        unavailable(f"{label} not reachable at <no URL: {env} is not set>: run scripts/test to start it")
    why = probe_backend(name, url)
    if why:
        unavailable(f"{label} not reachable at {url}: run scripts/test to start it ({why})")
    return url


@pytest.fixture(params=list(BACKENDS), ids=list(BACKENDS))
def shared_store(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """``(backend name, store URL)`` for each shared store: Redis, Redis Cluster,
    PostgreSQL. The URL, passed to ``idemgate serve --store`` as it is, puts the test's
    records in a namespace of its own (a Redis key ``prefix``, a PostgreSQL ``schema``),
    which is deleted when the test ends: the servers are shared with developers' runs."""
    name = request.param
    url = backend_url(name)
    namespace = f"e2e_{uuid.uuid4().hex[:16]}"
    option = "schema" if name == "postgres" else "prefix"
    sep = "&" if "?" in url else "?"
    try:
        yield name, f"{url}{sep}{option}={namespace}"
    finally:
        if name == "postgres":
            drop_schema(url, namespace)
        else:
            delete_redis_keys(url, namespace)


class PrivateRedisFactory:
    """Starts :class:`PrivateRedis` servers in the test's temporary directory; kills
    every one of them at the end of the test."""

    def __init__(self, binary_path: str, tmp_path: Path) -> None:
        self.binary = binary_path
        self.tmp_path = tmp_path
        self.started: list[PrivateRedis] = []

    def create(self, persistent: bool = True) -> PrivateRedis:
        """A server with its port and directory, not started yet."""
        server = PrivateRedis(self.binary, self.tmp_path / f"redis-{len(self.started) + 1}", persistent)
        self.started.append(server)
        return server

    def start(self, persistent: bool = True) -> PrivateRedis:
        server = self.create(persistent)
        server.start()
        return server

    def close(self) -> None:
        for server in self.started:
            server.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedisFactory]:
    """A factory of private ``redis-server`` processes (not the shared test server),
    for tests that stop and restart the store; needs ``redis-server`` on ``PATH``."""
    path = shutil.which("redis-server")
    if path is None:
        unavailable("redis-server is not installed: this test starts and stops a Redis of its own")
    factory = PrivateRedisFactory(path, tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attaches the logs of the processes a failed test used to its report."""
    outcome = yield
    report = outcome.get_result()
    if report.when not in ("setup", "call") or not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    factory = funcargs.get("gateways")
    if isinstance(factory, Gateways):
        for gateway in factory.started:
            report.sections.append((f"{gateway.proc.name} log", gateway.proc.tail(80)))
    redis = funcargs.get("private_redis")
    if isinstance(redis, PrivateRedisFactory):
        for server in redis.started:
            report.sections.append((f"private redis-server :{server.port} log", server.tail(40)))
    mock = funcargs.get("mock")
    if isinstance(mock, Mock):
        report.sections.append(("mock-upstream", f"stats: {safe_stats(mock)}\n{mock.proc.tail(20)}"))


def safe_stats(mock: Mock) -> object:
    try:
        return mock.stats()
    except Exception as err:  # noqa: BLE001 - only for a failure message
        return f"unavailable: {err}"
