//! Model-based property test: random operation sequences (and clock jumps, where the clock is
//! controlled) run against a store and against a small reference model written independently of
//! [`protocol`](crate::protocol); every answer and every record must agree.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

use super::{Harness, claim_request, fresh_key, fresh_token};
use crate::key::StoreKey;
use crate::record::{Fencing, Outcome, Record, RecordState, StoredResponse};
use crate::store::{
    CasOutcome, ClaimOutcome, DeleteMode, DeleteOutcome, ResolveOutcome, Store, TakeOverOutcome,
    TakeOverRequest, UnknownMark,
};

const KEYS: usize = 3;
const LEASE_MS: u64 = 1_000;
const TTL_MS: u64 = 3_000;
const UNKNOWN_TTL_MS: u64 = 2_000;

/// One step of a generated sequence. Key and holder numbers are reduced modulo what exists.
#[derive(Clone, Debug)]
#[allow(missing_docs)]
pub enum Op {
    /// Claim key `k` with fingerprint byte `fp`.
    Claim { k: usize, fp: u8 },
    /// Renew with the `h`-th fencing ever granted on `k`.
    Renew { k: usize, h: usize },
    /// Complete with body `[body]`.
    Complete { k: usize, h: usize, body: u8 },
    /// Mark outcome-unknown.
    MarkUnknown { k: usize, h: usize },
    /// Release.
    Release { k: usize, h: usize },
    /// Take over from the `h`-th fencing.
    TakeOver { k: usize, h: usize },
    /// Administrative delete: mode 0 finished only, 1 outcome-unknown only, 2 force.
    Delete { k: usize, mode: u8 },
    /// Administrative completion of an outcome-unknown record with body `[body]`, with the mark
    /// read from the store (or, if `stale`, a marking instant one millisecond off).
    CompleteUnknown { k: usize, stale: bool, body: u8 },
    /// Read.
    Get { k: usize },
    /// Move the clock (controlled clocks only).
    Advance { ms: u64 },
}

fn op_strategy(controlled: bool) -> BoxedStrategy<Op> {
    let k = 0..KEYS;
    let h = 0usize..4;
    let base = prop_oneof![
        3 => (k.clone(), 0u8..2).prop_map(|(k, fp)| Op::Claim { k, fp }),
        2 => (k.clone(), h.clone()).prop_map(|(k, h)| Op::Renew { k, h }),
        2 => (k.clone(), h.clone(), any::<u8>()).prop_map(|(k, h, body)| Op::Complete { k, h, body }),
        1 => (k.clone(), h.clone()).prop_map(|(k, h)| Op::MarkUnknown { k, h }),
        1 => (k.clone(), h.clone()).prop_map(|(k, h)| Op::Release { k, h }),
        2 => (k.clone(), h).prop_map(|(k, h)| Op::TakeOver { k, h }),
        2 => (k.clone(), 0u8..3).prop_map(|(k, mode)| Op::Delete { k, mode }),
        1 => (k.clone(), proptest::bool::weighted(0.25), any::<u8>())
            .prop_map(|(k, stale, body)| Op::CompleteUnknown { k, stale, body }),
        2 => k.prop_map(|k| Op::Get { k }),
    ];
    if controlled {
        prop_oneof![6 => base, 1 => (0u64..25).prop_map(|n| Op::Advance { ms: n * 100 })].boxed()
    } else {
        base.boxed()
    }
}

#[derive(Clone, Debug, PartialEq)]
enum MState {
    InFlight {
        epoch: u64,
        token: u128,
        lease_until: u64,
    },
    Completed {
        epoch: u64,
        body: u8,
    },
    Unknown {
        epoch: u64,
    },
}

#[derive(Clone, Debug)]
struct MRec {
    created: u64,
    expires: u64,
    fp: u8,
    state: MState,
}

/// The reference model: times in ms since the start of the sequence.
#[derive(Debug, Default)]
struct Model {
    now: u64,
    recs: [Option<MRec>; KEYS],
}

impl Model {
    fn live(&self, k: usize) -> Option<&MRec> {
        self.recs[k].as_ref().filter(|r| self.now < r.expires)
    }

    /// Whether `f` may compare-and-set `k` (a revoked fencing never may).
    fn holds(&self, k: usize, f: Fencing) -> bool {
        !f.is_revoked() && self.in_flight_with(k, f)
    }

    fn in_flight_with(&self, k: usize, f: Fencing) -> bool {
        matches!(self.live(k), Some(MRec { state: MState::InFlight { epoch, token, .. }, .. })
            if *epoch == f.epoch && *token == f.token)
    }
}

/// What the comparison looks at: the state name, epoch, token of a holder, completed body, and
/// (controlled clocks only) lease and expiry relative to creation.
#[derive(Debug, PartialEq)]
struct Summary {
    state: &'static str,
    epoch: u64,
    token: u128,
    body: Option<u8>,
    fp: u8,
    lease_rel: Option<u64>,
    expires_rel: Option<u64>,
}

fn summarize_model(r: &MRec, timed: bool) -> Summary {
    let (state, epoch, token, body, lease) = match &r.state {
        MState::InFlight {
            epoch,
            token,
            lease_until,
        } => ("in_flight", *epoch, *token, None, Some(*lease_until)),
        MState::Completed { epoch, body } => ("completed", *epoch, 0, Some(*body), None),
        MState::Unknown { epoch } => ("unknown", *epoch, 0, None, None),
    };
    Summary {
        state,
        epoch,
        token,
        body,
        fp: r.fp,
        lease_rel: lease.filter(|_| timed).map(|l| l - r.created),
        expires_rel: Some(r.expires - r.created).filter(|_| timed),
    }
}

fn summarize_store(r: &Record, timed: bool) -> Summary {
    let created = r.created_at.as_millis();
    let (state, epoch, token, body, lease) = match &r.state {
        RecordState::InFlight {
            fencing,
            lease_expires_at,
            ..
        } => (
            "in_flight",
            fencing.epoch,
            fencing.token,
            None,
            Some(lease_expires_at.as_millis()),
        ),
        RecordState::Completed { epoch, outcome, .. } => {
            let body = match outcome {
                Outcome::Response(resp) => resp.body.first().copied(),
                _ => None,
            };
            ("completed", *epoch, 0, body, None)
        }
        RecordState::Unknown { epoch, .. } => ("unknown", *epoch, 0, None, None),
    };
    Summary {
        state,
        epoch,
        token,
        body,
        fp: r.fingerprint.digest[0],
        lease_rel: lease.filter(|_| timed).map(|l| l - created),
        expires_rel: Some(r.expires_at.as_millis() - created).filter(|_| timed),
    }
}

fn fail(step: usize, op: &Op, what: String) -> TestCaseError {
    TestCaseError::fail(format!("step {step} {op:?}: {what}"))
}

async fn run_sequence<H: Harness>(h: &H, ops: &[Op]) -> Result<(), TestCaseError> {
    let timed = h.controlled_clock();
    let lease = Duration::from_millis(if timed { LEASE_MS } else { 3_600_000 });
    let keys: Vec<StoreKey> = (0..KEYS).map(|_| fresh_key("model")).collect();
    let mut holders: Vec<Vec<Fencing>> = vec![Vec::new(); KEYS];
    let mut m = Model::default();
    let store = h.store();
    let pick = |holders: &Vec<Vec<Fencing>>, k: usize, i: usize| {
        let hs = &holders[k];
        if hs.is_empty() {
            Fencing { epoch: 1, token: 0 }
        } else {
            hs[i % hs.len()]
        }
    };
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Advance { ms } => {
                h.advance(Duration::from_millis(ms)).await;
                m.now += ms;
            }
            Op::Claim { k, fp } => {
                let mut req = claim_request(lease, Duration::from_millis(TTL_MS), fp);
                req.token = fresh_token();
                let got = store
                    .claim(&keys[k], &req)
                    .await
                    .map_err(|e| fail(step, op, e.to_string()))?;
                // A free key (released or revoked, its lease over) is claimed at its next epoch.
                let floor = match m.live(k).map(|r| &r.state) {
                    Some(MState::InFlight {
                        epoch,
                        token,
                        lease_until,
                    }) if *token == Fencing::REVOKED && m.now >= *lease_until => Some(*epoch),
                    Some(_) => None,
                    None => Some(0),
                };
                let expected = m
                    .live(k)
                    .filter(|_| floor.is_none())
                    .map(|r| summarize_model(r, timed));
                match (got, expected) {
                    (ClaimOutcome::Acquired { fencing }, None) => {
                        let epoch = floor.unwrap_or(0) + 1;
                        if fencing
                            != (Fencing {
                                epoch,
                                token: req.token,
                            })
                        {
                            return Err(fail(step, op, format!("granted {fencing:?}")));
                        }
                        holders[k].push(fencing);
                        m.recs[k] = Some(MRec {
                            created: m.now,
                            expires: m.now + TTL_MS.max(lease.as_millis() as u64),
                            fp,
                            state: MState::InFlight {
                                epoch,
                                token: req.token,
                                lease_until: m.now + lease.as_millis() as u64,
                            },
                        });
                    }
                    (ClaimOutcome::Existing { record, .. }, Some(exp)) => {
                        let got = summarize_store(&record, timed);
                        if got != exp {
                            return Err(fail(step, op, format!("store {got:?} model {exp:?}")));
                        }
                    }
                    (got, exp) => {
                        return Err(fail(step, op, format!("store {got:?} model {exp:?}")));
                    }
                }
            }
            Op::Renew { k, h: i } => {
                let f = pick(&holders, k, i);
                let got = store
                    .renew(&keys[k], f, lease)
                    .await
                    .map_err(|e| fail(step, op, e.to_string()))?;
                let expect = m.holds(k, f);
                if expect {
                    let now = m.now;
                    let r = m.recs[k].as_mut().unwrap();
                    if let MState::InFlight { lease_until, .. } = &mut r.state {
                        *lease_until = now + lease.as_millis() as u64;
                        r.expires = r.expires.max(*lease_until);
                    }
                }
                cas(step, op, got, expect)?;
            }
            Op::Complete { k, h: i, body } => {
                let f = pick(&holders, k, i);
                let outcome =
                    Outcome::Response(StoredResponse::new(200, vec![], Bytes::from(vec![body])));
                let got = store
                    .complete(&keys[k], f, &outcome, Duration::from_millis(TTL_MS))
                    .await
                    .map_err(|e| fail(step, op, e.to_string()))?;
                let expect = m.holds(k, f);
                if expect {
                    let now = m.now;
                    let r = m.recs[k].as_mut().unwrap();
                    r.state = MState::Completed {
                        epoch: f.epoch,
                        body,
                    };
                    r.expires = now + TTL_MS;
                }
                cas(step, op, got, expect)?;
            }
            Op::MarkUnknown { k, h: i } => {
                let f = pick(&holders, k, i);
                let got = store
                    .mark_unknown(&keys[k], f, Duration::from_millis(UNKNOWN_TTL_MS))
                    .await
                    .map_err(|e| fail(step, op, e.to_string()))?;
                let expect = m.holds(k, f);
                if expect {
                    let now = m.now;
                    let r = m.recs[k].as_mut().unwrap();
                    r.state = MState::Unknown { epoch: f.epoch };
                    r.expires = now + UNKNOWN_TTL_MS;
                }
                cas(step, op, got, expect)?;
            }
            Op::Release { k, h: i } => {
                let f = pick(&holders, k, i);
                let got = store
                    .release(&keys[k], f)
                    .await
                    .map_err(|e| fail(step, op, e.to_string()))?;
                let expect = m.holds(k, f);
                if expect {
                    // A free key with its epoch as the floor.
                    let now = m.now;
                    let r = m.recs[k].as_mut().unwrap();
                    if let MState::InFlight {
                        token, lease_until, ..
                    } = &mut r.state
                    {
                        *token = Fencing::REVOKED;
                        *lease_until = now;
                    }
                    holders[k].push(Fencing {
                        epoch: f.epoch,
                        token: Fencing::REVOKED,
                    });
                }
                cas(step, op, got, expect)?;
            }
            Op::TakeOver { k, h: i } => {
                let f = pick(&holders, k, i);
                let req = TakeOverRequest {
                    expired: f,
                    token: fresh_token(),
                    owner: "model".into(),
                    lease_ttl: lease,
                };
                let got = store
                    .take_over(&keys[k], &req)
                    .await
                    .map_err(|e| fail(step, op, e.to_string()))?;
                let expired = matches!(m.live(k), Some(MRec { state: MState::InFlight { lease_until, .. }, .. }) if m.now >= *lease_until);
                let expect = m.in_flight_with(k, f) && expired;
                match (got, expect) {
                    (TakeOverOutcome::Acquired { fencing }, true) => {
                        if fencing
                            != (Fencing {
                                epoch: f.epoch + 1,
                                token: req.token,
                            })
                        {
                            return Err(fail(step, op, format!("granted {fencing:?}")));
                        }
                        holders[k].push(fencing);
                        let now = m.now;
                        let r = m.recs[k].as_mut().unwrap();
                        r.state = MState::InFlight {
                            epoch: fencing.epoch,
                            token: fencing.token,
                            lease_until: now + lease.as_millis() as u64,
                        };
                        r.expires = r.expires.max(now + lease.as_millis() as u64);
                    }
                    (TakeOverOutcome::Refused { current, .. }, false) => {
                        let got = current.as_ref().map(|r| summarize_store(r, timed));
                        let exp = m.live(k).map(|r| summarize_model(r, timed));
                        if got != exp {
                            return Err(fail(
                                step,
                                op,
                                format!("refused with {got:?}, model {exp:?}"),
                            ));
                        }
                    }
                    (got, exp) => {
                        return Err(fail(
                            step,
                            op,
                            format!("store {got:?}, model expects acquire={exp}"),
                        ));
                    }
                }
            }
            Op::Delete { k, mode } => {
                let mode = [DeleteMode::Finished, DeleteMode::Unknown, DeleteMode::Force]
                    [usize::from(mode) % 3];
                let got = store
                    .delete(&keys[k], mode)
                    .await
                    .map_err(|e| fail(step, op, e.to_string()))?;
                let now = m.now;
                let expect = match m.live(k).map(|r| r.state.clone()) {
                    None => {
                        m.recs[k] = None;
                        "absent"
                    }
                    Some(MState::InFlight { token, .. })
                        if token == Fencing::REVOKED && mode != DeleteMode::Unknown =>
                    {
                        m.recs[k] = None;
                        "deleted"
                    }
                    Some(MState::InFlight { epoch, .. }) if mode == DeleteMode::Force => {
                        let r = m.recs[k].as_mut().unwrap();
                        r.state = MState::InFlight {
                            epoch,
                            token: Fencing::REVOKED,
                            lease_until: now,
                        };
                        holders[k].push(Fencing {
                            epoch,
                            token: Fencing::REVOKED,
                        });
                        "revoked"
                    }
                    Some(MState::InFlight { .. }) => "refused",
                    Some(_) if mode == DeleteMode::Force => "refused",
                    Some(MState::Completed { .. }) if mode == DeleteMode::Unknown => "refused",
                    Some(_) => {
                        m.recs[k] = None;
                        "deleted"
                    }
                };
                let got_name = match &got {
                    DeleteOutcome::Absent => "absent",
                    DeleteOutcome::Deleted => "deleted",
                    DeleteOutcome::Revoked { .. } => "revoked",
                    DeleteOutcome::Refused { .. } => "refused",
                };
                if got_name != expect {
                    return Err(fail(step, op, format!("store {got:?} model {expect}")));
                }
            }
            Op::CompleteUnknown { k, stale, body } => {
                let seen = store
                    .get(&keys[k])
                    .await
                    .map_err(|e| fail(step, op, e.to_string()))?;
                let mut mark = seen
                    .as_ref()
                    .and_then(UnknownMark::of)
                    .unwrap_or(UnknownMark {
                        epoch: 1,
                        since: crate::clock::Timestamp(0),
                    });
                if stale {
                    mark.since = crate::clock::Timestamp(mark.since.0 + 1);
                }
                let outcome =
                    Outcome::Response(StoredResponse::new(200, vec![], Bytes::from(vec![body])));
                let got = store
                    .complete_unknown(&keys[k], mark, &outcome, Duration::from_millis(TTL_MS))
                    .await
                    .map_err(|e| fail(step, op, e.to_string()))?;
                let now = m.now;
                let before = m.live(k).map(|r| summarize_model(r, timed));
                let expect = match m.live(k).map(|r| r.state.clone()) {
                    None => "absent",
                    Some(MState::Unknown { epoch }) if !stale => {
                        let r = m.recs[k].as_mut().unwrap();
                        r.state = MState::Completed { epoch, body };
                        r.expires = now + TTL_MS;
                        "completed"
                    }
                    Some(_) => "refused",
                };
                match (&got, expect) {
                    (ResolveOutcome::Absent, "absent")
                    | (ResolveOutcome::Completed, "completed") => {}
                    (ResolveOutcome::Refused { current }, "refused") => {
                        let current = summarize_store(current, timed);
                        if Some(&current) != before.as_ref() {
                            return Err(fail(
                                step,
                                op,
                                format!("refused with {current:?}, model {before:?}"),
                            ));
                        }
                    }
                    _ => return Err(fail(step, op, format!("store {got:?} model {expect}"))),
                }
            }
            Op::Get { k } => {
                let got = store
                    .get(&keys[k])
                    .await
                    .map_err(|e| fail(step, op, e.to_string()))?;
                let got = got.as_ref().map(|r| summarize_store(r, timed));
                let exp = m.live(k).map(|r| summarize_model(r, timed));
                if got != exp {
                    return Err(fail(step, op, format!("store {got:?} model {exp:?}")));
                }
            }
        }
    }
    // Final agreement on every key.
    for (k, key) in keys.iter().enumerate() {
        let got = store
            .get(key)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let got = got.as_ref().map(|r| summarize_store(r, timed));
        let exp = m.live(k).map(|r| summarize_model(r, timed));
        if got != exp {
            return Err(TestCaseError::fail(format!(
                "final key {k}: store {got:?} model {exp:?}"
            )));
        }
    }
    Ok(())
}

fn cas(step: usize, op: &Op, got: CasOutcome, expect: bool) -> Result<(), TestCaseError> {
    let want = if expect {
        CasOutcome::Applied
    } else {
        CasOutcome::Lost
    };
    if got == want {
        Ok(())
    } else {
        Err(fail(step, op, format!("store {got:?} model {want:?}")))
    }
}

/// Runs `cases` random sequences (of up to 40 operations) against `harness` on `rt`, comparing with
/// the reference model. Failures are shrunk and persisted to `regressions` (a path relative to the
/// test's working directory, i.e. the crate root); commit that file.
pub fn check_against_model<H: Harness>(
    rt: &tokio::runtime::Runtime,
    harness: &H,
    cases: u32,
    regressions: &'static str,
) {
    let config = Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(regressions))),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let strategy = proptest::collection::vec(op_strategy(harness.controlled_clock()), 1..40);
    let result = runner.run(&strategy, |ops| rt.block_on(run_sequence(harness, &ops)));
    if let Err(e) = result {
        panic!("store disagrees with the reference model: {e}");
    }
}
