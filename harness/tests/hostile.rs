//! The guest is untrusted: a hostile guest (tests/common/hostile.rs, built here in
//! milliseconds) says what it likes through the real `hvbench run --backend kvm`, and the
//! host must end the run, record what happened, and keep the terminal and its memory safe.

mod common;

use std::time::Duration;

use common::hostile::{run_hostile, Lines, Script};

/// A run that should finish long before this is a hang.
const BOUND: Duration = Duration::from_secs(60);

#[test]
fn the_fixture_reports_like_a_real_guest() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let guest = Lines::new()
        .hello()
        .measured("cpu.idle", 5)
        .end("success")
        .bytes();
    let run = run_hostile(&Script::once(guest), &["-w", "cpu.idle"], BOUND);
    assert_eq!(run.code(), Some(0), "{}", run.stderr_text());
    let idle = run.of("cpu.idle");
    assert_eq!(idle.len(), 1, "{:?}", run.records);
    assert_eq!(idle[0]["status"], "success", "{:?}", idle[0]);
    assert_eq!(idle[0]["samples"].as_array().map(Vec::len), Some(5));
}
