//! Strategies shared by the parser families: byte-level mutations of a valid
//! input, JSON-tree mutations, and text that probes the bounds of
//! `daemon/src/bounds.rs` (empty, exactly at a bound, one past it, control
//! characters, Unicode whitespace, multi-byte characters).

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::Value;

/// Cases per property: 64 by default so that the whole set runs in well
/// under a minute in a debug build on a 2-core machine; `PROPTEST_CASES`
/// raises it for long runs (`PROPTEST_CASES=5000 cargo test -p lavd --test
/// hostile_input`).
pub fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    Config {
        cases,
        // Shrinking a failure is worth a few thousand more runs.
        max_shrink_iters: 2048,
        // Failures are kept as files under fuzz/regressions/ instead.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Tokens that change how a parser reads what follows.
const TOKENS: &[&str] = &[
    "\"",
    "\\",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "-1",
    "0",
    "1e999",
    "18446744073709551616",
    "\\u0000",
    "\\ud800",
    "\n",
    "\r",
    "\t",
    " ",
    "\u{a0}",
    "\u{2028}",
    "\u{2014} ",
    "+",
    "/",
    ".p/",
    ".p",
    "x000/",
    "=",
    "==",
    "\u{0}",
    "\u{7f}",
    "\u{85}",
    "é",
    "Ж",
    "\u{feff}",
];

/// One edit of a byte string.
#[derive(Debug, Clone)]
pub enum Edit {
    /// XOR one byte (position as a fraction of the length).
    Flip(prop::sample::Index, u8),
    /// Insert a token.
    Insert(prop::sample::Index, &'static str),
    /// Delete a range.
    Delete(prop::sample::Index, usize),
    /// Repeat a range after itself.
    Duplicate(prop::sample::Index, usize),
    /// Keep only a prefix.
    Truncate(prop::sample::Index),
}

pub fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1..=255u8).prop_map(|(i, x)| Edit::Flip(i, x)),
        (any::<prop::sample::Index>(), prop::sample::select(TOKENS))
            .prop_map(|(i, t)| Edit::Insert(i, t)),
        (any::<prop::sample::Index>(), 1..16usize).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<prop::sample::Index>(), 1..64usize).prop_map(|(i, n)| Edit::Duplicate(i, n)),
        any::<prop::sample::Index>().prop_map(Edit::Truncate),
    ]
}

/// 1 to 4 edits.
pub fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 1..=4)
}

/// `bytes` after `edits`.
pub fn apply(bytes: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for e in edits {
        let at = |i: &prop::sample::Index, len: usize| if len == 0 { 0 } else { i.index(len) };
        match e {
            Edit::Flip(i, x) if !out.is_empty() => {
                let p = at(i, out.len());
                out[p] ^= x;
            }
            Edit::Flip(..) => {}
            Edit::Insert(i, t) => {
                let p = at(i, out.len() + 1);
                out.splice(p..p, t.bytes());
            }
            Edit::Delete(i, n) => {
                let p = at(i, out.len());
                let end = (p + n).min(out.len());
                out.drain(p..end);
            }
            Edit::Duplicate(i, n) => {
                let p = at(i, out.len());
                let end = (p + n).min(out.len());
                let copy = out[p..end].to_vec();
                out.splice(end..end, copy);
            }
            Edit::Truncate(i) => {
                let p = at(i, out.len() + 1);
                out.truncate(p);
            }
        }
    }
    out
}

/// One change to a JSON tree, at a member chosen by `Index` among all the
/// object members of the tree.
#[derive(Debug, Clone)]
pub enum JsonEdit {
    /// Remove the member.
    Remove(prop::sample::Index),
    /// Replace its value.
    Replace(prop::sample::Index, Value),
    /// Add an unknown member beside it.
    Unknown(prop::sample::Index),
}

/// A value of any JSON type, some of them edge cases.
pub fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        field_text(300).prop_map(Value::String),
        Just(Value::Array(vec![])),
        Just(serde_json::json!({})),
        Just(serde_json::json!(["a", 1])),
    ]
}

pub fn json_edits() -> impl Strategy<Value = Vec<JsonEdit>> {
    let one = prop_oneof![
        any::<prop::sample::Index>().prop_map(JsonEdit::Remove),
        (any::<prop::sample::Index>(), json_value()).prop_map(|(i, v)| JsonEdit::Replace(i, v)),
        any::<prop::sample::Index>().prop_map(JsonEdit::Unknown),
    ];
    prop::collection::vec(one, 1..=3)
}

/// Paths of every object member: a list of keys and array positions.
fn member_paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                prefix.push(k.clone());
                out.push(prefix.clone());
                member_paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                prefix.push(format!("#{i}"));
                member_paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn parent_mut<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut cur = v;
    for step in path {
        cur = match step.strip_prefix('#') {
            Some(i) => cur.get_mut(i.parse::<usize>().ok()?)?,
            None => cur.get_mut(step)?,
        };
    }
    Some(cur)
}

/// `value` after `edits`.
pub fn apply_json(value: &Value, edits: &[JsonEdit]) -> Value {
    let mut v = value.clone();
    for e in edits {
        let mut paths = Vec::new();
        member_paths(&v, &mut Vec::new(), &mut paths);
        if paths.is_empty() {
            break;
        }
        let (JsonEdit::Remove(i) | JsonEdit::Replace(i, _) | JsonEdit::Unknown(i)) = e;
        let path = &paths[i.index(paths.len())];
        let (key, parent) = path.split_last().expect("a member path is not empty");
        let Some(Value::Object(map)) = parent_mut(&mut v, parent) else {
            continue;
        };
        match e {
            JsonEdit::Remove(_) => {
                map.remove(key);
            }
            JsonEdit::Replace(_, value) => {
                map.insert(key.clone(), value.clone());
            }
            JsonEdit::Unknown(_) => {
                map.insert(format!("{key}_extra"), Value::Bool(true));
            }
        }
    }
    v
}

/// The JSON text of `value` with its first member written twice (serde's
/// own writer cannot produce a duplicate key).
pub fn with_duplicate_member(value: &Value) -> Option<String> {
    let Value::Object(map) = value else {
        return None;
    };
    let (k, v) = map.iter().next()?;
    let text = value.to_string();
    let member = format!("{}:{}", Value::String(k.clone()), v);
    Some(text.replacen('{', &format!("{{{member},"), 1))
}

/// Text that probes a field's bounds: mostly plausible values, and the
/// classic edges (empty, exactly `max` bytes, `max + 1`, multi-byte
/// characters, controls, Unicode whitespace).
pub fn field_text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9:/._@-]{1,40}",
        1 => Just(String::new()),
        1 => Just("a".repeat(max)),
        1 => Just("a".repeat(max + 1)),
        1 => Just("Ж".repeat(max / 2 + 1)),
        1 => "[a-z]{1,8}[\u{0}-\u{1f}\u{7f}\u{85}][a-z]{0,8}",
        1 => "[a-z]{1,8}[ \u{a0}\u{2028}\u{3000}\t][a-z]{0,8}",
        1 => "\\PC{1,40}",
        1 => any::<String>(),
    ]
}

/// A time RFC 3339 can write (years 1970..=9999), to the second.
pub fn time() -> impl Strategy<Value = time::OffsetDateTime> {
    (0i64..253_402_300_799).prop_map(|s| time::OffsetDateTime::from_unix_timestamp(s).unwrap())
}

/// Text for a field that must be in bounds (a valid identifier).
pub fn token() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9:/._@-]{1,40}"
}
