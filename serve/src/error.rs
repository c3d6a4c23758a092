//! Errors as OpenAI clients expect them: `{"error": {"message", "type", "param", "code"}}` with the
//! HTTP status the OpenAI API uses for the case, and stable codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// One failed request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `server_error`.
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// Stable, for clients to act on: `model_not_found`, `unsupported_parameter`,
    /// `context_length_exceeded`, `invalid_value`, `invalid_json`, `adapter_unavailable`, `internal`.
    pub code: &'static str,
}

impl ApiError {
    pub fn invalid(param: Option<&str>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(String::from),
            code,
        }
    }

    pub fn model_not_found(model: &str, known: &[String]) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{model}` does not exist: this server has {}",
                known.join(", ")
            ),
            kind: "not_found_error",
            param: Some("model".into()),
            code: "model_not_found",
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<pai_model::ModelError> for ApiError {
    fn from(e: pai_model::ModelError) -> Self {
        match e {
            pai_model::ModelError::InvalidRequest { field, reason } => {
                Self::invalid(Some(field), "invalid_value", format!("{field} {reason}"))
            }
            other => Self::internal(other.to_string()),
        }
    }
}
