//! Follows the L1 serial console: the `NESTED-*` markers printed by `/init` and libtest's
//! `test result:` lines, into per-binary and total counts; and the `linux-report` run's JSON
//! metric lines (`{"metric": ...}`) and notes.

use std::time::Duration;

/// Counts from libtest `test result:` lines (in [`Report::totals`], `flaky` counts tests
/// that failed once and passed when run again).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    pub filtered_out: u64,
    pub flaky: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.filtered_out += other.filtered_out;
        self.flaky += other.flaky;
    }
}

/// One test binary's run in L1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryRun {
    pub name: String,
    pub counts: Counts,
    /// Whether a `test result:` line was seen.
    pub reported: bool,
    /// The exit status, once `NESTED-TEST-END` was seen.
    pub exit_code: Option<i32>,
    /// Host-side time between its BEGIN and END markers.
    pub elapsed: Option<Duration>,
    /// The second run of the tests that failed, if `/init` made one.
    pub retry: Option<Retry>,
    /// Tests libtest reported passed (`test NAME ... ok`) and failed (`... FAILED`) in the
    /// main run, as far as their lines could be read (a kernel message can split one).
    pub passed_tests: Vec<String>,
    pub failed_tests: Vec<String>,
    /// Tests libtest said had been running for over 60 seconds.
    pub slow_tests: Vec<String>,
    /// What earlier L1 runs, which broke down while this binary ran, learned of its tests
    /// (see [`BinaryRun::fold_earlier`]).
    pub earlier: Option<Earlier>,
}

/// The tests of one binary that earlier L1 runs saw end before the L1 broke down in the
/// middle of the binary. A later L1 run skips the passed and recovered ones (`/init` gets
/// them in `/nested/resume.list`) and runs the failed ones again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Earlier {
    /// Passed (and never failed).
    pub passed: Vec<String>,
    /// Failed, and not seen passing since.
    pub failed: Vec<String>,
    /// Failed in one earlier run and passed in a later one: flaky.
    pub recovered: Vec<String>,
}

impl Earlier {
    /// Adds what one more broken L1 run saw of the binary. A test that had been running for
    /// over a minute and never ended there counts as failed: it may be what broke L1 (a hang
    /// that silenced it), so passing later makes it flaky, not passed.
    pub fn add(&mut self, run: &BinaryRun) {
        let unended = run
            .slow_tests
            .iter()
            .filter(|t| !run.passed_tests.contains(t) && !run.failed_tests.contains(t));
        for test in run.failed_tests.iter().chain(unended) {
            if !self.failed.contains(test) {
                self.failed.push(test.clone());
            }
        }
        for test in &run.passed_tests {
            if let Some(at) = self.failed.iter().position(|t| t == test) {
                self.failed.remove(at);
                self.recovered.push(test.clone());
            } else if !self.passed.contains(test) && !self.recovered.contains(test) {
                self.passed.push(test.clone());
            }
        }
    }

    /// The tests a later run skips.
    pub fn skipped(&self) -> impl Iterator<Item = &String> {
        self.passed.iter().chain(&self.recovered)
    }
}

/// A second run of a binary's failed tests (`NESTED-RETRY-BEGIN`/`-END`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// The tests run again.
    pub tests: Vec<String>,
    pub counts: Counts,
    pub reported: bool,
    pub exit_code: Option<i32>,
}

impl Retry {
    /// Whether the second run finished and reported its tests.
    fn finished(&self) -> bool {
        self.exit_code.is_some() && self.reported
    }
}

impl BinaryRun {
    /// Whether the binary (and its retry, if it had one) ran to its end marker.
    pub fn finished(&self) -> bool {
        self.exit_code.is_some() && self.retry.as_ref().is_none_or(|r| r.exit_code.is_some())
    }

    /// Failed tests; a binary that exits non-zero or dies without a `test result:` line
    /// counts as one failure even when no test reported failing. Tests that passed when
    /// run again are [`BinaryRun::flaky`], not failed.
    pub fn failures(&self) -> u64 {
        if let Some(retry) = self.retry.as_ref().filter(|r| r.finished()) {
            return match retry.exit_code {
                Some(0) => retry.counts.failed,
                _ => retry.counts.failed.max(1),
            };
        }
        let broken = match self.exit_code {
            Some(0) => !self.reported,
            Some(_) => true,
            None => true,
        };
        if broken {
            self.counts.failed.max(1)
        } else {
            self.counts.failed
        }
    }

    /// Tests that failed and then passed when run again, alone, or in a later L1 run.
    pub fn flaky(&self) -> u64 {
        let retried = match &self.retry {
            Some(retry) if retry.finished() => retry.counts.passed,
            _ => 0,
        };
        retried + self.earlier_flaky()
    }

    /// Tests that failed in an earlier, broken L1 run and passed since.
    fn earlier_flaky(&self) -> u64 {
        let Some(earlier) = &self.earlier else {
            return 0;
        };
        let all_passed = self.exit_code == Some(0) && self.reported;
        let now = earlier
            .failed
            .iter()
            .filter(|t| all_passed || self.passed_tests.contains(t))
            .count();
        (earlier.recovered.len() + now) as u64
    }

    /// Counts, in this run's figures, the tests earlier broken L1 runs saw: those they saw
    /// pass were skipped here (libtest counted them as filtered out) and count as passed;
    /// those that failed there and passed here (or passed in between) count as flaky.
    pub fn fold_earlier(&mut self, earlier: Earlier) {
        let passed = earlier.passed.len() as u64;
        let recovered = earlier.recovered.len() as u64;
        self.counts.filtered_out = self.counts.filtered_out.saturating_sub(passed + recovered);
        self.earlier = Some(earlier);
        // Failed earlier and passed in this run: flaky, not passed.
        let recovered_here = self.earlier_flaky() - recovered;
        self.counts.passed = (self.counts.passed + passed).saturating_sub(recovered_here);
    }
}

/// What the serial console told so far.
#[derive(Debug, Default)]
pub struct Report {
    /// Since QEMU started: `/init` running.
    pub init_at: Option<Duration>,
    /// Since QEMU started: KVM modules loaded and /dev/kvm present.
    pub kvm_ready_at: Option<Duration>,
    pub kernel: Option<String>,
    /// The `host KVM:` line of the host report (`engine.host().virtualization`).
    pub host_kvm: Option<String>,
    pub errors: Vec<String>,
    pub binaries: Vec<BinaryRun>,
    current_started: Option<Duration>,
    /// `/init`'s overall code from `NESTED-DONE rc=N`.
    pub done: Option<i32>,
    /// `linux-report` (`--linux-report`): started, its exit status, its JSON lines, and its
    /// `linux-report: ...` lines that say what was not measured or why.
    pub linux_report: LinuxReport,
    /// Why tests failed: each `thread 'TEST' panicked at ...` with its message's first line,
    /// so the summary (the end of the output, all a CI log may keep) says it.
    pub panics: Vec<Panic>,
    /// A panic whose message line has not been seen yet.
    panic_pending: Option<Panic>,
}

/// One test's panic, as libtest printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Panic {
    /// The test binary (`NESTED-TEST-BEGIN` name).
    pub binary: String,
    pub test: String,
    /// Whether it came from the binary's second run (`NESTED-RETRY-*`).
    pub retry: bool,
    /// `FILE:LINE:COL`.
    pub location: String,
    /// The message's first line, at most [`PANIC_MESSAGE_LIMIT`] characters.
    pub message: String,
}

/// How much of a panic message the summary repeats.
pub const PANIC_MESSAGE_LIMIT: usize = 700;

/// What the console told of the `linux-report` run.
#[derive(Debug, Default)]
pub struct LinuxReport {
    pub started: bool,
    pub exit_code: Option<i32>,
    pub elapsed: Option<Duration>,
    started_at: Option<Duration>,
    /// `{"metric": ...}` lines, verbatim.
    pub metrics: Vec<String>,
    /// `linux-report: SKIPPED ...`, `linux-report: X not measured: ...` (a peer, a metric),
    /// `linux-report: METRIC: a sample failed: ...`, a boot tried once more,
    /// `linux-report: target: ...` and `linux-report: note: ...`.
    pub notes: Vec<String>,
}

impl Report {
    /// Takes one console line (without its line ending) seen `at` after QEMU started.
    pub fn line(&mut self, line: &str, at: Duration) {
        // A marker may follow output that did not end its line (firmware, a test binary).
        let line = line.trim_end();
        let line = [
            "NESTED-",
            "host KVM: ",
            "test result: ",
            "{\"metric\"",
            "linux-report: ",
        ]
        .iter()
        .filter_map(|m| line.find(m))
        .min()
        .map_or(line, |at| &line[at..]);
        if self.take_panic_line(line) {
            return;
        }
        if let Some(rest) = line.strip_prefix("NESTED-INIT ") {
            self.init_at = Some(at);
            self.kernel = Some(rest.to_string());
        } else if line.starts_with("NESTED-KVM-READY") {
            self.kvm_ready_at = Some(at);
        } else if let Some(rest) = line.strip_prefix("NESTED-ERROR ") {
            self.errors.push(rest.to_string());
        } else if let Some(rest) = line.strip_prefix("host KVM: ") {
            self.host_kvm = Some(rest.to_string());
        } else if let Some(name) = line.strip_prefix("NESTED-TEST-BEGIN ") {
            self.binaries.push(BinaryRun {
                name: name.to_string(),
                counts: Counts::default(),
                reported: false,
                exit_code: None,
                elapsed: None,
                retry: None,
                passed_tests: Vec::new(),
                failed_tests: Vec::new(),
                slow_tests: Vec::new(),
                earlier: None,
            });
            self.current_started = Some(at);
        } else if let Some(rest) = line.strip_prefix("NESTED-TEST-END ") {
            let code = rest
                .rsplit_once("rc=")
                .and_then(|(_, rc)| rc.trim().parse().ok())
                .unwrap_or(-1);
            let started = self.current_started.take();
            if let Some(run) = self.binaries.last_mut() {
                run.exit_code = Some(code);
                run.elapsed = started.map(|s| at.saturating_sub(s));
            }
        } else if let Some(rest) = line.strip_prefix("NESTED-RETRY-BEGIN ") {
            if let Some(run) = self.binaries.last_mut() {
                run.retry = Some(Retry {
                    tests: rest.split_whitespace().skip(1).map(String::from).collect(),
                    counts: Counts::default(),
                    reported: false,
                    exit_code: None,
                });
            }
        } else if let Some(rest) = line.strip_prefix("NESTED-RETRY-END ") {
            let code = rest
                .rsplit_once("rc=")
                .and_then(|(_, rc)| rc.trim().parse().ok())
                .unwrap_or(-1);
            if let Some(retry) = self.binaries.last_mut().and_then(|b| b.retry.as_mut()) {
                retry.exit_code = Some(code);
            }
        } else if line == "NESTED-REPORT-BEGIN" {
            self.linux_report.started = true;
            self.linux_report.started_at = Some(at);
        } else if let Some(rest) = line.strip_prefix("NESTED-REPORT-END rc=") {
            let r = &mut self.linux_report;
            r.exit_code = Some(rest.trim().parse().unwrap_or(-1));
            r.elapsed = r.started_at.map(|s| at.saturating_sub(s));
        } else if line.starts_with("{\"metric\"") {
            if self.linux_report.started && self.linux_report.exit_code.is_none() {
                self.linux_report.metrics.push(line.to_string());
            }
        } else if line.starts_with("linux-report: SKIPPED")
            || line.starts_with("linux-report: target: ")
            || line.starts_with("linux-report: note: ")
            || (line.starts_with("linux-report: ")
                && (line.contains(" not measured: ")
                    || line.contains(": a sample failed: ")
                    || line.contains("once more")))
        {
            if self.linux_report.started && self.linux_report.exit_code.is_none() {
                self.linux_report.notes.push(line.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("NESTED-DONE rc=") {
            self.done = Some(rest.trim().parse().unwrap_or(-1));
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" has been running for over 60 seconds"))
        {
            if let Some(run) = self.main_run_in_progress() {
                run.slow_tests.push(name.to_string());
            }
        } else if let Some((name, passed)) = parse_test_outcome(line) {
            if let Some(run) = self.main_run_in_progress() {
                if passed {
                    run.passed_tests.push(name.to_string());
                } else {
                    run.failed_tests.push(name.to_string());
                }
            }
        } else if let Some(counts) = parse_test_result(line) {
            if let Some(run) = self.binaries.last_mut() {
                if run.exit_code.is_none() {
                    run.counts.add(counts);
                    run.reported = true;
                } else if let Some(retry) = run.retry.as_mut().filter(|r| r.exit_code.is_none()) {
                    retry.counts.add(counts);
                    retry.reported = true;
                }
            }
        }
    }

    /// Follows libtest's `thread 'TEST' (TID) panicked at FILE:LINE:COL:` and the message
    /// line after it (kernel messages between them are passed over); true when `line` was
    /// the message.
    fn take_panic_line(&mut self, line: &str) -> bool {
        if let Some(mut panic) = self.panic_pending.take() {
            let kernel_message = line.starts_with('[') && line.contains("] ");
            if line.is_empty() || kernel_message {
                self.panic_pending = Some(panic);
                return false;
            }
            panic.message = line.chars().take(PANIC_MESSAGE_LIMIT).collect();
            self.panics.push(panic);
            return true;
        }
        let Some((test, location)) = parse_panic(line) else {
            return false;
        };
        let (binary, retry) = match self.binaries.last() {
            Some(run) => (
                run.name.clone(),
                run.retry.as_ref().is_some_and(|r| r.exit_code.is_none()),
            ),
            None => (String::new(), false),
        };
        self.panic_pending = Some(Panic {
            binary,
            test: test.to_string(),
            retry,
            location: location.to_string(),
            message: String::new(),
        });
        false
    }

    /// The panics of tests that failed (once or for good), not those a passing test
    /// provoked on purpose. A test's helper threads are unnamed (`<unnamed>`): theirs count
    /// in a binary that had failures.
    pub fn failure_panics(&self) -> impl Iterator<Item = &Panic> {
        self.panics.iter().filter(|p| {
            self.binaries
                .iter()
                .filter(|b| b.name == p.binary)
                .any(|b| {
                    let test = p.test.as_str();
                    let named = b.failed_tests.iter().any(|t| t == test)
                        || b.retry
                            .as_ref()
                            .is_some_and(|r| r.tests.iter().any(|t| t == test))
                        || b.earlier.as_ref().is_some_and(|e| {
                            e.failed.iter().chain(&e.recovered).any(|t| t == test)
                        });
                    named || (test == "<unnamed>" && (b.failures() > 0 || b.flaky() > 0))
                })
        })
    }

    /// The binary whose main run (not its retry) is under way.
    fn main_run_in_progress(&mut self) -> Option<&mut BinaryRun> {
        self.binaries
            .last_mut()
            .filter(|r| r.exit_code.is_none() && r.retry.is_none())
    }

    /// Totals over every binary.
    pub fn totals(&self) -> Counts {
        let mut total = Counts::default();
        for run in &self.binaries {
            total.passed += run.counts.passed;
            total.failed += run.failures();
            total.ignored += run.counts.ignored;
            total.filtered_out += run.counts.filtered_out;
            total.flaky += run.flaky();
        }
        total
    }

    /// Time from the first test binary's start to the last one's end.
    pub fn tests_elapsed(&self) -> Duration {
        self.binaries.iter().filter_map(|b| b.elapsed).sum()
    }
}

/// Parses `thread 'TEST' (TID) panicked at FILE:LINE:COL:` (older toolchains print no
/// TID) into the test and the location.
pub fn parse_panic(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("thread '")?;
    let (test, rest) = rest.split_once('\'')?;
    let (_, location) = rest.split_once(" panicked at ")?;
    Some((test, location.trim_end_matches(':')))
}

/// Parses libtest's `test NAME ... ok` (true) or `test NAME ... FAILED` (false).
pub fn parse_test_outcome(line: &str) -> Option<(&str, bool)> {
    let rest = line.strip_prefix("test ")?;
    if let Some(name) = rest.strip_suffix(" ... ok") {
        Some((name, true))
    } else {
        rest.strip_suffix(" ... FAILED").map(|name| (name, false))
    }
    .filter(|(name, _)| !name.is_empty() && !name.contains(char::is_whitespace))
}

/// Parses `test result: ok. 3 passed; 1 failed; 2 ignored; 0 measured; 5 filtered out; …`.
pub fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = line.trim_start().strip_prefix("test result: ")?;
    let (_, rest) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    for part in rest.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else {
            continue;
        };
        match what {
            "passed" => counts.passed = n,
            "failed" => counts.failed = n,
            "ignored" => counts.ignored = n,
            "filtered" => counts.filtered_out = n,
            _ => {}
        }
    }
    Some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A report of `lines`, all seen at the same second.
    fn report_of(lines: &[&str]) -> Report {
        let mut r = Report::default();
        for line in lines {
            r.line(line, at(1));
        }
        r
    }

    #[test]
    fn panics_are_kept_with_their_message_from_main_runs_and_retries() {
        let r = report_of(&[
            "NESTED-TEST-BEGIN capsule.fork",
            "---- forks::linux stdout ----",
            "",
            "thread 'forks::linux' (861) panicked at engine/tests/common/kinds.rs:131:33:",
            "[  170.05] kvm [967]: vcpu0, guest rIP: 0xffffffff81073744 Unhandled WRMSR",
            "md5sum /tmp/m: capsule cl-3q8r is stopped: cannot run a command",
            "stack backtrace:",
            "NESTED-TEST-END capsule.fork rc=101",
            "NESTED-RETRY-BEGIN capsule.fork forks::linux",
            "thread 'forks::linux' panicked at engine/tests/fork.rs:9:5:",
            "again",
            "NESTED-RETRY-END capsule.fork rc=101",
        ]);
        assert_eq!(
            r.panics,
            [
                Panic {
                    binary: "capsule.fork".into(),
                    test: "forks::linux".into(),
                    retry: false,
                    location: "engine/tests/common/kinds.rs:131:33".into(),
                    message: "md5sum /tmp/m: capsule cl-3q8r is stopped: cannot run a command"
                        .into(),
                },
                Panic {
                    binary: "capsule.fork".into(),
                    test: "forks::linux".into(),
                    retry: true,
                    location: "engine/tests/fork.rs:9:5".into(),
                    message: "again".into(),
                },
            ]
        );
        // The message line was taken as such, not as anything else.
        assert_eq!(r.binaries[0].counts, Counts::default());
    }

    #[test]
    fn only_the_panics_of_failed_tests_are_repeated() {
        let r = report_of(&[
            "NESTED-TEST-BEGIN capsule.unit",
            "thread '<unnamed>' (12) panicked at engine/src/guest/vcpu_thread.rs:285:53:",
            "on purpose",
            "test guest::a_panicking_thread_is_reported ... ok",
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "NESTED-TEST-END capsule.unit rc=0",
            "NESTED-TEST-BEGIN capsule.fork",
            "test forks::linux ... FAILED",
            "thread 'forks::linux' (861) panicked at engine/tests/fork.rs:9:5:",
            "boom",
            "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
            "NESTED-TEST-END capsule.fork rc=101",
        ]);
        assert_eq!(r.panics.len(), 2);
        let why: Vec<&str> = r.failure_panics().map(|p| p.test.as_str()).collect();
        assert_eq!(why, ["forks::linux"]);
    }

    #[test]
    fn libtest_lines() {
        let c = parse_test_result(
            "test result: FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 5 filtered out; finished in 1.2s",
        )
        .unwrap();
        assert_eq!(
            c,
            Counts {
                passed: 3,
                failed: 1,
                ignored: 2,
                filtered_out: 5,
                flaky: 0
            }
        );
        assert!(parse_test_result("test foo ... ok").is_none());
    }

    #[test]
    fn a_whole_run() {
        let mut r = Report::default();
        for (line, t) in [
            ("NESTED-INIT kernel 6.1.0, 2 CPUs", 3),
            ("NESTED-KVM-READY svm", 4),
            ("host KVM: hardware virtualization (AMD-V)", 5),
            ("NESTED-TEST-BEGIN capsule.lifecycle", 6),
            ("test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.08s", 9),
            ("NESTED-TEST-END capsule.lifecycle rc=0", 10),
            ("NESTED-TEST-BEGIN capsule.templates", 10),
            ("test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.08s", 12),
            ("NESTED-TEST-END capsule.templates rc=101", 12),
            ("NESTED-TEST-BEGIN capsule.crashes", 12),
            ("NESTED-TEST-END capsule.crashes rc=139", 13),
            ("NESTED-DONE rc=1", 14),
        ] {
            r.line(line, at(t));
        }
        assert_eq!(r.init_at, Some(at(3)));
        assert_eq!(r.kvm_ready_at, Some(at(4)));
        assert_eq!(
            r.host_kvm.as_deref(),
            Some("hardware virtualization (AMD-V)")
        );
        assert_eq!(r.binaries.len(), 3);
        assert_eq!(r.binaries[0].elapsed, Some(at(4)));
        let t = r.totals();
        assert_eq!((t.passed, t.failed, t.ignored), (7, 2, 1));
        assert_eq!(r.done, Some(1));
        assert_eq!(r.tests_elapsed(), at(7));
    }

    #[test]
    fn failed_tests_that_pass_again_are_flaky_and_those_that_fail_again_fail() {
        let mut r = Report::default();
        for (line, t) in [
            ("NESTED-TEST-BEGIN capsule.linux", 1),
            ("test result: FAILED. 8 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 50s", 50),
            ("NESTED-TEST-END capsule.linux rc=101", 50),
            ("NESTED-RETRY-BEGIN capsule.linux several_vcpus", 50),
            ("test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 8 filtered out; finished in 5s", 55),
            ("NESTED-RETRY-END capsule.linux rc=0", 55),
            ("NESTED-TEST-BEGIN capsule.templates", 55),
            ("test result: FAILED. 0 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 5s", 60),
            ("NESTED-TEST-END capsule.templates rc=101", 60),
            ("NESTED-RETRY-BEGIN capsule.templates clones shares", 60),
            ("test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 5s", 65),
            ("NESTED-RETRY-END capsule.templates rc=101", 65),
        ] {
            r.line(line, at(t));
        }
        let linux = &r.binaries[0];
        assert_eq!(
            (linux.counts.passed, linux.failures(), linux.flaky()),
            (8, 0, 1)
        );
        assert_eq!(linux.retry.as_ref().unwrap().tests, ["several_vcpus"]);
        let templates = &r.binaries[1];
        assert_eq!((templates.failures(), templates.flaky()), (1, 1));
        let t = r.totals();
        assert_eq!((t.passed, t.failed, t.flaky), (8, 1, 2));
    }

    #[test]
    fn markers_after_unterminated_output() {
        let mut r = Report::default();
        r.line("Booting from ROM..NESTED-INIT kernel 6.1", at(3));
        r.line("NESTED-TEST-BEGIN x", at(4));
        r.line("partial outputtest result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out", at(5));
        r.line("no newlineNESTED-TEST-END x rc=0", at(6));
        assert_eq!(r.init_at, Some(at(3)));
        assert_eq!(r.kernel.as_deref(), Some("kernel 6.1"));
        assert_eq!(r.totals().passed, 2);
        assert_eq!(r.binaries[0].exit_code, Some(0));
    }

    #[test]
    fn linux_report_lines() {
        let mut r = Report::default();
        r.line(
            r#"{"metric": "stray", "unit": "us", "p50": 1.0, "p99": 1.0, "n": 1}"#,
            at(1),
        );
        r.line("NESTED-REPORT-BEGIN", at(2));
        r.line("linux-report: boot 1: capsule 900 ms", at(3));
        r.line(
            "linux-report: QEMU microvm not measured: cannot run qemu",
            at(3),
        );
        r.line(
            r#"xx{"metric": "linux_boot_to_ready", "unit": "us", "p50": 9.0, "p99": 9.5, "n": 5}"#,
            at(4),
        );
        r.line(
            "linux-report: Firecracker not measured: no Firecracker binary at x",
            at(4),
        );
        r.line(
            "linux-report: linux_pause not measured: unsupported: Linux capsules cannot be paused",
            at(4),
        );
        r.line(
            "linux-report: target: linux_boot_to_marker / firecracker_boot_to_marker = 0.6 (p50), target <= 0.5: MISSED",
            at(5),
        );
        r.line(
            "linux-report: note: QEMU's boot figures include ~3.4 s",
            at(5),
        );
        r.line("linux-report: boot 2: Firecracker marker 4000 ms", at(5));
        r.line(
            "linux-report: linux_resume_to_ready: a sample failed: crashed",
            at(5),
        );
        r.line("NESTED-REPORT-END rc=0", at(6));
        let lr = &r.linux_report;
        assert!(lr.started);
        assert_eq!(lr.exit_code, Some(0));
        assert_eq!(lr.elapsed, Some(at(4)));
        assert_eq!(
            lr.metrics,
            [r#"{"metric": "linux_boot_to_ready", "unit": "us", "p50": 9.0, "p99": 9.5, "n": 5}"#]
        );
        assert_eq!(
            lr.notes,
            [
                "linux-report: QEMU microvm not measured: cannot run qemu",
                "linux-report: Firecracker not measured: no Firecracker binary at x",
                "linux-report: linux_pause not measured: unsupported: Linux capsules cannot be paused",
                "linux-report: target: linux_boot_to_marker / firecracker_boot_to_marker = 0.6 (p50), target <= 0.5: MISSED",
                "linux-report: note: QEMU's boot figures include ~3.4 s",
                "linux-report: linux_resume_to_ready: a sample failed: crashed",
            ]
        );
    }

    #[test]
    fn test_outcome_lines() {
        assert_eq!(parse_test_outcome("test a::b ... ok"), Some(("a::b", true)));
        assert_eq!(parse_test_outcome("test c ... FAILED"), Some(("c", false)));
        assert_eq!(
            parse_test_outcome("test c has been running for over 60 seconds"),
            None
        );
        assert_eq!(parse_test_outcome("test c ... ignored"), None);
        assert_eq!(
            parse_test_outcome("test result: ok. 1 passed; 0 failed"),
            None
        );
    }

    /// One binary over three L1 runs: the first two break down in it.
    #[test]
    fn a_binary_resumed_after_breakdowns_counts_every_test_once() {
        let mut first = Report::default();
        for line in [
            "NESTED-TEST-BEGIN capsule.linux",
            "test a ... ok",
            "test b ... FAILED",
            "test c ... ok",
            "test c has been running for over 60 seconds",
            "test h has been running for over 60 seconds",
        ] {
            first.line(line, at(1));
        }
        let mut earlier = Earlier::default();
        earlier.add(&first.binaries[0]);
        assert_eq!(earlier.skipped().collect::<Vec<_>>(), ["a", "c"]);
        // h was running when L1 broke: maybe what broke it, so it counts as failed there.
        assert_eq!(earlier.failed, ["b", "h"]);

        let mut second = Report::default();
        for line in [
            "NESTED-TEST-BEGIN capsule.linux",
            "test d ... FAILED",
            "test b ... ok",
        ] {
            second.line(line, at(2));
        }
        earlier.add(&second.binaries[0]);
        assert_eq!(
            (earlier.failed.clone(), earlier.recovered.clone()),
            (
                vec!["h".to_string(), "d".to_string()],
                vec!["b".to_string()]
            )
        );

        // The last run skips a, c and b and runs h and d (which pass now) and e.
        let mut last = Report::default();
        for line in [
            "NESTED-TEST-BEGIN capsule.linux",
            "test d ... ok",
            "test h ... ok",
            "test e ... ok",
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out",
            "NESTED-TEST-END capsule.linux rc=0",
        ] {
            last.line(line, at(3));
        }
        let mut run = last.binaries.remove(0);
        run.fold_earlier(earlier);
        // a, c, e passed; b, d and h failed (or hung) once, then passed: flaky.
        assert_eq!(
            (
                run.counts.passed,
                run.failures(),
                run.flaky(),
                run.counts.filtered_out
            ),
            (3, 0, 3, 0)
        );
    }

    #[test]
    fn an_unfinished_binary_is_a_failure() {
        let mut r = Report::default();
        r.line("NESTED-TEST-BEGIN x", at(1));
        r.line(
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            at(2),
        );
        assert_eq!(r.totals().failed, 1);
        r.line("NESTED-TEST-END x rc=0", at(3));
        assert_eq!(r.totals().failed, 0);
    }
}
