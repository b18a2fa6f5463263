//! The OpenAPI 3.0 document of `/api/v1`, served at `/api/v1/openapi.json`.

pub(super) const DOCUMENT: &str = include_str!("openapi.json");
