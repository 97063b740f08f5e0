//! transient (optional): after a `5xx` (`transient_path`), the retry with the same key is allowed
//! to run again: the `5xx` was not stored and replayed.

use super::{Cx, Ran, Stop, Variant};

pub(super) async fn run(cx: &mut Cx<'_>) -> Result<String, Stop> {
    if cx.op.transient_path.is_none() {
        return Err(Stop::Skip(
            "no transient_path in the spec (a variant of the operation answered 5xx)".into(),
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
    match cx.ran_again(delta, &first, &retry) {
        Ran::Yes => {}
        Ran::No => cx.fail(format!(
            "the retry after a {} did not run again (it was replayed{})",
            first.status,
            delta.map_or(String::new(), |d| format!(
                "; the probe counts {d} effects of the retry"
            ))
        )),
        Ran::Unknown => cx.warn(
            "whether the retry ran again cannot be seen: no effect_probe, no marker, the same body",
        ),
    }
    if retry.status.as_u16() == 422 {
        cx.fail("the retry of the same request was answered 422");
    }
    Ok(format!(
        "first {}, retry {}{}",
        first.status,
        retry.status,
        delta.map_or(String::new(), |d| format!("; the retry took {d} effect"))
    ))
}
