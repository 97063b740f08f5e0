//! Marks the TLS store tests ignored when the server programs they start are not installed
//! (never under CI: see `idemgate-build-support`).

use idemgate_build_support::{on_path, postgres_bindir, program_cfgs};

fn main() {
    program_cfgs(&[
        (
            on_path("redis-server").is_some() && on_path("redis-cli").is_some(),
            "no_redis_server",
        ),
        (postgres_bindir().is_some(), "no_postgres_server"),
    ]);
}
