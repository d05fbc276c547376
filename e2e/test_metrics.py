"""``/metrics`` tells an operator what happened (case 7): one gateway is driven through
every outcome, and its Prometheus text must count each of them, the duplicates, the
upstream calls and the SQLite store's latency."""

from __future__ import annotations

import concurrent.futures
import uuid

from helpers import (
    CHAT_PATH,
    assert_problem,
    chat_body,
    metric_samples,
    metric_sum,
    new_key,
    openai_headers,
)


def test_metrics_count_every_outcome(mock, gateway):
    # executed, then replayed
    done_key = new_key("metrics-done")
    done_body = chat_body(f"metrics {uuid.uuid4()}")
    assert gateway.post(CHAT_PATH, body=done_body, headers=openai_headers(done_key)).status_code == 200
    replay = gateway.post(CHAT_PATH, body=done_body, headers=openai_headers(done_key))
    assert replay.headers["idempotent-replayed"] == "true"

    # executed (slowly); a duplicate that will not wait gets a conflict, one that waits joins
    slow_key = new_key("metrics-slow")
    slow_body = chat_body(f"slow metrics {uuid.uuid4()}")
    slow_headers = openai_headers(slow_key, **{"x-mock-delay-ms": "2000"})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        original = pool.submit(gateway.post, CHAT_PATH, body=slow_body, headers=slow_headers)
        mock.wait_for_calls(2)
        conflict = gateway.post(CHAT_PATH, body=slow_body, headers=openai_headers(slow_key, Prefer="wait=0"))
        assert_problem(conflict, 409)
        joined = gateway.post(CHAT_PATH, body=slow_body, headers=openai_headers(slow_key))
        first = original.result(timeout=30)
    assert first.status_code == joined.status_code == 200
    assert joined.content == first.content

    # mismatch: the same key with another body
    assert_problem(gateway.post(CHAT_PATH, body=chat_body("other"), headers=openai_headers(done_key)), 422)

    # bypassed: no key at all
    assert gateway.post(CHAT_PATH, body=done_body, headers=openai_headers()).status_code == 200
    assert mock.calls() == 3

    text = gateway.metrics()
    outcomes = {
        outcome: metric_sum(text, "idemgate_requests_total", outcome=outcome)
        for outcome in ("executed", "replayed", "joined", "conflict", "mismatch", "bypassed")
    }
    assert outcomes == {"executed": 2, "replayed": 1, "joined": 1, "conflict": 1, "mismatch": 1, "bypassed": 1}, text
    assert metric_sum(text, "idemgate_duplicates_total") >= 3, text
    assert metric_sum(text, "idemgate_upstream_requests_total") == mock.calls(), text
    sqlite_buckets = [
        labels for labels, _ in metric_samples(text, "idemgate_store_op_seconds_bucket") if labels.get("backend") == "sqlite"
    ]
    assert sqlite_buckets, f"no store latency for the sqlite backend in\n{text}"
    assert gateway.http.get(f"{gateway.admin_url}/healthz").status_code == 200
    assert gateway.http.get(f"{gateway.admin_url}/readyz").status_code == 200
