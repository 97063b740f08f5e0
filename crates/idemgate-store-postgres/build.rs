//! Marks the PostgreSQL tests ignored when their server's variable is unset (see `idemgate-build-support`).

fn main() {
    idemgate_build_support::service_cfgs(&[("IDEMGATE_TEST_POSTGRES_URL", "no_postgres")]);
}
