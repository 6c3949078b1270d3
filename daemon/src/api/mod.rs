//! The API boundary: who is calling (mutual TLS, [`identity`]) and what they
//! may do. HTTP statuses and error codes are decided here and nowhere else.

pub mod identity;
