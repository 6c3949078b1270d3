//! The tamper-evident audit log (PROTOCOL §6), storage-independent core.
//!
//! Every security event becomes a canonical JSON leaf ([`leaf`]); leaves form
//! an RFC 6962 Merkle tree ([`merkle`]) whose heads are C2SP `tlog-checkpoint`
//! signed notes ([`note`]), signed by an Ed25519 key held in the HSM. An
//! auditor checks an export of the whole log offline ([`export`]).
//!
//! Trust: this module trusts nothing it reads. The store that persists leaves
//! and subtree hashes plugs in through [`merkle::HashReader`]; the HSM signs
//! through a closure given to [`note::sign_checkpoint`]. Integrity comes from
//! the signed checkpoints alone, so a verifier needs only the verifier key.

pub mod export;
pub mod leaf;
#[cfg(feature = "daemon")]
pub mod log;
pub mod merkle;
pub mod note;
pub mod tiles;
pub mod witness;
#[cfg(feature = "daemon")]
pub mod witnessing;
