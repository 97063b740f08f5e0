//! Request fingerprints: a cryptographic hash of what makes two requests "the same".
//!
//! A retry with the same idempotency key but a different fingerprint is refused (PRODUCT §3: `422`).
//!
//! ```
//! use idemgate_core::fingerprint::{FingerprintOptions, JsonMode};
//!
//! let opts = FingerprintOptions::default().json(JsonMode::Canonical { ignore: vec!["/ts".into()] });
//! let a = opts.builder().method("POST").path("/pay").body(br#"{"amount":10,"ts":1}"#).finish();
//! let b = opts.builder().method("POST").path("/pay").body(br#"{ "ts": 2, "amount": 10 }"#).finish();
//! assert_eq!(a, b); // key order, whitespace and the ignored field do not matter
//!
//! let c = opts.builder().method("POST").path("/pay").body(br#"{"amount":11}"#).finish();
//! assert_ne!(a, c);
//! ```

use std::fmt;

use serde_json::Value;

use crate::coalesce::Coalesce;

/// Which hash function computes fingerprints. Both give 32 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// BLAKE3 (default: fastest).
    #[default]
    Blake3,
    /// SHA-256 (for deployments that require a FIPS-listed hash).
    Sha256,
}

impl Algorithm {
    /// Stable numeric tag used in the record encoding.
    pub fn tag(self) -> u8 {
        match self {
            Algorithm::Blake3 => 1,
            Algorithm::Sha256 => 2,
        }
    }

    /// Inverse of [`Algorithm::tag`].
    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(Algorithm::Blake3),
            2 => Some(Algorithm::Sha256),
            _ => None,
        }
    }
}

/// How request bodies are read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum JsonMode {
    /// The body's bytes are hashed as they are (default).
    #[default]
    Raw,
    /// The body is parsed as JSON, the listed RFC 6901 pointers are removed, and the RFC 8785
    /// canonical form is hashed, so key order and whitespace do not matter.
    ///
    /// A body that is not valid JSON is hashed as raw bytes (with a different domain tag, so it can
    /// never equal a canonical JSON body). A pointer into an array replaces that element by `null`
    /// (so the positions of the other elements keep their meaning); a pointer that does not resolve
    /// is ignored. Integers beyond ±2^53 are kept exact instead of being rounded to a double as
    /// RFC 8785 would, so two different large amounts never compare equal.
    Canonical {
        /// JSON pointers to drop before hashing, e.g. `/timestamp`.
        ignore: Vec<String>,
    },
}

/// Fingerprint settings (usually one per route).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FingerprintOptions {
    algorithm: Algorithm,
    json: JsonMode,
}

impl FingerprintOptions {
    /// Chooses the hash function.
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Chooses how bodies are read.
    pub fn json(mut self, json: JsonMode) -> Self {
        self.json = json;
        self
    }

    /// The hash function chosen.
    pub fn hash_algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// How bodies are read.
    pub fn json_mode(&self) -> &JsonMode {
        &self.json
    }

    /// Starts a fingerprint of one request.
    pub fn builder(&self) -> FingerprintBuilder<'_> {
        FingerprintBuilder {
            options: self,
            method: &[],
            path: &[],
            query: &[],
            headers: Vec::new(),
            body: &[],
        }
    }
}

/// Collects the parts of a request; [`FingerprintBuilder::finish`] hashes them.
///
/// Parts not set count as empty. Headers are sorted by (lower-cased) name before hashing; values of
/// one name keep their order.
#[derive(Debug)]
pub struct FingerprintBuilder<'a> {
    options: &'a FingerprintOptions,
    method: &'a [u8],
    path: &'a [u8],
    query: &'a [u8],
    headers: Vec<(String, &'a [u8])>,
    body: &'a [u8],
}

impl<'a> FingerprintBuilder<'a> {
    /// The request method.
    pub fn method(mut self, method: &'a str) -> Self {
        self.method = method.as_bytes();
        self
    }

    /// The request path (as sent, not decoded).
    pub fn path(mut self, path: &'a str) -> Self {
        self.path = path.as_bytes();
        self
    }

    /// The raw query string (without `?`); parameter order matters.
    pub fn query(mut self, query: &'a str) -> Self {
        self.query = query.as_bytes();
        self
    }

    /// One selected header; the name is compared case-insensitively.
    pub fn header(mut self, name: &str, value: &'a [u8]) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value));
        self
    }

    /// The request body (borrowed: nothing is copied).
    pub fn body(mut self, body: &'a [u8]) -> Self {
        self.body = body;
        self
    }

    /// Hashes the parts.
    pub fn finish(mut self) -> Fingerprint {
        self.headers.sort_by(|a, b| a.0.cmp(&b.0));
        let mut h = Hasher::new(self.options.algorithm);
        h.field(b"method", self.method);
        h.field(b"path", self.path);
        h.field(b"query", self.query);
        for (name, value) in &self.headers {
            h.field(b"header", name.as_bytes());
            h.field(b"value", value);
        }
        match &self.options.json {
            JsonMode::Raw => h.field(b"body-raw", self.body),
            JsonMode::Canonical { ignore } => match serde_json::from_slice::<Value>(self.body) {
                Ok(mut value) => {
                    for pointer in ignore {
                        remove_pointer(&mut value, pointer);
                    }
                    let mut canonical = String::with_capacity(self.body.len());
                    write_canonical(&value, &mut canonical);
                    h.field(b"body-jcs", canonical.as_bytes());
                }
                Err(_) => h.field(b"body-raw-fallback", self.body),
            },
        }
        Fingerprint {
            algorithm: self.options.algorithm,
            digest: h.finish(),
        }
    }
}

enum Digest {
    Blake3(Box<blake3::Hasher>),
    Sha256(sha2::Sha256),
}

/// The hash of a fingerprint, fed through a [`Coalesce`] buffer: a fingerprint is dozens of
/// tiny pieces (tags, lengths). The digest is that of one `update` per piece.
struct Hasher {
    digest: Digest,
    buf: Coalesce,
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Self {
        use sha2::Digest as _;
        let digest = match algorithm {
            Algorithm::Blake3 => Digest::Blake3(Box::new(blake3::Hasher::new())),
            Algorithm::Sha256 => Digest::Sha256(sha2::Sha256::new()),
        };
        Self {
            digest,
            buf: Coalesce::new(),
        }
    }

    fn feed(digest: &mut Digest, bytes: &[u8]) {
        use sha2::Digest as _;
        match digest {
            Digest::Blake3(h) => {
                h.update(bytes);
            }
            Digest::Sha256(h) => h.update(bytes),
        }
    }

    fn flush(&mut self) {
        self.buf.flush(|b| Self::feed(&mut self.digest, b));
    }

    fn update(&mut self, bytes: &[u8]) {
        self.buf.push(bytes, |b| Self::feed(&mut self.digest, b));
    }

    /// Domain-separated, length-prefixed field: no two different part lists hash alike.
    fn field(&mut self, tag: &[u8], value: &[u8]) {
        self.update(&[tag.len() as u8]);
        self.update(tag);
        self.update(&(value.len() as u64).to_le_bytes());
        self.update(value);
    }

    fn finish(mut self) -> [u8; 32] {
        use sha2::Digest as _;
        self.flush();
        match self.digest {
            Digest::Blake3(h) => *h.finalize().as_bytes(),
            Digest::Sha256(h) => h.finalize().into(),
        }
    }
}

/// A request fingerprint: the algorithm and its 32-byte digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    /// Which hash produced the digest.
    pub algorithm: Algorithm,
    /// The digest.
    pub digest: [u8; 32],
}

impl Fingerprint {
    /// A fingerprint from raw parts (for decoding and for callers that hash on their own).
    pub fn from_parts(algorithm: Algorithm, digest: [u8; 32]) -> Self {
        Self { algorithm, digest }
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({:?}:{})", self.algorithm, self)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(64);
        crate::key::push_hex(&mut s, &self.digest);
        f.write_str(&s)
    }
}

fn remove_pointer(value: &mut Value, pointer: &str) {
    let Some(split) = pointer.rfind('/') else {
        return;
    };
    let (parent, last) = (&pointer[..split], &pointer[split + 1..]);
    let last = last.replace("~1", "/").replace("~0", "~");
    match value.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.remove(&last);
        }
        Some(Value::Array(items)) => {
            if let Some(slot) = last.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                *slot = Value::Null;
            }
        }
        _ => {}
    }
}

/// Writes the RFC 8785 (JCS) form of `value`.
pub fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // RFC 8785 §3.2.3: sort by the UTF-16 code units of the names.
            entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
    }
}

fn write_number(n: &serde_json::Number, out: &mut String) {
    const EXACT: u64 = 1 << 53;
    if let Some(u) = n.as_u64().filter(|u| *u > EXACT) {
        out.push_str(&u.to_string());
    } else if let Some(i) = n.as_i64().filter(|i| i.unsigned_abs() > EXACT) {
        out.push_str(&i.to_string());
    } else if let Some(f) = n.as_f64() {
        if f == 0.0 {
            out.push('0'); // -0 serialises as 0
        } else {
            let mut buf = ryu_js::Buffer::new();
            out.push_str(buf.format_finite(f));
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{0c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffer never changes the bytes hashed: every split of pieces around its size gives
    /// the digest of the pieces hashed one `update` each.
    #[test]
    fn buffered_updates_hash_the_same_bytes() {
        let sizes = [
            0usize, 1, 8, 100, 255, 411, 504, 511, 512, 513, 1023, 1024, 3000,
        ];
        for algorithm in [Algorithm::Blake3, Algorithm::Sha256] {
            for &first in &sizes {
                for &second in &sizes {
                    for &third in &[0usize, 1, 511, 512, 513] {
                        let pieces: Vec<Vec<u8>> = [first, second, third]
                            .iter()
                            .enumerate()
                            .map(|(i, &n)| (0..n).map(|b| (b * 7 + i) as u8).collect())
                            .collect();
                        let mut buffered = Hasher::new(algorithm);
                        let mut direct = Hasher::new(algorithm);
                        for p in &pieces {
                            buffered.update(p);
                            direct.flush();
                            Hasher::feed(&mut direct.digest, p);
                        }
                        assert_eq!(
                            buffered.finish(),
                            direct.finish(),
                            "{algorithm:?} {first} {second} {third}"
                        );
                    }
                }
            }
        }
    }

    fn canon(json: &str) -> String {
        let v: Value = serde_json::from_str(json).unwrap();
        let mut s = String::new();
        write_canonical(&v, &mut s);
        s
    }

    #[test]
    fn rfc8785_examples() {
        // RFC 8785 §3.2.2 sample (numbers, literals, strings).
        assert_eq!(
            canon(
                r#"{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
                   "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
                   "literals": [null, true, false]}"#
            ),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
        // §3.2.3 sorting by UTF-16 code units.
        assert_eq!(
            canon(r#"{"\ufb33":6,"\u20ac":1,"\r":2,"1":3,"\ud83d\ude00":4,"\u00e9":5}"#),
            // U+20AC (0x20AC) < U+1F600 (0xD83D 0xDE00) < U+FB33 (0xFB33) in UTF-16 order.
            "{\"\\r\":2,\"1\":3,\"é\":5,\"€\":1,\"😀\":4,\"\u{fb33}\":6}"
        );
        assert_eq!(canon("-0.0"), "0");
        assert_eq!(canon("9007199254740993"), "9007199254740993");
    }

    fn fp(opts: &FingerprintOptions, body: &[u8]) -> Fingerprint {
        opts.builder().method("POST").path("/p").body(body).finish()
    }

    #[test]
    fn every_part_counts() {
        let o = FingerprintOptions::default();
        let base = o
            .builder()
            .method("POST")
            .path("/a")
            .query("x=1")
            .header("Content-Type", b"a/b")
            .body(b"1")
            .finish();
        let same = o
            .builder()
            .method("POST")
            .path("/a")
            .query("x=1")
            .header("content-type", b"a/b")
            .body(b"1")
            .finish();
        assert_eq!(base, same);
        for other in [
            o.builder()
                .method("PUT")
                .path("/a")
                .query("x=1")
                .header("content-type", b"a/b")
                .body(b"1")
                .finish(),
            o.builder()
                .method("POST")
                .path("/b")
                .query("x=1")
                .header("content-type", b"a/b")
                .body(b"1")
                .finish(),
            o.builder()
                .method("POST")
                .path("/a")
                .query("x=2")
                .header("content-type", b"a/b")
                .body(b"1")
                .finish(),
            o.builder()
                .method("POST")
                .path("/a")
                .query("x=1")
                .header("content-type", b"a/c")
                .body(b"1")
                .finish(),
            o.builder()
                .method("POST")
                .path("/a")
                .query("x=1")
                .header("content-type", b"a/b")
                .body(b"2")
                .finish(),
            // moving bytes between fields changes the hash (length prefixes)
            o.builder()
                .method("POST")
                .path("/ax=1")
                .header("content-type", b"a/b")
                .body(b"1")
                .finish(),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn algorithms_differ_and_are_tagged() {
        let b = fp(&FingerprintOptions::default(), b"x");
        let s = fp(
            &FingerprintOptions::default().algorithm(Algorithm::Sha256),
            b"x",
        );
        assert_ne!(b.digest, s.digest);
        assert_eq!(
            Algorithm::from_tag(s.algorithm.tag()),
            Some(Algorithm::Sha256)
        );
    }

    #[test]
    fn canonical_mode_ignores_order_whitespace_and_listed_fields() {
        let o = FingerprintOptions::default().json(JsonMode::Canonical {
            ignore: vec!["/request_id".into(), "/items/1".into(), "/a~1b".into()],
        });
        assert_eq!(
            fp(&o, br#"{"x":1,"y":[1,2],"request_id":"r1","a/b":0}"#),
            fp(
                &o,
                br#"{ "y" : [ 1 , 2 ] , "x" : 1.0, "request_id": "r2" }"#
            )
        );
        assert_eq!(
            fp(&o, br#"{"items":[1,2,3]}"#),
            fp(&o, br#"{"items":[1,9,3]}"#)
        );
        assert_ne!(
            fp(&o, br#"{"items":[1,2,3]}"#),
            fp(&o, br#"{"items":[1,3]}"#)
        );
        assert_ne!(fp(&o, br#"{"x":1}"#), fp(&o, br#"{"x":2}"#));
        // Not JSON: raw bytes, and never equal to a JSON body.
        assert_eq!(fp(&o, b"not json"), fp(&o, b"not json"));
        assert_ne!(fp(&o, b"not json "), fp(&o, b"not json"));
        assert_ne!(fp(&o, b"{}"), fp(&FingerprintOptions::default(), b"{}"));
    }
}
