//! JSON Web Keys (RFC 7517) for the key types this protocol uses: P-256 public
//! and private keys (escrow keys, warrant recipients, ES256 authorities) and
//! Ed25519 public keys (EdDSA authorities, RFC 8037).
//!
//! Untrusted JWK JSON becomes a typed, validated key here and nowhere else: a
//! [`P256PublicKey`] is always a point on the curve, never the identity.

use aws_lc_rs::agreement::{ParsedPublicKey, UnparsedPublicKey, ECDH_P256};
use aws_lc_rs::digest;
use aws_lc_rs::encoding::AsBigEndian as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::codec::{b64_decode, b64_encode};

/// The HPKE suite of every escrow key: DHKEM(P-256, HKDF-SHA256), HKDF-SHA256,
/// AES-256-GCM (RFC 9180 identifiers 0x0010, 0x0001, 0x0002).
pub const LAV_SUITE: &str = "16-1-2";

/// P-256's base point G, SEC 1 uncompressed (SEC 2 v2, §2.4.2).
pub const P256_GENERATOR: [u8; 65] = [
    0x04, 0x6b, 0x17, 0xd1, 0xf2, 0xe1, 0x2c, 0x42, 0x47, 0xf8, 0xbc, 0xe6, 0xe5, 0x63, 0xa4, 0x40,
    0xf2, 0x77, 0x03, 0x7d, 0x81, 0x2d, 0xeb, 0x33, 0xa0, 0xf4, 0xa1, 0x39, 0x45, 0xd8, 0x98, 0xc2,
    0x96, 0x4f, 0xe3, 0x42, 0xe2, 0xfe, 0x1a, 0x7f, 0x9b, 0x8e, 0xe7, 0xeb, 0x4a, 0x7c, 0x0f, 0x9e,
    0x16, 0x2b, 0xce, 0x33, 0x57, 0x6b, 0x31, 0x5e, 0xce, 0xcb, 0xb6, 0x40, 0x68, 0x37, 0xbf, 0x51,
    0xf5,
];

/// A JWK that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwkError {
    /// The JSON is not a JWK of the expected shape (unknown or duplicate
    /// members, wrong types, trailing data).
    #[error("invalid JWK JSON: {0}")]
    Json(String),
    /// `kty`/`crv` name a key type this protocol does not use.
    #[error("unsupported key type: expected {expected}")]
    UnsupportedKeyType {
        /// What the caller asked for, e.g. `EC P-256`.
        expected: &'static str,
    },
    /// A member that the key type requires is absent.
    #[error("JWK member `{0}` is missing")]
    Missing(&'static str),
    /// A member is not base64url or has the wrong length for the curve.
    #[error("JWK member `{0}` is not a valid base64url value of the right length")]
    BadMember(&'static str),
    /// The coordinates are not a point on P-256 (or the private scalar is out
    /// of range, or does not match the public key). A buggy encoder, or an
    /// invalid-curve attack.
    #[error("the key is not a valid point/scalar on its curve")]
    InvalidKey,
}

/// The members of a JWK that this protocol reads or writes. Unknown members are
/// refused, as PROTOCOL's conventions require, and so is `null` for an
/// optional one (absent and `null` would be two spellings of one key).
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Jwk {
    /// Key type: `EC` or `OKP`.
    pub kty: String,
    /// Curve: `P-256` or `Ed25519`.
    #[serde(
        default,
        deserialize_with = "crate::codec::non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub crv: Option<String>,
    /// Public x coordinate (EC) or public key (OKP), base64url.
    #[serde(
        default,
        deserialize_with = "crate::codec::non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub x: Option<String>,
    /// Public y coordinate (EC), base64url.
    #[serde(
        default,
        deserialize_with = "crate::codec::non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub y: Option<String>,
    /// Private scalar or seed, base64url. Present only in private JWK files.
    #[serde(
        default,
        deserialize_with = "crate::codec::non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub d: Option<Zeroizing<String>>,
    /// Key identifier.
    #[serde(
        default,
        deserialize_with = "crate::codec::non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub kid: Option<String>,
    /// Public key use (`enc` for escrow keys, `sig` for authorities).
    #[serde(
        rename = "use",
        default,
        deserialize_with = "crate::codec::non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub use_: Option<String>,
    /// JWS algorithm (`ES256`, `EdDSA`) for authority keys.
    #[serde(
        default,
        deserialize_with = "crate::codec::non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub alg: Option<String>,
    /// Escrow keys: the HPKE suite, always [`LAV_SUITE`].
    #[serde(
        default,
        deserialize_with = "crate::codec::non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub lav_suite: Option<String>,
    /// Escrow keys: when providers may start sealing to it (RFC 3339).
    #[serde(
        default,
        deserialize_with = "crate::codec::non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_before: Option<String>,
    /// Escrow keys: when providers must stop sealing to it (RFC 3339).
    #[serde(
        default,
        deserialize_with = "crate::codec::non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_after: Option<String>,
}

impl std::fmt::Debug for Jwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `d` is a private key: never print it.
        f.debug_struct("Jwk")
            .field("kty", &self.kty)
            .field("crv", &self.crv)
            .field("kid", &self.kid)
            .field("d", &self.d.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Jwk {
    /// Parses one JWK strictly.
    ///
    /// # Errors
    /// [`JwkError::Json`] naming what serde found wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self, JwkError> {
        crate::codec::from_object_slice(bytes).map_err(|e| JwkError::Json(e.to_string()))
    }

    fn member(&self, name: &'static str, value: Option<&str>) -> Result<Vec<u8>, JwkError> {
        let text = value.ok_or(JwkError::Missing(name))?;
        b64_decode(text).map_err(|_| JwkError::BadMember(name))
    }

    fn expect_ec_p256(&self) -> Result<(), JwkError> {
        if self.kty != "EC" || self.crv.as_deref() != Some("P-256") {
            return Err(JwkError::UnsupportedKeyType {
                expected: "EC P-256",
            });
        }
        Ok(())
    }
}

/// A JWK Set (RFC 7517 §5).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwkSet {
    /// The keys.
    #[serde(deserialize_with = "crate::codec::objects")]
    pub keys: Vec<Jwk>,
}

/// A validated P-256 public key, kept as its 65-byte SEC1 uncompressed point.
#[derive(Clone, PartialEq, Eq)]
pub struct P256PublicKey([u8; 65]);

impl std::fmt::Debug for P256PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "P256PublicKey({})", b64_encode(self.0))
    }
}

impl P256PublicKey {
    /// Validates a SEC1 uncompressed point (`0x04 ‖ x ‖ y`): exactly 65 bytes
    /// and on the curve. Compressed points and the identity are refused.
    ///
    /// # Errors
    /// [`JwkError::InvalidKey`].
    pub fn from_sec1(bytes: &[u8]) -> Result<Self, JwkError> {
        let point: [u8; 65] = bytes.try_into().map_err(|_| JwkError::InvalidKey)?;
        if point[0] != 0x04 {
            return Err(JwkError::InvalidKey);
        }
        // aws-lc checks the point is on the curve (EC_POINT_oct2point); the
        // length and prefix checks above exclude the compressed forms and the
        // one-byte encoding of the identity.
        ParsedPublicKey::try_from(&UnparsedPublicKey::new(&ECDH_P256, &point[..]))
            .map_err(|_| JwkError::InvalidKey)?;
        Ok(Self(point))
    }

    /// Reads a public (or private) EC P-256 JWK; only `x` and `y` are used.
    ///
    /// # Errors
    /// Any [`JwkError`] naming the bad member.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, JwkError> {
        jwk.expect_ec_p256()?;
        let x = jwk.member("x", jwk.x.as_deref())?;
        let y = jwk.member("y", jwk.y.as_deref())?;
        if x.len() != 32 {
            return Err(JwkError::BadMember("x"));
        }
        if y.len() != 32 {
            return Err(JwkError::BadMember("y"));
        }
        let mut point = [0u8; 65];
        point[0] = 0x04;
        point[1..33].copy_from_slice(&x);
        point[33..].copy_from_slice(&y);
        Self::from_sec1(&point)
    }

    /// The 65-byte SEC1 uncompressed encoding.
    pub fn sec1(&self) -> &[u8; 65] {
        &self.0
    }

    /// The public JWK with only `kty`, `crv`, `x`, `y` (callers add metadata).
    pub fn to_jwk(&self) -> Jwk {
        Jwk {
            kty: "EC".into(),
            crv: Some("P-256".into()),
            x: Some(b64_encode(&self.0[1..33])),
            y: Some(b64_encode(&self.0[33..])),
            ..Jwk::default()
        }
    }

    /// The RFC 7638 JWK thumbprint (SHA-256, base64url): the hash of the
    /// required members in lexicographic order with no whitespace.
    pub fn thumbprint(&self) -> String {
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            b64_encode(&self.0[1..33]),
            b64_encode(&self.0[33..])
        );
        b64_encode(digest::digest(&digest::SHA256, canonical.as_bytes()))
    }
}

/// A P-256 private scalar read from a private JWK file (agency recipient keys,
/// ES256 authority keys). Held zeroized; `Debug` never prints it.
pub struct P256PrivateKey {
    d: Zeroizing<Vec<u8>>,
    public: P256PublicKey,
}

impl std::fmt::Debug for P256PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P256PrivateKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl P256PrivateKey {
    /// Reads a private EC P-256 JWK and checks that `d` matches `x`/`y`.
    ///
    /// # Errors
    /// Any [`JwkError`]; [`JwkError::InvalidKey`] when `d` is out of range or
    /// does not belong to the public key.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, JwkError> {
        let public = P256PublicKey::from_jwk(jwk)?;
        let d = Zeroizing::new(jwk.member("d", jwk.d.as_deref().map(String::as_str))?);
        if d.len() != 32 {
            return Err(JwkError::BadMember("d"));
        }
        let key = aws_lc_rs::agreement::PrivateKey::from_private_key(&ECDH_P256, &d)
            .map_err(|_| JwkError::InvalidKey)?;
        let derived = key.compute_public_key().map_err(|_| JwkError::InvalidKey)?;
        if derived.as_ref() != public.sec1() {
            return Err(JwkError::InvalidKey);
        }
        Ok(Self { d, public })
    }

    /// A fresh random key from the system RNG.
    ///
    /// # Errors
    /// [`JwkError::InvalidKey`] only if the RNG fails.
    pub fn generate() -> Result<Self, JwkError> {
        let key = aws_lc_rs::agreement::PrivateKey::generate(&ECDH_P256)
            .map_err(|_| JwkError::InvalidKey)?;
        let d: aws_lc_rs::encoding::EcPrivateKeyBin<'static> =
            key.as_be_bytes().map_err(|_| JwkError::InvalidKey)?;
        let d = d.as_ref().to_vec();
        let public = key.compute_public_key().map_err(|_| JwkError::InvalidKey)?;
        Ok(Self {
            d: Zeroizing::new(d),
            public: P256PublicKey::from_sec1(public.as_ref())?,
        })
    }

    /// The 32-byte big-endian scalar.
    pub fn scalar(&self) -> &[u8] {
        &self.d
    }

    /// The matching public key.
    pub fn public(&self) -> &P256PublicKey {
        &self.public
    }

    /// The private JWK (with `d`) for writing to a key file.
    pub fn to_private_jwk(&self) -> Jwk {
        Jwk {
            d: Some(Zeroizing::new(b64_encode(&*self.d))),
            ..self.public.to_jwk()
        }
    }
}

/// The `y` coordinates (little-endian, sign bit cleared) of the eight
/// points of small order on edwards25519: the identity (y = 1), the point of
/// order 2 (y = p - 1), the two of order 4 (y = 0, both signs of x) and the
/// four of order 8 (two `y` values, both signs of x). The encodings are the
/// small-order points listed in Chalkias, Garillot, Nikolaenko, "Taming the
/// many EdDSAs" (SSR 2020), also libsodium's blocklist;
/// `small_order_and_non_canonical_keys_are_weak` checks each against
/// ed25519-dalek's `is_weak`. With
/// the sign bit ignored this also catches the non-canonical "-0" encodings
/// of the order-1 and order-2 points.
const ED25519_SMALL_ORDER_Y: [[u8; 32]; 5] = [
    [0; 32],
    {
        let mut one = [0; 32];
        one[0] = 1;
        one
    },
    {
        let mut p_minus_1 = [0xff; 32];
        p_minus_1[0] = 0xec;
        p_minus_1[31] = 0x7f;
        p_minus_1
    },
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ],
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ],
];

/// A validated Ed25519 public key (RFC 8037 OKP JWK).
#[derive(Clone, PartialEq, Eq)]
pub struct Ed25519PublicKey([u8; 32]);

impl std::fmt::Debug for Ed25519PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ed25519PublicKey({})", b64_encode(self.0))
    }
}

impl Ed25519PublicKey {
    /// Reads an OKP Ed25519 JWK; only `x` is used.
    ///
    /// # Errors
    /// Any [`JwkError`] naming the bad member.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, JwkError> {
        if jwk.kty != "OKP" || jwk.crv.as_deref() != Some("Ed25519") {
            return Err(JwkError::UnsupportedKeyType {
                expected: "OKP Ed25519",
            });
        }
        let x = jwk.member("x", jwk.x.as_deref())?;
        Self::from_bytes(&x).map_err(|_| JwkError::BadMember("x"))
    }

    /// Wraps 32 raw public key bytes.
    ///
    /// # Errors
    /// [`JwkError::InvalidKey`] for any other length.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, JwkError> {
        Ok(Self(bytes.try_into().map_err(|_| JwkError::InvalidKey)?))
    }

    /// The 32 raw bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Why this key must not be trusted to verify signatures, if it must not:
    /// a non-canonical encoding (`y` ≥ p, RFC 8032 §5.1.3 step 1) or a point
    /// of small order (order 1, 2, 4 or 8), checked by hand against the
    /// eight small-order points.
    ///
    /// # Security
    /// Under a small-order key, `[s]B = R + [k]A` holds for `R` = identity
    /// and `s` = 0 whatever the message: RFC 8032 verification (and so
    /// aws-lc-rs) accepts that one constant signature on every payload. Only
    /// keys that sign (authorities) need the check; it is done where they
    /// are configured.
    pub fn weakness(&self) -> Option<&'static str> {
        let mut y = self.0;
        // The top bit is the sign of x; the rest is y, little-endian.
        y[31] &= 0x7f;
        // p = 2^255 - 19 is ed ff … ff 7f: y ≥ p iff bytes 1..=31 are all
        // ones (under the mask) and byte 0 is at least 0xed.
        if y[31] == 0x7f && y[1..31].iter().all(|b| *b == 0xff) && y[0] >= 0xed {
            return Some("non-canonical Ed25519 encoding (y is not below 2^255 - 19)");
        }
        if ED25519_SMALL_ORDER_Y.contains(&y) {
            return Some("Ed25519 point of small order (it would accept a constant signature on any message)");
        }
        None
    }

    /// The public JWK.
    pub fn to_jwk(&self) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: Some("Ed25519".into()),
            x: Some(b64_encode(self.0)),
            ..Jwk::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The eight small-order points as encoded in "Taming the many EdDSAs"
    /// (Chalkias, Garillot, Nikolaenko, SSR 2020) and libsodium's blocklist.
    const SMALL_ORDER_POINTS: [&str; 8] = [
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    ];

    fn ed(hex_key: &str) -> Ed25519PublicKey {
        Ed25519PublicKey::from_bytes(&hex::decode(hex_key).unwrap()).unwrap()
    }

    #[test]
    fn small_order_and_non_canonical_keys_are_weak() {
        for point in SMALL_ORDER_POINTS {
            let bytes: [u8; 32] = hex::decode(point).unwrap().try_into().unwrap();
            // An independent implementation agrees that each is of small order.
            let dalek = ed25519_dalek::VerifyingKey::from_bytes(&bytes).unwrap();
            assert!(
                dalek.is_weak(),
                "{point} is not small-order per ed25519-dalek"
            );
            let why = ed(point)
                .weakness()
                .unwrap_or_else(|| panic!("{point} accepted"));
            assert!(why.contains("small order"), "{point}: {why}");
        }
        // y ≥ p: p itself (≡ 0), p + 1 (≡ 1, the identity again) and 2^255 - 1.
        for point in [
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        ] {
            let why = ed(point)
                .weakness()
                .unwrap_or_else(|| panic!("{point} accepted"));
            assert!(why.contains("non-canonical"), "{point}: {why}");
        }
        // "-0": the identity with the sign bit set.
        assert!(
            ed("0100000000000000000000000000000000000000000000000000000000000080")
                .weakness()
                .is_some()
        );
        // Real keys pass.
        for _ in 0..32 {
            let pair = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
            use aws_lc_rs::signature::KeyPair as _;
            let key = Ed25519PublicKey::from_bytes(pair.public_key().as_ref()).unwrap();
            assert_eq!(key.weakness(), None);
        }
    }

    /// Why the check exists: RFC 8032 verification as aws-lc-rs does it
    /// accepts the constant signature (R = identity, s = 0) on any message
    /// under the identity key, so only refusing the key stops it.
    #[test]
    fn the_constant_signature_verifies_under_a_small_order_key() {
        use aws_lc_rs::signature::{UnparsedPublicKey, ED25519};
        let identity = hex::decode(SMALL_ORDER_POINTS[0]).unwrap();
        let mut signature = identity.clone();
        signature.extend_from_slice(&[0; 32]);
        for message in [&b"any warrant"[..], b"another one", b""] {
            assert!(UnparsedPublicKey::new(&ED25519, &identity)
                .verify(message, &signature)
                .is_ok());
        }
    }

    #[test]
    fn rfc7638_thumbprint_example() {
        // RFC 7638 §3.1's example is an RSA key. This is RFC 7517 Appendix
        // A.1's P-256 public key (its `use` and `kid` are not hashed), and
        // its thumbprint as an independent implementation computes it:
        // Python's jwcrypto 1.6.1, `JWK(kty="EC", crv="P-256", x=…, y=…)
        // .thumbprint()` (2026-12-07).
        let jwk = Jwk::from_json(
            br#"{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","use":"enc","kid":"1"}"#,
        )
        .unwrap();
        let key = P256PublicKey::from_jwk(&jwk).unwrap();
        assert_eq!(
            key.thumbprint(),
            "cn-I_WNMClehiVp51i_0VpOENW1upEerA8sEam5hn-s"
        );
    }

    #[test]
    fn private_jwk_round_trips_and_must_match() {
        let key = P256PrivateKey::generate().unwrap();
        let jwk = key.to_private_jwk();
        let back = P256PrivateKey::from_jwk(&jwk).unwrap();
        assert_eq!(back.public(), key.public());

        let other = P256PrivateKey::generate().unwrap();
        let mut mixed = other.to_private_jwk();
        mixed.d = jwk.d.clone();
        assert_eq!(
            P256PrivateKey::from_jwk(&mixed).unwrap_err(),
            JwkError::InvalidKey
        );
    }

    #[test]
    fn off_curve_and_identity_points_are_refused() {
        let key = P256PrivateKey::generate().unwrap();
        let mut point = *key.public().sec1();
        point[64] ^= 1;
        assert_eq!(
            P256PublicKey::from_sec1(&point).unwrap_err(),
            JwkError::InvalidKey
        );
        assert_eq!(
            P256PublicKey::from_sec1(&[0u8]).unwrap_err(),
            JwkError::InvalidKey
        );
        let mut compressed = vec![0x02];
        compressed.extend_from_slice(&key.public().sec1()[1..33]);
        assert_eq!(
            P256PublicKey::from_sec1(&compressed).unwrap_err(),
            JwkError::InvalidKey
        );
    }

    #[test]
    fn unknown_members_are_refused() {
        let err = Jwk::from_json(br#"{"kty":"EC","crv":"P-256","x":"AA","y":"AA","extra":1}"#)
            .unwrap_err();
        assert!(matches!(err, JwkError::Json(m) if m.contains("extra")));
    }
}
