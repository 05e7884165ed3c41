//! A JSON body extractor whose refusals are problem bodies carrying serde's
//! own message (line, column) and the field's path in the body, never axum's
//! plain text.

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

/// Parses a JSON body, classifying serde's error and naming the field it
/// concerns by its path in the body (`tp[0]`, `protection.slPct`): serde's
/// own message names only missing and unknown fields, and a value of the
/// wrong type only by line and column.
pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut body = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut body).map_err(|e| {
        let path = e.path().to_string();
        let e = e.into_inner();
        let message = e.to_string();
        match e.classify() {
            serde_json::error::Category::Data => ApiError::InvalidBody {
                field: field_of(&path, &message),
                message,
            },
            _ => ApiError::MalformedJson(message),
        }
    })?;
    // What follows the value (a second document, stray characters).
    body.end()
        .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    Ok(value)
}

/// The field an error concerns: the path serde was at (`.` for the body
/// itself), and, for a missing or unknown field, the name serde gives, as
/// the path stops at the object that lacks or has it.
fn field_of(path: &str, message: &str) -> Option<String> {
    let parent = (path != ".").then_some(path);
    match (parent, named_field(message)) {
        // An unknown field's path already ends with it.
        (Some(parent), Some(name)) if parent.rsplit('.').next() != Some(name.as_str()) => {
            Some(format!("{parent}.{name}"))
        }
        (Some(parent), _) => Some(parent.to_owned()),
        (None, name) => name,
    }
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

    fn refusal(body: &str) -> Option<(String, Option<String>, String)> {
        parse::<CreateEntryRequest>(body.as_bytes())
            .err()
            .map(|e| e.problem())
            .map(|p| (p.code, p.field, p.message))
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_path() {
        let (code, field, message) =
            refusal(r#"{"account":"one","symbol":"BTCUSDT","type":"MARKET"}"#).unwrap();
        assert_eq!(
            (code.as_str(), field.as_deref()),
            ("invalid_body", Some("account"))
        );
        assert!(message.contains("invalid type"), "{message}");
    }

    #[test]
    fn an_element_of_a_list_is_named_by_its_index() {
        let (_, field, message) =
            refusal(r#"{"account":1,"symbol":"BTCUSDT","type":"MARKET","tp":["1",2]}"#).unwrap();
        assert_eq!(field.as_deref(), Some("tp[1]"), "{message}");
    }

    #[test]
    fn a_field_in_a_nested_object_is_named_with_its_parent() {
        let problem = |body: &str| {
            parse::<crate::dto::UpdateAccountRequest>(body.as_bytes())
                .err()
                .map(|e| e.problem())
                .map(|p| (p.field, p.message))
        };
        let (field, message) = problem(r#"{"protection":{"slPct":"1","tpPct":"2"}}"#).unwrap();
        assert_eq!(field.as_deref(), Some("protection.tpPct"), "{message}");
        let (field, message) = problem(r#"{"protection":{"slPct":3}}"#).unwrap();
        assert_eq!(field.as_deref(), Some("protection.slPct"), "{message}");
    }

    #[test]
    fn something_after_the_body_is_malformed_json() {
        let err = parse::<serde_json::Value>(br#"{"a":1} {"b":2}"#).err();
        assert!(
            matches!(&err, Some(ApiError::MalformedJson(m)) if m.contains("trailing")),
            "{:?}",
            err.map(|e| e.problem())
        );
    }

    #[test]
    fn syntax_errors_are_malformed_json() {
        let err = parse::<CreateEntryRequest>(b"{\"account\":").err();
        assert!(matches!(err, Some(ApiError::MalformedJson(m)) if m.contains("EOF")));
    }
}
