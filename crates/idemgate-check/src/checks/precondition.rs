//! precondition (operations with `etag = true`): optimistic locking working with idempotency keys.
//!
//! 1. An update with the current `ETag` in `If-Match` succeeds, and the `ETag` changes.
//! 2. Its retry (same key, its `If-Match` now stale) gets the same answer again: the client whose
//!    answer was lost must not be told its successful update failed.
//! 3. An update with the stale `ETag` (a new key) gets `412` and changes nothing.
//! 4. Two updates sent at once with the same (current) `If-Match` and their own keys: exactly one
//!    succeeds, the other gets `412`.

use http::StatusCode;
use http::header::IF_MATCH;

use super::{Cx, Stop, Variant};
use crate::template::Group;

pub(super) async fn run(cx: &mut Cx<'_>) -> Result<String, Stop> {
    if !cx.op.etag {
        return Err(Stop::Skip("etag = false (not a versioned resource)".into()));
    }
    let g1 = cx.group();
    let (e0, _) = cx.read_etag(&g1).await?;
    let groups_before = count(cx, &[&g1]).await?;

    // 1. The current ETag wins.
    let mut update = cx.request(&g1, Variant::Main, None)?;
    update.set_header(IF_MATCH, e0.clone());
    let first = cx
        .send_ok("update, If-Match: current ETag", &update)
        .await?;
    if !first.status.is_success() {
        cx.fail(format!(
            "an update with the current ETag {} was answered {}, not a success",
            show(&e0),
            first.status
        ));
        return Ok(String::new());
    }
    let (e1, _) = cx.read_etag(&g1).await?;
    if e1 == e0 {
        cx.fail(format!(
            "the ETag is still {} after a successful update",
            show(&e0)
        ));
    }

    // 2. Its retry replays it, though its If-Match is stale now.
    let retry = cx
        .send_ok(
            "retry of that update (same key, If-Match now stale)",
            &update,
        )
        .await?;
    let retry = cx
        .settle("retry of that update after 409", &update, retry)
        .await?;
    if retry.status != first.status {
        cx.fail(format!(
            "the retry of a successful update (same key) was answered {}, not {} as the first: a client whose answer was lost is told its update failed",
            retry.status, first.status
        ));
    }

    // 3. A stale ETag under a new key: 412, nothing changes.
    let g2 = cx.group();
    let mut stale = cx.request(&g2, Variant::Main, None)?;
    stale.set_header(IF_MATCH, e0.clone());
    let refused = cx.send_ok("update, If-Match: stale ETag", &stale).await?;
    if refused.status != StatusCode::PRECONDITION_FAILED {
        cx.fail(format!(
            "an update with the stale ETag {} was answered {}, not 412",
            show(&e0),
            refused.status
        ));
    }
    let (after_stale, _) = cx.read_etag(&g1).await?;
    if after_stale != e1 {
        cx.fail(format!(
            "the ETag moved from {} to {} although only a stale update was sent",
            show(&e1),
            show(&after_stale)
        ));
    }

    // 4. Two updates at once with one If-Match: one winner.
    let (g3, g4) = (cx.group(), cx.group());
    let mut a = cx.request(&g3, Variant::Main, None)?;
    let mut b = cx.request(&g4, Variant::Main, None)?;
    a.set_header(IF_MATCH, after_stale.clone());
    b.set_header(IF_MATCH, after_stale.clone());
    let answers = cx.burst("two updates at once, one If-Match", &[a, b]).await;
    let mut statuses = Vec::new();
    for answer in answers {
        let answer = answer.map_err(|e| Stop::Error(format!("no answer to an update: {e}")))?;
        statuses.push(answer.status);
    }
    let wins = statuses.iter().filter(|s| s.is_success()).count();
    let refusals = statuses
        .iter()
        .filter(|s| **s == StatusCode::PRECONDITION_FAILED)
        .count();
    if wins != 1 || refusals != 1 {
        cx.fail(format!(
            "two updates with the same If-Match were answered {} and {}: expected exactly one success and one 412{}",
            statuses[0],
            statuses[1],
            if wins == 2 { " (a lost update)" } else { "" }
        ));
    }
    let (e2, _) = cx.read_etag(&g1).await?;
    if wins >= 1 && e2 == after_stale {
        cx.fail("the ETag did not change after the concurrent update that won");
    }
    let groups_after = count(cx, &[&g1, &g2, &g3, &g4]).await?;
    let effects = match (groups_before, groups_after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    if let Some(n) = effects
        && n != 2
    {
        cx.fail(format!(
            "{n} effects for one update, its retry, a stale update and two racing updates (2 expected)"
        ));
    }
    cx.note(format!(
        "ETags: {} -> {} -> {}",
        show(&e0),
        show(&e1),
        show(&e2)
    ));
    Ok(format!(
        "current ETag {}, retry {}, stale ETag {}, racing pair {} and {}{}",
        first.status,
        retry.status,
        refused.status,
        statuses[0],
        statuses[1],
        effects.map_or(String::new(), |n| format!("; {n} effects"))
    ))
}

/// The probe's count over the groups: summed when the probe counts per key, read once when it
/// counts the resource.
async fn count(cx: &mut Cx<'_>, groups: &[&Group]) -> Result<Option<u64>, Stop> {
    let per_key = cx.probe_per_key();
    let mut total = None;
    for g in groups {
        let n = cx.count(g).await?;
        total = match (total, n) {
            (_, None) => return Ok(None),
            (None, Some(n)) => Some(n),
            (Some(t), Some(n)) => Some(t.checked_add(n).ok_or_else(|| {
                Stop::Error(format!(
                    "the effect probe's counts overflow when added ({t} + {n}): they are not counts"
                ))
            })?),
        };
        if !per_key {
            break;
        }
    }
    Ok(total)
}

fn show(v: &http::HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes()).into_owned()
}
