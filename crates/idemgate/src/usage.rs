//! Token usage as the three provider APIs report it, in one shape, and what it costs.
//!
//! A replay or a join spares the upstream a whole generation, so the gateway counts the
//! original call's tokens as saved (SPEC section 7). OpenAI Chat Completions, OpenAI
//! Responses and Anthropic Messages each name and nest their counters differently, and
//! Anthropic counts cached input apart from the rest; [`Usage`] is the one convention
//! everything else in the gateway uses, and [`Prices`] turns it into money.
//!
//! Streamed usage is read by [`StreamTracker`](crate::sse::StreamTracker); this module
//! reads non-streamed bodies ([`from_json_body`]) and holds the per-API field mapping both
//! share.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

/// The tokens one call consumed.
///
/// The convention, whatever the API:
///
/// - `input` is **all** input tokens, cached ones included: OpenAI `prompt_tokens` /
///   Responses `input_tokens`; Anthropic `input_tokens + cache_creation_input_tokens +
///   cache_read_input_tokens`.
/// - `cached_input` is the subset of `input` read from the provider's prompt cache:
///   OpenAI `prompt_tokens_details.cached_tokens` / `input_tokens_details.cached_tokens`;
///   Anthropic `cache_read_input_tokens`.
/// - `output` is **all** output tokens, reasoning included: OpenAI `completion_tokens` /
///   `output_tokens`; Anthropic `output_tokens`.
/// - `reasoning` is the subset of `output` spent on reasoning:
///   `completion_tokens_details.reasoning_tokens` / `output_tokens_details.reasoning_tokens`;
///   always 0 for Anthropic, which does not report it apart.
///
/// A missing counter counts 0. The figures are kept as reported: nothing checks that a
/// subset is no larger than its total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// All input tokens, cached ones included.
    pub input: u64,
    /// The cached subset of `input`.
    pub cached_input: u64,
    /// All output tokens, reasoning included.
    pub output: u64,
    /// The reasoning subset of `output`.
    pub reasoning: u64,
}

impl Usage {
    /// The counters with their metric label values (`kind` of `tokens_saved`): `input`,
    /// `cached_input`, `output` and `reasoning`, in that order.
    pub const fn kinds(&self) -> [(&'static str, u64); 4] {
        [
            ("input", self.input),
            ("cached_input", self.cached_input),
            ("output", self.output),
            ("reasoning", self.reasoning),
        ]
    }
}

/// The usage and model of a non-streamed response body of OpenAI Chat Completions, OpenAI
/// Responses or Anthropic Messages.
///
/// The API is told apart by the fields present: `usage.prompt_tokens` (or
/// `completion_tokens`) is Chat Completions (and the other OpenAI endpoints shaped like it,
/// such as embeddings); Anthropic is `"type": "message"` or a `cache_*_input_tokens`
/// counter; anything else with `usage.input_tokens` is read as Responses (without cache
/// counters both readings agree). The model is the top-level `model` string, when present.
///
/// Returns `None` when the body is not a JSON object or its `usage` is missing, null or
/// not an object. What the reading does not use, inside `usage` as around it, is checked
/// for syntax only: a number out of range or a lone surrogate there does not hide the
/// counters (parsing the body into a `serde_json::Value` would refuse it whole).
pub fn from_json_body(body: &[u8]) -> Option<(Usage, Option<String>)> {
    // Only an object has a `usage`; this also keeps serde from reading an array as the
    // struct's fields in order.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    match serde_json::from_slice::<Top<'_>>(body) {
        Ok(top) => {
            let Field::Object(counters) = top.usage else { return None };
            let usage = counters.classify(string(top.object).as_deref(), string(top.kind).as_deref());
            Some((usage, string(top.model).map(Cow::into_owned)))
        }
        // A duplicate field, which the structs refuse and `Value` takes the last of.
        Err(_) => from_whole_tree(body),
    }
}

/// [`from_json_body`] by way of a `Value` of the whole body.
fn from_whole_tree(body: &[u8]) -> Option<(Usage, Option<String>)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let str_at = |key| v.get(key).and_then(Value::as_str);
    let usage = Counters::of(v.get("usage")?)?.classify(str_at("object"), str_at("type"));
    Some((usage, str_at("model").map(str::to_owned)))
}

/// The top-level fields [`from_json_body`] reads. Everything else, the generated text
/// included, is skipped without building a tree, and `usage` is read into [`Counters`]:
/// a fraction of the work of parsing the whole body into a `Value`.
#[derive(serde::Deserialize)]
struct Top<'a> {
    #[serde(default)]
    usage: Field<Counters>,
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<&'a RawValue>,
}

/// The string a raw JSON value holds, borrowed unless it has escapes; `None` for any
/// other value.
fn string(raw: Option<&RawValue>) -> Option<Cow<'_, str>> {
    let raw = raw.filter(|r| r.get().starts_with('"'))?.get();
    match serde_json::from_str::<&str>(raw) {
        Ok(s) => Some(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(raw).ok().map(Cow::Owned),
    }
}

/// A field of a usage object as the readings below need it: whether it is there at all
/// (`null` included), and its count or object when it is one.
#[derive(Default)]
enum Field<T> {
    #[default]
    Absent,
    Count(u64),
    Object(T),
    Other,
}

impl<T> Field<T> {
    fn present(&self) -> bool {
        !matches!(self, Self::Absent)
    }

    /// The count: 0 when missing or not a non-negative integer (as `Value::as_u64`).
    fn count(&self) -> u64 {
        match self {
            Self::Count(n) => *n,
            _ => 0,
        }
    }

    fn object(&self) -> Option<&T> {
        match self {
            Self::Object(t) => Some(t),
            _ => None,
        }
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Field<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor(std::marker::PhantomData))
    }
}

struct FieldVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: serde::Deserialize<'de>> Visitor<'de> for FieldVisitor<T> {
    type Value = Field<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Field::Count(n))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map)).map(Field::Object)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }
}

/// A counter that is an object or an array counts 0, whatever it holds.
type Count = Field<IgnoredAny>;

/// The counters of a `usage` object of any of the three APIs: the one place that names
/// their fields. Read straight from a body's text, or from a `Value` (stream events).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Counters {
    prompt_tokens: Count,
    completion_tokens: Count,
    input_tokens: Count,
    output_tokens: Count,
    cache_creation_input_tokens: Count,
    cache_read_input_tokens: Count,
    prompt_tokens_details: Field<Details>,
    completion_tokens_details: Field<Details>,
    input_tokens_details: Field<Details>,
    output_tokens_details: Field<Details>,
}

/// The `*_tokens_details` objects' counters.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Details {
    cached_tokens: Count,
    reasoning_tokens: Count,
}

impl Counters {
    /// The counters of the usage object `u`; `None` when it is not an object.
    fn of(u: &Value) -> Option<Self> {
        // An array would be read as the fields in order.
        u.as_object()?;
        Self::deserialize(u).ok()
    }

    /// Reads the counters by the API their fields (and the body's `object` and `type`)
    /// reveal.
    fn classify(&self, object: Option<&str>, kind: Option<&str>) -> Usage {
        if self.prompt_tokens.present() || self.completion_tokens.present() {
            self.chat()
        } else if object == Some("response")
            || self.input_tokens_details.present()
            || self.output_tokens_details.present()
        {
            self.responses()
        } else if kind == Some("message")
            || self.cache_read_input_tokens.present()
            || self.cache_creation_input_tokens.present()
        {
            let mut totals = AnthropicUsage::default();
            totals.take(self);
            totals.usage()
        } else {
            self.responses()
        }
    }

    fn detail(details: &Field<Details>, count: impl Fn(&Details) -> &Count) -> u64 {
        details.object().map_or(0, |d| count(d).count())
    }

    fn chat(&self) -> Usage {
        Usage {
            input: self.prompt_tokens.count(),
            cached_input: Self::detail(&self.prompt_tokens_details, |d| &d.cached_tokens),
            output: self.completion_tokens.count(),
            reasoning: Self::detail(&self.completion_tokens_details, |d| &d.reasoning_tokens),
        }
    }

    fn responses(&self) -> Usage {
        Usage {
            input: self.input_tokens.count(),
            cached_input: Self::detail(&self.input_tokens_details, |d| &d.cached_tokens),
            output: self.output_tokens.count(),
            reasoning: Self::detail(&self.output_tokens_details, |d| &d.reasoning_tokens),
        }
    }
}

/// An OpenAI Chat Completions `usage` object (also the streamed usage chunk's); `None`
/// when it is not an object (`"usage": null` on ordinary chunks).
pub(crate) fn chat(u: &Value) -> Option<Usage> {
    Counters::of(u).map(|c| c.chat())
}

/// An OpenAI Responses `usage` object; `None` when it is not an object.
pub(crate) fn responses(u: &Value) -> Option<Usage> {
    Counters::of(u).map(|c| c.responses())
}

/// Anthropic usage as it builds up over a stream: `message_start` gives every counter,
/// and each `message_delta` carries cumulative values that replace earlier ones, counter
/// by counter (a counter a delta leaves out or sends as null keeps its value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AnthropicUsage {
    input: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    output: Option<u64>,
}

impl AnthropicUsage {
    /// Takes the counters present in the usage object `u`; false when `u` is not an
    /// object.
    pub(crate) fn merge(&mut self, u: &Value) -> bool {
        Counters::of(u).map(|c| self.take(&c)).is_some()
    }

    /// Takes the counters that are counts: one left out, null or of another kind keeps
    /// its value.
    fn take(&mut self, c: &Counters) {
        for (field, slot) in [
            (&c.input_tokens, &mut self.input),
            (&c.cache_creation_input_tokens, &mut self.cache_creation),
            (&c.cache_read_input_tokens, &mut self.cache_read),
            (&c.output_tokens, &mut self.output),
        ] {
            if let Field::Count(n) = field {
                *slot = Some(*n);
            }
        }
    }

    /// The totals in the [`Usage`] convention.
    pub(crate) fn usage(&self) -> Usage {
        let n = |c: Option<u64>| c.unwrap_or(0);
        Usage {
            input: n(self.input).saturating_add(n(self.cache_creation)).saturating_add(n(self.cache_read)),
            cached_input: n(self.cache_read),
            output: n(self.output),
            reasoning: 0,
        }
    }
}

/// The price of one model, in currency units per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelPrice {
    /// Per million uncached input tokens.
    pub input: f64,
    /// Per million cached input tokens; `None` prices them as uncached input.
    pub cached_input: Option<f64>,
    /// Per million output tokens (reasoning tokens included).
    pub output: f64,
}

impl ModelPrice {
    /// A price for input and output tokens, with cached input priced as input.
    pub const fn new(input: f64, output: f64) -> Self {
        Self { input, cached_input: None, output }
    }

    /// Sets the price of cached input tokens.
    #[must_use]
    pub const fn with_cached_input(mut self, cached_input: f64) -> Self {
        self.cached_input = Some(cached_input);
        self
    }
}

/// A price table: what each model's tokens cost, in one currency.
///
/// A model is priced by the entry of the same name, else by the longest entry that is a
/// prefix of the model's name ending at a `-` (so `gpt-4o` prices `gpt-4o-2024-08-06`,
/// and `gpt-4o-mini` too unless `gpt-4o-mini` has its own entry; `gpt-4` never prices
/// `gpt-4o`).
#[derive(Debug, Clone, PartialEq)]
pub struct Prices {
    currency: String,
    models: Vec<(String, ModelPrice)>,
}

impl Prices {
    /// An empty table in `currency` (a label such as `USD`, used in metric names or
    /// labels; never converted).
    pub fn new(currency: impl Into<String>) -> Self {
        Self { currency: currency.into(), models: Vec::new() }
    }

    /// Adds the price of `model`, replacing an earlier entry of the same name.
    #[must_use]
    pub fn with_model(mut self, model: impl Into<String>, price: ModelPrice) -> Self {
        let model = model.into();
        match self.models.iter_mut().find(|(name, _)| *name == model) {
            Some(entry) => entry.1 = price,
            None => self.models.push((model, price)),
        }
        self
    }

    /// The table's currency.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// Whether the table prices no model.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The price of `model`: its own entry, else the longest entry that is a prefix of it
    /// at a `-` boundary; `None` when no entry matches.
    pub fn price(&self, model: &str) -> Option<&ModelPrice> {
        self.models
            .iter()
            .filter(|(name, _)| {
                model.strip_prefix(name.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
            })
            .max_by_key(|(name, _)| name.len())
            .map(|(_, price)| price)
    }

    /// What `usage` costs under `model`'s price, in the table's currency:
    /// `((input − cached_input) · input price + cached_input · cached price + output ·
    /// output price) / 1e6`. Reasoning tokens are priced as output, being part of it.
    /// `None` when the model has no price.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<f64> {
        let p = self.price(model)?;
        let uncached = usage.input.saturating_sub(usage.cached_input) as f64;
        let cached = usage.cached_input as f64 * p.cached_input.unwrap_or(p.input);
        Some((uncached * p.input + cached + usage.output as f64 * p.output) / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_body() {
        let body = br#"{
  "id": "chatcmpl-1",
  "object": "chat.completion",
  "model": "gpt-4o-2024-08-06",
  "choices": [],
  "usage": {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0}
  }
}
"#;
        let (usage, model) = from_json_body(body).unwrap();
        assert_eq!(usage, Usage { input: 1200, cached_input: 1024, output: 300, reasoning: 128 });
        assert_eq!(model.as_deref(), Some("gpt-4o-2024-08-06"));
    }

    #[test]
    fn chat_body_without_details() {
        let body = br#"{"object":"chat.completion","model":"m","usage":{"prompt_tokens":7,"completion_tokens":3}}"#;
        assert_eq!(from_json_body(body).unwrap().0, Usage { input: 7, cached_input: 0, output: 3, reasoning: 0 });
    }

    #[test]
    fn responses_body() {
        let body = br#"{"id":"resp_1","object":"response","status":"completed","model":"o4-mini","output":[],
            "usage":{"input_tokens":500,"input_tokens_details":{"cached_tokens":256},"output_tokens":90,
            "output_tokens_details":{"reasoning_tokens":64},"total_tokens":590}}"#;
        let (usage, model) = from_json_body(body).unwrap();
        assert_eq!(usage, Usage { input: 500, cached_input: 256, output: 90, reasoning: 64 });
        assert_eq!(model.as_deref(), Some("o4-mini"));
    }

    #[test]
    fn anthropic_body() {
        let body = br#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],
            "usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,
            "output_tokens":15,"service_tier":"standard"}}"#;
        let (usage, model) = from_json_body(body).unwrap();
        assert_eq!(usage, Usage { input: 2125, cached_input: 2000, output: 15, reasoning: 0 });
        assert_eq!(model.as_deref(), Some("claude-sonnet-4-5"));
    }

    #[test]
    fn anthropic_body_with_only_input_and_output() {
        let body = br#"{"type":"message","model":"claude","usage":{"input_tokens":10,"output_tokens":4}}"#;
        assert_eq!(from_json_body(body).unwrap().0, Usage { input: 10, cached_input: 0, output: 4, reasoning: 0 });
    }

    #[test]
    fn no_usage() {
        assert_eq!(from_json_body(b"not json"), None);
        assert_eq!(from_json_body(b""), None);
        assert_eq!(from_json_body(b"[1,2]"), None);
        assert_eq!(from_json_body(br#"{"model":"m"}"#), None);
        assert_eq!(from_json_body(br#"{"model":"m","usage":null}"#), None);
        assert_eq!(from_json_body(br#"{"error":{"message":"nope"}}"#), None);
    }

    /// The skipping parser reads what parsing the whole body into a `Value` reads, for
    /// every body a `Value` can hold.
    #[test]
    fn skipping_parse_agrees_with_the_whole_tree() {
        let bodies: [&[u8]; 18] = [
            br#"{"model":"gpt-\u00e9","usage":{"prompt_tokens":1}}"#,
            br#"{"model":7,"usage":{"prompt_tokens":1}}"#,
            br#"{"model":null,"object":"response","usage":{"input_tokens":3}}"#,
            br#"  {"type":"message","usage":{"input_tokens":2,"cache_read_input_tokens":5}}"#,
            br#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
            br#"{"usage":{"prompt_tokens":1},"model":"a","model":"b"}"#,
            br#"{"usage":{"prompt_tokens":1}} trailing"#,
            br#"{"usage":{"prompt_tokens":1},"choices":[{"message":{"content":"\"}"}}]}"#,
            br#"{"usage":"none"}"#,
            br#"{"usage":{"prompt_tokens":1,"prompt_tokens":2}}"#,
            br#"{"usage":{"prompt\u005ftokens":4,"completion_tokens":{"n":1},"prompt_tokens_details":[1,{"a":2}]}}"#,
            br#"{"usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":2}}}"#,
            br#"{"usage":{"input_tokens":3,"output_tokens_details":null}}"#,
            br#"{"usage":{"input_tokens":3,"input_tokens_details":{"cached_tokens":"2"}}}"#,
            br#"{"type":"message","usage":{"input_tokens":1e2,"output_tokens":18446744073709551616}}"#,
            br#"{"usage":{"cache_read_input_tokens":true,"output_tokens":7}}"#,
            br#"{"usage":{"output_tokens":-0,"input_tokens":0}}"#,
            br#"{"usage":[1,2]}"#,
        ];
        for body in bodies {
            assert_eq!(from_json_body(body), from_whole_tree(body), "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(from_json_body(bodies[4]).unwrap().0.input, 2, "the last duplicate wins, as in a Value");
    }

    #[test]
    fn what_the_reading_does_not_use_is_checked_for_syntax_only() {
        let body = br#"{"usage":{"prompt_tokens":5,"extra":1e400,"prompt_tokens_details":{"x":"\ud800"}}}"#;
        assert_eq!(from_json_body(body).map(|(u, _)| u.input), Some(5));
        assert_eq!(from_whole_tree(body), None, "a Value cannot hold it");
        assert_eq!(from_json_body(br#"{"usage":{"prompt_tokens":5,"extra":}}"#), None, "broken syntax is refused");
    }

    #[test]
    fn odd_counters_count_zero() {
        let body = br#"{"usage":{"prompt_tokens":-1,"completion_tokens":2.5,"prompt_tokens_details":null}}"#;
        assert_eq!(from_json_body(body), Some((Usage::default(), None)));
    }

    #[test]
    fn anthropic_deltas_replace_counter_by_counter() {
        let mut u = AnthropicUsage::default();
        assert!(u.merge(&serde_json::json!({"input_tokens":25,"cache_creation_input_tokens":0,
            "cache_read_input_tokens":100,"output_tokens":1})));
        assert!(u.merge(&serde_json::json!({"output_tokens":15,"input_tokens":null})));
        assert!(!u.merge(&Value::Null));
        assert_eq!(u.usage(), Usage { input: 125, cached_input: 100, output: 15, reasoning: 0 });
    }

    #[test]
    fn kinds_label_every_counter() {
        let u = Usage { input: 1, cached_input: 2, output: 3, reasoning: 4 };
        assert_eq!(u.kinds(), [("input", 1), ("cached_input", 2), ("output", 3), ("reasoning", 4)]);
    }

    fn table() -> Prices {
        Prices::new("USD")
            .with_model("gpt-4", ModelPrice::new(30.0, 60.0))
            .with_model("gpt-4o", ModelPrice::new(2.5, 10.0).with_cached_input(1.25))
            .with_model("gpt-4o-mini", ModelPrice::new(0.15, 0.6))
            .with_model("claude-sonnet-4", ModelPrice::new(3.0, 15.0).with_cached_input(0.3))
    }

    #[test]
    fn exact_name_wins() {
        let t = table();
        assert_eq!(t.price("gpt-4o").unwrap().input, 2.5);
        assert_eq!(t.price("gpt-4").unwrap().input, 30.0);
        assert_eq!(t.price("gpt-4o-mini").unwrap().input, 0.15);
    }

    #[test]
    fn prefix_at_dash_boundary() {
        let t = table();
        assert_eq!(t.price("gpt-4o-2024-08-06").unwrap().input, 2.5);
        assert_eq!(t.price("gpt-4o-mini-2024-07-18").unwrap().input, 0.15);
        assert_eq!(t.price("gpt-4-turbo").unwrap().input, 30.0);
        assert_eq!(t.price("claude-sonnet-4-20250514").unwrap().input, 3.0);
        assert_eq!(t.price("claude-sonnet-4-5-20250929").unwrap().input, 3.0);
    }

    #[test]
    fn no_match_inside_a_word() {
        let t = Prices::new("USD").with_model("gpt-4", ModelPrice::new(30.0, 60.0));
        assert_eq!(t.price("gpt-4o"), None);
        assert_eq!(t.price("gpt-4.1"), None);
        assert_eq!(t.price("gpt-"), None);
        assert_eq!(t.price("xgpt-4"), None);
        assert_eq!(t.price(""), None);
        assert!(Prices::new("USD").is_empty());
        assert!(!t.is_empty());
    }

    #[test]
    fn longest_prefix_wins_whatever_the_order() {
        let t = Prices::new("EUR")
            .with_model("claude-sonnet-4-5", ModelPrice::new(5.0, 20.0))
            .with_model("claude-sonnet-4", ModelPrice::new(3.0, 15.0));
        assert_eq!(t.price("claude-sonnet-4-5-20250929").unwrap().input, 5.0);
        assert_eq!(t.price("claude-sonnet-4-20250514").unwrap().input, 3.0);
        assert_eq!(t.currency(), "EUR");
    }

    #[test]
    fn later_entry_replaces_same_name() {
        let t =
            Prices::new("USD").with_model("m", ModelPrice::new(1.0, 2.0)).with_model("m", ModelPrice::new(3.0, 4.0));
        assert_eq!(t.price("m"), Some(&ModelPrice::new(3.0, 4.0)));
    }

    #[test]
    fn cost_arithmetic() {
        let t = table();
        let u = Usage { input: 1_000_000, cached_input: 400_000, output: 200_000, reasoning: 50_000 };
        // 600k uncached at 2.5, 400k cached at 1.25, 200k output at 10 (reasoning inside).
        let cost = t.cost("gpt-4o-2024-08-06", &u).unwrap();
        assert!((cost - (1.5 + 0.5 + 2.0)).abs() < 1e-9, "{cost}");
        // Without a cached price, cached input costs as input.
        let cost = t.cost("gpt-4", &u).unwrap();
        assert!((cost - (30.0 + 12.0)).abs() < 1e-9, "{cost}");
        assert_eq!(t.cost("gpt-4o", &Usage::default()), Some(0.0));
        assert_eq!(t.cost("llama-3", &u), None);
    }

    #[test]
    fn cost_with_more_cached_than_input_does_not_go_negative() {
        let u = Usage { input: 10, cached_input: 20, output: 0, reasoning: 0 };
        let cost = table().cost("gpt-4o", &u).unwrap();
        assert!((cost - 20.0 * 1.25 / 1e6).abs() < 1e-15);
    }
}
