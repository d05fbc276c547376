//! What a store keeps for a key: an in-flight claim or a completed response.
//!
//! A response is kept as status, headers and the body as the sequence of chunks it
//! arrived in, so that a replay can keep the original chunk boundaries (which matters
//! for streams). The binary encoding is versioned; a version this build does not know
//! fails closed as [`StoreError::corrupt`](crate::StoreError::corrupt), and every
//! version ever written keeps decoding (fixtures under `tests/fixtures`).

use std::fmt;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use crate::clock::Timestamp;
use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::scope::StorageKey;
use crate::usage::Usage;

/// The fencing token of one claim. Every `complete`, `release` and `renew` must
/// present it, so an owner that lost its lease can never overwrite its successor.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(u128);

impl Token {
    /// A fresh token (a UUIDv7: unique, and ordered by creation time).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().as_u128())
    }

    /// A token from its 128 bits.
    pub const fn from_u128(v: u128) -> Self {
        Self(v)
    }

    /// The 128 bits.
    pub const fn as_u128(self) -> u128 {
        self.0
    }

    /// The canonical text form (a UUID), as stores write it.
    pub fn to_text(self) -> String {
        uuid::Uuid::from_u128(self.0).to_string()
    }

    /// Parses the text form.
    pub fn from_text(s: &str) -> Option<Self> {
        uuid::Uuid::parse_str(s).ok().map(|u| Self(u.as_u128()))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.to_text())
    }
}

/// A response as recorded: status, the replayable headers and the body chunks.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The allow-listed headers, in the allow-list's order (one name's values in the
    /// order received). Kept as `http` types, so a replay neither parses nor copies
    /// them again: a recorded response's values share one buffer of their own, a
    /// decoded one's borrow from the stored bytes.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body, as the chunks it arrived in.
    pub chunks: Vec<Bytes>,
    /// When each chunk arrived, in milliseconds after the first (empty when not
    /// recorded): for replaying a stream at its original pace.
    pub offsets_ms: Vec<u32>,
    /// The token usage the provider reported, if any.
    pub usage: Option<Usage>,
    /// The model the provider said it used, if any.
    pub model: Option<String>,
    /// When the original call completed.
    pub completed_at: Timestamp,
}

impl fmt::Debug for StoredResponse {
    // Bodies may hold user data: debug output shows sizes only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredResponse")
            .field("status", &self.status)
            .field("headers", &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>())
            .field("chunks", &self.chunks.len())
            .field("body_len", &self.body_len())
            .field("usage", &self.usage)
            .field("model", &self.model)
            .field("completed_at", &self.completed_at)
            .finish()
    }
}

const MAGIC: &[u8; 4] = b"IDGR";
/// The version `encode` writes. Version 1 (status, headers, chunks) still decodes.
const VERSION: u8 = 2;

impl StoredResponse {
    /// A response with no timings and no usage.
    pub fn new(
        status: u16,
        headers: Vec<(HeaderName, HeaderValue)>,
        chunks: Vec<Bytes>,
        completed_at: Timestamp,
    ) -> Self {
        Self { status, headers, chunks, offsets_ms: Vec::new(), usage: None, model: None, completed_at }
    }

    /// The body length in bytes.
    pub fn body_len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    /// The body as one contiguous buffer.
    pub fn body(&self) -> Bytes {
        match self.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => many.concat().into(),
        }
    }

    /// Encodes the response for a store (the latest format version, see `decode`).
    pub fn encode(&self) -> Vec<u8> {
        let header_len: usize = self.headers.iter().map(|(n, v)| 6 + n.as_str().len() + v.len()).sum();
        let mut out = Vec::with_capacity(32 + header_len + 4 * self.chunks.len() + self.body_len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&self.completed_at.as_millis().to_be_bytes());
        out.extend_from_slice(&(self.headers.len() as u32).to_be_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(&(name.as_str().len() as u16).to_be_bytes());
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(&(self.chunks.len() as u32).to_be_bytes());
        for chunk in &self.chunks {
            out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out.extend_from_slice(&(self.offsets_ms.len() as u32).to_be_bytes());
        for offset in &self.offsets_ms {
            out.extend_from_slice(&offset.to_be_bytes());
        }
        match &self.usage {
            None => out.push(0),
            Some(u) => {
                out.push(1);
                for n in [u.input, u.cached_input, u.output, u.reasoning] {
                    out.extend_from_slice(&n.to_be_bytes());
                }
            }
        }
        match &self.model {
            None => out.push(0),
            Some(m) => {
                let m = &m.as_bytes()[..m.len().min(u16::MAX as usize)];
                out.push(1);
                out.extend_from_slice(&(m.len() as u16).to_be_bytes());
                out.extend_from_slice(m);
            }
        }
        out
    }

    /// Decodes what [`encode`](Self::encode) wrote. Chunks and header values borrow
    /// from `buf`, no copy; names are lowercased. A stored header that is not a valid
    /// one (which this build never writes) is left out rather than reported, so that
    /// the response can still be replayed, and `inspect` does not show it.
    ///
    /// Layout, all integers big-endian: `"IDGR"`, version `u8`, status `u16`,
    /// completed-at `u64` ms, header count `u32`, then per header name length `u16`,
    /// name, value length `u32`, value; chunk count `u32`, then per chunk length `u32`
    /// and bytes. Version 1 ends there. Version 2 goes on with the offset count `u32`
    /// (0 or the chunk count) and the offsets `u32` ms; a usage flag `u8` and, when 1,
    /// input, cached input, output and reasoning tokens as `u64`; a model flag `u8`
    /// and, when 1, the model's length `u16` and UTF-8 name. Nothing may follow.
    pub fn decode(buf: Bytes) -> Result<Self, StoreError> {
        let mut r = Reader { buf, pos: 0 };
        if r.take(4)?.as_ref() != MAGIC {
            return Err(StoreError::corrupt("stored response has no IDGR header"));
        }
        let version = r.u8()?;
        if !(1..=VERSION).contains(&version) {
            return Err(StoreError::corrupt(format!(
                "stored response has format version {version}; this build reads version {VERSION}"
            )));
        }
        let status = r.u16()?;
        let completed_at = Timestamp::from_millis(r.u64()?);
        let n = r.u32()? as usize;
        let mut headers = Vec::with_capacity(n.min(256));
        for _ in 0..n {
            let len = r.u16()? as usize;
            let name = r.take(len)?;
            let len = r.u32()? as usize;
            let value = r.take(len)?;
            // This build writes only valid headers; one that is not (another writer,
            // an older build) is left out of the replay rather than failing it.
            if let (Some(name), Ok(value)) = (crate::policy::header_name(&name), HeaderValue::from_maybe_shared(value))
            {
                headers.push((name, value));
            }
        }
        let n = r.u32()? as usize;
        let mut chunks = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let len = r.u32()? as usize;
            chunks.push(r.take(len)?);
        }
        let mut response = Self::new(status, headers, chunks, completed_at);
        if version >= 2 {
            let n = r.u32()? as usize;
            if n != 0 && n != response.chunks.len() {
                return Err(StoreError::corrupt("stored response has timings for another number of chunks"));
            }
            response.offsets_ms = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            if r.u8()? == 1 {
                let [input, cached_input, output, reasoning] = [r.u64()?, r.u64()?, r.u64()?, r.u64()?];
                response.usage = Some(Usage { input, cached_input, output, reasoning });
            }
            if r.u8()? == 1 {
                let len = r.u16()? as usize;
                let model = String::from_utf8(r.take(len)?.to_vec())
                    .map_err(|_| StoreError::corrupt("stored model name is not UTF-8"))?;
                response.model = Some(model);
            }
        }
        if r.pos != r.buf.len() {
            return Err(StoreError::corrupt("stored response has trailing bytes"));
        }
        Ok(response)
    }
}

struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, StoreError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| StoreError::corrupt("stored response is truncated"))?;
        let out = self.buf.slice(self.pos..end);
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let b = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&b);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, StoreError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        self.array().map(u64::from_be_bytes)
    }
}

/// A record as a store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Where it lives.
    pub key: StorageKey,
    /// The fingerprint of the request that claimed the key.
    pub fingerprint: Fingerprint,
    /// When the current claim was made (a takeover of an expired lease starts a new one).
    pub created_at: Timestamp,
    /// In flight or completed.
    pub state: RecordState,
}

/// The two states a stored record can be in (absent is no record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordState {
    /// A request owns the key and is running.
    InFlight {
        /// The owner's fencing token.
        token: Token,
        /// When the lease runs out unless renewed.
        lease_until: Timestamp,
    },
    /// The response is recorded.
    Completed {
        /// The recorded response.
        response: StoredResponse,
        /// When the record expires.
        expires_at: Timestamp,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredResponse {
        StoredResponse::new(
            201,
            vec![
                (http::header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
                (HeaderName::from_static("x-request-id"), HeaderValue::from_static("req_1")),
            ],
            vec![Bytes::from_static(b"{\"a\":"), Bytes::new(), Bytes::from_static(b"1}")],
            Timestamp::from_millis(1_700_000_000_123),
        )
    }

    fn metered() -> StoredResponse {
        StoredResponse {
            offsets_ms: vec![0, 20, 41],
            usage: Some(Usage { input: 120, cached_input: 30, output: 45, reasoning: 7 }),
            model: Some("gpt-4o-mini-2024-07-18".into()),
            ..sample()
        }
    }

    #[test]
    fn round_trips_with_chunk_boundaries() {
        let r = sample();
        let back = StoredResponse::decode(Bytes::from(r.encode())).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.body(), Bytes::from_static(b"{\"a\":1}"));
        let empty = StoredResponse { chunks: vec![], headers: vec![], ..sample() };
        assert_eq!(StoredResponse::decode(Bytes::from(empty.encode())).unwrap(), empty);
        let m = metered();
        assert_eq!(StoredResponse::decode(Bytes::from(m.encode())).unwrap(), m);
    }

    #[test]
    fn an_invalid_stored_header_is_left_out_of_the_replay() {
        let enc = sample().encode();
        let at = enc.windows(12).position(|w| w == b"x-request-id").unwrap();
        let mut bad = enc.clone();
        bad[at + 1] = b' ';
        let back = StoredResponse::decode(Bytes::from(bad)).unwrap();
        assert_eq!(back.headers, sample().headers[..1]);
        assert_eq!(back.chunks, sample().chunks);
        let mut bad_value = enc.clone();
        let value_at = at + 12 + 4;
        bad_value[value_at] = b'\n';
        assert_eq!(StoredResponse::decode(Bytes::from(bad_value)).unwrap().headers, sample().headers[..1]);
        // Not UTF-8: once `Corrupt` when decoded, now left out like any invalid name.
        let mut not_utf8 = enc.clone();
        not_utf8[at + 2] = 0xff;
        assert_eq!(StoredResponse::decode(Bytes::from(not_utf8)).unwrap().headers, sample().headers[..1]);
        // Another writer's uppercase name is the same header.
        let mut upper = enc;
        upper[at..at + 12].copy_from_slice(b"X-Request-Id");
        assert_eq!(StoredResponse::decode(Bytes::from(upper)).unwrap().headers, sample().headers);
    }

    /// Records written by earlier builds; later versions must keep decoding them.
    #[test]
    fn decodes_the_v1_and_v2_fixtures() {
        let v1 = include_bytes!("../tests/fixtures/stored-response-v1.bin");
        assert_eq!(StoredResponse::decode(Bytes::from_static(v1)).unwrap(), sample());
        let v2 = include_bytes!("../tests/fixtures/stored-response-v2.bin");
        assert_eq!(StoredResponse::decode(Bytes::from_static(v2)).unwrap(), metered());
        assert_eq!(metered().encode(), v2.to_vec(), "the encoder still writes version 2 this way");
    }

    #[test]
    fn every_truncation_and_unknown_versions_fail_closed() {
        let enc = metered().encode();
        for cut in 0..enc.len() {
            let err = StoredResponse::decode(Bytes::copy_from_slice(&enc[..cut])).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        }
        let mut v9 = enc.clone();
        v9[4] = 9;
        assert!(StoredResponse::decode(Bytes::from(v9)).is_err());
        let mut trailing = enc;
        trailing.push(0);
        assert!(StoredResponse::decode(Bytes::from(trailing)).is_err());
    }

    #[test]
    fn tokens_round_trip_as_text() {
        let t = Token::generate();
        assert_eq!(Token::from_text(&t.to_text()), Some(t));
        assert_ne!(Token::generate(), t);
    }
}
