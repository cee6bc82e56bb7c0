//! What the layers of the request path add to a response: the body type of a response that
//! passed a layer, and the [`Outcome`] the access log reports.

use bytes::Bytes;
use http_body_util::{Either, Full};

/// The body of a response that passed a layer: the inner service's, or a short fixed one the
/// layer wrote itself.
pub type ResponseBody<B> = Either<B, Full<Bytes>>;

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
