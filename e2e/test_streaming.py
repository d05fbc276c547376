"""Streams through the gateway: a duplicate that arrives mid-stream gets the same
bytes as the original without a second generation, and a stream that broke before
its terminator is never served as complete."""

from __future__ import annotations

import concurrent.futures
import uuid

import pytest

from helpers import (
    MESSAGES_PATH,
    Recorder,
    anthropic_headers,
    messages_body,
    new_key,
    sdk_client,
)


def test_a_duplicate_joins_a_live_stream_and_gets_the_same_bytes(mock, gateway):
    key = new_key("live-stream")
    body = messages_body(f"stream slowly {uuid.uuid4()}", stream=True)
    headers = anthropic_headers(key, **{"x-mock-chunks": "6", "x-mock-chunk-delay-ms": "150"})

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        original = pool.submit(gateway.post, MESSAGES_PATH, body=body, headers=headers)
        mock.wait_for_calls(1)
        duplicate = gateway.post(MESSAGES_PATH, body=body, headers=headers)
        first = original.result(timeout=30)

    assert first.status_code == duplicate.status_code == 200
    assert first.content.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert duplicate.content == first.content
    assert duplicate.headers["content-type"].startswith("text/event-stream")
    assert mock.calls() == 1

    replay = gateway.post(MESSAGES_PATH, body=body, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert mock.calls() == 1


def test_a_stream_cut_before_its_terminator_is_not_stored(mock, gateway):
    key = new_key("cut-stream")
    prompt = f"cut me {uuid.uuid4()}"
    rec = Recorder()
    client = sdk_client("anthropic", gateway.url, rec, max_retries=0)

    with pytest.raises(Exception):  # noqa: PT011, B017 - the transport's error, whatever its class
        with client.messages.stream(
            model="claude-mock-e2e",
            max_tokens=64,
            messages=[{"role": "user", "content": prompt}],
            extra_headers={"Idempotency-Key": key, "x-mock-cut-after": "4"},
        ) as stream:
            for _ in stream.text_stream:
                pass
    assert mock.calls() == 1

    # The retry runs again and completes; only that complete stream is replayed.
    with client.messages.stream(
        model="claude-mock-e2e",
        max_tokens=64,
        messages=[{"role": "user", "content": prompt}],
        extra_headers={"Idempotency-Key": key},
    ) as stream:
        text = stream.get_final_text()
    assert text.startswith("Hello from mock call 2.")
    assert mock.calls() == 2

    with client.messages.stream(
        model="claude-mock-e2e",
        max_tokens=64,
        messages=[{"role": "user", "content": prompt}],
        extra_headers={"Idempotency-Key": key},
    ) as stream:
        assert stream.get_final_text() == text
    assert mock.calls() == 2
