//! What Redis answers, read into the store's types. Anything of another shape is
//! [`StoreError::corrupt`]: data this build cannot read, never guessed at.

use bytes::Bytes;
use idemgate::store::{LiveEnd, LiveHead, LiveRead};
use idemgate::{
    Claim, Fingerprint, Lease, Record, RecordState, StorageKey, StoreError, StoredResponse, Timestamp, Token,
};
use redis::Value;

/// The live log's end as the scripts store it.
pub(crate) const fn end_name(end: LiveEnd) -> &'static str {
    match end {
        LiveEnd::Complete => "complete",
        LiveEnd::Broken => "broken",
    }
}

/// A live head, in the stored-response encoding (no chunks): versioned like a record.
pub(crate) fn encode_head(head: &LiveHead) -> Vec<u8> {
    StoredResponse::new(head.status, head.headers.clone(), Vec::new(), Timestamp::from_millis(0)).encode()
}

fn decode_head(buf: Vec<u8>) -> Result<LiveHead, StoreError> {
    let response = StoredResponse::decode(Bytes::from(buf))?;
    Ok(LiveHead { status: response.status, headers: response.headers })
}

fn bytes(v: Value, what: &'static str) -> Result<Vec<u8>, StoreError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        _ => Err(StoreError::corrupt(format!("redis answered {what} in an unknown shape"))),
    }
}

fn int(v: &Value, what: &'static str) -> Result<i64, StoreError> {
    match v {
        Value::Int(n) => Ok(*n),
        _ => Err(StoreError::corrupt(format!("redis answered {what} in an unknown shape"))),
    }
}

fn millis(v: i64) -> Result<Timestamp, StoreError> {
    u64::try_from(v).map(Timestamp::from_millis).map_err(|_| StoreError::corrupt("redis answered a negative time"))
}

/// The claim script's answer.
pub(crate) fn claim(v: Value, key: StorageKey, token: Token) -> Result<Claim, StoreError> {
    let shape = || StoreError::corrupt("the claim script answered in an unknown shape");
    let Value::Array(items) = v else { return Err(shape()) };
    let mut items = items.into_iter();
    let tag = bytes(items.next().ok_or_else(shape)?, "a claim")?;
    let rest: Vec<Value> = items.collect();
    match (tag.as_slice(), rest.as_slice()) {
        (b"acquired", [until, took_over]) => {
            let lease_until = millis(int(until, "a claim")?)?;
            let took_over = int(took_over, "a claim")? == 1;
            Ok(Claim::Acquired(Lease { key, token, lease_until, took_over }))
        }
        (b"in_flight", [until]) => Ok(Claim::InFlight { lease_until: millis(int(until, "a claim")?)? }),
        (b"completed", [response]) => {
            let response = bytes(response.clone(), "a claim")?;
            Ok(Claim::Completed(Box::new(StoredResponse::decode(Bytes::from(response))?)))
        }
        (b"mismatch", []) => Ok(Claim::Mismatch),
        _ => Err(shape()),
    }
}

/// The fields `get` reads, in this order.
pub(crate) const RECORD_FIELDS: [&str; 7] =
    ["state", "fp", "token", "created_at", "lease_until", "expires_at", "response"];

/// A record hash read with [`RECORD_FIELDS`]; `None` when there is none.
pub(crate) fn record(key: StorageKey, fields: Vec<Option<Vec<u8>>>) -> Result<Option<Record>, StoreError> {
    let [state, fp, token, created_at, lease_until, expires_at, response]: [Option<Vec<u8>>; 7] =
        fields.try_into().map_err(|_| StoreError::corrupt("redis answered HMGET in an unknown shape"))?;
    let Some(state) = state else { return Ok(None) };
    let fp: [u8; 32] = fp
        .and_then(|f| f.try_into().ok())
        .ok_or_else(|| StoreError::corrupt("stored record has no 32-byte fingerprint"))?;
    let created_at = time(created_at, "created_at")?;
    let state = match state.as_slice() {
        b"flight" => {
            let token = token
                .and_then(|t| Token::from_text(std::str::from_utf8(&t).ok()?))
                .ok_or_else(|| StoreError::corrupt("stored in-flight record has no token"))?;
            RecordState::InFlight { token, lease_until: time(lease_until, "lease_until")? }
        }
        b"done" => {
            let response = response.ok_or_else(|| StoreError::corrupt("stored completed record has no response"))?;
            let response = StoredResponse::decode(Bytes::from(response))?;
            RecordState::Completed { response, expires_at: time(expires_at, "expires_at")? }
        }
        _ => return Err(StoreError::corrupt("stored record has an unknown state")),
    };
    Ok(Some(Record { key, fingerprint: Fingerprint::from_bytes(fp), created_at, state }))
}

fn time(field: Option<Vec<u8>>, name: &'static str) -> Result<Timestamp, StoreError> {
    field
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok())
        .map(Timestamp::from_millis)
        .ok_or_else(|| StoreError::corrupt(format!("stored record has no readable {name}")))
}

/// The live-read script's answer: nil, or `{token, head, end, chunks}`.
pub(crate) fn live_read(v: Value) -> Result<Option<LiveRead>, StoreError> {
    let shape = || StoreError::corrupt("the live-read script answered in an unknown shape");
    let items = match v {
        Value::Nil => return Ok(None),
        Value::Array(items) => items,
        _ => return Err(shape()),
    };
    let [token, head, end, chunks]: [Value; 4] = items.try_into().map_err(|_| shape())?;
    let token = bytes(token, "a live log")?;
    let token = std::str::from_utf8(&token)
        .ok()
        .and_then(Token::from_text)
        .ok_or_else(|| StoreError::corrupt("stored live log has no readable token"))?;
    let head = decode_head(bytes(head, "a live log")?)?;
    let end = match bytes(end, "a live log")?.as_slice() {
        b"" => None,
        b"complete" => Some(LiveEnd::Complete),
        b"broken" => Some(LiveEnd::Broken),
        _ => return Err(StoreError::corrupt("stored live log has an unknown end")),
    };
    let chunks = match chunks {
        Value::Array(chunks) => {
            chunks.into_iter().map(|c| bytes(c, "a live log").map(Bytes::from)).collect::<Result<_, _>>()?
        }
        _ => return Err(shape()),
    };
    Ok(Some(LiveRead { token, head, chunks, end }))
}

#[cfg(test)]
mod tests {
    use idemgate::http::{HeaderName, HeaderValue};

    use super::*;

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    #[test]
    fn reads_every_claim_answer() {
        let (key, token) = (StorageKey::from_bytes([1; 32]), Token::generate());
        let acquired = Value::Array(vec![bulk(b"acquired"), Value::Int(1_700_000_000_200), Value::Int(1)]);
        let lease = Lease { key, token, lease_until: Timestamp::from_millis(1_700_000_000_200), took_over: true };
        assert_eq!(claim(acquired, key, token).ok(), Some(Claim::Acquired(lease)));
        let in_flight = Value::Array(vec![bulk(b"in_flight"), Value::Int(5)]);
        assert_eq!(claim(in_flight, key, token).ok(), Some(Claim::InFlight { lease_until: Timestamp::from_millis(5) }));
        let response = StoredResponse::new(200, vec![], vec![Bytes::from_static(b"{}")], Timestamp::from_millis(9));
        let completed = Value::Array(vec![bulk(b"completed"), bulk(&response.encode())]);
        assert_eq!(claim(completed, key, token).ok(), Some(Claim::Completed(Box::new(response))));
        assert_eq!(claim(Value::Array(vec![bulk(b"mismatch")]), key, token).ok(), Some(Claim::Mismatch));
        for odd in [Value::Nil, Value::Array(vec![bulk(b"acquired")]), Value::Array(vec![bulk(b"other")])] {
            assert_eq!(claim(odd, key, token).map_err(|e| e.kind()), Err(idemgate::ErrorKind::Corrupt));
        }
    }

    #[test]
    fn reads_records_and_refuses_broken_ones() {
        let key = StorageKey::from_bytes([2; 32]);
        let token = Token::generate();
        let field = |s: &str| Some(s.as_bytes().to_vec());
        let flight =
            vec![field("flight"), Some(vec![7; 32]), field(&token.to_text()), field("100"), field("300"), None, None];
        let expected = Record {
            key,
            fingerprint: Fingerprint::from_bytes([7; 32]),
            created_at: Timestamp::from_millis(100),
            state: RecordState::InFlight { token, lease_until: Timestamp::from_millis(300) },
        };
        assert_eq!(record(key, flight.clone()).ok(), Some(Some(expected)));
        assert_eq!(record(key, vec![None; 7]).ok(), Some(None));
        let mut short_fp = flight.clone();
        short_fp[1] = Some(vec![7; 31]);
        let mut bad_state = flight.clone();
        bad_state[0] = field("gone");
        let mut done_without_response = flight;
        done_without_response[0] = field("done");
        for broken in [short_fp, bad_state, done_without_response, vec![None; 3]] {
            assert_eq!(record(key, broken).map_err(|e| e.kind()), Err(idemgate::ErrorKind::Corrupt));
        }
    }

    #[test]
    fn reads_live_logs() {
        let token = Token::generate();
        let head = LiveHead {
            status: 200,
            headers: vec![(HeaderName::from_static("content-type"), HeaderValue::from_static("text/plain"))],
        };
        let answer = Value::Array(vec![
            bulk(token.to_text().as_bytes()),
            bulk(&encode_head(&head)),
            bulk(b"broken"),
            Value::Array(vec![bulk(b"a"), bulk(b"")]),
        ]);
        let chunks = vec![Bytes::from_static(b"a"), Bytes::new()];
        assert_eq!(live_read(answer).ok(), Some(Some(LiveRead { token, head, chunks, end: Some(LiveEnd::Broken) })));
        assert_eq!(live_read(Value::Nil).ok(), Some(None));
        assert!(live_read(Value::Array(vec![bulk(b"x")])).is_err());
    }
}
