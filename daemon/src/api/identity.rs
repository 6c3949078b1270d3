//! Who is calling: the client certificate's single URI SAN, and the roles the
//! configuration grants that identity.
//!
//! The certificate has already been verified by rustls against the configured
//! client CAs (and CRLs) when this code reads it. It is still parsed strictly:
//! a certificate with no URI SAN or with several is refused, because an
//! identity that is ambiguous cannot be bound to a warrant's `agency`.
//!
//! The same minimal DER reader gives the times that bound how long a
//! connection's certificate check holds ([`not_after`], [`crl_fields`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// A caller's role (PROTOCOL §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads escrow public keys.
    Provider,
    /// Executes warrants (unwrap).
    Agency,
    /// Reads the audit log.
    Auditor,
    /// Key lifecycle and revocations.
    Admin,
}

impl Role {
    /// Parses the config spelling.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "provider" => Some(Role::Provider),
            "agency" => Some(Role::Agency),
            "auditor" => Some(Role::Auditor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Provider => "provider",
            Role::Agency => "agency",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }
}

/// Identity → roles, from config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleMap(BTreeMap<String, BTreeSet<Role>>);

impl RoleMap {
    /// Builds the map.
    pub fn new(map: BTreeMap<String, BTreeSet<Role>>) -> Self {
        RoleMap(map)
    }

    /// The roles of `identity` (none if unknown).
    pub fn roles(&self, identity: &str) -> BTreeSet<Role> {
        self.0.get(identity).cloned().unwrap_or_default()
    }
}

/// A caller whose certificate chained to a configured client CA, identified
/// by its one URI SAN. Made only by the TLS accept loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    uri: String,
    roles: BTreeSet<Role>,
    remote: SocketAddr,
}

impl PeerIdentity {
    pub(crate) fn new(uri: String, roles: BTreeSet<Role>, remote: SocketAddr) -> Self {
        PeerIdentity { uri, roles, remote }
    }

    /// The URI SAN, e.g. `spiffe://agency.example/lea`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the configuration grants `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// The roles the configuration grants.
    pub fn roles(&self) -> &BTreeSet<Role> {
        &self.roles
    }

    /// The remote address of the connection.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }
}

/// Why a client certificate gives no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The certificate has no URI SAN.
    #[error("the client certificate has no URI SAN")]
    NoUriSan,
    /// The certificate has more than one URI SAN.
    #[error("the client certificate has {0} URI SANs; exactly one is required")]
    SeveralUriSans(usize),
    /// The URI SAN is not a caller identity ([`crate::bounds::identity`]).
    #[error("the client certificate's URI SAN {0}")]
    BadUri(crate::bounds::BoundError),
    /// The certificate is not the DER this parser expects (a verified
    /// certificate should never get here).
    #[error("the client certificate could not be parsed")]
    Malformed,
}

impl IdentityError {
    /// A short label for metrics (`tls_handshake_failures{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            IdentityError::NoUriSan => "no_uri_san",
            IdentityError::SeveralUriSans(_) => "several_uri_sans",
            IdentityError::BadUri(_) => "bad_uri_san",
            IdentityError::Malformed => "malformed_certificate",
        }
    }
}

/// The single URI SAN of a DER X.509 certificate.
///
/// # Errors
/// [`IdentityError`] when there is none, several, or the DER is not a
/// certificate.
pub fn uri_san(cert: &[u8]) -> Result<String, IdentityError> {
    let mut uris = Vec::new();
    for value in san_extensions(cert)? {
        // GeneralNames ::= SEQUENCE OF GeneralName
        let mut names = Der::new(value).expect_one(SEQUENCE)?;
        while !names.is_empty() {
            let (tag, value) = names.next()?;
            // uniformResourceIdentifier [6] IMPLICIT IA5String
            if tag == 0x86 {
                uris.push(value);
            }
        }
    }
    match uris.as_slice() {
        [] => Err(IdentityError::NoUriSan),
        [one] => {
            let uri = String::from_utf8(one.to_vec())
                .map_err(|_| IdentityError::BadUri(crate::bounds::BoundError::NotPrintableAscii))?;
            crate::bounds::identity(&uri).map_err(IdentityError::BadUri)?;
            Ok(uri)
        }
        many => Err(IdentityError::SeveralUriSans(many.len())),
    }
}

/// The `notAfter` of a DER X.509 certificate (RFC 5280 §4.1.2.5), in
/// seconds since the Unix epoch.
///
/// # Errors
/// [`IdentityError::Malformed`] when the DER is not a certificate or the
/// time is not in RFC 5280's form.
pub fn not_after(cert: &[u8]) -> Result<u64, IdentityError> {
    let mut tbs = tbs_from_signature(cert)?;
    // signature; issuer.
    tbs.expect(SEQUENCE)?;
    tbs.expect(SEQUENCE)?;
    let mut validity = Der::new(tbs.expect(SEQUENCE)?);
    let _not_before = validity.next()?;
    let (tag, value) = validity.next()?;
    if !validity.is_empty() {
        return Err(IdentityError::Malformed);
    }
    der_time(tag, value)
}

/// What lavd reads of a DER X.509 CRL (RFC 5280 §5.1.2): its issuer, its
/// scope and its `nextUpdate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlFields {
    /// The issuer `Name`'s DER contents, compared byte for byte between
    /// CRLs (the handshake matches a CRL to a certificate's issuer by them).
    pub issuer: Vec<u8>,
    /// Which certificates of its issuer it covers, from its
    /// issuingDistributionPoint extension (RFC 5280 §5.2.5).
    pub scope: CrlScope,
    /// `nextUpdate` in seconds since the Unix epoch, or `None` when the CRL
    /// has none.
    pub next_update: Option<u64>,
    /// `thisUpdate` in seconds since the Unix epoch.
    pub this_update: u64,
    /// The cRLNumber extension (RFC 5280 §5.2.3: increasing for one issuer
    /// and scope), or `None` without one.
    pub number: Option<CrlNumber>,
}

/// A CRL's cRLNumber: a non-negative INTEGER of up to 20 octets (RFC 5280
/// §5.2.3), kept as its big-endian magnitude without leading zeros, so that
/// numbers compare by length, then bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CrlNumber {
    len: usize,
    magnitude: Vec<u8>,
}

impl CrlNumber {
    /// From the DER INTEGER's contents; `None` for a negative one.
    fn from_der_integer(contents: &[u8]) -> Option<Self> {
        if contents.first().is_none_or(|b| b & 0x80 != 0) {
            return None;
        }
        let start = contents
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(contents.len());
        let magnitude = contents[start..].to_vec();
        Some(CrlNumber {
            len: magnitude.len(),
            magnitude,
        })
    }
}

impl std::fmt::Display for CrlNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.len <= 16 {
            let n = self
                .magnitude
                .iter()
                .fold(0u128, |n, b| (n << 8) | u128::from(*b));
            write!(f, "{n}")
        } else {
            write!(f, "0x{}", hex::encode(&self.magnitude))
        }
    }
}

/// Which certificates of its issuer a CRL covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrlScope {
    /// Every certificate (no issuingDistributionPoint extension).
    All,
    /// End-entity certificates only (`onlyContainsUserCerts`).
    UserCerts,
    /// CA certificates only (`onlyContainsCACerts`).
    CaCerts,
    /// Anything else: distribution-point partitions, some reasons only, an
    /// indirect CRL, attribute certificates, or both flags.
    Other,
}

/// The cRLNumber extension's OID, 2.5.29.20.
const CRL_NUMBER_OID: &[u8] = &[0x55, 0x1d, 0x14];

/// The issuingDistributionPoint extension's OID, 2.5.29.28.
const IDP_OID: &[u8] = &[0x55, 0x1d, 0x1c];

/// The scope an issuingDistributionPoint value says: user-only or CA-only
/// when that flag alone is set (a distribution point name beside it is
/// allowed), [`CrlScope::Other`] for every other form.
fn idp_scope(value: &[u8]) -> Result<CrlScope, IdentityError> {
    let mut idp = Der::new(value).expect_one(SEQUENCE)?;
    let (mut user, mut ca, mut other) = (false, false, false);
    while !idp.is_empty() {
        match idp.next()? {
            // distributionPoint [0]: a name, not a scope.
            (0xa0, _) => {}
            // onlyContainsUserCerts [1], onlyContainsCACerts [2]: BOOLEAN,
            // present only when TRUE (DER omits a DEFAULT FALSE).
            (0x81, [0xff]) => user = true,
            (0x82, [0xff]) => ca = true,
            // onlySomeReasons [3], indirectCRL [4],
            // onlyContainsAttributeCerts [5], anything else.
            _ => other = true,
        }
    }
    Ok(match (user, ca, other) {
        (true, false, false) => CrlScope::UserCerts,
        (false, true, false) => CrlScope::CaCerts,
        _ => CrlScope::Other,
    })
}

/// The issuer, scope, times and number of a DER X.509 CRL (RFC 5280
/// §5.1.2.3, §5.2.5, §5.1.2.4, §5.1.2.5 and §5.2.3).
///
/// # Errors
/// [`IdentityError::Malformed`] when the DER is not a CRL, a time is not
/// in RFC 5280's form, or the cRLNumber is not a non-negative INTEGER.
pub fn crl_fields(crl: &[u8]) -> Result<CrlFields, IdentityError> {
    let mut list = Der::new(crl).expect_one(SEQUENCE)?;
    let mut tbs = Der::new(list.expect(SEQUENCE)?);
    // version, optional; signature; issuer; thisUpdate.
    let (mut tag, _) = tbs.next()?;
    if tag == INTEGER {
        tag = tbs.next()?.0;
    }
    if tag != SEQUENCE {
        return Err(IdentityError::Malformed);
    }
    let issuer = tbs.expect(SEQUENCE)?.to_vec();
    let (tag, value) = tbs.next()?;
    let this_update = der_time(tag, value)?;
    // nextUpdate, optional; revokedCertificates, optional;
    // crlExtensions [0] EXPLICIT, optional.
    let mut next_update = None;
    let mut scope = CrlScope::All;
    let mut number = None;
    while !tbs.is_empty() {
        match tbs.next()? {
            (tag @ (UTC_TIME | GENERALIZED_TIME), value) => {
                next_update = Some(der_time(tag, value)?);
            }
            (0xa0, value) => {
                for (oid, value) in extensions(value)? {
                    if oid == IDP_OID {
                        scope = idp_scope(value)?;
                    } else if oid == CRL_NUMBER_OID {
                        let contents = Der::new(value).expect_one(INTEGER)?.rest;
                        number = Some(
                            CrlNumber::from_der_integer(contents)
                                .ok_or(IdentityError::Malformed)?,
                        );
                    }
                }
            }
            _ => {}
        }
    }
    Ok(CrlFields {
        issuer,
        scope,
        next_update,
        this_update,
        number,
    })
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`), the only forms RFC 5280 §4.1.2.5 allows, in
/// seconds since the Unix epoch.
fn der_time(tag: u8, value: &[u8]) -> Result<u64, IdentityError> {
    let bad = || IdentityError::Malformed;
    let (year, rest) = match (tag, value.len()) {
        (UTC_TIME, 13) => {
            let yy = i32::try_from(digits(&value[..2]).ok_or_else(bad)?).map_err(|_| bad())?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &value[2..])
        }
        (GENERALIZED_TIME, 15) => (
            i32::try_from(digits(&value[..4]).ok_or_else(bad)?).map_err(|_| bad())?,
            &value[4..],
        ),
        _ => return Err(bad()),
    };
    if rest[10] != b'Z' {
        return Err(bad());
    }
    let two = |i: usize| {
        digits(&rest[i..i + 2])
            .and_then(|n| u8::try_from(n).ok())
            .ok_or_else(bad)
    };
    let month = time::Month::try_from(two(0)?).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(year, month, two(2)?).map_err(|_| bad())?;
    let at = date
        .with_hms(two(4)?, two(6)?, two(8)?)
        .map_err(|_| bad())?
        .assume_utc();
    u64::try_from(at.unix_timestamp()).map_err(|_| bad())
}

/// What a CRL's signature is checked with: the signed part (the whole
/// `tbsCertList` element, tag and length included), the signature
/// algorithm's OID, and the signature's bytes (RFC 5280 §5.1).
#[derive(Debug)]
pub struct CrlSigned<'a> {
    /// The DER of `tbsCertList`, as signed.
    pub tbs: &'a [u8],
    /// `signatureAlgorithm`'s OID (contents only).
    pub algorithm: &'a [u8],
    /// The `signatureValue` BIT STRING's bytes.
    pub signature: &'a [u8],
}

/// The signed part, signature algorithm and signature of a DER CRL.
///
/// # Errors
/// [`IdentityError::Malformed`] when the DER is not a CRL's outer shape.
pub fn crl_signed(crl: &[u8]) -> Result<CrlSigned<'_>, IdentityError> {
    let mut list = Der::new(crl).expect_one(SEQUENCE)?;
    let (tag, _, tbs) = list.next_whole()?;
    if tag != SEQUENCE {
        return Err(IdentityError::Malformed);
    }
    let algorithm = Der::new(list.expect(SEQUENCE)?).expect(OID)?;
    let signature = bit_string(list.expect(BIT_STRING)?)?;
    if !list.is_empty() {
        return Err(IdentityError::Malformed);
    }
    Ok(CrlSigned {
        tbs,
        algorithm,
        signature,
    })
}

/// What a CA certificate says about the CRLs it signs: its subject (the
/// raw DER a CRL's issuer is compared with) and its public key.
#[derive(Debug)]
pub struct CaKey {
    /// The subject `Name`'s DER contents.
    pub subject: Vec<u8>,
    /// The SubjectPublicKeyInfo algorithm's OID (contents only).
    pub algorithm: Vec<u8>,
    /// The algorithm's parameters when they are an OID (an EC key's
    /// named curve), else empty.
    pub curve: Vec<u8>,
    /// The subjectPublicKey BIT STRING's bytes.
    pub key: Vec<u8>,
}

/// The subject and public key of a DER certificate.
///
/// # Errors
/// [`IdentityError::Malformed`] when the DER is not a certificate's shape.
pub fn ca_key(cert: &[u8]) -> Result<CaKey, IdentityError> {
    let mut tbs = tbs_from_signature(cert)?;
    // signature; issuer; validity; subject; subjectPublicKeyInfo.
    tbs.expect(SEQUENCE)?;
    tbs.expect(SEQUENCE)?;
    tbs.expect(SEQUENCE)?;
    let subject = tbs.expect(SEQUENCE)?.to_vec();
    let mut spki = Der::new(tbs.expect(SEQUENCE)?);
    let mut algorithm_id = Der::new(spki.expect(SEQUENCE)?);
    let algorithm = algorithm_id.expect(OID)?.to_vec();
    let curve = match algorithm_id.next() {
        Ok((OID, curve)) => curve.to_vec(),
        _ => Vec::new(),
    };
    let key = bit_string(spki.expect(BIT_STRING)?)?.to_vec();
    Ok(CaKey {
        subject,
        algorithm,
        curve,
        key,
    })
}

/// A DER certificate's `tbsCertificate`, read past its optional version
/// ([0] EXPLICIT) and its serialNumber: at its `signature` field.
fn tbs_from_signature(cert: &[u8]) -> Result<Der<'_>, IdentityError> {
    let mut certificate = Der::new(cert).expect_one(SEQUENCE)?;
    let mut tbs = Der::new(certificate.expect(SEQUENCE)?);
    let (mut tag, _) = tbs.next()?;
    if tag == 0xa0 {
        tag = tbs.next()?.0;
    }
    if tag != INTEGER {
        return Err(IdentityError::Malformed);
    }
    Ok(tbs)
}

/// A BIT STRING's contents as bytes: its first byte (the unused bits) is
/// kept only as a check. A signature or key has none; a keyUsage may.
fn bit_string(value: &[u8]) -> Result<&[u8], IdentityError> {
    match value.split_first() {
        Some((&unused, bits)) if unused < 8 && (unused == 0 || !bits.is_empty()) => Ok(bits),
        _ => Err(IdentityError::Malformed),
    }
}

/// The value of ASCII decimal `digits`, or `None` if one is not a digit.
fn digits(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |n, d| {
        d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
    })
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const BIT_STRING: u8 = 0x03;
/// id-ce-subjectAltName, 2.5.29.17 (RFC 5280 §4.2.1.6).
const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];

/// The extnValue of every subjectAltName extension (RFC 5280 §4.1).
fn san_extensions(cert: &[u8]) -> Result<Vec<&[u8]>, IdentityError> {
    let mut certificate = Der::new(cert).expect_one(SEQUENCE)?;
    let (tag, tbs) = certificate.next()?;
    if tag != SEQUENCE {
        return Err(IdentityError::Malformed);
    }
    let mut tbs = Der::new(tbs);
    let mut found = Vec::new();
    while !tbs.is_empty() {
        let (tag, value) = tbs.next()?;
        // extensions [3] EXPLICIT Extensions
        if tag != 0xa3 {
            continue;
        }
        for (oid, value) in extensions(value)? {
            if oid == SAN_OID {
                found.push(value);
            }
        }
    }
    Ok(found)
}

/// One extension's `(extnID, extnValue)`.
type Extension<'a> = (&'a [u8], &'a [u8]);

/// The `(extnID, extnValue)` of every extension of an `Extensions`
/// (RFC 5280 §4.1; §5.1 for a CRL's), given the contents of its explicit
/// tag.
fn extensions(tagged: &[u8]) -> Result<Vec<Extension<'_>>, IdentityError> {
    let mut extensions = Der::new(tagged).expect_one(SEQUENCE)?;
    let mut found = Vec::new();
    while !extensions.is_empty() {
        let mut extension = Der::new(extensions.expect(SEQUENCE)?);
        let oid = extension.expect(OID)?;
        let mut next = extension.next()?;
        if next.0 == BOOLEAN {
            next = extension.next()?;
        }
        if next.0 != OCTET_STRING || !extension.is_empty() {
            return Err(IdentityError::Malformed);
        }
        found.push((oid, next.1));
    }
    Ok(found)
}

/// A minimal strict DER reader: single-byte tags, definite minimal lengths.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Der { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn next(&mut self) -> Result<(u8, &'a [u8]), IdentityError> {
        let bad = IdentityError::Malformed;
        let (&tag, rest) = self.rest.split_first().ok_or(bad.clone())?;
        if tag & 0x1f == 0x1f {
            return Err(bad);
        }
        let (&first, mut rest) = rest.split_first().ok_or(bad.clone())?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 3 || rest.len() < n || rest[0] == 0 {
                return Err(bad);
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            if len < 0x80 {
                return Err(bad);
            }
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return Err(bad);
        }
        let (value, rest) = rest.split_at(len);
        self.rest = rest;
        Ok((tag, value))
    }

    /// The next element's tag, contents, and whole encoding (tag and
    /// length included).
    fn next_whole(&mut self) -> Result<(u8, &'a [u8], &'a [u8]), IdentityError> {
        let before = self.rest;
        let (tag, value) = self.next()?;
        let whole = &before[..before.len() - self.rest.len()];
        Ok((tag, value, whole))
    }

    fn expect(&mut self, tag: u8) -> Result<&'a [u8], IdentityError> {
        match self.next()? {
            (t, value) if t == tag => Ok(value),
            _ => Err(IdentityError::Malformed),
        }
    }

    /// The whole input is one element with `tag`; returns a reader over its
    /// contents.
    fn expect_one(mut self, tag: u8) -> Result<Der<'a>, IdentityError> {
        let value = self.expect(tag)?;
        if !self.is_empty() {
            return Err(IdentityError::Malformed);
        }
        Ok(Der::new(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bounds::BoundError;
    use rcgen::{CertificateParams, KeyPair, SanType};

    /// cRLNumbers order as numbers, whatever their length in DER: 255 is
    /// below 256, 127 below 128 (DER `00 80`), a leading zero changes
    /// nothing, and a negative one is no cRLNumber.
    #[test]
    fn crl_numbers_order_as_numbers() {
        let n = |der: &[u8]| CrlNumber::from_der_integer(der).unwrap();
        assert!(n(&[0x00, 0xff]) < n(&[0x01, 0x00]));
        assert!(n(&[0x7f]) < n(&[0x00, 0x80]));
        assert!(n(&[0x02]) < n(&[0x01, 0x00]));
        assert_eq!(n(&[0x00, 0x2a]), n(&[0x2a]));
        assert_eq!(n(&[0x01, 0x00]).to_string(), "256");
        assert_eq!(CrlNumber::from_der_integer(&[0x80]), None);
        assert_eq!(CrlNumber::from_der_integer(&[]), None);
    }

    fn cert(sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn exactly_one_uri_san_is_the_identity() {
        let der = cert(vec![
            SanType::DnsName("lea.agency.example".try_into().unwrap()),
            uri("spiffe://agency.example/lea"),
        ]);
        assert_eq!(uri_san(&der).unwrap(), "spiffe://agency.example/lea");
    }

    #[test]
    fn none_or_several_are_refused() {
        let none = cert(vec![SanType::DnsName("x.example".try_into().unwrap())]);
        assert_eq!(uri_san(&none).unwrap_err(), IdentityError::NoUriSan);
        let two = cert(vec![
            uri("spiffe://a.example/x"),
            uri("spiffe://b.example/y"),
        ]);
        assert_eq!(uri_san(&two).unwrap_err(), IdentityError::SeveralUriSans(2));
        let no_ext = cert(vec![]);
        assert_eq!(uri_san(&no_ext).unwrap_err(), IdentityError::NoUriSan);
    }

    /// The one URI SAN must be a caller identity (bounds::identity), the
    /// rule a warrant's `agency` and the `[roles]` table follow.
    #[test]
    fn a_uri_san_that_is_no_identity_is_refused() {
        for (san, why) in [
            ("lea-unit-7", BoundError::NotUri),
            ("spiffe://agency.example/a b", BoundError::NotPrintableAscii),
        ] {
            let der = cert(vec![uri(san)]);
            assert_eq!(
                uri_san(&der).unwrap_err(),
                IdentityError::BadUri(why),
                "{san}"
            );
        }
        let long = format!("spiffe://{}", "a".repeat(2048 - 8));
        let der = cert(vec![uri(&long)]);
        assert!(matches!(
            uri_san(&der).unwrap_err(),
            IdentityError::BadUri(BoundError::TooLong { max: 2048, .. })
        ));
    }

    #[test]
    fn not_after_and_next_update_are_read_in_both_time_forms() {
        let key = KeyPair::generate().unwrap();
        for (at, text) in [
            // UTCTime up to 2049, GeneralizedTime from 2050 (RFC 5280).
            (
                time::macros::datetime!(2027-03-04 05:06:07 UTC),
                "2027-03-04T05:06:07Z",
            ),
            (
                time::macros::datetime!(2051-01-02 03:04:05 UTC),
                "2051-01-02T03:04:05Z",
            ),
        ] {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.not_before = time::macros::datetime!(2026-01-01 00:00 UTC);
            params.not_after = at;
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let der = params.self_signed(&key).unwrap().der().to_vec();
            let expected =
                u64::try_from(crate::codec::parse_time(text).unwrap().unix_timestamp()).unwrap();
            assert_eq!(not_after(&der).unwrap(), expected);

            let issuer = rcgen::Issuer::new(params, &key);
            let crl = rcgen::CertificateRevocationListParams {
                this_update: time::macros::datetime!(2026-01-01 00:00 UTC),
                next_update: at,
                crl_number: rcgen::SerialNumber::from(1u64),
                issuing_distribution_point: None,
                revoked_certs: vec![],
                key_identifier_method: rcgen::KeyIdMethod::Sha256,
            }
            .signed_by(&issuer)
            .unwrap();
            assert_eq!(crl_fields(crl.der()).unwrap().next_update, Some(expected));
        }
        assert!(not_after(b"\x30\x00").is_err());
        assert!(crl_fields(b"\x30\x00").is_err());
        assert!(der_time(UTC_TIME, b"270304050607+").is_err());
        assert!(der_time(GENERALIZED_TIME, b"2027023005060Z").is_err());
        assert!(der_time(GENERALIZED_TIME, b"20270230050607Z").is_err());
        // 1950 is before the epoch: not a usable bound.
        assert!(der_time(UTC_TIME, b"500101000000Z").is_err());
        assert_eq!(der_time(UTC_TIME, b"700101000000Z").unwrap(), 0);
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let der = cert(vec![uri("spiffe://agency.example/lea")]);
        for cut in [0, 1, 2, 10, der.len() / 2, der.len() - 1] {
            assert!(uri_san(&der[..cut]).is_err());
        }
        let mut flipped = der.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            // None of these may panic.
            let _ = uri_san(&flipped);
            let _ = not_after(&flipped);
            let _ = crl_fields(&flipped);
            flipped[i] ^= 0xff;
        }
        assert_eq!(
            uri_san(&[0x30, 0x80]).unwrap_err(),
            IdentityError::Malformed
        );
    }
}
