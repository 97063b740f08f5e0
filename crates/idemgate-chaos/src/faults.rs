//! The fault injector: a schedule of timed actions on the processes (SIGKILL, SIGTERM,
//! SIGSTOP/SIGCONT, restart of an idemgate instance; SIGKILL and restart of a private Redis) and
//! on the TCP relays that sit between each instance and the store and between each instance and
//! the upstream (delay, blackhole, reset).
//!
//! A schedule is generated from a [`FaultPlan`] and a seed before the run; the injector applies
//! it against the clock and records when each action really happened (a restart waits until the
//! process listens). When the workload ends it heals everything: resumes paused instances,
//! restarts dead ones and clears every relay fault.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idemgate_relay::{Fault, Relay};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::client::Targets;
use crate::netns::Net;
use crate::procs::{Instance, PrivateStore};
use crate::rng::Rng;

/// A fault on a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkFault {
    /// Forward at once (healed).
    None,
    /// Hold every chunk this many ms.
    DelayMs(u64),
    /// Move nothing, both ways (a partition that drops packets).
    Blackhole,
    /// Reset every connection and refuse new ones.
    Reset,
}

impl LinkFault {
    fn relay(self) -> Fault {
        match self {
            LinkFault::None => Fault::None,
            LinkFault::DelayMs(ms) => Fault::Delay(Duration::from_millis(ms)),
            LinkFault::Blackhole => Fault::Blackhole,
            LinkFault::Reset => Fault::Reset,
        }
    }
}

/// One action of a schedule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// SIGKILL an instance.
    Kill {
        /// Which.
        instance: u32,
    },
    /// SIGTERM an instance (graceful drain; SIGKILL if it has not exited at its restart).
    Terminate {
        /// Which.
        instance: u32,
    },
    /// Start a dead instance again.
    Restart {
        /// Which.
        instance: u32,
    },
    /// SIGSTOP an instance.
    Pause {
        /// Which.
        instance: u32,
    },
    /// SIGCONT it.
    Resume {
        /// Which.
        instance: u32,
    },
    /// A fault on the store link of one instance (`None`: of every instance).
    StoreLink {
        /// Which instance's link, or all.
        instance: Option<u32>,
        /// The fault.
        fault: LinkFault,
    },
    /// A fault on the upstream link of one instance (`None`: of every instance).
    UpstreamLink {
        /// Which instance's link, or all.
        instance: Option<u32>,
        /// The fault.
        fault: LinkFault,
    },
    /// SIGKILL the private Redis.
    StoreKill,
    /// Restart the private Redis (it replays its append-only file).
    StoreRestart,
}

impl Action {
    /// The instance an action is about, if one.
    pub fn instance(&self) -> Option<u32> {
        match self {
            Action::Kill { instance }
            | Action::Terminate { instance }
            | Action::Restart { instance }
            | Action::Pause { instance }
            | Action::Resume { instance } => Some(*instance),
            Action::StoreLink { instance, .. } | Action::UpstreamLink { instance, .. } => *instance,
            Action::StoreKill | Action::StoreRestart => None,
        }
    }

    /// A short name for counts.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Kill { .. } => "sigkill",
            Action::Terminate { .. } => "sigterm",
            Action::Restart { .. } => "restart",
            Action::Pause { .. } => "sigstop",
            Action::Resume { .. } => "sigcont",
            Action::StoreLink {
                fault: LinkFault::None,
                ..
            } => "store_link_healed",
            Action::StoreLink {
                fault: LinkFault::Blackhole,
                ..
            } => "store_blackhole",
            Action::StoreLink {
                fault: LinkFault::DelayMs(_),
                ..
            } => "store_delay",
            Action::StoreLink {
                fault: LinkFault::Reset,
                ..
            } => "store_reset",
            Action::UpstreamLink {
                fault: LinkFault::None,
                ..
            } => "upstream_link_healed",
            Action::UpstreamLink {
                fault: LinkFault::Blackhole,
                ..
            } => "upstream_blackhole",
            Action::UpstreamLink {
                fault: LinkFault::DelayMs(_),
                ..
            } => "upstream_delay",
            Action::UpstreamLink {
                fault: LinkFault::Reset,
                ..
            } => "upstream_reset",
            Action::StoreKill => "store_sigkill",
            Action::StoreRestart => "store_restart",
        }
    }
}

/// An action at a time after the start of the workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    /// When.
    pub at: Duration,
    /// What.
    pub action: Action,
}

/// What the injector did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultRecord {
    /// Microseconds since the run's start when it was applied (for a restart: when the process
    /// listened).
    pub at_us: u64,
    /// The action.
    pub action: Action,
    /// Whether it changed anything (a kill of a dead instance does not).
    pub applied: bool,
    /// Details (errors, PIDs).
    pub note: String,
}

/// Which faults, how often. Periods are jittered by ±25 %; `None` turns a kind off.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultPlan {
    /// A random instance is SIGKILLed about this often (a paused one is spared: the next
    /// running one is killed instead) ...
    pub kill_every: Option<Duration>,
    /// ... and restarted this long after (retried until it listens: idemgate refuses to start
    /// while its store is unreachable).
    pub restart_after: Duration,
    /// A random instance is SIGTERMed (drained) about this often, restarted after
    /// `restart_after` (plus its drain).
    pub terminate_every: Option<Duration>,
    /// A random instance (the next running one if it is paused or down) is SIGSTOPped about
    /// this often ...
    pub pause_every: Option<Duration>,
    /// ... for this long.
    pub pause_for: Duration,
    /// Every store link is blackholed about this often ...
    pub store_blackhole_every: Option<Duration>,
    /// ... for this long.
    pub store_blackhole_for: Duration,
    /// One instance's store link is blackholed (the others keep the store) about this often,
    /// for `store_blackhole_for`.
    pub store_blackhole_one_every: Option<Duration>,
    /// One instance's store link is delayed (200 ms a chunk) about this often, for
    /// `link_fault_for`.
    pub store_delay_every: Option<Duration>,
    /// One instance's upstream link gets a fault (delay 300 ms or blackhole for
    /// `link_fault_for`, or a 100 ms burst of resets, at random) about this often ...
    pub upstream_fault_every: Option<Duration>,
    /// ... for this long (also the length of store delays).
    pub link_fault_for: Duration,
    /// The private Redis is SIGKILLed about this often and restarted after `restart_after`.
    pub store_kill_every: Option<Duration>,
    /// No fault starts before this.
    pub start_after: Duration,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self {
            kill_every: Some(Duration::from_secs(2)),
            restart_after: Duration::from_millis(500),
            terminate_every: None,
            pause_every: None,
            pause_for: Duration::from_secs(3),
            store_blackhole_every: None,
            store_blackhole_for: Duration::from_secs(3),
            store_blackhole_one_every: None,
            store_delay_every: None,
            upstream_fault_every: None,
            link_fault_for: Duration::from_secs(2),
            store_kill_every: None,
            start_after: Duration::from_secs(1),
        }
    }
}

impl FaultPlan {
    /// No faults at all.
    pub fn none() -> Self {
        Self {
            kill_every: None,
            ..Self::default()
        }
    }

    /// The schedule for a workload of `window` over `instances` instances, sorted by time.
    /// Nothing starts in the last 10 % of the window.
    pub fn schedule(&self, window: Duration, instances: u32, rng: &mut Rng) -> Vec<Event> {
        let mut events = Vec::new();
        let last = window.mul_f64(0.9);
        let mut periodic =
            |every: Option<Duration>,
             salt: u64,
             f: &mut dyn FnMut(Duration, &mut Rng, &mut Vec<Event>)| {
                let Some(every) = every.filter(|e| !e.is_zero()) else {
                    return;
                };
                let mut r = rng.fork(salt);
                let mut t = self.start_after + r.jitter(every);
                while t < last {
                    f(t, &mut r, &mut events);
                    let quarter = every / 4;
                    t += every - quarter + r.jitter(quarter * 2);
                }
            };
        let restart_after = self.restart_after;
        // Restarts after kills and terminations are the injector's: it restarts the instance it
        // really stopped (see `inject`).
        periodic(self.kill_every, 1, &mut |t, r, ev| {
            let instance = r.below(u64::from(instances)) as u32;
            ev.push(Event {
                at: t,
                action: Action::Kill { instance },
            });
        });
        periodic(self.terminate_every, 2, &mut |t, r, ev| {
            let instance = r.below(u64::from(instances)) as u32;
            ev.push(Event {
                at: t,
                action: Action::Terminate { instance },
            });
        });
        // Resumes are the injector's too.
        periodic(self.pause_every, 3, &mut |t, r, ev| {
            let instance = r.below(u64::from(instances)) as u32;
            ev.push(Event {
                at: t,
                action: Action::Pause { instance },
            });
        });
        let blackhole_for = self.store_blackhole_for;
        periodic(self.store_blackhole_every, 4, &mut |t, _, ev| {
            ev.push(Event {
                at: t,
                action: Action::StoreLink {
                    instance: None,
                    fault: LinkFault::Blackhole,
                },
            });
            ev.push(Event {
                at: t + blackhole_for,
                action: Action::StoreLink {
                    instance: None,
                    fault: LinkFault::None,
                },
            });
        });
        periodic(self.store_blackhole_one_every, 5, &mut |t, r, ev| {
            let instance = Some(r.below(u64::from(instances)) as u32);
            ev.push(Event {
                at: t,
                action: Action::StoreLink {
                    instance,
                    fault: LinkFault::Blackhole,
                },
            });
            ev.push(Event {
                at: t + blackhole_for,
                action: Action::StoreLink {
                    instance,
                    fault: LinkFault::None,
                },
            });
        });
        let link_for = self.link_fault_for;
        periodic(self.store_delay_every, 6, &mut |t, r, ev| {
            let instance = Some(r.below(u64::from(instances)) as u32);
            ev.push(Event {
                at: t,
                action: Action::StoreLink {
                    instance,
                    fault: LinkFault::DelayMs(200),
                },
            });
            ev.push(Event {
                at: t + link_for,
                action: Action::StoreLink {
                    instance,
                    fault: LinkFault::None,
                },
            });
        });
        periodic(self.upstream_fault_every, 7, &mut |t, r, ev| {
            let instance = Some(r.below(u64::from(instances)) as u32);
            let (fault, hold) = match r.below(3) {
                0 => (LinkFault::DelayMs(300), link_for),
                1 => (LinkFault::Blackhole, link_for),
                // A burst of resets: every open exchange is cut, new ones for 100 ms.
                _ => (LinkFault::Reset, Duration::from_millis(100)),
            };
            ev.push(Event {
                at: t,
                action: Action::UpstreamLink { instance, fault },
            });
            ev.push(Event {
                at: t + hold,
                action: Action::UpstreamLink {
                    instance,
                    fault: LinkFault::None,
                },
            });
        });
        periodic(self.store_kill_every, 8, &mut |t, _, ev| {
            ev.push(Event {
                at: t,
                action: Action::StoreKill,
            });
            ev.push(Event {
                at: t + restart_after,
                action: Action::StoreRestart,
            });
        });
        events.sort_by_key(|e| e.at);
        events
    }
}

/// What faults act on.
#[derive(Clone, Debug)]
pub struct World {
    /// The instances, by index.
    pub instances: Vec<Arc<Mutex<Instance>>>,
    /// The clients' view of their addresses.
    pub targets: Arc<Targets>,
    /// One relay per instance between it and the store (empty for the embedded store).
    pub store_relays: Arc<Vec<Relay>>,
    /// One relay per instance between it and the upstream.
    pub upstream_relays: Arc<Vec<Relay>>,
    /// The private store process (Redis or PostgreSQL), if the run owns one.
    pub store: Option<Arc<Mutex<PrivateStore>>>,
    /// The namespaces of a run with real partitions: store link blackholes are routes there.
    pub net: Option<Arc<Net>>,
    /// The run's start.
    pub t0: Instant,
}

impl World {
    fn now_us(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The first instance from `from` on (wrapping) that runs, is not paused and is not being
    /// restarted, locked.
    fn running_from(&self, from: u32) -> Option<tokio::sync::MutexGuard<'_, Instance>> {
        let n = self.instances.len();
        (0..n).find_map(|k| {
            let i = self.instances[(from as usize + k) % n].try_lock().ok()?;
            (i.is_up() && !i.is_paused()).then_some(i)
        })
    }

    /// Restarts instance `n`, retrying every 250 ms for up to 30 s (idemgate exits at start-up
    /// when its store does not answer).
    async fn restart(&self, n: u32) -> (bool, String) {
        let Some(i) = self.instances.get(n as usize) else {
            return (false, "no such instance".into());
        };
        let mut i = i.lock().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut tries = 0;
        loop {
            tries += 1;
            match i.restart().await {
                Ok(done) => {
                    self.targets.set(n as usize, i.addr());
                    return (
                        done,
                        format!("pid {:?} on {} after {tries} tries", i.pid(), i.addr()),
                    );
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return (false, format!("restart failed {tries} times, last: {e}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// Applies one action now. A kill or termination aimed at a paused instance (or one being
    /// restarted) hits the next running one; the record names the instance really hit.
    pub async fn apply(&self, action: &Action) -> FaultRecord {
        let mut action = action.clone();
        let kill = matches!(action, Action::Kill { .. });
        let (applied, note) = match &mut action {
            Action::Kill { instance } | Action::Terminate { instance } => {
                match self.running_from(*instance) {
                    Some(mut i) => {
                        let pid = i.pid();
                        *instance = i.index();
                        let done = if kill {
                            i.kill9().await
                        } else {
                            i.sigterm().await
                        };
                        (done, format!("pid {pid:?}"))
                    }
                    None => (false, NO_RUNNING.into()),
                }
            }
            Action::Restart { instance } => self.restart(*instance).await,
            Action::Pause { instance } => match self.running_from(*instance) {
                Some(mut i) => {
                    *instance = i.index();
                    (i.pause().await, format!("pid {:?}", i.pid()))
                }
                None => (false, NO_RUNNING.into()),
            },
            Action::Resume { instance } => match self.instances.get(*instance as usize) {
                Some(i) => (i.lock().await.resume().await, String::new()),
                None => (false, "no such instance".into()),
            },
            Action::StoreLink { instance, fault } => match &self.net {
                Some(net) => partition(net, *instance, *fault),
                None => set_links(&self.store_relays, *instance, *fault),
            },
            Action::UpstreamLink { instance, fault } => {
                set_links(&self.upstream_relays, *instance, *fault)
            }
            Action::StoreKill => match &self.store {
                Some(r) => (r.lock().await.kill9().await, String::new()),
                None => (false, "no private store".into()),
            },
            Action::StoreRestart => match &self.store {
                Some(r) => {
                    // Retried for up to 30 s: a killed PostgreSQL's old backends may hold its
                    // shared memory for a moment.
                    let mut r = r.lock().await;
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                    loop {
                        match r.restart().await {
                            Ok(done) => break (done, String::new()),
                            Err(e) if tokio::time::Instant::now() >= deadline => {
                                break (false, format!("store restart failed: {e}"));
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                        }
                    }
                }
                None => (false, "no private store".into()),
            },
        };
        if !applied && note == NO_RUNNING {
            // Nothing to hit: everything is down (a restart that failed on a loaded machine, a
            // store that did not come back in time). Bring back what is down instead, so that a
            // soak never idles for the rest of its window.
            if let Some(rec) = Box::pin(self.recover_down()).await {
                return rec;
            }
        }
        FaultRecord {
            at_us: self.now_us(),
            action,
            applied,
            note,
        }
    }

    /// Restarts the private store if it is down, else the first instance that is down (not
    /// paused, not being restarted right now); `None` when nothing is down.
    async fn recover_down(&self) -> Option<FaultRecord> {
        if let Some(store) = &self.store
            && store.try_lock().is_ok_and(|s| s.pid().is_none())
        {
            return Some(self.apply(&Action::StoreRestart).await);
        }
        for n in 0..self.instances.len() {
            let down = self.instances[n]
                .try_lock()
                .is_ok_and(|i| !i.is_up() && !i.is_paused());
            if down {
                return Some(self.apply(&Action::Restart { instance: n as u32 }).await);
            }
        }
        None
    }

    /// Undoes every fault: relays healed, the store and every instance running and resumed.
    pub async fn heal(&self) -> Vec<FaultRecord> {
        let mut out = Vec::new();
        for (relays, store) in [(&self.store_relays, true), (&self.upstream_relays, false)] {
            let partitioned = store && self.net.is_some();
            if partitioned || relays.iter().any(|r| r.fault() != Fault::None) {
                let action = if store {
                    Action::StoreLink {
                        instance: None,
                        fault: LinkFault::None,
                    }
                } else {
                    Action::UpstreamLink {
                        instance: None,
                        fault: LinkFault::None,
                    }
                };
                out.push(self.apply(&action).await);
            }
        }
        if self.store.is_some() {
            let rec = self.apply(&Action::StoreRestart).await;
            if rec.applied {
                out.push(rec);
            }
        }
        for n in 0..self.instances.len() as u32 {
            for action in [
                Action::Resume { instance: n },
                Action::Restart { instance: n },
            ] {
                let rec = self.apply(&action).await;
                if rec.applied {
                    out.push(rec);
                }
            }
        }
        out
    }
}

/// The note of a kill, termination or pause that found nothing to hit.
const NO_RUNNING: &str = "no running, unpaused instance";

fn partition(net: &Net, instance: Option<u32>, fault: LinkFault) -> (bool, String) {
    let cut = match fault {
        LinkFault::Blackhole => true,
        LinkFault::None => false,
        LinkFault::DelayMs(_) | LinkFault::Reset => {
            return (
                false,
                "not applied: no delays or resets through namespaces".into(),
            );
        }
    };
    match net.partition(instance, cut) {
        Ok(n) => (
            n > 0,
            format!("{n} path(s) {}", if cut { "cut" } else { "healed" }),
        ),
        Err(e) => (false, format!("routes not changed: {e}")),
    }
}

fn set_links(relays: &[Relay], instance: Option<u32>, fault: LinkFault) -> (bool, String) {
    let mut n = 0;
    for (i, r) in relays.iter().enumerate() {
        if instance.is_none_or(|x| x as usize == i) {
            r.set(fault.relay());
            n += 1;
        }
    }
    (n > 0, format!("{n} relay(s)"))
}

/// Applies `schedule` (times from `start`) until it ends or `stop` turns true; an instance
/// killed or terminated is restarted `plan.restart_after` later, a paused one resumed
/// `plan.pause_for` later (in the background, so that a restart that must wait for the store
/// delays no other fault). Returns what was done.
pub async fn inject(
    world: &World,
    schedule: &[Event],
    start: tokio::time::Instant,
    plan: &FaultPlan,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<FaultRecord> {
    let (restart_after, pause_for) = (plan.restart_after, plan.pause_for);
    let mut out = Vec::new();
    let mut restarts = tokio::task::JoinSet::new();
    for event in schedule {
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(start + event.at) => {}
            _ = stop.changed() => break,
        }
        let rec = world.apply(&event.action).await;
        let undo = match rec.action {
            Action::Kill { instance } | Action::Terminate { instance } => {
                Some((restart_after, Action::Restart { instance }))
            }
            Action::Pause { instance } => Some((pause_for, Action::Resume { instance })),
            _ => None,
        };
        if let Some((after, undo)) = undo.filter(|_| rec.applied) {
            let world = world.clone();
            restarts.spawn(async move {
                tokio::time::sleep(after).await;
                world.apply(&undo).await
            });
        }
        out.push(rec);
        while let Some(Ok(done)) = restarts.try_join_next() {
            out.push(done);
        }
    }
    while let Some(done) = restarts.join_next().await {
        if let Ok(done) = done {
            out.push(done);
        }
    }
    out.sort_by_key(|r| r.at_us);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_come_every_two_seconds_or_so() {
        let plan = FaultPlan::default();
        let events = plan.schedule(Duration::from_secs(20), 3, &mut Rng::new(1));
        let kills: Vec<_> = events
            .iter()
            .filter(|e| matches!(e.action, Action::Kill { .. }))
            .collect();
        assert!((6..=11).contains(&kills.len()), "{}", kills.len());
        assert!(events.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(
            events
                .iter()
                .all(|e| e.action.instance().is_none_or(|i| i < 3))
        );
    }
}
