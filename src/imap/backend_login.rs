//! TODO (stub until the real module lands)

use crate::backend_login::{BackendError, BackendLoginRequest, BackendLoginResult};
use crate::stream::BackendStream;

pub async fn login(
    _stream: BackendStream,
    _req: &BackendLoginRequest<'_>,
) -> Result<BackendLoginResult, BackendError> {
    Err(BackendError::Closed)
}
