//! Marks the tests that need a server ignored when its variable is unset (see `idemgate-build-support`).

fn main() {
    idemgate_build_support::service_cfgs(&[
        ("IDEMGATE_TEST_REDIS_URL", "no_redis"),
        ("IDEMGATE_TEST_REDIS_CLUSTER_URLS", "no_redis_cluster"),
        ("IDEMGATE_TEST_POSTGRES_URL", "no_postgres"),
        ("IDEMGATE_TEST_DYNAMODB_URL", "no_dynamodb"),
        ("IDEMGATE_TEST_NATS_URL", "no_nats"),
        ("IDEMGATE_TEST_AMQP_URL", "no_amqp"),
    ]);
}
