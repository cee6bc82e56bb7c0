//! What the layers of the request path add to a response: the body type of a response that
//! passed a layer, and the [`Outcome`] the access log reports.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

/// A body's error, whatever its source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// The body of a response that passed a layer: the inner service's, or a short fixed one
    /// the layer wrote itself. Empty by default (tower-http's CORS answers a preflight with
    /// one).
    #[project = ResponseBodyProj]
    pub enum ResponseBody<B> {
        /// The inner service's body.
        Inner { #[pin] body: B },
        /// The layer's own.
        Own { #[pin] body: Full<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// The inner service's body.
    pub fn inner(body: B) -> Self {
        Self::Inner { body }
    }

    /// A body of the layer's own.
    pub fn own(body: Full<Bytes>) -> Self {
        Self::Own { body }
    }
}

impl<B> Default for ResponseBody<B> {
    fn default() -> Self {
        Self::own(Full::default())
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
        match self.project() {
            ResponseBodyProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            ResponseBodyProj::Own { body } => body.poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Inner { body } => body.is_end_stream(),
            Self::Own { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Inner { body } => body.size_hint(),
            Self::Own { body } => body.size_hint(),
        }
    }
}

/// What the proxy did with a request, for the access log: a response extension set by the
/// layer that decided (absent: the request was forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome(pub &'static str);

impl Outcome {
    /// The backend's response, to a request with a validated token.
    pub const FORWARDED: Outcome = Outcome("forwarded");
    /// The backend's response, to a request on a public path.
    pub const PUBLIC: Outcome = Outcome("public");
    /// The RFC 9728 metadata document, answered by the proxy.
    pub const METADATA: Outcome = Outcome("metadata");
    /// A request the proxy cannot forward (a `CONNECT`, an unusable target).
    pub const BAD_REQUEST: Outcome = Outcome("bad_request");
}
