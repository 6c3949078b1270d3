//! Lawful Access Vault (`lavd`).
//!
//! Escrow private keys live in a PKCS#11 HSM and open a sealed message key only
//! for a request that arrives over mutual TLS from the right agency with a
//! warrant that meets the configured k-of-n authority policy. Every access is
//! recorded in a signed, tamper-evident transparency log before anything is
//! released.
//!
//! The modules follow the trust boundaries, in the order an unwrap request
//! crosses them: [`api`] (who is calling) → [`warrant`] (is it authorised) →
//! [`envelope`] (what is asked for) → [`hsm`] (the only code that touches key
//! material) → [`audit`] and [`store`] (durable record before release).
//!
//! With `--no-default-features` only the provider side is built: [`codec`],
//! [`jwk`] and the sealing half of [`envelope`], without cryptoki, tokio, warp
//! or SQLite.
#![forbid(unsafe_code)]

pub mod audit;
pub mod bounds;
pub mod codec;
pub mod envelope;
pub mod jwk;
pub mod secret;

#[cfg(feature = "daemon")]
pub mod api;
#[cfg(feature = "daemon")]
pub mod cli;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod dev;
#[cfg(feature = "daemon")]
pub mod hsm;
#[cfg(feature = "daemon")]
pub mod keys;
#[cfg(feature = "daemon")]
pub mod metrics;
#[cfg(feature = "daemon")]
pub mod report;
#[cfg(feature = "daemon")]
pub mod store;
#[cfg(feature = "daemon")]
pub mod unwrap;
#[cfg(feature = "daemon")]
pub mod warrant;
#[cfg(feature = "daemon")]
pub mod witness;
