//! Real network partitions (scenario 22): every instance in a network namespace of its own, the
//! private Redis in another, joined through the root namespace by veth pairs, with the root
//! namespace routing between them. A partition between an instance and the store is a pair of
//! blackhole routes (the instance's route to the store and the store's route back): the kernel
//! drops every packet of the connections already open, which stall as across a real partition
//! (no reset, no FIN), while a new connection is refused at once (`EINVAL`, no route) rather than
//! after SYN retries. The clients in the root namespace still reach every instance.
//!
//! The machine has neither `netem` nor netfilter, so delays and resets stay on the relays of the
//! loopback runs. Needs root and `ip` (iproute2). Everything made is removed when [`Net`] is
//! dropped, and `net.ipv4.ip_forward` is put back as it was.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// The namespaces, links and routes of one run.
#[derive(Debug)]
pub struct Net {
    tag: String,
    octet: u8,
    instances: u32,
    forward_before: Option<String>,
}

const FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

fn ip(args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Net {
    /// Creates a namespace for the store and one for each of `instances`, links and routes.
    pub fn create(instances: u32) -> std::io::Result<Self> {
        static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let me = Self {
            // Names and a second octet of the run's own, so that runs (in one process or in
            // several) do not collide, even while a namespace of an earlier run lingers.
            tag: format!("igc{}r{}", pid % 10_000, run % 100),
            octet: 100 + ((pid + run * 37) % 100) as u8,
            instances,
            forward_before: std::fs::read_to_string(FORWARD).ok(),
        };
        std::fs::write(FORWARD, "1")?;
        me.link(&me.store_ns(), 200)?;
        for i in 0..instances {
            me.link(&me.instance_ns(i), i as u8)?;
        }
        Ok(me)
    }

    fn link(&self, ns: &str, subnet: u8) -> std::io::Result<()> {
        let host = format!("{ns}h");
        let (outer, inner) = (self.host_ip(subnet), self.guest_ip(subnet));
        ip(&["netns", "add", ns])?;
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["addr", "add", &format!("{outer}/30"), "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["link", "set", "lo", "up"])?;
        inside(&["addr", "add", &format!("{inner}/30"), "dev", "eth0"])?;
        inside(&["link", "set", "eth0", "up"])?;
        inside(&["route", "add", "default", "via", &outer.to_string()])
    }

    fn host_ip(&self, subnet: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, subnet, 1)
    }

    fn guest_ip(&self, subnet: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, subnet, 2)
    }

    /// The store's namespace.
    pub fn store_ns(&self) -> String {
        format!("{}s", self.tag)
    }

    /// Instance `i`'s namespace.
    pub fn instance_ns(&self, i: u32) -> String {
        format!("{}i{i}", self.tag)
    }

    /// The store's address (inside its namespace).
    pub fn store_ip(&self) -> Ipv4Addr {
        self.guest_ip(200)
    }

    /// Instance `i`'s address (inside its namespace).
    pub fn instance_ip(&self, i: u32) -> Ipv4Addr {
        self.guest_ip(i as u8)
    }

    /// The root namespace's address on instance `i`'s link (where its upstream relay listens).
    pub fn root_ip_for(&self, i: u32) -> Ipv4Addr {
        self.host_ip(i as u8)
    }

    /// Cuts (`cut`) or heals the path between the store and instance `instance` (every instance
    /// with `None`). Healing a path that is not cut, or cutting one that is, changes nothing.
    pub fn partition(&self, instance: Option<u32>, cut: bool) -> std::io::Result<u32> {
        let verb = if cut { "add" } else { "del" };
        let mut changed = 0;
        for i in (0..self.instances).filter(|i| instance.is_none_or(|x| x == *i)) {
            let to_store = format!("{}/32", self.store_ip());
            let to_instance = format!("{}/32", self.instance_ip(i));
            let a = ip(&[
                "netns",
                "exec",
                &self.instance_ns(i),
                "ip",
                "route",
                verb,
                "blackhole",
                &to_store,
            ]);
            let b = ip(&[
                "netns",
                "exec",
                &self.store_ns(),
                "ip",
                "route",
                verb,
                "blackhole",
                &to_instance,
            ]);
            if a.is_ok() || b.is_ok() {
                changed += 1;
            }
        }
        Ok(changed)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // The root end of each veth pair first (which deletes the pair even if a process is
        // still inside the namespace), then the namespaces.
        let _ = ip(&["link", "del", &format!("{}h", self.store_ns())]);
        let _ = ip(&["netns", "del", &self.store_ns()]);
        for i in 0..self.instances {
            let _ = ip(&["link", "del", &format!("{}h", self.instance_ns(i))]);
            let _ = ip(&["netns", "del", &self.instance_ns(i)]);
        }
        if let Some(v) = &self.forward_before {
            let _ = std::fs::write(FORWARD, v.trim());
        }
    }
}
