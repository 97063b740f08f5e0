//! Marks the tests that need a server ignored when its variable is unset (see the included
//! file).

include!("../../build-support/service_cfgs.rs");

fn main() {
    service_cfgs(&[
        ("IDEMGATE_TEST_REDIS_URL", "no_redis"),
        ("IDEMGATE_TEST_POSTGRES_URL", "no_postgres"),
    ]);
}
