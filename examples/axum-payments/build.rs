//! Marks the tests that need a server ignored when its variable is unset (see `idemgate-build-support`).

fn main() {
    idemgate_build_support::service_cfgs(&[
        ("IDEMGATE_TEST_REDIS_URL", "no_redis"),
        ("IDEMGATE_TEST_POSTGRES_URL", "no_postgres"),
    ]);
}
