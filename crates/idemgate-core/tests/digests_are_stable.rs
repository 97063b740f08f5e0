//! Known answers: fingerprints, store keys and scope labels are stored in records, so a change
//! of their bytes would make every stored record unreachable (store key) or every retry a
//! mismatch (fingerprint). These digests were computed by the implementation that wrote the
//! first records; any change to how they are hashed must keep them.

#![allow(clippy::unwrap_used)]

use idemgate_core::fingerprint::{Algorithm, JsonMode};
use idemgate_core::{FingerprintOptions, IdempotencyKey, Scope, ScopedKey};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fingerprint(options: &FingerprintOptions, body: &[u8]) -> String {
    let f = options
        .builder()
        .method("POST")
        .path("/payments/ä")
        .query("b=2&a=1")
        .header("Content-Type", b"application/json")
        .header("X-Tenant", b"acme")
        .header("x-long", &[b'v'; 700])
        .body(body)
        .finish();
    hex(&f.digest)
}

#[test]
fn fingerprints_keep_their_bytes() {
    let body = br#"{"b":[1,2,{"z":null,"a":1.5}],"a":"x","t":123}"#;
    let long_body = vec![b'x'; 5000];
    let raw = FingerprintOptions::default();
    let canonical = FingerprintOptions::default().json(JsonMode::Canonical {
        ignore: vec!["/t".to_owned()],
    });
    let sha = FingerprintOptions::default()
        .algorithm(Algorithm::Sha256)
        .json(JsonMode::Canonical { ignore: vec![] });
    let got = [
        fingerprint(&raw, body),
        fingerprint(&raw, &long_body),
        fingerprint(&raw, b""),
        fingerprint(&canonical, body),
        fingerprint(&canonical, b"not json"),
        fingerprint(&sha, body),
        fingerprint(&sha, &long_body),
    ];
    let want: [&str; 7] = KNOWN_FINGERPRINTS;
    assert_eq!(got, want.map(str::to_owned), "{got:#?}");
}

#[test]
fn store_keys_and_scope_labels_keep_their_bytes() {
    let scope = Scope::for_principal("payments", &[b"Bearer abc", b"tenant-7"]);
    let long = "k".repeat(255);
    let keys = [
        ScopedKey::new(
            "default",
            scope.clone(),
            IdempotencyKey::parse("8e03978e-40d5-43e8-bc93-6894a57f9324").unwrap(),
        ),
        ScopedKey::new(
            "orders",
            Scope::new("none"),
            IdempotencyKey::parse(&long).unwrap(),
        ),
    ];
    let got = [
        scope.label().to_owned(),
        Scope::for_principal("r", &[]).label().to_owned(),
        keys[0].store_key().to_hex(),
        keys[1].store_key().to_hex(),
    ];
    assert_eq!(got, KNOWN_KEYS.map(str::to_owned), "{got:#?}");
}

const KNOWN_FINGERPRINTS: [&str; 7] = [
    "8b47365dc5b297b2c0e2da3e5d48e72c1d1df37f5a55bbdbb3d90bf3f6cab3c8",
    "5a8addb4d32a4620b685c5a9844bada1699fabceaf645fb7b15819e135bfb144",
    "8f7b43eca4c3da650179ac70a2230f5ebf4a049aed1f9a13efb9a784b2be3902",
    "da38dc0a0d83cbe9d68a2668c2a6bfd5d15d6607f918d4c03cfb6bdd0f244c86",
    "5d0bb775674e5ae988bbdbf3d20f61a681b7c5e9ce9e2253d105ea69f8f208c4",
    "4e8478bb7ef3595f687c0bf561c6d6305a864988fb589611f32c44973e9b72fc",
    "d24090b7570579a6de77bf2091f6869709f1d8ac0695407abc00aa2ad3b02346",
];
const KNOWN_KEYS: [&str; 4] = [
    "payments#84fea06793e643e5fa5547c1f205ffd9",
    "r#6017f6af33cc7b477409a5409070cf34",
    "d72da84978d3c1529ab02bda5e7794d50f955118f1189c006e1893ebd1d1db1d",
    "9fca19fc17611396b6756a55c6bbe72d27e73c1c392c0b7fb007505c17307b70",
];
