//! The one place where PKCS#11 return codes become lavd errors.
//!
//! Mapping (decided here, nowhere else):
//! - every failing PKCS#11 call keeps its `CKR_*` name and the `C_*` function
//!   that returned it ([`HsmError::Pkcs11`]), for operators' logs; the API layer
//!   never shows them to clients;
//! - `CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`, `CKR_DEVICE_REMOVED`,
//!   `CKR_TOKEN_NOT_PRESENT`, `CKR_USER_NOT_LOGGED_IN`, `CKR_DEVICE_ERROR` and
//!   `CKR_CRYPTOKI_NOT_INITIALIZED` mean the session or token is gone, not that
//!   the request was wrong: [`HsmError::is_session_lost`] is true and the pool
//!   reconnects and logs in again on the next call;
//! - `CKR_PIN_INCORRECT`/`CKR_PIN_LOCKED` become [`HsmError::Login`] so the
//!   operator sees a PIN problem, not a generic failure;
//! - `CKR_KEY_FUNCTION_NOT_PERMITTED` and `CKR_KEY_TYPE_INCONSISTENT` from a
//!   derive are that key's fault, not the token's ([`key_refused`]; an open
//!   makes it [`HsmError::KeyRefused`] once a fresh look-up gets the same):
//!   its caller withholds or skips that key, and the token serves the others.

use std::path::PathBuf;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

/// An HSM operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded: the path is wrong, the file is
    /// not a PKCS#11 library, or a library it needs is missing.
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    Module {
        /// The configured module path.
        path: PathBuf,
        /// The loader's explanation.
        reason: String,
    },
    /// No token with the configured label or serial is present.
    #[error("no token {wanted} in module {module}; tokens present: {present}")]
    TokenNotFound {
        /// `label "x"` or `serial "y"`.
        wanted: String,
        /// The module path.
        module: PathBuf,
        /// Labels (and serials) of the tokens that are present, or `none`.
        present: String,
    },
    /// More than one token matches the label: choose by serial instead.
    #[error("{count} tokens have label {label:?}; select the token by serial")]
    AmbiguousToken {
        /// The configured label.
        label: String,
        /// How many tokens have it.
        count: usize,
    },
    /// The user PIN was refused (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`,
    /// `CKR_PIN_EXPIRED`). Check the PIN file; repeated failures lock the token.
    #[error("HSM login failed: {ckr}")]
    Login {
        /// The `CKR_*` code.
        ckr: String,
    },
    /// The token refused the PIN earlier and no login is tried again until
    /// the PIN is replaced (reload) or the daemon restarts: each try would
    /// count towards locking the token.
    #[error("HSM login held back: the token refused the PIN ({ckr}); replace it and reload")]
    LoginHeld {
        /// The `CKR_*` code of the refusal.
        ckr: String,
    },
    /// A PKCS#11 call failed.
    #[error("{function}: {ckr}")]
    Pkcs11 {
        /// The `C_*` function that returned the code.
        function: String,
        /// The `CKR_*` code.
        ckr: String,
        /// Whether this means the session or token was lost (see module docs).
        session_lost: bool,
    },
    /// A cryptoki-side failure that is not a PKCS#11 return code (conversion,
    /// missing function pointer).
    #[error("PKCS#11 wrapper: {0}")]
    Wrapper(String),
    /// No key with this label exists on the token.
    #[error("no {kind} key {label:?} on the token")]
    KeyNotFound {
        /// `escrow` or `audit`.
        kind: &'static str,
        /// The key's label on the token.
        label: String,
    },
    /// A key with this label already exists on the token.
    #[error("a key labelled {0:?} already exists on the token")]
    DuplicateKey(String),
    /// The token returned a public key in a form that is not a valid point.
    #[error("the token returned an invalid public key for {0:?}")]
    InvalidPublicKey(String),
    /// The private key under this label does not agree with the public
    /// half beside it (a derive on P-256's generator, compared with the
    /// public half's x-coordinate): one
    /// of them was replaced on the token outside lavd, so envelopes sealed
    /// to the published key cannot open with it.
    #[error(
        "the private key labelled {0:?} does not match its public half on the token (replaced \
         outside lavd?)"
    )]
    KeyPairMismatch(String),
    /// The private key under this label could leave the token (its value
    /// readable, not sensitive, or extractable), or lacks the usage of its
    /// one operation: it was made or imported outside lavd, or the token
    /// ignored part of lavd's template. It is not used (nor published, nor
    /// kept when just generated).
    #[error("the private key labelled {label:?} on the token is not safe to use: {problem}")]
    KeyAttributes {
        /// The key's label on the token.
        label: String,
        /// Which attributes are wrong.
        problem: String,
    },
    /// The token refused a derive with the private key under this label,
    /// twice, the second time after a fresh look-up
    /// (`CKR_KEY_FUNCTION_NOT_PERMITTED` or `CKR_KEY_TYPE_INCONSISTENT`):
    /// a vendor key type or a token policy the attribute check could not
    /// judge. That key's fault, not the token's: its envelopes are
    /// `open_failed`, and other keys serve.
    #[error("the token refuses to derive with the private key labelled {label:?} ({ckr})")]
    KeyRefused {
        /// The key's label on the token.
        label: String,
        /// The `CKR_*` code of the refusal.
        ckr: String,
    },
    /// The key under this label is not the one lavd started with: it was
    /// replaced on the token while lavd was running.
    #[error("the key labelled {0:?} on the token is not the one lavd started with")]
    KeyReplaced(String),
    /// The derived secret could not be read: the token did not honour the
    /// derive template (see `hsm-config/` for each vendor's policy).
    #[error("the token returned a {0}-byte derived secret instead of 32 bytes")]
    DerivedSecretLength(usize),
    /// The session object holding a derived secret could not be destroyed
    /// (`C_DestroyObject` failed with something other than a lost session):
    /// a buggy token, or one whose policy forbids destroying it. The session
    /// is closed instead of returned to the pool, which destroys the object
    /// with it.
    #[error("the derived secret could not be destroyed ({0}); its session was closed")]
    DerivedSecretNotDestroyed(String),
    /// The token refused to destroy a key object under this label
    /// (`CKR_ACTION_PROHIBITED`: `CKA_DESTROYABLE` false, or its policy):
    /// it stays on the token until removed with the token's own tools.
    #[error(
        "the token refuses to destroy the key object under {0:?} (CKR_ACTION_PROHIBITED: \
         CKA_DESTROYABLE false, or the token's policy)"
    )]
    KeyNotDestroyable(String),
    /// Every session was busy for the whole wait: the HSM is overloaded or an
    /// operation hangs. Raise `sessions` or look at the HSM.
    #[error("all {0} HSM sessions stayed busy; gave up waiting")]
    Busy(usize),
    /// An HSM call did not return within the call deadline
    /// (`[hsm] call_timeout_ms`), or every worker was held by calls that
    /// had not: the HSM, or the network to it, hangs. The call itself may
    /// still return later; its result is dropped.
    #[error("{op}: the HSM did not answer within {} ms", after.as_millis())]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The deadline.
        after: std::time::Duration,
    },
    /// A logged-in session finds no private key at all on the token, not
    /// even the audit key: its object store cannot be read (a session that
    /// silently lost its login, a token whose storage vanished), so
    /// "absent" would mean nothing.
    #[error(
        "the token shows no private key at all, not even the audit key: its objects cannot be read"
    )]
    TokenUnreadable,
    /// The blocking pool that runs HSM work is gone (shutdown).
    #[error("HSM worker task failed: {0}")]
    Worker(String),
}

impl HsmError {
    /// Whether this says a key's objects on the token are wrong (another
    /// key under its label, two of them, an unreadable or unusable one, a
    /// pair that disagrees, attributes that let it leave), the token itself
    /// answering: a module reset would find them the same.
    #[must_use]
    pub fn is_key_fault(&self) -> bool {
        matches!(
            self,
            HsmError::DuplicateKey(_)
                | HsmError::InvalidPublicKey(_)
                | HsmError::KeyPairMismatch(_)
                | HsmError::KeyAttributes { .. }
                | HsmError::KeyRefused { .. }
                | HsmError::KeyReplaced(_)
        )
    }

    /// The stable code of a command stopped by it: `hsm_login_refused`
    /// (exit 77) when the token refused the PIN, now or earlier in this
    /// process (which holds every later login back);
    /// `key_pair_mismatch` for a key whose halves disagree;
    /// `key_label_taken` for a label a key of ours already has (a
    /// generation under it, or a look-up that finds two: an operator's
    /// matter, not an outage to retry); `key_attributes_unsafe` for a
    /// private key that could leave the token or lacks its usage;
    /// `key_refused` for one the token refuses to use;
    /// `key_not_destroyable` for one it refuses to destroy; else
    /// `hsm_unavailable`.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            HsmError::Login { .. } | HsmError::LoginHeld { .. } => "hsm_login_refused",
            HsmError::KeyPairMismatch(_) => "key_pair_mismatch",
            HsmError::DuplicateKey(_) => "key_label_taken",
            HsmError::KeyAttributes { .. } => "key_attributes_unsafe",
            HsmError::KeyRefused { .. } => "key_refused",
            HsmError::KeyNotDestroyable(_) => "key_not_destroyable",
            _ => "hsm_unavailable",
        }
    }

    /// True when the HSM did not answer in time or had no session free:
    /// calls still running hold it, which a module reset cannot hurry.
    #[must_use]
    pub fn is_busy(&self) -> bool {
        matches!(self, HsmError::Busy(_) | HsmError::Timeout { .. })
    }

    /// True when the session or token was lost and a reconnect may help.
    pub fn is_session_lost(&self) -> bool {
        matches!(
            self,
            HsmError::Pkcs11 {
                session_lost: true,
                ..
            }
        )
    }

    /// True when the session may hold something that must not outlive the
    /// operation, or is left in a state that fails every later call (an
    /// operation still active, e.g. a find whose `C_FindObjectsFinal`
    /// failed: cryptoki only logs that), so it must be closed rather than
    /// reused.
    pub fn taints_session(&self) -> bool {
        matches!(self, HsmError::DerivedSecretNotDestroyed(_))
            || matches!(
                self.ckr(),
                Some("CKR_OPERATION_ACTIVE" | "CKR_OPERATION_NOT_INITIALIZED")
            )
    }

    /// The `CKR_*` code, if this error carries one.
    pub fn ckr(&self) -> Option<&str> {
        match self {
            HsmError::Pkcs11 { ckr, .. } | HsmError::Login { ckr } => Some(ckr),
            _ => None,
        }
    }
}

/// The `CKR_*` code when `e` is the token refusing this key for the call
/// (`CKR_KEY_FUNCTION_NOT_PERMITTED`: its attributes or the token's policy
/// forbid the operation; `CKR_KEY_TYPE_INCONSISTENT`: a key of another type
/// than the mechanism takes): what the key's own check at look-up could not
/// judge (a vendor-defined key type, a policy outside the attributes).
/// Another key on the same token may still work, so the token is not failing.
pub(crate) fn key_refused(e: &CkError) -> Option<String> {
    match e {
        CkError::Pkcs11(
            rv @ (RvError::KeyFunctionNotPermitted | RvError::KeyTypeInconsistent),
            _,
        ) => Some(ckr_name(*rv)),
        _ => None,
    }
}

fn session_lost(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::TokenNotPresent
            | RvError::UserNotLoggedIn
            | RvError::CryptokiNotInitialized
    )
}

/// `C_Login` for `Function::Login`: cryptoki's `Debug` names without the prefix.
pub(crate) fn function_name(f: Function) -> String {
    format!("C_{f:?}")
}

/// `CKR_SESSION_HANDLE_INVALID` for `RvError::SessionHandleInvalid`: the
/// standard name, derived from cryptoki's variant name so that every code
/// (including ones added later) keeps a recognisable spelling.
pub(crate) fn ckr_name(rv: RvError) -> String {
    let debug = format!("{rv:?}");
    if let Some(rest) = debug.strip_prefix("VendorDefined(") {
        return format!("CKR_VENDOR_DEFINED({}", rest);
    }
    if let Some(rest) = debug.strip_prefix("UnknownErrorCode(") {
        return format!("CKR_UNKNOWN({}", rest);
    }
    let mut name = String::from("CKR");
    for c in debug.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

impl From<CkError> for HsmError {
    fn from(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(rv, Function::Login)
                if matches!(
                    rv,
                    RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired
                ) =>
            {
                HsmError::Login { ckr: ckr_name(rv) }
            }
            CkError::Pkcs11(rv, function) => HsmError::Pkcs11 {
                function: function_name(function),
                ckr: ckr_name(rv),
                session_lost: session_lost(rv),
            },
            other => HsmError::Wrapper(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ckr_names_follow_the_standard() {
        assert_eq!(
            ckr_name(RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(ckr_name(RvError::GeneralError), "CKR_GENERAL_ERROR");
        assert_eq!(ckr_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(function_name(Function::DeriveKey), "C_DeriveKey");
    }

    #[test]
    fn lost_sessions_are_recognised() {
        let e = HsmError::from(CkError::Pkcs11(
            RvError::SessionHandleInvalid,
            Function::Sign,
        ));
        assert!(e.is_session_lost());
        assert_eq!(e.to_string(), "C_Sign: CKR_SESSION_HANDLE_INVALID");
        let e = HsmError::from(CkError::Pkcs11(RvError::PinIncorrect, Function::Login));
        assert!(matches!(e, HsmError::Login { ref ckr } if ckr == "CKR_PIN_INCORRECT"));
        assert!(!e.is_session_lost());
    }

    /// A session left with an operation active fails every later call: it
    /// is closed, not put back in the pool.
    #[test]
    fn a_session_with_an_operation_left_active_is_not_reused() {
        for rv in [RvError::OperationActive, RvError::OperationNotInitialized] {
            let e = HsmError::from(CkError::Pkcs11(rv, Function::FindObjectsInit));
            assert!(e.taints_session(), "{e}");
        }
        let e = HsmError::from(CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            Function::DeriveKey,
        ));
        assert!(!e.taints_session(), "{e}");
    }
}
