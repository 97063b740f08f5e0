//! # idemgate-build-support
//!
//! Shared by the build scripts of idemgate's crates whose tests need servers (a
//! build-dependency).
//!
//! For each `(variable, cfg)`, [`service_cfgs`] sets the cfg when the variable is unset or
//! empty, and reruns the build script when it changes. Tests that need the server say
//! `#[cfg_attr(cfg, ignore = "…")]`, so a run without it reports them as IGNORED in its summary
//! instead of passing silently. Under CI (`CI` set) nothing is ignored: a missing server fails.
//!
//! ```no_run
//! // build.rs
//! idemgate_build_support::service_cfgs(&[("IDEMGATE_TEST_REDIS_URL", "no_redis")]);
//! ```
//!
//! Tests that start a server program themselves (the TLS tests run their own `redis-server` and
//! PostgreSQL) use [`program_cfgs`] the same way, with [`on_path`] and [`postgres_bindir`] to find
//! the programs (from the build script, and again from the test):
//!
//! ```no_run
//! // build.rs
//! use idemgate_build_support::{on_path, postgres_bindir, program_cfgs};
//! program_cfgs(&[
//!     (on_path("redis-server").is_some(), "no_redis_server"),
//!     (postgres_bindir().is_some(), "no_postgres_server"),
//! ]);
//! ```

/// Emits the cfgs; see the crate docs.
pub fn service_cfgs(services: &[(&str, &str)]) {
    println!("cargo::rerun-if-env-changed=CI");
    let ci = std::env::var_os("CI").is_some();
    for (var, cfg) in services {
        println!("cargo::rerun-if-env-changed={var}");
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        let missing = std::env::var(var).map_or(true, |v| v.trim().is_empty());
        if missing && !ci {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}

/// For each `(found, cfg)`, sets the cfg when the program was not found, unless under CI (`CI`
/// set), where its tests must fail instead. The build script reruns when `PATH` or `CI` changes
/// (not when a program is installed: `cargo clean -p` the crate then).
pub fn program_cfgs(programs: &[(bool, &str)]) {
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=PATH");
    let ci = std::env::var_os("CI").is_some();
    for (found, cfg) in programs {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if !found && !ci {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}

/// `name`'s path, if it is a file in a directory of `PATH`.
pub fn on_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The directory of PostgreSQL's server programs (`initdb`, `postgres`): the one on `PATH`, else
/// the newest `/usr/lib/postgresql/VERSION/bin` (where Debian and Ubuntu install them, off
/// `PATH`).
pub fn postgres_bindir() -> Option<std::path::PathBuf> {
    if let (Some(initdb), Some(_)) = (on_path("initdb"), on_path("postgres")) {
        return initdb.parent().map(std::path::Path::to_path_buf);
    }
    let mut versions: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}
