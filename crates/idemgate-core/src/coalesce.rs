//! Many small pieces of a hash's input gathered into one `update`.
//!
//! Fingerprints, store keys and scope labels are hashed from dozens of tiny pieces (tags,
//! lengths, short values), and each `update` of a hash function has a fixed cost far above
//! copying a few bytes. [`Coalesce`] buffers pieces up to [`Coalesce::SIZE`] bytes and hands
//! them on in order: the bytes hashed, so every digest, are exactly those of one `update` per
//! piece (known answers in `tests/digests_are_stable.rs`; splits around the size in the tests
//! of `fingerprint` and `key`).

/// A buffer of up to [`Coalesce::SIZE`] bytes in front of a hash function's `update`.
pub(crate) struct Coalesce {
    buf: [u8; Coalesce::SIZE],
    len: usize,
}

impl Coalesce {
    /// The buffer's size; a piece this long or longer goes to `update` directly.
    pub(crate) const SIZE: usize = 512;

    pub(crate) fn new() -> Self {
        Self {
            buf: [0; Self::SIZE],
            len: 0,
        }
    }

    /// Adds `piece`, handing buffered bytes to `update` first when it would not fit.
    #[inline]
    pub(crate) fn push(&mut self, piece: &[u8], mut update: impl FnMut(&[u8])) {
        if self.len + piece.len() > Self::SIZE {
            self.flush(&mut update);
        }
        if piece.len() >= Self::SIZE {
            update(piece);
        } else {
            self.buf[self.len..self.len + piece.len()].copy_from_slice(piece);
            self.len += piece.len();
        }
    }

    /// Hands the buffered bytes, if any, to `update`.
    #[inline]
    pub(crate) fn flush(&mut self, mut update: impl FnMut(&[u8])) {
        if self.len > 0 {
            update(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}
