//! What the three provider APIs put on the wire: JSON bodies, SSE events and error
//! bodies, shaped like OpenAI Chat Completions, OpenAI Responses and Anthropic Messages.
//!
//! The bodies are written from templates rather than through `serde_json::Value`, so
//! the keys come in the providers' order (a `Value` would sort them), and the
//! non-streamed OpenAI bodies are pretty-printed the way OpenAI sends them.

use std::fmt::Write as _;

use bytes::Bytes;
use serde_json::Value;

use super::MockUsage;

/// The API a request path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/messages`.
    Messages,
}

impl Api {
    /// The API served at `path`, if any.
    pub(crate) fn from_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Self::Chat),
            "/v1/responses" => Some(Self::Responses),
            "/v1/messages" => Some(Self::Messages),
            _ => None,
        }
    }

    /// Whether the API is Anthropic's, which shapes errors and headers differently.
    pub(crate) fn is_anthropic(self) -> bool {
        self == Self::Messages
    }
}

/// Everything one execution needs to render its body.
pub(crate) struct Reply<'a> {
    /// The call number, which appears in the text.
    pub(crate) call: u64,
    /// A random hex string, unique to this execution, from which ids are made.
    pub(crate) nonce: &'a str,
    /// Unix seconds.
    pub(crate) created: u64,
    /// The request's `model`.
    pub(crate) model: &'a str,
    /// The number of text deltas (and pieces of text).
    pub(crate) chunks: usize,
    /// The token counts to report.
    pub(crate) usage: MockUsage,
    /// Chat Completions only: whether the stream ends with a usage chunk.
    pub(crate) include_usage: bool,
}

impl Reply<'_> {
    /// The pieces of the assistant's text, one per delta; the non-streamed text is
    /// their concatenation.
    pub(crate) fn pieces(&self) -> Vec<String> {
        let mut pieces = vec![format!("Hello from mock call {}.", self.call)];
        pieces.extend((1..self.chunks).map(|i| format!(" Part {i}.")));
        pieces
    }

    fn text(&self) -> String {
        self.pieces().concat()
    }

    fn id(&self, prefix: &str, len: usize) -> String {
        let len = len.min(self.nonce.len());
        format!("{prefix}{}", &self.nonce[..len])
    }

    fn chat_id(&self) -> String {
        self.id("chatcmpl-", 29)
    }

    fn response_id(&self) -> String {
        self.id("resp_", 48)
    }

    fn output_item_id(&self) -> String {
        // The same nonce read backwards, so the item id differs from the response id.
        let reversed: String = self.nonce.chars().rev().collect();
        format!("msg_{}", &reversed[..reversed.len().min(48)])
    }

    fn anthropic_id(&self) -> String {
        self.id("msg_01", 22)
    }

    /// The non-streamed body.
    pub(crate) fn json(&self, api: Api) -> Bytes {
        match api {
            Api::Chat => self.chat_json(),
            Api::Responses => self.responses_json(),
            Api::Messages => self.messages_json(),
        }
        .into()
    }

    /// The streamed body, one SSE event per element.
    pub(crate) fn events(&self, api: Api) -> Vec<Bytes> {
        let events = match api {
            Api::Chat => self.chat_events(),
            Api::Responses => self.responses_events(),
            Api::Messages => self.messages_events(),
        };
        events.into_iter().map(Bytes::from).collect()
    }

    fn chat_usage(&self) -> String {
        let u = self.usage;
        format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{},"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":{},"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}"#,
            u.input_tokens,
            u.output_tokens,
            u.input_tokens + u.output_tokens,
            u.cached_input_tokens,
            u.reasoning_tokens,
        )
    }

    fn responses_usage(&self) -> String {
        let u = self.usage;
        format!(
            r#"{{"input_tokens":{},"input_tokens_details":{{"cached_tokens":{}}},"output_tokens":{},"output_tokens_details":{{"reasoning_tokens":{}}},"total_tokens":{}}}"#,
            u.input_tokens,
            u.cached_input_tokens,
            u.output_tokens,
            u.reasoning_tokens,
            u.input_tokens + u.output_tokens,
        )
    }

    fn anthropic_usage(&self, output_tokens: u64) -> String {
        let u = self.usage;
        format!(
            r#"{{"input_tokens":{},"cache_creation_input_tokens":{},"cache_read_input_tokens":{},"output_tokens":{},"service_tier":"standard"}}"#,
            u.input_tokens - u.cached_input_tokens - u.cache_creation_input_tokens,
            u.cache_creation_input_tokens,
            u.cached_input_tokens,
            output_tokens,
        )
    }

    fn chat_json(&self) -> String {
        pretty(&format!(
            r#"{{"id":"{id}","object":"chat.completion","created":{created},"model":{model},"choices":[{{"index":0,"message":{{"role":"assistant","content":{text},"refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{usage},"service_tier":"default","system_fingerprint":"fp_mock0001"}}"#,
            id = self.chat_id(),
            created = self.created,
            model = json_str(self.model),
            text = json_str(&self.text()),
            usage = self.chat_usage(),
        ))
    }

    fn chat_chunk(&self, delta: &str, finish: &str, obfuscate: bool) -> String {
        let usage = if self.include_usage { r#","usage":null"# } else { "" };
        let obfuscation = if obfuscate { format!(r#","obfuscation":"{}""#, &self.nonce[..8]) } else { String::new() };
        format!(
            r#"data: {{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":{model},"service_tier":"default","system_fingerprint":"fp_mock0001","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]{usage}{obfuscation}}}

"#,
            id = self.chat_id(),
            created = self.created,
            model = json_str(self.model),
        )
    }

    fn chat_events(&self) -> Vec<String> {
        let mut events = vec![self.chat_chunk(r#"{"role":"assistant","content":"","refusal":null}"#, "null", true)];
        for piece in self.pieces() {
            events.push(self.chat_chunk(&format!(r#"{{"content":{}}}"#, json_str(&piece)), "null", true));
        }
        events.push(self.chat_chunk("{}", r#""stop""#, false));
        if self.include_usage {
            events.push(format!(
                r#"data: {{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":{model},"service_tier":"default","system_fingerprint":"fp_mock0001","choices":[],"usage":{usage},"obfuscation":"{obf}"}}

"#,
                id = self.chat_id(),
                created = self.created,
                model = json_str(self.model),
                usage = self.chat_usage(),
                obf = &self.nonce[8..16],
            ));
        }
        events.push("data: [DONE]\n\n".to_owned());
        events
    }

    fn response_object(&self, status: &str, output: &str, usage: &str) -> String {
        format!(
            r#"{{"id":"{id}","object":"response","created_at":{created},"status":"{status}","background":false,"error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"model":{model},"output":{output},"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{{"effort":null,"summary":null}},"service_tier":"default","store":true,"temperature":1.0,"text":{{"format":{{"type":"text"}},"verbosity":"medium"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{usage},"user":null,"metadata":{{}}}}"#,
            id = self.response_id(),
            created = self.created,
            model = json_str(self.model),
        )
    }

    fn output_text_part(&self, text: &str) -> String {
        format!(r#"{{"type":"output_text","annotations":[],"logprobs":[],"text":{}}}"#, json_str(text))
    }

    fn output_item(&self, status: &str, content: &str) -> String {
        format!(
            r#"{{"id":"{id}","type":"message","status":"{status}","content":[{content}],"role":"assistant"}}"#,
            id = self.output_item_id(),
        )
    }

    fn responses_json(&self) -> String {
        let item = self.output_item("completed", &self.output_text_part(&self.text()));
        pretty(&self.response_object("completed", &format!("[{item}]"), &self.responses_usage()))
    }

    fn responses_events(&self) -> Vec<String> {
        let mut seq = 0u64;
        let mut events = Vec::new();
        let mut push = |name: &str, data: String| {
            events.push(format!(
                "event: {name}\ndata: {{\"type\":\"{name}\",\"sequence_number\":{seq},{}\n\n",
                &data[1..]
            ));
            seq += 1;
        };
        let in_progress = self.response_object("in_progress", "[]", "null");
        push("response.created", format!(r#"{{"response":{in_progress}}}"#));
        push("response.in_progress", format!(r#"{{"response":{in_progress}}}"#));
        let item_id = self.output_item_id();
        push(
            "response.output_item.added",
            format!(r#"{{"output_index":0,"item":{}}}"#, self.output_item("in_progress", "")),
        );
        push(
            "response.content_part.added",
            format!(
                r#"{{"item_id":"{item_id}","output_index":0,"content_index":0,"part":{}}}"#,
                self.output_text_part("")
            ),
        );
        for piece in self.pieces() {
            push(
                "response.output_text.delta",
                format!(
                    r#"{{"item_id":"{item_id}","output_index":0,"content_index":0,"delta":{},"logprobs":[],"obfuscation":"{}"}}"#,
                    json_str(&piece),
                    &self.nonce[..8],
                ),
            );
        }
        let text = self.text();
        push(
            "response.output_text.done",
            format!(
                r#"{{"item_id":"{item_id}","output_index":0,"content_index":0,"text":{},"logprobs":[]}}"#,
                json_str(&text)
            ),
        );
        let part = self.output_text_part(&text);
        push(
            "response.content_part.done",
            format!(r#"{{"item_id":"{item_id}","output_index":0,"content_index":0,"part":{part}}}"#),
        );
        let item = self.output_item("completed", &part);
        push("response.output_item.done", format!(r#"{{"output_index":0,"item":{item}}}"#));
        let completed = self.response_object("completed", &format!("[{item}]"), &self.responses_usage());
        push("response.completed", format!(r#"{{"response":{completed}}}"#));
        events
    }

    fn messages_json(&self) -> String {
        format!(
            r#"{{"id":"{id}","type":"message","role":"assistant","model":{model},"content":[{{"type":"text","text":{text}}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{usage}}}"#,
            id = self.anthropic_id(),
            model = json_str(self.model),
            text = json_str(&self.text()),
            usage = self.anthropic_usage(self.usage.output_tokens),
        )
    }

    fn messages_events(&self) -> Vec<String> {
        let event = |name: &str, data: &str| format!("event: {name}\ndata: {data}\n\n");
        let mut events = vec![event(
            "message_start",
            &format!(
                r#"{{"type":"message_start","message":{{"id":"{id}","type":"message","role":"assistant","model":{model},"content":[],"stop_reason":null,"stop_sequence":null,"usage":{usage}}}}}"#,
                id = self.anthropic_id(),
                model = json_str(self.model),
                usage = self.anthropic_usage(1),
            ),
        )];
        events.push(event(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ));
        events.push(event("ping", r#"{"type": "ping"}"#));
        for piece in self.pieces() {
            events.push(event(
                "content_block_delta",
                &format!(
                    r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#,
                    json_str(&piece)
                ),
            ));
        }
        events.push(event("content_block_stop", r#"{"type":"content_block_stop","index":0}"#));
        let u = self.usage;
        events.push(event(
            "message_delta",
            &format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{{"input_tokens":{},"cache_creation_input_tokens":{},"cache_read_input_tokens":{},"output_tokens":{}}}}}"#,
                u.input_tokens - u.cached_input_tokens - u.cache_creation_input_tokens,
                u.cache_creation_input_tokens,
                u.cached_input_tokens,
                u.output_tokens,
            ),
        ));
        events.push(event("message_stop", r#"{"type":"message_stop"}"#));
        events
    }
}

/// A provider-shaped error body for `status`.
pub(crate) fn error_body(api: Option<Api>, status: u16, message: &str, request_id: &str) -> Bytes {
    let anthropic = api.is_some_and(Api::is_anthropic);
    let mut out = String::new();
    if anthropic {
        let kind = match status {
            400 | 413 | 422 => "invalid_request_error",
            401 => "authentication_error",
            402 => "billing_error",
            403 => "permission_error",
            404 => "not_found_error",
            408 => "timeout_error",
            429 => "rate_limit_error",
            529 | 503 => "overloaded_error",
            _ => "api_error",
        };
        let _ = write!(
            out,
            r#"{{"type":"error","error":{{"type":"{kind}","message":{}}},"request_id":"{request_id}"}}"#,
            json_str(message)
        );
    } else {
        let (kind, code) = match status {
            400 | 413 | 422 => ("invalid_request_error", "null"),
            401 => ("invalid_request_error", r#""invalid_api_key""#),
            403 => ("invalid_request_error", r#""unsupported_country_region_territory""#),
            404 => ("invalid_request_error", r#""unknown_url""#),
            429 => ("requests", r#""rate_limit_exceeded""#),
            _ => ("server_error", "null"),
        };
        let _ = write!(
            out,
            "{{\n  \"error\": {{\n    \"message\": {},\n    \"type\": \"{kind}\",\n    \"param\": null,\n    \"code\": {code}\n  }}\n}}\n",
            json_str(message)
        );
    }
    out.into()
}

/// Compact JSON text indented by two spaces per level, keys kept in their order, with
/// a final newline: how OpenAI sends non-streamed bodies.
fn pretty(compact: &str) -> String {
    let mut out = String::with_capacity(compact.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = compact.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                if chars.peek().is_some_and(|&next| next == '}' || next == ']') {
                    if let Some(close) = chars.next() {
                        out.push(close);
                    }
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            _ => out.push(c),
        }
    }
    out.push('\n');
    out
}

/// `s` as a JSON string literal.
fn json_str(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// The number of characters of prompt text in a request body: every string under
/// `messages`, `system`, `instructions` and `input`, following `content` and `text`
/// fields of objects.
pub(crate) fn prompt_chars(body: &Value) -> u64 {
    fn walk(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.chars().count() as u64,
            Value::Array(items) => items.iter().map(walk).sum(),
            Value::Object(o) => o.get("content").map_or(0, walk) + o.get("text").map_or(0, walk),
            _ => 0,
        }
    }
    ["messages", "system", "instructions", "input"].iter().filter_map(|k| body.get(k)).map(walk).sum()
}
