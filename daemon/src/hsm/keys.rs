//! Key objects on the token: P-256 escrow keys (derive only) and the Ed25519
//! audit signing key (sign only), and the two operations that use them.

use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::{Zeroize as _, Zeroizing};

use super::{Hsm, HsmError, PendingCall, SharedSecret};
use crate::jwk::{Ed25519PublicKey, P256PublicKey};

/// Token objects of escrow keys are labelled `lav-escrow:<kid>`.
pub const ESCROW_LABEL_PREFIX: &str = "lav-escrow:";

/// DER of the named-curve OID prime256v1 (1.2.840.10045.3.1.7), the
/// `CKA_EC_PARAMS` of a P-256 key (PKCS#11 v2.40 §2.3.3).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the OID id-Ed25519 (1.3.101.112, RFC 8410), the `CKA_EC_PARAMS` of an
/// Ed25519 key (PKCS#11 v3.0 §2.3.5).
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// The audit key's public half and its label on the token.
#[derive(Debug, Clone)]
pub struct AuditKeyInfo {
    /// `CKA_LABEL` of the key pair.
    pub label: String,
    /// The Ed25519 public key.
    pub public: Ed25519PublicKey,
}

fn escrow_label(kid: &str) -> String {
    format!("{ESCROW_LABEL_PREFIX}{kid}")
}

/// `CKA_EC_POINT` is a DER OCTET STRING around the point (PKCS#11 §2.3.3), but
/// some tokens return the bare point: accept both, nothing else.
fn unwrap_ec_point(value: &[u8], point_len: usize) -> Option<&[u8]> {
    if value.len() == point_len {
        return Some(value);
    }
    if value.len() == point_len + 2 && value[0] == 0x04 && usize::from(value[1]) == point_len {
        return Some(&value[2..]);
    }
    None
}

fn find_one(
    session: &Session,
    class: ObjectClass,
    label: &str,
) -> Result<Option<ObjectHandle>, HsmError> {
    let found = session.find_objects(&[
        Attribute::Class(class),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    match found.len() {
        0 => Ok(None),
        1 => Ok(Some(found[0])),
        // Two objects with one label means someone else wrote to the token;
        // using either could serve the wrong key.
        _ => Err(HsmError::DuplicateKey(label.to_string())),
    }
}

fn read_ec_point(
    session: &Session,
    handle: ObjectHandle,
    label: &str,
    point_len: usize,
) -> Result<Vec<u8>, HsmError> {
    let attrs = session.get_attributes(handle, &[AttributeType::EcPoint])?;
    for attr in attrs {
        if let Attribute::EcPoint(value) = attr {
            return unwrap_ec_point(&value, point_len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| HsmError::InvalidPublicKey(label.to_string()));
        }
    }
    Err(HsmError::InvalidPublicKey(label.to_string()))
}

/// Reads the 32-byte value of the session object `derived` and destroys the
/// object, whatever the read gave: the secret must not outlive the call on
/// the token.
///
/// # Security
/// The copy cryptoki returns is wiped here, but cryptoki 0.12's
/// `get_attributes` first reads the value into a buffer of its own that it
/// frees without wiping, and it has no call that fills a caller's buffer: so
/// 32 bytes of each envelope's ECDH secret stay in freed heap until the
/// allocator reuses them (`docs/THREAT_MODEL.md` §5.5).
///
/// If the object cannot be destroyed (for a reason other than a lost session,
/// which takes the object with it), the error is
/// [`HsmError::DerivedSecretNotDestroyed`], and the pool closes the session
/// instead of reusing it: closing a session destroys its objects.
///
/// # Errors
/// The failing read, [`HsmError::DerivedSecretLength`], or the destroy error.
fn take_secret(session: &Session, derived: ObjectHandle) -> Result<SharedSecret, HsmError> {
    let read = read_secret(session, derived);
    if let Err(e) = session.destroy_object(derived) {
        let e = HsmError::from(e);
        if e.is_session_lost() {
            return Err(e);
        }
        return Err(HsmError::DerivedSecretNotDestroyed(e.to_string()));
    }
    read
}

fn read_secret(session: &Session, derived: ObjectHandle) -> Result<SharedSecret, HsmError> {
    let mut secret = Zeroizing::new([0u8; 32]);
    let mut found = 0usize;
    for attr in session.get_attributes(derived, &[AttributeType::Value])? {
        if let Attribute::Value(mut value) = attr {
            found = value.len();
            if value.len() == 32 {
                secret.copy_from_slice(&value);
            }
            value.zeroize();
        }
    }
    if found != 32 {
        return Err(HsmError::DerivedSecretLength(found));
    }
    Ok(secret)
}

impl Hsm {
    /// Generates a P-256 escrow key pair in the token under `kid`.
    ///
    /// # Security
    /// The private key is `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, not
    /// `CKA_EXTRACTABLE`, not `CKA_MODIFIABLE`, and `CKA_DERIVE` only: it can
    /// never sign, decrypt or unwrap, and the token will never export it.
    ///
    /// # Errors
    /// [`HsmError::DuplicateKey`] if the token already has a key with this kid.
    pub fn generate_escrow_key(&self, kid: &str) -> Result<P256PublicKey, HsmError> {
        let label = escrow_label(kid);
        self.with_session_once("generate_escrow_key", |session| {
            if find_one(session, ObjectClass::PRIVATE_KEY, &label)?.is_some()
                || find_one(session, ObjectClass::PUBLIC_KEY, &label)?.is_some()
            {
                return Err(HsmError::DuplicateKey(label.clone()));
            }
            let id = kid.as_bytes().to_vec();
            let public_template = [
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Modifiable(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(false),
                Attribute::Encrypt(false),
                Attribute::Wrap(false),
                Attribute::Derive(false),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.clone()),
            ];
            let private_template = [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Modifiable(false),
                // PKCS#11 defaults CKA_COPYABLE to true: a copy made with
                // the PIN would survive the key's destruction at retention.
                Attribute::Copyable(false),
                Attribute::Derive(true),
                Attribute::Sign(false),
                Attribute::Decrypt(false),
                Attribute::Unwrap(false),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id),
            ];
            let (public, private) = session.generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &public_template,
                &private_template,
            )?;
            read_ec_point(session, public, &label, 65)
                .and_then(|point| {
                    P256PublicKey::from_sec1(&point)
                        .map_err(|_| HsmError::InvalidPublicKey(label.clone()))
                })
                .inspect_err(|_| discard_pair(session, public, private))
        })
    }

    /// The public key of escrow key `kid`, read from the token.
    ///
    /// # Errors
    /// [`HsmError::KeyNotFound`] if the token has no such key.
    pub fn escrow_public_key(&self, kid: &str) -> Result<P256PublicKey, HsmError> {
        let label = escrow_label(kid);
        self.with_session("escrow_public_key", |session| {
            let handle = find_one(session, ObjectClass::PUBLIC_KEY, &label)?.ok_or_else(|| {
                HsmError::KeyNotFound {
                    kind: "escrow",
                    label: label.clone(),
                }
            })?;
            let point = read_ec_point(session, handle, &label, 65)?;
            P256PublicKey::from_sec1(&point).map_err(|_| HsmError::InvalidPublicKey(label.clone()))
        })
    }

    /// True if the token holds the private half of escrow key `kid`. Opens a
    /// new session for the check, so that it reflects the token, not a cache.
    ///
    /// # Errors
    /// The failing PKCS#11 call.
    pub fn escrow_key_present(&self, kid: &str) -> Result<bool, HsmError> {
        let label = escrow_label(kid);
        let _shared = self.shared();
        let session = self.new_session(self.inner.pool_slot())?;
        Ok(find_one(&session, ObjectClass::PRIVATE_KEY, &label)?.is_some())
    }

    /// Computes the P-256 ECDH shared secret (the x coordinate, 32 bytes) of
    /// escrow key `kid` and `peer`, inside the token.
    ///
    /// The caller must have validated `peer` in software ([`P256PublicKey`]
    /// guarantees it): tokens answer an off-curve point with
    /// `CKR_GENERAL_ERROR` at best.
    ///
    /// # Security
    /// The output lands in a session-only `CKK_GENERIC_SECRET` object that is
    /// read once and destroyed before this returns, also on error.
    ///
    /// # Errors
    /// [`HsmError::KeyNotFound`] if the key is absent (destroyed), or the
    /// failing PKCS#11 call.
    pub fn ecdh(&self, kid: &str, peer: &P256PublicKey) -> Result<SharedSecret, HsmError> {
        let label = escrow_label(kid);
        let value_len = self.inner.settings.quirks.derive_sets_value_len;
        self.with_session("ecdh_derive", |session| {
            let key = self.cached_handle(session, ObjectClass::PRIVATE_KEY, &label, "escrow")?;
            let mechanism =
                || Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), peer.sec1()));
            let mut template = vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ];
            if value_len {
                template.push(Attribute::ValueLen(32u64.into()));
            }
            let derived = match session.derive_key(&mechanism(), key, &template) {
                Ok(derived) => derived,
                Err(e) => {
                    self.forget_handle(&label);
                    if !stale_handle(&e) {
                        return Err(e.into());
                    }
                    // A handle kept from an earlier call names nothing once
                    // the key was destroyed (by `lavd keys destroy`, another
                    // process): look it up again, so that a destroyed key is
                    // `KeyNotFound` (the envelope's `key_destroyed`), not a
                    // failing HSM that fails the whole batch.
                    let key =
                        self.cached_handle(session, ObjectClass::PRIVATE_KEY, &label, "escrow")?;
                    session
                        .derive_key(&mechanism(), key, &template)
                        .inspect_err(|_| self.forget_handle(&label))?
                }
            };
            take_secret(session, derived)
        })
    }

    /// Destroys both halves of escrow key `kid` on the token. Returns whether a
    /// private key was there. Idempotent: destroying an absent key is not an
    /// error, so an interrupted destruction can be completed.
    ///
    /// # Errors
    /// The failing PKCS#11 call.
    pub fn destroy_escrow_key(&self, kid: &str) -> Result<bool, HsmError> {
        let label = escrow_label(kid);
        self.forget_handle(&label);
        self.with_session("destroy_escrow_key", |session| {
            let private = find_one(session, ObjectClass::PRIVATE_KEY, &label)?;
            if let Some(handle) = private {
                session.destroy_object(handle)?;
            }
            if let Some(handle) = find_one(session, ObjectClass::PUBLIC_KEY, &label)? {
                session.destroy_object(handle)?;
            }
            Ok(private.is_some())
        })
    }

    /// Generates the Ed25519 audit signing key pair under `label`.
    ///
    /// # Security
    /// Sign only (no derive, decrypt or unwrap), sensitive, non-extractable,
    /// not modifiable.
    ///
    /// # Errors
    /// [`HsmError::DuplicateKey`] if the label is taken.
    pub fn generate_audit_key(&self, label: &str) -> Result<AuditKeyInfo, HsmError> {
        self.with_session_once("generate_audit_key", |session| {
            if find_one(session, ObjectClass::PRIVATE_KEY, label)?.is_some()
                || find_one(session, ObjectClass::PUBLIC_KEY, label)?.is_some()
            {
                return Err(HsmError::DuplicateKey(label.to_string()));
            }
            let public_template = [
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Modifiable(false),
                Attribute::EcParams(ED25519_PARAMS.to_vec()),
                Attribute::Verify(true),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            let private_template = [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Modifiable(false),
                // No second copy of the log's signing key on the token.
                Attribute::Copyable(false),
                Attribute::Sign(true),
                Attribute::Derive(false),
                Attribute::Decrypt(false),
                Attribute::Unwrap(false),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            let (public, private) = session.generate_key_pair(
                &Mechanism::EccEdwardsKeyPairGen,
                &public_template,
                &private_template,
            )?;
            read_ec_point(session, public, label, 32)
                .and_then(|point| {
                    Ed25519PublicKey::from_bytes(&point)
                        .map_err(|_| HsmError::InvalidPublicKey(label.to_string()))
                })
                .map(|public| AuditKeyInfo {
                    label: label.to_string(),
                    public,
                })
                .inspect_err(|_| discard_pair(session, public, private))
        })
    }

    /// The audit key's public half.
    ///
    /// # Errors
    /// [`HsmError::KeyNotFound`] if there is no audit key under `label`.
    pub fn audit_key(&self, label: &str) -> Result<AuditKeyInfo, HsmError> {
        self.with_session("audit_public_key", |session| {
            let handle = find_one(session, ObjectClass::PUBLIC_KEY, label)?.ok_or_else(|| {
                HsmError::KeyNotFound {
                    kind: "audit",
                    label: label.to_string(),
                }
            })?;
            let point = read_ec_point(session, handle, label, 32)?;
            Ok(AuditKeyInfo {
                label: label.to_string(),
                public: Ed25519PublicKey::from_bytes(&point)
                    .map_err(|_| HsmError::InvalidPublicKey(label.to_string()))?,
            })
        })
    }

    /// Signs `message` with the Ed25519 audit key (pure EdDSA, `CKM_EDDSA`),
    /// on an HSM worker, waiting at most the call deadline. Blocking; never
    /// call it from an HSM worker.
    ///
    /// # Errors
    /// [`HsmError::KeyNotFound`], [`HsmError::Timeout`], or the failing
    /// PKCS#11 call.
    pub fn sign_ed25519(&self, label: &str, message: &[u8]) -> Result<[u8; 64], HsmError> {
        self.start_sign_ed25519(label, message.to_vec()).wait()
    }

    /// [`Hsm::sign_ed25519`] handed to an HSM worker without waiting:
    /// [`PendingCall::wait`] returns the signature.
    pub(crate) fn start_sign_ed25519(
        &self,
        label: &str,
        message: Vec<u8>,
    ) -> PendingCall<(String, Vec<u8>), [u8; 64]> {
        self.start_call(
            "sign_ed25519",
            (label.to_string(), message),
            |hsm, (label, message)| hsm.sign_ed25519_here(&label, &message),
        )
    }

    /// [`Hsm::sign_ed25519`] on the calling thread, without a deadline.
    fn sign_ed25519_here(&self, label: &str, message: &[u8]) -> Result<[u8; 64], HsmError> {
        self.with_session("sign_ed25519", |session| {
            let key = self.cached_handle(session, ObjectClass::PRIVATE_KEY, label, "audit")?;
            let mechanism = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
            let signature = session
                .sign(&mechanism, key, message)
                .inspect_err(|_| self.forget_handle(label))?;
            signature.as_slice().try_into().map_err(|_| {
                HsmError::Wrapper(format!("{}-byte Ed25519 signature", signature.len()))
            })
        })
    }

    fn cached_handle(
        &self,
        session: &Session,
        class: ObjectClass,
        label: &str,
        kind: &'static str,
    ) -> Result<ObjectHandle, HsmError> {
        let mut handles = self
            .inner
            .handles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(h) = handles.get(label) {
            return Ok(*h);
        }
        let handle = find_one(session, class, label)?.ok_or_else(|| HsmError::KeyNotFound {
            kind,
            label: label.to_string(),
        })?;
        handles.insert(label.to_string(), handle);
        Ok(handle)
    }

    /// Forgets the cached handle of `label`.
    fn forget_handle(&self, label: &str) {
        self.inner
            .handles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(label);
    }
}

/// Deletes a key pair just generated whose public half could not be read:
/// left on the token, it would hold its label (the kid could never be
/// generated again) and, unknown to the store, never be destroyed. Best
/// effort: if the token fails here too, the error that led here is the one
/// reported, and `lavd keys generate` names the label in it.
fn discard_pair(session: &Session, public: ObjectHandle, private: ObjectHandle) {
    for handle in [private, public] {
        if let Err(e) = session.destroy_object(handle) {
            tracing::error!(error = %e, "could not delete a key pair whose generation failed");
        }
    }
}

/// Whether `e` says the object handle passed names no object (any more).
fn stale_handle(e: &cryptoki::error::Error) -> bool {
    use cryptoki::error::{Error, RvError};
    matches!(
        e,
        Error::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_points_are_accepted_bare_or_der_wrapped_only() {
        let point = [4u8; 65];
        assert_eq!(unwrap_ec_point(&point, 65), Some(&point[..]));
        let mut wrapped = vec![0x04, 65];
        wrapped.extend_from_slice(&point);
        assert_eq!(unwrap_ec_point(&wrapped, 65), Some(&point[..]));
        wrapped[1] = 64;
        assert_eq!(unwrap_ec_point(&wrapped, 65), None);
        assert_eq!(unwrap_ec_point(&point[..64], 65), None);
    }

    /// Busy sessions as the pool last reported them.
    #[derive(Debug, Default)]
    struct LastBusy(std::sync::atomic::AtomicUsize);
    impl crate::hsm::HsmObserver for LastBusy {
        fn operation(&self, _: &'static str, _: f64, _: bool) {}
        fn sessions_busy(&self, busy: usize) {
            self.0.store(busy, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A real SoftHSM token (the only test in this crate that loads the
    /// module: it is process-wide and reads `SOFTHSM2_CONF` once). SoftHSM
    /// refuses `C_DestroyObject` on an object with `CKA_DESTROYABLE` false
    /// (`CKR_ACTION_PROHIBITED`), which stands in for a token that fails to
    /// destroy the derived secret.
    #[test]
    fn a_session_holding_a_secret_it_could_not_destroy_is_closed_not_reused() {
        use crate::hsm::{HsmSettings, Quirks, TokenSelector};
        use cryptoki::types::AuthPin;
        use std::sync::atomic::Ordering;
        use std::sync::{Arc, Mutex};

        let module = [
            "/usr/lib/softhsm/libsofthsm2.so",
            "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
            "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        ]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
        .expect("SoftHSM 2 is installed (.ci/setup)");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        let env = vec![("SOFTHSM2_CONF".to_string(), conf.display().to_string())];
        crate::hsm::init_dev_token(
            &module,
            &env,
            "pool-discard",
            &AuthPin::new("so-pin-1234".into()),
            &AuthPin::new("user-pin-1234".into()),
        )
        .unwrap();
        let busy = Arc::new(LastBusy::default());
        let hsm = Hsm::open_with_observer(
            HsmSettings {
                module,
                token: TokenSelector::Label("pool-discard".into()),
                pin: AuthPin::new("user-pin-1234".into()),
                sessions: 2,
                quirks: Quirks::default(),
                module_env: env,
                call_timeout: std::time::Duration::from_secs(30),
            },
            busy.clone(),
        )
        .unwrap();
        let secret = |destroyable: bool| {
            vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Destroyable(destroyable),
                Attribute::Value(vec![7; 32]),
            ]
        };

        // The normal path: read, destroyed, the session goes back to the pool.
        let got = hsm
            .with_session("test", |s| {
                let object = s.create_object(&secret(true))?;
                take_secret(s, object)
            })
            .unwrap();
        assert_eq!(*got, [7; 32]);
        assert_eq!(hsm.open_sessions(), 1);
        assert_eq!(busy.0.load(Ordering::SeqCst), 0);

        // The destroy fails: the session is closed, not returned.
        let left = Mutex::new(None);
        let e = hsm
            .with_session("test", |s| {
                let object = s.create_object(&secret(false))?;
                *left.lock().unwrap() = Some(object);
                take_secret(s, object)
            })
            .unwrap_err();
        match &e {
            HsmError::DerivedSecretNotDestroyed(why) => {
                assert_eq!(why, "C_DestroyObject: CKR_ACTION_PROHIBITED")
            }
            other => panic!("expected DerivedSecretNotDestroyed, got {other:?}"),
        }
        assert_eq!(hsm.open_sessions(), 0);
        assert_eq!(busy.0.load(Ordering::SeqCst), 0);

        // And the secret went with it: from a new session, its handle names
        // nothing.
        let gone = |left: &Mutex<Option<ObjectHandle>>| {
            let object = left.lock().unwrap().take().unwrap();
            let e = hsm
                .with_session("test", |s| {
                    Ok(s.get_attributes(object, &[AttributeType::Value])?)
                })
                .unwrap_err();
            assert_eq!(e.ckr(), Some("CKR_OBJECT_HANDLE_INVALID"), "{e}");
        };
        gone(&left);
        assert_eq!(hsm.open_sessions(), 1);

        // A job that panics while it holds a secret (the spreader catches
        // the panic): its session is closed too, and the secret with it.
        let left = Mutex::new(None);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            hsm.with_session("test", |s| -> Result<(), HsmError> {
                *left.lock().unwrap() = Some(s.create_object(&secret(true))?);
                panic!("a job panicked holding a secret");
            })
        }));
        assert!(panicked.is_err());
        assert_eq!(hsm.open_sessions(), 0);
        assert_eq!(busy.0.load(Ordering::SeqCst), 0);
        gone(&left);
    }
}
