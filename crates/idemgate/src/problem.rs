//! The answers the layer gives itself, in one place: `application/problem+json`
//! (RFC 9457) with a stable `type`, plus an `error` object shaped like OpenAI's and
//! Anthropic's, so their SDKs surface the message. Bodies never carry keys, stored
//! responses or credentials.

use std::time::Duration;

use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use crate::body::ResponseBody;
use crate::key::KeyError;
use crate::layer::{IDEMPOTENT_REPLAYED, RETRY_AFTER_MS, X_SHOULD_RETRY};

/// Where the problem types are documented; `type` is this plus the slug.
pub const PROBLEM_BASE: &str = "https://idemgate.dev/problems/";

/// A response the layer produces instead of forwarding.
#[derive(Debug)]
pub(crate) enum Problem {
    InvalidKey(KeyError),
    MissingKey,
    BodyTooLarge { limit: usize },
    BodyUnreadable,
    Mismatch,
    InFlight { retry_after: Duration },
    StoreUnavailable,
    UpstreamBodyFailed,
    Internal,
}

impl Problem {
    fn status(&self) -> StatusCode {
        match self {
            Self::InvalidKey(_) | Self::MissingKey | Self::BodyUnreadable => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight { .. } => StatusCode::CONFLICT,
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamBodyFailed => StatusCode::BAD_GATEWAY,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable part of `type`, also the OpenAI-style `code`.
    fn slug(&self) -> &'static str {
        match self {
            Self::InvalidKey(_) => "invalid-idempotency-key",
            Self::MissingKey => "missing-idempotency-key",
            Self::BodyTooLarge { .. } => "request-too-large",
            Self::BodyUnreadable => "request-body-unreadable",
            Self::Mismatch => "idempotency-key-mismatch",
            Self::InFlight { .. } => "idempotency-key-in-use",
            Self::StoreUnavailable => "idempotency-store-unavailable",
            Self::UpstreamBodyFailed => "upstream-body-failed",
            Self::Internal => "idempotency-internal-error",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::InvalidKey(_) => "The Idempotency-Key header is invalid",
            Self::MissingKey => "This route requires an Idempotency-Key header",
            Self::BodyTooLarge { .. } => "The request body is too large",
            Self::BodyUnreadable => "The request body could not be read",
            Self::Mismatch => "The Idempotency-Key was already used for a different request",
            Self::InFlight { .. } => "A request with this Idempotency-Key is still in progress",
            Self::StoreUnavailable => "The idempotency store is unavailable",
            Self::UpstreamBodyFailed => "The upstream's response broke off",
            Self::Internal => "The idempotency layer failed",
        }
    }

    fn detail(&self) -> String {
        match self {
            Self::InvalidKey(e) => format!("{e}; send 1 to 255 printable ASCII characters, once"),
            Self::MissingKey => "requests to this route have side effects; send a unique key per operation".into(),
            Self::BodyTooLarge { limit } => format!("the body exceeds the limit of {limit} bytes"),
            Self::BodyUnreadable => "the connection failed while the request body was being read".into(),
            Self::Mismatch => "reuse a key only to retry the same request (same method, path, body and \
                               versioning headers); use a new key for a new request"
                .into(),
            Self::InFlight { .. } => {
                "retry after the delay in Retry-After; the original's result will be replayed".into()
            }
            Self::StoreUnavailable => "nothing was forwarded; retry later".into(),
            Self::UpstreamBodyFailed => {
                "the response body failed before its end; nothing was stored; retry with the same key".into()
            }
            Self::Internal => "nothing was stored; retry with the same key".into(),
        }
    }

    /// Whether the client should retry the same request unchanged (`x-should-retry`,
    /// which the Stainless SDKs obey).
    fn should_retry(&self) -> bool {
        matches!(
            self,
            Self::InFlight { .. }
                | Self::StoreUnavailable
                | Self::UpstreamBodyFailed
                | Self::Internal
                | Self::BodyUnreadable
        )
    }

    pub(crate) fn into_response(self) -> Response<ResponseBody> {
        let retry_after = match &self {
            Self::InFlight { retry_after } => Some(*retry_after),
            Self::StoreUnavailable => Some(Duration::from_secs(1)),
            _ => None,
        };
        response(self.status(), self.slug(), self.title(), &self.detail(), self.should_retry(), retry_after)
    }
}

/// A problem response: `application/problem+json` with `type` = [`PROBLEM_BASE`] +
/// `slug`, an OpenAI/Anthropic-shaped `error` object, `x-should-retry`, and, when
/// `retry_after` is set, `Retry-After` (whole seconds, at least 1) and `retry-after-ms`.
///
/// The one place where idemgate's own answers are shaped; the proxy uses it too.
pub fn response(
    status: StatusCode,
    slug: &str,
    title: &str,
    detail: &str,
    should_retry: bool,
    retry_after: Option<Duration>,
) -> Response<ResponseBody> {
    let body = serde_json::json!({
        "type": format!("{PROBLEM_BASE}{slug}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "error": {
            "type": "idempotency_error",
            "code": slug.replace('-', "_"),
            "message": format!("{title}: {detail}"),
        },
    });
    let mut res = Response::new(ResponseBody::full(body.to_string()));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    h.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("false"));
    h.insert(X_SHOULD_RETRY, HeaderValue::from_static(if should_retry { "true" } else { "false" }));
    if let Some(d) = retry_after {
        let secs = d.as_secs_f64().ceil().max(1.0) as u64;
        h.insert(RETRY_AFTER, HeaderValue::from(secs));
        h.insert(RETRY_AFTER_MS, HeaderValue::from(d.as_millis().max(1) as u64));
    }
    res
}
