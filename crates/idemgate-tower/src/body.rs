//! Body types and bounded buffering.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// Errors crossing the layer.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a client's request body failed, for a request body type that tells (the `idemgate`
/// binary's does): the layer answers [`RequestBodyError::Timeout`] with `408`, and any other
/// failure reading a request body with `400` (both with `Connection: close`, since the rest of the
/// body was not read).
#[derive(Debug)]
#[non_exhaustive]
pub enum RequestBodyError {
    /// The whole body did not arrive within this read timeout.
    Timeout(std::time::Duration),
    /// Reading it failed (bad framing, or the client went away).
    Read(BoxError),
}

impl std::fmt::Display for RequestBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestBodyError::Timeout(t) => {
                write!(f, "the request body did not arrive within {t:?}")
            }
            RequestBodyError::Read(e) => write!(f, "reading the request body failed: {e}"),
        }
    }
}

impl std::error::Error for RequestBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RequestBodyError::Timeout(_) => None,
            RequestBodyError::Read(e) => Some(e.as_ref()),
        }
    }
}

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

/// A cap on the bytes of request bodies held in memory at once, shared by every request that
/// holds a [`Reservation`] from it (across threads). Requests never queue for it: one that cannot
/// reserve what it needs is refused (the layer answers `503` + `Retry-After`).
///
/// ```
/// use idemgate_tower::body::BodyBudget;
///
/// let budget = BodyBudget::new(10);
/// let mut a = budget.try_reserve(6).unwrap();
/// assert!(budget.try_reserve(5).is_none());
/// assert!(a.try_grow(4));
/// assert!(!a.try_grow(1));
/// drop(a);
/// assert_eq!(budget.in_use(), 0);
/// ```
#[derive(Clone, Debug)]
pub struct BodyBudget {
    inner: std::sync::Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    used: std::sync::atomic::AtomicUsize,
    cap: usize,
}

impl BodyBudget {
    /// A budget of `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            inner: std::sync::Arc::new(BudgetInner {
                used: std::sync::atomic::AtomicUsize::new(0),
                cap,
            }),
        }
    }

    /// The cap, in bytes.
    pub fn cap(&self) -> usize {
        self.inner.cap
    }

    /// Bytes reserved right now.
    pub fn in_use(&self) -> usize {
        self.inner.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reserves `n` bytes, or `None` if that would go over the cap.
    pub fn try_reserve(&self, n: usize) -> Option<Reservation> {
        self.take(n).then(|| Reservation {
            budget: self.clone(),
            bytes: n,
        })
    }

    fn take(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        let cap = self.inner.cap;
        self.inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= cap)
            })
            .is_ok()
    }
}

/// Bytes reserved from a [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: BodyBudget,
    bytes: usize,
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Reserves `n` more bytes; false (and nothing reserved) if that would go over the cap.
    pub fn try_grow(&mut self, n: usize) -> bool {
        let ok = self.budget.take(n);
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget
            .inner
            .used
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The result of [`collect_budgeted`].
pub enum Budgeted<B> {
    /// The whole body, and the reservation that accounts for its memory.
    Complete(Bytes, Reservation),
    /// The body went over `limit`: the rest, unread.
    Oversized(B),
    /// The budget could not cover the body: the rest, unread.
    OverBudget(B),
}

/// Reads `body` into memory up to `limit` bytes, accounting for the memory in `budget`: the
/// declared length (`Content-Length`, via the size hint) is reserved up front and allocated exactly;
/// a body of unknown length reserves each growth of its buffer before making it.
pub async fn collect_budgeted<B>(
    mut body: B,
    limit: usize,
    budget: &BodyBudget,
) -> Result<Budgeted<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let hint = body.size_hint();
    if hint.lower() > limit as u64 {
        return Ok(Budgeted::Oversized(body));
    }
    let exact = hint.upper().filter(|&u| u == hint.lower());
    let initial = exact.map_or(0, |n| n as usize);
    let Some(mut reservation) = budget.try_reserve(initial) else {
        return Ok(Budgeted::OverBudget(body));
    };
    let mut buf = BytesMut::with_capacity(initial);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if buf.len() + data.len() > limit {
                return Ok(Budgeted::Oversized(body));
            }
            if buf.capacity() - buf.len() < data.len() {
                // Grow the way `BytesMut` would (at least double), reserving the growth first.
                let want = (buf.len() + data.len()).max(buf.capacity() * 2).min(limit);
                let grow = want.saturating_sub(reservation.bytes());
                if !reservation.try_grow(grow) {
                    return Ok(Budgeted::OverBudget(body));
                }
                buf.reserve(want - buf.len());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Budgeted::Complete(buf.freeze(), reservation))
}

/// Bodies of refused requests are read and dropped up to this many bytes before the answer.
pub const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// Reads and drops what is left of a refused request's body (up to [`DRAIN_LIMIT`] bytes, in
/// constant memory; the caller bounds the time), so that the client, which is still sending it,
/// reads the answer: closing a connection with unread data resets it, which can destroy the
/// answer before the client reads it. Returns whether the body was read to its end.
pub async fn drain<B>(mut body: B) -> bool
where
    B: Body + Unpin,
{
    if body.size_hint().lower() > DRAIN_LIMIT as u64 {
        return false;
    }
    let mut left = DRAIN_LIMIT;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        if let Some(data) = frame.data_ref() {
            let n = bytes::Buf::remaining(data);
            if n > left {
                return false;
            }
            left -= n;
        }
    }
    true
}
