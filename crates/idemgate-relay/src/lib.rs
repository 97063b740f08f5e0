//! # idemgate-relay
//!
//! A TCP relay for fault tests: it forwards every connection it accepts on a loopback port to a
//! target address, and can be told, at any time, to **delay** traffic, to **blackhole** it (stop
//! moving bytes in both directions, as a partition does: nothing is lost, it waits in the
//! kernel's buffers and flows again once healed), or to **reset** every connection (RST) and
//! refuse new ones. Real sockets on both sides: the processes under test see a real network.
//!
//! ## Example
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use idemgate_relay::{Fault, Relay};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let target = echo.local_addr()?;
//! tokio::spawn(async move {
//!     let (mut s, _) = echo.accept().await.unwrap();
//!     let mut buf = [0u8; 4];
//!     s.read_exact(&mut buf).await.unwrap();
//!     s.write_all(&buf).await.unwrap();
//! });
//! let relay = Relay::start(target).await?;
//! let mut c = tokio::net::TcpStream::connect(relay.addr()).await?;
//! c.write_all(b"ping").await?;
//! let mut back = [0u8; 4];
//! c.read_exact(&mut back).await?;
//! assert_eq!(&back, b"ping");
//! relay.set(Fault::Blackhole); // from now on nothing moves until `Fault::None`
//! # Ok::<(), std::io::Error>(())
//! # }).unwrap();
//! ```
//!
//! ## Guarantees and limits
//!
//! Faults apply to connections already open and to new ones. A blackhole is a pause, not a loss:
//! the relay stops reading, so TCP flow control holds the peers back (they see no error, as
//! behind a partition that drops packets, until their own timeouts fire). Bytes are forwarded in
//! chunks of at most 16 KiB; a delay applies to each chunk. The relay runs on the caller's tokio
//! runtime and stops (closing every connection) when the [`Relay`] is dropped.
//!
//! ## Errors
//!
//! [`Relay::start`] fails only if it cannot bind its loopback port. A failure to reach the
//! target closes the accepted connection (the client sees a reset or EOF), as a real network
//! would.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the relay does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything at once.
    None,
    /// Hold each chunk this long before forwarding it.
    Delay(Duration),
    /// Move nothing (both directions) until the fault changes; new connections are accepted but
    /// not forwarded either.
    Blackhole,
    /// Reset every open connection and every new one.
    Reset,
}

/// A running relay. Dropping it stops it.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts a relay on a free loopback port, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        Self::start_on(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            target,
        )
        .await
    }

    /// Starts a relay listening on `listen`, forwarding to `target`.
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (fault, watcher) = watch::channel(Fault::None);
        let task = tokio::spawn(accept_loop(listener, target, watcher));
        Ok(Self { addr, fault, task })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the fault, for open connections and new ones.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, fault: watch::Receiver<Fault>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "relay: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let fault = fault.clone();
        connections.spawn(async move {
            let resetting = *fault.borrow() == Fault::Reset;
            if resetting {
                reset(client);
                return;
            }
            relay_one(client, target, fault).await;
        });
        // Reap finished connections so the set stays bounded by the open ones.
        while connections.try_join_next().is_some() {}
    }
}

/// Closes `stream` with a RST instead of a FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn relay_one(client: TcpStream, target: SocketAddr, mut fault: watch::Receiver<Fault>) {
    // A blackholed relay does not even connect onwards until healed.
    if wait_while_blackholed(&mut fault).await.is_err() {
        return;
    }
    let server = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, %target, "relay: target unreachable");
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let up = pump(&mut client_r, &mut server_w, fault.clone());
    let down = pump(&mut server_r, &mut client_w, fault.clone());
    let reset_now = async {
        loop {
            let resetting = *fault.borrow_and_update() == Fault::Reset;
            if resetting {
                return;
            }
            if fault.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        () = reset_now => {
            if let (Ok(c), Ok(s)) = (client_r.reunite(client_w), server_r.reunite(server_w)) {
                reset(c);
                reset(s);
            }
        }
    }
}

/// Waits while the fault is a blackhole; `Err` if the relay is gone or resetting.
async fn wait_while_blackholed(fault: &mut watch::Receiver<Fault>) -> Result<(), ()> {
    loop {
        let now = *fault.borrow_and_update();
        match now {
            Fault::Blackhole => {}
            Fault::Reset => return Err(()),
            _ => return Ok(()),
        }
        fault.changed().await.map_err(|_| ())?;
    }
}

/// Copies `from` to `to` chunk by chunk, applying the fault in force before each read.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if wait_while_blackholed(&mut fault).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // A fault set while the chunk was read applies to it.
        if wait_while_blackholed(&mut fault).await.is_err() {
            return;
        }
        let delay = match *fault.borrow() {
            Fault::Delay(d) => Some(d),
            _ => None,
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
