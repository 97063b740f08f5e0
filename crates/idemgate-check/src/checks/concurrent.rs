//! concurrent: `concurrency` identical requests at once → one effect (probe, or every success
//! names the same identity, or every success has the same body), no `5xx`.

use std::collections::BTreeMap;

use super::{Cx, Stop, Variant};
use crate::client::SendError;

pub(super) async fn run(cx: &mut Cx<'_>) -> Result<String, Stop> {
    let g = cx.group();
    let before = cx.count(&g).await?;
    let req = cx.group_request(&g, Variant::Main, None).await?;
    let n = cx.config.concurrency;
    let reqs = vec![req; n];
    let answers = cx.burst("burst", &reqs).await;
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut errors = Vec::new();
    // Connections this client could not make (descriptors, ports): no answer to judge.
    let mut unconnected = Vec::new();
    let mut successes = Vec::new();
    let mut conflicts_without_retry_after = 0;
    for a in answers {
        match a {
            Ok(a) => {
                *statuses.entry(a.status.as_u16()).or_default() += 1;
                if a.status == http::StatusCode::CONFLICT && a.header("retry-after").is_none() {
                    conflicts_without_retry_after += 1;
                }
                if a.status.is_success() {
                    successes.push(a);
                }
            }
            Err(e @ SendError::Connect(_)) => unconnected.push(e.to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let seen = statuses
        .iter()
        .map(|(s, k)| format!("{k} × {s}"))
        .collect::<Vec<_>>()
        .join(", ");
    cx.note(format!("{n} requests at once: {seen}"));
    let server_errors: usize = statuses.range(500..).map(|(_, k)| k).sum();
    if server_errors > 0 {
        cx.fail(format!(
            "{server_errors} of {n} duplicates were answered 5xx ({seen})"
        ));
    }
    if !errors.is_empty() {
        cx.fail(format!(
            "{} of {n} duplicates got no answer: {}",
            errors.len(),
            errors[0]
        ));
    }
    let unconnected = (!unconnected.is_empty()).then(|| {
        format!(
            "{} of {n} connections of the burst could not be made ({}): a limit of this client (open files, ports) or of the target's accept queue; lower --concurrency or raise the limit",
            unconnected.len(),
            unconnected[0]
        )
    });
    if successes.is_empty() && server_errors == 0 && errors.is_empty() {
        return Err(Stop::Error(unconnected.unwrap_or_else(|| {
            format!("none of {n} duplicates succeeded ({seen}): the operation must succeed once")
        })));
    }
    // Copies of one request under one key get one outcome (or "in progress"): a copy refused
    // with another 4xx while one succeeded tells its client that the operation failed.
    let refused: usize = statuses
        .iter()
        .filter(|(s, _)| (400..500).contains(*s) && !matches!(**s, 409 | 429))
        .map(|(_, k)| k)
        .sum();
    if refused > 0 && !successes.is_empty() {
        cx.fail(format!(
            "{refused} of {n} identical duplicates were refused ({seen}) while another succeeded: not one outcome"
        ));
    }
    if statuses.contains_key(&429) {
        cx.warn("some duplicates were answered 429 (rate limited)");
    }
    if conflicts_without_retry_after > 0 {
        cx.warn(format!(
            "{conflicts_without_retry_after} answers 409 without Retry-After"
        ));
    }
    let effects = cx.effects_since(&g, before).await?;
    match effects {
        Some(1) => {}
        Some(k) => cx.fail(format!(
            "{k} effects for {n} duplicates sent at once (the probe counts them)"
        )),
        None => {
            // No probe: every success must show the same outcome.
            if let Some((first, rest)) = successes.split_first() {
                for other in rest {
                    if let Err(diff) = cx.same_outcome(first, other)? {
                        cx.fail(format!(
                            "the successful answers differ, so the duplicates ran more than once: {diff}"
                        ));
                        break;
                    }
                }
            }
        }
    }
    // What the answered copies show is a finding; without one, nothing can be concluded.
    if let Some(message) = unconnected {
        if !cx.failed() {
            return Err(Stop::Error(message));
        }
        cx.note(message);
    }
    Ok(format!(
        "{seen}{}",
        effects.map_or_else(
            || ", every success the same".to_owned(),
            |k| format!("; {k} effect")
        )
    ))
}
