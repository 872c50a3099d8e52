//! The one error shape of the API: `{"error":{"code":"...","message":"..."}}`.

use serde::Serialize;
use warp::http::{HeaderValue, StatusCode};
use warp::Reply;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (503 answers).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 for a field that is missing, of the wrong type or out of range; names the field.
    pub fn invalid_field(field: &str, problem: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("`{field}` {problem}"),
        )
    }

    /// 400 for a request body that does not decode: `invalid_json` when it is not JSON at all,
    /// `invalid_field` when a field is missing, unknown or of the wrong type (serde names it).
    pub fn from_json(e: serde_json::Error) -> Self {
        match e.classify() {
            serde_json::error::Category::Data => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_field", e.to_string())
            }
            _ => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not valid JSON: {e}"),
            ),
        }
    }

    /// 503 with `Retry-After`: the cluster cannot serve this now, a retry may succeed.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl warp::reject::Reject for ApiError {}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl Reply for ApiError {
    fn into_response(self) -> warp::reply::Response {
        // Every error answer of the API passes here (handlers and `recover` alike): the one
        // place to count rejections by reason.
        crate::metrics::count_rejected(self.code);
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
            },
        };
        let mut resp =
            warp::reply::with_status(warp::reply::json(&body), self.status).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(warp::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Answers `Ok` values as JSON with a status, errors in the error shape.
pub fn reply_json<T: Serialize>(
    result: Result<(StatusCode, T), ApiError>,
) -> warp::reply::Response {
    match result {
        Ok((status, value)) => {
            warp::reply::with_status(warp::reply::json(&value), status).into_response()
        }
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(status = e.status.as_u16(), code = e.code, message = %e.message, "request failed");
            }
            e.into_response()
        }
    }
}
