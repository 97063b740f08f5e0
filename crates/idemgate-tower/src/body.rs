//! Body types and bounded buffering.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// Errors crossing the layer.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of requests handed to the inner service and of responses returned: any body,
/// boxed.
///
/// A named type rather than an alias of `UnsyncBoxBody<Bytes, BoxError>`, so that
/// `Request<IdemBody>` holds no trait object whose lifetime the compiler would have to infer (that
/// trips its `Send` checks of futures holding `<S as Service<Request<IdemBody>>>::Future`).
pub struct IdemBody(UnsyncBoxBody<Bytes, BoxError>);

impl std::fmt::Debug for IdemBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdemBody").finish_non_exhaustive()
    }
}

impl Default for IdemBody {
    fn default() -> Self {
        full(Bytes::new())
    }
}

impl Body for IdemBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// Boxes any body with `Bytes` data.
pub fn boxed<B>(body: B) -> IdemBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    IdemBody(body.map_err(Into::into).boxed_unsync())
}

/// Boxes a body that is already of the right error type.
pub fn box_full<B>(body: B) -> IdemBody
where
    B: Body<Data = Bytes, Error = BoxError> + Send + 'static,
{
    IdemBody(body.boxed_unsync())
}

/// A body of the given bytes.
pub fn full(bytes: Bytes) -> IdemBody {
    box_full(Full::new(bytes).map_err(|e| match e {}))
}

/// The result of [`collect_limited`].
pub enum Collected<B> {
    /// The whole body (trailers are dropped).
    Complete(Bytes),
    /// The body went over the limit: what was read, and the rest, unread.
    Oversized {
        /// Bytes read so far (more than the limit).
        prefix: Bytes,
        /// The remaining body.
        rest: B,
    },
}

/// Reads `body` into memory up to `limit` bytes. Memory use is bounded by `limit` plus one frame.
pub async fn collect_limited<B>(mut body: B, limit: usize) -> Result<Collected<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    if body.size_hint().lower() > limit as u64 {
        return Ok(Collected::Oversized {
            prefix: Bytes::new(),
            rest: body,
        });
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                return Ok(Collected::Oversized {
                    prefix: buf.freeze(),
                    rest: body,
                });
            }
        }
    }
    Ok(Collected::Complete(buf.freeze()))
}

/// A body that yields `prefix` and then the frames of `rest`: an oversized response passed through
/// after part of it was read.
pub struct Prefixed<B> {
    prefix: Option<Bytes>,
    rest: B,
}

impl<B> Prefixed<B> {
    /// Joins the two.
    pub fn new(prefix: Bytes, rest: B) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
        }
    }
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
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        hint.set_lower(hint.lower() + extra);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + extra);
        }
        hint
    }
}
