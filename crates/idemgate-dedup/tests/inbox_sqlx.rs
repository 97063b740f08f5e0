//! The PostgreSQL inbox on sqlx ([`SqlxInbox`](idemgate_dedup::inbox::SqlxInbox)) against
//! a real server (`IDEMGATE_TEST_POSTGRES_URL`): the cases of `inbox_suite`, which
//! `inbox_postgres.rs` runs on tokio-postgres. Ignored without the variable (CI fails instead).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod inbox_suite;

use inbox_suite::{CrashPoint, Sqlx};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn connection_killed_before_the_effect_leaves_neither() {
    inbox_suite::crash_at::<Sqlx>(CrashPoint::BeforeEffect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn connection_killed_after_the_effect_leaves_neither() {
    inbox_suite::crash_at::<Sqlx>(CrashPoint::AfterEffect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn handler_error_rolls_back_the_dedup_row() {
    inbox_suite::handler_error_rolls_back_the_dedup_row::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn a_handler_that_swallows_a_failed_statement_is_not_processed() {
    inbox_suite::a_handler_that_swallows_a_failed_statement_is_not_processed::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn a_handler_that_rolls_back_itself_is_not_processed() {
    inbox_suite::a_handler_that_rolls_back_itself_is_not_processed::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn concurrent_consumers_apply_each_message_once() {
    inbox_suite::concurrent_consumers_apply_each_message_once::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn racing_deliveries_of_one_message_run_once() {
    inbox_suite::racing_deliveries_of_one_message_run_once::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn open_transaction_elsewhere_is_in_progress() {
    inbox_suite::open_transaction_elsewhere_is_in_progress::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn the_applications_lock_timeout_is_intact_in_the_handler() {
    inbox_suite::the_applications_lock_timeout_is_intact_in_the_handler::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn the_two_drivers_share_one_table() {
    inbox_suite::the_two_drivers_share_one_table().await;
}
