//! The pure decision on what a claim found: no store, no runtime, no clock but the store's `now`.

use std::time::Duration;

use super::{Execution, Policy, Recovery};
use crate::clock::Timestamp;
use crate::fingerprint::Fingerprint;
use crate::record::{Fencing, Outcome, Record, RecordState};

/// An answer found in the store, without running anything.
#[derive(Debug)]
pub(super) enum Found {
    Replayed {
        outcome: Outcome,
        record: Box<Record>,
    },
    Mismatch {
        record: Box<Record>,
    },
    Unknown {
        record: Box<Record>,
    },
}

impl Found {
    pub(super) fn into_execution<T>(self) -> Execution<T> {
        match self {
            Found::Replayed { outcome, record } => Execution::Replayed { outcome, record },
            Found::Mismatch { record } => Execution::Mismatch { record },
            Found::Unknown { record } => Execution::Unknown { record },
        }
    }
}

/// What to do next.
#[derive(Debug)]
pub(super) enum Step {
    /// Answer with what the store holds.
    Answer(Found),
    /// The holder's lease expired (or an operator revoked it): take the key over, then run
    /// (takeover) or mark it outcome-unknown (strict).
    TakeOver { holder: Fencing, recovery: Recovery },
    /// The holder is alive: wait (or answer in flight), its lease runs this much longer.
    Wait { lease_left: Duration },
}

/// Decides from the record a claim found and the store's clock at that read.
///
/// - another fingerprint, in any state → mismatch (422), never a replay (G6-adjacent: a key
///   reused with another request never sees the first one's answer);
/// - completed → replay; outcome-unknown → unknown (never re-run, G3);
/// - in flight with an expired lease → take over (G4), under the route's recovery — except a
///   record an operator revoked (forced delete), which asked for a new run: always takeover;
/// - in flight otherwise → wait for the holder (G1: never a second dispatch while it renews).
pub(super) fn decide(
    record: Record,
    now: Timestamp,
    fingerprint: Fingerprint,
    policy: &Policy,
) -> Step {
    if record.fingerprint != fingerprint {
        return Step::Answer(Found::Mismatch {
            record: Box::new(record),
        });
    }
    let (holder, lease_expires_at) = match &record.state {
        RecordState::Completed { outcome, .. } => {
            return Step::Answer(Found::Replayed {
                outcome: outcome.clone(),
                record: Box::new(record),
            });
        }
        RecordState::Unknown { .. } => {
            return Step::Answer(Found::Unknown {
                record: Box::new(record),
            });
        }
        RecordState::InFlight {
            fencing,
            lease_expires_at,
            ..
        } => (*fencing, *lease_expires_at),
    };
    if now >= lease_expires_at {
        let recovery = if holder.is_revoked() {
            Recovery::Takeover
        } else {
            policy.recovery
        };
        return Step::TakeOver { holder, recovery };
    }
    Step::Wait {
        lease_left: lease_expires_at.since(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Algorithm;
    use crate::record::StoredResponse;

    fn fp(b: u8) -> Fingerprint {
        Fingerprint::from_parts(Algorithm::Blake3, [b; 32])
    }

    fn record(state: RecordState) -> Record {
        Record {
            namespace: "n".into(),
            scope: "s".into(),
            idempotency_key: "k".into(),
            fingerprint: fp(1),
            created_at: Timestamp(0),
            expires_at: Timestamp(100_000),
            state,
        }
    }

    fn in_flight(token: u128, lease_until: u64) -> Record {
        record(RecordState::InFlight {
            fencing: Fencing { epoch: 3, token },
            owner: "o".into(),
            lease_expires_at: Timestamp(lease_until),
        })
    }

    #[test]
    fn another_fingerprint_is_a_mismatch_in_every_state() {
        let done = record(RecordState::Completed {
            epoch: 1,
            completed_at: Timestamp(1),
            outcome: Outcome::Response(StoredResponse::new(200, vec![], "x")),
        });
        for r in [
            done,
            in_flight(7, 10),
            record(RecordState::Unknown {
                epoch: 1,
                since: Timestamp(1),
            }),
        ] {
            let step = decide(r, Timestamp(5), fp(2), &Policy::default());
            assert!(
                matches!(step, Step::Answer(Found::Mismatch { .. })),
                "{step:?}"
            );
        }
    }

    #[test]
    fn a_live_holder_is_waited_for_and_an_expired_one_taken_over() {
        let step = decide(
            in_flight(7, 1_000),
            Timestamp(400),
            fp(1),
            &Policy::default(),
        );
        assert!(
            matches!(step, Step::Wait { lease_left } if lease_left == Duration::from_millis(600))
        );
        let strict = Policy {
            recovery: Recovery::Strict,
            ..Policy::default()
        };
        let step = decide(in_flight(7, 1_000), Timestamp(1_000), fp(1), &strict);
        assert!(matches!(
            step,
            Step::TakeOver {
                holder: Fencing { epoch: 3, token: 7 },
                recovery: Recovery::Strict
            }
        ));
    }

    #[test]
    fn a_revoked_record_is_taken_over_even_under_strict_recovery() {
        let strict = Policy {
            recovery: Recovery::Strict,
            ..Policy::default()
        };
        let step = decide(
            in_flight(Fencing::REVOKED, 500),
            Timestamp(500),
            fp(1),
            &strict,
        );
        assert!(matches!(
            step,
            Step::TakeOver {
                recovery: Recovery::Takeover,
                ..
            }
        ));
    }

    #[test]
    fn unknown_is_never_rerun_and_completed_is_replayed() {
        let step = decide(
            record(RecordState::Unknown {
                epoch: 1,
                since: Timestamp(1),
            }),
            Timestamp(5),
            fp(1),
            &Policy::default(),
        );
        assert!(matches!(step, Step::Answer(Found::Unknown { .. })));
        let done = record(RecordState::Completed {
            epoch: 2,
            completed_at: Timestamp(1),
            outcome: Outcome::Response(StoredResponse::new(201, vec![], "body")),
        });
        let step = decide(done, Timestamp(5), fp(1), &Policy::default());
        assert!(matches!(step, Step::Answer(Found::Replayed { .. })));
    }
}
