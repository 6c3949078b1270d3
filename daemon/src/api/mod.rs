//! The API boundary: who is calling (mutual TLS, [`identity`]), what they
//! may do ([`routes`]), and how much ([`ratelimit`], `[limits]`). HTTP
//! statuses and error codes are decided here and nowhere else ([`error`]).
//!
//! A request crosses, in order: [`server`] (TCP accept under a connection
//! limit, TLS handshake against the client CAs and CRLs, the certificate's
//! single URI SAN) → [`pipeline`] (rate limit, certificate re-check against
//! the current configuration, bounded body, metrics, the request span) →
//! [`routes`] (role check, strict JSON) → [`handlers`] (the unwrap path of
//! [`crate::unwrap`], revocation, the audit endpoints). [`admin`] serves the
//! operations endpoints on a separate plain-HTTP listener. [`state`] holds
//! what a SIGHUP reload replaces.
//!
//! What it trusts: rustls's certificate verification, and the `[roles]`
//! table. Nothing past [`pipeline`] sees a request whose caller is not an
//! authenticated identity.

pub mod admin;
pub mod error;
pub mod handlers;
pub mod identity;
pub mod pipeline;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod state;
pub mod tls;

pub use error::ApiError;
pub use routes::{blocking, RequestContext};
pub use server::{Listener, ServeError, Timeouts};
pub use state::{Reloadable, ServerState};
