//! A JSON body extractor whose refusals are problem bodies carrying serde's
//! own message (line, column, the field it names), never axum's plain text.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The request body, parsed as JSON into `T`.
pub(crate) struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "expected a JSON body with Content-Type: application/json".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::MalformedJson(format!("could not read the body: {e}")))?;
        parse(&bytes).map(Json)
    }
}

/// Parses a JSON body, classifying serde's error.
pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let message = e.to_string();
        match e.classify() {
            serde_json::error::Category::Data => ApiError::InvalidBody {
                field: named_field(&message),
                message,
            },
            _ => ApiError::MalformedJson(message),
        }
    })
}

// serde names the field in "missing field `x`" and "unknown field `x`".
fn named_field(message: &str) -> Option<String> {
    for prefix in ["missing field `", "unknown field `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            return rest.split('`').next().map(str::to_owned);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dto::CreateEntryRequest;

    #[test]
    fn names_the_missing_field_and_keeps_serdes_message() {
        let err = parse::<CreateEntryRequest>(br#"{"account":1,"type":"MARKET","tp":[]}"#)
            .err()
            .map(|e| e.problem());
        let p = err.as_ref().map(|p| (p.code.as_str(), p.field.as_deref()));
        assert_eq!(p, Some(("invalid_body", Some("symbol"))));
        let message = err.map(|p| p.message).unwrap_or_default();
        assert!(message.contains("missing field `symbol`"), "{message}");
    }

    #[test]
    fn syntax_errors_are_malformed_json() {
        let err = parse::<CreateEntryRequest>(b"{\"account\":").err();
        assert!(matches!(err, Some(ApiError::MalformedJson(m)) if m.contains("EOF")));
    }
}
