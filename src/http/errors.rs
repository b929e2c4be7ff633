//! `ApiError`: every error the API returns, in OpenAI's shape
//! `{"error": {"message", "type", "param", "code"}}`, with a stable status, type and code,
//! and `Retry-After` on 429 and 503.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use crate::actors::ServeError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: Some("invalid_value"),
            retry_after_s: None,
        }
    }

    pub fn bad_json(detail: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!("the request body is not valid JSON: {detail}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_json"),
            retry_after_s: None,
        }
    }

    /// The body did not arrive within the time allowed (a trickled body holds memory).
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("the request body did not arrive within {} ms", limit.as_millis()),
            kind: "invalid_request_error",
            param: None,
            code: Some("body_timeout"),
            retry_after_s: None,
        }
    }

    /// The game closed its connection before its answer was ready (nginx's 499: nobody
    /// reads it, but logs and metrics count it).
    pub fn client_gone() -> Self {
        Self {
            status: StatusCode::from_u16(499).expect("a valid status code"),
            message: "the client closed the connection before the answer was ready".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("client_closed_request"),
            retry_after_s: None,
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body exceeds the {limit}-byte limit"),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
            retry_after_s: None,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        let message = e.to_string();
        let (status, kind, code, retry_after_s, param) = match &e {
            ServeError::Unauthorized => {
                (StatusCode::UNAUTHORIZED, "authentication_error", "invalid_api_key", None, None)
            }
            ServeError::Suspended { .. } => (StatusCode::FORBIDDEN, "permission_error", "game_suspended", None, None),
            ServeError::EscrowShort { .. } => {
                (StatusCode::PAYMENT_REQUIRED, "insufficient_quota", "escrow_shortfall", None, None)
            }
            ServeError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", "registry_unavailable", Some(2), None)
            }
            ServeError::AdminUnauthorized => {
                (StatusCode::UNAUTHORIZED, "authentication_error", "invalid_admin_token", None, None)
            }
            ServeError::NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found", None, None),
            ServeError::RateLimited { retry_after, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                Some(retry_after.as_secs().max(1)),
                None,
            ),
            ServeError::UnknownModel(_) => {
                (StatusCode::NOT_FOUND, "invalid_request_error", "model_not_found", None, Some("model".to_string()))
            }
            ServeError::NoNode(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", "no_node_available", Some(5), None)
            }
            ServeError::QueueFull { retry_after, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                Some(retry_after.as_secs().max(1)),
                None,
            ),
            ServeError::QueueTimeout { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", "queue_timeout", Some(5), None)
            }
            ServeError::Rejected(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "request_rejected", None, None)
            }
            ServeError::ContextLengthExceeded { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "context_length_exceeded", None, None)
            }
            ServeError::TooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "request_too_large", None, None)
            }
            ServeError::NodeFailed(_) => (StatusCode::BAD_GATEWAY, "server_error", "node_failed", None, None),
            ServeError::NotRead { .. } => {
                (StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "stream_not_read", None, None)
            }
            ServeError::ShuttingDown => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", "shutting_down", Some(5), None)
            }
            ServeError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", None, None)
            }
        };
        Self { status, message, kind, param, code: Some(code), retry_after_s }
    }
}

impl ApiError {
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(s) = self.retry_after_s {
            response.insert_header(("Retry-After", s.to_string()));
        }
        response.json(self.body())
    }
}
