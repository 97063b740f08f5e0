//! Marks the DynamoDB tests ignored when their server's variable is unset (see `idemgate-build-support`).

fn main() {
    idemgate_build_support::service_cfgs(&[("IDEMGATE_TEST_DYNAMODB_URL", "no_dynamodb")]);
}
