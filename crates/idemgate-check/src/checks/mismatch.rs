//! mismatch: same key, different body → `422` (another `4xx` is a warning), and no new effect:
//! the probe does not move, and the first request's retry still gets the first outcome.

use super::{Cx, Stop, Variant};

pub(super) async fn run(cx: &mut Cx<'_>) -> Result<String, Stop> {
    let g = cx.group();
    let before = cx.count(&g).await?;
    let req = cx.group_request(&g, Variant::Main, None).await?;
    let first = cx.send_ok("first", &req).await?;
    cx.expect_success("first", &first)?;
    let other = other_body(cx, &g, &req)?;
    let mut changed = req.clone();
    changed.body = other;
    let second = cx.send_ok("same key, other body", &changed).await?;
    // A server still recording the first outcome may answer 409 in flight: wait it out, then
    // judge 422 against a replay.
    let second = cx
        .settle("same key, other body after 409", &changed, second)
        .await?;
    let status = second.status.as_u16();
    match status {
        422 => {}
        400..=499 => cx.warn(format!(
            "the other body was answered {status}; the IETF draft asks for 422"
        )),
        _ => cx.fail(format!(
            "the same key with another body was answered {status}, not 422{}",
            if second.replayed() {
                " (the first answer was replayed: the body is ignored)"
            } else {
                ""
            }
        )),
    }
    let effects = cx.effects_since(&g, before).await?;
    if let Some(n) = effects
        && n != 1
    {
        cx.fail(format!(
            "{n} effects after the first request and one with another body under its key"
        ));
    }
    // The first request's record must be intact: its retry gets its outcome.
    let again = cx.send_ok("first again", &req).await?;
    let again = cx.settle("first again after 409", &req, again).await?;
    if let Err(diff) = cx.same_outcome(&first, &again)? {
        cx.fail(format!(
            "after the mismatch, a retry of the first request no longer gets its outcome: {diff}"
        ));
    }
    Ok(format!(
        "another body under the key: {status}{}",
        effects.map_or(String::new(), |n| format!("; {n} effect"))
    ))
}

/// The note of a fallback body (`{}`: what was changed).
const GUESS: &str = "the other body is a guess ({}): the body renders the same for every group and there is no mismatch_body; a server that ignores this difference is right to replay";

/// The body the second request carries: `mismatch_body`, else the body rendered again with new
/// values, else the JSON object with one more member, else the body with a byte more.
fn other_body(
    cx: &mut Cx<'_>,
    g: &crate::template::Group,
    req: &crate::client::Req,
) -> Result<bytes::Bytes, Stop> {
    let sibling = cx.sibling(g);
    if let Some(t) = &cx.op.mismatch_body {
        let r = cx.request(&sibling, Variant::Main, Some(t))?;
        if r.body != req.body {
            return Ok(r.body);
        }
    }
    let rerendered = cx.request(&sibling, Variant::Main, None)?.body;
    if rerendered != req.body {
        return Ok(rerendered);
    }
    if let Ok(serde_json::Value::Object(mut map)) = serde_json::from_slice(&req.body) {
        map.insert(
            "idemgate_check_mismatch".into(),
            serde_json::Value::from(sibling.seq),
        );
        cx.note(GUESS.replace("{}", "one more JSON member, \"idemgate_check_mismatch\""));
        return Ok(serde_json::Value::Object(map).to_string().into());
    }
    cx.note(GUESS.replace("{}", "a trailing space"));
    let mut bytes = req.body.to_vec();
    bytes.push(b' ');
    Ok(bytes.into())
}
