//! Server-sent events as the gateway records them: an incremental splitter that keeps
//! every byte, and a tracker that knows the three LLM stream protocols.
//!
//! A streamed response is forwarded chunk by chunk as it arrives and recorded as bytes,
//! so a replay is byte-identical (SPEC section 6). What the gateway needs from the
//! events is small: whether the stream reached its protocol's terminator without an
//! in-band error (a recording cut short must never be served as complete), and the usage
//! it reported (SPEC section 7). [`Splitter`] cuts the byte stream into [`Event`]s by the
//! WHATWG `EventSource` rules, whatever the chunking, each event carrying its exact bytes;
//! [`StreamTracker`] reads the events of a [`Protocol`] and gives a [`Verdict`], the
//! [`Usage`] and the model.

use std::borrow::Cow;
use std::mem;

use bytes::{Bytes, BytesMut};
use memchr::{memchr, memchr2, memmem};
use serde_json::Value;

use crate::usage::{self, AnthropicUsage, Usage};

/// The UTF-8 byte order mark, which the `EventSource` rules ignore at the start of a stream.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One server-sent event: the exact bytes of a block of lines up to and including the
/// blank line that ends it, and what those lines say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event's bytes as received, from its first byte through the line end of its
    /// terminating blank line (both bytes of a CRLF).
    pub raw: Bytes,
    /// The last `event:` field's value; `None` when there is none or it is empty.
    pub name: Option<String>,
    /// The `data:` fields' values joined with `\n`; `None` when the event has no `data`
    /// line (`Some("")` for a bare `data:`).
    pub data: Option<String>,
    /// Whether the block holds no field line: only comments (a `: keep-alive` ping), or
    /// nothing at all (a stray extra blank line, whose `raw` is just its line end).
    pub comment_only: bool,
}

/// Splits a byte stream arriving in arbitrary chunks into [`Event`]s.
///
/// Lines end with CRLF, LF or CR, and a CRLF split across two chunks is one line end.
/// A line starting with `:` is a comment; `field: value` loses one optional space after
/// the colon; a line without a colon is a field with an empty value; `data` values are
/// joined with `\n`; `event` names the event; `id`, `retry` and unknown fields are
/// ignored. Lines are decoded only once complete, so a UTF-8 sequence split across
/// chunks decodes whole; invalid UTF-8 decodes lossily. A leading byte order mark is
/// ignored (and kept in the bytes).
///
/// Every byte pushed ends up in exactly one event's `raw` or in the remainder
/// [`finish`](Self::finish) returns, in order: the concatenation of the raws and the
/// remainder is the input. An event whose blank line ends with a CR at the very end of a
/// chunk is held until the next byte (which may be the LF of a CRLF) or `finish`.
#[derive(Debug, Default)]
pub struct Splitter {
    /// Received bytes not yet emitted: the current event's, from its first byte.
    pending: BytesMut,
    /// The current line's bytes from earlier chunks, when it spans chunks.
    line: Vec<u8>,
    /// Whether the last byte seen was a CR, so that an LF next belongs to it.
    after_cr: bool,
    /// Whether `pending` is a whole event, held because its last byte is that CR.
    held: bool,
    /// Whether a line has been parsed since the stream began (for the byte order mark).
    started: bool,
    name: Option<String>,
    data: String,
    has_data: bool,
    has_fields: bool,
}

impl Splitter {
    /// A splitter at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next chunk, appending the events it completes to `out`.
    pub fn push(&mut self, chunk: &Bytes, out: &mut Vec<Event>) {
        let buf = &chunk[..];
        if buf.is_empty() {
            return;
        }
        let mut pos = 0;
        // Where the current event's bytes start in this chunk; the bytes before it that
        // belong to it are in `pending`.
        let mut start = 0;
        if mem::take(&mut self.after_cr) && buf[0] == b'\n' {
            pos = 1;
        }
        if mem::take(&mut self.held) {
            self.pending.extend_from_slice(&buf[..pos]);
            let raw = self.pending.split().freeze();
            out.push(self.dispatch(raw));
            start = pos;
        }
        while pos < buf.len() {
            let Some(i) = memchr2(b'\r', b'\n', &buf[pos..]) else {
                self.line.extend_from_slice(&buf[pos..]);
                break;
            };
            let end = pos + i;
            let mut next = end + 1;
            if buf[end] == b'\r' {
                match buf.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let blank = if self.line.is_empty() {
                self.parse_line(&buf[pos..end])
            } else {
                let mut line = mem::take(&mut self.line);
                line.extend_from_slice(&buf[pos..end]);
                let blank = self.parse_line(&line);
                line.clear();
                self.line = line;
                blank
            };
            pos = next;
            if blank {
                if self.after_cr {
                    // The CR ends the chunk: an LF may follow in the next one.
                    self.held = true;
                } else {
                    let raw = if self.pending.is_empty() {
                        chunk.slice(start..pos)
                    } else {
                        self.pending.extend_from_slice(&buf[start..pos]);
                        self.pending.split().freeze()
                    };
                    out.push(self.dispatch(raw));
                    start = pos;
                }
            }
        }
        self.pending.extend_from_slice(&buf[start..]);
    }

    /// Ends the stream: emits a held event (its blank line ended with a CR, which the end
    /// of the stream confirms as a line end) and returns the bytes of the unterminated
    /// event after it, which is never emitted (empty when the stream ended on an event
    /// boundary). The splitter is then back at the start of a stream.
    pub fn finish(&mut self, out: &mut Vec<Event>) -> Bytes {
        if self.held {
            let raw = self.pending.split().freeze();
            out.push(self.dispatch(raw));
        }
        let rest = mem::take(&mut self.pending).freeze();
        *self = Self::default();
        rest
    }

    /// The number of bytes received but not yet emitted in an event.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// Parses one complete line (without its line end); true when it is blank.
    fn parse_line(&mut self, mut line: &[u8]) -> bool {
        if !mem::replace(&mut self.started, true) {
            line = line.strip_prefix(BOM).unwrap_or(line);
        }
        let Some(&first) = line.first() else { return true };
        if first == b':' {
            return false;
        }
        let (field, value) = match memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        self.has_fields = true;
        match field {
            b"data" => {
                if mem::replace(&mut self.has_data, true) {
                    self.data.push('\n');
                }
                self.data.push_str(&String::from_utf8_lossy(value));
            }
            b"event" => {
                self.name = (!value.is_empty()).then(|| String::from_utf8_lossy(value).into_owned());
            }
            _ => {}
        }
        false
    }

    /// The event the parsed lines make, with its bytes; resets the fields for the next.
    fn dispatch(&mut self, raw: Bytes) -> Event {
        let data = mem::take(&mut self.has_data).then(|| mem::take(&mut self.data));
        Event { raw, name: self.name.take(), data, comment_only: !mem::take(&mut self.has_fields) }
    }
}

/// The stream protocol of an LLM API, which decides what ends a stream and where its
/// usage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// OpenAI Chat Completions: `data:`-only events, terminator `data: [DONE]`.
    ChatCompletions,
    /// OpenAI Responses: typed `response.*` events, terminal `response.completed`,
    /// `response.incomplete` or `response.failed`.
    Responses,
    /// Anthropic Messages: named events, terminal `message_stop`.
    Messages,
    /// Any other event stream, complete when the upstream closes it cleanly.
    Other,
}

impl Protocol {
    /// The protocol served at a request path, by its last segments: `…/chat/completions`,
    /// `…/responses` or `…/messages`, after any prefix (`/openai/v1/chat/completions`).
    /// A query, if the caller passes one, and a trailing `/` are ignored.
    pub fn from_path(path: &str) -> Self {
        let path = path.split_once('?').map_or(path, |(path, _)| path);
        let path = path.strip_suffix('/').unwrap_or(path);
        if path.ends_with("/chat/completions") {
            Self::ChatCompletions
        } else if path.ends_with("/responses") {
            Self::Responses
        } else if path.ends_with("/messages") {
            Self::Messages
        } else {
            Self::Other
        }
    }
}

/// Whether a recorded stream may be served as a complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The protocol's terminator was seen with no in-band error before it (or, for
    /// [`Protocol::Other`], the stream ended cleanly).
    Complete,
    /// The stream ended, cleanly or not, before its terminator.
    Incomplete,
    /// The upstream reported an error inside the stream, before any terminator.
    Error,
}

/// How many events of a [`Protocol::Other`] stream are inspected for a known protocol.
const SNIFF_EVENTS: u8 = 4;
/// How many Chat Completions chunks are parsed looking for the model before giving up
/// (the usage chunk, when there is one, names it too).
const MODEL_TRIES: u8 = 4;

/// Follows one stream's events: whether it reached its terminator, and what usage and
/// model it reported.
///
/// Feed it every [`Event`] in order with [`observe`](Self::observe). Only the events that
/// can carry what it looks for are parsed as JSON: Chat Completions chunks whose data
/// holds a `"usage"` object or an `"error"` (and the first few, for the model);
/// Responses' `response.created` and terminal events; Anthropic's `message_start` and
/// `message_delta`. Once the terminator has been seen, later events are ignored.
///
/// Terminators and errors, by protocol:
///
/// - Chat Completions: complete on a chunk whose data is `[DONE]` (trailing whitespace
///   ignored); a chunk whose data has a non-null top-level `error`, or an event named
///   `error`, is an in-band error. Usage comes from any chunk with a non-null `usage`
///   (the last one wins).
/// - Responses: complete on `response.completed`, `response.incomplete` or
///   `response.failed` (the event name, else the data's `type`); `error` is an in-band
///   error. Usage is the terminal event's `response.usage`. A `response.failed` stream
///   is `Complete`: the upstream finished and said so; its content tells the failure.
/// - Messages: complete on `message_stop`; `error` is an in-band error. Usage is
///   `message_start`'s `message.usage` overlaid, counter by counter, by each
///   `message_delta`'s cumulative `usage`.
/// - Other: no terminator and no in-band error; complete when it ends cleanly. Its first
///   few events may reveal a known protocol (`message_start`, a `response.*` event, a
///   `chat.completion.chunk` object), and from then on that protocol's rules apply.
#[derive(Debug, Clone)]
pub struct StreamTracker {
    protocol: Protocol,
    sniffed: u8,
    model_tries: u8,
    terminated: bool,
    errored: bool,
    usage: Option<Usage>,
    anthropic: Option<AnthropicUsage>,
    model: Option<String>,
}

impl StreamTracker {
    /// A tracker for a stream of `protocol` (usually [`Protocol::from_path`]).
    pub const fn new(protocol: Protocol) -> Self {
        Self {
            protocol,
            sniffed: 0,
            model_tries: 0,
            terminated: false,
            errored: false,
            usage: None,
            anthropic: None,
            model: None,
        }
    }

    /// The stream's protocol: the one it was created with, or the one its first events
    /// revealed when that was [`Protocol::Other`].
    pub const fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Takes the next event of the stream into account.
    pub fn observe(&mut self, event: &Event) {
        if self.terminated || event.comment_only {
            return;
        }
        if self.protocol == Protocol::Other && self.sniffed < SNIFF_EVENTS {
            self.sniffed += 1;
            self.protocol = sniff(event);
        }
        match self.protocol {
            Protocol::ChatCompletions => self.observe_chat(event),
            Protocol::Responses => self.observe_responses(event),
            Protocol::Messages => self.observe_messages(event),
            Protocol::Other => {}
        }
    }

    /// Whether the stream may be served as complete, given whether it ended cleanly (the
    /// upstream closed it without a transport error, and the last event was terminated):
    ///
    /// - [`Verdict::Error`] if an in-band error was seen before any terminator, whatever
    ///   came after;
    /// - else [`Verdict::Complete`] if the terminator was seen, even if the connection
    ///   broke after it (bytes after the terminator do not matter);
    /// - else, for [`Protocol::Other`], `Complete` if `ended_cleanly`;
    /// - else [`Verdict::Incomplete`].
    pub fn verdict(&self, ended_cleanly: bool) -> Verdict {
        if self.errored {
            Verdict::Error
        } else if self.terminated || (self.protocol == Protocol::Other && ended_cleanly) {
            Verdict::Complete
        } else {
            Verdict::Incomplete
        }
    }

    /// The usage the stream reported so far, if any.
    pub fn usage(&self) -> Option<Usage> {
        self.anthropic.as_ref().map(AnthropicUsage::usage).or(self.usage)
    }

    /// The model the stream named, if any: Chat Completions' chunk `model`, Responses'
    /// `response.model`, Anthropic's `message_start` `message.model`.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn observe_chat(&mut self, event: &Event) {
        if event.name.as_deref() == Some("error") {
            self.errored = true;
            return;
        }
        let Some(data) = event.data.as_deref() else { return };
        if data.trim_end() == "[DONE]" {
            self.terminated = true;
            return;
        }
        let bytes = data.as_bytes();
        let want_model = self.model.is_none() && self.model_tries < MODEL_TRIES;
        if !(want_model || object_follows(bytes, b"\"usage\"") || memmem::find(bytes, b"\"error\"").is_some()) {
            return;
        }
        self.model_tries = self.model_tries.saturating_add(u8::from(want_model));
        let Ok(v) = serde_json::from_str::<Value>(data) else { return };
        if v.get("error").is_some_and(|e| !e.is_null()) {
            self.errored = true;
        }
        if let Some(u) = v.get("usage").and_then(usage::chat) {
            self.usage = Some(u);
        }
        if self.model.is_none() {
            self.model = model_at(&v, &["model"]);
        }
    }

    fn observe_responses(&mut self, event: &Event) {
        let (kind, mut parsed) = kind(event);
        match kind.as_deref() {
            Some("error") => self.errored = true,
            Some("response.completed" | "response.incomplete" | "response.failed") => {
                self.terminated = true;
                if let Some(v) = parse(event, &mut parsed) {
                    if let Some(u) = v.pointer("/response/usage").and_then(usage::responses) {
                        self.usage = Some(u);
                    }
                    if let Some(model) = model_at(v, &["response", "model"]) {
                        self.model = Some(model);
                    }
                }
            }
            Some("response.created") if self.model.is_none() => {
                if let Some(v) = parse(event, &mut parsed) {
                    self.model = model_at(v, &["response", "model"]);
                }
            }
            _ => {}
        }
    }

    fn observe_messages(&mut self, event: &Event) {
        let (kind, mut parsed) = kind(event);
        match kind.as_deref() {
            Some("error") => self.errored = true,
            Some("message_stop") => self.terminated = true,
            Some("message_start") => {
                if let Some(v) = parse(event, &mut parsed) {
                    if let Some(u) = v.pointer("/message/usage") {
                        self.merge_anthropic(u);
                    }
                    if let Some(model) = model_at(v, &["message", "model"]) {
                        self.model = Some(model);
                    }
                }
            }
            Some("message_delta") => {
                if let Some(u) = parse(event, &mut parsed).and_then(|v| v.get("usage")) {
                    self.merge_anthropic(u);
                }
            }
            _ => {}
        }
    }

    fn merge_anthropic(&mut self, u: &Value) {
        let mut totals = self.anthropic.unwrap_or_default();
        if totals.merge(u) {
            self.anthropic = Some(totals);
        }
    }
}

/// The protocol an event reveals, or [`Protocol::Other`].
fn sniff(event: &Event) -> Protocol {
    let typed = |kind: &str| {
        if kind == "message_start" {
            Protocol::Messages
        } else if kind.starts_with("response.") {
            Protocol::Responses
        } else {
            Protocol::Other
        }
    };
    if let Some(name) = event.name.as_deref() {
        return typed(name);
    }
    let Some(data) = event.data.as_deref() else { return Protocol::Other };
    if !data.trim_start().starts_with('{') {
        return Protocol::Other;
    }
    let Ok(v) = serde_json::from_str::<Value>(data) else { return Protocol::Other };
    if v.get("object").and_then(Value::as_str) == Some("chat.completion.chunk") {
        return Protocol::ChatCompletions;
    }
    v.get("type").and_then(Value::as_str).map_or(Protocol::Other, typed)
}

/// An event's type: its name, else its data's `"type"` (parsing the data, which is then
/// returned for reuse).
fn kind(event: &Event) -> (Option<Cow<'_, str>>, Option<Option<Value>>) {
    if let Some(name) = event.name.as_deref() {
        return (Some(Cow::Borrowed(name)), None);
    }
    let v = event.data.as_deref().and_then(|d| serde_json::from_str::<Value>(d).ok());
    let kind = v.as_ref().and_then(|v| v.get("type")).and_then(Value::as_str).map(|t| Cow::Owned(t.to_owned()));
    (kind, Some(v))
}

/// The event's data as JSON, parsed once: `parsed` caches the outcome.
fn parse<'a>(event: &Event, parsed: &'a mut Option<Option<Value>>) -> Option<&'a Value> {
    parsed.get_or_insert_with(|| event.data.as_deref().and_then(|d| serde_json::from_str(d).ok())).as_ref()
}

/// A non-empty string at `path` below `v`.
fn model_at(v: &Value, path: &[&str]) -> Option<String> {
    let s = path.iter().try_fold(v, |v, key| v.get(key))?.as_str()?;
    (!s.is_empty()).then(|| s.to_owned())
}

/// Whether some occurrence of the quoted `key` in `json` is followed by `:` and an
/// object, allowing whitespace: a cheap filter before parsing.
fn object_follows(json: &[u8], key: &[u8]) -> bool {
    memmem::find_iter(json, key).any(|at| {
        let mut rest = json[at + key.len()..].iter().copied().skip_while(u8::is_ascii_whitespace);
        rest.next() == Some(b':') && rest.find(|b| !b.is_ascii_whitespace()) == Some(b'{')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHAT_CHUNK: &str = r#"{"id":"chatcmpl-Bx1","object":"chat.completion.chunk","created":1760000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_1","choices":[{"index":0,"delta":DELTA,"logprobs":null,"finish_reason":FINISH}],"usage":null,"obfuscation":"a1b2"}"#;

    fn chat_chunk(delta: &str, finish: &str) -> String {
        format!("data: {}\n\n", CHAT_CHUNK.replace("DELTA", delta).replace("FINISH", finish))
    }

    fn chat_stream() -> String {
        let mut s = chat_chunk(r#"{"role":"assistant","content":"","refusal":null}"#, "null");
        for piece in ["Hel", "lo, h\u{e9}llo ", "\u{4e16}\u{754c} \u{1f389}", "!"] {
            s += &chat_chunk(&format!(r#"{{"content":{}}}"#, Value::String(piece.into())), "null");
        }
        s += &chat_chunk("{}", r#""stop""#);
        s += r#"data: {"id":"chatcmpl-Bx1","object":"chat.completion.chunk","created":1760000000,"model":"gpt-4o-2024-08-06","choices":[],"usage":{"prompt_tokens":1200,"completion_tokens":300,"total_tokens":1500,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":128,"audio_tokens":0}},"obfuscation":"c3"}"#;
        s += "\n\ndata: [DONE]\n\n";
        s
    }

    fn responses_event(name: &str, seq: u32, rest: &str) -> String {
        format!("event: {name}\ndata: {{\"type\":\"{name}\",\"sequence_number\":{seq},{rest}}}\n\n")
    }

    fn responses_stream() -> String {
        let obj = |status: &str, usage: &str| {
            format!(
                r#""response":{{"id":"resp_1","object":"response","created_at":1760000000,"status":"{status}","error":null,"model":"o4-mini-2025-04-16","output":[],"usage":{usage}}}"#
            )
        };
        let mut s = responses_event("response.created", 0, &obj("in_progress", "null"));
        s += &responses_event("response.in_progress", 1, &obj("in_progress", "null"));
        s += &responses_event(
            "response.output_item.added",
            2,
            r#""output_index":0,"item":{"id":"msg_1","type":"message","status":"in_progress","content":[],"role":"assistant"}"#,
        );
        for (i, piece) in ["h\u{e9}llo ", "\u{4e16}\u{754c} ", "\u{1f389}"].iter().enumerate() {
            let delta = format!(
                r#""item_id":"msg_1","output_index":0,"content_index":0,"delta":{},"logprobs":[]"#,
                Value::String((*piece).into())
            );
            s += &responses_event("response.output_text.delta", 3 + i as u32, &delta);
        }
        s += &responses_event(
            "response.completed",
            6,
            &obj(
                "completed",
                r#"{"input_tokens":500,"input_tokens_details":{"cached_tokens":256},"output_tokens":90,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":590}"#,
            ),
        );
        s
    }

    fn messages_stream() -> String {
        let ev = |name: &str, data: &str| format!("event: {name}\ndata: {data}\n\n");
        let mut s = ev(
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_01X","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,"output_tokens":1,"service_tier":"standard"}}}"#,
        );
        s += &ev(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        );
        s += &ev("ping", r#"{"type": "ping"}"#);
        for piece in ["h\u{e9}llo ", "\u{4e16}\u{754c} ", "\u{1f389}"] {
            s += &ev(
                "content_block_delta",
                &format!(
                    r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#,
                    Value::String(piece.into())
                ),
            );
        }
        s += &ev("content_block_stop", r#"{"type":"content_block_stop","index":0}"#);
        s += &ev(
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
        );
        s += &ev("message_stop", r#"{"type":"message_stop"}"#);
        s
    }

    /// Everything the parser has to get right in one stream: a byte order mark, comments,
    /// `data:` without a space and with two, multi-line data, a field without a colon,
    /// an `event:` without data, stray blank lines, `id` and `retry`, and an
    /// unterminated tail.
    fn odd_stream() -> String {
        concat!(
            "\u{feff}: keep-alive\n\n",
            "data:x\n\n",
            "data:  two spaces\r\n\r\n",
            "event: multi\ndata: line one\ndata:\ndata: line three \u{1f389}\n\n",
            "\n\n",
            "event: named-only\n\n",
            "data\n\n",
            "id: 7\nretry: 1000\nfoo: bar\n: comment\ndata: h\u{e9}llo \u{4e16}\u{754c}\r\r",
            "event:\ndata: {\"a\":1}\n\n",
            "data: unterminated",
        )
        .to_owned()
    }

    fn fixtures() -> Vec<(&'static str, Protocol, Vec<u8>)> {
        vec![
            ("chat", Protocol::ChatCompletions, chat_stream().into_bytes()),
            ("responses", Protocol::Responses, responses_stream().into_bytes()),
            ("messages", Protocol::Messages, messages_stream().into_bytes()),
            ("chat-crlf", Protocol::ChatCompletions, chat_stream().replace('\n', "\r\n").into_bytes()),
            ("messages-cr", Protocol::Messages, messages_stream().replace('\n', "\r").into_bytes()),
            ("responses-crlf", Protocol::Responses, responses_stream().replace('\n', "\r\n").into_bytes()),
            ("odd", Protocol::Other, odd_stream().into_bytes()),
        ]
    }

    /// Feeds `input` cut at `cuts` (sorted or not, any values), then finishes.
    fn feed(input: &[u8], cuts: &[usize]) -> (Vec<Event>, Bytes) {
        let input = Bytes::copy_from_slice(input);
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
        cuts.sort_unstable();
        let mut splitter = Splitter::new();
        let mut events = Vec::new();
        let mut from = 0;
        for cut in cuts.into_iter().chain([input.len()]) {
            splitter.push(&input.slice(from..cut), &mut events);
            from = cut;
        }
        let rest = splitter.finish(&mut events);
        assert_eq!(splitter.buffered(), 0);
        (events, rest)
    }

    fn concat(events: &[Event], rest: &[u8]) -> Vec<u8> {
        let mut all: Vec<u8> = events.iter().flat_map(|e| e.raw.iter().copied()).collect();
        all.extend_from_slice(rest);
        all
    }

    fn track(protocol: Protocol, events: &[Event]) -> StreamTracker {
        let mut t = StreamTracker::new(protocol);
        for e in events {
            t.observe(e);
        }
        t
    }

    type Summary = (Protocol, Verdict, Verdict, Option<Usage>, Option<String>);

    fn summary(t: &StreamTracker) -> Summary {
        (t.protocol(), t.verdict(true), t.verdict(false), t.usage(), t.model().map(str::to_owned))
    }

    /// The `EventSource` rules written plainly over a whole input, as an oracle.
    fn reference(input: &[u8]) -> (Vec<Event>, Vec<u8>) {
        let mut events = Vec::new();
        let (mut i, mut start, mut first) = (0, 0, true);
        let (mut name, mut data, mut fields) = (None::<String>, None::<String>, false);
        while let Some(j) = input[i..].iter().position(|&b| b == b'\r' || b == b'\n') {
            let mut line = &input[i..i + j];
            let mut next = i + j + 1;
            if input[i + j] == b'\r' && input.get(next) == Some(&b'\n') {
                next += 1;
            }
            if first {
                first = false;
                line = line.strip_prefix(BOM).unwrap_or(line);
            }
            if line.is_empty() {
                events.push(Event {
                    raw: Bytes::copy_from_slice(&input[start..next]),
                    name: name.take(),
                    data: data.take(),
                    comment_only: !fields,
                });
                fields = false;
                start = next;
            } else if line[0] != b':' {
                fields = true;
                let colon = line.iter().position(|&b| b == b':');
                let field = &line[..colon.unwrap_or(line.len())];
                let mut value = colon.map_or(&b""[..], |c| &line[c + 1..]);
                if value.first() == Some(&b' ') {
                    value = &value[1..];
                }
                let value = String::from_utf8_lossy(value).into_owned();
                if field == b"data" {
                    data = Some(match data {
                        Some(d) => d + "\n" + &value,
                        None => value,
                    });
                } else if field == b"event" {
                    name = (!value.is_empty()).then_some(value);
                }
            }
            i = next;
        }
        (events, input[start..].to_vec())
    }

    #[test]
    fn every_two_piece_split_gives_the_same_events_and_verdict() {
        for (label, protocol, input) in fixtures() {
            let (whole, rest) = feed(&input, &[]);
            assert_eq!((whole.clone(), rest.to_vec()), reference(&input), "{label}");
            assert_eq!(concat(&whole, &rest), input, "{label}");
            let expected = summary(&track(protocol, &whole));
            let sniffed = summary(&track(Protocol::Other, &whole));
            assert_eq!(expected.0, protocol, "{label}");
            for cut in 0..=input.len() {
                let (events, r) = feed(&input, &[cut]);
                assert_eq!(events, whole, "{label} cut at {cut}");
                assert_eq!(r, rest, "{label} cut at {cut}");
                assert_eq!(summary(&track(protocol, &events)), expected, "{label} cut at {cut}");
                assert_eq!(summary(&track(Protocol::Other, &events)), sniffed, "{label} cut at {cut}");
            }
        }
    }

    #[test]
    fn every_byte_its_own_chunk() {
        for (label, _, input) in fixtures() {
            let cuts: Vec<usize> = (0..input.len()).collect();
            assert_eq!(feed(&input, &cuts), feed(&input, &[]), "{label}");
        }
    }

    #[test]
    fn fixtures_parse_as_expected() {
        let (events, rest) = feed(chat_stream().as_bytes(), &[]);
        assert!(rest.is_empty());
        assert_eq!(events.len(), 8);
        assert!(events.iter().all(|e| e.name.is_none() && !e.comment_only));
        assert_eq!(events[2].data.as_deref().map(|d| d.contains("h\u{e9}llo")), Some(true));
        assert_eq!(events[7].data.as_deref(), Some("[DONE]"));
        assert_eq!(&events[7].raw[..], b"data: [DONE]\n\n");

        let (events, _) = feed(messages_stream().replace('\n', "\r").as_bytes(), &[]);
        assert_eq!(events.len(), 9);
        assert_eq!(events[2].name.as_deref(), Some("ping"));
        assert_eq!(&events[8].raw[..], b"event: message_stop\rdata: {\"type\":\"message_stop\"}\r\r");

        let (events, rest) = feed(odd_stream().as_bytes(), &[]);
        let got: Vec<(Option<&str>, Option<&str>, bool)> =
            events.iter().map(|e| (e.name.as_deref(), e.data.as_deref(), e.comment_only)).collect();
        assert_eq!(
            got,
            [
                (None, None, true),
                (None, Some("x"), false),
                (None, Some(" two spaces"), false),
                (Some("multi"), Some("line one\n\nline three \u{1f389}"), false),
                (None, None, true),
                (None, None, true),
                (Some("named-only"), None, false),
                (None, Some(""), false),
                (None, Some("h\u{e9}llo \u{4e16}\u{754c}"), false),
                (None, Some("{\"a\":1}"), false),
            ]
        );
        assert_eq!(&events[0].raw[..], "\u{feff}: keep-alive\n\n".as_bytes());
        assert_eq!(&events[2].raw[..], b"data:  two spaces\r\n\r\n");
        assert_eq!(&events[4].raw[..], b"\n");
        assert_eq!(&rest[..], b"data: unterminated");
    }

    #[test]
    fn cr_at_chunk_end_holds_the_event_until_the_next_byte() {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        s.push(&Bytes::from_static(b"data: a\r"), &mut out);
        s.push(&Bytes::from_static(b"\n\r"), &mut out);
        assert!(out.is_empty(), "the blank line may be a CRLF");
        s.push(&Bytes::new(), &mut out);
        assert!(out.is_empty(), "an empty chunk decides nothing");
        s.push(&Bytes::from_static(b"\ndata: b\n\r"), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].raw[..], b"data: a\r\n\r\n");
        s.push(&Bytes::from_static(b"data: c\n\n"), &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!((&out[1].raw[..], out[1].data.as_deref()), (&b"data: b\n\r"[..], Some("b")));
        assert_eq!((&out[2].raw[..], out[2].data.as_deref()), (&b"data: c\n\n"[..], Some("c")));
        assert!(s.finish(&mut out).is_empty());
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn finish_emits_a_held_event() {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        s.push(&Bytes::from_static(b"data: [DONE]\r\r"), &mut out);
        assert!(out.is_empty());
        assert_eq!(s.buffered(), 14);
        assert!(s.finish(&mut out).is_empty());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data.as_deref(), Some("[DONE]"));
        // The splitter starts a new stream.
        s.push(&Bytes::from_static(b"data: x"), &mut out);
        assert_eq!(&s.finish(&mut out)[..], b"data: x");
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn utf8_split_inside_a_character_and_invalid_utf8() {
        let input = "data: \u{1f389}\u{e9}\n\n".as_bytes();
        for cut in 7..10 {
            let (events, _) = feed(input, &[cut]);
            assert_eq!(events[0].data.as_deref(), Some("\u{1f389}\u{e9}"));
        }
        let (events, _) = feed(b"event: a\xffb\ndata: \xf0\x9f\n\n", &[]);
        assert_eq!(events[0].name.as_deref(), Some("a\u{fffd}b"));
        assert_eq!(events[0].data.as_deref(), Some("\u{fffd}"));
    }

    #[test]
    fn single_chunk_events_share_the_chunk() {
        let chunk = Bytes::from(chat_stream());
        let mut s = Splitter::new();
        let mut out = Vec::new();
        s.push(&chunk, &mut out);
        let range = chunk.as_ptr_range();
        assert!(out.iter().all(|e| range.contains(&e.raw.as_ptr())));
    }

    #[test]
    fn protocol_from_path() {
        for (path, p) in [
            ("/v1/chat/completions", Protocol::ChatCompletions),
            ("/openai/v1/chat/completions", Protocol::ChatCompletions),
            ("/openai/deployments/gpt/chat/completions?api-version=2024-10-21", Protocol::ChatCompletions),
            ("/v1/chat/completions/", Protocol::ChatCompletions),
            ("/v1/responses", Protocol::Responses),
            ("/proxy/v1/responses?x=1", Protocol::Responses),
            ("/v1/messages", Protocol::Messages),
            ("/anthropic/v1/messages", Protocol::Messages),
            ("/v1/messages/count_tokens", Protocol::Other),
            ("/v1/responses/resp_1/cancel", Protocol::Other),
            ("/v1/completions", Protocol::Other),
            ("/v1/embeddings", Protocol::Other),
            ("/v1/mymessages", Protocol::Other),
            ("", Protocol::Other),
            ("/", Protocol::Other),
        ] {
            assert_eq!(Protocol::from_path(path), p, "{path}");
        }
    }

    /// The tracker's summary of `stream` under `protocol`, after the splitter.
    fn run(protocol: Protocol, stream: &str) -> StreamTracker {
        let (events, _) = feed(stream.as_bytes(), &[]);
        track(protocol, &events)
    }

    /// `stream` cut just before the event that contains `marker`.
    fn cut_before(stream: &str, marker: &str) -> String {
        let at = stream.find(marker).expect("marker in stream");
        let start = stream[..at].rfind("\n\n").map_or(0, |i| i + 2);
        stream[..start].to_owned()
    }

    #[test]
    fn chat_verdicts_and_usage() {
        let t = run(Protocol::ChatCompletions, &chat_stream());
        assert_eq!(t.verdict(true), Verdict::Complete);
        assert_eq!(t.verdict(false), Verdict::Complete, "bytes after the terminator do not matter");
        assert_eq!(t.usage(), Some(Usage { input: 1200, cached_input: 1024, output: 300, reasoning: 128 }));
        assert_eq!(t.model(), Some("gpt-4o-2024-08-06"));

        let cut = run(Protocol::ChatCompletions, &cut_before(&chat_stream(), "[DONE]"));
        assert_eq!((cut.verdict(true), cut.verdict(false)), (Verdict::Incomplete, Verdict::Incomplete));
        assert_eq!(cut.usage(), t.usage());
        let cut = run(Protocol::ChatCompletions, &cut_before(&chat_stream(), "\"usage\":{"));
        assert_eq!((cut.verdict(true), cut.usage()), (Verdict::Incomplete, None));
        assert_eq!(cut.model(), Some("gpt-4o-2024-08-06"));

        let error = cut_before(&chat_stream(), "[DONE]")
            + "data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\"}}\n\n"
            + "data: [DONE]\n\n";
        assert_eq!(run(Protocol::ChatCompletions, &error).verdict(true), Verdict::Error);
        let named = "event: error\ndata: {\"message\":\"overloaded\"}\n\ndata: [DONE]\n\n";
        assert_eq!(run(Protocol::ChatCompletions, named).verdict(true), Verdict::Error);
        let after = chat_stream() + "data: {\"error\":{\"message\":\"late\"}}\n\n";
        assert_eq!(run(Protocol::ChatCompletions, &after).verdict(false), Verdict::Complete);
    }

    #[test]
    fn chat_usage_on_a_chunk_with_choices_and_done_with_trailing_space() {
        let stream = concat!(
            "data: {\"object\":\"chat.completion.chunk\",\"model\":\"qwen\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\\"usage\\\": {\"}}],\"usage\":null}\n\n",
            "data: {\"object\":\"chat.completion.chunk\",\"model\":\"qwen\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],",
            "\"usage\" : {\"prompt_tokens\":9,\"completion_tokens\":4,\"total_tokens\":13}}\n\n",
            "data: [DONE] \n\n",
        );
        let t = run(Protocol::ChatCompletions, stream);
        assert_eq!(t.verdict(false), Verdict::Complete);
        assert_eq!(t.usage(), Some(Usage { input: 9, cached_input: 0, output: 4, reasoning: 0 }));
        assert_eq!(t.model(), Some("qwen"));
    }

    #[test]
    fn responses_verdicts_and_usage() {
        let t = run(Protocol::Responses, &responses_stream());
        assert_eq!(t.verdict(false), Verdict::Complete);
        assert_eq!(t.usage(), Some(Usage { input: 500, cached_input: 256, output: 90, reasoning: 64 }));
        assert_eq!(t.model(), Some("o4-mini-2025-04-16"));

        let cut = run(Protocol::Responses, &cut_before(&responses_stream(), "response.completed"));
        assert_eq!((cut.verdict(true), cut.usage()), (Verdict::Incomplete, None));
        assert_eq!(cut.model(), Some("o4-mini-2025-04-16"), "from response.created");

        for terminal in ["response.incomplete", "response.failed"] {
            let stream = responses_stream().replace("response.completed", terminal);
            assert_eq!(run(Protocol::Responses, &stream).verdict(false), Verdict::Complete, "{terminal}");
        }

        let error = cut_before(&responses_stream(), "response.completed")
            + "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"boom\",\"sequence_number\":6}\n\n";
        assert_eq!(run(Protocol::Responses, &error).verdict(true), Verdict::Error);

        // Without `event:` lines, the data's type decides.
        let nameless: String =
            responses_stream().lines().filter(|l| !l.starts_with("event:")).map(|l| l.to_owned() + "\n").collect();
        let t = run(Protocol::Responses, &nameless);
        assert_eq!(t.verdict(false), Verdict::Complete);
        assert_eq!(t.usage(), Some(Usage { input: 500, cached_input: 256, output: 90, reasoning: 64 }));
        let error = cut_before(&nameless, "response.completed") + "data: {\"type\":\"error\",\"message\":\"boom\"}\n\n";
        assert_eq!(run(Protocol::Responses, &error).verdict(true), Verdict::Error);
    }

    #[test]
    fn messages_verdicts_and_cumulative_usage() {
        let t = run(Protocol::Messages, &messages_stream());
        assert_eq!(t.verdict(false), Verdict::Complete);
        // message_delta's output_tokens (15) replaces message_start's (1); input counters stay.
        assert_eq!(t.usage(), Some(Usage { input: 2125, cached_input: 2000, output: 15, reasoning: 0 }));
        assert_eq!(t.model(), Some("claude-sonnet-4-5-20250929"));

        let cut = run(Protocol::Messages, &cut_before(&messages_stream(), "message_delta"));
        assert_eq!(cut.verdict(true), Verdict::Incomplete);
        assert_eq!(cut.usage(), Some(Usage { input: 2125, cached_input: 2000, output: 1, reasoning: 0 }));
        let cut = run(Protocol::Messages, &cut_before(&messages_stream(), "message_stop"));
        assert_eq!(cut.verdict(true), Verdict::Incomplete);

        let error = cut_before(&messages_stream(), "content_block_stop")
            + "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"
            + "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert_eq!(run(Protocol::Messages, &error).verdict(true), Verdict::Error);

        // Later deltas override counter by counter, input ones included.
        let deltas = cut_before(&messages_stream(), "message_delta")
            + "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\n"
            + "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":30,\"cache_read_input_tokens\":null,\"output_tokens\":42}}\n\n"
            + "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let t = run(Protocol::Messages, &deltas);
        assert_eq!(t.verdict(true), Verdict::Complete);
        assert_eq!(t.usage(), Some(Usage { input: 2130, cached_input: 2000, output: 42, reasoning: 0 }));
    }

    #[test]
    fn other_streams_complete_when_they_end_cleanly() {
        let stream = ": hi\n\nevent: tick\ndata: 1\n\nevent: error\ndata: {\"error\":\"x\"}\n\n";
        let t = run(Protocol::Other, stream);
        assert_eq!(t.protocol(), Protocol::Other);
        assert_eq!((t.verdict(true), t.verdict(false)), (Verdict::Complete, Verdict::Incomplete));
        assert_eq!((t.usage(), t.model()), (None, None));
        assert_eq!(StreamTracker::new(Protocol::Other).verdict(true), Verdict::Complete);
        assert_eq!(StreamTracker::new(Protocol::Messages).verdict(true), Verdict::Incomplete);
    }

    #[test]
    fn other_streams_reveal_their_protocol() {
        for (stream, protocol) in [
            (chat_stream(), Protocol::ChatCompletions),
            (responses_stream(), Protocol::Responses),
            (messages_stream(), Protocol::Messages),
        ] {
            let known = run(protocol, &stream);
            let sniffed = run(Protocol::Other, &(": ping\n\n".to_owned() + &stream));
            assert_eq!(sniffed.protocol(), protocol);
            assert_eq!(summary(&sniffed), summary(&known));
            // Revealed, the protocol's terminator is required.
            let cut = run(Protocol::Other, &stream[..stream.len() * 2 / 3]);
            assert_eq!((cut.protocol(), cut.verdict(true)), (protocol, Verdict::Incomplete));
        }
        // Too late to tell: after a few unknown events, the stream stays Other.
        let late = "data: a\n\ndata: b\n\ndata: c\n\ndata: d\n\n".to_owned() + &messages_stream();
        assert_eq!(run(Protocol::Other, &late).protocol(), Protocol::Other);
    }

    /// Cut points in `0..=len`.
    fn chunking(len: usize) -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(any::<prop::sample::Index>(), 0..24)
            .prop_map(move |cuts| cuts.iter().map(|i| i.index(len + 1)).collect())
    }

    fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            4 => Just(b"\n".to_vec()),
            3 => Just(b"\r".to_vec()),
            2 => Just(b"\r\n".to_vec()),
            3 => Just(b"data".to_vec()),
            2 => Just(b"event".to_vec()),
            3 => Just(b":".to_vec()),
            2 => Just(b" ".to_vec()),
            1 => Just(BOM.to_vec()),
            1 => Just("\u{1f389}".as_bytes().to_vec()),
            1 => Just(b"\xf0\x9f".to_vec()),
            2 => proptest::collection::vec(any::<u8>(), 1..4),
        ];
        proptest::collection::vec(piece, 0..48).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #[test]
        fn random_chunkings_of_recorded_streams(
            (index, cuts) in (any::<prop::sample::Index>(), proptest::collection::vec(any::<prop::sample::Index>(), 0..64))
        ) {
            let fixtures = fixtures();
            let (label, protocol, input) = index.get(&fixtures);
            let cuts: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            let whole = feed(input, &[]);
            let split = feed(input, &cuts);
            prop_assert_eq!(concat(&split.0, &split.1), input.clone(), "{}", label);
            prop_assert_eq!(summary(&track(*protocol, &split.0)), summary(&track(*protocol, &whole.0)));
            prop_assert_eq!(summary(&track(Protocol::Other, &split.0)), summary(&track(Protocol::Other, &whole.0)));
            prop_assert_eq!(split, whole, "{}", label);
        }

        #[test]
        fn arbitrary_sse_like_bytes_match_the_reference((input, cuts) in sse_bytes().prop_flat_map(|b| {
            let len = b.len();
            (Just(b), chunking(len))
        })) {
            let (events, rest) = feed(&input, &cuts);
            prop_assert_eq!(concat(&events, &rest), input.clone());
            let (expected, expected_rest) = reference(&input);
            prop_assert_eq!(&events, &expected);
            prop_assert_eq!(&rest[..], &expected_rest[..]);
            for protocol in [Protocol::ChatCompletions, Protocol::Responses, Protocol::Messages, Protocol::Other] {
                let t = track(protocol, &events);
                let _ = (t.verdict(true), t.usage(), t.model());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_keep_every_byte(
            (input, cuts) in proptest::collection::vec(any::<u8>(), 0..512).prop_flat_map(|b| {
                let len = b.len();
                (Just(b), chunking(len))
            })
        ) {
            let (events, rest) = feed(&input, &cuts);
            prop_assert_eq!(concat(&events, &rest), input.clone());
            prop_assert_eq!((events, rest), feed(&input, &[]));
        }
    }
}
