#![no_main]
// The whole target is lavd's own check of this parser family, shared with the
// property tests and the regression replay.
#[path = "../../daemon/tests/hostile_input/targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::envelope(data));
