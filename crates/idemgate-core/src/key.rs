//! Idempotency keys, scopes and the fixed-length store key derived from them.
//!
//! ```
//! use idemgate_core::key::{IdempotencyKey, Scope, ScopedKey};
//!
//! // Both the bare form and the RFC 8941 sf-string form are accepted.
//! let bare = IdempotencyKey::parse("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
//! let quoted = IdempotencyKey::parse("\"8e03978e-40d5-43e8-bc93-6894a57f9324\"")?;
//! assert_eq!(bare, quoted);
//!
//! // Two principals using the same key get different store keys.
//! let a = ScopedKey::new("default", Scope::for_principal("payments", &[b"Bearer alice"]), bare.clone());
//! let b = ScopedKey::new("default", Scope::for_principal("payments", &[b"Bearer bob"]), bare);
//! assert_ne!(a.store_key(), b.store_key());
//! # Ok::<(), idemgate_core::key::KeyError>(())
//! ```

use std::fmt::{self, Write as _};
use std::sync::LazyLock;

use crate::coalesce::Coalesce;

/// The longest accepted key, in bytes, after removing sf-string quoting.
pub const MAX_KEY_LEN: usize = 255;

/// The most bytes of a client's text [`ForLog`] writes before cutting it short.
pub const MAX_LOGGED_LEN: usize = 128;

/// Why a client-supplied idempotency key was refused.
///
/// Keys are validated before any store access, so these errors never cost a round trip.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key (or the inside of its quotes) is empty.
    #[error("idempotency key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    #[error("idempotency key is {len} bytes long; at most {MAX_KEY_LEN} are allowed")]
    TooLong {
        /// Length in bytes of the decoded key.
        len: usize,
    },
    /// A byte outside visible ASCII (0x21..=0x7E) was found.
    #[error(
        "idempotency key byte {index} is 0x{byte:02x}; only visible ASCII (0x21-0x7e) is allowed"
    )]
    InvalidByte {
        /// Position of the byte in the raw header value.
        index: usize,
        /// The offending byte.
        byte: u8,
    },
    /// The value starts with `"` but is not a well-formed sf-string.
    #[error("idempotency key starts with '\"' but is not a well-formed quoted string: {reason}")]
    BadQuoting {
        /// What is wrong with the quoting.
        reason: &'static str,
    },
}

/// A validated idempotency key: 1 to 255 bytes of visible ASCII.
///
/// Accepted spellings (PRODUCT §3): a bare value such as `abc-123` (any visible ASCII, not starting
/// with `"`), or an RFC 8941 sf-string such as `"abc-123"` whose only escapes are `\"` and `\\`.
/// Both spellings of the same characters are the same key. Spaces are refused in both forms.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Parses a raw header value.
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        Self::parse_bytes(raw.as_bytes())
    }

    /// Parses a raw header value given as bytes (HTTP header values need not be UTF-8).
    pub fn parse_bytes(raw: &[u8]) -> Result<Self, KeyError> {
        let decoded = match raw.first() {
            Some(b'"') => unquote(raw)?,
            _ => {
                check_visible(raw, 0)?;
                raw.to_vec()
            }
        };
        if decoded.is_empty() {
            return Err(KeyError::Empty);
        }
        if decoded.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { len: decoded.len() });
        }
        // Every byte is visible ASCII, so this cannot fail; map instead of unwrap anyway.
        String::from_utf8(decoded)
            .map(Self)
            .map_err(|e| KeyError::InvalidByte {
                index: e.utf8_error().valid_up_to(),
                byte: 0x80,
            })
    }

    /// The key as the client meant it (quotes removed).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as written to logs: see [`ForLog`]. (A valid key holds only visible ASCII, so in
    /// practice this only caps its length.)
    pub fn for_log(&self) -> ForLog<'_> {
        ForLog(&self.0)
    }
}

/// Text a client chose (an idempotency key), made safe for one log line: every character
/// outside visible ASCII (control characters, spaces, line breaks, non-ASCII) is written as a
/// `\u{..}` escape, so a key can never forge or split a log line, and at most
/// [`MAX_LOGGED_LEN`] bytes of it are written, followed by `…(+NB)` when it was longer (N more
/// bytes; no space, so that it stays one word in a text log).
///
/// ```
/// use idemgate_core::key::ForLog;
///
/// assert_eq!(ForLog::new("order-42").to_string(), "order-42");
/// assert_eq!(ForLog::new("a\nb c").to_string(), "a\\u{a}b\\u{20}c");
/// let long = "k".repeat(200);
/// assert_eq!(ForLog::new(&long).to_string(), format!("{}…(+72B)", "k".repeat(128)));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ForLog<'a>(&'a str);

impl<'a> ForLog<'a> {
    /// Wraps any client text.
    pub fn new(text: &'a str) -> Self {
        Self(text)
    }
}

impl fmt::Display for ForLog<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut written = 0;
        for (at, c) in self.0.char_indices() {
            if written >= MAX_LOGGED_LEN {
                return write!(f, "…(+{}B)", self.0.len() - at);
            }
            if c.is_ascii_graphic() {
                f.write_char(c)?;
            } else {
                write!(f, "\\u{{{:x}}}", u32::from(c))?;
            }
            written += c.len_utf8();
        }
        Ok(())
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey").field(&self.0).finish()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for IdempotencyKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::parse(s)
    }
}

fn check_visible(bytes: &[u8], offset: usize) -> Result<(), KeyError> {
    match bytes.iter().position(|b| !(0x21..=0x7e).contains(b)) {
        Some(i) => Err(KeyError::InvalidByte {
            index: i + offset,
            byte: bytes[i],
        }),
        None => Ok(()),
    }
}

fn unquote(raw: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 1;
    loop {
        match raw.get(i) {
            None => {
                return Err(KeyError::BadQuoting {
                    reason: "missing closing quote",
                });
            }
            Some(b'"') => {
                if i + 1 != raw.len() {
                    return Err(KeyError::BadQuoting {
                        reason: "characters after the closing quote",
                    });
                }
                return Ok(out);
            }
            Some(b'\\') => match raw.get(i + 1) {
                Some(&c @ (b'"' | b'\\')) => {
                    out.push(c);
                    i += 2;
                }
                _ => {
                    return Err(KeyError::BadQuoting {
                        reason: "only \\\" and \\\\ escapes are allowed",
                    });
                }
            },
            Some(&b) => {
                check_visible(&[b], i)?;
                out.push(b);
                i += 1;
            }
        }
    }
}

/// What separates one principal's (and one endpoint's) keys from another's.
///
/// The label is kept in records for administrators. Secret material such as an
/// `Authorization` header is never kept: [`Scope::for_principal`] stores only a hash of it.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Scope(String);

impl Scope {
    /// A scope with an explicit label (for example a tenant id or a route name).
    pub fn new(label: impl Into<String>) -> Self {
        Self(label.into())
    }

    /// A scope for `route` and a principal identified by credential material (header values).
    ///
    /// The label is `route` followed by `#` and 128 bits of the BLAKE3 hash of the material, so two
    /// principals with different credentials never share a scope (up to a 2^-64 collision bound),
    /// and the credentials themselves are never stored.
    pub fn for_principal(route: &str, credentials: &[&[u8]]) -> Self {
        static BASE: LazyLock<blake3::Hasher> =
            LazyLock::new(|| blake3::Hasher::new_derive_key("idemgate scope principal v1"));
        let digest = length_prefixed(&BASE, credentials);
        let mut label = String::with_capacity(route.len() + 33);
        label.push_str(route);
        label.push('#');
        push_hex(&mut label, &digest.as_bytes()[..16]);
        Self(label)
    }

    /// The label as stored in records.
    pub fn label(&self) -> &str {
        &self.0
    }
}

/// The full identity of a record: (namespace, scope, idempotency key).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ScopedKey {
    namespace: String,
    scope: Scope,
    key: IdempotencyKey,
}

impl ScopedKey {
    /// Builds a scoped key.
    pub fn new(namespace: impl Into<String>, scope: Scope, key: IdempotencyKey) -> Self {
        Self {
            namespace: namespace.into(),
            scope,
            key,
        }
    }

    /// The namespace (one per deployment or application).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The scope (principal and route).
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The client's key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// The fixed-length key under which stores keep the record: BLAKE3 (derive-key mode) over the
    /// length-prefixed namespace, scope label and key. Safe in any store (32 bytes, or 64 hex chars).
    pub fn store_key(&self) -> StoreKey {
        static BASE: LazyLock<blake3::Hasher> =
            LazyLock::new(|| blake3::Hasher::new_derive_key("idemgate store key v1"));
        let parts = [
            self.namespace.as_bytes(),
            self.scope.0.as_bytes(),
            self.key.0.as_bytes(),
        ];
        StoreKey(*length_prefixed(&BASE, &parts).as_bytes())
    }
}

/// The hash of `parts`, each preceded by its length (8 bytes, little-endian), in the
/// derive-key mode of `base`. `base` is a hasher made once (deriving its key from the context
/// string costs a compression per call); the parts go through a [`Coalesce`] buffer so that short
/// ones cost one `update` in all. The bytes hashed are the same as one `update` per piece
/// (`tests/digests_are_stable.rs` holds known answers).
fn length_prefixed(base: &blake3::Hasher, parts: &[&[u8]]) -> blake3::Hash {
    let mut h = base.clone();
    let mut buf = Coalesce::new();
    let mut update = |b: &[u8]| {
        h.update(b);
    };
    for part in parts {
        buf.push(&(part.len() as u64).to_le_bytes(), &mut update);
        buf.push(part, &mut update);
    }
    buf.flush(&mut update);
    h.finalize()
}

/// The 32-byte key a store files a record under. See [`ScopedKey::store_key`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey(pub [u8; 32]);

impl StoreKey {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        push_hex(&mut s, &self.0);
        s
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Some(Self(out))
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({})", self.to_hex())
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xf) as usize] as char);
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffer never changes the bytes hashed, whatever the part sizes around it.
    #[test]
    fn length_prefixed_hashes_the_same_bytes_as_one_update_per_piece() {
        let base = blake3::Hasher::new_derive_key("test context");
        for a in [0usize, 1, 495, 496, 503, 504, 505, 511, 512, 513, 2000] {
            for b in [0usize, 1, 7, 8, 9, 500, 512, 1000] {
                let (pa, pb) = (vec![1u8; a], vec![2u8; b]);
                let mut direct = base.clone();
                for part in [&pa[..], &pb[..]] {
                    direct.update(&(part.len() as u64).to_le_bytes());
                    direct.update(part);
                }
                assert_eq!(
                    length_prefixed(&base, &[&pa, &pb]),
                    direct.finalize(),
                    "{a} {b}"
                );
            }
        }
    }

    #[test]
    fn accepts_bare_and_quoted_forms() {
        assert_eq!(IdempotencyKey::parse("abc").unwrap().as_str(), "abc");
        assert_eq!(IdempotencyKey::parse("\"abc\"").unwrap().as_str(), "abc");
        assert_eq!(
            IdempotencyKey::parse(r#""a\"b\\c""#).unwrap().as_str(),
            r#"a"b\c"#
        );
        let max = "k".repeat(MAX_KEY_LEN);
        assert_eq!(IdempotencyKey::parse(&max).unwrap().as_str().len(), 255);
    }

    #[test]
    fn refuses_malformed_keys_with_reasons() {
        assert_eq!(IdempotencyKey::parse(""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse("\"\""), Err(KeyError::Empty));
        assert_eq!(
            IdempotencyKey::parse(&"x".repeat(300)),
            Err(KeyError::TooLong { len: 300 })
        );
        assert_eq!(
            IdempotencyKey::parse("ab\x07c"),
            Err(KeyError::InvalidByte {
                index: 2,
                byte: 0x07
            })
        );
        assert_eq!(
            IdempotencyKey::parse("a b"),
            Err(KeyError::InvalidByte {
                index: 1,
                byte: b' '
            })
        );
        assert!(matches!(
            IdempotencyKey::parse("clé"),
            Err(KeyError::InvalidByte { index: 2, .. })
        ));
        assert!(matches!(
            IdempotencyKey::parse("\"abc"),
            Err(KeyError::BadQuoting { .. })
        ));
        assert!(matches!(
            IdempotencyKey::parse("\"abc\"x"),
            Err(KeyError::BadQuoting { .. })
        ));
        assert!(matches!(
            IdempotencyKey::parse(r#""a\nb""#),
            Err(KeyError::BadQuoting { .. })
        ));
    }

    #[test]
    fn store_key_separates_namespace_scope_and_key() {
        let k = IdempotencyKey::parse("k1").unwrap();
        let base = ScopedKey::new("ns", Scope::new("s"), k.clone()).store_key();
        assert_ne!(
            base,
            ScopedKey::new("ns2", Scope::new("s"), k.clone()).store_key()
        );
        assert_ne!(
            base,
            ScopedKey::new("ns", Scope::new("s2"), k.clone()).store_key()
        );
        // Length prefixes stop ("ab","c") colliding with ("a","bc").
        let k_c = IdempotencyKey::parse("c").unwrap();
        let k_bc = IdempotencyKey::parse("bc").unwrap();
        assert_ne!(
            ScopedKey::new("x", Scope::new("ab"), k_c).store_key(),
            ScopedKey::new("x", Scope::new("a"), k_bc).store_key()
        );
        assert_eq!(StoreKey::from_hex(&base.to_hex()), Some(base));
        assert_eq!(StoreKey::from_hex("zz"), None);
    }

    #[test]
    fn logged_keys_are_escaped_and_capped() {
        // Nothing a client sends can start a new log line or pass for another field.
        let hostile = "k\r\nlevel=ERROR \u{1b}[31m\0é";
        let logged = ForLog::new(hostile).to_string();
        assert!(
            logged.chars().all(|c| c.is_ascii_graphic() || c == '…'),
            "{logged}"
        );
        assert_eq!(logged, r"k\u{d}\u{a}level=ERROR\u{20}\u{1b}[31m\u{0}\u{e9}");
        // Capped at MAX_LOGGED_LEN bytes of the key, saying how much was left out.
        let key = IdempotencyKey::parse(&"x".repeat(MAX_KEY_LEN)).unwrap();
        let logged = key.for_log().to_string();
        assert_eq!(logged, format!("{}…(+127B)", "x".repeat(MAX_LOGGED_LEN)));
        assert_eq!(
            IdempotencyKey::parse("pay-1")
                .unwrap()
                .for_log()
                .to_string(),
            "pay-1"
        );
    }

    #[test]
    fn principal_scope_hides_credentials() {
        let s = Scope::for_principal("pay", &[b"Bearer secret-token"]);
        assert!(s.label().starts_with("pay#"));
        assert!(!s.label().contains("secret"));
        assert_eq!(s.label().len(), 4 + 32);
        assert_ne!(s, Scope::for_principal("pay", &[b"Bearer other"]));
    }
}
