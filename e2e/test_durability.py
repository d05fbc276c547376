"""What survives the gateway process: a graceful restart keeps every stored response
(case 4), and a crash mid-call leaves a lease that blocks re-execution until it runs
out, after which one retry takes over (case 5)."""

from __future__ import annotations

import concurrent.futures
import subprocess
import time
import uuid

import httpx

from helpers import (
    CHAT_PATH,
    MESSAGES_PATH,
    OPENAI_API_KEY,
    anthropic_headers,
    assert_problem,
    chat_body,
    messages_body,
    new_key,
    openai_headers,
)


def test_a_restarted_gateway_replays_from_the_same_sqlite_file(mock, gateways, tmp_path):
    db = tmp_path / "restart.db"
    store = f"sqlite://{db}"
    gateway = gateways.start(store=store)

    chat_key, stream_key = new_key("restart-chat"), new_key("restart-stream")
    chat = chat_body(f"remember me {uuid.uuid4()}")
    stream = messages_body(f"stream me {uuid.uuid4()}", stream=True)
    first = gateway.post(CHAT_PATH, body=chat, headers=openai_headers(chat_key))
    first_stream = gateway.post(
        MESSAGES_PATH, body=stream, headers=anthropic_headers(stream_key, **{"x-mock-chunk-delay-ms": "5"})
    )
    assert first.status_code == 200 and first.headers["idempotent-replayed"] == "false"
    assert first_stream.status_code == 200 and first_stream.headers["idempotent-replayed"] == "false"
    assert first_stream.content.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert mock.calls() == 2

    assert gateway.stop() == 0, "SIGTERM is a graceful stop"
    assert db.exists()

    restarted = gateways.start(store=store)
    again = restarted.post(CHAT_PATH, body=chat, headers=openai_headers(chat_key))
    again_stream = restarted.post(MESSAGES_PATH, body=stream, headers=anthropic_headers(stream_key))

    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["x-request-id"] == first.headers["x-request-id"]
    assert again_stream.status_code == 200
    assert again_stream.headers["idempotent-replayed"] == "true"
    assert again_stream.content == first_stream.content
    assert again_stream.headers["content-type"].startswith("text/event-stream")
    assert mock.calls() == 2, "nothing ran again after the restart"


def test_a_graceful_stop_waits_for_a_call_whose_client_hung_up(mock, gateways, tmp_path):
    store = f"sqlite://{tmp_path / 'drain.db'}"
    gateway = gateways.start(store=store)
    key = new_key("drain")
    body = chat_body(f"finish me {uuid.uuid4()}")

    # The client gives up on a slow generation; the gateway reads on to record it.
    slow = openai_headers(key, **{"x-mock-delay-ms": "1500"})
    try:
        gateway.post(CHAT_PATH, body=body, headers=slow, timeout=0.3)
        raise AssertionError("the client was meant to time out")
    except httpx.TimeoutException:
        pass
    mock.wait_for_calls(1)

    # SIGTERM now: the gateway has no open connection left, but it waits for that
    # call, whose result the upstream is producing, and records it before it exits.
    started = time.monotonic()
    assert gateway.stop() == 0, "SIGTERM is a graceful stop"
    assert time.monotonic() - started > 0.8, "it waited for the call"

    restarted = gateways.start(store=store)
    retry = restarted.post(CHAT_PATH, body=body, headers=openai_headers(key))
    assert retry.status_code == 200, retry.text
    assert retry.headers["idempotent-replayed"] == "true", "the retry gets the recorded result"
    assert mock.calls() == 1, "and nothing ran twice"


def test_a_purge_from_the_cli_ends_replays_the_gateway_keeps_in_memory(mock, gateways, idemgate_bin, tmp_path):
    # The gateway answers replays of a record it has found from memory; `idemgate purge`
    # is another process on the same file, and the next request must execute again.
    store = f"sqlite://{tmp_path / 'purge.db'}"
    gateway = gateways.start(store=store)
    key = new_key("purge")
    body = chat_body(f"purge me {uuid.uuid4()}")
    first = gateway.post(CHAT_PATH, body=body, headers=openai_headers(key))
    replays = [gateway.post(CHAT_PATH, body=body, headers=openai_headers(key)) for _ in range(3)]
    assert first.headers["idempotent-replayed"] == "false"
    assert [r.headers["idempotent-replayed"] for r in replays] == ["true"] * 3
    assert all(r.content == first.content for r in replays)
    assert mock.calls() == 1

    purge = subprocess.run(
        [str(idemgate_bin), "purge", key, "--tenant", f"Bearer {OPENAI_API_KEY}", "--store", store],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert purge.returncode == 0, purge.stderr
    assert purge.stdout.startswith("purged ")
    assert (tmp_path / "purge.db-purges").exists()

    again = gateway.post(CHAT_PATH, body=body, headers=openai_headers(key))
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "false"
    assert mock.calls() == 2, "the purged record was not replayed"
    after = gateway.post(CHAT_PATH, body=body, headers=openai_headers(key))
    assert after.headers["idempotent-replayed"] == "true" and after.content == again.content
    assert mock.calls() == 2


def test_a_crashed_owner_blocks_retries_until_its_lease_runs_out(mock, gateways, tmp_path):
    store = f"sqlite://{tmp_path / 'crash.db'}"
    lease = 3.0
    crashed = gateways.start("--lease", f"{lease:g}s", store=store)
    key = new_key("crash")
    body = chat_body(f"crash during me {uuid.uuid4()}")

    # The original is in flight upstream (a slow generation) when the gateway dies.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        original = pool.submit(
            crashed.post, CHAT_PATH, body=body, headers=openai_headers(key, **{"x-mock-delay-ms": "10000"})
        )
        mock.wait_for_calls(1)
        crashed.kill()
        killed_at = time.monotonic()
        error = original.exception(timeout=15)
    assert isinstance(error, httpx.TransportError), f"the client saw the crash: {error!r}"

    restarted = gateways.start("--lease", "1s", store=store)

    # While the dead owner's lease is alive, nothing runs again: a duplicate that will
    # not wait is told to come back later.
    res = restarted.post(CHAT_PATH, body=body, headers=openai_headers(key, Prefer="wait=0"))
    if time.monotonic() - killed_at < lease - 0.5:
        problem = assert_problem(res, 409)
        assert res.headers["idempotent-replayed"] == "false"
        assert res.headers.get("x-should-retry") == "true"
        assert "retry-after" in res.headers and "retry-after-ms" in res.headers, dict(res.headers)
        assert "type" in problem
    assert mock.calls() == 1, "no second upstream call while the lease is alive"

    # Once the lease has run out, the next retry takes over and runs the call, once.
    time.sleep(max(0.0, killed_at + lease + 0.5 - time.monotonic()))
    retry = restarted.post(CHAT_PATH, body=body, headers=openai_headers(key))
    assert retry.status_code == 200, retry.text
    assert retry.headers["idempotent-replayed"] == "false"
    assert "mock call 2." in retry.json()["choices"][0]["message"]["content"]
    assert mock.calls() == 2

    for _ in range(2):
        dup = restarted.post(CHAT_PATH, body=body, headers=openai_headers(key))
        assert dup.status_code == 200
        assert dup.headers["idempotent-replayed"] == "true"
        assert dup.content == retry.content
    assert mock.calls() == 2
