//! Per-envelope scope (PROTOCOL §5): may this verified warrant open this
//! envelope? The envelope header fields come from an already parsed envelope;
//! this module only compares them with the warrant.

use time::OffsetDateTime;

use super::VerifiedWarrant;

/// Why one envelope is outside a warrant's scope. Each is a per-envelope
/// `denied` result, not a refusal of the whole request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The warrant has `kids` and the envelope's escrow key is not among them.
    #[error("escrow key `{0}` is not allowed by the warrant")]
    KeyNotAllowed(String),
    /// The envelope's `target` is not one of the warrant's `targets` (exact match).
    #[error("target is not in the warrant")]
    TargetNotInWarrant,
    /// The envelope's `time` is outside the warrant's `[window.from, window.to)`.
    #[error("envelope time is outside the warrant's window")]
    OutOfWindow,
}

impl Denial {
    /// The PROTOCOL §5 reason code.
    pub fn code(&self) -> &'static str {
        self.reason().as_str()
    }

    /// The reply's and the leaf's reason (one match, so a new denial cannot
    /// fall through to another reason).
    pub fn reason(&self) -> crate::envelope::reply::DenyReason {
        use crate::envelope::reply::DenyReason;
        match self {
            Self::KeyNotAllowed(_) => DenyReason::KeyNotAllowed,
            Self::TargetNotInWarrant => DenyReason::TargetNotInWarrant,
            Self::OutOfWindow => DenyReason::OutOfWindow,
        }
    }
}

impl VerifiedWarrant {
    /// Checks one envelope header against the warrant, in PROTOCOL §5 order:
    /// `kid` allowed → `target` in `targets` → `time` in `window`.
    ///
    /// # Errors
    /// The first [`Denial`] in that order.
    pub fn check_envelope(
        &self,
        kid: &str,
        target: &str,
        time: OffsetDateTime,
    ) -> Result<(), Denial> {
        if !self.allows_kid(kid) {
            return Err(Denial::KeyNotAllowed(kid.to_string()));
        }
        if !self.targets_contain(target) {
            return Err(Denial::TargetNotInWarrant);
        }
        if !self.claims().window.contains(time) {
            return Err(Denial::OutOfWindow);
        }
        Ok(())
    }
}
