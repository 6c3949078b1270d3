//! (being written)
pub mod seal;
