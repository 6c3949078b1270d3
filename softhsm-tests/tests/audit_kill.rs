//! Crash safety of the audit log: a process appending from several threads
//! is killed with SIGKILL at a random moment, 20 times. After each kill, the
//! log (exported and verified by the real `lavd audit` commands) verifies,
//! and every batch the writer was told was durable is in it, at the index it
//! was told, with that sequence number.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use softhsm_tests::{assert_ok, harness, TestToken};

#[test]
fn sigkill_during_concurrent_appends_loses_nothing_reported_durable() {
    let t = TestToken::new();
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    let vkey = assert_ok(&t.lavd_with_config(&["audit", "key"]));
    let vkey = vkey.trim();
    let writer = softhsm_tests::package_binary("audit-writer");
    let mut durable: Vec<(u64, u64)> = Vec::new();
    let mut previous_checkpoint: Option<std::path::PathBuf> = None;
    for round in 0..20u64 {
        let mut child = Command::new(&writer)
            .arg(t.config())
            .arg("4")
            .env("SOFTHSM2_CONF", harness().conf())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Kill after a varying number of durable reports (10..=57).
        let stop_after = 10 + (round * 7919 % 48) as usize;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // A writer that stalls is killed, which ends the read below.
        let watchdog = softhsm_tests::kill_after(&child, std::time::Duration::from_secs(60));
        for _ in 0..stop_after {
            let line = lines.next().expect("writer died early").unwrap();
            let mut parts = line.split(' ');
            assert_eq!(parts.next(), Some("durable"));
            let first: u64 = parts.next().unwrap().parse().unwrap();
            let count: u64 = parts.next().unwrap().parse().unwrap();
            durable.push((first, count));
        }
        drop(watchdog);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Lines the writer printed before dying were reported durable too.
        for line in lines.map_while(Result::ok) {
            let mut parts = line.split(' ').skip(1);
            let first: u64 = parts.next().unwrap().parse().unwrap();
            let count: u64 = parts.next().unwrap().parse().unwrap();
            durable.push((first, count));
        }

        // Restart: export with the real binary and verify offline.
        let export = t.path(&format!("export-{round}.json"));
        let checkpoint = t.path(&format!("checkpoint-{round}"));
        assert_ok(&t.lavd_with_config(&["audit", "export", "--out", export.to_str().unwrap()]));
        let mut verify = vec![
            "audit",
            "verify",
            "--key",
            vkey,
            "--export",
            export.to_str().unwrap(),
            "--save-checkpoint",
            checkpoint.to_str().unwrap(),
        ];
        let previous = previous_checkpoint.clone();
        if let Some(p) = previous.as_ref() {
            verify.push("--checkpoint");
            verify.push(p.to_str().unwrap());
        }
        let summary = assert_ok(&t.lavd(&verify));
        assert!(summary.contains("verdict: the log verifies"), "{summary}");
        previous_checkpoint = Some(checkpoint);

        // Every durable batch is there, where it was reported.
        let parsed: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&export).unwrap()).unwrap();
        let entries = parsed["entries"].as_array().unwrap();
        for (first, count) in &durable {
            for i in *first..first + count {
                let entry = &entries[i as usize];
                assert_eq!(entry["index"], i);
                let leaf = lavd::codec::b64_decode(entry["leaf"].as_str().unwrap()).unwrap();
                let leaf: serde_json::Value = serde_json::from_slice(&leaf).unwrap();
                assert_eq!(leaf["seq"], i);
                assert_eq!(leaf["event"], "key_generated");
            }
        }
    }
    assert!(durable.len() >= 20 * 10);
}
