//! This instance's recent activity: a bounded ring of the protected requests it answered (newest
//! first on read), and a per-route time series of outcome counts and latency in 5-second buckets
//! over the last 15 minutes. Fed by an [`Observer`] installed on the layer; read by the
//! dashboard's `/api/activity` and `/api/series`.
//!
//! Bounds: the ring holds [`RING_CAPACITY`] entries (a new entry drops the oldest); the series
//! holds [`SERIES_BUCKETS`] buckets (a new bucket drops the oldest); within one bucket each route
//! keeps at most [`LATENCY_SAMPLES`] durations for its percentiles (later ones are counted but not
//! sampled). Everything sits behind one short mutex that every proxied request takes: an
//! observation is a `VecDeque` push and a map update. A bucket's p50/p99 are computed once, when
//! it closes (closed buckets never change), and its samples dropped then; so a read of the series
//! copies numbers under the lock, plus the open bucket's samples (at most [`LATENCY_SAMPLES`] per
//! route), which it sorts after releasing the lock.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idemgate_tower::observe::{Observation, Observer};
use serde::Serialize;

/// Entries the recent-activity ring keeps (the oldest is dropped past it).
pub const RING_CAPACITY: usize = 1_000;
/// The series' bucket width.
pub const BUCKET: Duration = Duration::from_secs(5);
/// Buckets kept: 15 minutes of 5 seconds.
pub const SERIES_BUCKETS: usize = 180;
/// Durations kept per route and bucket for its percentiles.
pub const LATENCY_SAMPLES: usize = 1_024;
/// Longest client key kept in an entry (longer ones are cut and marked with `…`).
const KEY_CHARS: usize = 80;

/// One protected request.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// When it was answered (ms since the Unix epoch).
    pub at_ms: u64,
    /// Route name.
    pub route: String,
    /// Method (a standard method is stored without an allocation).
    #[serde(serialize_with = "method_str")]
    pub method: http::Method,
    /// The client's Idempotency-Key, sanitised (printable ASCII) and capped.
    pub key: String,
    /// The record's store key (shown in hex), when derived. Kept as its 32 bytes: the hex is
    /// written only when the dashboard reads the entry.
    #[serde(serialize_with = "store_key_hex")]
    pub store_key: Option<idemgate_core::StoreKey>,
    /// `executed`, `replayed`, `conflict`, `mismatch`, `unknown`, ...
    pub outcome: &'static str,
    /// Status answered.
    pub status: u16,
    /// Milliseconds to the answer's head.
    pub duration_ms: f64,
}

/// One route's counts in one bucket.
#[derive(Clone, Debug, Default, Serialize)]
struct RouteBucket {
    counts: BTreeMap<&'static str, u64>,
    /// Samples of the open bucket (emptied when it closes).
    #[serde(skip)]
    durations_ms: Vec<f64>,
    /// p50 and p99 of a closed bucket (computed as it closed).
    #[serde(skip)]
    closed: Option<(Option<f64>, Option<f64>)>,
}

impl RouteBucket {
    /// Computes the percentiles and drops the samples.
    fn close(&mut self) {
        let mut d = std::mem::take(&mut self.durations_ms);
        self.closed = Some(percentiles(&mut d));
    }
}

/// p50 and p99 of `durations` (sorted in place).
fn percentiles(durations: &mut [f64]) -> (Option<f64>, Option<f64>) {
    durations.sort_by(f64::total_cmp);
    (percentile(durations, 0.5), percentile(durations, 0.99))
}

#[derive(Debug)]
struct Bucket {
    start_ms: u64,
    routes: BTreeMap<String, RouteBucket>,
}

#[derive(Debug, Default)]
struct Inner {
    ring: VecDeque<Entry>,
    /// Finished buckets, oldest first.
    series: VecDeque<Bucket>,
    /// The bucket being filled.
    current: Option<Bucket>,
}

/// The ring and the series (cheap to clone).
#[derive(Clone, Debug, Default)]
pub struct Activity {
    inner: Arc<Mutex<Inner>>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn method_str<S: serde::Serializer>(m: &http::Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

fn store_key_hex<S: serde::Serializer>(
    k: &Option<idemgate_core::StoreKey>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match k {
        Some(k) => s.serialize_str(&k.to_hex()),
        None => s.serialize_none(),
    }
}

fn sanitise(key: &str) -> String {
    // The usual key (a UUID, a ULID): short printable ASCII, copied as it is.
    if key.len() <= KEY_CHARS && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return key.to_owned();
    }
    let mut out: String = key
        .chars()
        .take(KEY_CHARS)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if key.chars().count() > KEY_CHARS {
        out.push('…');
    }
    out
}

/// `p` (0..=1) of sorted `v`, nearest rank.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied()
}

impl Activity {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (pushes and counters).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one entry at `entry.at_ms`.
    pub fn record(&self, entry: Entry) {
        let bucket_ms = BUCKET.as_millis() as u64;
        let mut inner = self.lock();
        let start = entry.at_ms - entry.at_ms % bucket_ms;
        if inner.current.as_ref().is_some_and(|c| c.start_ms < start) {
            Self::roll(&mut inner);
        }
        let current = inner.current.get_or_insert_with(|| Bucket {
            start_ms: start,
            routes: BTreeMap::new(),
        });
        // The route's name is allocated once per bucket, not per request.
        let rb = match current.routes.get_mut(&entry.route) {
            Some(rb) => rb,
            None => current.routes.entry(entry.route.clone()).or_default(),
        };
        *rb.counts.entry(entry.outcome).or_insert(0) += 1;
        if rb.durations_ms.len() < LATENCY_SAMPLES {
            rb.durations_ms.push(entry.duration_ms);
        }
        if inner.ring.len() == RING_CAPACITY {
            inner.ring.pop_front();
        }
        inner.ring.push_back(entry);
    }

    fn roll(inner: &mut Inner) {
        if let Some(mut done) = inner.current.take() {
            // Once per route and bucket (every 5 s): a sort of at most LATENCY_SAMPLES numbers.
            done.routes.values_mut().for_each(RouteBucket::close);
            if inner.series.len() == SERIES_BUCKETS {
                inner.series.pop_front();
            }
            inner.series.push_back(done);
        }
    }

    /// Closes the current bucket when its 5 seconds are over (the sampler calls this every 5 s,
    /// so quiet periods still advance the series).
    pub fn tick(&self, now_ms: u64) {
        let bucket_ms = BUCKET.as_millis() as u64;
        let mut inner = self.lock();
        let start = now_ms - now_ms % bucket_ms;
        if inner.current.as_ref().is_some_and(|c| c.start_ms < start) {
            Self::roll(&mut inner);
        }
        inner.current.get_or_insert_with(|| Bucket {
            start_ms: start,
            routes: BTreeMap::new(),
        });
    }

    /// Recent entries, newest first, filtered by route and outcome, at most `limit`.
    pub fn recent(&self, route: Option<&str>, outcome: Option<&str>, limit: usize) -> Vec<Entry> {
        let inner = self.lock();
        inner
            .ring
            .iter()
            .rev()
            .filter(|e| route.is_none_or(|r| e.route == r))
            .filter(|e| outcome.is_none_or(|o| e.outcome == o))
            .take(limit)
            .cloned()
            .collect()
    }

    /// The series as JSON: `{bucket_ms, routes: {name: {t: [...], counts: {outcome: [...]},
    /// p50_ms: [...], p99_ms: [...]}}}`, oldest bucket first, the current one last; every
    /// route has a value for every bucket (0, or `null` latency).
    pub fn series(&self) -> serde_json::Value {
        // Under the lock: numbers, and the open bucket's samples (copied, sorted after).
        type Row = (
            u64,
            BTreeMap<String, (BTreeMap<&'static str, u64>, Latency)>,
        );
        enum Latency {
            Closed(Option<f64>, Option<f64>),
            Open(Vec<f64>),
        }
        let rows: Vec<Row> = {
            let inner = self.lock();
            inner
                .series
                .iter()
                .chain(inner.current.iter())
                .map(|b| {
                    let routes = b
                        .routes
                        .iter()
                        .map(|(name, r)| {
                            let latency = match r.closed {
                                Some((p50, p99)) => Latency::Closed(p50, p99),
                                None => Latency::Open(r.durations_ms.clone()),
                            };
                            (name.clone(), (r.counts.clone(), latency))
                        })
                        .collect();
                    (b.start_ms, routes)
                })
                .collect()
        };
        /// Per route: its counts, p50 and p99.
        type Numbers = (BTreeMap<&'static str, u64>, Option<f64>, Option<f64>);
        let rows: Vec<(u64, BTreeMap<String, Numbers>)> = rows
            .into_iter()
            .map(|(t, routes)| {
                let routes = routes
                    .into_iter()
                    .map(|(name, (counts, latency))| {
                        let (p50, p99) = match latency {
                            Latency::Closed(p50, p99) => (p50, p99),
                            Latency::Open(mut d) => percentiles(&mut d),
                        };
                        (name, (counts, p50, p99))
                    })
                    .collect();
                (t, routes)
            })
            .collect();
        let names: std::collections::BTreeSet<&String> =
            rows.iter().flat_map(|(_, routes)| routes.keys()).collect();
        let mut routes = serde_json::Map::new();
        for name in names {
            let outcomes: std::collections::BTreeSet<&'static str> = rows
                .iter()
                .filter_map(|(_, r)| r.get(name))
                .flat_map(|(counts, _, _)| counts.keys().copied())
                .collect();
            let mut counts = serde_json::Map::new();
            for o in outcomes {
                let v: Vec<u64> = rows
                    .iter()
                    .map(|(_, r)| {
                        r.get(name)
                            .and_then(|(c, _, _)| c.get(o))
                            .copied()
                            .unwrap_or(0)
                    })
                    .collect();
                counts.insert(o.into(), v.into());
            }
            let p50: Vec<Option<f64>> = rows
                .iter()
                .map(|(_, r)| r.get(name).and_then(|(_, p50, _)| *p50))
                .collect();
            let p99: Vec<Option<f64>> = rows
                .iter()
                .map(|(_, r)| r.get(name).and_then(|(_, _, p99)| *p99))
                .collect();
            let t: Vec<u64> = rows.iter().map(|(t, _)| *t).collect();
            routes.insert(
                name.clone(),
                serde_json::json!({ "t": t, "counts": counts, "p50_ms": p50, "p99_ms": p99 }),
            );
        }
        serde_json::json!({ "bucket_ms": BUCKET.as_millis() as u64, "routes": routes })
    }

    /// Ticks the series every [`BUCKET`] until the task is aborted.
    pub fn spawn_sampler(&self) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(BUCKET);
            loop {
                every.tick().await;
                me.tick(now_ms());
            }
        })
    }
}

impl Observer for Activity {
    fn observe(&self, o: &Observation<'_>) {
        self.record(Entry {
            at_ms: now_ms(),
            route: o.route.to_owned(),
            method: o.method.clone(),
            key: sanitise(o.key),
            store_key: o.store_key.copied(),
            outcome: o.answer.as_str(),
            status: o.status,
            duration_ms: o.elapsed.as_secs_f64() * 1e3,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at_ms: u64, route: &str, outcome: &'static str, ms: f64) -> Entry {
        Entry {
            at_ms,
            route: route.into(),
            method: http::Method::POST,
            key: format!("k{at_ms}"),
            store_key: None,
            outcome,
            status: 201,
            duration_ms: ms,
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_entries_up_to_its_bound() {
        let a = Activity::default();
        for i in 0..(RING_CAPACITY as u64 + 250) {
            a.record(entry(1_000_000 + i, "pay", "executed", 1.0));
        }
        let all = a.recent(None, None, usize::MAX);
        assert_eq!(all.len(), RING_CAPACITY);
        // Newest first; the 250 oldest were dropped.
        assert_eq!(all[0].at_ms, 1_000_000 + RING_CAPACITY as u64 + 249);
        assert_eq!(all[RING_CAPACITY - 1].at_ms, 1_000_000 + 250);
    }

    #[test]
    fn recent_filters_by_route_and_outcome() {
        let a = Activity::default();
        a.record(entry(1, "pay", "executed", 1.0));
        a.record(entry(2, "refund", "replayed", 1.0));
        a.record(entry(3, "pay", "replayed", 1.0));
        let got = a.recent(Some("pay"), Some("replayed"), 10);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].at_ms, 3);
        assert_eq!(a.recent(None, None, 2).len(), 2);
    }

    #[test]
    fn the_series_buckets_by_five_seconds_and_is_bounded() {
        let a = Activity::default();
        // Two in the bucket at 10 s, one at 15 s, one at 20 s for another route.
        a.record(entry(10_000, "pay", "executed", 2.0));
        a.record(entry(14_999, "pay", "replayed", 4.0));
        a.record(entry(15_000, "pay", "executed", 6.0));
        a.record(entry(20_001, "refund", "unknown", 8.0));
        let s = a.series();
        let pay = &s["routes"]["pay"];
        assert_eq!(pay["t"], serde_json::json!([10_000, 15_000, 20_000]));
        assert_eq!(pay["counts"]["executed"], serde_json::json!([1, 1, 0]));
        assert_eq!(pay["counts"]["replayed"], serde_json::json!([1, 0, 0]));
        assert_eq!(pay["p50_ms"], serde_json::json!([2.0, 6.0, null]));
        assert_eq!(pay["p99_ms"][0], 4.0);
        assert_eq!(
            s["routes"]["refund"]["counts"]["unknown"],
            serde_json::json!([0, 0, 1])
        );
        // Quiet time still advances, and the buckets stay bounded.
        for i in 0..(SERIES_BUCKETS as u64 + 20) {
            a.tick(25_000 + i * 5_000);
        }
        let last = 25_000 + (SERIES_BUCKETS as u64 + 19) * 5_000;
        a.record(entry(last + 1, "pay", "executed", 1.0));
        let s = a.series();
        let t = s["routes"]["pay"]["t"].as_array().map_or(0, Vec::len);
        // Finished buckets plus the current one; the first ones (10 s to 20 s) were dropped.
        assert_eq!(t, SERIES_BUCKETS + 1);
        assert_eq!(s["routes"]["pay"]["t"][SERIES_BUCKETS], last);
        assert_eq!(
            s["routes"]["pay"]["counts"]["replayed"],
            serde_json::Value::Null
        );
        // A route with nothing in the last 15 minutes is no longer listed.
        assert!(s["routes"].get("refund").is_none());
    }

    #[test]
    fn a_closed_bucket_keeps_its_percentiles_and_drops_its_samples() {
        let a = Activity::default();
        for i in 0..100u64 {
            // 1..=100 ms, out of order.
            a.record(entry(
                10_000 + i,
                "pay",
                "executed",
                ((i * 37) % 100 + 1) as f64,
            ));
        }
        // Open: computed from the samples on read.
        let open = a.series();
        assert_eq!(open["routes"]["pay"]["p50_ms"], serde_json::json!([50.0]));
        assert_eq!(open["routes"]["pay"]["p99_ms"], serde_json::json!([99.0]));
        a.tick(15_000);
        {
            let inner = a.lock();
            let closed = &inner.series[0].routes["pay"];
            assert!(closed.durations_ms.is_empty(), "samples kept after closing");
            assert_eq!(closed.closed, Some((Some(50.0), Some(99.0))));
        }
        a.record(entry(15_001, "pay", "executed", 7.0));
        let s = a.series();
        assert_eq!(s["routes"]["pay"]["p50_ms"], serde_json::json!([50.0, 7.0]));
        assert_eq!(s["routes"]["pay"]["p99_ms"], serde_json::json!([99.0, 7.0]));
        assert_eq!(
            s["routes"]["pay"]["counts"]["executed"],
            serde_json::json!([100, 1])
        );
    }

    #[test]
    fn keys_are_sanitised_and_capped() {
        assert_eq!(sanitise("a\u{7}b"), "a?b");
        let long = "x".repeat(200);
        let s = sanitise(&long);
        assert_eq!(s.chars().count(), KEY_CHARS + 1);
        assert!(s.ends_with('…'));
        // The copy-as-is path ends exactly at the cap.
        let at_cap = "k".repeat(KEY_CHARS);
        assert_eq!(sanitise(&at_cap), at_cap);
        let over = "k".repeat(KEY_CHARS + 1);
        assert_eq!(sanitise(&over), format!("{at_cap}…"));
        assert_eq!(sanitise("01J9 key-1"), "01J9 key-1");
        assert_eq!(sanitise("é"), "?");
    }

    #[test]
    fn entries_serialise_method_and_store_key_as_text() {
        let mut e = entry(1, "pay", "executed", 1.0);
        e.store_key = Some(idemgate_core::StoreKey([0xab; 32]));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["store_key"], "ab".repeat(32));
        e.store_key = None;
        assert!(serde_json::to_value(&e).unwrap()["store_key"].is_null());
    }
}
