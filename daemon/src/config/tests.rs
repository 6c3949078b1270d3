use std::collections::HashMap;
use std::io::Write as _;

use super::*;

struct MapEnv(HashMap<String, String>);
impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

fn load(text: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lavd.toml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    std::fs::write(dir.path().join("pin"), "1234\n").unwrap();
    let env = MapEnv(
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    Settings::load(&path, &env)
}

const GOOD: &str = r#"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "lavd"
pin_file = "pin"
[store]
path = "lavd.db"
"#;

#[test]
fn a_good_config_resolves_relative_paths() {
    let s = load(GOOD, &[]).unwrap();
    assert_eq!(s.hsm.token, TokenSelector::Label("lavd".into()));
    assert_eq!(s.hsm.sessions, 4);
    assert!(s.store_path.ends_with("lavd.db") && s.store_path.is_absolute());
    assert_eq!(s.audit.key_label, "lav-audit");
}

#[test]
fn pin_from_env() {
    let text = GOOD.replace("pin_file = \"pin\"", "pin_env = \"LAVD_PIN\"");
    assert!(load(&text, &[("LAVD_PIN", "1234")]).is_ok());
    let e = load(&text, &[]).unwrap_err();
    assert_eq!(e.field, "hsm.pin_env");
    assert!(e.reason.contains("LAVD_PIN"));
}

#[test]
fn refusals_name_the_field() {
    let cases: &[(&str, &str)] = &[
        ("token_label = \"lavd\"", "slot = 0"),
        ("pin_file = \"pin\"", "pin = \"1234\""),
        (
            "token_label = \"lavd\"",
            "token_label = \"lavd\"\ntoken_serial = \"x\"",
        ),
        ("pin_file = \"pin\"", "pin_file = \"missing\""),
        (
            "token_label = \"lavd\"",
            "token_label = \"lavd\"\nsessions = 0",
        ),
    ];
    let fields = [
        "hsm.slot",
        "hsm.pin",
        "hsm.token_label",
        "hsm.pin_file",
        "hsm.sessions",
    ];
    for ((from, to), field) in cases.iter().zip(fields) {
        let e = load(&GOOD.replace(from, to), &[]).unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert!(e.to_string().contains("lavd.toml"), "{e}");
    }
}

#[test]
fn unknown_fields_are_refused_with_their_place() {
    let e = load(&format!("{GOOD}\nbogus = 1\n"), &[]).unwrap_err();
    assert!(e.reason.contains("bogus"), "{e}");
    assert!(e.field.contains("[store]"), "{e}");
}
