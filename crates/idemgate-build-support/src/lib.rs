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
