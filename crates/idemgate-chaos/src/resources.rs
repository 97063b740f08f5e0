//! Resource sampling for I7 ("RSS, store memory and file descriptors stay bounded"): once a
//! second, the resident memory and open descriptors of every running instance (from `/proc`)
//! and the bytes the store holds (Redis `used_memory`; the data folder on disk for PostgreSQL
//! and the embedded store).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::procs::{Instance, PrivateStore, dir_bytes, process_usage};

/// One sample.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    /// Milliseconds since the run's start.
    pub at_ms: u64,
    /// The largest resident set of a running instance, kB.
    pub rss_kb_max: u64,
    /// The most open descriptors of a running instance.
    pub fds_max: u64,
    /// The longest-running instance's uptime, s (a figure read with the RSS: under a kill every
    /// 2 s no instance lives long).
    pub oldest_s: f64,
    /// Bytes held by the store, if it could be read.
    pub store_bytes: Option<u64>,
}

/// The samples of a run and what they add up to.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Resources {
    /// How many samples.
    pub samples: u64,
    /// The largest instance RSS seen, kB.
    pub rss_kb_max: u64,
    /// The largest instance RSS in the first and in the last quarter of the samples, kB: growth
    /// between them is what an unbounded structure would show.
    pub rss_kb_max_first_quarter: u64,
    /// See [`Resources::rss_kb_max_first_quarter`].
    pub rss_kb_max_last_quarter: u64,
    /// The most open descriptors of an instance.
    pub fds_max: u64,
    /// The store's bytes at the last sample.
    pub store_bytes_last: Option<u64>,
    /// The store's most bytes.
    pub store_bytes_max: Option<u64>,
    /// Every sample (one a second).
    pub series: Vec<Sample>,
}

impl Resources {
    fn of(series: Vec<Sample>) -> Self {
        let q = series.len().div_ceil(4);
        let max_rss = |s: &[Sample]| s.iter().map(|x| x.rss_kb_max).max().unwrap_or(0);
        Self {
            samples: series.len() as u64,
            rss_kb_max: max_rss(&series),
            rss_kb_max_first_quarter: max_rss(&series[..q.min(series.len())]),
            rss_kb_max_last_quarter: max_rss(&series[series.len().saturating_sub(q)..]),
            fds_max: series.iter().map(|x| x.fds_max).max().unwrap_or(0),
            store_bytes_last: series.iter().rev().find_map(|x| x.store_bytes),
            store_bytes_max: series.iter().filter_map(|x| x.store_bytes).max(),
            series,
        }
    }
}

/// Where the store's bytes are read from.
#[derive(Clone, Debug)]
pub enum StoreBytes {
    /// A process the run owns.
    Private(Arc<Mutex<PrivateStore>>),
    /// A folder (the embedded store).
    Folder(PathBuf),
    /// Not read (a server the run does not own).
    None,
}

/// Samples once a second until `stop` turns true, then sums up.
pub async fn sample(
    instances: Vec<Arc<Mutex<Instance>>>,
    store: StoreBytes,
    t0: std::time::Instant,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Resources {
    let mut series = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let mut s = Sample {
            at_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            ..Sample::default()
        };
        for i in &instances {
            // A locked instance is being killed or restarted: skip it this time.
            let Ok(i) = i.try_lock() else { continue };
            let Some(pid) = i.pid() else { continue };
            if let Some((rss, fds)) = process_usage(pid) {
                s.rss_kb_max = s.rss_kb_max.max(rss);
                s.fds_max = s.fds_max.max(fds);
                s.oldest_s = s.oldest_s.max(i.uptime().as_secs_f64());
            }
        }
        s.store_bytes = match &store {
            StoreBytes::Private(p) => match p.try_lock() {
                Ok(p) => p.bytes().await,
                Err(_) => None,
            },
            StoreBytes::Folder(d) => Some(dir_bytes(d)),
            StoreBytes::None => None,
        };
        series.push(s);
    }
    Resources::of(series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarters_split_the_series() {
        let series: Vec<Sample> = (1..=8)
            .map(|n| Sample {
                at_ms: n * 1000,
                rss_kb_max: n * 10,
                fds_max: n,
                store_bytes: (n % 2 == 0).then_some(n * 100),
                ..Sample::default()
            })
            .collect();
        let r = Resources::of(series);
        assert_eq!(r.samples, 8);
        assert_eq!(r.rss_kb_max, 80);
        assert_eq!(r.rss_kb_max_first_quarter, 20);
        assert_eq!(r.rss_kb_max_last_quarter, 80);
        assert_eq!(r.fds_max, 8);
        assert_eq!(r.store_bytes_last, Some(800));
        assert_eq!(r.store_bytes_max, Some(800));
        assert_eq!(Resources::of(Vec::new()).samples, 0);
    }
}
