//! `serve`'s census of outcome-unknown records (docs/operations.md, "The census of
//! outcome-unknown records"): one task per instance makes one pass over the store at a time
//! ([`survey_unknown`], pages of 100, at most `unknown_scan_rate` records a second), sets the
//! `idemgate_outcome_unknown_*` gauges, and keeps the [`KEEP`] newest outcome-unknown records of
//! this instance's namespace for the dashboard's `/api/unknown`, which never reads the store
//! itself.
//!
//! A pass starts every [`CENSUS_INTERVAL`], or sooner when asked ([`UnknownCensus::request`]: the
//! dashboard asks when the last pass ended more than [`MIN_GAP`] ago), but never two at once and
//! never two starts less than [`MIN_GAP`] apart: any number of open dashboard tabs cost at most
//! one paced pass at a time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idemgate_core::census::{Survey, survey_unknown};
use idemgate_core::{SharedStore, StoreKey};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::telemetry::{UNKNOWN_RECORDS, UNKNOWN_SCAN_RECORDS, UNKNOWN_SCAN_TIMESTAMP};

/// Outcome-unknown records a pass keeps (the newest, by marking instant).
pub const KEEP: usize = 200;
/// The longest time between the starts of two passes.
pub const CENSUS_INTERVAL: Duration = Duration::from_secs(30);
/// The shortest time between the starts of two passes.
pub const MIN_GAP: Duration = Duration::from_secs(5);

/// What the census knows now.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Passes started.
    pub started: u64,
    /// Passes ended (done or failed).
    pub ended: u64,
    /// The last pass that reached the end of the store (`None` before the first).
    pub survey: Option<Arc<Survey>>,
    /// When it ended (ms since the Unix epoch).
    pub survey_ended_ms: u64,
    /// The kind of the last pass's store error, when the last pass failed.
    pub error: Option<String>,
}

impl Snapshot {
    /// Whether a pass is running.
    pub fn running(&self) -> bool {
        self.started > self.ended
    }
}

struct Shared {
    state: watch::Sender<Snapshot>,
    wake: Notify,
}

/// The census's shared state (cheap to clone); `off()` when `unknown_scan_rate` is 0.
#[derive(Clone, Default)]
pub struct UnknownCensus {
    shared: Option<Arc<Shared>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl UnknownCensus {
    /// A census that never runs (`unknown_scan_rate = 0`).
    pub fn off() -> Self {
        Self { shared: None }
    }

    /// Starts the census over `store` for `namespace` at most `rate` records a second; no task
    /// (and [`Self::off`]) when `rate` is 0. A failed pass is logged and leaves the gauges and
    /// the kept records as they were.
    pub fn spawn(
        store: SharedStore,
        namespace: String,
        rate: usize,
    ) -> (Self, Option<JoinHandle<()>>) {
        let rate = u32::try_from(rate).unwrap_or(u32::MAX);
        if rate == 0 {
            return (Self::off(), None);
        }
        let shared = Arc::new(Shared {
            state: watch::Sender::new(Snapshot::default()),
            wake: Notify::new(),
        });
        let me = shared.clone();
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(CENSUS_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await; // the first tick is now
            loop {
                let start = tokio::time::Instant::now();
                me.state.send_modify(|s| s.started += 1);
                let result = survey_unknown(&store, Some(&namespace), Some(rate), KEEP).await;
                match result {
                    Ok(survey) => {
                        let now = now_ms();
                        metrics::gauge!(UNKNOWN_RECORDS).set(survey.census.unknown as f64);
                        metrics::gauge!(UNKNOWN_SCAN_RECORDS).set(survey.census.scanned as f64);
                        metrics::gauge!(UNKNOWN_SCAN_TIMESTAMP).set(now as f64 / 1e3);
                        tracing::debug!(
                            unknown = survey.census.unknown,
                            scanned = survey.census.scanned,
                            "census of outcome-unknown records done"
                        );
                        me.state.send_modify(|s| {
                            s.ended += 1;
                            s.survey = Some(Arc::new(survey));
                            s.survey_ended_ms = now;
                            s.error = None;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e,
                            "census of outcome-unknown records failed; \
                             idemgate_outcome_unknown_records keeps its previous value");
                        me.state.send_modify(|s| {
                            s.ended += 1;
                            s.error = Some(e.kind().to_string());
                        });
                    }
                }
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = me.wake.notified() => tokio::time::sleep_until(start + MIN_GAP).await,
                }
            }
        });
        (
            Self {
                shared: Some(shared),
            },
            Some(task),
        )
    }

    /// What the census knows now; `None` when it is off.
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.shared.as_ref().map(|s| s.state.borrow().clone())
    }

    /// Asks for a pass soon (at most one is pending, however often this is called; it starts
    /// once the running one ended and [`MIN_GAP`] after its start).
    pub fn request(&self) {
        if let Some(s) = &self.shared {
            s.wake.notify_one();
        }
    }

    /// Asks for a pass and waits (at most `timeout`) for one that started after this call to
    /// end; the snapshot then, or `None` when the census is off or the wait timed out.
    pub async fn fresh(&self, timeout: Duration) -> Option<Snapshot> {
        let shared = self.shared.as_ref()?;
        let mut rx = shared.state.subscribe();
        let wanted = rx.borrow_and_update().started + 1;
        shared.wake.notify_one();
        let ended = tokio::time::timeout(timeout, rx.wait_for(|s| s.ended >= wanted)).await;
        match ended {
            Ok(Ok(snapshot)) => Some(snapshot.clone()),
            _ => None,
        }
    }

    /// Drops `key` from the kept records (an operator resolved it): the list no longer shows it
    /// until a pass finds it again.
    pub fn forget(&self, key: &StoreKey) {
        if let Some(s) = &self.shared {
            s.state.send_if_modified(|snap| {
                let Some(survey) = snap.survey.as_mut() else {
                    return false;
                };
                if !survey.newest.iter().any(|r| r.store_key == *key) {
                    return false;
                }
                let survey = Arc::make_mut(survey);
                survey.newest.retain(|r| r.store_key != *key);
                survey.census.unknown = survey.census.unknown.saturating_sub(1);
                true
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use idemgate_core::MemoryStore;
    use idemgate_core::fingerprint::{Algorithm, Fingerprint};
    use idemgate_core::store::{ClaimOutcome, ClaimRequest, Store};

    use super::*;

    /// Claims record `i` in `namespace`; marks it outcome-unknown when `unknown`.
    async fn record(store: &MemoryStore, i: u16, namespace: &str, unknown: bool) -> StoreKey {
        let mut raw = [0u8; 32];
        raw[..2].copy_from_slice(&i.to_be_bytes());
        let key = StoreKey(raw);
        let req = ClaimRequest {
            namespace: namespace.into(),
            scope: format!("pay#{i}"),
            idempotency_key: format!("k{i}"),
            fingerprint: Fingerprint::from_parts(Algorithm::Blake3, [0; 32]),
            token: u128::from(i) + 1,
            owner: "o".into(),
            lease_ttl: Duration::from_secs(60),
            ttl: Duration::from_secs(3600),
        };
        let Ok(ClaimOutcome::Acquired { fencing }) = store.claim(&key, &req).await else {
            panic!("claim {i}")
        };
        if unknown {
            let marked = store
                .mark_unknown(&key, fencing, Duration::from_secs(3600))
                .await;
            assert!(marked.is_ok());
        }
        key
    }

    #[tokio::test(start_paused = true)]
    async fn the_survey_keeps_the_newest_unknown_records_of_its_namespace() {
        let store = MemoryStore::default();
        // 450 unknown records of "pay", some completed ones, and unknown ones of another
        // namespace; over several pages.
        let mut keys = Vec::new();
        for i in 0..450u16 {
            keys.push(record(&store, i, "pay", true).await);
        }
        for i in 450..480u16 {
            record(&store, i, "pay", false).await;
            record(&store, i + 100, "other", true).await;
        }
        let survey = survey_unknown(&store, Some("pay"), None, KEEP)
            .await
            .unwrap();
        assert_eq!(survey.census.unknown, 450);
        assert_eq!(survey.census.scanned, 510);
        assert_eq!(survey.newest.len(), KEEP);
        // Newest first, and none older than any left out.
        assert!(
            survey
                .newest
                .windows(2)
                .all(|w| (w[0].since, w[0].store_key) >= (w[1].since, w[1].store_key))
        );
        let all = survey_unknown(&store, Some("pay"), None, 10_000)
            .await
            .unwrap();
        assert_eq!(all.newest.len(), 450);
        assert_eq!(all.newest[..KEEP], survey.newest[..]);
        assert!(
            survey
                .newest
                .iter()
                .all(|r| r.scope.starts_with("pay#") && r.idempotency_key.starts_with('k'))
        );
        // Only the namespace asked for.
        let other = survey_unknown(&store, Some("other"), None, KEEP)
            .await
            .unwrap();
        assert_eq!(other.census.unknown, 30);
        assert!(other.newest.iter().all(|r| !keys.contains(&r.store_key)));
    }

    #[tokio::test]
    async fn the_census_serves_its_last_pass_runs_one_pass_at_a_time_and_forgets_resolved_keys() {
        let store = MemoryStore::default();
        let shared = SharedStore::new(store.clone());
        let (off, task) = UnknownCensus::spawn(shared.clone(), "pay".into(), 0);
        assert!(task.is_none() && off.snapshot().is_none());
        assert!(off.fresh(Duration::from_secs(1)).await.is_none());

        let (census, task) = UnknownCensus::spawn(shared, "pay".into(), 1_000_000);
        let task = task.unwrap();
        let first = census.fresh(Duration::from_secs(30)).await.unwrap();
        assert_eq!(first.survey.as_ref().unwrap().census.unknown, 0);
        let a = record(&store, 1, "pay", true).await;
        let b = record(&store, 2, "pay", true).await;
        record(&store, 3, "other", true).await;
        // Many callers at once: they share passes (no pile-up), and each sees one that started
        // after it asked.
        let waits: Vec<_> = (0..20)
            .map(|_| {
                let c = census.clone();
                tokio::spawn(async move { c.fresh(Duration::from_secs(30)).await })
            })
            .collect();
        for w in waits {
            let snap = w.await.unwrap().unwrap();
            // A pass that started after the call ended (the first pass was before it).
            assert!(snap.ended >= 2, "{snap:?}");
            let survey = snap.survey.unwrap();
            assert_eq!(survey.census.unknown, 2);
            let found: Vec<StoreKey> = survey.newest.iter().map(|r| r.store_key).collect();
            assert!(found.contains(&a) && found.contains(&b), "{found:?}");
        }
        let snap = census.snapshot().unwrap();
        // 20 callers, but passes are at least MIN_GAP apart: the first, then at most two more
        // (one running when they asked, one after it).
        assert!(snap.ended <= 3, "{snap:?}");
        census.forget(&a);
        let survey = census.snapshot().unwrap().survey.unwrap();
        assert_eq!(survey.census.unknown, 1);
        assert_eq!(survey.newest.len(), 1);
        assert_eq!(survey.newest[0].store_key, b);
        task.abort();
    }
}
