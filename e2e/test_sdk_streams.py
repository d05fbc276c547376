"""Streams recorded and replayed under the real SDKs (SPEC sections 5 to 8).

A streamed call through the gateway is forwarded once; a later duplicate gets the very
same bytes, so the SDK parses the same chunks, ids and usage; a duplicate that arrives
while the original is still streaming joins it live. Every replay or join counts the
recorded usage as saved tokens, and with a price table, as saved money; an executed
call counts nothing. ``replay-pace = "recorded"`` replays a stream at the pace it was
recorded.

The streams are consumed by ``openai`` (Chat Completions with
``stream_options.include_usage``, Responses) and ``anthropic`` (``messages.stream``);
a :class:`StreamRecorder` keeps the raw bytes each SDK read, to compare them too.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers import (
    ANTHROPIC_MODEL,
    CHAT_PATH,
    MESSAGES_PATH,
    OPENAI_MODEL,
    RESPONSES_PATH,
    Gateway,
    StreamRecorder,
    chat_body,
    cost_saved,
    http_client,
    metric_samples,
    metric_sum,
    new_key,
    openai_headers,
    resend,
    sdk_client,
    tokens_saved,
    wait_until,
    write_config,
)

#: The client's own deadline: far above any stream here, so a hang fails, not passes.
SDK_TIMEOUT = 20.0


def mock_text(call: int, chunks: int = 4) -> str:
    """The text the mock generates on its call number ``call`` with ``chunks`` deltas."""
    return f"Hello from mock call {call}." + "".join(f" Part {i}." for i in range(1, chunks))


def sse_events(body: bytes) -> list[bytes]:
    """The SSE events of a body, without their blank-line separators."""
    return [e for e in body.split(b"\n\n") if e]


# --- consuming a stream with each SDK ---------------------------------------------


@dataclass
class Streamed:
    """What an SDK made of one streamed call."""

    text: str
    #: The ids the events carried, in order (chunk ids, response ids, the message id).
    ids: list[str]
    #: The usage as the SDK parsed it (``model_dump()``).
    usage: dict[str, Any]
    #: The model the response reports.
    model: str
    #: Every parsed event or chunk (``model_dump()``), in order.
    events: list[dict[str, Any]]
    #: When the first text delta, and the last event, reached the consumer.
    first_text_at: float
    last_at: float


Runner = Callable[..., Streamed]


def stream_chat(
    client: Any,
    prompt: str,
    headers: dict[str, str],
    *,
    model: str = OPENAI_MODEL,
    on_first: Callable[[], Any] | None = None,
) -> Streamed:
    """``chat.completions.create(stream=True, stream_options={"include_usage": True})``."""
    chunks, first_text_at = [], None
    with client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers,
    ) as stream:
        for chunk in stream:
            chunks.append(chunk)
            if first_text_at is None and chunk.choices and chunk.choices[0].delta.content:
                first_text_at = time.monotonic()
                if on_first:
                    on_first()
    last_at = time.monotonic()
    assert chunks, "the stream had no chunk"
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None, f"the last chunk is not the usage chunk: {final}"
    assert all(c.usage is None for c in chunks[:-1]), "usage before the last chunk"
    return Streamed(
        text="".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        ids=[c.id for c in chunks],
        usage=final.usage.model_dump(),
        model=final.model,
        events=[c.model_dump() for c in chunks],
        first_text_at=first_text_at or last_at,
        last_at=last_at,
    )


def stream_responses(
    client: Any,
    prompt: str,
    headers: dict[str, str],
    *,
    model: str = OPENAI_MODEL,
    on_first: Callable[[], Any] | None = None,
) -> Streamed:
    """``responses.create(stream=True)``: text from ``response.output_text.delta``, usage
    from ``response.completed``."""
    events, first_text_at = [], None
    with client.responses.create(model=model, input=prompt, stream=True, extra_headers=headers) as stream:
        for event in stream:
            events.append(event)
            if first_text_at is None and event.type == "response.output_text.delta":
                first_text_at = time.monotonic()
                if on_first:
                    on_first()
    last_at = time.monotonic()
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1 and events[-1] is completed[0], [e.type for e in events]
    response = completed[0].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert response.output_text == text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return Streamed(
        text=text,
        ids=[e.response.id for e in events if hasattr(e, "response")] + [response.output[0].id],
        usage=response.usage.model_dump(),
        model=response.model,
        events=[e.model_dump() for e in events],
        first_text_at=first_text_at or last_at,
        last_at=last_at,
    )


def stream_messages(
    client: Any,
    prompt: str,
    headers: dict[str, str],
    *,
    model: str = ANTHROPIC_MODEL,
    on_first: Callable[[], Any] | None = None,
) -> Streamed:
    """``messages.stream(...)``: ``get_final_text()``, ``get_final_message()``."""
    events, first_text_at = [], None
    with client.messages.stream(
        model=model, max_tokens=64, messages=[{"role": "user", "content": prompt}], extra_headers=headers
    ) as stream:
        for event in stream:
            events.append(event)
            if first_text_at is None and event.type == "text":
                first_text_at = time.monotonic()
                if on_first:
                    on_first()
        last_at = time.monotonic()
        text = stream.get_final_text()
        final = stream.get_final_message()
    assert events and events[-1].type == "message_stop", [e.type for e in events]
    starts = [e.message.id for e in events if e.type == "message_start"]
    return Streamed(
        text=text,
        ids=starts + [final.id],
        usage=final.usage.model_dump(),
        model=final.model,
        events=[e.model_dump() for e in events],
        first_text_at=first_text_at or last_at,
        last_at=last_at,
    )


#: api → (SDK, runner, upstream path, how the stream's last event starts)
APIS: dict[str, tuple[str, Runner, str, bytes]] = {
    "chat": ("openai", stream_chat, CHAT_PATH, b"data: [DONE]"),
    "responses": ("openai", stream_responses, RESPONSES_PATH, b"event: response.completed\ndata: "),
    "messages": ("anthropic", stream_messages, MESSAGES_PATH, b'event: message_stop\ndata: {"type":"message_stop"}'),
}


def convention(api: str, usage: dict[str, Any]) -> dict[str, int]:
    """The gateway's usage convention (input incl. cached, output incl. reasoning)
    computed from the usage the SDK parsed."""
    if api == "chat":
        return {
            "input": usage["prompt_tokens"],
            "cached_input": usage["prompt_tokens_details"]["cached_tokens"],
            "output": usage["completion_tokens"],
            "reasoning": usage["completion_tokens_details"]["reasoning_tokens"],
        }
    if api == "responses":
        return {
            "input": usage["input_tokens"],
            "cached_input": usage["input_tokens_details"]["cached_tokens"],
            "output": usage["output_tokens"],
            "reasoning": usage["output_tokens_details"]["reasoning_tokens"],
        }
    cache_write = usage.get("cache_creation_input_tokens") or 0
    cache_read = usage.get("cache_read_input_tokens") or 0
    return {
        "input": usage["input_tokens"] + cache_write + cache_read,
        "cached_input": cache_read,
        "output": usage["output_tokens"],
        "reasoning": 0,
    }


def assert_informative(api: str, tokens: dict[str, int]) -> None:
    """Every counter the API reports is non-zero and differs from the others, so a
    gateway that reads the wrong field, or forgets one, gets a different sum."""
    reported = ["input", "cached_input", "output"] + (["reasoning"] if api != "messages" else [])
    values = [tokens[k] for k in reported]
    assert all(v > 0 for v in values) and len(set(values)) == len(values), (api, tokens)
    assert tokens["cached_input"] < tokens["input"] and tokens["reasoning"] < tokens["output"], (api, tokens)


def run_first_then_join(
    runner: Runner, original: Any, duplicate: Any, prompt: str, headers: dict[str, str], **kwargs: Any
) -> tuple[Streamed, Streamed]:
    """Starts ``original`` on a thread; once its first text delta is in, the same call
    with ``duplicate``, which joins the live stream. Returns (original, duplicate)."""
    first_text = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(runner, original, prompt, headers, on_first=first_text.set, **kwargs)
        wait_until(lambda: first_text.is_set() or future.done(), 10.0, "the original's first text delta")
        if not first_text.is_set():
            future.result()  # raises the original's failure
            pytest.fail("the original stream ended without a text delta")
        joined = runner(duplicate, prompt, headers, **kwargs)
        first = future.result(timeout=30)
    return first, joined


def replayed_headers(recorder: StreamRecorder) -> list[str | None]:
    return [headers.get("idempotent-replayed") for _, headers in recorder.responses]


def scrape_until(gateway: Gateway, check: Callable[[str], bool], what: str, timeout: float = 5.0) -> str:
    """``/metrics`` once ``check`` holds for it, or the last scrape after ``timeout``:
    the caller asserts on what it returns. Some counters move just after the client
    read its last byte: a request's outcome when its response ends, a join's savings
    when the original settles."""
    box = {"text": ""}

    def settled() -> bool:
        box["text"] = gateway.metrics()
        return check(box["text"])

    try:
        wait_until(settled, timeout, what, interval=0.05)
    except AssertionError:
        pass
    return box["text"]


def outcomes(text: str, *names: str) -> dict[str, float]:
    return {o: metric_sum(text, "idemgate_requests_total", outcome=o) for o in names}


# --- 1 to 3: a later duplicate replays the stream ----------------------------------


@pytest.mark.parametrize("api", list(APIS))
def test_a_streamed_sdk_call_is_replayed_with_the_same_text_ids_usage_and_bytes(api, mock, gateway):
    sdk, runner, path, last_event = APIS[api]
    rec = StreamRecorder()
    client = sdk_client(sdk, gateway.url, rec, max_retries=0, timeout=SDK_TIMEOUT)
    prompt = f"stream {api} through the gateway {uuid.uuid4()}"
    headers = {"Idempotency-Key": new_key(f"sdk-{api}-stream")}

    first = runner(client, prompt, headers)
    assert first.text == mock_text(1)
    assert mock.calls(path) == mock.calls() == 1
    assert_informative(api, convention(api, first.usage))
    original = bytes(rec.taps[0].body)
    assert original.endswith(b"\n\n") and sse_events(original)[-1].startswith(last_event), original[-300:]

    second = runner(client, prompt, headers)

    assert second.text == first.text
    assert second.ids == first.ids
    assert second.usage == first.usage
    assert second.model == first.model
    assert second.events == first.events
    assert len(rec.taps) == 2 and bytes(rec.taps[1].body) == original
    assert replayed_headers(rec) == ["false", "true"]
    assert rec.responses[1][1]["content-type"] == rec.responses[0][1]["content-type"]
    assert rec.responses[1][1]["content-type"].startswith("text/event-stream")

    # What the SDK sent, resent by raw httpx, is the same bytes once more.
    raw = resend(gateway, rec.attempts[-1])
    assert raw.status_code == 200
    assert raw.headers["idempotent-replayed"] == "true"
    assert raw.content == original
    assert mock.calls() == 1


# --- 4: a duplicate joins the live stream -----------------------------------------


@pytest.mark.parametrize("api", list(APIS))
def test_a_duplicate_sdk_stream_joins_the_live_original(api, mock, gateway):
    sdk, runner, path, _ = APIS[api]
    rec_a, rec_b = StreamRecorder(), StreamRecorder()
    client_a = sdk_client(sdk, gateway.url, rec_a, max_retries=0, timeout=SDK_TIMEOUT)
    client_b = sdk_client(sdk, gateway.url, rec_b, max_retries=0, timeout=SDK_TIMEOUT)
    prompt = f"a slow {api} stream {uuid.uuid4()}"
    headers = {
        "Idempotency-Key": new_key(f"sdk-{api}-join"),
        "x-mock-chunks": "6",
        "x-mock-chunk-delay-ms": "150",
    }

    first, joined = run_first_then_join(runner, client_a, client_b, prompt, headers)

    # The duplicate's first text arrived while the original was still streaming: it
    # joined the live call rather than waiting for the record.
    assert joined.first_text_at < first.last_at, (joined.first_text_at, first.last_at)
    assert first.text == joined.text == mock_text(1, 6)
    assert joined.ids == first.ids
    assert joined.usage == first.usage
    assert joined.events == first.events
    assert bytes(rec_b.taps[0].body) == bytes(rec_a.taps[0].body)
    assert replayed_headers(rec_a) == ["false"]
    assert replayed_headers(rec_b) == ["true"]
    assert mock.calls(path) == mock.calls() == 1

    want = {"executed": 1, "joined": 1, "replayed": 0}
    text = scrape_until(gateway, lambda t: outcomes(t, *want) == want, f"outcomes {want}")
    assert outcomes(text, *want) == want, text


# --- 5: tokens and money saved ------------------------------------------------------

#: Per million tokens: (input, cached input, output). The decoys must never apply:
#: "gpt-4o" is a shorter prefix of "gpt-4o-mini-2024-07-18" than "gpt-4o-mini", and
#: "claude" a shorter one of "claude-mock-e2e" than "claude-mock".
PRICES_TOML = """
[prices]
currency = "USD"
[prices.models]
"gpt-4o-mini" = { input = 0.15, cached-input = 0.075, output = 0.6 }
"gpt-4o" = { input = 2.5, cached-input = 1.25, output = 10.0 }
"claude-mock" = { input = 3.0, output = 15.0 }
"claude" = { input = 1000.0, cached-input = 1000.0, output = 1000.0 }
"""
GPT_4O_MINI = (0.15, 0.075, 0.6)
CLAUDE_MOCK = (3.0, 3.0, 15.0)  # cached input defaults to the input price
DATED_MINI = "gpt-4o-mini-2024-07-18"
UNPRICED = "mock-unpriced-model"


def cost(tokens: dict[str, int], price: tuple[float, float, float]) -> float:
    input_price, cached_price, output_price = price
    return (
        (tokens["input"] - tokens["cached_input"]) * input_price
        + tokens["cached_input"] * cached_price
        + tokens["output"] * output_price
    ) / 1e6


def add(*usages: dict[str, int]) -> dict[str, int]:
    return {kind: sum(u[kind] for u in usages) for kind in ("input", "cached_input", "output", "reasoning")}


def saved_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "_saved_" in line)


def test_replays_and_joins_count_the_recorded_tokens_and_cost_as_saved(mock, gateways, tmp_path):
    gateway = gateways.start("--config", str(write_config(tmp_path / "prices.toml", PRICES_TOML)))
    rec = StreamRecorder()
    openai_client = sdk_client("openai", gateway.url, rec, max_retries=0, timeout=SDK_TIMEOUT)
    anthropic_a = sdk_client("anthropic", gateway.url, StreamRecorder(), max_retries=0, timeout=SDK_TIMEOUT)
    anthropic_b = sdk_client("anthropic", gateway.url, StreamRecorder(), max_retries=0, timeout=SDK_TIMEOUT)
    zero = {"input": 0, "cached_input": 0, "output": 0, "reasoning": 0}

    # Executed calls: a streamed chat call, a non-streamed Responses call (a dated model
    # name, priced by its prefix), a streamed chat call of a model without a price.
    chat_prompt = f"tokens saved by a chat stream {uuid.uuid4()}"
    chat_headers = {"Idempotency-Key": new_key("saved-chat")}
    chat = stream_chat(openai_client, chat_prompt, chat_headers)
    assert chat.model == OPENAI_MODEL

    resp_prompt = f"tokens saved by a Responses call, a longer prompt {uuid.uuid4()} " + "x" * 37
    resp_headers = {"Idempotency-Key": new_key("saved-responses")}
    resp = openai_client.responses.create(model=DATED_MINI, input=resp_prompt, extra_headers=resp_headers)
    assert resp.model == DATED_MINI
    resp_tokens = convention("responses", resp.usage.model_dump())

    free_prompt = f"an unpriced model {uuid.uuid4()} " + "y" * 61
    free_headers = {"Idempotency-Key": new_key("saved-unpriced"), "x-mock-chunks": "7"}
    free = stream_chat(openai_client, free_prompt, free_headers, model=UNPRICED)
    assert mock.calls() == 3

    chat_tokens = convention("chat", chat.usage)
    free_tokens = convention("chat", free.usage)
    for api, tokens in (("chat", chat_tokens), ("responses", resp_tokens), ("chat", free_tokens)):
        assert_informative(api, tokens)
    distinct = {tuple(t.values()) for t in (chat_tokens, resp_tokens, free_tokens)}
    assert len(distinct) == 3, "the sums must tell the calls apart"

    text = gateway.metrics()
    assert tokens_saved(text) == zero, f"executed calls saved nothing\n{saved_lines(text)}"
    assert cost_saved(text) == 0.0, saved_lines(text)

    # Two replays of the chat stream, one of the Responses call, one of the unpriced stream.
    for _ in range(2):
        again = stream_chat(openai_client, chat_prompt, chat_headers)
        assert (again.text, again.ids, again.usage) == (chat.text, chat.ids, chat.usage)
    again_resp = openai_client.responses.create(model=DATED_MINI, input=resp_prompt, extra_headers=resp_headers)
    assert (again_resp.id, again_resp.output_text, again_resp.usage) == (resp.id, resp.output_text, resp.usage)
    again_free = stream_chat(openai_client, free_prompt, free_headers, model=UNPRICED)
    assert again_free.usage == free.usage
    assert replayed_headers(rec) == ["false", "false", "false", "true", "true", "true", "true"]

    # An Anthropic stream, executed once and joined once.
    msg_prompt = f"tokens saved by joining a Messages stream {uuid.uuid4()} " + "z" * 23
    msg_headers = {"Idempotency-Key": new_key("saved-join"), "x-mock-chunks": "5", "x-mock-chunk-delay-ms": "120"}
    msg, msg_joined = run_first_then_join(stream_messages, anthropic_a, anthropic_b, msg_prompt, msg_headers)
    assert msg_joined.first_text_at < msg.last_at, "the duplicate should have joined the live stream"
    assert (msg_joined.text, msg_joined.ids, msg_joined.usage) == (msg.text, msg.ids, msg.usage)
    assert msg.model == ANTHROPIC_MODEL
    msg_tokens = convention("messages", msg.usage)
    assert_informative("messages", msg_tokens)
    assert msg.usage["cache_creation_input_tokens"] > 0, "the Anthropic input must include the cache writes"
    assert mock.calls() == 4

    expected = add(chat_tokens, chat_tokens, resp_tokens, free_tokens, msg_tokens)
    want = {"executed": 4, "replayed": 4, "joined": 1}
    text = scrape_until(
        gateway, lambda t: tokens_saved(t) == expected and outcomes(t, *want) == want, f"{expected} saved, {want}"
    )
    assert tokens_saved(text) == expected, saved_lines(text)
    expected_cost = 2 * cost(chat_tokens, GPT_4O_MINI) + cost(resp_tokens, GPT_4O_MINI) + cost(msg_tokens, CLAUDE_MOCK)
    assert cost_saved(text) == pytest.approx(expected_cost, rel=1e-9, abs=0), saved_lines(text)
    assert [labels for labels, _ in metric_samples(text, "idemgate_cost_saved_total")] == [{"currency": "USD"}]

    assert outcomes(text, *want) == want, text
    assert mock.calls() == 4


# --- 6: replay at the recorded pace -------------------------------------------------

PACE_CHUNKS = 5
PACE_GAP_MS = 100
PACED_TOML = 'replay-pace = "recorded"\n'


@dataclass
class Timed:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: float
    arrivals: list[float]
    done: float


def timed_post(url: str, body: dict[str, Any], headers: dict[str, str]) -> Timed:
    """POSTs with raw httpx and notes when each piece of the body arrived."""
    data, arrivals = bytearray(), []
    with http_client() as client:
        sent = time.monotonic()
        with client.stream(
            "POST", url, content=json.dumps(body).encode(), headers={"content-type": "application/json", **headers}
        ) as res:
            for piece in res.iter_raw():
                arrivals.append(time.monotonic())
                data.extend(piece)
        done = time.monotonic()
    return Timed(res.status_code, {k.lower(): v for k, v in res.headers.items()}, bytes(data), sent, arrivals, done)


def pace_targets(variant: str, gateways: Any, mock: Any, tmp_path: Path) -> tuple[str, str]:
    """(paced base URL, immediate base URL): two gateways (a global setting), or one
    gateway with two routes (a per-route setting)."""
    if variant == "global":
        config = write_config(tmp_path / "paced.toml", PACED_TOML)
        paced = gateways.start("--config", str(config), store=f"sqlite://{tmp_path / 'paced.db'}")
        plain = gateways.start(store=f"sqlite://{tmp_path / 'plain.db'}")
        return paced.url, plain.url
    routes = f"""
[[routes]]
name = "paced"
prefix = "/paced"
upstream = "{mock.url}"
strip-prefix = true
replay-pace = "recorded"

[[routes]]
name = "plain"
prefix = "/"
upstream = "{mock.url}"
"""
    gateway = gateways.start("--config", str(write_config(tmp_path / "routes.toml", routes)), upstream=False)
    return f"{gateway.url}/paced", gateway.url


@pytest.mark.parametrize("variant", ["global", "route"])
def test_replay_pace_recorded_replays_a_stream_at_its_recorded_pace(variant, mock, gateways, tmp_path):
    paced_url, plain_url = pace_targets(variant, gateways, mock, tmp_path)
    body = chat_body(f"pace me {uuid.uuid4()}", stream=True)
    headers = openai_headers(
        new_key(f"pace-{variant}"),
        **{"x-mock-chunks": str(PACE_CHUNKS), "x-mock-chunk-delay-ms": str(PACE_GAP_MS)},
    )

    # Record one stream on each side, at the same time to save the wait.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        originals = list(pool.map(lambda base: timed_post(f"{base}{CHAT_PATH}", body, headers), (paced_url, plain_url)))
    assert mock.calls(CHAT_PATH) == 2
    for original in originals:
        assert original.status == 200 and original.headers["idempotent-replayed"] == "false"
        assert original.body.endswith(b"data: [DONE]\n\n")
    events = sse_events(originals[0].body)
    assert len(events) == PACE_CHUNKS + 3  # role, 5 deltas, finish, [DONE]
    # The upstream paused PACE_GAP_MS between two events: the recording spans at least this.
    span = (len(events) - 1) * PACE_GAP_MS / 1000

    paced = timed_post(f"{paced_url}{CHAT_PATH}", body, headers)
    plain = timed_post(f"{plain_url}{CHAT_PATH}", body, headers)

    for replay, original in ((paced, originals[0]), (plain, originals[1])):
        assert replay.status == 200 and replay.headers["idempotent-replayed"] == "true"
        assert replay.body == original.body
    assert mock.calls() == 2

    # Paced: the whole replay takes the recorded span (timer granularity aside), and
    # the first bytes still come at once: it is paced, not held back.
    paced_total = paced.done - paced.sent
    assert paced_total >= 0.95 * span, f"paced replay took {paced_total:.3f}s, the recording spans {span:.3f}s"
    assert paced.arrivals[0] - paced.sent < span / 2, f"first paced bytes after {paced.arrivals[0] - paced.sent:.3f}s"
    assert paced.arrivals[-1] - paced.arrivals[0] >= 0.95 * span - (paced.arrivals[0] - paced.sent)

    # Immediate: all of it at once.
    spread = plain.arrivals[-1] - plain.arrivals[0]
    plain_total = plain.done - plain.sent
    assert spread < 0.2, f"an immediate replay spread its body over {spread:.3f}s"
    assert plain_total < span / 2, f"an immediate replay took {plain_total:.3f}s"
