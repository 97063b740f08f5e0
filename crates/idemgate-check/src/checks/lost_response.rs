//! lost-response: the whole request is written, the connection closed before the answer; a retry
//! with the same key → success, one effect.

use std::time::{Duration, Instant};

use super::{Cx, Stop, Variant};

pub(super) async fn run(cx: &mut Cx<'_>) -> Result<String, Stop> {
    let g = cx.group();
    let before = cx.count(&g).await?;
    let req = cx.group_request(&g, Variant::Main, None).await?;
    cx.send_and_close("sent, answer never read", &req).await?;
    // With a probe, the lost request's effect is the signal that it ran: wait for it (a server
    // may also drop a request whose client went away; then, after `settle`, the retry runs it).
    if before.is_some() {
        let deadline = Instant::now() + cx.config.settle;
        loop {
            let seen = cx.effects_since(&g, before).await?.unwrap_or(0);
            if seen >= 1 {
                cx.note("the lost request took effect before the retry");
                break;
            }
            if Instant::now() >= deadline {
                cx.note(format!(
                    "the lost request showed no effect within {:?}; retrying anyway",
                    cx.config.settle
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let retry = cx.send_ok("retry", &req).await?;
    let retry = cx.settle("retry after 409", &req, retry).await?;
    if !retry.status.is_success() {
        cx.fail(format!(
            "the retry of a request whose answer was lost was answered {}, not a success {}",
            retry.status,
            super::preview(&retry.body)
        ));
    }
    let effects = cx.effects_since(&g, before).await?;
    match effects {
        Some(1) => {}
        Some(n) => cx.fail(format!(
            "{n} effects for a request whose answer was lost and its retry (the probe counts them)"
        )),
        None => {
            // Without a probe: the retry's outcome must be the key's outcome from now on.
            let again = cx.send_ok("retry again", &req).await?;
            if let Err(diff) = cx.same_outcome(&retry, &again)? {
                cx.fail(format!("a second retry got another outcome: {diff}"));
            }
        }
    }
    Ok(format!(
        "retry answered {}{}{}",
        retry.status,
        if retry.replayed() { " (replay)" } else { "" },
        effects.map_or(String::new(), |n| format!("; {n} effect"))
    ))
}
