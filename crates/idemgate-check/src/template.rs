//! Placeholders (`{{uuid}}`, `{{key}}`, `{{seq}}`) and the seeded generator behind keys and UUIDs.

/// The placeholders a template may hold.
const NAMES: [&str; 3] = ["uuid", "key", "seq"];

/// SplitMix64: small, fast, and the same sequence for the same seed on every machine.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A version-4-shaped UUID (random bits from this generator).
    pub(crate) fn uuid(&mut self) -> String {
        let hi = (self.next_u64() & !0xF000) | 0x4000; // version 4
        let lo = (self.next_u64() & !(0b11 << 62)) | (0b10 << 62); // RFC 4122 variant
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xFFFF,
            hi & 0xFFFF,
            lo >> 48,
            lo & 0xFFFF_FFFF_FFFF
        )
    }
}

/// The values of one attempt group: the requests that share one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Group {
    pub key: String,
    pub uuid: String,
    pub seq: u64,
}

impl Group {
    /// A new group: a fresh key and UUID, number `seq`.
    pub(crate) fn new(rng: &mut Rng, seq: u64) -> Self {
        let key = format!("idemgate-check-{seq}-{:016x}", rng.next_u64());
        Self {
            key,
            uuid: rng.uuid(),
            seq,
        }
    }

    /// The same key with fresh other values (another request under the same key).
    pub(crate) fn sibling(&self, rng: &mut Rng, seq: u64) -> Self {
        Self {
            key: self.key.clone(),
            uuid: rng.uuid(),
            seq,
        }
    }

    /// Values that stand for any group (for validating templates).
    pub(crate) fn sample() -> Self {
        Self {
            key: "idemgate-check-1-0123456789abcdef".to_owned(),
            uuid: "00000000-0000-4000-8000-000000000000".to_owned(),
            seq: 1,
        }
    }
}

/// Fills the placeholders of `template`.
pub(crate) fn render(template: &str, group: &Group) -> String {
    if !template.contains("{{") {
        return template.to_owned();
    }
    template
        .replace("{{uuid}}", &group.uuid)
        .replace("{{key}}", &group.key)
        .replace("{{seq}}", &group.seq.to_string())
}

/// Refuses placeholders other than the known ones (a typo would otherwise be sent as is).
pub(crate) fn validate(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(format!("unclosed placeholder in {template:?}"));
        };
        let name = &after[..end];
        if !NAMES.contains(&name) {
            return Err(format!(
                "unknown placeholder {{{{{name}}}}} in {template:?} (known: {{{{uuid}}}}, {{{{key}}}}, {{{{seq}}}})"
            ));
        }
        rest = &after[end + 2..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_groups() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(Group::new(&mut a, 1), Group::new(&mut b, 1));
        assert_ne!(Group::new(&mut a, 2), Group::new(&mut Rng::new(8), 2));
    }

    #[test]
    fn uuids_are_version_4_shaped() {
        let u = Rng::new(1).uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
    }

    #[test]
    fn placeholders_are_filled_and_checked() {
        let g = Group::sample();
        assert_eq!(
            render("/o?k={{key}}&n={{seq}}&u={{uuid}}", &g),
            format!("/o?k={}&n=1&u={}", g.key, g.uuid)
        );
        assert!(validate("{\"a\": \"{{uuid}}\"}").is_ok());
        assert!(validate("{{uuid").is_err());
        assert!(
            validate("{{id}}")
                .unwrap_err()
                .contains("unknown placeholder {{id}}")
        );
    }
}
