//! expiry (optional, with a TTL): after the TTL, the key is new: a retry runs again.

use std::time::{Duration, Instant};

use super::{Cx, Ran, Stop, Variant};

pub(super) async fn run(cx: &mut Cx<'_>) -> Result<String, Stop> {
    let Some(ttl) = cx.config.ttl else {
        return Err(Stop::Skip("no --ttl".into()));
    };
    let g = cx.group();
    let req = cx.group_request(&g, Variant::Main, None).await?;
    let first = cx.send_ok("first", &req).await?;
    cx.expect_success("first", &first)?;
    let before = cx.count(&g).await?;
    // The TTL runs from when the server stored the outcome, which is before its answer arrived
    // here: after `ttl` from now it has passed there too. Stores that expire lazily or by a
    // sweeper get a grace of a fifth of the TTL (at least 1 s), retried every 200 ms.
    tokio::time::sleep(ttl).await;
    let grace = (ttl / 5).max(Duration::from_secs(1));
    let deadline = Instant::now() + grace;
    let mut tries = 0;
    loop {
        tries += 1;
        let retry = cx.send_ok("retry after the TTL", &req).await?;
        let delta = cx.effects_since(&g, before).await?;
        match cx.ran_again(delta, &first, &retry) {
            Ran::Yes => {
                return Ok(format!(
                    "the key was new after {ttl:?} (+{tries} tries): {}",
                    retry.status
                ));
            }
            Ran::Unknown => {
                return Err(Stop::Error(
                    "whether the retry after the TTL ran again cannot be seen: no effect_probe, no identity, no replay marker, and the same body as the first answer. Add an effect_probe (or an identity) to the operation".into(),
                ));
            }
            Ran::No if Instant::now() >= deadline => {
                cx.fail(format!(
                    "the key still replays {:?} after the TTL of {ttl:?}",
                    grace
                ));
                return Ok(String::new());
            }
            Ran::No => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
