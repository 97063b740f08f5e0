//! The bodies the layer hands to the inner service and back to the caller.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;

use crate::body::Prefixed;
use crate::error::BoxError;

/// The request body the inner service receives: the buffered bytes (resent on every attempt),
/// or — for a stream over the cap, sent once — what was read followed by the rest of the stream.
#[derive(Debug)]
pub struct RequestBody {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Streaming(Prefixed<UnsyncBoxBody<Bytes, BoxError>>),
}

impl RequestBody {
    pub(crate) fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }

    pub(crate) fn streaming(body: Prefixed<UnsyncBoxBody<Bytes, BoxError>>) -> Self {
        Self {
            kind: Kind::Streaming(body),
        }
    }

    /// The buffered bytes, if the body is buffered (not a stream over the cap).
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Full(b) => Some(b.as_deref().unwrap_or_default()),
            Kind::Streaming(_) => None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Streaming(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Streaming(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Streaming(s) => s.size_hint(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response body the caller receives: the inner service's, or — when the layer read a
    /// problem+json answer to classify it — those bytes (or, for a problem body over 64 KiB,
    /// the first 64 KiB or so that were read, then the rest of the inner body).
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Inner<B>,
    }
}

pin_project_lite::pin_project! {
    #[project = InnerProj]
    #[derive(Debug)]
    enum Inner<B> {
        Passed { #[pin] body: B },
        Buffered { bytes: Option<Bytes> },
        Prefixed { body: Prefixed<Pin<Box<B>>> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Inner::Passed { body },
        }
    }

    pub(crate) fn buffered(bytes: Bytes) -> Self {
        Self {
            kind: Inner::Buffered {
                bytes: (!bytes.is_empty()).then_some(bytes),
            },
        }
    }

    pub(crate) fn prefixed(body: Prefixed<Pin<Box<B>>>) -> Self {
        Self {
            kind: Inner::Prefixed { body },
        }
    }

    /// Whether the layer read this body (a problem+json answer it classified).
    pub fn is_buffered(&self) -> bool {
        matches!(self.kind, Inner::Buffered { .. })
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            InnerProj::Passed { body } => body.poll_frame(cx).map_err(Into::into),
            InnerProj::Buffered { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            InnerProj::Prefixed { body } => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Inner::Passed { body } => body.is_end_stream(),
            Inner::Buffered { bytes } => bytes.is_none(),
            Inner::Prefixed { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Inner::Passed { body } => body.size_hint(),
            Inner::Buffered { bytes } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Prefixed { body } => body.size_hint(),
        }
    }
}
