//! The record a store keeps per scoped key, and its versioned binary encoding.
//!
//! ```
//! use idemgate_core::record::{Outcome, Record, RecordState, StoredResponse};
//! use idemgate_core::{Fingerprint, fingerprint::Algorithm, Timestamp};
//!
//! let record = Record {
//!     namespace: "default".into(),
//!     scope: "payments".into(),
//!     idempotency_key: "k1".into(),
//!     fingerprint: Fingerprint::from_parts(Algorithm::Blake3, [7; 32]),
//!     created_at: Timestamp(1),
//!     expires_at: Timestamp(100),
//!     state: RecordState::Completed {
//!         epoch: 1,
//!         completed_at: Timestamp(2),
//!         outcome: Outcome::Response(StoredResponse::new(201, vec![], "done")),
//!     },
//! };
//! let bytes = record.encode();
//! assert_eq!(bytes[0], idemgate_core::record::ENCODING_VERSION);
//! assert_eq!(Record::decode(&bytes)?, record);
//! # Ok::<(), idemgate_core::record::DecodeError>(())
//! ```

use bytes::Bytes;

use crate::clock::Timestamp;
use crate::fingerprint::{Algorithm, Fingerprint};

/// The first byte of every encoded record. Version 2 writes lengths, epochs and timestamps as
/// LEB128 varints (version 1, still read, wrote them as 4- and 8-byte integers); the layout is
/// otherwise the same.
pub const ENCODING_VERSION: u8 = 2;

/// The first encoding version, still decoded.
const ENCODING_V1: u8 = 1;

/// The largest payload (body plus headers) a record may hold: 16 MiB. Larger outcomes must be stored as
/// [`Outcome::NotReplayable`]; stores refuse bigger bodies with a `Capacity` error.
pub const MAX_BODY_LEN: usize = 16 * 1024 * 1024;

/// Proof of holding a key: the epoch (forwarded upstream as `Idempotency-Epoch`) and a token unique
/// to this acquisition. Every compare-and-set matches both, so a holder from before a release and
/// re-claim (which restarts epochs at 1) can never act on the new record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fencing {
    /// 1 for the first dispatch, +1 for every takeover.
    pub epoch: u64,
    /// Chosen by the acquirer; unique per acquisition. Never [`Fencing::REVOKED`].
    pub token: u128,
}

impl Fencing {
    /// The token an operator's forced delete puts on an in-flight record
    /// ([`DeleteMode::Force`](crate::store::DeleteMode::Force)): no holder has it, so every
    /// compare-and-set of the old holder fails, and the next claimer takes the record over at
    /// epoch + 1. Only [`Store::take_over`](crate::Store::take_over) accepts it.
    pub const REVOKED: u128 = 0;

    /// Whether this is the fencing of a record revoked by an operator.
    pub fn is_revoked(&self) -> bool {
        self.token == Self::REVOKED
    }
}

/// A stored HTTP-like response: status, headers and the body, replayed byte-identical.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoredResponse {
    /// Status code (or an application result code for message handlers).
    pub status: u16,
    /// Header names and values, in order.
    pub headers: Vec<(String, Bytes)>,
    /// The body.
    pub body: Bytes,
}

impl StoredResponse {
    /// A response from its parts.
    pub fn new(status: u16, headers: Vec<(String, Bytes)>, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            headers,
            body: body.into(),
        }
    }

    /// Bytes of headers and body (what the record costs beyond fixed fields).
    pub fn payload_len(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
    }
}

/// What a completed operation left behind.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// A response that retries get again, byte for byte.
    Response(StoredResponse),
    /// The operation ran but its result cannot be replayed (e.g. a response over the size limit).
    /// Retries are told so; the operation never runs a second time.
    NotReplayable {
        /// The status the first caller got.
        status: u16,
        /// Why it is not replayable, for operators.
        reason: String,
    },
}

impl Outcome {
    /// The outcome alone, in the record encoding (a kind byte first; no version byte). Stores that
    /// keep a record's fields apart (Redis, PostgreSQL) keep the outcome as these bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(match self {
            Outcome::Response(r) => 16 + r.payload_len() + 8 * r.headers.len(),
            Outcome::NotReplayable { reason, .. } => 8 + reason.len(),
        });
        self.encode_into(&mut w, Lengths::Fixed);
        w
    }

    /// Inverse of [`Outcome::encode`]; garbage is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, Lengths::Fixed);
        let outcome = Self::read(&mut r)?;
        if r.remaining() != 0 {
            return Err(DecodeError::TrailingBytes(r.remaining()));
        }
        Ok(outcome)
    }

    /// The exact length of `encode_into(.., l)`'s output.
    fn encoded_len(&self, l: Lengths) -> usize {
        1 + 2
            + match self {
                Outcome::Response(r) => {
                    len_len(r.headers.len(), l)
                        + r.headers
                            .iter()
                            .map(|(n, v)| bytes_len(n.len(), l) + bytes_len(v.len(), l))
                            .sum::<usize>()
                        + bytes_len(r.body.len(), l)
                }
                Outcome::NotReplayable { reason, .. } => bytes_len(reason.len(), l),
            }
    }

    fn encode_into(&self, w: &mut Vec<u8>, l: Lengths) {
        match self {
            Outcome::Response(r) => {
                w.push(1);
                w.extend_from_slice(&r.status.to_le_bytes());
                put_len(w, r.headers.len(), l);
                for (name, value) in &r.headers {
                    put_bytes(w, name.as_bytes(), l);
                    put_bytes(w, value, l);
                }
                put_bytes(w, &r.body, l);
            }
            Outcome::NotReplayable { status, reason } => {
                w.push(2);
                w.extend_from_slice(&status.to_le_bytes());
                put_bytes(w, reason.as_bytes(), l);
            }
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            1 => {
                let status = u16::from_le_bytes(r.array()?);
                let count = r.len()?;
                // Each header takes at least two length prefixes: bound the allocation by the input.
                if count > r.remaining() / r.lengths.min_len_prefixes(2) {
                    return Err(DecodeError::Truncated);
                }
                let mut headers = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = r.string()?;
                    let value = Bytes::copy_from_slice(r.bytes()?);
                    headers.push((name, value));
                }
                let body = Bytes::copy_from_slice(r.bytes()?);
                Outcome::Response(StoredResponse {
                    status,
                    headers,
                    body,
                })
            }
            2 => Outcome::NotReplayable {
                status: u16::from_le_bytes(r.array()?),
                reason: r.string()?,
            },
            tag => {
                return Err(DecodeError::BadTag {
                    field: "outcome",
                    tag,
                });
            }
        })
    }
}

/// Where a record is in its life (PRODUCT §2).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordState {
    /// Someone holds the key and is executing.
    InFlight {
        /// The holder's proof.
        fencing: Fencing,
        /// Who holds it (instance name), for operators.
        owner: String,
        /// When the lease ends unless renewed (store clock).
        lease_expires_at: Timestamp,
    },
    /// Finished; the outcome never changes until the record expires or is deleted.
    Completed {
        /// The epoch that completed it.
        epoch: u64,
        /// When it completed (store clock).
        completed_at: Timestamp,
        /// What it left behind.
        outcome: Outcome,
    },
    /// The operation may or may not have taken effect.
    Unknown {
        /// The epoch that could not tell.
        epoch: u64,
        /// When it was marked (store clock).
        since: Timestamp,
    },
}

impl RecordState {
    /// A short stable name: `in_flight`, `completed`, `unknown`.
    pub fn name(&self) -> &'static str {
        match self {
            RecordState::InFlight { .. } => "in_flight",
            RecordState::Completed { .. } => "completed",
            RecordState::Unknown { .. } => "unknown",
        }
    }
}

/// One record. Its identity is the [`StoreKey`](crate::StoreKey) it is filed under; the raw key and
/// scope label are kept for administrators.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Record {
    /// Namespace the key belongs to.
    pub namespace: String,
    /// Scope label (never a credential; see [`Scope`](crate::Scope)).
    pub scope: String,
    /// The client's key.
    pub idempotency_key: String,
    /// Fingerprint of the first request.
    pub fingerprint: Fingerprint,
    /// When it was first claimed (store clock).
    pub created_at: Timestamp,
    /// When it becomes absent (store clock).
    pub expires_at: Timestamp,
    /// The state.
    pub state: RecordState,
}

impl Record {
    /// Whether the record is gone at `now` (expiry is inclusive: at `expires_at` it is absent).
    pub fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at
    }

    /// Encodes with the current [`ENCODING_VERSION`].
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut w);
        w
    }

    /// The exact length of [`Record::encode`]'s output.
    pub(crate) fn encoded_len(&self) -> usize {
        const L: Lengths = Lengths::Varint;
        let state = match &self.state {
            RecordState::InFlight {
                fencing,
                owner,
                lease_expires_at,
            } => {
                int_len(fencing.epoch, L)
                    + 16
                    + bytes_len(owner.len(), L)
                    + int_len(lease_expires_at.0, L)
            }
            RecordState::Completed {
                epoch,
                completed_at,
                outcome,
            } => int_len(*epoch, L) + int_len(completed_at.0, L) + outcome.encoded_len(L),
            RecordState::Unknown { epoch, since } => int_len(*epoch, L) + int_len(since.0, L),
        };
        1 + bytes_len(self.namespace.len(), L)
            + bytes_len(self.scope.len(), L)
            + bytes_len(self.idempotency_key.len(), L)
            + 1
            + 32
            + int_len(self.created_at.0, L)
            + int_len(self.expires_at.0, L)
            + 1
            + state
    }

    /// Appends the encoding to `w`.
    pub(crate) fn encode_into(&self, w: &mut Vec<u8>) {
        self.encode_as(w, ENCODING_VERSION, Lengths::Varint);
    }

    fn encode_as(&self, w: &mut Vec<u8>, version: u8, lengths: Lengths) {
        w.push(version);
        put_bytes(w, self.namespace.as_bytes(), lengths);
        put_bytes(w, self.scope.as_bytes(), lengths);
        put_bytes(w, self.idempotency_key.as_bytes(), lengths);
        w.push(self.fingerprint.algorithm.tag());
        w.extend_from_slice(&self.fingerprint.digest);
        put_int(w, self.created_at.0, lengths);
        put_int(w, self.expires_at.0, lengths);
        match &self.state {
            RecordState::InFlight {
                fencing,
                owner,
                lease_expires_at,
            } => {
                w.push(1);
                put_int(w, fencing.epoch, lengths);
                w.extend_from_slice(&fencing.token.to_le_bytes());
                put_bytes(w, owner.as_bytes(), lengths);
                put_int(w, lease_expires_at.0, lengths);
            }
            RecordState::Completed {
                epoch,
                completed_at,
                outcome,
            } => {
                w.push(2);
                put_int(w, *epoch, lengths);
                put_int(w, completed_at.0, lengths);
                outcome.encode_into(w, lengths);
            }
            RecordState::Unknown { epoch, since } => {
                w.push(3);
                put_int(w, *epoch, lengths);
                put_int(w, since.0, lengths);
            }
        }
    }

    /// Decodes bytes written by [`Record::encode`]. Garbage, truncation, trailing bytes or an
    /// unknown version give an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::for_record(bytes)?;
        let namespace = r.string()?;
        let scope = r.string()?;
        let idempotency_key = r.string()?;
        let alg_tag = r.u8()?;
        let algorithm = Algorithm::from_tag(alg_tag).ok_or(DecodeError::BadTag {
            field: "fingerprint algorithm",
            tag: alg_tag,
        })?;
        let digest: [u8; 32] = r.array()?;
        let created_at = Timestamp(r.int()?);
        let expires_at = Timestamp(r.int()?);
        let state = match r.u8()? {
            1 => RecordState::InFlight {
                fencing: Fencing {
                    epoch: r.int()?,
                    token: u128::from_le_bytes(r.array()?),
                },
                owner: r.string()?,
                lease_expires_at: Timestamp(r.int()?),
            },
            2 => {
                let epoch = r.int()?;
                let completed_at = Timestamp(r.int()?);
                let outcome = Outcome::read(&mut r)?;
                RecordState::Completed {
                    epoch,
                    completed_at,
                    outcome,
                }
            }
            3 => RecordState::Unknown {
                epoch: r.int()?,
                since: Timestamp(r.int()?),
            },
            tag => {
                return Err(DecodeError::BadTag {
                    field: "state",
                    tag,
                });
            }
        };
        if r.remaining() != 0 {
            return Err(DecodeError::TrailingBytes(r.remaining()));
        }
        Ok(Record {
            namespace,
            scope,
            idempotency_key,
            fingerprint: Fingerprint::from_parts(algorithm, digest),
            created_at,
            expires_at,
            state,
        })
    }
}

/// Why stored bytes are not a record. Stores report it as an error of kind
/// [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes end early.
    #[error("record is truncated")]
    Truncated,
    /// The version byte is not one this build reads.
    #[error("record encoding version {0} is unknown (this build reads 1 to {ENCODING_VERSION})")]
    UnknownVersion(u8),
    /// A varint (length, epoch or timestamp) is malformed or overlong.
    #[error("record holds a malformed varint")]
    BadLength,
    /// A tag byte has no meaning.
    #[error("record has an invalid {field} tag {tag}")]
    BadTag {
        /// Which tag.
        field: &'static str,
        /// Its value.
        tag: u8,
    },
    /// A string is not UTF-8.
    #[error("record holds a string that is not UTF-8")]
    BadUtf8,
    /// Bytes follow the record.
    #[error("record is followed by {0} unexpected bytes")]
    TrailingBytes(usize),
}

/// How lengths are written: 4-byte little-endian (record version 1, and [`Outcome::encode`],
/// which Redis and PostgreSQL keep), or LEB128 varints (record version 2).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lengths {
    Fixed,
    Varint,
}

impl Lengths {
    /// The fewest bytes `n` length prefixes can take.
    fn min_len_prefixes(self, n: usize) -> usize {
        match self {
            Lengths::Fixed => 4 * n,
            Lengths::Varint => n,
        }
    }
}

fn put_len(w: &mut Vec<u8>, v: usize, l: Lengths) {
    match l {
        // Lengths are bounded by MAX_BODY_LEN and key limits, far below u32::MAX.
        Lengths::Fixed => w.extend_from_slice(&u32::try_from(v).unwrap_or(u32::MAX).to_le_bytes()),
        Lengths::Varint => put_varint(w, v as u64),
    }
}

/// An epoch or a timestamp: 8 bytes little-endian (version 1) or a varint (version 2).
fn put_int(w: &mut Vec<u8>, v: u64, l: Lengths) {
    match l {
        Lengths::Fixed => w.extend_from_slice(&v.to_le_bytes()),
        Lengths::Varint => put_varint(w, v),
    }
}

fn put_varint(w: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        w.push((v as u8) | 0x80);
        v >>= 7;
    }
    w.push(v as u8);
}

/// Bytes `put_len` writes for `v`.
fn len_len(v: usize, l: Lengths) -> usize {
    match l {
        Lengths::Fixed => 4,
        Lengths::Varint => varint_len(v as u64),
    }
}

/// Bytes `put_int` writes for `v`.
fn int_len(v: u64, l: Lengths) -> usize {
    match l {
        Lengths::Fixed => 8,
        Lengths::Varint => varint_len(v),
    }
}

/// Bytes `put_bytes` writes for `n` bytes.
fn bytes_len(n: usize, l: Lengths) -> usize {
    len_len(n, l) + n
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8], l: Lengths) {
    put_len(w, b.len(), l);
    w.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    lengths: Lengths,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], lengths: Lengths) -> Self {
        Self {
            buf,
            pos: 0,
            lengths,
        }
    }

    /// A reader past the version byte of an encoded record.
    fn for_record(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Self::new(buf, Lengths::Fixed);
        r.lengths = match r.u8()? {
            ENCODING_V1 => Lengths::Fixed,
            ENCODING_VERSION => Lengths::Varint,
            other => return Err(DecodeError::UnknownVersion(other)),
        };
        Ok(r)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn len(&mut self) -> Result<usize, DecodeError> {
        match self.lengths {
            Lengths::Fixed => Ok(u32::from_le_bytes(self.array()?) as usize),
            // At most five bytes: no length exceeds u32.
            Lengths::Varint => usize::try_from(self.varint(5)?).map_err(|_| DecodeError::BadLength),
        }
    }

    /// An epoch or a timestamp (see `put_int`).
    fn int(&mut self) -> Result<u64, DecodeError> {
        match self.lengths {
            Lengths::Fixed => self.u64(),
            Lengths::Varint => self.varint(10),
        }
    }

    /// A LEB128 varint of at most `max_bytes` bytes.
    fn varint(&mut self, max_bytes: usize) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for i in 0..max_bytes {
            let b = self.u8()?;
            let shift = 7 * i as u32;
            let bits = u64::from(b & 0x7f);
            if shift >= 64 || (shift > 0 && bits >> (64 - shift) != 0) {
                return Err(DecodeError::BadLength);
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::BadLength)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.len()?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        std::str::from_utf8(self.bytes()?)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(state: RecordState) -> Record {
        Record {
            namespace: "ns".into(),
            scope: "scope#1".into(),
            idempotency_key: "key".into(),
            fingerprint: Fingerprint::from_parts(Algorithm::Sha256, [3; 32]),
            created_at: Timestamp(10),
            expires_at: Timestamp(20),
            state,
        }
    }

    fn states() -> Vec<RecordState> {
        vec![
            RecordState::InFlight {
                fencing: Fencing {
                    epoch: 3,
                    token: u128::MAX - 5,
                },
                owner: "host:1".into(),
                lease_expires_at: Timestamp(15),
            },
            RecordState::Completed {
                epoch: 2,
                completed_at: Timestamp(12),
                outcome: Outcome::Response(StoredResponse::new(
                    200,
                    vec![(
                        "content-type".into(),
                        Bytes::from_static(b"application/json"),
                    )],
                    Bytes::from_static(b"{\"ok\":true}"),
                )),
            },
            RecordState::Completed {
                epoch: 1,
                completed_at: Timestamp(12),
                outcome: Outcome::NotReplayable {
                    status: 201,
                    reason: "too large".into(),
                },
            },
            RecordState::Unknown {
                epoch: 4,
                since: Timestamp(13),
            },
        ]
    }

    #[test]
    fn round_trips_every_state() {
        for state in states() {
            let r = sample(state);
            assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn outcomes_round_trip_alone() {
        for state in states() {
            if let RecordState::Completed { outcome, .. } = state {
                assert_eq!(Outcome::decode(&outcome.encode()).unwrap(), outcome);
            }
        }
        assert!(Outcome::decode(&[9]).is_err());
    }

    #[test]
    fn refuses_unknown_version_and_truncation() {
        let mut bytes = sample(states().remove(1)).encode();
        assert_eq!(Record::decode(&[]), Err(DecodeError::Truncated));
        for cut in 0..bytes.len() {
            assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        bytes.push(0);
        assert_eq!(Record::decode(&bytes), Err(DecodeError::TrailingBytes(1)));
        bytes[0] = 9;
        assert_eq!(Record::decode(&bytes), Err(DecodeError::UnknownVersion(9)));
    }

    #[test]
    fn version_1_records_still_decode_and_version_2_is_smaller() {
        for record in [
            sample(RecordState::Completed {
                epoch: 3,
                completed_at: Timestamp(9),
                outcome: Outcome::Response(StoredResponse::new(
                    201,
                    vec![(
                        "content-type".into(),
                        Bytes::from_static(b"application/json"),
                    )],
                    "{}",
                )),
            }),
            sample(RecordState::Unknown {
                epoch: 2,
                since: Timestamp(5),
            }),
        ] {
            let mut v1 = Vec::new();
            record.encode_as(&mut v1, ENCODING_V1, Lengths::Fixed);
            assert_eq!(v1[0], 1);
            assert_eq!(Record::decode(&v1).unwrap(), record);
            let v2 = record.encode();
            assert!(v2.len() < v1.len());
        }
    }

    #[test]
    fn overlong_varint_lengths_are_refused() {
        let mut bytes = vec![ENCODING_VERSION];
        bytes.extend_from_slice(&[0xff; 6]);
        assert_eq!(Record::decode(&bytes), Err(DecodeError::BadLength));
    }

    #[test]
    fn encoded_len_is_exact() {
        for state in states() {
            let record = sample(state);
            assert_eq!(record.encoded_len(), record.encode().len(), "{record:?}");
        }
        for v in [
            0u64,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut w = Vec::new();
            put_varint(&mut w, v);
            assert_eq!(varint_len(v), w.len(), "{v}");
        }
    }

    proptest! {
        #[test]
        fn encoded_len_matches_for_any_sizes(
            ns in "[a-z]{0,200}", key in "[a-z]{0,300}", body in 0usize..70_000,
            epoch in any::<u64>(), at in any::<u64>(),
        ) {
            let mut record = sample(RecordState::Completed {
                epoch,
                completed_at: Timestamp(at),
                outcome: Outcome::Response(StoredResponse::new(200, vec![], vec![0u8; body])),
            });
            record.namespace = ns;
            record.idempotency_key = key;
            record.expires_at = Timestamp(at);
            prop_assert_eq!(record.encoded_len(), record.encode().len());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Record::decode(&bytes);
        }

        #[test]
        fn flipped_bytes_never_panic(idx in 0usize..400, val in any::<u8>()) {
            for state in states() {
                let mut bytes = sample(state).encode();
                let i = idx % bytes.len();
                bytes[i] = val;
                let _ = Record::decode(&bytes);
            }
        }
    }
}
