//! missing-key: where `key_required`, a request without a key → `400`.

use super::{Cx, Stop, Variant};

pub(super) async fn run(cx: &mut Cx<'_>) -> Result<String, Stop> {
    if !cx.op.key_required(cx.defaults) {
        return Err(Stop::Skip(
            "key_required = false: a request without a key may run unprotected".into(),
        ));
    }
    let g = cx.group();
    let mut req = cx.group_request(&g, Variant::Main, None).await?;
    req.remove_header(&cx.key_header()?);
    let answer = cx.send_ok("without a key", &req).await?;
    let status = answer.status.as_u16();
    match status {
        400 => {}
        401..=499 => cx.warn(format!(
            "a request without a key was answered {status}; the IETF draft asks for 400"
        )),
        _ => cx.fail(format!(
            "a request without a key was answered {status}, not 400 (key_required = true)"
        )),
    }
    Ok(format!("without a key: {status}"))
}
