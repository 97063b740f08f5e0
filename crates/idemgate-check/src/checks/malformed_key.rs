//! malformed-key: a 256-byte key, a key with a space, a key with a control character (TAB)
//! → `400` each, and no effect.
//!
//! The same request is first sent with a valid key and must succeed (else the check is an
//! error of the setup: an operation that fails on its own refuses malformed keys trivially).

use http::HeaderValue;

use super::{Cx, Stop, Variant};

pub(super) async fn run(cx: &mut Cx<'_>) -> Result<String, Stop> {
    super::with_a_key_first(cx).await?;
    let g = cx.group();
    let base = cx.group_request(&g, Variant::Main, None).await?;
    let tag = format!("{:08x}", cx.random() as u32);
    let long = format!("{tag}-{}", "k".repeat(256 - tag.len() - 1));
    let cases = [
        ("a 256-byte key", long),
        ("a key with a space", format!("check {tag}")),
        (
            "a key with a control character (TAB)",
            format!("check\t{tag}"),
        ),
    ];
    let key_header = cx.key_header()?;
    let before = cx.total_count(&g).await?;
    let mut seen = Vec::new();
    for (what, key) in cases {
        let mut req = base.clone();
        let value =
            HeaderValue::from_str(&key).map_err(|_| Stop::Error(format!("cannot send {what}")))?;
        req.set_header(key_header.clone(), value);
        let answer = cx.send_ok(what, &req).await?;
        let status = answer.status.as_u16();
        seen.push(format!("{what}: {status}"));
        if status != 400 {
            cx.fail(format!("{what} was answered {status}, not 400"));
        }
    }
    let effects = cx.effects_since(&g, before).await?;
    if let Some(n) = effects
        && n > 0
    {
        cx.fail(format!(
            "requests with malformed keys were refused, yet the probe counts {n} new effect: they ran"
        ));
    }
    Ok(format!(
        "with a valid key: a success; {}{}",
        seen.join(", "),
        effects.map_or(String::new(), |n| format!("; {n} effect"))
    ))
}
