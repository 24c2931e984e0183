//! Builds what runs inside L1: the workspace's test binaries and the host report example,
//! statically for x86_64-unknown-linux-musl, and the tiny `nested-exit` helper.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::setup::MUSL_TARGET;
use crate::util::{describe, run, Context, Error, Result};

/// A test executable to run in L1 under `name` (`<package>.<target>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    pub name: String,
    pub path: PathBuf,
}

/// `cargo test --no-run --release --target musl -p PACKAGE...`: every test executable of the
/// packages (unit tests of libraries and binaries, and integration tests).
pub fn build_tests(workspace: &Path, packages: &[String]) -> Result<Vec<TestBinary>> {
    let mut cmd = cargo(workspace);
    cmd.args(["test", "--no-run", "--release", "--target", MUSL_TARGET]);
    for package in packages {
        cmd.args(["-p", package]);
    }
    let artifacts = artifacts(&mut cmd)?;
    let mut tests: Vec<TestBinary> = artifacts
        .iter()
        .filter(|a| a.test)
        .map(|a| TestBinary {
            name: match a.kind.as_str() {
                "lib" | "rlib" | "proc-macro" => format!("{}.unit", a.package),
                "bin" => format!("{}.bin-{}", a.package, a.target),
                _ => format!("{}.{}", a.package, a.target),
            },
            path: a.executable.clone(),
        })
        .collect();
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    tests.dedup_by(|a, b| a.name == b.name);
    if tests.is_empty() {
        return Err(Error::msg(format!(
            "`{}` produced no test executable",
            describe(&cmd)
        )));
    }
    Ok(tests)
}

/// `cargo build --release --target musl -p PACKAGE --example EXAMPLE`; returns its path.
pub fn build_example(workspace: &Path, package: &str, example: &str) -> Result<PathBuf> {
    let mut cmd = cargo(workspace);
    cmd.args(["build", "--release", "--target", MUSL_TARGET])
        .args(["-p", package, "--example", example]);
    artifacts(&mut cmd)?
        .into_iter()
        .find(|a| a.kind == "example" && a.target == example)
        .map(|a| a.executable)
        .context(|| format!("`{}` produced no executable", describe(&cmd)))
}

/// Builds binary `bin` of `package` for musl (static), in release mode.
pub fn build_binary(workspace: &Path, package: &str, bin: &str) -> Result<PathBuf> {
    let mut cmd = cargo(workspace);
    cmd.args(["build", "--release", "--target", MUSL_TARGET])
        .args(["-p", package, "--bin", bin]);
    artifacts(&mut cmd)?
        .into_iter()
        .find(|a| a.kind == "bin" && a.target == bin)
        .map(|a| a.executable)
        .context(|| format!("`{}` produced no executable", describe(&cmd)))
}

/// Compiles `xtask/l1/exit.rs` with plain rustc into `out` (static musl executable).
pub fn build_exit_helper(source: &Path, out: &Path) -> Result<PathBuf> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let binary = out.join("nested-exit");
    run(Command::new(rustc)
        .args(["--edition", "2021", "--target", MUSL_TARGET])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
        ])
        .arg("-o")
        .arg(&binary)
        .arg(source))?;
    Ok(binary)
}

fn cargo(workspace: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace);
    cmd
}

/// One `compiler-artifact` message with an executable.
#[derive(Debug)]
struct Artifact {
    package: String,
    target: String,
    kind: String,
    test: bool,
    executable: PathBuf,
}

/// Runs a cargo build command with `--message-format=json-render-diagnostics` (diagnostics
/// and progress still reach the terminal) and collects the executables it produced.
fn artifacts(cmd: &mut Command) -> Result<Vec<Artifact>> {
    cmd.arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let shown = describe(cmd);
    println!("xtask: $ {shown}");
    let out = cmd.output().context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        return Err(Error::msg(format!("`{shown}` failed ({})", out.status)));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(parse_artifact)
        .collect())
}

fn parse_artifact(line: &str) -> Option<Artifact> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    let executable = PathBuf::from(msg.get("executable")?.as_str()?);
    let target = msg.get("target")?;
    Some(Artifact {
        package: package_name(msg.get("package_id")?.as_str()?),
        target: target.get("name")?.as_str()?.to_string(),
        kind: target
            .get("kind")?
            .as_array()?
            .first()?
            .as_str()?
            .to_string(),
        test: msg.get("profile")?.get("test")?.as_bool()?,
        executable,
    })
}

/// The package name in a cargo package id, old (`name 0.1.0 (path+file://…)`) or new
/// (`path+file:///…/dir#name@0.1.0`, or `…/name#0.1.0` when the directory is the name).
fn package_name(id: &str) -> String {
    if let Some((url, fragment)) = id.rsplit_once('#') {
        return match fragment.split_once('@') {
            Some((name, _)) => name.to_string(),
            None => url.rsplit('/').next().unwrap_or(url).to_string(),
        };
    }
    id.split_whitespace().next().unwrap_or(id).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_ids() {
        assert_eq!(
            package_name("path+file:///w/engine#capsule@0.1.0"),
            "capsule"
        );
        assert_eq!(package_name("path+file:///w/xtask#0.1.0"), "xtask");
        assert_eq!(
            package_name("capsule 0.1.0 (path+file:///w/engine)"),
            "capsule"
        );
    }

    #[test]
    fn artifact_messages() {
        let line = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/engine#capsule@0.1.0","target":{"kind":["test"],"name":"lifecycle"},"profile":{"test":true},"executable":"/t/lifecycle-1"}"#;
        let a = parse_artifact(line).unwrap();
        assert_eq!(
            (
                a.package.as_str(),
                a.target.as_str(),
                a.kind.as_str(),
                a.test
            ),
            ("capsule", "lifecycle", "test", true)
        );
        assert_eq!(a.executable, PathBuf::from("/t/lifecycle-1"));
        let no_exe = r#"{"reason":"compiler-artifact","package_id":"x#y@1","target":{"kind":["lib"],"name":"y"},"profile":{"test":false},"executable":null}"#;
        assert!(parse_artifact(no_exe).is_none());
        assert!(parse_artifact(r#"{"reason":"build-finished","success":true}"#).is_none());
    }
}
