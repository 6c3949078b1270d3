//! Signing warrants, for the authority tools (`lavd warrant sign`), never for
//! the daemon: the daemon holds no authority key.
//!
//! A signature is added to the General JSON Serialization, so authorities can
//! sign in turn without trusting each other's tools: each signer leaves the
//! payload and the existing signatures byte-for-byte as they were.

use aws_lc_rs::encoding::AsBigEndian as _;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use zeroize::Zeroizing;

use super::claims::Claims;
use super::jws::{self, Algorithm, ParsedJws, MAX_KID_CHARS};
use super::verify::WarrantLimits;
use super::WarrantError;
use crate::codec::{b64_decode, b64_encode};
use crate::jwk::{Ed25519PublicKey, Jwk, JwkError, P256PublicKey};

/// Why a signature could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The private JWK is unusable: wrong shape, bad member, or `d` does not
    /// match the public part.
    #[error("authority key: {0}")]
    Key(#[from] JwkError),
    /// The private JWK has no `kid`; the signature must name its authority.
    #[error("authority key has no `kid`")]
    MissingKid,
    /// The JWK's `kid` is outside an authority kid's bounds
    /// ([`crate::bounds::authority_kid`]): empty, longer than 128
    /// characters, a control, whitespace, invisible character, or not in
    /// NFC. Says which.
    #[error("authority key `kid` {0} (1 to {MAX_KID_CHARS} characters, no control character, whitespace or invisible character, in Unicode NFC)")]
    BadKid(crate::bounds::BoundError),
    /// The JWK's `alg` does not fit its key type (EC P-256 is `ES256`, OKP
    /// Ed25519 is `EdDSA`).
    #[error("authority key has `alg` `{found}` but its key type needs `{expected}`")]
    AlgorithmMismatch {
        /// The JWK's `alg`.
        found: String,
        /// What the key type needs.
        expected: Algorithm,
    },
    /// The JWK is neither EC P-256 nor OKP Ed25519.
    #[error("authority key must be EC P-256 (ES256) or OKP Ed25519 (EdDSA)")]
    UnsupportedKeyType,
    /// The input is not a well-formed warrant (bad JWS or bad claims).
    #[error("not a signable warrant: {0}")]
    Warrant(#[from] WarrantError),
    /// This authority already signed this warrant; a second signature would
    /// count once anyway.
    #[error("authority `{0}` has already signed this warrant")]
    AlreadySigned(String),
    /// The crypto library refused to sign (RNG failure).
    #[error("signing failed")]
    Crypto,
}

impl SignError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Key(_) | Self::MissingKid | Self::BadKid(_) | Self::UnsupportedKeyType => {
                "invalid_authority_key"
            }
            Self::AlgorithmMismatch { .. } => "algorithm_mismatch",
            Self::Warrant(e) => e.code(),
            Self::AlreadySigned(_) => "already_signed",
            Self::Crypto => "signing_failed",
        }
    }
}

enum KeyPair {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

/// An authority's private signing key with its `kid`. `Debug` shows only the
/// `kid` and algorithm.
pub struct AuthorityKey {
    kid: String,
    pair: KeyPair,
}

impl std::fmt::Debug for AuthorityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg())
            .finish_non_exhaustive()
    }
}

fn check_kid(kid: &str) -> Result<(), SignError> {
    crate::bounds::authority_kid(kid).map_err(SignError::BadKid)
}

impl AuthorityKey {
    /// Reads a private JWK: EC P-256 (`ES256`) or OKP Ed25519 (`EdDSA`). It
    /// must carry `kid`; `alg`, if present, must match the key type; `d` must
    /// match the public part.
    ///
    /// # Errors
    /// Any [`SignError`] naming what is wrong.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, SignError> {
        let kid = jwk.kid.clone().ok_or(SignError::MissingKid)?;
        check_kid(&kid)?;
        let alg = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            ("EC", Some("P-256")) => Algorithm::Es256,
            ("OKP", Some("Ed25519")) => Algorithm::EdDsa,
            _ => return Err(SignError::UnsupportedKeyType),
        };
        if let Some(found) = &jwk.alg {
            if found != alg.name() {
                return Err(SignError::AlgorithmMismatch {
                    found: found.clone(),
                    expected: alg,
                });
            }
        }
        let d = Zeroizing::new(
            b64_decode(jwk.d.as_deref().ok_or(JwkError::Missing("d"))?)
                .map_err(|_| JwkError::BadMember("d"))?,
        );
        let pair = match alg {
            Algorithm::Es256 => {
                let public = P256PublicKey::from_jwk(jwk)?;
                KeyPair::Es256(
                    EcdsaKeyPair::from_private_key_and_public_key(
                        &ECDSA_P256_SHA256_FIXED_SIGNING,
                        &d,
                        public.sec1(),
                    )
                    .map_err(|_| JwkError::InvalidKey)?,
                )
            }
            Algorithm::EdDsa => {
                let public = Ed25519PublicKey::from_jwk(jwk)?;
                if d.len() != 32 {
                    return Err(JwkError::BadMember("d").into());
                }
                KeyPair::EdDsa(
                    Ed25519KeyPair::from_seed_and_public_key(&d, public.bytes())
                        .map_err(|_| JwkError::InvalidKey)?,
                )
            }
        };
        Ok(Self { kid, pair })
    }

    /// A fresh key from the system RNG.
    ///
    /// # Errors
    /// [`SignError::BadKid`], or [`SignError::Crypto`] if the RNG fails.
    pub fn generate(alg: Algorithm, kid: &str) -> Result<Self, SignError> {
        check_kid(kid)?;
        let pair = match alg {
            Algorithm::Es256 => KeyPair::Es256(
                EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
                    .map_err(|_| SignError::Crypto)?,
            ),
            Algorithm::EdDsa => {
                KeyPair::EdDsa(Ed25519KeyPair::generate().map_err(|_| SignError::Crypto)?)
            }
        };
        Ok(Self {
            kid: kid.to_string(),
            pair,
        })
    }

    /// The authority's `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm the key signs with.
    pub fn alg(&self) -> Algorithm {
        match self.pair {
            KeyPair::Es256(_) => Algorithm::Es256,
            KeyPair::EdDsa(_) => Algorithm::EdDsa,
        }
    }

    /// The public JWK with `kid`, `alg` and `use` = `sig`, for the trust config.
    ///
    /// # Errors
    /// [`SignError::Key`] only if the library returns a malformed public key.
    pub fn public_jwk(&self) -> Result<Jwk, SignError> {
        let mut jwk = match &self.pair {
            KeyPair::Es256(p) => P256PublicKey::from_sec1(p.public_key().as_ref())?.to_jwk(),
            KeyPair::EdDsa(p) => Ed25519PublicKey::from_bytes(p.public_key().as_ref())?.to_jwk(),
        };
        jwk.kid = Some(self.kid.clone());
        jwk.alg = Some(self.alg().name().to_string());
        jwk.use_ = Some("sig".to_string());
        Ok(jwk)
    }

    /// The private JWK (public JWK plus `d`) for the authority's key file.
    ///
    /// # Errors
    /// [`SignError::Crypto`] if the library cannot export the private part.
    ///
    /// # Security
    /// The result holds the private key; `d` is zeroized when dropped.
    pub fn private_jwk(&self) -> Result<Jwk, SignError> {
        let d = match &self.pair {
            KeyPair::Es256(p) => {
                let bin = p
                    .private_key()
                    .as_be_bytes()
                    .map_err(|_| SignError::Crypto)?;
                Zeroizing::new(b64_encode(bin.as_ref()))
            }
            KeyPair::EdDsa(p) => {
                let seed = p.seed().map_err(|_| SignError::Crypto)?;
                let bin = seed.as_be_bytes().map_err(|_| SignError::Crypto)?;
                Zeroizing::new(b64_encode(bin.as_ref()))
            }
        };
        Ok(Jwk {
            d: Some(d),
            ..self.public_jwk()?
        })
    }

    /// Signs `message`: ES256 gives the 64-byte `r ‖ s` (RFC 7518 §3.4),
    /// EdDSA the 64-byte Ed25519 signature (RFC 8037 §3.1).
    ///
    /// # Errors
    /// [`SignError::Crypto`] if the RNG fails.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        match &self.pair {
            KeyPair::Es256(p) => p
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| SignError::Crypto),
            KeyPair::EdDsa(p) => Ok(p.sign(message).as_ref().to_vec()),
        }
    }
}

/// The protected header this signer writes: exactly `alg` and `kid`.
fn protected_header(alg: Algorithm, kid: &str) -> String {
    serde_json::json!({ "alg": alg.name(), "kid": kid }).to_string()
}

/// Adds `key`'s signature to a warrant and returns the new JWS JSON. The
/// warrant must parse strictly and carry valid claims (an authority never
/// signs what the daemon would refuse as malformed); existing signatures are
/// kept as they are and are not checked (the signer has no trust config).
///
/// # Errors
/// [`SignError::Warrant`] for a malformed warrant,
/// [`SignError::AlreadySigned`] if this `kid` signed already,
/// [`SignError::Crypto`] if signing fails.
pub fn add_signature(
    jws_bytes: &[u8],
    key: &AuthorityKey,
    limits: &WarrantLimits,
) -> Result<String, SignError> {
    let mut jws = jws::parse(jws_bytes, limits)?;
    Claims::parse(jws.payload())?;
    if jws.signatures().iter().any(|s| s.kid() == key.kid()) {
        return Err(SignError::AlreadySigned(key.kid().to_string()));
    }
    let protected_b64 = b64_encode(protected_header(key.alg(), key.kid()));
    let signature = key.sign(&jws::signing_input(&protected_b64, jws.payload_b64()))?;
    jws.push_signature(protected_b64, key.alg(), key.kid().to_string(), signature);
    let out = jws.to_json();
    if out.len() > limits.max_warrant_bytes {
        return Err(WarrantError::TooLarge {
            what: "bytes",
            found: out.len(),
            limit: limits.max_warrant_bytes,
        }
        .into());
    }
    Ok(out)
}

/// An unsigned warrant for `payload` after checking the claims:
/// `{"payload":"…","signatures":[]}`.
///
/// # Errors
/// [`WarrantError::Malformed`] if the claims do not parse.
pub fn unsigned_warrant(payload: &[u8]) -> Result<String, WarrantError> {
    Claims::parse(payload)?;
    Ok(ParsedJws::unsigned(payload).to_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_jwk_round_trips_and_must_carry_kid() {
        for alg in [Algorithm::Es256, Algorithm::EdDsa] {
            let key = AuthorityKey::generate(alg, "exec-1").unwrap();
            let jwk = key.private_jwk().unwrap();
            let back = AuthorityKey::from_jwk(&jwk).unwrap();
            assert_eq!((back.kid(), back.alg()), ("exec-1", alg));
            assert_eq!(back.public_jwk().unwrap(), key.public_jwk().unwrap());

            let mut no_kid = jwk.clone();
            no_kid.kid = None;
            assert_eq!(
                AuthorityKey::from_jwk(&no_kid).unwrap_err().code(),
                "invalid_authority_key"
            );
            let mut wrong_alg = jwk.clone();
            wrong_alg.alg = Some(
                if alg == Algorithm::Es256 {
                    "EdDSA"
                } else {
                    "ES256"
                }
                .into(),
            );
            assert_eq!(
                AuthorityKey::from_jwk(&wrong_alg).unwrap_err().code(),
                "algorithm_mismatch"
            );
            let mut public_only = jwk.clone();
            public_only.d = None;
            assert!(matches!(
                AuthorityKey::from_jwk(&public_only),
                Err(SignError::Key(JwkError::Missing("d")))
            ));
        }
    }

    #[test]
    fn ed25519_seed_must_match_public_key() {
        let a = AuthorityKey::generate(Algorithm::EdDsa, "a")
            .unwrap()
            .private_jwk()
            .unwrap();
        let b = AuthorityKey::generate(Algorithm::EdDsa, "a")
            .unwrap()
            .private_jwk()
            .unwrap();
        let mixed = Jwk {
            d: b.d.clone(),
            ..a
        };
        assert!(matches!(
            AuthorityKey::from_jwk(&mixed),
            Err(SignError::Key(JwkError::InvalidKey))
        ));
    }
}
