//! The RFC 8785 canonical form of request bodies: never a panic; canonicalising is idempotent
//! (the canonical text of the canonical text is itself), and the canonical fingerprint does not
//! depend on whitespace the parser ignores.
#![no_main]

use idemgate_core::fingerprint::{FingerprintOptions, JsonMode, write_canonical};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let options = FingerprintOptions::default().json(JsonMode::Canonical {
        ignore: vec!["/ts".into()],
    });
    let fp = options.builder().method("POST").body(data).finish();
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let mut once = String::new();
    write_canonical(&value, &mut once);
    let reparsed: serde_json::Value = serde_json::from_str(&once).expect("canonical text parses");
    let mut twice = String::new();
    write_canonical(&reparsed, &mut twice);
    assert_eq!(once, twice);
    let mut padded = b" \n".to_vec();
    padded.extend_from_slice(data);
    padded.extend_from_slice(b"\t ");
    let fp_padded = options.builder().method("POST").body(&padded).finish();
    assert_eq!(fp, fp_padded, "whitespace around a JSON body changed its canonical fingerprint");
});
