//! The panel's server-rendered pages (owned by the panel's author). Empty until they land.

use crate::AppState;
use axum::Router;
use std::sync::Arc;

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
}
