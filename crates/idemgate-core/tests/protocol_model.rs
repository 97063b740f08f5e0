//! Exhaustive model check (stateright) of the claim / renew / complete / take_over protocol as
//! implemented by `idemgate_core::protocol` — the very functions the memory and redb stores run.
//!
//! Holders act in any order and at any time (arbitrary delays: a holder may act long after its lease
//! ran out), may crash at any point, and time advances in ticks. Within the bounds below, every
//! reachable state is visited and these properties are checked:
//!
//! - at most one holder is ever granted a given epoch of one incarnation of the record;
//! - a completed record never changes;
//! - a stale holder never writes over a newer epoch (no compare-and-set by an older epoch succeeds
//!   once a newer epoch was granted);
//! - a holder revoked by an operator (forced delete) never writes again;
//! - and, to show the model is not vacuous, takeovers, stale-holder attempts and completions after
//!   a takeover are each reachable (and, with operators, revocations and their takeovers).
//!
//! Two widened configurations add what the hardening issue found just outside the original model:
//! operators' deletes in every mode (finished only, outcome-unknown only, forced revocation) at
//! any moment, and records that expire within the bounds with a sweeper purging them at any
//! moment (so that claims of expired keys race purges). A third adds recording retries: a
//! completion the store applied but whose answer the holder never heard, followed by the
//! holder's retry (complete again, mark unknown, release) beside takeovers and deletes. A
//! fourth runs one instance's local replay cache (`idemgate_core::cache`, as an algorithm: copy,
//! delete generation, reads that remember only if the generation held) with operators' deletes
//! through it racing its reads: once a delete returned, no replay comes from a copy of what it
//! deleted. (Breaking the generation check makes the checker find the counterexample.) A fifth
//! has an operator complete outcome-unknown records ("it did happen, here is its answer") from a
//! marking read at any earlier moment, beside expiry, reclaims and takeovers: the completion lands
//! only on the marking the operator read, and a completed record still never changes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::ptr_arg)]

use std::time::Duration;

use idemgate_core::clock::Timestamp;
use idemgate_core::fingerprint::{Algorithm, Fingerprint};
use idemgate_core::protocol::{self, Write};
use idemgate_core::record::{Fencing, Outcome, Record, RecordState, StoredResponse};
use idemgate_core::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, ResolveOutcome,
    TakeOverOutcome, TakeOverRequest, UnknownMark,
};
use stateright::{Checker, Model, Property};

const TICK: Duration = Duration::from_millis(1_000);
const LEASE_TICKS: u32 = 2;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Holder {
    Idle,
    /// Believes it holds `fencing` of the given incarnation (it may be stale without knowing).
    Holding(Fencing, u32),
    Done,
    Crashed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct State {
    now: u32,
    record: Option<Record>,
    holders: Vec<Holder>,
    /// Fresh claims so far (a release followed by a claim starts a new incarnation).
    incarnation: u32,
    /// (incarnation, epoch, holder) of every grant.
    grants: Vec<(u32, u64, usize)>,
    /// (incarnation, epoch, value) of the first completion of each incarnation.
    completions: Vec<(u32, u64, u8)>,
    /// Set if a compare-and-set by an epoch older than the newest grant succeeded.
    stale_write: bool,
    /// Set if an epoch was granted while the previous holder's lease was still live.
    early_takeover: bool,
    /// (incarnation, epoch) of every holder an operator revoked.
    revoked: Vec<(u32, u64)>,
    /// Set if a compare-and-set by a revoked holder succeeded.
    revoked_write: bool,
    /// Non-vacuity witnesses.
    saw_takeover: bool,
    saw_stale_attempt: bool,
    saw_revoked_takeover: bool,
    saw_purge: bool,
    saw_unheard: bool,
    /// The replay cache of one instance (`with_cache`).
    cache: CacheModel,
    /// The outcome-unknown marking an operator read, with the incarnation it belonged to.
    resolve_seen: Option<(UnknownMark, u32)>,
    /// Set if an operator's completion landed on another incarnation than the one it read.
    resolve_wrong: bool,
    saw_resolved: bool,
    saw_resolve_refused: bool,
}

/// A read that asked the store: (generation at its start, the completion it read, if any).
type PendingRead = (u32, Option<(u32, u8)>);

/// The local replay cache (`idemgate_core::cache`) of one instance, as an algorithm: a copy of
/// a completed record, a delete generation bumped before and after every delete made through
/// it, and reads that remember what they read only if the generation did not move meanwhile.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
struct CacheModel {
    /// The cached copy: (incarnation, value) of a completed record.
    copy: Option<(u32, u8)>,
    generation: u32,
    /// Per reader: a read that asked the store (generation at its start, what it read).
    reads: Vec<Option<PendingRead>>,
    /// A delete through the cache: 0 none, 1 begun (copy forgotten), 2 done in the store.
    deleting: u8,
    /// The completion the running delete removed from the store, if it removed one.
    removing: Option<u32>,
    /// Completions (incarnations) removed by deletes that have returned.
    deleted: Vec<u32>,
    deletes: u8,
    /// Set if a replay was served from a copy of a completion a returned delete removed.
    served_deleted: bool,
    saw_served: bool,
    saw_uncached_overlap: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Action {
    Claim(usize),
    TakeOver(usize),
    Renew(usize),
    Complete(usize),
    MarkUnknown(usize),
    Release(usize),
    Crash(usize),
    Tick,
    /// An operator's delete.
    Delete(DeleteMode),
    /// The sweeper removes the record if it has expired.
    Purge,
    /// A holder's completion that the store applied but whose answer was lost (a timeout): the
    /// holder does not know, keeps holding, and retries — complete again, mark unknown or
    /// release — as the engine's recording retries do.
    CompleteUnheard(usize),
    /// A replay lookup of reader `r` in the cache: served from the copy, or asks the store.
    CacheRead(usize),
    /// Reader `r`'s store answer arrives: remembered if the generation did not move.
    CacheRemember(usize),
    /// An operator's delete through the cache: forget, store delete, forget again.
    CacheDeleteBegin,
    CacheDeleteStore(DeleteMode),
    CacheDeleteEnd,
    /// An operator reads the record's outcome-unknown marking.
    ResolveSee,
    /// The operator completes the record it read (possibly long after reading it).
    ResolveComplete,
}

struct Protocol {
    holders: usize,
    max_ticks: u32,
    with_release: bool,
    with_admin: bool,
    /// Records live this many ticks (renewals extend them); `None`: never expire in bounds.
    ttl_ticks: Option<u32>,
    /// Completions may be applied unheard, and then retried (recording retries).
    with_unheard: bool,
    /// Readers of one instance's replay cache, and operators' deletes through it (at most 2).
    cache_readers: usize,
    /// An operator completes outcome-unknown records (`Store::complete_unknown`).
    with_resolve: bool,
}

const MAX_CACHE_DELETES: u8 = 2;

fn ts(tick: u32) -> Timestamp {
    Timestamp(1_000_000 + u64::from(tick) * 1_000)
}

fn token(holder: usize, incarnation: u32, epoch_hint: usize) -> u128 {
    ((holder as u128) << 64) | ((incarnation as u128) << 32) | epoch_hint as u128
}

fn apply(record: &mut Option<Record>, write: Write) {
    match write {
        Write::Unchanged => {}
        Write::Put(r) => *record = Some(r),
        Write::Delete => *record = None,
    }
}

impl State {
    fn newest_epoch(&self) -> u64 {
        self.grants
            .iter()
            .filter(|g| g.0 == self.incarnation)
            .map(|g| g.1)
            .max()
            .unwrap_or(0)
    }

    fn note_cas(&mut self, fencing: Fencing, incarnation: u32, applied: bool) {
        if applied && self.revoked.contains(&(incarnation, fencing.epoch)) {
            self.revoked_write = true;
        }
        let newest = self.newest_epoch();
        if incarnation < self.incarnation || fencing.epoch < newest {
            self.saw_stale_attempt = true;
            if applied {
                self.stale_write = true;
            }
        }
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            now: 0,
            record: None,
            holders: vec![Holder::Idle; self.holders],
            incarnation: 0,
            grants: Vec::new(),
            completions: Vec::new(),
            stale_write: false,
            early_takeover: false,
            revoked: Vec::new(),
            revoked_write: false,
            saw_takeover: false,
            saw_stale_attempt: false,
            saw_revoked_takeover: false,
            saw_purge: false,
            saw_unheard: false,
            cache: CacheModel {
                reads: vec![None; self.cache_readers],
                ..CacheModel::default()
            },
            resolve_seen: None,
            resolve_wrong: false,
            saw_resolved: false,
            saw_resolve_refused: false,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.now < self.max_ticks {
            actions.push(Action::Tick);
        }
        if self.with_admin && s.record.is_some() {
            actions.push(Action::Delete(DeleteMode::Finished));
            actions.push(Action::Delete(DeleteMode::Unknown));
            actions.push(Action::Delete(DeleteMode::Force));
        }
        if self.ttl_ticks.is_some() && s.record.is_some() {
            actions.push(Action::Purge);
        }
        if self.with_resolve {
            if s.resolve_seen.is_some() {
                actions.push(Action::ResolveComplete);
            } else if s.record.as_ref().and_then(UnknownMark::of).is_some() {
                actions.push(Action::ResolveSee);
            }
        }
        if self.cache_readers > 0 {
            for (r, read) in s.cache.reads.iter().enumerate() {
                actions.push(if read.is_none() {
                    Action::CacheRead(r)
                } else {
                    Action::CacheRemember(r)
                });
            }
            match s.cache.deleting {
                0 if s.cache.deletes < MAX_CACHE_DELETES && s.record.is_some() => {
                    actions.push(Action::CacheDeleteBegin);
                }
                1 => {
                    actions.push(Action::CacheDeleteStore(DeleteMode::Finished));
                    actions.push(Action::CacheDeleteStore(DeleteMode::Force));
                }
                2 => actions.push(Action::CacheDeleteEnd),
                _ => {}
            }
        }
        for (h, holder) in s.holders.iter().enumerate() {
            match holder {
                Holder::Idle => {
                    actions.push(Action::Claim(h));
                    if matches!(
                        &s.record,
                        Some(Record {
                            state: RecordState::InFlight { .. },
                            ..
                        })
                    ) {
                        actions.push(Action::TakeOver(h));
                    }
                }
                Holder::Holding(..) => {
                    actions.push(Action::Renew(h));
                    actions.push(Action::Complete(h));
                    actions.push(Action::MarkUnknown(h));
                    if self.with_release {
                        actions.push(Action::Release(h));
                    }
                    if self.with_unheard {
                        actions.push(Action::CompleteUnheard(h));
                    }
                    actions.push(Action::Crash(h));
                }
                Holder::Done | Holder::Crashed => {}
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        let now = ts(s.now);
        let lease = TICK * LEASE_TICKS;
        let ttl = TICK * self.ttl_ticks.unwrap_or(1_000); // 1,000: never expire within bounds
        match action {
            Action::Tick => s.now += 1,
            Action::Claim(h) => {
                let req = ClaimRequest {
                    namespace: "m".into(),
                    scope: "m".into(),
                    idempotency_key: "k".into(),
                    fingerprint: Fingerprint::from_parts(Algorithm::Blake3, [0; 32]),
                    token: token(h, s.incarnation + 1, 1),
                    owner: format!("h{h}"),
                    lease_ttl: lease,
                    ttl,
                };
                let (write, out) = protocol::claim(s.record.as_ref(), now, &req);
                apply(&mut s.record, write);
                match out {
                    ClaimOutcome::Acquired { fencing } => {
                        s.incarnation += 1;
                        s.grants.push((s.incarnation, fencing.epoch, h));
                        s.holders[h] = Holder::Holding(fencing, s.incarnation);
                    }
                    ClaimOutcome::Existing { .. } => return None,
                }
            }
            Action::TakeOver(h) => {
                let Some(Record {
                    state:
                        RecordState::InFlight {
                            fencing: seen,
                            lease_expires_at,
                            ..
                        },
                    ..
                }) = &s.record
                else {
                    return None;
                };
                let lease_was_live = now < *lease_expires_at;
                let req = TakeOverRequest {
                    expired: *seen,
                    token: token(h, s.incarnation, seen.epoch as usize + 1),
                    owner: format!("h{h}"),
                    lease_ttl: lease,
                };
                let (write, out) = protocol::take_over(s.record.as_ref(), now, &req);
                apply(&mut s.record, write);
                match out {
                    TakeOverOutcome::Acquired { fencing } => {
                        s.grants.push((s.incarnation, fencing.epoch, h));
                        s.holders[h] = Holder::Holding(fencing, s.incarnation);
                        s.saw_takeover = true;
                        s.saw_revoked_takeover |= req.expired.is_revoked();
                        s.early_takeover |= lease_was_live;
                    }
                    TakeOverOutcome::Refused { .. } => return None,
                }
            }
            Action::Renew(h) => {
                let Holder::Holding(f, inc) = s.holders[h] else {
                    return None;
                };
                let (write, out) = protocol::renew(s.record.as_ref(), now, f, lease);
                apply(&mut s.record, write);
                s.note_cas(f, inc, out == CasOutcome::Applied);
                if out == CasOutcome::Lost {
                    // It learns it lost; it may still (wrongly) try to complete: keep Holding.
                }
            }
            Action::Complete(h) => {
                let Holder::Holding(f, inc) = s.holders[h] else {
                    return None;
                };
                let outcome = Outcome::Response(StoredResponse::new(200, vec![], vec![h as u8]));
                let (write, out) = protocol::complete(s.record.as_ref(), now, f, &outcome, ttl);
                apply(&mut s.record, write);
                s.note_cas(f, inc, out == CasOutcome::Applied);
                if out == CasOutcome::Applied && !s.completions.iter().any(|c| c.0 == s.incarnation)
                {
                    s.completions.push((s.incarnation, f.epoch, h as u8));
                }
                s.holders[h] = Holder::Done;
            }
            Action::CompleteUnheard(h) => {
                let Holder::Holding(f, inc) = s.holders[h] else {
                    return None;
                };
                let outcome = Outcome::Response(StoredResponse::new(200, vec![], vec![h as u8]));
                let (write, out) = protocol::complete(s.record.as_ref(), now, f, &outcome, ttl);
                if out != CasOutcome::Applied {
                    return None; // a lost answer of a refused write is just a refusal
                }
                apply(&mut s.record, write);
                s.note_cas(f, inc, true);
                if !s.completions.iter().any(|c| c.0 == s.incarnation) {
                    s.completions.push((s.incarnation, f.epoch, h as u8));
                }
                s.saw_unheard = true;
                // Still Holding: its next step is a retry of the recording.
            }
            Action::CacheRead(r) => match s.cache.copy {
                Some((inc, _)) => {
                    s.cache.saw_served = true;
                    s.cache.served_deleted |= s.cache.deleted.contains(&inc);
                }
                None => {
                    let read = match &s.record {
                        Some(Record {
                            state:
                                RecordState::Completed {
                                    outcome: Outcome::Response(resp),
                                    ..
                                },
                            ..
                        }) => Some((s.incarnation, resp.body.first().copied().unwrap_or(0))),
                        _ => None,
                    };
                    s.cache.reads[r] = Some((s.cache.generation, read));
                }
            },
            Action::CacheRemember(r) => {
                let (generation, read) = s.cache.reads[r].take()?;
                if let Some(copy) = read {
                    if generation == s.cache.generation {
                        s.cache.copy = Some(copy);
                    } else {
                        s.cache.saw_uncached_overlap = true;
                    }
                }
            }
            Action::CacheDeleteBegin => {
                s.cache.generation += 1;
                s.cache.copy = None;
                s.cache.deleting = 1;
                s.cache.deletes += 1;
            }
            Action::CacheDeleteStore(mode) => {
                let completed = matches!(
                    &s.record,
                    Some(Record {
                        state: RecordState::Completed { .. },
                        ..
                    })
                );
                let (write, out) = protocol::delete(s.record.as_ref(), now, mode);
                apply(&mut s.record, write);
                if let DeleteOutcome::Revoked { epoch } = out {
                    s.revoked.push((s.incarnation, epoch));
                }
                if completed && out == DeleteOutcome::Deleted {
                    s.cache.removing = Some(s.incarnation);
                }
                s.cache.deleting = 2;
            }
            Action::CacheDeleteEnd => {
                s.cache.generation += 1;
                s.cache.copy = None;
                if let Some(inc) = s.cache.removing.take() {
                    s.cache.deleted.push(inc);
                }
                s.cache.deleting = 0;
            }
            Action::MarkUnknown(h) => {
                let Holder::Holding(f, inc) = s.holders[h] else {
                    return None;
                };
                let (write, out) = protocol::mark_unknown(s.record.as_ref(), now, f, ttl);
                apply(&mut s.record, write);
                s.note_cas(f, inc, out == CasOutcome::Applied);
                s.holders[h] = Holder::Done;
            }
            Action::Release(h) => {
                let Holder::Holding(f, inc) = s.holders[h] else {
                    return None;
                };
                let (write, out) = protocol::release(s.record.as_ref(), now, f);
                apply(&mut s.record, write);
                s.note_cas(f, inc, out == CasOutcome::Applied);
                s.holders[h] = Holder::Done;
            }
            Action::Crash(h) => s.holders[h] = Holder::Crashed,
            Action::Delete(mode) => {
                let (write, out) = protocol::delete(s.record.as_ref(), now, mode);
                apply(&mut s.record, write);
                match out {
                    DeleteOutcome::Revoked { epoch } => s.revoked.push((s.incarnation, epoch)),
                    DeleteOutcome::Refused { .. } => return None,
                    DeleteOutcome::Deleted | DeleteOutcome::Absent => {}
                }
            }
            Action::ResolveSee => {
                let mark = protocol::live(s.record.as_ref(), now).and_then(UnknownMark::of)?;
                s.resolve_seen = Some((mark, s.incarnation));
            }
            Action::ResolveComplete => {
                let (mark, inc) = s.resolve_seen.take()?;
                let outcome = Outcome::Response(StoredResponse::new(200, vec![], vec![77]));
                let (write, out) =
                    protocol::complete_unknown(s.record.as_ref(), now, mark, &outcome, ttl);
                apply(&mut s.record, write);
                match out {
                    ResolveOutcome::Completed => {
                        s.saw_resolved = true;
                        s.resolve_wrong |= inc != s.incarnation;
                        if !s.completions.iter().any(|c| c.0 == s.incarnation) {
                            s.completions.push((s.incarnation, mark.epoch, 77));
                        }
                    }
                    ResolveOutcome::Refused { .. } => {
                        s.saw_resolve_refused |= inc != s.incarnation;
                    }
                    ResolveOutcome::Absent => {}
                }
            }
            Action::Purge => {
                // What every store's purge does: remove the record only if it has expired.
                if s.record.is_none() || protocol::live(s.record.as_ref(), now).is_some() {
                    return None;
                }
                s.record = None;
                s.saw_purge = true;
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut properties = vec![
            Property::always("at most one holder per epoch", |_, s: &State| {
                let mut seen = s.grants.iter().map(|g| (g.0, g.1)).collect::<Vec<_>>();
                seen.sort_unstable();
                seen.windows(2).all(|w| w[0] != w[1])
            }),
            // Until it is removed (expiry, an operator's delete): a claim after that starts a
            // new incarnation.
            Property::always("a completed record never changes", |_, s: &State| {
                match s.completions.iter().find(|c| c.0 == s.incarnation) {
                    None => true,
                    Some(_) if s.record.is_none() => true,
                    Some(&(_, epoch, value)) => matches!(
                        &s.record,
                        Some(Record { state: RecordState::Completed { epoch: e, outcome: Outcome::Response(r), .. }, .. })
                            if *e == epoch && r.body.as_ref() == [value]
                    ),
                }
            }),
            Property::always(
                "a stale holder never overwrites a newer epoch",
                |_, s: &State| !s.stale_write,
            ),
            Property::always(
                "a new epoch opens only after the lease expired",
                |_, s: &State| !s.early_takeover,
            ),
            Property::always("a revoked holder never writes", |_, s: &State| {
                !s.revoked_write
            }),
            Property::sometimes("a takeover happens", |_, s: &State| s.saw_takeover),
            Property::sometimes("a stale holder tries to write", |_, s: &State| {
                s.saw_stale_attempt
            }),
            Property::sometimes("an epoch-2 completion happens", |_, s: &State| {
                s.completions.iter().any(|c| c.1 == 2)
            }),
        ];
        if self.with_admin {
            properties.push(Property::sometimes(
                "a revoked record is taken over",
                |_, s: &State| s.saw_revoked_takeover,
            ));
        }
        if self.with_unheard {
            properties.push(Property::sometimes(
                "a completion applied unheard is retried",
                |_, s: &State| {
                    s.saw_unheard && s.holders.iter().all(|h| !matches!(h, Holder::Holding(..)))
                },
            ));
        }
        if self.cache_readers > 0 {
            properties.push(Property::always(
                "no replay is served from a copy of a deleted record",
                |_, s: &State| !s.cache.served_deleted,
            ));
            properties.push(Property::sometimes(
                "a replay is served from the cache",
                |_, s: &State| s.cache.saw_served,
            ));
            properties.push(Property::sometimes(
                "a read that overlapped a delete is not cached",
                |_, s: &State| s.cache.saw_uncached_overlap,
            ));
        }
        if self.with_resolve {
            properties.push(Property::always(
                "an operator's completion lands only on the marking it read",
                |_, s: &State| !s.resolve_wrong,
            ));
            properties.push(Property::sometimes(
                "an operator completes an outcome-unknown record",
                |_, s: &State| s.saw_resolved,
            ));
            properties.push(Property::sometimes(
                "an operator's completion of an older marking is refused",
                |_, s: &State| s.saw_resolve_refused,
            ));
        }
        if self.ttl_ticks.is_some() {
            properties.push(Property::sometimes(
                "an expired record is purged",
                |_, s: &State| s.saw_purge,
            ));
        }
        properties
    }
}

/// Explores every state of `model` and checks its properties; returns the state count.
fn check(model: Protocol) -> usize {
    let checker = model.checker().spawn_bfs().join();
    checker.assert_properties();
    eprintln!("explored {} unique states", checker.unique_state_count());
    checker.unique_state_count()
}

#[test]
fn protocol_is_safe_with_crashes_and_arbitrary_delays() {
    let states = check(Protocol {
        holders: 4,
        max_ticks: 8,
        with_release: false,
        with_admin: false,
        ttl_ticks: None,
        with_unheard: false,
        cache_readers: 0,
        with_resolve: false,
    });
    assert!(states > 10_000, "explored {states}");
}

#[test]
fn protocol_is_safe_with_releases_and_reclaims() {
    check(Protocol {
        holders: 4,
        max_ticks: 6,
        with_release: true,
        with_admin: false,
        ttl_ticks: None,
        with_unheard: false,
        cache_readers: 0,
        with_resolve: false,
    });
}

#[test]
fn protocol_is_safe_with_operators_deleting_and_revoking_at_any_moment() {
    check(Protocol {
        holders: 3,
        max_ticks: 5,
        with_release: true,
        with_admin: true,
        ttl_ticks: None,
        with_unheard: false,
        cache_readers: 0,
        with_resolve: false,
    });
}

#[test]
fn protocol_is_safe_with_expiring_records_and_a_sweeper_at_any_moment() {
    check(Protocol {
        holders: 3,
        max_ticks: 6,
        with_release: true,
        with_admin: false,
        ttl_ticks: Some(3),
        with_unheard: false,
        cache_readers: 0,
        with_resolve: false,
    });
}

/// Recording retries: a completion the store applied but whose answer the holder never heard is
/// retried (complete again, mark unknown, release), beside takeovers, releases and an operator's
/// deletes. A retry must never change the stored outcome nor free the key.
#[test]
fn protocol_is_safe_with_recording_retries_after_unheard_completions() {
    check(Protocol {
        holders: 2,
        max_ticks: 5,
        with_release: true,
        with_admin: true,
        ttl_ticks: None,
        with_unheard: true,
        cache_readers: 0,
        with_resolve: false,
    });
}

/// The local replay cache with operators' deletes through it racing its reads: once a delete has
/// returned, no replay is served from a copy of what it deleted (a read that began before the
/// delete does not put its copy back).
#[test]
fn protocol_is_safe_with_a_replay_cache_and_deletes_racing_its_reads() {
    check(Protocol {
        holders: 2,
        max_ticks: 4,
        with_release: false,
        with_admin: false,
        ttl_ticks: None,
        with_unheard: false,
        cache_readers: 1,
        with_resolve: false,
    });
}

/// An operator completes outcome-unknown records from a marking read at any earlier moment,
/// beside expiry (and a sweeper), reclaims, releases and takeovers: the completion lands only on
/// the marking read (never on a later incarnation's), and a completed record never changes.
#[test]
fn protocol_is_safe_with_operators_completing_outcome_unknown_records() {
    check(Protocol {
        holders: 2,
        max_ticks: 7,
        with_release: true,
        with_admin: false,
        ttl_ticks: Some(2),
        with_unheard: false,
        cache_readers: 0,
        with_resolve: true,
    });
}
