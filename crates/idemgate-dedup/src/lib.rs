//! # idemgate-dedup
//!
//! Exactly-once message processing on top of at-least-once delivery (NATS JetStream, RabbitMQ,
//! SQS, Kafka…): brokers redeliver after a consumer dies or an ack times out, and publishers
//! re-publish. This crate turns those repeats into one run.
//!
//! ## Overview
//!
//! - [`Deduplicator::process_once`]`(consumer, message_id, handler)` over any idemgate
//!   [`Store`](idemgate_core::Store) (memory, embedded, Redis, PostgreSQL, DynamoDB — open one
//!   with `idemgate-stores`): the first delivery runs the handler under a lease with
//!   heartbeats and records its result; a redelivery gets the recorded result without running;
//!   a delivery while another consumer holds the lease gets [`Processed::InProgress`] (nack
//!   with a delay); a consumer that dies mid-handler loses its lease when it expires, and the
//!   next delivery runs the handler at epoch + 1 (its late writes are fenced off). Each
//!   outcome says what to tell the broker: [`Processed::action`].
//! - [`MessageId`]: the message's own id, or (opt-in) a hash of its content.
//! - The PostgreSQL inbox, on either driver Rust services use: [`inbox::PgInbox`] (feature
//!   `postgres`, tokio-postgres) and [`inbox::SqlxInbox`] (feature `sqlx`): the dedup row and the
//!   handler's own writes in ONE transaction of the application's database — exactly-once
//!   effects even across crashes. Both share one implementation of the statements and the
//!   decisions, answer the same [`inbox::InboxOutcome`], and can share one table.
//! - [`DedupStats`]: processed, duplicates, in progress, re-executions, dead-lettered, …
//!
//! The engine underneath is idemgate-core's, the one `idemgate serve` runs HTTP requests
//! through; the message twin of the proxy, `idemgate consume`, is built on this crate.
//!
//! ## Example
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use idemgate_core::MemoryStore;
//! use idemgate_dedup::{Action, Deduplicator, Handled, MessageId, Processed};
//!
//! let dedup = Deduplicator::builder(MemoryStore::default()).build();
//! let charges = Arc::new(AtomicUsize::new(0));
//! let id = MessageId::new("order-42").expect("an id");
//!
//! // The broker delivers the message three times.
//! for delivery in 0..3 {
//!     let charges = charges.clone();
//!     let processed = dedup
//!         .process_once("billing", &id, move |_dispatch| async move {
//!             charges.fetch_add(1, Ordering::SeqCst);
//!             Handled::done("charged")
//!         })
//!         .await?;
//!     assert_eq!(processed.action(), Action::Ack);
//!     if delivery > 0 {
//!         assert!(matches!(processed, Processed::Duplicate { epoch: 1, .. }));
//!     }
//! }
//! assert_eq!(charges.load(Ordering::SeqCst), 1);
//! assert_eq!(dedup.stats().duplicates.load(Ordering::Relaxed), 2);
//! # Ok::<(), idemgate_dedup::DedupError>(())
//! # }).unwrap();
//! ```
//!
//! ## Guarantees
//!
//! **Store-based dedup ([`Deduplicator`]): at most once per epoch.** Per `(consumer, message
//! id)` within the record's TTL, the handler runs at most once per epoch, and a new epoch opens
//! only after the holder's lease expired (it died, or could not renew) — never while it
//! heartbeats (PRODUCT G1, G4). A consumer killed after its handler's effect but before the
//! result was recorded is therefore re-run at the next epoch: the handler receives the epoch
//! ([`Dispatch::epoch`](idemgate_core::engine::Dispatch)), and the number of such re-executions
//! is counted ([`DedupStats::reexecutions`]). Choose [`Recovery::Strict`] to never re-run
//! (the message becomes outcome-unknown and is dead-lettered instead). A redelivery after the
//! TTL runs again (G5). Stores that can lose acknowledged writes weaken this (see
//! `idemgate-stores`).
//!
//! **PostgreSQL inbox ([`inbox::PgInbox`], [`inbox::SqlxInbox`]): exactly-once effects** on
//! the database the inbox lives in, because the dedup row and the effects commit or roll back
//! together; no lease, no epoch. Effects outside that database are not covered. The inbox's lock
//! timeout bounds only its own insert: the application's `lock_timeout` is back in force for
//! the handler. Shown against a real PostgreSQL (a killed connection before and after the
//! effect, 16 deliveries of one id racing, 8 consumers × 200 messages, handler errors and
//! aborted transactions), on both drivers; and end to end (`examples/message-consumer`, on
//! tokio-postgres): a consumer of NATS JetStream and one of RabbitMQ, SIGKILLed 10 times over
//! 10,000 messages with ~20 % re-published duplicates, leave effects == distinct messages with
//! nothing pending and nothing dead-lettered.
//!
//! Ack only when [`Processed::action`] says [`Action::Ack`]: then the outcome is recorded.
//!
//! ## Feature flags
//!
//! - `postgres`: [`inbox::PgInbox`] on tokio-postgres.
//! - `sqlx`: [`inbox::SqlxInbox`] on sqlx 0.8 (only its `postgres` and `runtime-tokio`
//!   features: no TLS, no macros; enable sqlx's TLS features in your own crate if you need
//!   them — Cargo unifies them).
//!
//! Without either, the crate is the store-based [`Deduplicator`] only.
//!
//! ## Errors
//!
//! [`DedupError`]: the store failed (a stable [`kind`](DedupError::kind)); nothing was recorded
//! by the call: nack, and the redelivery decides again. "Duplicate", "in progress",
//! "unknown" are [`Processed`] values, not errors. The inbox returns [`inbox::InboxError`]
//! (tokio-postgres) or [`inbox::SqlxInboxError`] (sqlx): the handler's error or the driver's
//! (including a transaction the handler left aborted), in every case with nothing committed —
//! nack. "Duplicate" and "in progress" are [`inbox::InboxOutcome`] values.
//!
//! ## Bounds
//!
//! The deduplicator keeps no queue of its own: each `process_once` is one claim and at most one
//! handler run; a delivery that would have to wait is answered [`Processed::InProgress`] at
//! once. The caller bounds concurrency (how many deliveries it processes at once).

mod dedup;
mod message_id;

#[cfg(any(feature = "postgres", feature = "sqlx"))]
pub mod inbox;

pub use dedup::{
    Action, DedupError, DedupStats, Deduplicator, DeduplicatorBuilder, Handled, Processed,
};
pub use idemgate_core::engine::{Dispatch, Recorded, Recovery};
pub use idemgate_core::record::{Outcome, StoredResponse};
pub use message_id::MessageId;
