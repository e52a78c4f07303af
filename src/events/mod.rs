//! Event adapters (stub; being written).
use serde_json::Value;

use crate::service::Service;

/// Answers one Lambda event of any supported shape.
pub async fn handle(_service: &Service, event: Value) -> Value {
    event
}
