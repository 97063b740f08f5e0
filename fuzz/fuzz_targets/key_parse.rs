//! Idempotency-Key parsing: any bytes give a key or an error, never a panic; a key is 1–255
//! visible ASCII bytes, parses again to itself, and its store key is stable.
#![no_main]

use idemgate_core::{IdempotencyKey, Scope, ScopedKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = IdempotencyKey::parse_bytes(data) {
        let s = key.as_str();
        assert!(!s.is_empty() && s.len() <= 255, "{s:?}");
        assert!(s.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{s:?}");
        // Its sf-string spelling always parses back to it (a bare spelling cannot start with a
        // quote, so a key that does is only written quoted).
        let quoted = format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        if quoted.len() <= 255 {
            let again = IdempotencyKey::parse(&quoted).expect("a parsed key parses again, quoted");
            assert_eq!(again.as_str(), s);
            let a = ScopedKey::new("n", Scope::new("s"), key).store_key();
            let b = ScopedKey::new("n", Scope::new("s"), again).store_key();
            assert_eq!(a, b);
        }
    }
});
