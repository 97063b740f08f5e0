//! A directory one process owns: an exclusive `flock` on `DIR/LOCK`, held until dropped.
//!
//! The embedded stores take it before they touch their files (fjall 2 does not lock its
//! directory, and two processes replaying and appending to one journal would corrupt it), and
//! `idemgate-stores` takes it on a `file:` directory before choosing its engine. The lock is
//! advisory (it binds idemgate processes, not `rm`), is released by the kernel when the process
//! dies (a `kill -9` never leaves it stale), and, being per open file description, also refuses
//! a second open in the same process. It needs a local filesystem (on NFS `flock` is emulated
//! with per-process locks, so a second open in one process would not be refused) and a unix
//! (elsewhere [`DirLock::acquire`] locks nothing: no portable lock exists below rust 1.89).
//!
//! ```
//! use idemgate_core::dir_lock::DirLock;
//! let dir = std::env::temp_dir().join(format!("idemgate-lock-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let held = DirLock::acquire(&dir)?;
//! # #[cfg(unix)]
//! assert!(DirLock::acquire(&dir).is_err(), "held");
//! drop(held);
//! DirLock::acquire(&dir)?;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::{File, OpenOptions};
use std::path::Path;

use crate::error::{ErrorKind, StoreError};

/// Holds the lock on a directory until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks `dir` (which must exist): [`ErrorKind::Config`] saying it is "in use" when another
    /// holder has it, [`ErrorKind::Unavailable`] when the lock file cannot be opened or locked.
    pub fn acquire(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("LOCK");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| {
                StoreError::new(
                    ErrorKind::Unavailable,
                    format!("opening the lock file {}", path.display()),
                )
                .with_source(e)
            })?;
        try_lock(&file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                StoreError::new(
                    ErrorKind::Config,
                    format!(
                        "{} is in use by another idemgate process (or already open in this one)",
                        dir.display()
                    ),
                )
            } else {
                StoreError::new(
                    ErrorKind::Unavailable,
                    format!("locking {}", path.display()),
                )
                .with_source(e)
            }
        })?;
        Ok(Self { _file: file })
    }
}

#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<()> {
    rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(std::io::Error::from)
}

#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<()> {
    // No portable lock below rust 1.89 (`File::try_lock`); this platform is not a release
    // target of idemgate. Documented in the crate docs' "Exclusive".
    Ok(())
}
