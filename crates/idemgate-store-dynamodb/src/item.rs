//! The item layout: one item per record, its attributes, and decoding an item into a [`Record`].
//!
//! | attribute | type | what |
//! | --- | --- | --- |
//! | `pk` | B (32 bytes) | the partition key: the [`StoreKey`] |
//! | `v` | N | the layout version, `1` |
//! | `ns`, `sc`, `ik` | S | namespace, scope label, client key (for administrators) |
//! | `fp` | B (33 bytes) | fingerprint: algorithm tag, then the digest |
//! | `ca` | N | created at (ms since the Unix epoch, the writer's clock) |
//! | `ex` | N | expires at (ms): the exact expiry every read and condition checks |
//! | `ttl` | N | `ex` in seconds, rounded up: the DynamoDB TTL attribute (deletion is late) |
//! | `st` | N | `1` in flight, `2` completed, `3` outcome-unknown |
//! | `ep` | N | the epoch |
//! | `tok` | B (16 bytes) | the holder's token (all zeros: released or revoked; in flight only) |
//! | `own` | S | the holder's name (in flight only) |
//! | `le` | N | the lease's end (ms; in flight only) |
//! | `wid` | B (16 bytes) | the id of the store call that last finished, released or revoked the record |
//! | `at` | N | completed at / outcome unknown since (ms) |
//! | `out` | B | the outcome ([`Outcome::encode`]; completed only) |
//!
//! `wid` is not part of the [`Record`]: it lets a write that the SDK retried after its first
//! attempt landed (a lost answer) recognise its own effect, and only within that one call (a
//! second `complete` by the same holder is refused, as the contract says). Claims and takeovers
//! recognise theirs by the new holder's token, unique to the call.

use std::collections::HashMap;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use idemgate_core::clock::Timestamp;
use idemgate_core::error::{ErrorKind, StoreError};
use idemgate_core::fingerprint::{Algorithm, Fingerprint};
use idemgate_core::key::StoreKey;
use idemgate_core::record::{Fencing, Outcome, Record, RecordState};

/// An item as the SDK hands it over.
pub(crate) type Item = HashMap<String, AttributeValue>;

/// The layout version this build writes and reads.
pub(crate) const LAYOUT_VERSION: u64 = 1;

/// The partition key attribute.
pub const PARTITION_KEY: &str = "pk";
/// The TTL attribute (epoch seconds).
pub const TTL_ATTRIBUTE: &str = "ttl";

pub(crate) const ST_IN_FLIGHT: u64 = 1;
pub(crate) const ST_COMPLETED: u64 = 2;
pub(crate) const ST_UNKNOWN: u64 = 3;

pub(crate) fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(crate) fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

pub(crate) fn b(v: impl Into<Vec<u8>>) -> AttributeValue {
    AttributeValue::B(Blob::new(v))
}

pub(crate) fn key_value(key: &StoreKey) -> AttributeValue {
    b(key.as_bytes().to_vec())
}

pub(crate) fn token_value(token: u128) -> AttributeValue {
    b(token.to_be_bytes().to_vec())
}

pub(crate) fn fingerprint_value(fp: &Fingerprint) -> AttributeValue {
    let mut bytes = Vec::with_capacity(33);
    bytes.push(fp.algorithm.tag());
    bytes.extend_from_slice(&fp.digest);
    b(bytes)
}

/// `t` in epoch seconds, rounded up: the TTL attribute never ends a record before `ex` does.
pub(crate) fn ttl_seconds(t: Timestamp) -> u64 {
    t.as_millis().div_ceil(1000)
}

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::new(
        ErrorKind::Corrupt,
        format!("dynamodb record: {}", what.into()),
    )
}

fn number(item: &Item, name: &str) -> Result<u64, StoreError> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v
            .parse()
            .map_err(|_| corrupt(format!("{name} is not a whole number"))),
        _ => Err(corrupt(format!("{name} is missing or not a number"))),
    }
}

fn text(item: &Item, name: &str) -> Result<String, StoreError> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Ok(v.clone()),
        _ => Err(corrupt(format!("{name} is missing or not a string"))),
    }
}

fn bytes<'a>(item: &'a Item, name: &str) -> Result<&'a [u8], StoreError> {
    match item.get(name) {
        Some(AttributeValue::B(v)) => Ok(v.as_ref()),
        _ => Err(corrupt(format!("{name} is missing or not binary"))),
    }
}

fn token(item: &Item, name: &str) -> Result<u128, StoreError> {
    let raw: [u8; 16] = bytes(item, name)?
        .try_into()
        .map_err(|_| corrupt(format!("{name} is not 16 bytes")))?;
    Ok(u128::from_be_bytes(raw))
}

/// The store key an item is filed under.
pub(crate) fn store_key(item: &Item) -> Result<StoreKey, StoreError> {
    let raw: [u8; 32] = bytes(item, PARTITION_KEY)?
        .try_into()
        .map_err(|_| corrupt("pk is not 32 bytes"))?;
    Ok(StoreKey(raw))
}

/// An item as a record (expired or not: callers judge that with their clock).
pub(crate) fn decode(item: &Item) -> Result<Record, StoreError> {
    let version = number(item, "v")?;
    if version != LAYOUT_VERSION {
        return Err(corrupt(format!("unknown layout version {version}")));
    }
    let fp = bytes(item, "fp")?;
    let (alg, digest) = fp
        .split_first()
        .ok_or_else(|| corrupt("empty fingerprint"))?;
    let algorithm = Algorithm::from_tag(*alg).ok_or_else(|| corrupt("fingerprint algorithm"))?;
    let digest: [u8; 32] = digest
        .try_into()
        .map_err(|_| corrupt("fingerprint length"))?;
    let epoch = number(item, "ep")?;
    let state = match number(item, "st")? {
        ST_IN_FLIGHT => RecordState::InFlight {
            fencing: Fencing {
                epoch,
                token: token(item, "tok")?,
            },
            owner: text(item, "own")?,
            lease_expires_at: Timestamp(number(item, "le")?),
        },
        ST_COMPLETED => RecordState::Completed {
            epoch,
            completed_at: Timestamp(number(item, "at")?),
            outcome: Outcome::decode(bytes(item, "out")?).map_err(StoreError::from)?,
        },
        ST_UNKNOWN => RecordState::Unknown {
            epoch,
            since: Timestamp(number(item, "at")?),
        },
        other => return Err(corrupt(format!("unknown state {other}"))),
    };
    Ok(Record {
        namespace: text(item, "ns")?,
        scope: text(item, "sc")?,
        idempotency_key: text(item, "ik")?,
        fingerprint: Fingerprint::from_parts(algorithm, digest),
        created_at: Timestamp(number(item, "ca")?),
        expires_at: Timestamp(number(item, "ex")?),
        state,
    })
}

/// The few attributes a compare-and-set looks at, read leniently from an item a failed condition
/// returned: what is missing or malformed is `None` (such an item is never "ours").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Head {
    pub state: Option<u64>,
    pub epoch: Option<u64>,
    pub token: Option<u128>,
    pub write_id: Option<u128>,
    pub owner: Option<String>,
    pub expires_at: Option<Timestamp>,
    pub lease_expires_at: Option<Timestamp>,
}

impl Head {
    pub(crate) fn of(item: &Item) -> Self {
        Self {
            state: number(item, "st").ok(),
            epoch: number(item, "ep").ok(),
            token: token(item, "tok").ok(),
            write_id: token(item, "wid").ok(),
            owner: text(item, "own").ok(),
            expires_at: number(item, "ex").ok().map(Timestamp),
            lease_expires_at: number(item, "le").ok().map(Timestamp),
        }
    }

    /// Live at `now` (an item without a readable expiry counts as live: it is not ours to drop).
    pub(crate) fn live(&self, now: Timestamp) -> bool {
        self.expires_at.is_none_or(|ex| ex > now)
    }

    /// In flight, live, with exactly `f`.
    pub(crate) fn held_by(&self, f: Fencing, now: Timestamp) -> bool {
        self.state == Some(ST_IN_FLIGHT)
            && self.epoch == Some(f.epoch)
            && self.token == Some(f.token)
            && self.expires_at.is_some_and(|ex| ex > now)
    }

    /// Written by the store call `write_id` (an earlier attempt of this very call landed).
    pub(crate) fn written_by(&self, write_id: u128) -> bool {
        self.write_id == Some(write_id)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use idemgate_core::record::StoredResponse;

    fn in_flight() -> Item {
        let fp = Fingerprint::from_parts(Algorithm::Blake3, [7; 32]);
        HashMap::from([
            ("pk".to_owned(), b(vec![1; 32])),
            ("v".to_owned(), n(1)),
            ("ns".to_owned(), s("ns")),
            ("sc".to_owned(), s("scope")),
            ("ik".to_owned(), s("key")),
            ("fp".to_owned(), fingerprint_value(&fp)),
            ("ca".to_owned(), n(10)),
            ("ex".to_owned(), n(5_000)),
            ("ttl".to_owned(), n(5)),
            ("st".to_owned(), n(1)),
            ("ep".to_owned(), n(3)),
            ("tok".to_owned(), token_value(42)),
            ("own".to_owned(), s("me")),
            ("le".to_owned(), n(1_000)),
        ])
    }

    #[test]
    fn items_decode_into_records_and_garbage_is_corrupt() {
        let item = in_flight();
        let r = decode(&item).unwrap();
        assert_eq!(
            r.state,
            RecordState::InFlight {
                fencing: Fencing {
                    epoch: 3,
                    token: 42
                },
                owner: "me".into(),
                lease_expires_at: Timestamp(1_000)
            }
        );
        assert_eq!(store_key(&item).unwrap(), StoreKey([1; 32]));
        let mut done = item.clone();
        let outcome = Outcome::Response(StoredResponse::new(201, vec![], "ok"));
        done.insert("st".into(), n(2));
        done.insert("at".into(), n(20));
        done.insert("out".into(), b(outcome.encode()));
        assert!(matches!(
            decode(&done).unwrap().state,
            RecordState::Completed { epoch: 3, outcome: ref o, .. } if *o == outcome
        ));
        for (name, bad) in [
            ("st", n(99)),
            ("v", n(2)),
            ("ep", s("x")),
            ("tok", b(vec![0; 3])),
            ("fp", b(vec![])),
        ] {
            let mut broken = item.clone();
            broken.insert(name.into(), bad);
            let err = decode(&broken).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{name}");
        }
        let mut no_expiry = item.clone();
        no_expiry.remove("ex");
        assert_eq!(decode(&no_expiry).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn a_head_recognises_its_own_landed_writes_only() {
        let f = Fencing {
            epoch: 3,
            token: 42,
        };
        let head = Head::of(&in_flight());
        assert!(head.held_by(f, Timestamp(4_999)));
        assert!(!head.held_by(f, Timestamp(5_000)), "expiry is exclusive");
        assert!(!head.held_by(Fencing { epoch: 4, ..f }, Timestamp(0)));
        assert!(!head.written_by(7), "no call wrote it");
        let mut done = in_flight();
        done.insert("st".into(), n(ST_COMPLETED));
        done.insert("wid".into(), token_value(7));
        let head = Head::of(&done);
        assert!(head.written_by(7));
        assert!(!head.written_by(8));
        assert!(Head::default().live(Timestamp(u64::MAX)));
    }

    #[test]
    fn the_ttl_attribute_never_ends_a_record_early() {
        assert_eq!(ttl_seconds(Timestamp(0)), 0);
        assert_eq!(ttl_seconds(Timestamp(1)), 1);
        assert_eq!(ttl_seconds(Timestamp(1_000)), 1);
        assert_eq!(ttl_seconds(Timestamp(1_001)), 2);
    }
}
