//! Marks the tests that need a server ignored when its variable is unset (see `idemgate-build-support`).

fn main() {
    idemgate_build_support::service_cfgs(&[
        ("IDEMGATE_TEST_NATS_URL", "no_nats"),
        ("IDEMGATE_TEST_AMQP_URL", "no_amqp"),
        ("IDEMGATE_TEST_POSTGRES_URL", "no_postgres"),
    ]);
}
