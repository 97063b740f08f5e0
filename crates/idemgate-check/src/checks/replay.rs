//! replay: the same request twice with one key → same status, byte-identical body (minus
//! `volatile`), one effect; the replay marker is reported (required with `strict_marker`).

use super::{Cx, Stop, Variant};

pub(super) async fn run(cx: &mut Cx<'_>) -> Result<String, Stop> {
    let g = cx.group();
    let before = cx.count(&g).await?;
    let req = cx.group_request(&g, Variant::Main, None).await?;
    let first = cx.send_ok("first", &req).await?;
    cx.expect_success("first", &first)?;
    let retry = cx.send_ok("retry", &req).await?;
    // A store that records the outcome a moment after answering may still call the key in
    // flight: `409` + `Retry-After` is followed, as a client would.
    let retry = cx.settle("retry after 409", &req, retry).await?;
    if retry.status != first.status {
        cx.fail(format!(
            "the retry was answered {}, the first request {}",
            retry.status, first.status
        ));
    }
    if let Err(diff) = cx.same_body(&first, &retry)? {
        cx.fail(format!(
            "the retry's body is not the first answer's: {diff}"
        ));
    }
    if cx.op.identity.is_some() {
        let (a, b) = (cx.identity(&first), cx.identity(&retry));
        if a != b {
            cx.fail(format!(
                "the retry names another resource: {} vs {}",
                super::show(&a),
                super::show(&b)
            ));
        }
    }
    let effects = cx.effects_since(&g, before).await?;
    if let Some(n) = effects
        && n != 1
    {
        cx.fail(format!(
            "{n} effects for one key sent twice (the probe counts them)"
        ));
    }
    let marked = retry.replayed();
    if !marked {
        let message = "the retry was not marked `Idempotent-Replayed: true`";
        if cx.config.strict_marker {
            cx.fail(format!("{message} (--strict-marker)"));
        } else {
            cx.warn(message);
        }
    }
    Ok(format!(
        "both answered {}, same body{}{}",
        first.status,
        if marked { ", replay marked" } else { "" },
        effects.map_or(String::new(), |n| format!(", {n} effect"))
    ))
}
