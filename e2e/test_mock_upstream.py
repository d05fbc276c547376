"""The fixtures themselves, against the mock upstream alone: the real SDKs parse what
the mock sends, the SDKs' retries behave as the gateway tests assume, and the helpers
read what they claim to read. None of these needs the gateway."""

from __future__ import annotations

import json
import uuid

import anthropic
import openai
import pytest

from helpers import (
    CHAT_PATH,
    MESSAGES_PATH,
    RESPONSES_PATH,
    SDK_KEY_PREFIX,
    SDKS,
    Gateway,
    Mock,
    Proc,
    Recorder,
    metric_samples,
    metric_sum,
    raw_http,
    resend,
    sdk_client,
    sdk_create,
    sdk_path,
    sdk_text,
)


def as_gateway(mock: Mock) -> Gateway:
    """The mock in the shape of a gateway, to drive the helpers straight at it."""
    return Gateway(proc=mock.proc, url=mock.url, admin_url=mock.url, args=[])


def test_the_mock_binary_prints_one_ready_line_and_exits_0_on_sigterm(mock_upstream_bin):
    proc = Proc("mock-upstream", [str(mock_upstream_bin), "--listen", "127.0.0.1:0"])
    try:
        match = proc.wait_for_line("stdout", r"^mock-upstream listening on http://127\.0\.0\.1:(\d+)$")
        assert int(match[1]) > 0
        assert proc.terminate() == 0
        assert proc.lines["stdout"] == [match.string]
    finally:
        proc.kill()


def test_the_sdks_parse_every_endpoint_of_the_mock(mock):
    rec = Recorder()
    oa = sdk_client("openai", mock.url, rec, max_retries=0)
    completion = oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "abcdefgh"}])
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini"
    assert "mock call 1" in completion.choices[0].message.content
    # 8 characters of prompt: 8 + ceil(8 / 4) = 10 input tokens, 3 x 4 output tokens.
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (10, 12)
    assert completion.usage.prompt_tokens_details.cached_tokens == 2
    assert completion.usage.completion_tokens_details.reasoning_tokens == 4

    chunks = list(
        oa.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "abcdefgh"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-mock-chunks": "3"},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from mock call 2. Part 1. Part 2."
    assert chunks[-1].usage.completion_tokens == 9

    response = oa.responses.create(model="gpt-4.1", input="abcd")
    assert response.id.startswith("resp_") and response.output[0].id.startswith("msg_")
    assert response.output_text.startswith("Hello from mock call 3.")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (9, 12)
    events = [e.type for e in oa.responses.create(model="gpt-4.1", input="abcd", stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"

    an = sdk_client("anthropic", mock.url, rec, max_retries=0)
    message = an.messages.create(model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "abcdefgh"}])
    assert message.id.startswith("msg_01") and message.model == "claude-x"
    assert message.content[0].text.startswith("Hello from mock call 5.")
    assert message.usage.cache_read_input_tokens == 2
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens + message.usage.cache_creation_input_tokens == 10
    with an.messages.stream(model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as stream:
        assert stream.get_final_text().startswith("Hello from mock call 6.")
        assert stream.get_final_message().usage.output_tokens == 12

    stats = mock.stats()
    assert stats["calls"] == 6
    assert stats["by_path"] == {CHAT_PATH: 2, RESPONSES_PATH: 2, MESSAGES_PATH: 2}


@pytest.mark.parametrize("sdk", SDKS)
def test_the_sdk_key_subclass_keeps_one_key_across_the_sdks_own_retries(mock, sdk):
    """What the gateway tests rely on: with ``_idempotency_header`` set, the SDK sends
    ``stainless-python-retry-<uuid>`` and repeats it on every retry; without it, no key."""
    scenario = f"sdk-key-{sdk}-{uuid.uuid4()}"
    rec = Recorder()
    client = sdk_client(sdk, mock.url, rec, sdk_key=True, max_retries=2)
    raw = sdk_create(client, sdk, "retry me", {"x-mock-scenario": scenario, "x-mock-fail": "2"})
    assert raw.status_code == 200
    assert [status for status, _ in rec.responses] == [503, 503, 200]
    keys = rec.keys()
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0].startswith(SDK_KEY_PREFIX), keys
    assert [a.headers["x-stainless-retry-count"] for a in rec.attempts] == ["0", "1", "2"]
    assert mock.scenario_calls(scenario) == 3

    plain = Recorder()
    client = sdk_client(sdk, mock.url, plain, max_retries=0)
    sdk_create(client, sdk, "no key")
    assert plain.keys() == [None]


@pytest.mark.parametrize("sdk", SDKS)
def test_a_timeout_makes_the_sdk_retry_with_the_same_explicit_key(mock, sdk):
    rec = Recorder()
    client = sdk_client(sdk, mock.url, rec, max_retries=1, timeout=0.3)
    error = openai.APITimeoutError if sdk == "openai" else anthropic.APITimeoutError
    with pytest.raises(error):
        sdk_create(client, sdk, "slow", {"Idempotency-Key": "explicit-1", "x-mock-delay-ms": "1500"})
    assert rec.keys() == ["explicit-1", "explicit-1"]
    assert mock.calls(sdk_path(sdk)) == 2, "without a gateway, every attempt reaches the upstream"


def test_a_cut_stream_is_an_error_for_the_sdk_not_a_clean_end(mock):
    rec = Recorder()
    client = sdk_client("anthropic", mock.url, rec, max_retries=0)
    text = []
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the SDKs raise their transport's error
        with client.messages.stream(
            model="claude-x",
            max_tokens=16,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-mock-cut-after": "4"},
        ) as stream:
            text.extend(stream.text_stream)
    assert "incomplete" in str(caught.value) or isinstance(caught.value, anthropic.APIConnectionError), caught.value
    assert "".join(text).startswith("Hello from mock call 1.")


def test_resend_repeats_an_sdk_attempt_byte_for_byte(mock):
    rec = Recorder()
    client = sdk_client("openai", mock.url, rec, max_retries=0)
    sdk_create(client, "openai", "resend me", {"Idempotency-Key": "resend-1"})
    again = resend(as_gateway(mock), rec.attempts[0])
    assert again.status_code == 200
    first, second = mock.requests()
    assert second["body"] == first["body"] == rec.attempts[0].body.decode()
    assert second["headers"]["idempotency-key"] == "resend-1"
    assert second["headers"]["authorization"] == first["headers"]["authorization"]
    assert sdk_text("openai", client.chat.completions.create(model="m", messages=[])).startswith("Hello")


def test_raw_http_sends_bytes_httpx_would_refuse(mock):
    host = mock.url.removeprefix("http://")
    body = b'{"model":"m","messages":[]}'
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
        b"Idempotency-Key: caf\xc3\xa9\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    status, headers, content = raw_http(host, request)
    assert status == 200, content
    assert headers["content-type"] == "application/json"
    assert json.loads(content)["object"] == "chat.completion"
    assert mock.requests()[0]["headers"]["idempotency-key"] == "caf\u00e9"


def test_metric_parsing():
    text = "\n".join(
        [
            "# TYPE idemgate_requests_total counter",
            'idemgate_requests_total{route="default",outcome="executed"} 2',
            'idemgate_requests_total{outcome="replayed",route="default"} 1',
            'idemgate_requests_total{route="other",outcome="executed"} 3',
            "idemgate_duplicates_total 4",
            'idemgate_store_op_seconds_bucket{backend="sqlite",op="begin",le="0.001"} 5',
        ]
    )
    assert metric_sum(text, "idemgate_requests_total", outcome="executed") == 5
    assert metric_sum(text, "idemgate_requests_total") == 6
    assert metric_sum(text, "idemgate_duplicates_total") == 4
    assert metric_samples(text, "idemgate_store_op_seconds_bucket")[0][0] == {
        "backend": "sqlite",
        "op": "begin",
        "le": "0.001",
    }
