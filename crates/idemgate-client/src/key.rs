//! Idempotency keys: one per logical operation, identical on every attempt.
//!
//! A request that already carries the key header keeps it, byte for byte: the caller's key is
//! never replaced or normalised (stripe-php#637 overwrote it). A request without one, whose method
//! is in the policy's key methods (default `POST` and `PATCH`), gets a fresh UUID — generated once,
//! before the first attempt, and sent unchanged on every retry.
//!
//! ```
//! use idemgate_client::key::KeyKind;
//!
//! let k = KeyKind::V7.generate();
//! assert_eq!(k.len(), 36);
//! assert_eq!(&k[14..15], "7"); // the version nibble
//! assert_ne!(KeyKind::V4.generate(), KeyKind::V4.generate());
//! ```

use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// The header idemgate (and Stripe, and the IETF draft) reads the key from.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// How generated keys are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyKind {
    /// UUID version 7 (48-bit millisecond timestamp + 74 random bits), the default: keys made
    /// close in time sort close together, so a store's B-tree (PostgreSQL, redb) inserts stay
    /// local and `idemgate keys list` reads in creation order.
    #[default]
    V7,
    /// UUID version 4 (122 random bits): nothing about the operation's time leaks in the key.
    V4,
}

impl KeyKind {
    /// A fresh key, hyphenated lower-case (36 visible ASCII characters: valid for idemgate's
    /// 1–255-byte rule and for Stripe's).
    pub fn generate(self) -> String {
        match self {
            // No shared context: keys made in the same millisecond are not ordered among
            // themselves (they need not be), and no process-wide lock is taken per key.
            KeyKind::V7 => uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext)),
            KeyKind::V4 => uuid::Uuid::new_v4(),
        }
        .hyphenated()
        .to_string()
    }
}

/// The key an operation uses, and whether it was generated here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OperationKey {
    pub(crate) value: String,
    pub(crate) generated: bool,
}

/// Reads the caller's key from `headers` or, when there is none and `method` gets keys, inserts
/// a generated one. `None` when the request goes without a key.
///
/// A caller's key that is not valid UTF-8 is still sent untouched (the server will judge it);
/// it is reported lossily.
pub(crate) fn resolve(
    headers: &mut HeaderMap,
    name: &HeaderName,
    method: &Method,
    key_methods: &[Method],
    kind: KeyKind,
) -> Option<OperationKey> {
    if let Some(existing) = headers.get(name) {
        return Some(OperationKey {
            value: String::from_utf8_lossy(existing.as_bytes()).into_owned(),
            generated: false,
        });
    }
    if !key_methods.contains(method) {
        return None;
    }
    let value = kind.generate();
    // A UUID's hyphenated form is always a valid header value.
    let header = HeaderValue::from_str(&value).ok()?;
    headers.insert(name.clone(), header);
    Some(OperationKey {
        value,
        generated: true,
    })
}

/// Whether `method` is idempotent by RFC 9110 §9.2.2 (safe to resend without a key).
pub(crate) fn idempotent_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_key_is_kept_verbatim() {
        let mut h = HeaderMap::new();
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("\"my key\""));
        let k = resolve(
            &mut h,
            &IDEMPOTENCY_KEY,
            &Method::POST,
            &[Method::POST],
            KeyKind::V7,
        );
        assert_eq!(
            k,
            Some(OperationKey {
                value: "\"my key\"".into(),
                generated: false
            })
        );
        assert_eq!(h[IDEMPOTENCY_KEY], "\"my key\"");
        assert_eq!(h.get_all(IDEMPOTENCY_KEY).iter().count(), 1);
    }

    #[test]
    fn generated_once_for_key_methods_only() {
        let mut h = HeaderMap::new();
        let k = resolve(
            &mut h,
            &IDEMPOTENCY_KEY,
            &Method::POST,
            &[Method::POST],
            KeyKind::V4,
        )
        .expect("a key");
        assert!(k.generated);
        assert_eq!(h[IDEMPOTENCY_KEY], k.value.as_str());
        assert_eq!(&k.value[14..15], "4");
        // A second resolve (a retry) finds it and keeps it.
        let again = resolve(
            &mut h,
            &IDEMPOTENCY_KEY,
            &Method::POST,
            &[Method::POST],
            KeyKind::V4,
        );
        assert_eq!(again.map(|k| k.value), Some(k.value));

        let mut g = HeaderMap::new();
        assert_eq!(
            resolve(
                &mut g,
                &IDEMPOTENCY_KEY,
                &Method::GET,
                &[Method::POST],
                KeyKind::V7
            ),
            None
        );
        assert!(g.is_empty());
    }
}
