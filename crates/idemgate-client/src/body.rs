//! Request bodies: buffered up to the policy's cap so they can be resent.
//!
//! A body already in memory (bytes) costs nothing to resend. A streaming body is read up to
//! `body_limit` bytes: if it ends within the cap it is kept and resent on every attempt; if it
//! does not, what was read and the rest of the stream are sent once, as one body, and the
//! operation is not retried ([`Stop::BodyNotRetryable`](crate::report::Stop::BodyNotRetryable),
//! or [`Error::BodyNotRetryable`](crate::Error::BodyNotRetryable) if that single attempt failed).
//! Trailers of a request body that is buffered (it ended within the cap) are dropped: they are
//! not sent at all, not even on the first attempt, since only the data is kept to be resent. A
//! stream over the cap is passed on as it comes, its trailers included. (A request that needs
//! trailers should not go through the retrying client.)

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::error::BoxError;

/// A body read up to a cap.
pub(crate) enum Buffered<B> {
    /// The whole body.
    Complete(Bytes),
    /// Over the cap: what was read, and the rest.
    OverLimit(Prefixed<B>),
}

/// Reads `body` until it ends or `limit` bytes are exceeded.
pub(crate) async fn buffer<B>(mut body: B, limit: usize) -> Result<Buffered<B>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        if let Ok(data) = frame.into_data() {
            total = total.saturating_add(data.len());
            chunks.push_back(data);
            if total > limit {
                return Ok(Buffered::OverLimit(Prefixed {
                    prefix: chunks,
                    rest: body,
                }));
            }
        }
    }
    let bytes = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(total);
            chunks.iter().for_each(|c| all.extend_from_slice(c));
            all.freeze()
        }
    };
    Ok(Buffered::Complete(bytes))
}

/// Chunks already read, then the rest of the stream.
#[derive(Debug)]
pub(crate) struct Prefixed<B> {
    prefix: VecDeque<Bytes>,
    rest: B,
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(chunk) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self.prefix.iter().map(|c| c.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(read));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(read));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    type Chunks = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
    >;

    fn stream(chunks: &[&'static str]) -> Chunks {
        let frames: Vec<_> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn bodies_within_the_cap_are_complete() {
        let b = buffer(Full::new(Bytes::from_static(b"hello")), 5)
            .await
            .expect("read");
        assert!(matches!(b, Buffered::Complete(ref x) if x == "hello"));
        let b = buffer(stream(&["he", "ll", "o"]), 5).await.expect("read");
        assert!(matches!(b, Buffered::Complete(ref x) if x == "hello"));
        let b = buffer(stream(&[]), 0).await.expect("read");
        assert!(matches!(b, Buffered::Complete(ref x) if x.is_empty()));
    }

    #[tokio::test]
    async fn trailers_of_a_buffered_body_are_dropped() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        let b = buffer(StreamBody::new(futures_util::stream::iter(frames)), 64)
            .await
            .expect("read");
        // Only the data is kept (what every attempt sends): the trailers are gone.
        assert!(matches!(b, Buffered::Complete(ref x) if x == "hello"));
    }

    #[tokio::test]
    async fn over_the_cap_the_whole_body_is_still_sent_once() {
        let b = buffer(stream(&["he", "ll", "o ", "world"]), 3)
            .await
            .expect("read");
        let Buffered::OverLimit(rest) = b else {
            panic!("expected over the limit")
        };
        let all = rest.collect().await.expect("body").to_bytes();
        assert_eq!(all, "hello world");
    }
}
