//! Marks the Redis tests ignored when their server's variable is unset (see the included file).

fn main() {
    idemgate_build_support::service_cfgs(&[
        ("IDEMGATE_TEST_REDIS_URL", "no_redis"),
        ("IDEMGATE_TEST_REDIS_CLUSTER_URLS", "no_redis_cluster"),
    ]);
}
