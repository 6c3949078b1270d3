//! The bounds of every untrusted text field that more than one layer reads:
//! one function per field, used by every layer that checks it (claims
//! parsing, revocation requests, envelope headers, audit leaves), so that no
//! value accepted at the edge can be refused later by a layer with a stricter
//! rule. Two layers with two rules for one field is how an unrevocable
//! warrant (ids counted in characters by one layer and in bytes by another)
//! and an unaudited HSM open (a `kid` the header accepted and the audit leaf
//! refused) happened.
//!
//! Units are chosen once per field and named in the constant: warrant ids and
//! reasons are counted in characters (Unicode scalar values), as PROTOCOL §4
//! counts `id`; protocol identifiers (kids, targets, identities, `ref`) in
//! UTF-8 bytes. "Control character" is Unicode general category Cc
//! ([`char::is_control`]); "whitespace" is Unicode `White_Space`
//! ([`char::is_whitespace`]), so no-break and other non-ASCII spaces count.
//!
//! Names that people read and compare (warrant ids, authority key ids and
//! roles) also refuse format characters (Cf: zero-width, joiners,
//! bidirectional controls), and prose people read (revocation reasons, a
//! warrant's `legal_basis`) refuses bidirectional controls, which reorder
//! what is displayed. A caller identity (a certificate's URI SAN, the
//! `[roles]` table, a warrant's `agency`) is printable ASCII with a scheme
//! ([`identity`]), the one rule of all three. Protocol identifiers that a
//! provider chose and sealed (targets, provider identities in envelope
//! headers) keep the older rule: an envelope sealed under it must stay
//! openable, and they are matched byte for byte; a header's `ref` is opaque
//! (PROTOCOL §3): only its length is bounded. (A provider identity
//! in a header is at most [`MAX_PROVIDER_BYTES`], below a certificate's
//! [`MAX_IDENTITY_BYTES`]; it is recorded, never compared with the caller.)
//! The audit leaves hold these names and reasons under the older rule
//! ([`logged`]): looser than the edge, never stricter, so that a log written
//! before the change still verifies.
//!
//! Builds without the `daemon` feature: the provider-side header builder and
//! the audit leaves use it.

/// Longest warrant `id`, in characters (PROTOCOL §4: "≤ 128 chars").
pub const MAX_WARRANT_ID_CHARS: usize = 128;
/// Longest revocation `reason`, in characters.
pub const MAX_REASON_CHARS: usize = 1024;
/// Longest escrow key id (`kid`), in bytes: kids are short epoch names such
/// as `2026-11`.
pub const MAX_KID_BYTES: usize = 64;
/// Longest target identifier, in bytes.
pub const MAX_TARGET_BYTES: usize = 512;
/// Longest provider identity (its URI SAN) in an envelope header, in bytes.
pub const MAX_PROVIDER_BYTES: usize = 512;
/// Longest envelope `ref`, in bytes (PROTOCOL §3: "≤ 256 bytes").
pub const MAX_REF_BYTES: usize = 256;
/// Longest authority key id (the `kid` that names a warrant's or a
/// revocation's signer), in characters.
pub const MAX_AUTHORITY_KID_CHARS: usize = 128;
/// Longest authority role name, in characters.
pub const MAX_ROLE_CHARS: usize = 64;
/// Longest caller identity (a client certificate's URI SAN, which the
/// `[roles]` table and a warrant's `agency` name), in bytes.
pub const MAX_IDENTITY_BYTES: usize = 2048;

/// The unit a length bound counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// UTF-8 bytes.
    Bytes,
    /// Unicode scalar values.
    Chars,
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unit::Bytes => "bytes",
            Unit::Chars => "characters",
        })
    }
}

/// Why a value is outside its field's bounds. The message completes a
/// sentence that starts with the field's name ("`id` is longer than 128
/// characters").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BoundError {
    /// The empty string.
    #[error("is empty")]
    Empty,
    /// Only whitespace, where the field must say something.
    #[error("is only whitespace")]
    Blank,
    /// Longer than the field's bound.
    #[error("is longer than {max} {unit}")]
    TooLong {
        /// The bound.
        max: usize,
        /// What it counts.
        unit: Unit,
    },
    /// A control character (Cc), which could forge lines in logs and
    /// terminals.
    #[error("contains a control character")]
    Control,
    /// Whitespace in an identifier, where a space and a no-break space would
    /// make two look-alike names.
    #[error("contains whitespace")]
    Whitespace,
    /// An invisible format character (Cf, [`is_format`]) in a name people
    /// read and compare: `W-1` and `W-1` followed by a zero-width space are
    /// two warrants that look like one.
    #[error("contains an invisible format character (Unicode Cf)")]
    Format,
    /// A bidirectional control ([`is_bidi_control`]) in text people read: it
    /// reorders what is displayed, so the text reads as something else.
    #[error("contains a bidirectional control character")]
    Bidi,
    /// A character that displays as nothing though it is not Cf
    /// ([`is_ignorable`]: Hangul fillers, variation selectors, the
    /// combining grapheme joiner) in a name people read and compare.
    #[error("contains an invisible character (Unicode Default_Ignorable_Code_Point)")]
    Invisible,
    /// Whitespace at the start or end of a name: `W-1` and `W-1 ` are two
    /// warrants that look like one.
    #[error("begins or ends with whitespace")]
    Padded,
    /// A name not in Unicode Normalization Form C: `café` written with a
    /// combining accent (U+0301) and with `é` (U+00E9) are two warrants
    /// that look like one, and a revocation typed as one would miss the
    /// other.
    #[error("is not in Unicode Normalization Form C (NFC)")]
    NotNfc,
    /// A character outside printable ASCII (0x21..=0x7E) in a caller
    /// identity: a certificate's URI SAN is an IA5String, and lavd takes
    /// only its printable characters.
    #[error(
        "contains a character outside printable ASCII (a certificate's URI SAN holds only those)"
    )]
    NotPrintableAscii,
    /// A caller identity without a `scheme:`, so not a URI.
    #[error("is not a URI (no `scheme:`), e.g. spiffe://agency.example/lea")]
    NotUri,
}

impl BoundError {
    /// A short fixed description, for errors that carry `&'static str`.
    pub fn as_str(&self) -> &'static str {
        match self {
            BoundError::Empty => "empty",
            BoundError::Blank => "only whitespace",
            BoundError::TooLong { .. } => "too long",
            BoundError::Control => "contains a control character",
            BoundError::Whitespace => "contains whitespace",
            BoundError::Format => "contains an invisible format character",
            BoundError::Bidi => "contains a bidirectional control character",
            BoundError::Invisible => "contains an invisible character",
            BoundError::Padded => "begins or ends with whitespace",
            BoundError::NotNfc => "is not in Unicode Normalization Form C",
            BoundError::NotPrintableAscii => "contains a character outside printable ASCII",
            BoundError::NotUri => "is not a URI",
        }
    }
}

/// Whether `c` is a format character: Unicode general category Cf, as
/// listed in Unicode 15.1's `extracted/DerivedGeneralCategory.txt` (170 code
/// points). They are invisible, and join, hide or reorder what is displayed.
pub fn is_format(c: char) -> bool {
    matches!(
        u32::from(c),
        0xAD | 0x600..=0x605
            | 0x61C
            | 0x6DD
            | 0x70F
            | 0x890..=0x891
            | 0x8E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// Whether `c` is invisible though not a format character: the code points
/// of Unicode 15.1's `Default_Ignorable_Code_Point`
/// (`DerivedCoreProperties.txt`) outside Cf. That property holds 4,174 code
/// points; 138 are Cf ([`is_format`]) and these are the other 4,036: the
/// combining grapheme joiner, the Hangul fillers (letters that render as
/// nothing), variation selectors, and reserved code points set aside as
/// ignorable.
pub fn is_ignorable(c: char) -> bool {
    matches!(
        u32::from(c),
        0x34F
            | 0x115F..=0x1160
            | 0x17B4..=0x17B5
            | 0x180B..=0x180D
            | 0x180F
            | 0x2065
            | 0x3164
            | 0xFE00..=0xFE0F
            | 0xFFA0
            | 0xFFF0..=0xFFF8
            | 0xE0000
            | 0xE0002..=0xE001F
            | 0xE0080..=0xE00FF
            | 0xE0100..=0xE0FFF
    )
}

/// Whether `c` is a bidirectional control: Unicode property `Bidi_Control`,
/// as listed in Unicode 15.1's `PropList.txt` (the marks, embeddings,
/// overrides and isolates). A subset of [`is_format`].
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        u32::from(c),
        0x61C | 0x200E..=0x200F | 0x202A..=0x202E | 0x2066..=0x2069
    )
}

/// `value` read by people as a name: no format character, nothing else
/// invisible, no whitespace at either end, and in Normalization Form C, so
/// that two canonically equivalent names (`é` as one code point or as `e`
/// and a combining accent) are equal as strings. (Compatibility forms and
/// look-alike letters from other scripts stay distinct.)
fn name(value: &str) -> Result<(), BoundError> {
    if value.chars().any(is_format) {
        return Err(BoundError::Format);
    }
    if value.chars().any(is_ignorable) {
        return Err(BoundError::Invisible);
    }
    if value.trim().is_empty() {
        return Err(BoundError::Blank);
    }
    if value.trim() != value {
        return Err(BoundError::Padded);
    }
    if !unicode_normalization::is_nfc(value) {
        return Err(BoundError::NotNfc);
    }
    Ok(())
}

/// `value` read by people as prose: no bidirectional control.
///
/// # Errors
/// [`BoundError::Bidi`].
pub fn prose(value: &str) -> Result<(), BoundError> {
    if value.chars().any(is_bidi_control) {
        return Err(BoundError::Bidi);
    }
    Ok(())
}

fn length(value: &str, unit: Unit) -> usize {
    match unit {
        Unit::Bytes => value.len(),
        Unit::Chars => value.chars().count(),
    }
}

/// Free text: 1..=`max` `unit`s, no control character.
///
/// # Errors
/// [`BoundError::Empty`], [`BoundError::TooLong`], [`BoundError::Control`].
pub fn text(value: &str, max: usize, unit: Unit) -> Result<(), BoundError> {
    if value.is_empty() {
        return Err(BoundError::Empty);
    }
    // Cheap guard first: a value of more than 4·max bytes has more than max
    // characters too, so a huge input is not walked char by char.
    if value.len() > max.saturating_mul(4) || length(value, unit) > max {
        return Err(BoundError::TooLong { max, unit });
    }
    if value.chars().any(char::is_control) {
        return Err(BoundError::Control);
    }
    Ok(())
}

/// An identifier: [`text`] without whitespace.
///
/// # Errors
/// As [`text`], and [`BoundError::Whitespace`].
pub fn token(value: &str, max: usize, unit: Unit) -> Result<(), BoundError> {
    text(value, max, unit)?;
    if value.chars().any(char::is_whitespace) {
        return Err(BoundError::Whitespace);
    }
    Ok(())
}

/// A warrant `id`: 1..=[`MAX_WARRANT_ID_CHARS`] characters, no control
/// character, no format or other invisible character, not only whitespace
/// and none at either end, in Normalization Form C. Used by the claims,
/// both revocation forms and the claimed id of a refused warrant.
///
/// # Errors
/// As [`text`], and [`BoundError::Format`], [`BoundError::Invisible`],
/// [`BoundError::Blank`], [`BoundError::Padded`], [`BoundError::NotNfc`].
pub fn warrant_id(value: &str) -> Result<(), BoundError> {
    logged::warrant_id(value)?;
    name(value)
}

/// A revocation `reason`: 1..=[`MAX_REASON_CHARS`] characters, not only
/// whitespace, no control character, no bidirectional control. Used by both
/// revocation forms.
///
/// # Errors
/// As [`text`], [`BoundError::Blank`] and [`BoundError::Bidi`].
pub fn reason(value: &str) -> Result<(), BoundError> {
    logged::reason(value)?;
    prose(value)
}

/// A caller identity: a client certificate's one URI SAN,
/// 1..=[`MAX_IDENTITY_BYTES`] bytes of printable ASCII (no space, no
/// control, nothing outside ASCII) that begins with a scheme and a `:`
/// (RFC 3986 §3.1: a letter, then letters, digits, `+`, `-` or `.`). Used by the
/// TLS accept loop on the certificate, by the `[roles]` table and by a
/// warrant's `agency`, so that a role or a warrant that no certificate could
/// match is refused where it is written, not found unusable later. The
/// audit leaves that name a caller use [`logged::identity`].
///
/// # Errors
/// [`BoundError::Empty`], [`BoundError::TooLong`],
/// [`BoundError::NotPrintableAscii`], [`BoundError::NotUri`].
pub fn identity(value: &str) -> Result<(), BoundError> {
    if value.is_empty() {
        return Err(BoundError::Empty);
    }
    if value.len() > MAX_IDENTITY_BYTES {
        return Err(BoundError::TooLong {
            max: MAX_IDENTITY_BYTES,
            unit: Unit::Bytes,
        });
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(BoundError::NotPrintableAscii);
    }
    // RFC 3986 §3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
    let scheme_ok = |scheme: &str| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    };
    match value.split_once(':') {
        Some((scheme, _)) if scheme_ok(scheme) => Ok(()),
        _ => Err(BoundError::NotUri),
    }
}

/// The bounds of the same fields as the audit log holds them: the rules
/// above without the format and bidirectional checks, which came later
/// (2026-12). Every value the rules above admit passes these, so every leaf
/// lavd writes now does; and a leaf an earlier lavd wrote, with a format
/// character in an id or a bidirectional control in a reason, still parses,
/// so its signed log still verifies and reports (the report shows such
/// characters as code points). Only the audit leaves use these.
pub mod logged {
    use super::{text, token, BoundError, Unit};
    use super::{
        MAX_AUTHORITY_KID_CHARS, MAX_IDENTITY_BYTES, MAX_REASON_CHARS, MAX_ROLE_CHARS,
        MAX_WARRANT_ID_CHARS,
    };

    /// A logged warrant id: [`super::warrant_id`] but for format characters.
    ///
    /// # Errors
    /// As [`text`].
    pub fn warrant_id(value: &str) -> Result<(), BoundError> {
        text(value, MAX_WARRANT_ID_CHARS, Unit::Chars)
    }

    /// A logged revocation reason: [`super::reason`] but for
    /// bidirectional controls.
    ///
    /// # Errors
    /// As [`text`], and [`BoundError::Blank`].
    pub fn reason(value: &str) -> Result<(), BoundError> {
        text(value, MAX_REASON_CHARS, Unit::Chars)?;
        if value.trim().is_empty() {
            return Err(BoundError::Blank);
        }
        Ok(())
    }

    /// A logged authority key id: [`super::authority_kid`] but for format
    /// characters.
    ///
    /// # Errors
    /// As [`token`].
    pub fn authority_kid(value: &str) -> Result<(), BoundError> {
        token(value, MAX_AUTHORITY_KID_CHARS, Unit::Chars)
    }

    /// A logged caller identity: free text without whitespace, of at most
    /// [`MAX_IDENTITY_BYTES`] bytes. Every [`super::identity`] passes; the
    /// leaves written before that rule (which TLS already applied) do too.
    ///
    /// # Errors
    /// As [`token`].
    pub fn identity(value: &str) -> Result<(), BoundError> {
        token(value, MAX_IDENTITY_BYTES, Unit::Bytes)
    }

    /// A logged role name: [`super::role`] but for format characters.
    ///
    /// # Errors
    /// As [`token`].
    pub fn role(value: &str) -> Result<(), BoundError> {
        token(value, MAX_ROLE_CHARS, Unit::Chars)
    }
}

/// An escrow key id (`kid`): 1..=[`MAX_KID_BYTES`] bytes, no control
/// character, no whitespace. Used by the envelope header, the warrant's
/// `kids` and every audit leaf that names a key. (New keys are further
/// limited to a portable charset by `lavd keys generate`; that is a naming
/// rule for keys lavd creates, inside this one.)
///
/// # Errors
/// As [`token`].
pub fn kid(value: &str) -> Result<(), BoundError> {
    token(value, MAX_KID_BYTES, Unit::Bytes)
}

/// A target identifier: 1..=[`MAX_TARGET_BYTES`] bytes, no control
/// character, no whitespace. Used by the warrant's `targets` and the
/// envelope header, which are matched exactly against each other.
///
/// # Errors
/// As [`token`].
pub fn target(value: &str) -> Result<(), BoundError> {
    token(value, MAX_TARGET_BYTES, Unit::Bytes)
}

/// The sealing provider's identity in an envelope header:
/// 1..=[`MAX_PROVIDER_BYTES`] bytes, no control character, no whitespace.
///
/// # Errors
/// As [`token`].
pub fn provider(value: &str) -> Result<(), BoundError> {
    token(value, MAX_PROVIDER_BYTES, Unit::Bytes)
}

/// An authority's key id: 1..=[`MAX_AUTHORITY_KID_CHARS`] characters, no
/// control character, no whitespace, no format character. Used by the trust
/// configuration, the protected header of every warrant and revocation
/// signature and the authority signing tool (the audit leaves that name an
/// authority use [`logged::authority_kid`]).
///
/// # Errors
/// As [`token`], and [`BoundError::Format`], [`BoundError::Invisible`],
/// [`BoundError::NotNfc`].
pub fn authority_kid(value: &str) -> Result<(), BoundError> {
    logged::authority_kid(value)?;
    name(value)
}

/// An authority role name: 1..=[`MAX_ROLE_CHARS`] characters, no control
/// character, no whitespace, no format character. Used by the trust
/// configuration (authorities and policy rules); the `authorities_loaded`
/// audit leaf uses [`logged::role`].
///
/// # Errors
/// As [`token`], and [`BoundError::Format`], [`BoundError::Invisible`],
/// [`BoundError::NotNfc`].
pub fn role(value: &str) -> Result<(), BoundError> {
    logged::role(value)?;
    name(value)
}

/// An envelope `ref`: opaque (PROTOCOL §3), so any string of at most
/// [`MAX_REF_BYTES`] bytes, the empty one and control characters included:
/// lavd neither logs nor compares it, and a stricter rule would leave the
/// keys of a provider's envelopes unopenable for good. Where it is shown
/// (`lavd open`), it is quoted and escaped.
///
/// # Errors
/// [`BoundError::TooLong`].
pub fn message_ref(value: &str) -> Result<(), BoundError> {
    if value.len() > MAX_REF_BYTES {
        return Err(BoundError::TooLong {
            max: MAX_REF_BYTES,
            unit: Unit::Bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A caller identity is printable ASCII with a scheme, and every one
    /// the edge admits is one the audit leaves admit.
    #[test]
    fn an_identity_is_a_printable_ascii_uri() {
        for ok in [
            "spiffe://agency.example/lea",
            "urn:x",
            "x-lea.v2+tls:unit/7",
            &format!("spiffe://{}", "a".repeat(MAX_IDENTITY_BYTES - 9)),
        ] {
            assert_eq!(identity(ok), Ok(()), "{ok}");
            assert_eq!(logged::identity(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", BoundError::Empty),
            ("lea", BoundError::NotUri),
            (":lea", BoundError::NotUri),
            ("1x:lea", BoundError::NotUri),
            ("a/b:c", BoundError::NotUri),
            ("spiffe://a b", BoundError::NotPrintableAscii),
            ("spiffe://a\tb", BoundError::NotPrintableAscii),
            ("spiffe://é", BoundError::NotPrintableAscii),
            ("spiffe://\u{200b}a", BoundError::NotPrintableAscii),
        ] {
            assert_eq!(identity(bad), Err(why), "{bad:?}");
        }
        assert_eq!(
            identity(&format!("spiffe://{}", "a".repeat(MAX_IDENTITY_BYTES - 8))),
            Err(BoundError::TooLong {
                max: MAX_IDENTITY_BYTES,
                unit: Unit::Bytes
            })
        );
    }

    #[test]
    fn ids_and_reasons_count_characters() {
        // 128 Cyrillic letters are 256 bytes: within the bound.
        let id = "Ж".repeat(128);
        assert_eq!(warrant_id(&id), Ok(()));
        assert_eq!(
            warrant_id(&"Ж".repeat(129)),
            Err(BoundError::TooLong {
                max: 128,
                unit: Unit::Chars
            })
        );
        assert_eq!(reason(&"ж".repeat(1024)), Ok(()));
        assert!(matches!(
            reason(&"ж".repeat(1025)),
            Err(BoundError::TooLong { .. })
        ));
        assert_eq!(reason(" \u{a0} "), Err(BoundError::Blank));
        assert_eq!(warrant_id(""), Err(BoundError::Empty));
        assert_eq!(warrant_id("W\u{7}1"), Err(BoundError::Control));
        // Spaces are allowed in ids (free text), not in identifiers.
        assert_eq!(warrant_id("W 1"), Ok(()));
    }

    #[test]
    fn names_refuse_format_characters_and_prose_refuses_bidi_controls() {
        let count: usize = (0..=u32::from(char::MAX))
            .filter_map(char::from_u32)
            .filter(|&c| is_format(c))
            .count();
        assert_eq!(count, 170, "Unicode 15.1 has 170 Cf code points");
        assert!((0..=u32::from(char::MAX))
            .filter_map(char::from_u32)
            .filter(|&c| is_bidi_control(c))
            .all(is_format));
        for bad in ["W-1\u{200b}", "W-\u{202e}1-W", "\u{feff}W", "W\u{2066}1"] {
            assert_eq!(warrant_id(bad), Err(BoundError::Format), "{bad:?}");
        }
        assert_eq!(authority_kid("judge\u{200d}1"), Err(BoundError::Format));
        assert_eq!(role("judicial\u{ad}"), Err(BoundError::Format));
        assert_eq!(reason("ended \u{202e}early"), Err(BoundError::Bidi));
        assert_eq!(reason("ended\u{200f}"), Err(BoundError::Bidi));
        // Prose may join (ZWNJ in Persian, ZWJ in emoji sequences).
        assert_eq!(reason("می\u{200c}خواهم"), Ok(()));
        // Sealed protocol identifiers keep the older rule.
        assert_eq!(target("acct:\u{1f469}\u{200d}\u{1f4bb}"), Ok(()));
        assert_eq!(warrant_id("W-\u{0416}"), Ok(()));
    }

    #[test]
    fn names_refuse_invisible_letters_and_padding() {
        let count = (0..=u32::from(char::MAX))
            .filter_map(char::from_u32)
            .filter(|&c| is_ignorable(c))
            .inspect(|&c| assert!(!is_format(c), "{c:?} is Cf"))
            .count();
        assert_eq!(count, 4036, "Unicode 15.1: 4,174 ignorable, 138 of them Cf");
        for bad in ["W-1\u{3164}", "\u{115f}", "W-1\u{fe0f}", "W\u{34f}-1"] {
            assert_eq!(warrant_id(bad), Err(BoundError::Invisible), "{bad:?}");
        }
        assert_eq!(authority_kid("judge-1\u{ffa0}"), Err(BoundError::Invisible));
        assert_eq!(role("judicial\u{e0100}"), Err(BoundError::Invisible));
        assert_eq!(warrant_id(" "), Err(BoundError::Blank));
        assert_eq!(warrant_id("\u{3000}\u{a0}"), Err(BoundError::Blank));
        for bad in ["W-1 ", " W-1", "W-1\u{a0}", "\u{2003}W-1"] {
            assert_eq!(warrant_id(bad), Err(BoundError::Padded), "{bad:?}");
        }
        // Inside, a space is part of the name; the log keeps the older rule.
        assert_eq!(warrant_id("UK IPA 2026/42"), Ok(()));
        assert_eq!(logged::warrant_id("W-1 "), Ok(()));
        assert_eq!(logged::warrant_id("W-1\u{3164}"), Ok(()));
    }

    /// Names compare as strings, so two that read alike must be one: the
    /// decomposed form of a name is refused, its composed form (NFC) taken.
    /// Protocol identifiers a provider sealed, and the log, keep the older
    /// rule.
    #[test]
    fn names_are_in_normalization_form_c() {
        for (nfc, other) in [
            ("W-caf\u{e9}", "W-cafe\u{301}"),
            ("\u{c5}ngstr\u{f6}m", "A\u{30a}ngstro\u{308}m"),
            ("\u{d55c}", "\u{1112}\u{1161}\u{11ab}"),
        ] {
            assert_eq!(warrant_id(nfc), Ok(()), "{nfc:?}");
            assert_eq!(warrant_id(other), Err(BoundError::NotNfc), "{other:?}");
            assert_eq!(authority_kid(other), Err(BoundError::NotNfc), "{other:?}");
            assert_eq!(role(other), Err(BoundError::NotNfc), "{other:?}");
            assert_eq!(logged::warrant_id(other), Ok(()));
            assert_eq!(target(other), Ok(()));
        }
        // A singleton that NFC replaces: the Ohm sign is U+03A9 in NFC.
        assert_eq!(warrant_id("W-\u{2126}"), Err(BoundError::NotNfc));
        assert_eq!(warrant_id("W-\u{3a9}"), Ok(()));
    }

    #[test]
    fn identifiers_refuse_whitespace_and_controls() {
        assert_eq!(kid("2026-12"), Ok(()));
        for bad in ["2026 12", "2026\u{a0}12", "2026\u{2028}12", "\u{3000}"] {
            assert_eq!(kid(bad), Err(BoundError::Whitespace), "{bad:?}");
        }
        assert_eq!(kid("2026\u{1b}12"), Err(BoundError::Control));
        assert_eq!(kid(&"k".repeat(65)).unwrap_err().as_str(), "too long");
        assert_eq!(target("acct:a\u{85}b"), Err(BoundError::Control));
        assert_eq!(target("acct:a b"), Err(BoundError::Whitespace));
        assert_eq!(message_ref(&"r".repeat(256)), Ok(()));
        assert!(message_ref(&"r".repeat(257)).is_err());
        assert_eq!(message_ref("a b"), Ok(()));
        // Opaque: empty, or with control characters, is still a `ref`.
        assert_eq!(message_ref(""), Ok(()));
        assert_eq!(message_ref("a\tb\u{0}"), Ok(()));
    }
}
