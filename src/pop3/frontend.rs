//! TODO (stub until the real module lands)

use crate::frontend::{Authenticator, Established, FrontendContext};
use crate::stream::ClientStream;

pub async fn run<A: Authenticator>(
    _client: ClientStream,
    _ctx: FrontendContext,
    _auth: &A,
) -> std::io::Result<Option<Established>> {
    Ok(None)
}
