//! The one place where a refused request becomes an HTTP status, a stable
//! code and a message: `{"error":{"code":"…","message":"…"}}` (PROTOCOL §5).
//!
//! Handlers return [`ApiError`]; warp's own rejections (no route, wrong
//! method, unreadable body) are mapped by [`from_rejection`] so that no
//! response ever carries warp's default text. Messages say what was wrong
//! with the request; they never carry internal detail (file paths, `CKR_*`
//! codes, SQLite errors): those go to the log, at the place that saw them.

use std::time::Duration;

use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;

use super::identity::{IdentityError, Role};

/// A whole-request refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The body is not the JSON the route expects (syntax, unknown or
    /// duplicate field, trailing data) or a parameter is invalid: a buggy
    /// client.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The client certificate chained to a configured CA but does not carry
    /// exactly one usable URI SAN, so it names no identity.
    #[error("the client certificate names no identity: {0}")]
    InvalidClientIdentity(IdentityError),
    /// The connection's client certificate is no longer accepted under the
    /// current configuration (revoked by a reloaded CRL, its CA removed, or
    /// it expired while the connection was open).
    #[error("the client certificate is no longer accepted: {0}")]
    CertificateRejected(&'static str),
    /// The identity does not hold any role that may use this endpoint.
    #[error("{identity} may not use this endpoint ({needed})")]
    Forbidden {
        /// The caller's URI SAN.
        identity: String,
        /// The roles that would do, spelled as in the config.
        needed: String,
    },
    /// No route has this path.
    #[error("no such endpoint")]
    NotFound,
    /// The path exists but not with this method.
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    /// The body did not arrive within `limits.body_read_timeout_secs`: a slow
    /// or stalled client.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// A body sent as something other than `application/json`. Refused so
    /// that a web page cannot make a browser holding a client certificate
    /// post a form (`text/plain`, which needs no CORS preflight) that the
    /// JSON parser would accept: a cross-site revocation or unwrap.
    #[error("the request body must be sent as application/json; it was sent as {0}")]
    UnsupportedMediaType(String),
    /// The body is larger than `limits.max_body_bytes`.
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The bodies of requests in flight already hold so much of their
    /// budget (`limits.max_body_bytes_in_flight`, or for the admin's
    /// revocations `limits.max_body_bytes`) that this one's does not fit;
    /// it was not read. Answered at once, with `Retry-After`.
    #[error(
        "the server is holding as many request bodies as it may \
         ({setting}, {limit} bytes); retry later"
    )]
    Busy {
        /// The configured bound.
        limit: usize,
        /// The setting that bounds it (`limits.max_body_bytes_in_flight`).
        setting: &'static str,
    },
    /// More envelopes than `limits.max_batch` in one request.
    #[error("the request has {count} items; at most {limit} are allowed")]
    BatchTooLarge {
        /// Items sent.
        count: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The identity made more requests than its rate limit allows.
    #[error("too many requests from this identity; retry after {} s", retry_after.as_secs().max(1))]
    RateLimited {
        /// When a request would be allowed again.
        retry_after: Duration,
    },
    /// The HSM failed (a lost token or session, a device error) or did not
    /// answer within `[hsm] call_timeout_ms`; nothing was released and the
    /// request may succeed later. Details (the `CKR_*` code, the call) are
    /// in the log.
    #[error("the HSM is unavailable; retry later")]
    HsmUnavailable,
    /// The store (the SQLite file, or the PostgreSQL server) failed or could
    /// not be reached in time; nothing was released and the request may
    /// succeed later, on this replica or another. Details are in the log.
    #[error("the store is unavailable; retry later")]
    StoreUnavailable,
    /// `release_after_witness`: the request's leaves were logged (and its
    /// budget spent) but no checkpoint covering them was cosigned by the
    /// witness quorum within `witness_timeout_secs`, so no key was released.
    /// The opened leaves stay in the log for auditors.
    #[error(
        "the witnesses did not cosign the audit log within {timeout_secs} s; no key was \
         released, and the request's audit entries and budget spend stand"
    )]
    WitnessUnavailable {
        /// The configured wait.
        timeout_secs: u64,
    },
    /// A domain refusal with its own code and status: a warrant refused
    /// (400/403/413 by its class), a proof asked for outside the tree.
    #[error("{message}")]
    Refused {
        /// The stable code (e.g. `policy_not_met`, `warrant_revoked`).
        code: &'static str,
        /// The HTTP status.
        status: StatusCode,
        /// What was wrong, for the client.
        message: String,
    },
    /// A bug: something that should not fail did. Details are in the log.
    #[error("internal error")]
    Internal,
}

/// `ApiError` converts into a warp rejection (warp's blanket `From` for
/// `Reject` types), so handlers can use `?`.
impl warp::reject::Reject for ApiError {}

impl ApiError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Malformed(_) => "malformed_request",
            ApiError::InvalidClientIdentity(_) => "invalid_client_identity",
            ApiError::CertificateRejected(_) => "client_certificate_rejected",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::BatchTooLarge { .. } => "batch_too_large",
            ApiError::Busy { .. } => "server_busy",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::HsmUnavailable => "hsm_unavailable",
            ApiError::StoreUnavailable => "store_unavailable",
            ApiError::WitnessUnavailable { .. } => "witness_unavailable",
            ApiError::Refused { code, .. } => code,
            ApiError::Internal => "internal_error",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidClientIdentity(_)
            | ApiError::CertificateRejected(_)
            | ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTooLarge { .. } | ApiError::BatchTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::HsmUnavailable
            | ApiError::StoreUnavailable
            | ApiError::WitnessUnavailable { .. }
            | ApiError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Refused { status, .. } => *status,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A forbidden-role refusal for `identity`, which needed one of `roles`.
    pub fn forbidden(identity: &str, roles: &[Role]) -> Self {
        let needed = roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(" or ");
        ApiError::Forbidden {
            identity: identity.to_string(),
            needed: if needed.is_empty() {
                // `ANY_ROLE`: the caller holds none.
                "it holds no role in [roles]".into()
            } else {
                format!("it needs the {needed} role")
            },
        }
    }

    /// The response: status, JSON body, and `Retry-After` for 429. The code
    /// is also put in the response's extensions ([`ErrorCode`]) for the
    /// request log.
    pub fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        let mut response = Response::new(body.to_string().into());
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let retry_after = match &self {
            ApiError::RateLimited { retry_after } => Some(retry_after.as_secs().max(1)),
            // Bodies in flight finish within the body timeout, most far
            // sooner: a second is a fair first wait.
            ApiError::Busy { .. } => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                headers.insert(header::RETRY_AFTER, v);
            }
        }
        if matches!(
            self,
            ApiError::CertificateRejected(_) | ApiError::InvalidClientIdentity(_)
        ) {
            // The connection's certificate will not pass again: make the
            // client reconnect (and be checked) rather than retry on it. (A
            // certificate without one URI SAN has no identity to rate-limit
            // by: each try costs it a handshake.)
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response.extensions_mut().insert(ErrorCode(self.code()));
        response
    }
}

/// The error code of a refused request, carried in the response's
/// extensions so that the request log can name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

/// Maps a warp rejection to an [`ApiError`]. Our own rejections win; then
/// the protocol-level ones warp produces; anything else is a bug, logged
/// here with its detail and answered as a bare 500. (Body size is enforced
/// by the request pipeline before routing, so routes must not add warp's
/// `content_length_limit`: its rejection would land here as a 500.)
pub fn from_rejection(rejection: &warp::Rejection) -> ApiError {
    use warp::reject::{
        InvalidHeader, InvalidQuery, MethodNotAllowed, MissingHeader, UnsupportedMediaType,
    };
    if let Some(e) = rejection.find::<ApiError>() {
        return e.clone();
    }
    if rejection.find::<MethodNotAllowed>().is_some() {
        return ApiError::MethodNotAllowed;
    }
    if rejection.find::<InvalidQuery>().is_some() {
        return ApiError::Malformed("invalid query string".into());
    }
    if let Some(h) = rejection.find::<InvalidHeader>() {
        return ApiError::Malformed(format!("invalid header {}", h.name()));
    }
    if let Some(h) = rejection.find::<MissingHeader>() {
        return ApiError::Malformed(format!("missing header {}", h.name()));
    }
    if rejection.find::<UnsupportedMediaType>().is_some() {
        return ApiError::Malformed("unsupported content type".into());
    }
    if rejection.is_not_found() {
        return ApiError::NotFound;
    }
    tracing::error!(?rejection, "unhandled rejection");
    ApiError::Internal
}

/// [`from_rejection`] as a response: the final `recover` of the route table.
pub async fn recover(rejection: warp::Rejection) -> Result<Response, std::convert::Infallible> {
    Ok(from_rejection(&rejection).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(r: Response) -> serde_json::Value {
        use http_body_util::BodyExt as _;
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn every_error_has_the_protocol_shape_and_one_status() {
        let cases = [
            (ApiError::Malformed("x".into()), 400, "malformed_request"),
            (
                ApiError::InvalidClientIdentity(IdentityError::NoUriSan),
                403,
                "invalid_client_identity",
            ),
            (
                ApiError::CertificateRejected("certificate_revoked"),
                403,
                "client_certificate_rejected",
            ),
            (
                ApiError::forbidden("spiffe://a/b", &[Role::Agency]),
                403,
                "forbidden",
            ),
            (ApiError::NotFound, 404, "not_found"),
            (ApiError::MethodNotAllowed, 405, "method_not_allowed"),
            (ApiError::RequestTimeout, 408, "request_timeout"),
            (
                ApiError::UnsupportedMediaType("text/plain".into()),
                415,
                "unsupported_media_type",
            ),
            (ApiError::BodyTooLarge { limit: 10 }, 413, "body_too_large"),
            (
                ApiError::BatchTooLarge { count: 5, limit: 4 },
                413,
                "batch_too_large",
            ),
            (
                ApiError::RateLimited {
                    retry_after: Duration::from_millis(1500),
                },
                429,
                "rate_limited",
            ),
            (ApiError::HsmUnavailable, 503, "hsm_unavailable"),
            (ApiError::StoreUnavailable, 503, "store_unavailable"),
            (
                ApiError::Busy {
                    limit: 2048,
                    setting: "limits.max_body_bytes_in_flight",
                },
                503,
                "server_busy",
            ),
            (
                ApiError::WitnessUnavailable { timeout_secs: 10 },
                503,
                "witness_unavailable",
            ),
            (ApiError::Internal, 500, "internal_error"),
        ];
        for (e, status, code) in cases {
            let message = e.to_string();
            let r = e.into_response();
            assert_eq!(r.status().as_u16(), status, "{code}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
            assert_eq!(r.extensions().get::<ErrorCode>(), Some(&ErrorCode(code)));
            let v = body_json(r).await;
            assert_eq!(
                v,
                serde_json::json!({"error": {"code": code, "message": message}})
            );
        }
    }

    #[test]
    fn rate_limited_says_when_to_retry() {
        let r = ApiError::RateLimited {
            retry_after: Duration::from_millis(200),
        }
        .into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn forbidden_names_the_identity_and_the_role() {
        let e = ApiError::forbidden("spiffe://a.example/x", &[Role::Provider, Role::Agency]);
        assert_eq!(
            e.to_string(),
            "spiffe://a.example/x may not use this endpoint (it needs the provider or agency role)"
        );
        // A route any role may use, and a caller with none.
        let e = ApiError::forbidden("spiffe://a.example/x", &[]);
        assert_eq!(
            e.to_string(),
            "spiffe://a.example/x may not use this endpoint (it holds no role in [roles])"
        );
    }

    #[test]
    fn warp_rejections_map_to_stable_codes() {
        assert_eq!(
            from_rejection(&warp::reject::not_found()),
            ApiError::NotFound
        );
        let custom = warp::reject::custom(ApiError::HsmUnavailable);
        assert_eq!(from_rejection(&custom), ApiError::HsmUnavailable);
    }
}
