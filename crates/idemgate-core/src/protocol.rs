//! The record state machine as pure functions: `(current record, now, request) → (write, outcome)`.
//!
//! Stores without server-side scripting (memory, redb) run these inside their atomic section (a
//! shard mutex, a write transaction), so the protocol is written once. Redis (Lua) and PostgreSQL
//! (SQL) implement the same transitions natively; the conformance suite holds all of them to it,
//! and the exhaustive model check (`tests/protocol_model.rs`) explores these functions directly.
//!
//! ```
//! use std::time::Duration;
//! use idemgate_core::protocol::{self, Write};
//! use idemgate_core::store::{ClaimOutcome, ClaimRequest};
//! use idemgate_core::{fingerprint::Algorithm, Fingerprint, Timestamp};
//!
//! let req = ClaimRequest {
//!     namespace: "ns".into(), scope: "s".into(), idempotency_key: "k".into(),
//!     fingerprint: Fingerprint::from_parts(Algorithm::Blake3, [0; 32]),
//!     token: 1, owner: "me".into(),
//!     lease_ttl: Duration::from_secs(10), ttl: Duration::from_secs(60),
//! };
//! let (write, outcome) = protocol::claim(None, Timestamp(0), &req);
//! assert!(matches!(outcome, ClaimOutcome::Acquired { .. }));
//! let Write::Put(record) = write else { unreachable!() };
//! let (write, outcome) = protocol::claim(Some(&record), Timestamp(1), &req);
//! assert_eq!(write, Write::Unchanged);
//! assert!(matches!(outcome, ClaimOutcome::Existing { .. }));
//! ```

use std::time::Duration;

use crate::clock::Timestamp;
use crate::error::StoreError;
use crate::record::{Fencing, MAX_BODY_LEN, Outcome, Record, RecordState};
use crate::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, ResolveOutcome,
    TakeOverOutcome, TakeOverRequest, UnknownMark,
};

/// What the store must do to the stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // consumed at once by the store; boxing would only add an allocation
pub enum Write {
    /// Nothing.
    Unchanged,
    /// Store this record (replacing any).
    Put(Record),
    /// Remove the record.
    Delete,
}

/// The record if it exists and has not expired at `now`.
pub fn live(current: Option<&Record>, now: Timestamp) -> Option<&Record> {
    current.filter(|r| !r.is_expired(now))
}

/// The live in-flight record with exactly `fencing`. A revoked fencing is held by nobody (every
/// compare-and-set with it fails); [`take_over`] alone matches it, through [`in_flight_with`].
fn held(current: Option<&Record>, now: Timestamp, fencing: Fencing) -> Option<&Record> {
    in_flight_with(current, now, fencing).filter(|_| !fencing.is_revoked())
}

fn in_flight_with(current: Option<&Record>, now: Timestamp, fencing: Fencing) -> Option<&Record> {
    live(current, now)
        .filter(|r| matches!(r.state, RecordState::InFlight { fencing: f, .. } if f == fencing))
}

/// See [`Store::claim`](crate::Store::claim).
pub fn claim(
    current: Option<&Record>,
    now: Timestamp,
    req: &ClaimRequest,
) -> (Write, ClaimOutcome) {
    // A free key with an epoch floor (released, or revoked by an operator) is claimed at the
    // next epoch, whatever its fingerprint: an epoch the upstream may have seen is never reused.
    let floor = match live(current, now) {
        Some(record) => match free_epoch(record, now) {
            Some(epoch) => epoch,
            None => {
                return (
                    Write::Unchanged,
                    ClaimOutcome::Existing {
                        record: record.clone(),
                        now,
                    },
                );
            }
        },
        None => 0,
    };
    let fencing = Fencing {
        epoch: floor + 1,
        token: req.token,
    };
    let lease_expires_at = now.after(req.lease_ttl);
    let record = Record {
        namespace: req.namespace.clone(),
        scope: req.scope.clone(),
        idempotency_key: req.idempotency_key.clone(),
        fingerprint: req.fingerprint,
        created_at: now,
        expires_at: now.after(req.ttl).max(lease_expires_at),
        state: RecordState::InFlight {
            fencing,
            owner: req.owner.clone(),
            lease_expires_at,
        },
    };
    (Write::Put(record), ClaimOutcome::Acquired { fencing })
}

/// See [`Store::renew`](crate::Store::renew).
pub fn renew(
    current: Option<&Record>,
    now: Timestamp,
    fencing: Fencing,
    lease_ttl: Duration,
) -> (Write, CasOutcome) {
    let Some(record) = held(current, now, fencing) else {
        return (Write::Unchanged, CasOutcome::Lost);
    };
    let mut next = record.clone();
    let new_lease = now.after(lease_ttl);
    if let RecordState::InFlight {
        lease_expires_at, ..
    } = &mut next.state
    {
        *lease_expires_at = new_lease;
    }
    next.expires_at = next.expires_at.max(new_lease);
    (Write::Put(next), CasOutcome::Applied)
}

/// See [`Store::complete`](crate::Store::complete). Call [`check_outcome`] first.
pub fn complete(
    current: Option<&Record>,
    now: Timestamp,
    fencing: Fencing,
    outcome: &Outcome,
    ttl: Duration,
) -> (Write, CasOutcome) {
    finish(current, now, fencing, ttl, |epoch| RecordState::Completed {
        epoch,
        completed_at: now,
        outcome: outcome.clone(),
    })
}

/// See [`Store::mark_unknown`](crate::Store::mark_unknown).
pub fn mark_unknown(
    current: Option<&Record>,
    now: Timestamp,
    fencing: Fencing,
    ttl: Duration,
) -> (Write, CasOutcome) {
    finish(current, now, fencing, ttl, |epoch| RecordState::Unknown {
        epoch,
        since: now,
    })
}

fn finish(
    current: Option<&Record>,
    now: Timestamp,
    fencing: Fencing,
    ttl: Duration,
    state: impl FnOnce(u64) -> RecordState,
) -> (Write, CasOutcome) {
    let Some(record) = held(current, now, fencing) else {
        return (Write::Unchanged, CasOutcome::Lost);
    };
    let mut next = record.clone();
    next.state = state(fencing.epoch);
    next.expires_at = now.after(ttl);
    (Write::Put(next), CasOutcome::Applied)
}

/// See [`Store::release`](crate::Store::release): the record becomes a free key with an epoch
/// floor ([`free_epoch`]), so that the next claim runs at the next epoch.
pub fn release(current: Option<&Record>, now: Timestamp, fencing: Fencing) -> (Write, CasOutcome) {
    match held(current, now, fencing) {
        Some(record) => (
            Write::Put(freed(record, now, RELEASED_OWNER)),
            CasOutcome::Applied,
        ),
        None => (Write::Unchanged, CasOutcome::Lost),
    }
}

/// The owner name a released record carries.
pub const RELEASED_OWNER: &str = "released";

/// `record` as a free key with its epoch as the floor: in flight under the token nobody holds
/// ([`Fencing::REVOKED`]), its lease over now.
fn freed(record: &Record, now: Timestamp, owner: &str) -> Record {
    let mut next = record.clone();
    if let RecordState::InFlight {
        fencing,
        owner: o,
        lease_expires_at,
    } = &mut next.state
    {
        fencing.token = Fencing::REVOKED;
        *o = owner.to_owned();
        *lease_expires_at = now;
    }
    next
}

/// The epoch of a free key (released, or revoked by an operator: in flight under
/// [`Fencing::REVOKED`] with its lease over), `None` for any other record. A claim of a free key
/// acquires it at the next epoch, whatever its fingerprint.
pub fn free_epoch(record: &Record, now: Timestamp) -> Option<u64> {
    match &record.state {
        RecordState::InFlight {
            fencing,
            lease_expires_at,
            ..
        } if fencing.is_revoked() && now >= *lease_expires_at => Some(fencing.epoch),
        _ => None,
    }
}

/// See [`Store::take_over`](crate::Store::take_over).
pub fn take_over(
    current: Option<&Record>,
    now: Timestamp,
    req: &TakeOverRequest,
) -> (Write, TakeOverOutcome) {
    let refused = |current: Option<&Record>| {
        (
            Write::Unchanged,
            TakeOverOutcome::Refused {
                current: live(current, now).cloned(),
                now,
            },
        )
    };
    let Some(record) = in_flight_with(current, now, req.expired) else {
        return refused(current);
    };
    let RecordState::InFlight {
        lease_expires_at, ..
    } = record.state
    else {
        return refused(current);
    };
    if now < lease_expires_at {
        return refused(current);
    }
    let fencing = Fencing {
        epoch: req.expired.epoch + 1,
        token: req.token,
    };
    let new_lease = now.after(req.lease_ttl);
    let mut next = record.clone();
    next.state = RecordState::InFlight {
        fencing,
        owner: req.owner.clone(),
        lease_expires_at: new_lease,
    };
    next.expires_at = next.expires_at.max(new_lease);
    (Write::Put(next), TakeOverOutcome::Acquired { fencing })
}

/// See [`Store::delete`](crate::Store::delete).
pub fn delete(
    current: Option<&Record>,
    now: Timestamp,
    mode: DeleteMode,
) -> (Write, DeleteOutcome) {
    let Some(record) = live(current, now) else {
        let write = if current.is_some() {
            Write::Delete
        } else {
            Write::Unchanged
        };
        return (write, DeleteOutcome::Absent);
    };
    let refused = || {
        (
            Write::Unchanged,
            DeleteOutcome::Refused {
                current: Box::new(record.clone()),
            },
        )
    };
    match (&record.state, mode) {
        // A revoked record has no holder left to fence: it goes.
        (RecordState::InFlight { fencing, .. }, DeleteMode::Finished | DeleteMode::Force)
            if fencing.is_revoked() =>
        {
            (Write::Delete, DeleteOutcome::Deleted)
        }
        (RecordState::InFlight { fencing, .. }, DeleteMode::Force) => {
            let epoch = fencing.epoch;
            (
                Write::Put(freed(record, now, REVOKED_OWNER)),
                DeleteOutcome::Revoked { epoch },
            )
        }
        (RecordState::InFlight { .. }, _) => refused(),
        // Force revokes only: an outcome that landed meanwhile (the operator saw it in flight)
        // is kept, so a retry replays it instead of running again.
        (_, DeleteMode::Force) => refused(),
        (RecordState::Completed { .. }, DeleteMode::Unknown) => refused(),
        _ => (Write::Delete, DeleteOutcome::Deleted),
    }
}

/// See [`Store::complete_unknown`](crate::Store::complete_unknown). Call [`check_outcome`]
/// first.
pub fn complete_unknown(
    current: Option<&Record>,
    now: Timestamp,
    expected: UnknownMark,
    outcome: &Outcome,
    ttl: Duration,
) -> (Write, ResolveOutcome) {
    let Some(record) = live(current, now) else {
        let write = if current.is_some() {
            Write::Delete
        } else {
            Write::Unchanged
        };
        return (write, ResolveOutcome::Absent);
    };
    if UnknownMark::of(record) != Some(expected) {
        return (
            Write::Unchanged,
            ResolveOutcome::Refused {
                current: Box::new(record.clone()),
            },
        );
    }
    let mut next = record.clone();
    next.state = RecordState::Completed {
        epoch: expected.epoch,
        completed_at: now,
        outcome: outcome.clone(),
    };
    next.expires_at = now.after(ttl);
    (Write::Put(next), ResolveOutcome::Completed)
}

/// The owner name a revoked in-flight record carries.
pub const REVOKED_OWNER: &str = "revoked by an operator";

/// Refuses outcomes whose body exceeds [`MAX_BODY_LEN`] with a `Capacity` error.
pub fn check_outcome(outcome: &Outcome) -> Result<(), StoreError> {
    match outcome {
        Outcome::Response(r) if r.payload_len() > MAX_BODY_LEN => {
            Err(StoreError::value_too_large(format!(
                "response of {} bytes exceeds the record limit of {MAX_BODY_LEN} bytes",
                r.payload_len()
            )))
        }
        _ => Ok(()),
    }
}

/// One mutating [`Store`](crate::Store) operation as a value, for stores that queue operations to
/// a single writer (redb, fjall) and apply them later with [`apply`].
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // queued once per operation; boxing would only add an allocation
pub enum Mutation {
    /// [`Store::claim`](crate::Store::claim).
    Claim(ClaimRequest),
    /// [`Store::renew`](crate::Store::renew): the fencing and the new lease.
    Renew(Fencing, Duration),
    /// [`Store::complete`](crate::Store::complete): the fencing, the outcome and its TTL.
    Complete(Fencing, Outcome, Duration),
    /// [`Store::mark_unknown`](crate::Store::mark_unknown): the fencing and the TTL.
    MarkUnknown(Fencing, Duration),
    /// [`Store::release`](crate::Store::release).
    Release(Fencing),
    /// [`Store::take_over`](crate::Store::take_over).
    TakeOver(TakeOverRequest),
    /// [`Store::delete`](crate::Store::delete).
    Delete(DeleteMode),
    /// [`Store::complete_unknown`](crate::Store::complete_unknown): the mark, outcome and TTL.
    CompleteUnknown(UnknownMark, Outcome, Duration),
}

/// What [`apply`] answers, one variant per outcome type of the [`Store`](crate::Store) methods.
#[derive(Clone, Debug)]
pub enum Answer {
    /// For [`Mutation::Claim`].
    Claim(ClaimOutcome),
    /// For renew, complete, mark-unknown and release.
    Cas(CasOutcome),
    /// For [`Mutation::TakeOver`].
    TakeOver(TakeOverOutcome),
    /// For [`Mutation::Delete`].
    Delete(DeleteOutcome),
    /// For [`Mutation::CompleteUnknown`].
    Resolve(ResolveOutcome),
}

fn wrong_answer() -> StoreError {
    StoreError::new(
        crate::error::ErrorKind::Internal,
        "the store's writer answered with the wrong outcome type",
    )
}

impl Answer {
    /// The claim outcome, or an internal error if this answers another operation.
    pub fn claim(self) -> Result<ClaimOutcome, StoreError> {
        match self {
            Answer::Claim(o) => Ok(o),
            _ => Err(wrong_answer()),
        }
    }

    /// The compare-and-set outcome, or an internal error if this answers another operation.
    pub fn cas(self) -> Result<CasOutcome, StoreError> {
        match self {
            Answer::Cas(o) => Ok(o),
            _ => Err(wrong_answer()),
        }
    }

    /// The take-over outcome, or an internal error if this answers another operation.
    pub fn take_over(self) -> Result<TakeOverOutcome, StoreError> {
        match self {
            Answer::TakeOver(o) => Ok(o),
            _ => Err(wrong_answer()),
        }
    }

    /// The delete outcome, or an internal error if this answers another operation.
    pub fn delete(self) -> Result<DeleteOutcome, StoreError> {
        match self {
            Answer::Delete(o) => Ok(o),
            _ => Err(wrong_answer()),
        }
    }

    /// The resolve outcome, or an internal error if this answers another operation.
    pub fn resolve(self) -> Result<ResolveOutcome, StoreError> {
        match self {
            Answer::Resolve(o) => Ok(o),
            _ => Err(wrong_answer()),
        }
    }
}

/// [`apply`] to a record as stored: `stored` (the bytes under the key, if any) is decoded first.
/// Bytes that do not decode fail the mutation with a `Corrupt` error, except a delete, which
/// removes them in any mode: administrators can always remove a rotten record. Returns the
/// decoded current record too (a store keeping an expiry index removes its entry).
#[allow(clippy::type_complexity)]
pub fn apply_stored(
    mutation: &Mutation,
    stored: Option<&[u8]>,
    now: Timestamp,
) -> Result<(Option<Record>, Write, Answer), StoreError> {
    let current = match stored.map(Record::decode).transpose() {
        Ok(current) => current,
        Err(_) if matches!(mutation, Mutation::Delete(_)) => {
            return Ok((None, Write::Delete, Answer::Delete(DeleteOutcome::Deleted)));
        }
        Err(e) => return Err(StoreError::from(e)),
    };
    let (write, answer) = apply(mutation, current.as_ref(), now);
    Ok((current, write, answer))
}

/// Runs `mutation` against the current record: the single dispatch of every transition above.
pub fn apply(mutation: &Mutation, current: Option<&Record>, now: Timestamp) -> (Write, Answer) {
    match mutation {
        Mutation::Claim(req) => {
            let (w, o) = claim(current, now, req);
            (w, Answer::Claim(o))
        }
        Mutation::Renew(f, lease) => {
            let (w, o) = renew(current, now, *f, *lease);
            (w, Answer::Cas(o))
        }
        Mutation::Complete(f, outcome, ttl) => {
            let (w, o) = complete(current, now, *f, outcome, *ttl);
            (w, Answer::Cas(o))
        }
        Mutation::MarkUnknown(f, ttl) => {
            let (w, o) = mark_unknown(current, now, *f, *ttl);
            (w, Answer::Cas(o))
        }
        Mutation::Release(f) => {
            let (w, o) = release(current, now, *f);
            (w, Answer::Cas(o))
        }
        Mutation::TakeOver(req) => {
            let (w, o) = take_over(current, now, req);
            (w, Answer::TakeOver(o))
        }
        Mutation::Delete(mode) => {
            let (w, o) = delete(current, now, *mode);
            (w, Answer::Delete(o))
        }
        Mutation::CompleteUnknown(mark, outcome, ttl) => {
            let (w, o) = complete_unknown(current, now, *mark, outcome, *ttl);
            (w, Answer::Resolve(o))
        }
    }
}
