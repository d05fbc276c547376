"""A fleet of gateways sharing one store (SPEC sections 4, 5 and 9).

Several ``idemgate serve`` processes share a Redis, a Redis Cluster or a PostgreSQL
store, and the guarantee to prove is the one of section 9: under many concurrent
duplicates spread over the processes, the upstream sees exactly one call and every
duplicate gets the same bytes — a non-streamed one when the original is ready, a
streamed one live, from the store's log of the stream. A process killed mid-call
leaves a lease that blocks every other process until it runs out; then exactly one
retry, on whichever process, takes over. And when the store itself goes away, the
gateways refuse keyed calls (or forward them unprotected with ``--fail-open``) and
come back without a restart, with every record, once it returns.

Each test takes its server from ``IDEMGATE_TEST_REDIS_URL``,
``IDEMGATE_TEST_REDIS_CLUSTER_URL`` or ``IDEMGATE_TEST_DATABASE_URL`` (see
``e2e/README.md``); a server that does not answer skips the test, or fails it under CI.
The outage test starts a ``redis-server`` of its own.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx

from helpers import (
    CHAT_PATH,
    HTTP_TIMEOUT,
    MESSAGES_PATH,
    Gateway,
    anthropic_headers,
    assert_problem,
    chat_body,
    http_client,
    messages_body,
    metric_sum,
    new_key,
    openai_headers,
    wait_until,
)

#: The Anthropic stream's terminator.
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
#: Outcomes the fleet tests count.
OUTCOMES = ("executed", "replayed", "joined", "conflict", "mismatch", "store_error", "released")


def outcomes(gateway: Gateway) -> dict[str, float]:
    text = gateway.metrics()
    return {o: metric_sum(text, "idemgate_requests_total", outcome=o) for o in OUTCOMES}


def start_fleet(gateways, store: str, n: int, *args: str) -> list[Gateway]:
    return [gateways.start(*args, store=store) for _ in range(n)]


def encode(body: dict) -> bytes:
    return json.dumps(body).encode()


def fire_together(targets: list[Gateway], path: str, body: dict, headers: dict) -> list[httpx.Response]:
    """One request per entry of ``targets``, each on a client of its own made
    beforehand, all released at once by a barrier."""
    clients = [http_client() for _ in targets]
    barrier = threading.Barrier(len(targets), timeout=15)
    content = encode(body)
    merged = {"content-type": "application/json", **headers}

    def one(i: int) -> httpx.Response:
        barrier.wait()
        return clients[i].post(f"{targets[i].url}{path}", content=content, headers=merged)

    try:
        with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
            fs = [pool.submit(one, i) for i in range(len(targets))]
            return [f.result(timeout=HTTP_TIMEOUT + 10) for f in fs]
    finally:
        for client in clients:
            client.close()


# --- many concurrent duplicates over three processes ------------------------------


@dataclass
class Answer:
    gateway: int
    status: int
    headers: dict[str, str]
    content: bytes
    elapsed: float


async def _burst(fleet: list[Gateway], per_gateway: int, path: str, content: bytes, headers: dict) -> list[Answer]:
    """``per_gateway`` concurrent requests on each gateway, all in flight together,
    interleaved over the gateways."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    clients = [httpx.AsyncClient(timeout=HTTP_TIMEOUT, trust_env=False, limits=limits) for _ in fleet]
    headers = {"content-type": "application/json", **headers}

    async def one(i: int) -> Answer | BaseException:
        started = time.monotonic()
        try:
            res = await clients[i].post(f"{fleet[i].url}{path}", content=content, headers=headers)
        except httpx.HTTPError as err:
            return err
        headers_ = {k.lower(): v for k, v in res.headers.items()}
        return Answer(i, res.status_code, headers_, res.content, time.monotonic() - started)

    try:
        tasks = [one(i) for _ in range(per_gateway) for i in range(len(fleet))]
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=HTTP_TIMEOUT + 10)
    finally:
        for client in clients:
            await client.aclose()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} request(s) failed on the wire, e.g. {errors[0]!r}"
    return results  # type: ignore[return-value]


def test_300_concurrent_duplicates_over_three_gateways_run_upstream_once(mock, gateways, shared_store):
    backend, store = shared_store
    fleet = start_fleet(gateways, store, 3, "--max-wait", "30s")
    key = new_key(f"fleet-burst-{backend}")
    content = encode(chat_body(f"one answer for the whole fleet {uuid.uuid4()}"))
    headers = openai_headers(key, **{"x-mock-delay-ms": "1000"})

    started = time.monotonic()
    answers = asyncio.run(_burst(fleet, 100, CHAT_PATH, content, headers))
    took = time.monotonic() - started

    assert len(answers) == 300
    statuses = collections.Counter(a.status for a in answers)
    assert statuses == {200: 300}, (dict(statuses), next(a for a in answers if a.status != 200).content[:300])
    assert mock.calls(CHAT_PATH) == 1, f"the upstream saw {mock.calls()} calls: {mock.stats()}"

    originals = [a for a in answers if a.headers.get("idempotent-replayed") == "false"]
    assert len(originals) == 1, f"{len(originals)} answers say Idempotent-Replayed: false"
    first = originals[0]
    assert "mock call 1." in first.content.decode()
    for a in answers:
        assert a.headers.get("idempotent-replayed") in ("true", "false"), a.headers
        assert a.content == first.content, f"gateway #{a.gateway + 1} answered other bytes: {a.content[:300]!r}"
        assert a.headers["content-type"] == first.headers["content-type"]
        assert a.headers.get("x-request-id") == first.headers.get("x-request-id")

    per = [outcomes(g) for g in fleet]
    for i, p in enumerate(per):
        assert p["executed"] + p["joined"] + p["replayed"] == 100, f"gateway #{i + 1}: {p}"
    totals = {o: sum(p[o] for p in per) for o in OUTCOMES}
    assert totals["executed"] == 1, totals
    assert totals["conflict"] == 0 and totals["store_error"] == 0, totals
    assert totals["executed"] + totals["joined"] + totals["replayed"] == 300, totals
    assert sum(metric_sum(g.metrics(), "idemgate_upstream_requests_total") for g in fleet) == 1
    slowest = max(a.elapsed for a in answers)
    print(f"[{backend}] 300 requests in {took:.2f}s (slowest {slowest:.2f}s); outcomes {totals}")


# --- a streamed call joined live from other processes ------------------------------


@dataclass
class Read:
    """One streamed response as the client read it."""

    label: str
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    sent: float = 0.0
    first_byte: float | None = None
    last_byte: float | None = None


def read_stream(
    read: Read,
    client: httpx.Client,
    gateway: Gateway,
    content: bytes,
    headers: dict,
    go: threading.Event | None = None,
    on_first: threading.Event | None = None,
) -> Read:
    """Sends the request once ``go`` is set, then reads the streamed answer, noting
    when its first and last body bytes arrived."""
    if go is not None and not go.wait(15):
        raise AssertionError(f"{read.label} was never sent")
    read.sent = time.monotonic()
    merged = {"content-type": "application/json", **headers}
    with client.stream("POST", f"{gateway.url}{MESSAGES_PATH}", content=content, headers=merged) as res:
        read.status = res.status_code
        read.headers = {k.lower(): v for k, v in res.headers.items()}
        for chunk in res.iter_raw():
            if not chunk:
                continue
            now = time.monotonic()
            if read.first_byte is None:
                read.first_byte = now
                if on_first is not None:
                    on_first.set()
            read.body.extend(chunk)
            read.last_byte = now
    return read


def test_a_streamed_call_is_joined_live_from_the_other_gateways(mock, gateways, shared_store):
    backend, store = shared_store
    a, b, c = start_fleet(gateways, store, 3, "--max-wait", "30s")
    key = new_key(f"fleet-stream-{backend}")
    content = encode(messages_body(f"stream to the fleet {uuid.uuid4()}", stream=True))
    headers = anthropic_headers(key, **{"x-mock-chunks": "8", "x-mock-chunk-delay-ms": "100"})
    # 12 duplicates on B, 12 on C, 6 on A, interleaved; their clients (and their
    # connections' set-up) are ready before the original starts, so that they all go
    # out together the moment the original's first bytes arrive.
    placement = [("B", b), ("C", c)] * 12 + [("A", a)] * 6
    clients = [http_client() for _ in range(1 + len(placement))]
    try:
        streaming, go = threading.Event(), threading.Event()
        with concurrent.futures.ThreadPoolExecutor(1 + len(placement)) as pool:
            duplicate_fs = [
                pool.submit(read_stream, Read(f"duplicate #{i} on {name}"), clients[i + 1], g, content, headers, go)
                for i, (name, g) in enumerate(placement)
            ]
            original_f = pool.submit(
                read_stream, Read("original on A"), clients[0], a, content, headers, None, streaming
            )
            started = streaming.wait(15)
            go.set()
            assert started, "the original never started streaming"
            original = original_f.result(timeout=30)
            duplicates = [f.result(timeout=30) for f in duplicate_fs]
    finally:
        for client in clients:
            client.close()

    assert original.status == 200 and original.headers["idempotent-replayed"] == "false"
    assert original.headers["content-type"].startswith("text/event-stream")
    assert bytes(original.body).endswith(MESSAGE_STOP), bytes(original.body)[-200:]
    assert mock.calls(MESSAGES_PATH) == 1, f"the upstream saw {mock.calls()} calls"

    for d in duplicates:
        assert d.status == 200, (d.label, d.status, bytes(d.body)[:300])
        assert d.headers["idempotent-replayed"] == "true", (d.label, d.headers)
        assert d.headers["content-type"].startswith("text/event-stream"), (d.label, d.headers)
        assert bytes(d.body) == bytes(original.body), f"{d.label} got other bytes: {bytes(d.body)[-300:]!r}"

    assert original.last_byte is not None
    late = [
        f"{d.label}: first byte {d.first_byte - original.last_byte:+.3f}s after the original's last"
        for d in duplicates
        if d.label[-1] in "BC" and (d.first_byte is None or d.first_byte >= original.last_byte)
    ]
    assert not late, "duplicates on B and C did not join the live stream:\n" + "\n".join(late)

    per = {name: outcomes(g) for name, g in (("A", a), ("B", b), ("C", c))}
    assert per["A"]["executed"] == 1 and per["B"]["executed"] == per["C"]["executed"] == 0, per
    assert per["B"]["joined"] == 12 and per["C"]["joined"] == 12, per
    lead = min(original.last_byte - d.first_byte for d in duplicates if d.label[-1] in "BC")
    spread = max(d.sent for d in duplicates) - min(d.sent for d in duplicates)
    print(
        f"[{backend}] stream {original.last_byte - original.sent:.2f}s; duplicates sent within {spread:.3f}s; "
        f"the last B/C duplicate's first byte came {lead:.3f}s before the original's last byte"
    )


# --- a replica killed mid-call ---------------------------------------------------


def test_a_killed_replica_blocks_the_others_until_its_lease_runs_out_then_one_takes_over(mock, gateways, shared_store):
    backend, store = shared_store
    lease = 2.0
    owner, b, c = start_fleet(gateways, store, 3, "--lease", f"{lease:g}s", "--max-wait", "30s")
    key = new_key(f"fleet-takeover-{backend}")
    content = chat_body(f"the owner dies {uuid.uuid4()}")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sent = time.monotonic()
        slow = openai_headers(key, **{"x-mock-delay-ms": "5000"})
        original = pool.submit(owner.post, CHAT_PATH, body=content, headers=slow)
        mock.wait_for_calls(1)
        owner.kill()
        killed_at = time.monotonic()
        error = original.exception(timeout=15)
    assert isinstance(error, httpx.TransportError), f"the client saw the crash: {error!r}"

    # The dead owner's lease is alive (claimed at most `lease` before it runs out): the
    # other replicas refuse to run the call again, and say when to come back.
    for name, g in (("B", b), ("C", c)):
        res = g.post(CHAT_PATH, body=content, headers=openai_headers(key, Prefer="wait=0"))
        answered = time.monotonic() - sent
        assert answered < lease - 0.3, f"the machine is too slow: {name} answered {answered:.2f}s after the claim"
        assert_problem(res, 409)
        assert res.headers["idempotent-replayed"] == "false"
        assert res.headers.get("x-should-retry") == "true"
        assert "retry-after" in res.headers, dict(res.headers)
    assert mock.calls() == 1, "no second upstream call while the dead owner's lease is alive"

    # Once the lease has run out, 20 duplicates race on the two survivors: one claim
    # takes over, the other duplicates wait for it and get its answer.
    time.sleep(max(0.0, killed_at + lease + 0.5 - time.monotonic()))
    answers = fire_together(
        [g for _ in range(10) for g in (b, c)], CHAT_PATH, content, openai_headers(key, **{"x-mock-delay-ms": "1000"})
    )

    for res in answers:
        assert res.status_code == 200, (res.status_code, res.text[:300])
    assert mock.calls() == 2, f"exactly one takeover: the upstream saw {mock.calls()} calls"
    originals = [r for r in answers if r.headers["idempotent-replayed"] == "false"]
    assert len(originals) == 1, [r.headers["idempotent-replayed"] for r in answers]
    taken = originals[0]
    assert "mock call 2." in taken.json()["choices"][0]["message"]["content"]
    for res in answers:
        assert res.content == taken.content

    takeovers = sum(metric_sum(g.metrics(), "idemgate_lease_takeovers_total") for g in (b, c))
    assert takeovers == 1, f"idemgate_lease_takeovers_total over B and C is {takeovers}"

    again = c.post(CHAT_PATH, body=content, headers=openai_headers(key))
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.content == taken.content
    assert mock.calls() == 2


# --- the store goes away, and comes back ------------------------------------------

#: The longest a keyed request may take to be refused (or forwarded, fail-open) while
#: the store is down.
OUTAGE_ANSWER_WITHIN = 3.0


def timed_post(gateway: Gateway, path: str, body: dict, headers: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    res = gateway.post(path, body=body, headers=headers, timeout=OUTAGE_ANSWER_WITHIN + 7)
    return res, time.monotonic() - started


def readyz(gateway: Gateway) -> int:
    return gateway.http.get(f"{gateway.admin_url}/readyz", timeout=OUTAGE_ANSWER_WITHIN + 7).status_code


def test_a_redis_outage_fails_closed_or_open_and_recovers_every_record(mock, gateways, private_redis):
    # Redis keeps its data across the restart below: an append-only file fsynced on
    # every write. (Without persistence, a restarted Redis is empty: a retry of a call
    # it had recorded runs again. That is Redis's durability, not the gateway's, and
    # not what this test measures.)
    redis = private_redis.start(persistent=True)
    closed = gateways.start(store=redis.url)
    fail_open = gateways.start("--fail-open", store=redis.url)

    # Keyed traffic while the store is up: K1..K4, one of them streamed.
    done: list[tuple[str, dict, dict, httpx.Response]] = []
    for i in range(3):
        key, body = new_key(f"outage-k{i + 1}"), chat_body(f"before the outage {i} {uuid.uuid4()}")
        res = closed.post(CHAT_PATH, body=body, headers=openai_headers(key))
        assert res.status_code == 200 and res.headers["idempotent-replayed"] == "false", res.text
        done.append((CHAT_PATH, body, openai_headers(key), res))
    key, body = new_key("outage-k4"), messages_body(f"streamed before the outage {uuid.uuid4()}", stream=True)
    res = closed.post(MESSAGES_PATH, body=body, headers=anthropic_headers(key, **{"x-mock-chunk-delay-ms": "5"}))
    assert res.status_code == 200 and res.content.endswith(MESSAGE_STOP)
    done.append((MESSAGES_PATH, body, anthropic_headers(key), res))
    assert mock.calls() == 4
    assert readyz(closed) == 200 and readyz(fail_open) == 200

    redis.kill()

    # Fail closed (the default): 503 problem+json with Retry-After, quickly, nothing
    # upstream; for stored keys and new ones alike.
    attempts = [(path, body, headers) for path, body, headers, _ in done[:2]]
    new_body = chat_body(f"new during the outage {uuid.uuid4()}")
    attempts.append((CHAT_PATH, new_body, openai_headers(new_key("outage-new"))))
    for path, body, headers in attempts:
        res, took = timed_post(closed, path, body, headers)
        assert_problem(res, 503)
        assert "retry-after" in res.headers, dict(res.headers)
        assert res.headers.get("idempotent-replayed") == "false", dict(res.headers)
        assert took < OUTAGE_ANSWER_WITHIN, f"the 503 took {took:.2f}s"
    assert readyz(closed) == 503
    assert readyz(fail_open) == 503
    assert mock.calls() == 4, "nothing is forwarded by a fail-closed gateway while the store is down"
    # A request without a key needs no store: it passes through.
    assert closed.post(CHAT_PATH, body=chat_body("no key"), headers=openai_headers()).status_code == 200
    assert mock.calls() == 5
    assert outcomes(closed)["store_error"] == len(attempts)

    # Fail open: keyed calls are forwarded, unprotected, and counted.
    for i in range(2):
        body, headers = chat_body(f"unprotected {i}"), openai_headers(new_key("outage-open"))
        res, took = timed_post(fail_open, CHAT_PATH, body, headers)
        assert res.status_code == 200, (res.status_code, res.text[:300])
        assert took < OUTAGE_ANSWER_WITHIN, f"the fail-open answer took {took:.2f}s"
    assert mock.calls() == 7
    assert outcomes(fail_open)["store_error"] == 2, fail_open.metrics()

    # The store comes back on the same port with the same data; no gateway is
    # restarted, and none has lost a record.
    redis.start()
    for g in (closed, fail_open):
        wait_until(lambda g=g: readyz(g) == 200, 10, "/readyz to answer 200 after the store came back", interval=0.2)
    for g in (closed, fail_open):
        for path, body, headers, first in done:
            res = g.post(path, body=body, headers=headers)
            assert res.status_code == 200, (path, res.status_code, res.text[:300])
            assert res.headers["idempotent-replayed"] == "true"
            assert res.content == first.content
    assert mock.calls() == 7, "every record survived the outage: nothing ran again"

    # The same key with another body is still a mismatch, never the stored answer.
    for path, body, headers, first in done:
        other = dict(body, max_tokens=7) if path == MESSAGES_PATH else dict(body, temperature=0.5)
        res = closed.post(path, body=other, headers=headers)
        assert_problem(res, 422)
        assert first.content not in res.content
    assert mock.calls() == 7


def test_a_fail_open_gateway_started_while_redis_is_down_forwards_then_protects_again(mock, gateways, private_redis):
    redis = private_redis.create(persistent=True)  # its port: nothing listens there yet

    gateway = gateways.start("--fail-open", store=redis.url)
    for i in range(2):
        res, took = timed_post(gateway, CHAT_PATH, chat_body(f"no store yet {i}"), openai_headers(new_key("down-open")))
        assert res.status_code == 200, (res.status_code, res.text[:300])
        assert took < OUTAGE_ANSWER_WITHIN, f"the fail-open answer took {took:.2f}s"
    assert mock.calls() == 2
    assert outcomes(gateway)["store_error"] == 2
    assert readyz(gateway) == 503

    redis.start()
    wait_until(lambda: readyz(gateway) == 200, 10, "/readyz to answer 200 once the store is up", interval=0.2)
    key, body = new_key("down-open-protected"), chat_body(f"protected again {uuid.uuid4()}")
    first = gateway.post(CHAT_PATH, body=body, headers=openai_headers(key))
    again = gateway.post(CHAT_PATH, body=body, headers=openai_headers(key))
    assert first.status_code == again.status_code == 200
    assert first.headers["idempotent-replayed"] == "false" and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert mock.calls() == 3
