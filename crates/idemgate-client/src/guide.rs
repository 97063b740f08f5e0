//! # Guide: the defaults, and why
//!
//! Each default below is set against the clients that define current practice: the **AWS SDKs'
//! standard retry mode**, **Stripe's SDKs** (the model for `Idempotency-Key` clients),
//! **gRPC's retry throttling**, **Envoy's retry budgets** and outlier detection, and
//! **resilience4j**'s circuit breaker.
//!
//! ## Attempts and backoff
//!
//! | setting | default | anchors | why |
//! | --- | --- | --- | --- |
//! | `max_attempts` | 3 | AWS standard: 3 attempts; Stripe: 1–2 network retries (2–3 attempts); Envoy: 1 retry | Two retries absorb a blip (a restart, a dropped connection) without tripling an outage's load for long — the budget and breaker take over after that. |
//! | `base_delay` | 500 ms | Stripe: 0.5 s initial delay; AWS: 1 s; Envoy: 25 ms | Stripe's value: an API client across a network, where the next attempt should land after a restart or failover has had a moment, not within Envoy's in-mesh 25 ms. |
//! | `max_delay` | 20 s | AWS standard: 20 s `MAX_BACKOFF`; Stripe: 2–5 s | With 3 attempts the cap is never reached (ceilings 0.5 s, 1 s); it bounds users who raise `max_attempts`, at AWS's value. |
//! | jitter | full: `U[0, ceiling)` | AWS standard (full jitter); Stripe: `[ceiling/2, ceiling]` | Full jitter spreads synchronized clients best (AWS Architecture Blog, "Exponential Backoff and Jitter"); the mean delay is half the ceiling. |
//! | `deadline` | none | AWS: no operation timeout by default; Stripe: 80 s per request | A deadline that fits every operation does not exist (a report-generating POST may take a minute); with the defaults an operation's waits sum to at most 1.5 s plus `Retry-After`s. Set one when the caller has its own deadline: it counts from the call, reading a streamed request body included. Every duration setting is at most 24 h. |
//! | `attempt_timeout` | none | AWS: `apiCallAttemptTimeout` unset | The HTTP client's own timeouts apply (reqwest's `timeout`, hyper's); this adds one per attempt, up to the response head. |
//!
//! ## `Retry-After`
//!
//! | setting | default | anchors | why |
//! | --- | --- | --- | --- |
//! | honoured | always, never undercut | Stripe honours it up to 60 s; reqwest-retry cannot (reqwest-middleware#146) | The server knows when it will be ready; waiting less wastes an attempt and adds load exactly when the server asked for less. An HTTP date is measured from the answer's `Date` header (RFC 9110 §10.2.3), so the client's clock skew does not shorten or stretch it. |
//! | `retry_after_cap` | 60 s | stripe-python's `MAX_RETRY_AFTER` = 60 s | Beyond it the client stops and returns the answer (it does not shorten the wait, as Stripe does, which would undercut it). |
//! | `retry_after_jitter` | +20 %, at least `base_delay` | — | `Retry-After` is in whole seconds, so every client told `1` would wake on the same tick; the spread is above the value, so it is never undercut. |
//! | `409` in flight | waited out, up to 10 times, no attempt or token used | Stripe retries every `409` (stripity-stripe#564 asks for it) | idemgate's `409` means "the first attempt is still running": waiting is the only useful answer, and it costs the server nothing. A `409` without idemgate's problem type and without `Retry-After` is a real conflict: final. |
//!
//! ## What is retried
//!
//! | outcome | default | anchors |
//! | --- | --- | --- |
//! | statuses | 408, 425, 429, 500, 502, 503, 504 | AWS: 500, 502, 503, 504 + throttling (429); Stripe: 409, 429 via `Stripe-Should-Retry`, ≥ 500; idemgate releases the key on 408, 425, 429, 502, 503, 504 |
//! | `500` | retried | AWS and Stripe retry it; idemgate stores a `500`, so behind idemgate the retry is answered by a replay (final) at the cost of one request |
//! | transport | refused → retried (not sent); timeout/reset → retried with a key or an idempotent method | Stripe retries connection errors for keyed requests; RFC 9110 §9.2.2 |
//! | keys | UUID v7 for POST, PATCH | Stripe keys every POST with a UUID v4; idemgate covers POST and PATCH by default; v7 keeps the store's index inserts local (v4 available) |
//! | `key_hosts` | every host honours keys | Stripe's SDKs talk only to Stripe, which honours them | The client's purpose is to sit in front of idemgate. A key sent to a server that ignores it protects nothing: name the hosts that honour it when the client calls others too, and a POST to any other host is resent only when provably not sent. |
//! | upstream-failed `502` | not resent for POST/PATCH: [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown) with `unprotected: true` | — | idemgate forwarded the request without protection (uncovered route, or `fail_mode = "open"` during a store outage) and lost the answer: the effect may have happened and a resend would not be deduplicated. |
//!
//! ## Retry budget
//!
//! | setting | default | anchors | why |
//! | --- | --- | --- | --- |
//! | bucket | 500 tokens, per host | AWS standard: `INITIAL_RETRY_TOKENS` = 500 | — |
//! | `retry_cost` | 5 | AWS: `RETRY_COST` = 5 | 100 retries from a full bucket. |
//! | `timeout_cost` | 10 | AWS: `TIMEOUT_RETRY_COST` = 10 | Timeouts and broken connections are the signature of an overloaded or unreachable server: half as many retries. |
//! | `success_refund` | 1 (or the last retry's cost) | AWS: `NO_RETRY_INCREMENT` = 1, a successful retry returns its cost | Under normal operation the bucket stays full; during a total outage it drains and stays drained, so retries stop. |
//! | arithmetic | thousandths of a token | gRPC throttling: `tokenRatio` to 3 decimals; tower#857 over-allocated fractional rates | Exact for three-decimal rates; otherwise rounded against the retrier. |
//!
//! gRPC's throttling (retries only while tokens > max/2, −1 per failure, +`tokenRatio` per
//! success) and Envoy's budget (retries in flight ≤ 20 % of requests in flight, min 3) bound the
//! same thing differently: gRPC by a token level, Envoy by concurrency. The AWS bucket is chosen
//! because it needs no notion of concurrency (a client library does not see its siblings' load)
//! and because, with no time-based refill, an outage's extra load is a constant (100 retries per
//! host), not a rate.
//!
//! ## Circuit breaker
//!
//! | setting | default | anchors | why |
//! | --- | --- | --- | --- |
//! | window | last 20 calls (count-based) | resilience4j: count-based, 100 | A client of one API sees far fewer calls per host than a service mesh; 20 makes the rate meaningful within seconds. |
//! | `min_calls` | 10 | resilience4j: 100 (= window) | No verdict on a handful of calls. |
//! | `failure_rate` | 50 % | resilience4j: 50 % | — |
//! | `consecutive_failures` | 5 | Envoy outlier detection: `consecutive_5xx` = 5 | A burst of failures trips the breaker without waiting for the window. |
//! | `open_for` | 10 s | resilience4j: 60 s; Envoy: 30 s base ejection | Short enough that a recovered server is found within one user-visible retry horizon; each failed probe costs one request per period. |
//! | `half_open_probes` | 3 | resilience4j: 10 | Fewer probes: one failure reopens at once, three successes close. A probe out for `open_for` without an answer counts as failed (resilience4j: `maxWaitDurationInHalfOpenState`), so a server that accepts and never answers cannot hold the breaker half-open. |
//! | what counts | transport failures, 500/502/503/504, outcome-unknown | resilience4j records exceptions | A `4xx` is not the server's fault; `408`/`425`/`429`/`409` are the server pacing the client (not counted). |
//! | a call is | an operation (its final outcome), not an attempt | resilience4j: depends on decorator order; `CircuitBreaker(Retry(call))` counts operations | An API that fails each key's first attempts (a cold cache, idemgate releasing a key on `503`) would otherwise trip the breaker although every operation succeeds: with 3 attempts, `F, F, S` per operation is 67 % failures. Retries are bounded by the budget instead; the breaker judges whether operations succeed. Under a full outage it opens after 5 operations (15 requests) instead of 5 requests. |
//!
//! ## Bodies
//!
//! `body_limit` = 8 MiB, idemgate's own `max_request_body`: a larger body would be refused with
//! `413` there anyway. Bodies already in memory (bytes) are resent without copying.
//!
//! ## Measured
//!
//! **Amplification** — requests the server sees per logical request while it fails 100 % of
//! them, default policy otherwise:
//!
//! | budget | breaker | in-process server, paused clock, seed 1: 1000 requests, one per 50 ms (`tests/amplification.rs`, deterministic) | through `idemgate serve`, real sockets: 1000 requests from 10 tasks (`crates/idemgate/tests/client_amplification.rs`, one run) |
//! | --- | --- | --- | --- |
//! | off | off | 3.000 | 3.000 |
//! | on | off | 1.100 | 1.100 |
//! | off | on | 0.041 | 0.034 |
//! | on | on | 0.041 | 0.033 |
//!
//! Without either, every operation makes its 3 attempts. The budget alone allows exactly
//! 500 / 5 = 100 retries per host and then none (nothing succeeds, so nothing refunds): 1 + 100/N.
//! With the breaker, 5 failed operations in a row open it (the breaker counts operations, not
//! attempts): the operations started until then (one every 50 ms, each taking up to 1.5 s of
//! backoff) send 37 requests; every request then fails fast
//! ([`Error::CircuitOpen`](crate::Error::CircuitOpen)) except one half-open probe per 10 s, which
//! fails and reopens it: 37 + 4 probes over the 50 s run = 41 requests for 1000. Both together:
//! the breaker dominates. Goal of issue 12 (≤ 1.1× with both): met.
//!
//! **Overhead on a healthy server** (`benches/overhead_ratio.rs`, interleaved batches, ratio per
//! round): about 1.8 µs per request of the client's own work (a tower service answering in
//! process: 0.36 µs bare, 2.1 µs behind `tower::RetryLayer`), and a ratio of 1.14
//! (interquartile range 1.13–1.17) for a POST to a loopback hyper server with reqwest
//! (20.3 µs → 23.1 µs), on 2 shared vCPUs with other builds running. Against an API across a
//! network (≥ 1 ms per request) the ratio is below 1.003. The README's client section has the
//! table and conditions.
