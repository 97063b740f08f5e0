//! in-flight: while `slow_path` runs, a duplicate → `409` with `Retry-After`, or the same final
//! answer after waiting; never a second effect.

use super::{Cx, Stop, Variant};

pub(super) async fn run(cx: &mut Cx<'_>) -> Result<String, Stop> {
    if cx.op.slow_path.is_none() {
        return Err(Stop::Skip(
            "no slow_path in the spec (a variant of the operation that takes long)".into(),
        ));
    }
    let g = cx.group();
    let before = cx.count(&g).await?;
    let req = cx.group_request(&g, Variant::Slow, None).await?;
    // Two identical requests written back to back on two connections: whichever the server
    // takes first runs slowly, the other arrives while it runs. The check is symmetric.
    let answers = cx
        .burst(
            "slow request and its duplicate",
            &[req.clone(), req.clone()],
        )
        .await;
    let mut finals = Vec::new();
    let mut seen = Vec::new();
    for a in answers {
        let a = a.map_err(|e| Stop::Error(format!("no answer to a slow request: {e}")))?;
        let status = a.status.as_u16();
        seen.push(status.to_string());
        match status {
            409 => {
                if a.header("retry-after").is_none() {
                    cx.fail("a duplicate in flight was answered 409 without Retry-After");
                }
                let settled = cx.settle("duplicate, retried after 409", &req, a).await?;
                seen.push(format!("then {}", settled.status.as_u16()));
                finals.push(settled);
            }
            200..=299 => finals.push(a),
            422 => cx.fail("an identical duplicate in flight was answered 422 (judged another request)"),
            500..=599 => cx.fail(format!("a request was answered {status} while its duplicate ran")),
            _ => cx.fail(format!("a request was answered {status} while its duplicate ran (expected success, or 409 with Retry-After)")),
        }
    }
    match finals.as_slice() {
        [a, b] => {
            if let Err(diff) = cx.same_outcome(a, b)? {
                cx.fail(format!(
                    "the duplicate's final answer is not the first request's: {diff}"
                ));
            }
            if !a.status.is_success() || !b.status.is_success() {
                cx.fail(format!(
                    "the final answers are {} and {}, not successes",
                    a.status, b.status
                ));
            }
        }
        _ if cx.failed() => {}
        _ => return Err(Stop::Error("no final answers".into())),
    }
    let effects = cx.effects_since(&g, before).await?;
    if let Some(n) = effects
        && n != 1
    {
        cx.fail(format!(
            "{n} effects for a slow request and its duplicate (the probe counts them)"
        ));
    }
    Ok(format!(
        "answers {}{}",
        seen.join(", "),
        effects.map_or(String::new(), |n| format!("; {n} effect"))
    ))
}
