//! transient (optional): after a `5xx` (`transient_path`), the retry with the same key is allowed
//! to run again: the `5xx` was not stored and replayed.
//!
//! `transient_path` should fail only the first attempt of each key (the demo upstream's
//! `fail_first=1`): the retry is then expected to be a success that is not marked replayed and,
//! with a probe, that took effect. A path that fails every time works with a probe that counts
//! the retry's execution; a failure that does nothing, seen again without a marker, cannot show
//! whether the retry ran, and the check ends in an error that says so, never in a pass.

use super::{Cx, Stop, Variant};

pub(super) async fn run(cx: &mut Cx<'_>) -> Result<String, Stop> {
    if cx.op.transient_path.is_none() {
        return Err(Stop::Skip(
            "no transient_path in the spec (a variant of the operation whose first attempt is answered 5xx)".into(),
        ));
    }
    let g = cx.group();
    let req = cx.group_request(&g, Variant::Transient, None).await?;
    let first = cx.send_ok("first (5xx expected)", &req).await?;
    if !first.status.is_server_error() {
        return Err(Stop::Error(format!(
            "transient_path was answered {}, not 5xx",
            first.status
        )));
    }
    let before = cx.count(&g).await?;
    let retry = cx.send_ok("retry", &req).await?;
    let retry = cx.settle("retry after 409", &req, retry).await?;
    let delta = cx.effects_since(&g, before).await?;
    let took = delta.map_or(String::new(), |d| format!("; the retry took {d} effect"));
    let summary = format!("first {}, retry {}{took}", first.status, retry.status);
    if retry.replayed() {
        cx.fail(format!(
            "the retry after a {} was answered a replay (Idempotent-Replayed: true, {}): the failed attempt's outcome was stored",
            first.status, retry.status
        ));
        return Ok(summary);
    }
    let status = retry.status.as_u16();
    match (status, delta) {
        (422, _) => {
            cx.fail("the retry of the same request was answered 422");
            Ok(summary)
        }
        // The retry succeeded and was not a replay: it ran (with a probe: it took effect).
        (200..=299, None | Some(1..)) => Ok(summary),
        (200..=299, Some(0)) => Err(Stop::Error(format!(
            "the retry was answered {} without the replay marker, but the probe counts no effect for it: whether it ran cannot be seen",
            retry.status
        ))),
        // It failed again, and the probe saw it run: it was not a replay.
        (500..=599, Some(1..)) => {
            cx.note("the retry ran and failed again: a transient_path that fails only the first attempt of a key (e.g. fail_first=1) also shows the retry succeed");
            Ok(summary)
        }
        (500..=599, Some(0)) => Err(Stop::Error(format!(
            "the retry was answered {} again without the replay marker, and the probe counts no effect for it: a replay and a failure that does nothing look alike. Make transient_path fail only the first attempt of a key (the retry must then succeed), or take an effect the probe counts",
            retry.status
        ))),
        (500..=599, None) => Err(Stop::Error(format!(
            "the retry was answered {} again without the replay marker and there is no effect_probe: whether it was replayed cannot be seen. Make transient_path fail only the first attempt of a key (the retry must then succeed), or add an effect_probe",
            retry.status
        ))),
        _ => Err(Stop::Error(format!(
            "the retry was answered {}: neither a success nor a 5xx, nothing can be concluded {}",
            retry.status,
            super::preview(&retry.body)
        ))),
    }
}
