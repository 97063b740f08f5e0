//! Store URLs from configuration: a parse or a `Config` error, never a panic; an error never
//! echoes a password.
#![no_main]

use idemgate_stores::{StoreUrl, redact};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = redact(text);
    if let Err(e) = StoreUrl::parse(text) {
        assert_eq!(e.kind(), idemgate_core::ErrorKind::Config);
        // Only URLs that can carry credentials (memory:// and file: cannot).
        let credentialed = ["redis", "postgres"].iter().any(|p| text.starts_with(p))
            || !(text.starts_with("memory") || text.starts_with("file"));
        if credentialed
            && let Some((_, rest)) = text.split_once("://")
            && let Some((userinfo, _)) = rest.rsplit_once('@')
            && let Some((_, password)) = userinfo.split_once(':')
            && password.len() >= 6
        {
            let spelled = format!(":{password}@");
            assert!(!e.message().contains(&spelled), "password echoed: {e}");
        }
    }
});
