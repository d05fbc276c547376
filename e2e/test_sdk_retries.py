"""The real SDKs, retrying on their own, through the gateway: however many attempts
the SDK makes, the upstream runs the call once and every attempt gets its bytes.

Cases 1 to 3 of the end-to-end plan: a client timeout shorter than the generation
(the retry joins the original), for the OpenAI and the Anthropic SDK, with a key the
caller passes (``extra_headers``) and with the key the SDK generates itself
(``_idempotency_header``); and retryable upstream failures (503) that the gateway
releases so that the SDK's retries run again, until one success is stored.
"""

from __future__ import annotations

import uuid

import pytest

from helpers import SDK_KEY_PREFIX, SDKS, Recorder, new_key, resend, sdk_client, sdk_bytes, sdk_create, sdk_path, sdk_text

#: The upstream takes longer than the client waits: the first attempt times out.
UPSTREAM_DELAY_MS = "1500"
CLIENT_TIMEOUT = 1.0


@pytest.mark.parametrize("keying", ["extra_headers", "sdk_key"])
@pytest.mark.parametrize("sdk", SDKS)
def test_a_timed_out_call_is_retried_by_the_sdk_and_gets_the_original(sdk, keying, mock, gateway):
    rec = Recorder()
    client = sdk_client(
        sdk, gateway.url, rec, sdk_key=keying == "sdk_key", max_retries=2, timeout=CLIENT_TIMEOUT
    )
    headers = {"x-mock-delay-ms": UPSTREAM_DELAY_MS}
    key = None
    if keying == "extra_headers":
        key = new_key(f"timeout-{sdk}")
        headers["Idempotency-Key"] = key

    raw = sdk_create(client, sdk, f"a slow generation {uuid.uuid4()}", headers)

    assert raw.status_code == 200
    assert len(rec.attempts) >= 2, "the first attempt should have timed out and been retried"
    keys = rec.keys()
    assert len(set(keys)) == 1, f"one key across the SDK's retries: {keys}"
    if key is not None:
        assert keys[0] == key
    else:
        assert keys[0].startswith(SDK_KEY_PREFIX), keys
    assert raw.headers.get("idempotent-replayed") in ("true", "false")

    # The upstream ran once, and the SDK got that one execution.
    assert mock.calls() == 1
    upstream = mock.requests()[0]
    assert upstream["headers"].get("idempotency-key") == keys[0], "the key is forwarded unchanged"
    parsed = raw.parse()
    assert "mock call 1." in sdk_text(sdk, parsed)

    # A later duplicate of exactly what the SDK sent is a replay of the same bytes.
    dup = resend(gateway, rec.attempts[-1])
    assert dup.status_code == 200
    assert dup.headers["idempotent-replayed"] == "true"
    assert dup.content == sdk_bytes(raw)
    assert dup.json()["id"] == parsed.id
    assert mock.calls() == 1


@pytest.mark.parametrize("sdk", SDKS)
def test_retryable_upstream_failures_are_released_and_one_success_is_stored(sdk, mock, gateway):
    scenario = f"fail-twice-{sdk}-{uuid.uuid4()}"
    key = new_key(f"fail-{sdk}")
    rec = Recorder()
    client = sdk_client(sdk, gateway.url, rec, max_retries=2, timeout=20.0)

    raw = sdk_create(
        client,
        sdk,
        f"flaky upstream {uuid.uuid4()}",
        {"Idempotency-Key": key, "x-mock-scenario": scenario, "x-mock-fail": "2"},
    )

    assert raw.status_code == 200
    assert [status for status, _ in rec.responses] == [503, 503, 200]
    assert rec.keys() == [key, key, key]
    for status, headers in rec.responses:
        assert headers.get("idempotent-replayed") == "false", (status, headers)
    assert mock.scenario_calls(scenario) == 3
    assert mock.calls(sdk_path(sdk)) == 3
    assert "mock call 3." in sdk_text(sdk, raw.parse())

    # Only the success was stored: duplicates replay it, byte for byte, and run nothing.
    for _ in range(2):
        dup = resend(gateway, rec.attempts[-1])
        assert dup.status_code == 200, dup.text
        assert dup.headers["idempotent-replayed"] == "true"
        assert dup.content == sdk_bytes(raw)
        assert dup.headers["content-type"] == raw.headers["content-type"]
    assert mock.calls() == 3
