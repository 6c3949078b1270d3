//! Every sample in `hsm-config/` parses and validates; the SoftHSM one opens
//! a real token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lavd::config::{Env, RawConfig, Settings};
use lavd::hsm::Hsm;
use softhsm_tests::{harness, PIN};

struct MapEnv(HashMap<&'static str, String>);
impl Env for MapEnv {
    fn var(&self, name: &str) -> Result<String, std::env::VarError> {
        self.0
            .get(name)
            .cloned()
            .ok_or(std::env::VarError::NotPresent)
    }
}

fn samples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hsm-config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// The production samples read the PIN from the systemd credential; here
/// from a file of the test's own, at the same place in the text.
const CREDENTIAL: &str = "/run/credentials/lavd.service/hsm-pin";

fn load(path: &Path) -> Settings {
    // Written once per process: the tests run at once, and a file written
    // again by one could be read empty by another.
    static PIN_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let pin = PIN_FILE.get_or_init(|| {
        let pin = harness().conf().with_file_name("sample-pin");
        std::fs::write(&pin, format!("{PIN}\n")).unwrap();
        softhsm_tests::restrict(&pin);
        pin
    });
    let text = std::fs::read_to_string(path)
        .unwrap()
        .replace(CREDENTIAL, pin.to_str().unwrap());
    let raw = RawConfig::parse(&text)
        .unwrap_or_else(|(field, reason)| panic!("{}: {field}: {reason}", path.display()));
    let env = MapEnv(HashMap::from([("LAVD_HSM_PIN", PIN.to_string())]));
    Settings::from_raw(raw, path, &env).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_sample_parses_and_validates() {
    let files = samples();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "aws-cloudhsm.toml",
            "softhsm2.toml",
            "thales-luna.toml",
            "yubihsm2.toml"
        ]
    );
    for file in files {
        // Only the SoftHSM (development) sample reads the PIN from the
        // environment; the others from the service's credential.
        let text = std::fs::read_to_string(&file).unwrap();
        let softhsm = file.ends_with("softhsm2.toml");
        assert_eq!(text.contains("pin_env"), softhsm, "{}", file.display());
        assert_eq!(text.contains(CREDENTIAL), !softhsm, "{}", file.display());
        let settings = load(&file);
        assert!(settings.hsm.module.is_absolute(), "{}", file.display());
        assert!((1..=256).contains(&settings.hsm.sessions));
    }
}

#[test]
fn the_softhsm_sample_opens_a_real_token() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    // The harness creates a token labelled `lavd`, as the sample expects.
    harness();
    let mut settings =
        load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../hsm-config/softhsm2.toml"));
    settings.hsm.module = softhsm_tests::module_path();
    let hsm = Hsm::open(settings.hsm).unwrap();
    assert!(hsm.is_ready());
}

/// The commented witness block of the SoftHSM sample, uncommented, with
/// `witnesses.policy` beside it, validates: two witnesses whose keys the
/// policy names, and its quorum.
#[test]
fn the_samples_witness_block_validates_with_its_policy() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hsm-config");
    let text = std::fs::read_to_string(dir.join("softhsm2.toml")).unwrap();
    let begin = text.find("# witnesses:begin\n").expect("begin marker");
    let end = text.find("# witnesses:end\n").expect("end marker");
    let block: String = text[begin..end]
        .lines()
        .skip(1)
        .map(|l| l.strip_prefix("# ").or(l.strip_prefix("#")).unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("witness-ca.pem");
    // A real certificate: the witness CA file is read at load.
    let cert = rcgen::generate_simple_self_signed(vec!["witness.oversight.example".into()])
        .unwrap()
        .cert
        .pem();
    std::fs::write(&ca, cert).unwrap();
    let config = format!("{}{block}\n{}", &text[..begin], &text[end..])
        .replace("/etc/lavd/witness-ca.pem", ca.to_str().unwrap());
    std::fs::copy(
        dir.join("witnesses.policy"),
        tmp.path().join("witnesses.policy"),
    )
    .unwrap();
    let path = tmp.path().join("lavd.toml");
    std::fs::write(&path, config).unwrap();
    let settings = load(&path);
    let w = settings.audit.witnesses.expect("witness settings");
    let names: Vec<&str> = w.witnesses.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(
        names,
        ["witness.oversight.example/w1", "witness.ngo.example/w2"]
    );
    assert_eq!(w.witnesses[1].url, "https://witness.ngo.example/lavd");
    assert!(!w.release_after_witness);
    assert_eq!(w.timeout.as_secs(), 10);
    // Both are needed: one alone is not the quorum.
    assert!(w
        .policy
        .quorum_met_by([&w.witnesses[0].key, &w.witnesses[1].key]));
    assert!(!w.policy.quorum_met_by([&w.witnesses[0].key]));
}

/// The witness sample parses and validates as `lavd witness serve` reads
/// it, and `dev`-only key files are refused in it.
#[test]
fn the_witness_sample_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hsm-config/witness/softhsm2.toml");
    let env = MapEnv(HashMap::from([("LAVD_WITNESS_PIN", PIN.to_string())]));
    let settings =
        lavd::config::WitnessSettings::load(&path, &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(settings.name, "witness.oversight.example/w1");
    assert_eq!(settings.logs.len(), 1);
    assert!(settings.require_tls().is_ok());
    assert!(matches!(
        settings.key,
        lavd::config::WitnessKeySource::Hsm { ref label, .. } if label == "lav-witness"
    ));
}

/// The `lavd.toml` block of a Kubernetes manifest, as the pod reads it.
fn manifest_config(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text
        .lines()
        .skip_while(|l| l.trim_end() != "  lavd.toml: |");
    assert!(lines.next().is_some(), "{name}: no lavd.toml block");
    lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The config in each Kubernetes manifest, loaded by lavd's own parser:
/// as shipped it is refused naming the authority key still to be
/// replaced (the manifest says so); with real authority keys, and its
/// secret files where the pod mounts them made here, it validates.
#[test]
fn the_kubernetes_configs_load_once_their_placeholders_are_replaced() {
    use lavd::warrant::{Algorithm, AuthorityKey};
    let jwk = |kid: &str| {
        let key = AuthorityKey::generate(Algorithm::Es256, kid).unwrap();
        serde_json::to_string(&key.public_jwk().unwrap()).unwrap()
    };
    for (manifest, postgres) in [("lavd.yaml", false), ("lavd-replicated.yaml", true)] {
        let text = manifest_config(manifest);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("lavd.toml");
        let env = MapEnv(HashMap::new());

        let (field, reason) = RawConfig::parse(&text).expect_err("placeholders refused");
        assert!(
            field == "authorities.jwk"
                && reason.contains("JWK")
                && reason.contains("(at [[authorities]] line "),
            "{manifest}: {field}: {reason}"
        );

        // The files the pod mounts, here.
        let at = |p: &str| tmp.path().join(p.trim_start_matches('/'));
        let mut text = text
            .replacen(
                "'REPLACE with the executive authority public JWK'",
                &format!("'{}'", jwk("home-office-1")),
                1,
            )
            .replacen(
                "'REPLACE with the judicial authority public JWK'",
                &format!("'{}'", jwk("ipc-judicial-1")),
                1,
            );
        let mut files = vec!["/run/secrets/lavd/hsm/pin"];
        if postgres {
            files.extend(["/etc/lavd/db/password", "/etc/lavd/db/ca.pem"]);
            text = text.replace("REPLACE-db-primary", "db-primary");
        }
        assert!(
            !text
                .lines()
                .any(|l| !l.starts_with('#') && l.contains("REPLACE")),
            "{manifest}: a placeholder left"
        );
        for file in files {
            let local = at(file);
            std::fs::create_dir_all(local.parent().unwrap()).unwrap();
            let content = if file.ends_with(".pem") {
                rcgen::generate_simple_self_signed(vec!["db".into()])
                    .unwrap()
                    .cert
                    .pem()
            } else {
                "secret\n".to_string()
            };
            std::fs::write(&local, content).unwrap();
            std::fs::set_permissions(&local, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            text = text.replace(file, local.to_str().unwrap());
        }
        std::fs::write(&path, &text).unwrap();
        let raw = RawConfig::parse(&text).unwrap();
        let settings =
            Settings::from_raw(raw, &path, &env).unwrap_or_else(|e| panic!("{manifest}: {e}"));
        assert_eq!(settings.hsm.sessions, 8, "{manifest}");
        // A pod's restarts must not spend the token's PIN tries.
        let record = settings.refused_pin_record.expect("refused_pin_record");
        assert_eq!(
            record.record,
            Path::new("/run/lavd/pin-refused"),
            "{manifest}"
        );
    }
}

/// The TOML examples in docs/configuration.md (STYLE: examples are tested):
/// each block, with the `[hsm]` and `[store]` every config needs added
/// where it has none, is read by lavd's own parser, so a key renamed or
/// removed in the code shows here. Values standing for an operator's own
/// (the witness's key, shown cut with `…`) are put in whole first.
#[test]
fn the_configuration_pages_examples_parse() {
    let page = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
    )
    .unwrap();
    let mut blocks = Vec::new();
    let mut rest = page.as_str();
    while let Some(start) = rest.find("```toml\n") {
        let body = &rest[start + "```toml\n".len()..];
        let end = body.find("```").expect("a closed block");
        blocks.push(body[..end].to_string());
        rest = &body[end..];
    }
    assert!(blocks.len() >= 4, "{} blocks", blocks.len());
    let vkey = {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        lavd::audit::witness::CosignerKey::new(
            "witness.oversight.example/w1",
            sk.verifying_key().as_bytes(),
        )
        .unwrap()
        .to_string()
    };
    for block in blocks {
        let block = block.replace(
            "\"witness.oversight.example/w1+eac6caa8+BGFQ…\"",
            &format!("\"{vkey}\""),
        );
        let mut text = String::new();
        if !block.contains("[hsm]") {
            text.push_str(
                "[hsm]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"t\"\npin_file = \"pin\"\n",
            );
        }
        if !block.contains("[store]") {
            text.push_str("[store]\npath = \"lavd.db\"\n");
        }
        text.push_str(&block);
        if let Err((field, reason)) = RawConfig::parse(&text) {
            panic!("docs/configuration.md's example does not parse: {field}: {reason}\n{block}");
        }
    }
}
