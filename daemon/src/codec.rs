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
/// in UTC with `Z`), so that no stored envelope becomes unopenable; and,
/// since 2026-12-05, UTC as RFC 3339 also spells it, `+00:00`, `-00:00`
/// or a lower-case `z` (Python's `datetime.isoformat()` writes `+00:00`;
/// such an envelope was denied for good). Never another offset, never a
/// control character. The header is hashed as sent (`envelope_digest`),
/// and its time is only compared with the warrant's window, so a second
/// spelling changes nothing else.
///
/// # Errors
/// [`CodecError::Time`].
pub fn parse_sealed_time(text: &str) -> Result<OffsetDateTime, CodecError> {
    if let Ok(t) = parse_time(text) {
        return Ok(t);
    }
    if text.chars().any(char::is_control) {
        return Err(CodecError::Time);
    }
    // RFC 3339 §5.6: `Z` may be written `z`.
    let upper;
    let text = match text.strip_suffix('z') {
        Some(head) => {
            upper = format!("{head}Z");
            upper.as_str()
        }
        None => text,
    };
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

/// Formats a time as RFC 3339 UTC exactly: [`format_time`]'s whole seconds,
/// and a fraction only when it is not zero, without trailing zeros
/// (`2026-11-26T07:25:21Z`, `2026-11-26T07:25:21.5Z`). One spelling for
/// each instant [`parse_time`] reads: what `lavd warrant new` writes into
/// claims, what `lavd warrant inspect` shows, and the time members'
/// spelling in a warrant's normalized digest.
pub fn format_time_exact(t: OffsetDateTime) -> String {
    let mut text = format_time(t);
    let nanos = t.nanosecond();
    if nanos != 0 {
        let fraction = format!("{nanos:09}");
        text.insert_str(
            text.len() - 1,
            &format!(".{}", fraction.trim_end_matches('0')),
        );
    }
    text
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

/// For `#[serde(default, deserialize_with = "crate::codec::non_null")]` on
/// an optional member that, when present, must not be `null`: absent and
/// `null` would otherwise both read as `None`, and one value would have two
/// spellings (fail closed, one form).
///
/// # Errors
/// `null`, or what `T` refuses.
pub fn non_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(d).map(Some)
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
/// "invalid type: sequence, expected a JSON object"; and, when a member's
/// value was wrong, naming the member ([`JsonError`]).
pub fn from_object_slice<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, JsonError> {
    serde_json::from_slice::<Object<T>>(bytes)
        .map(|o| o.0)
        .map_err(|inner| JsonError::new(bytes, inner))
}

/// A JSON document that did not read as its type, with the path of the
/// member whose value was wrong: serde's "invalid value: integer `-1`,
/// expected u64" says what, not where, and its line and column are in
/// bytes that the sender may never have seen as text (a JWS payload).
#[derive(Debug)]
pub struct JsonError {
    path: Option<String>,
    inner: serde_json::Error,
}

impl JsonError {
    fn new(bytes: &[u8], inner: serde_json::Error) -> Self {
        // Finding the member reads the document again: bounded, so that an
        // error in a large body costs no more than a few passes over 256 KiB.
        let path = if inner.classify() == serde_json::error::Category::Data
            && bytes.len() <= MAX_PATH_LOOKUP_BYTES
        {
            let at = byte_offset(bytes, inner.line(), inner.column());
            serde_json::from_slice::<&serde_json::value::RawValue>(bytes)
                .ok()
                .and_then(|doc| {
                    let mut path = String::new();
                    member_at(bytes, doc, at, &mut path, 0);
                    (!path.is_empty()).then_some(path)
                })
        } else {
            None
        };
        JsonError { path, inner }
    }

    /// The path of the member whose value was wrong (`window.from`,
    /// `targets[2]`), when serde's own message does not name it.
    pub fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }
}

/// `text` with control, bidirectional and other format characters (Unicode
/// Cc, Bidi_Control, Cf) written as Rust escapes (`\u{202e}`), for text from
/// outside that is printed to a terminal or a log.
pub fn escape_for_terminal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || crate::bounds::is_bidi_control(c) || crate::bounds::is_format(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The largest document whose wrong member [`JsonError`] looks for.
const MAX_PATH_LOOKUP_BYTES: usize = 256 * 1024;

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "`{path}`: ")?;
        }
        // serde quotes member names and strings of the input as they are
        // ("unknown field `…`"): control and bidirectional characters are
        // escaped, so the message cannot forge lines or reorder text in a
        // terminal or a log.
        f.write_str(&escape_for_terminal(&self.inner.to_string()))
    }
}

impl std::error::Error for JsonError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.inner)
    }
}

/// The offset in `bytes` of serde_json's 1-based `line` and its `column`
/// (bytes from the line's start).
fn byte_offset(bytes: &[u8], line: usize, column: usize) -> usize {
    let start = match line.checked_sub(2) {
        None => 0,
        Some(n) => bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(n)
            .map_or(bytes.len(), |(i, _)| i + 1),
    };
    start.saturating_add(column)
}

/// Appends to `path` the members and elements, innermost last, whose values
/// hold byte `at` of `whole` (`value` is part of `whole`). Descends at most
/// 8 levels, and only through member names of up to 64 letters, digits,
/// `_` and `-`: the path is echoed to the sender and to the logs.
fn member_at(
    whole: &[u8],
    value: &serde_json::value::RawValue,
    at: usize,
    path: &mut String,
    depth: usize,
) {
    use serde_json::value::RawValue;
    if depth == 8 {
        return;
    }
    // Where `v` lies in `whole`; the error's position is at the value's
    // last byte or just past it, so both ends count as inside.
    let holds = |v: &RawValue| {
        let start = (v.get().as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
        start < whole.len() && (start..=start + v.get().len()).contains(&at)
    };
    let text = value.get();
    if let Ok(members) = serde_json::from_str::<std::collections::BTreeMap<String, &RawValue>>(text)
    {
        let Some((name, inner)) = members.into_iter().find(|(_, v)| holds(v)) else {
            return;
        };
        let plain = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !plain {
            return;
        }
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(&name);
        member_at(whole, inner, at, path, depth + 1);
    } else if let Ok(elements) = serde_json::from_str::<Vec<&RawValue>>(text) {
        let Some((i, inner)) = elements.into_iter().enumerate().find(|(_, v)| holds(v)) else {
            return;
        };
        path.push_str(&format!("[{i}]"));
        member_at(whole, inner, at, path, depth + 1);
    }
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

    /// A wrong value is named by its path, at any depth and on any line; a
    /// message serde already words with the member, or a syntax error,
    /// gets no path.
    #[test]
    fn a_wrong_value_names_its_member() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Inner {
            from: u64,
            to: u64,
        }
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Outer {
            id: String,
            count: u64,
            window: Object<Inner>,
            tags: Vec<String>,
        }
        let path = |json: &str| {
            let e = from_object_slice::<Outer>(json.as_bytes()).unwrap_err();
            (e.path().map(str::to_string), e.to_string())
        };
        let ok = r#"{"id":"a","count":1,"window":{"from":1,"to":2},"tags":["x"]}"#;
        from_object_slice::<Outer>(ok.as_bytes()).unwrap();

        let (p, m) = path(&ok.replace(r#""count":1"#, r#""count":-1"#));
        assert_eq!(p.as_deref(), Some("count"));
        assert!(m.starts_with("`count`: invalid value: integer `-1`"), "{m}");
        let (p, _) = path(&ok.replace(r#""count":1"#, r#""count":"1""#));
        assert_eq!(p.as_deref(), Some("count"));
        let (p, _) = path(&ok.replace(r#""id":"a""#, r#""id":7"#));
        assert_eq!(p.as_deref(), Some("id"));
        let (p, _) = path(&ok.replace(r#""to":2"#, r#""to":true"#));
        assert_eq!(p.as_deref(), Some("window.to"));
        let (p, m) = path(&ok.replace(r#""to":2"#, r#""to":2,"at":3"#));
        assert_eq!(p.as_deref(), Some("window"));
        assert!(m.contains("unknown field `at`"), "{m}");
        let (p, _) = path(&ok.replace(
            r#"["x"]"#,
            r#"["x",
  5]"#,
        ));
        assert_eq!(p.as_deref(), Some("tags[1]"));
        let pretty = "{\n \"id\": \"a\",\n \"count\": 1.5,\n \"window\": {\"from\": 1, \"to\": 2},\n \"tags\": []\n}";
        assert_eq!(path(pretty).0.as_deref(), Some("count"));

        // Named by serde, or not a value's fault: no path.
        assert_eq!(path(&ok.replace(r#","tags":["x"]"#, "")).0, None);
        assert_eq!(path(&ok.replace(r#""id""#, r#""idx""#)).0, None);
        assert_eq!(path(&ok.replace("}", "")).0, None);
        // A member name that is not plain is not put in the path, and
        // serde's own message quotes it escaped.
        let (p, m) = path(
            r#"{"id":"a","count":1,"window":{"from":1,"to":2},"tags":["x"],"a\u001b\u202e":1}"#,
        );
        assert_eq!(p, None);
        assert!(!m.contains('\u{1b}') && !m.contains('\u{202e}'), "{m:?}");
        assert!(m.contains("a\\u{1b}\\u{202e}"), "{m:?}");
        // Past the lookup's bound, the message is serde's alone.
        let many = "\"y\",".repeat(MAX_PATH_LOOKUP_BYTES / 4);
        let big = ok.replace(r#"["x"]"#, &format!("[{many}\"x\"]"));
        let (p, _) = path(&big.replace(r#""count":1"#, r#""count":-1"#));
        assert_eq!(p, None);
    }

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
        // And UTC as RFC 3339 also writes it, at the same instant.
        let at = parse_time("2026-11-26T07:25:21Z").unwrap();
        for utc in [
            "2026-11-26T07:25:21+00:00",
            "2026-11-26T07:25:21-00:00",
            "2026-11-26T07:25:21z",
            "2026-11-26t07:25:21z",
        ] {
            assert_eq!(parse_sealed_time(utc).unwrap(), at, "{utc:?}");
        }
        for bad in [
            "2026-11-26\u{1}07:25:21Z",
            "2026-11-26T07:25:21+01:00",
            "2026-11-26T08:25:21+01:00",
            "2026-11-26T07:25:21+00:00\u{1}",
            "2026-11-26T07:25:21zz",
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
