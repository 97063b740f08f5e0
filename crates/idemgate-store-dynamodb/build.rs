//! Marks the DynamoDB tests ignored when their server's variable is unset (see the included
//! file).

include!("../../build-support/service_cfgs.rs");

fn main() {
    service_cfgs(&[("IDEMGATE_TEST_DYNAMODB_URL", "no_dynamodb")]);
}
