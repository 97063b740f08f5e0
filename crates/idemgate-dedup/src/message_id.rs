//! [`MessageId`]: the dedup key of a message — its own id, or (opt-in) a hash of its content.

use idemgate_core::IdempotencyKey;

/// The key a message is deduplicated by, within one consumer.
///
/// - [`MessageId::new`] takes the broker's or publisher's id (`Nats-Msg-Id`, AMQP `message_id`,
///   an SQS `MessageDeduplicationId`, …). An id that is a valid idempotency key (1–255 bytes of
///   visible ASCII) is used as it is; any other non-empty id (spaces, non-ASCII, longer) is
///   replaced by `id-blake3:<hex>` of its bytes, so every id has a stable key.
/// - [`MessageId::content_hash`] is for messages without an id: `blake3:<hex>` of the payload.
///   Two messages with the same bytes are then the same message: use it only where a repeated
///   payload really is a repeat (opt-in, never a fallback the library takes by itself).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MessageId(IdempotencyKey);

impl MessageId {
    /// The key for the message id `id`; `None` when `id` is empty.
    pub fn new(id: &str) -> Option<Self> {
        if id.is_empty() {
            return None;
        }
        match IdempotencyKey::parse(id) {
            // A quoted spelling would be unquoted by the parser: keep such ids apart by hashing
            // them, so that `"a"` and `a` stay two messages. An id that looks like a key this
            // type makes itself is hashed too, so that a publisher cannot take the key of
            // another message.
            Ok(key) if key.as_str() == id && !Self::is_reserved(id) => Some(Self(key)),
            _ => Some(Self::hashed("id-blake3:", id.as_bytes())),
        }
    }

    /// The prefixes of the keys this type makes itself ([`MessageId::content_hash`], hashed
    /// ids, [`MessageId::from_broker`] with a `jetstream:` identity): publisher ids that start
    /// with one are hashed by [`MessageId::new`].
    pub const RESERVED_PREFIXES: [&'static str; 3] = ["blake3:", "id-blake3:", "jetstream:"];

    fn is_reserved(id: &str) -> bool {
        Self::RESERVED_PREFIXES.iter().any(|p| id.starts_with(p))
    }

    /// The key for an identity the broker itself gave the message, the same on every
    /// redelivery (`idemgate consume` uses `jetstream:<published>:<stream sequence>` for a
    /// JetStream message without `Nats-Msg-Id`): kept as it is when it is a valid key (no
    /// publisher id can take it, see [`MessageId::RESERVED_PREFIXES`]), hashed otherwise;
    /// `None` when empty.
    pub fn from_broker(identity: &str) -> Option<Self> {
        if identity.is_empty() {
            return None;
        }
        match IdempotencyKey::parse(identity) {
            Ok(key) if key.as_str() == identity => Some(Self(key)),
            _ => Some(Self::hashed("id-blake3:", identity.as_bytes())),
        }
    }

    /// The key for a message without an id: a BLAKE3 hash of its payload.
    pub fn content_hash(payload: &[u8]) -> Self {
        Self::hashed("blake3:", payload)
    }

    /// [`MessageId::new`] when `id` is present and non-empty, else the content hash when
    /// `hash_when_missing`, else `None` (the caller decides: dead-letter, or process without
    /// dedup).
    pub fn from_message(id: Option<&str>, payload: &[u8], hash_when_missing: bool) -> Option<Self> {
        match id.and_then(Self::new) {
            Some(key) => Some(key),
            None if hash_when_missing => Some(Self::content_hash(payload)),
            None => None,
        }
    }

    fn hashed(prefix: &str, bytes: &[u8]) -> Self {
        let text = format!("{prefix}{}", blake3::hash(bytes).to_hex());
        // A prefix and 64 hex digits: always a valid key.
        match IdempotencyKey::parse(&text) {
            Ok(key) => Self(key),
            Err(_) => unreachable!("a hex digest is a valid idempotency key"),
        }
    }

    /// The key as text (what handlers receive as `Idempotency-Key`).
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The engine key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.0
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_are_kept_and_others_hashed_stably() {
        assert_eq!(
            MessageId::new("order-1").map(|m| m.as_str().to_owned()),
            Some("order-1".into())
        );
        assert!(MessageId::new("").is_none());
        let spaced = MessageId::new("has space").expect("non-empty");
        assert!(spaced.as_str().starts_with("id-blake3:"));
        assert_eq!(Some(spaced.clone()), MessageId::new("has space"));
        assert_ne!(Some(spaced), MessageId::new("has  space"));
        let long = "x".repeat(300);
        assert_eq!(MessageId::new(&long).map(|m| m.as_str().len()), Some(74));
        // A quoted spelling is not the same message as the bare one.
        assert_ne!(MessageId::new("\"a\""), MessageId::new("a"));
    }

    #[test]
    fn publisher_ids_never_take_keys_of_our_own() {
        let broker = MessageId::from_broker("jetstream:17:3").expect("non-empty");
        assert_eq!(broker.as_str(), "jetstream:17:3");
        let posing = MessageId::new("jetstream:17:3").expect("non-empty");
        assert_ne!(posing, broker);
        assert!(posing.as_str().starts_with("id-blake3:"));
        let hash = MessageId::content_hash(b"p");
        assert_ne!(MessageId::new(hash.as_str()), Some(hash));
        assert_eq!(MessageId::from_broker(""), None);
    }

    #[test]
    fn content_hash_is_opt_in_and_stable() {
        assert_eq!(
            MessageId::content_hash(b"payload"),
            MessageId::content_hash(b"payload")
        );
        assert_ne!(
            MessageId::content_hash(b"payload"),
            MessageId::content_hash(b"payload2")
        );
        assert_eq!(MessageId::from_message(None, b"p", false), None);
        assert_eq!(MessageId::from_message(Some(""), b"p", false), None);
        assert_eq!(
            MessageId::from_message(None, b"p", true),
            Some(MessageId::content_hash(b"p"))
        );
        assert_eq!(
            MessageId::from_message(Some("m-1"), b"p", true),
            MessageId::new("m-1")
        );
    }
}
