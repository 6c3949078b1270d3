//! (being written)

pub mod warrant;
