//! A client process of the load test (`tests/load.rs`): runs its share of
//! the mixed request stream against a real `lavd serve` and prints what it
//! got as JSON ([`softhsm_tests::load::Tally`]).
//!
//! Usage: `load-client PLAN.json`

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: load-client PLAN.json");
    let plan: softhsm_tests::load::Plan =
        serde_json::from_slice(&std::fs::read(&path).expect("read plan")).expect("plan JSON");
    let tally = softhsm_tests::load::run(&plan);
    println!("{}", serde_json::to_string(&tally).expect("tally JSON"));
}
