//! Wire encodings shared by every module: base64url without padding
//! (RFC 4648 §5), RFC 3339 UTC timestamps, and strict JSON.
//!
//! PROTOCOL conventions: binary fields are base64url without padding; times are
//! RFC 3339 UTC strings; parsers reject unknown fields, duplicate keys and
//! trailing data. Everything here fails closed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// A value that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// Not canonical base64url without padding: padding, `+`/`/`, whitespace or
    /// non-zero trailing bits. A buggy encoder, or an attempt to make two
    /// encodings of one value.
    #[error("not base64url without padding")]
    Base64,
    /// Not an RFC 3339 timestamp in UTC (`Z` suffix).
    #[error("not an RFC 3339 UTC timestamp (e.g. 2026-11-26T07:25:21Z)")]
    Time,
    /// JSON that does not match the expected shape, has unknown or duplicate
    /// fields, or trailing data. The message names the field when serde can.
    #[error("invalid JSON: {0}")]
    Json(String),
}

/// Encodes bytes as base64url without padding.
pub fn b64_encode(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url without padding, refusing every non-canonical form.
///
/// # Errors
/// [`CodecError::Base64`] for padding, the standard alphabet, whitespace or
/// non-canonical trailing bits.
pub fn b64_decode(text: &str) -> Result<Vec<u8>, CodecError> {
    // The base64 crate's default engine already rejects padding when configured
    // for NO_PAD and rejects non-zero trailing bits; this is the canonical form.
    URL_SAFE_NO_PAD.decode(text).map_err(|_| CodecError::Base64)
}

/// Parses an RFC 3339 timestamp; only the UTC designator `Z` is accepted so
/// that a time has one spelling on the wire.
///
/// # Errors
/// [`CodecError::Time`] for anything else.
pub fn parse_time(text: &str) -> Result<OffsetDateTime, CodecError> {
    if !is_utc_timestamp(text.as_bytes()) {
        return Err(CodecError::Time);
    }
    let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| CodecError::Time)?;
    if t.offset() != UtcOffset::UTC {
        return Err(CodecError::Time);
    }
    Ok(t)
}

/// A time in an envelope header, which a provider sealed, perhaps years
/// before it is opened: the shape [`parse_time`] takes, or anything lavd
/// took there before 2026-12-04 (RFC 3339 as the `time` crate reads it,
/// in UTC with `Z`), so that no stored envelope becomes unopenable; never
/// a control character. The header is hashed as sent (`envelope_digest`),
/// and its time is only compared with the warrant's window, so a second
/// spelling changes nothing else.
///
/// # Errors
/// [`CodecError::Time`].
pub fn parse_sealed_time(text: &str) -> Result<OffsetDateTime, CodecError> {
    if let Ok(t) = parse_time(text) {
        return Ok(t);
    }
    if !text.ends_with('Z') || text.chars().any(char::is_control) {
        return Err(CodecError::Time);
    }
    let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| CodecError::Time)?;
    if t.offset() != UtcOffset::UTC {
        return Err(CodecError::Time);
    }
    Ok(t)
}

/// Whether `text` has the one shape times take here, RFC 3339's
/// `date-time` with its upper-case `T` and `Z`, digits where digits go, an
/// optional fraction of 1 to 9 digits, and no leap second:
/// `YYYY-MM-DDTHH:MM:SS[.F]Z`. The `time` crate's parser is laxer (any
/// byte between date and time, fractions of any length, `:60`), and what it
/// lets through would reach claims and leaves.
fn is_utc_timestamp(text: &[u8]) -> bool {
    const SHAPE: &[u8; 19] = b"dddd-dd-ddTdd:dd:dd";
    let Some((head, rest)) = text.split_at_checked(SHAPE.len()) else {
        return false;
    };
    let shaped = head.iter().zip(SHAPE).all(|(&c, &want)| match want {
        b'd' => c.is_ascii_digit(),
        other => c == other,
    });
    let fraction_ok = match rest {
        [b'Z'] => true,
        [b'.', digits @ .., b'Z'] => {
            (1..=9).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit)
        }
        _ => false,
    };
    // The seconds' tens digit: 0 to 5 (no leap second).
    shaped && fraction_ok && head[17] <= b'5'
}

/// Formats a time as RFC 3339 UTC with second precision (`2026-11-26T07:25:21Z`).
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Parses JSON strictly: the target type's serde derive must use
/// `deny_unknown_fields`; duplicate fields and trailing data are refused by
/// serde_json for derived structs, and the top level must be an object
/// ([`Object`]).
///
/// # Errors
/// [`CodecError::Json`] with serde's description (which names the field).
pub fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    from_object_slice(bytes).map_err(|e| CodecError::Json(e.to_string()))
}

/// A JSON object read as `T`, and only an object. serde_json reads a
/// derived struct from an array of its members' values in declaration order
/// too (`["2026-11","16-1-2",…]` for an envelope header); no party to
/// PROTOCOL writes that, other parsers refuse it, and `deny_unknown_fields`
/// does not cover it. Use it for every struct read from untrusted JSON: at
/// the top ([`from_object_slice`]) and for nested struct members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object<T>(pub T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Only<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Only<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Object<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(Only(std::marker::PhantomData))
    }
}

/// For `#[serde(deserialize_with = "crate::codec::object")]` on a struct
/// member that is also serialized (where the member cannot be an
/// [`Object`]): reads it as one.
///
/// # Errors
/// As [`Object`].
pub fn object<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Object<T> as serde::Deserialize>::deserialize(d).map(|o| o.0)
}

/// As [`object`], for a list of structs.
///
/// # Errors
/// As [`Object`].
pub fn objects<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Vec<Object<T>> as serde::Deserialize>::deserialize(d)
        .map(|v| v.into_iter().map(|o| o.0).collect())
}

/// `serde_json::from_slice`, with the top level an [`Object`].
///
/// # Errors
/// serde_json's, naming what was wrong: an array where an object belongs is
/// "invalid type: sequence, expected a JSON object".
pub fn from_object_slice<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    serde_json::from_slice::<Object<T>>(bytes).map(|o| o.0)
}

/// The raw text of member `name` of the JSON object `bytes` (the last one,
/// if `name` repeats), or `None` when `bytes` is not a JSON object or has
/// no such member. Not strict, and meant for untrusted bytes that are read
/// only for a hint (a refused request's claimed warrant id): the other
/// members are skipped unparsed, and nothing is allocated per member or
/// per nested value, whatever the input holds.
pub fn json_member<'a>(bytes: &'a [u8], name: &str) -> Option<&'a serde_json::value::RawValue> {
    use serde::de::{DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, Visitor};

    /// Whether a key equals the name, decided without keeping the key.
    struct KeyIs<'n>(&'n str);
    impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
        type Value = bool;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for KeyIs<'_> {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a member name")
        }
        fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
            Ok(key == self.0)
        }
    }

    struct Member<'n>(&'n str);
    impl<'de> Visitor<'de> for Member<'_> {
        type Value = Option<&'de serde_json::value::RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(is) = map.next_key_seed(KeyIs(self.0))? {
                if is {
                    found = Some(map.next_value()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }

    let mut de = serde_json::Deserializer::from_slice(bytes);
    let found = de.deserialize_map(Member(name)).ok()?;
    de.end().ok()?;
    found
}

/// Serde helpers for RFC 3339 UTC fields: `#[serde(with = "lavd::codec::rfc3339")]`.
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;

    /// Serializes as [`super::format_time`].
    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_time(*t))
    }

    /// Deserializes with [`super::parse_time`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_time(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde helper for an envelope header's time: [`parse_sealed_time`].
pub mod rfc3339_sealed {
    use serde::{Deserialize, Deserializer};
    use time::OffsetDateTime;

    /// Deserializes with [`super::parse_sealed_time`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_sealed_time(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde helpers for base64url-without-padding byte fields.
pub mod b64 {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as [`super::b64_encode`].
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::b64_encode(bytes))
    }

    /// Deserializes with [`super::b64_decode`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        super::b64_decode(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_member_reads_one_member_of_an_object_only() {
        fn get<'a>(json: &'a str, name: &str) -> Option<&'a str> {
            json_member(json.as_bytes(), name).map(|r| r.get())
        }
        assert_eq!(
            get(r#"{"a":[1,{"b":2}],"w":{"x":"y"}}"#, "w"),
            Some(r#"{"x":"y"}"#)
        );
        assert_eq!(get(r#"{"w":1,"w":"last"}"#, "w"), Some(r#""last""#));
        assert_eq!(get(r#"{"a":1}"#, "w"), None);
        assert_eq!(get(r#"{"\u0077":7}"#, "w"), Some("7"));
        for not_an_object in [r#"["w"]"#, r#""w""#, "", "{", r#"{"w":1} x"#, "[0,0,0]"] {
            assert_eq!(get(not_an_object, "w"), None, "{not_an_object}");
        }
    }

    #[test]
    fn base64url_is_strict() {
        assert_eq!(b64_decode("AQID").unwrap(), vec![1, 2, 3]);
        assert_eq!(b64_decode("AQI=").unwrap_err(), CodecError::Base64);
        assert_eq!(b64_decode("+/8").unwrap_err(), CodecError::Base64);
        // "AR" would carry non-zero trailing bits for one byte (canonical is "AQ").
        assert_eq!(b64_decode("AR").unwrap_err(), CodecError::Base64);
        assert_eq!(b64_encode([0xfb, 0xff]), "-_8");
    }

    #[test]
    fn times_are_utc_rfc3339() {
        let t = parse_time("2026-11-26T07:25:21Z").unwrap();
        assert_eq!(format_time(t), "2026-11-26T07:25:21Z");
        assert_eq!(
            parse_time("2026-11-26T07:25:21+01:00").unwrap_err(),
            CodecError::Time
        );
        assert_eq!(parse_time("2026-11-26").unwrap_err(), CodecError::Time);
        // Fractions of 1 to 9 digits (JavaScript's `toISOString` writes 3).
        let t = parse_time("2026-11-26T07:25:21.000Z").unwrap();
        assert_eq!(format_time(t), "2026-11-26T07:25:21Z");
        assert_eq!(
            parse_time("2026-11-26T07:25:21.123456789Z")
                .unwrap()
                .nanosecond(),
            123_456_789
        );
        // What the `time` crate alone would take, and nothing else that is
        // not the one shape.
        for bad in [
            "2026-11-26\u{1}07:25:21Z",
            "2026-11-26 07:25:21Z",
            "2026-11-26t07:25:21Z",
            "2026-11-26T07:25:21z",
            "2026-11-26507:25:21Z",
            "2026-11-26T23:59:60Z",
            "2026-11-26T07:25:21.Z",
            "2026-11-26T07:25:21.0000000000Z",
            "2026-11-26T07:25:21.1a3Z",
            "+2026-11-26T07:25:21Z",
            "2026-11-26T07:25:21Z ",
            "2026-11-26T07:25:21",
            "",
        ] {
            assert_eq!(parse_time(bad).unwrap_err(), CodecError::Time, "{bad:?}");
        }
        // An envelope header sealed before the shape was fixed still opens:
        // what the `time` crate took then is taken there, control
        // characters never.
        for old in [
            "2026-11-26 07:25:21Z",
            "2026-11-26t07:25:21Z",
            "2026-11-26T07:25:21.0000000000Z",
        ] {
            assert!(parse_sealed_time(old).is_ok(), "{old:?}");
        }
        for bad in [
            "2026-11-26\u{1}07:25:21Z",
            "2026-11-26T07:25:21+01:00",
            "2026-11-26T07:25:21z",
            "2026-11-26",
        ] {
            assert_eq!(
                parse_sealed_time(bad).unwrap_err(),
                CodecError::Time,
                "{bad:?}"
            );
        }
    }
}
