//! missing-key: where `key_required`, a request without a key → `400` (`422` is a warning), and
//! it takes no effect.
//!
//! The same request is first sent with a key and must succeed: a refusal of the keyless one
//! means something only for an operation that works with a key (a server that refuses
//! everything is an error of the setup, not a pass).

use super::{Cx, Stop, Variant};

pub(super) async fn run(cx: &mut Cx<'_>) -> Result<String, Stop> {
    if !cx.op.key_required(cx.defaults) {
        return Err(Stop::Skip(
            "key_required = false: a request without a key may run unprotected".into(),
        ));
    }
    super::with_a_key_first(cx).await?;
    let g = cx.group();
    let mut req = cx.group_request(&g, Variant::Main, None).await?;
    req.remove_header(&cx.key_header()?);
    let before = cx.total_count(&g).await?;
    let answer = cx.send_ok("without a key", &req).await?;
    let status = answer.status.as_u16();
    match status {
        400 => {}
        422 => cx.warn(format!(
            "a request without a key was answered {status}; the IETF draft asks for 400"
        )),
        _ => cx.fail(format!(
            "a request without a key was answered {status}, not 400 (key_required = true)"
        )),
    }
    let effects = cx.effects_since(&g, before).await?;
    if let Some(n) = effects
        && n > 0
    {
        cx.fail(format!(
            "a request without a key was answered {status}, yet the probe counts {n} new effect: it ran"
        ));
    }
    Ok(format!(
        "with a key: a success; without: {status}{}",
        effects.map_or(String::new(), |n| format!("; {n} effect"))
    ))
}
