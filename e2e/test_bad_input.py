"""Bad input gets a clear 4xx ``application/problem+json`` and costs nothing upstream,
and the gateway goes on serving (case 6); bodies are fingerprinted as canonical JSON
when they are JSON and as raw bytes otherwise."""

from __future__ import annotations

import socket
import uuid

from helpers import (
    CHAT_PATH,
    MESSAGES_PATH,
    OPENAI_API_KEY,
    assert_problem,
    chat_body,
    messages_body,
    anthropic_headers,
    metric_sum,
    new_key,
    openai_headers,
    raw_http,
)

MAX_BODY = 4096


def assert_still_serving(gateway, mock, calls_before: int) -> None:
    ok = gateway.post(CHAT_PATH, body=chat_body(f"still there {uuid.uuid4()}"), headers=openai_headers(new_key("ok")))
    assert ok.status_code == 200, ok.text
    assert ok.headers["idempotent-replayed"] == "false"
    assert mock.calls() == calls_before + 1
    assert gateway.http.get(f"{gateway.admin_url}/healthz").status_code == 200


def test_bad_keys_and_oversized_bodies_are_refused_before_the_upstream(mock, gateways):
    gateway = gateways.start("--max-body", str(MAX_BODY))
    body = chat_body("bad input")

    # Each refusal on a connection of its own: whether a refused request's connection
    # stays usable is the subject of the next test, not of this one.
    too_long = gateway.post(CHAT_PATH, body=body, headers=openai_headers("k" * 300), fresh=True)
    assert_problem(too_long, 400)
    assert too_long.headers.get("x-should-retry") != "true"

    assert_problem(gateway.post(CHAT_PATH, body=body, headers=openai_headers(""), fresh=True), 400)

    two_fields = [
        ("authorization", f"Bearer {OPENAI_API_KEY}"),
        ("Idempotency-Key", "first"),
        ("Idempotency-Key", "second"),
    ]
    assert_problem(gateway.post(CHAT_PATH, body=body, headers=two_fields, fresh=True), 400)

    # A byte outside printable ASCII: httpx will not send it, a raw socket will.
    raw_body = b'{"model":"gpt-4o-mini","messages":[]}'
    host = gateway.url.removeprefix("http://")
    request = (
        b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
        b"Authorization: Bearer " + OPENAI_API_KEY.encode() + b"\r\n"
        b"Idempotency-Key: caf\xc3\xa9-key\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(raw_body)).encode() + b"\r\n"
        b"Connection: close\r\n\r\n" + raw_body
    )
    assert_problem(raw_http(host, request), 400)

    big = chat_body("x" * (2 * MAX_BODY))
    too_big = gateway.post(CHAT_PATH, body=big, headers=openai_headers(new_key("big")), fresh=True)
    assert_problem(too_big, 413)

    assert mock.calls() == 0, "nothing bad reached the upstream"
    assert_still_serving(gateway, mock, 0)


def test_a_refusal_sent_before_the_body_leaves_the_connection_usable_or_closes_it(mock, gateway):
    """A client that reuses its connection after a 400 must not meet a silent close:
    the gateway either reads the rest of the body and keeps the connection, or says
    ``Connection: close``. The head goes first and the body only after the refusal,
    which is what a client's separate writes of head and body can amount to."""
    host = gateway.url.removeprefix("http://")
    body = b'{"model":"gpt-4o-mini","messages":[]}'

    def head(key: bytes) -> bytes:
        return (
            b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
            b"Authorization: Bearer " + OPENAI_API_KEY.encode() + b"\r\nIdempotency-Key: " + key + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )

    address, port = host.rsplit(":", 1)
    with socket.create_connection((address, int(port)), timeout=10) as sock:
        sock.sendall(head(b""))
        reader = sock.makefile("rb")
        status_line = reader.readline()
        assert b" 400 " in status_line, status_line
        headers = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        reader.read(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            return
        try:
            sock.sendall(body + head(new_key("after-400").encode()) + body)
            next_status = reader.readline()
        except OSError as err:
            next_status = repr(err).encode()
        assert b" 200 " in next_status, (
            f"the connection was closed after the 400 without `Connection: close`: {next_status!r}"
        )
    assert mock.calls() == 1


def test_a_body_that_is_not_json_is_fingerprinted_as_raw_bytes(mock, gateway):
    key = new_key("raw")
    raw = b"\x00\x01 this is not JSON { at all"
    headers = openai_headers(key, **{"content-type": "application/octet-stream"})

    first = gateway.post(CHAT_PATH, body=raw, headers=headers)
    # The body is forwarded as it is; the mock, like OpenAI, answers 400 to a body it
    # cannot parse, and a 400 recurs, so it is stored like a success.
    assert first.status_code == 400, first.text
    assert first.headers["idempotent-replayed"] == "false"
    assert mock.requests()[0]["body"] == raw.decode("latin-1").encode().decode("utf-8", "replace")
    assert mock.calls() == 1

    again = gateway.post(CHAT_PATH, body=raw, headers=headers)
    assert again.status_code == 400
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content

    changed = raw[:-1] + b"!"
    mismatch = gateway.post(CHAT_PATH, body=changed, headers=headers)
    assert_problem(mismatch, 422)
    assert mismatch.headers.get("x-should-retry") == "false"
    assert first.content not in mismatch.content
    assert mock.calls() == 1


def test_json_bodies_are_compared_canonically(mock, gateway):
    key = new_key("canonical")
    compact = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"temperature":0.5}'
    spaced = b'{ "temperature": 0.5,\n  "messages": [ { "content": "hi", "role": "user" } ],\n  "model": "gpt-4o-mini" }\n'

    first = gateway.post(CHAT_PATH, body=compact, headers=openai_headers(key))
    assert first.status_code == 200
    same = gateway.post(CHAT_PATH, body=spaced, headers=openai_headers(key))
    assert same.status_code == 200
    assert same.headers["idempotent-replayed"] == "true"
    assert same.content == first.content

    different = compact.replace(b'"hi"', b'"hi!"')
    assert_problem(gateway.post(CHAT_PATH, body=different, headers=openai_headers(key)), 422)
    assert mock.calls() == 1


def test_routes_from_a_config_file_and_a_path_no_route_covers(mock, gateways, tmp_path):
    config = tmp_path / "idemgate.toml"
    # Keys in kebab-case, as the config reader spells them (`strip-prefix`).
    config.write_text(
        f"""
[[routes]]
name = "openai"
prefix = "/v1"
upstream = "{mock.url}"

[[routes]]
name = "anthropic"
prefix = "/anthropic"
upstream = "{mock.url}"
strip-prefix = true
"""
    )
    gateway = gateways.start("--config", str(config), upstream=False)

    for headers in (openai_headers(new_key("unrouted")), openai_headers()):
        unrouted = gateway.post("/v2/elsewhere", body=chat_body("lost"), headers=headers)
        assert_problem(unrouted, 404)
    assert mock.calls() == 0

    routed = gateway.post(CHAT_PATH, body=chat_body("found"), headers=openai_headers(new_key("routed")))
    assert routed.status_code == 200, routed.text
    stripped = gateway.post(
        "/anthropic" + MESSAGES_PATH, body=messages_body("found"), headers=anthropic_headers(new_key("stripped"))
    )
    assert stripped.status_code == 200, stripped.text
    assert stripped.json()["type"] == "message"
    assert [r["path"] for r in mock.requests()] == [CHAT_PATH, MESSAGES_PATH]
    assert_still_serving(gateway, mock, 2)


def test_an_upstream_json_body_that_stalls_is_a_502_and_the_retry_executes(mock, gateways, tmp_path):
    """The gateway reads a JSON response whole before answering, so an upstream that
    sends the head and then goes silent gets the client a clear 502 (not a 200 whose
    body breaks), counted as released even on a route that stores 5xx, and nothing is
    stored: the retry executes."""
    config = tmp_path / "stall.toml"
    config.write_text('idle-timeout = "300ms"\nstore-server-errors = true\n')
    gateway = gateways.start("--config", str(config))
    key = new_key("stall")
    body = chat_body(f"stall {uuid.uuid4()}")
    stalled = gateway.post(CHAT_PATH, body=body, headers=openai_headers(key, **{"x-mock-body-delay-ms": "3000"}))
    problem = assert_problem(stalled, 502)
    assert problem["type"].endswith("/upstream-body-failed"), problem
    assert stalled.headers["x-should-retry"] == "true"
    assert mock.calls() == 1

    retry = gateway.post(CHAT_PATH, body=body, headers=openai_headers(key))
    assert retry.status_code == 200, retry.text
    assert retry.headers["idempotent-replayed"] == "false"
    assert mock.calls() == 2

    text = gateway.metrics()
    assert metric_sum(text, "idemgate_requests_total", outcome="released") == 1
    assert metric_sum(text, "idemgate_requests_total", outcome="executed") == 1
