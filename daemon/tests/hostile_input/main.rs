//! Hostile input: property tests of every parser of untrusted bytes, and
//! the replay of every fuzzing regression input (docs/RELIABILITY.md).
//!
//! One module per parser family. Each property runs `PROPTEST_CASES` cases
//! (64 by default, so the whole binary stays well under a minute in a debug
//! build on two cores; raise it for long runs). Every input, whatever made
//! it, goes through the same checks as the fuzz targets ([`targets`]).

// Test code: a broken property must panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod config;
mod envelope;
mod export;
mod note;
mod regressions;
mod revocation;
mod targets;
mod tiles;
mod warrant;
#[path = "../warrant_common/mod.rs"]
mod warrant_common;
mod witness;
