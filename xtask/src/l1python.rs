//! Python for inside L1 (`nested-test`, when the `capsule` package's tests run): the host's
//! CPython with the `capsule` SDK installed, so that `engine/tests/linux_python.rs` runs the
//! SDK's examples (`python/examples/lifecycle.py`, `python/examples/guest_io.py`) with the
//! "minimal" Linux template.
//!
//! What is packed comes from the virtualenv `target/python-venv` (the one `.ci/run` creates
//! and installs `./python` into before the nested step; created here, and `./python`
//! installed into it, when it is missing or older than the sources): its base interpreter
//! (what `python3` resolved to when the venv was made), the shared libraries `ldd` lists for
//! it, its extension modules and `capsule`'s, and the dynamic loader; the standard library
//! pruned and compiled into `pythonXY.zip` by `xtask/l1/pack_python.py`; the lib-dynload
//! extension modules but those of tests, GUIs, terminals, databases and OpenSSL; and the
//! installed `capsule` package. L1 is a bare busybox initramfs, so Python runs through the
//! loader, like QEMU for the report (`l2qemu.rs`):
//!
//! ```text
//! PYTHONHOME=/nested/extra/python PYTHONPATH=/nested/extra/python/site-packages \
//!   /nested/extra/python/lib/ld-linux-x86-64.so.2 --library-path /nested/extra/python/lib \
//!   /nested/extra/python/bin/python3 SCRIPT
//! ```
//!
//! Layout under `/nested/extra/` (`$CAPSULE_NESTED_EXTRA`): `python/bin/python3`,
//! `python/lib/<soname>` (and the loader), `python/lib/pythonXY.zip`,
//! `python/lib/pythonX.Y/lib-dynload/*.so`, `python/site-packages/capsule/`,
//! `python/examples/lifecycle.py` (the example as written). Shared objects are packed
//! stripped (`strip --strip-unneeded`, copies in `<cache>/python/`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use crate::initramfs::Extra;
use crate::l2qemu::parse_ldd;
use crate::util::{have_program, run, stdout_of, Context, Error, Result};

/// Where the extras go in L1, under `/nested/extra`.
pub const DIR: &str = "python";
/// The tests that use them (`engine/tests/linux_python.rs`:
/// `linux_python_lifecycle_example_runs_as_written`, `linux_python_guest_io_example_runs`),
/// skipped when they are not packed: libtest's `--skip` matches this as a substring of their
/// names (no other test has it).
pub const TEST: &str = "linux_python_";
/// The pack script, run with the venv's interpreter.
const PACK_SCRIPT: &str = include_str!("../l1/pack_python.py");
/// The examples the tests run, relative to the workspace root; packed as
/// `python/examples/NAME`.
const EXAMPLES: &[&str] = &[
    "python/examples/lifecycle.py",
    "python/examples/guest_io.py",
];
/// Tracked sources the installed `capsule` package is built from: newer ones mean a rebuild.
const SOURCES: &[&str] = &[
    "Cargo.lock",
    "python/Cargo.toml",
    "python/pyproject.toml",
    "python/src",
    "python/capsule",
    "engine/Cargo.toml",
    "engine/src",
    "vmm/Cargo.toml",
    "vmm/src",
    "devices/Cargo.toml",
    "devices/src",
    "snapshot/Cargo.toml",
    "snapshot/src",
    "agent-protocol/Cargo.toml",
    "agent-protocol/src",
    "guests",
];

/// What [`extras`] packs, for the xtask's log.
pub struct Packed {
    pub extras: Vec<Extra>,
    /// One line: the Python version, the file counts, the size.
    pub summary: String,
}

/// The extra files that make up Python with the `capsule` package in L1.
pub fn extras(workspace: &Path, cache: &Path) -> Result<Packed> {
    let venv = workspace.join("target/python-venv");
    let python = ensure_venv(workspace, &venv)?;
    let stage = cache.join("python");
    if stage.exists() {
        fs::remove_dir_all(&stage).context(|| format!("cannot remove {}", stage.display()))?;
    }
    fs::create_dir_all(stage.join("strip"))
        .context(|| format!("cannot create {}", stage.display()))?;
    let script = stage.join("pack_python.py");
    fs::write(&script, PACK_SCRIPT).context(|| format!("cannot write {}", script.display()))?;
    let json = stdout_of(Command::new(&python).arg(&script).arg(&stage))?;
    let manifest: serde_json::Value =
        serde_json::from_str(&json).context(|| format!("pack_python.py printed {json:?}"))?;
    let text = |key: &str| {
        manifest[key]
            .as_str()
            .map(str::to_string)
            .context(|| format!("pack_python.py: no {key:?} in {json}"))
    };
    let version = text("version")?;
    let executable = PathBuf::from(text("executable")?);
    let zip = PathBuf::from(text("zip")?);
    let package = PathBuf::from(text("capsule_package").map_err(|_| {
        Error::msg(format!(
            "{} cannot import capsule (`pip install ./python` into {})",
            python.display(),
            venv.display()
        ))
    })?);
    let dynload: Vec<PathBuf> = manifest["lib_dynload"]
        .as_array()
        .context(|| format!("pack_python.py: no lib_dynload in {json}"))?
        .iter()
        .filter_map(|v| v.as_str().map(PathBuf::from))
        .collect();

    let mut extras = vec![
        Extra {
            source: executable.clone(),
            dest: format!("{DIR}/bin/python3"),
        },
        Extra {
            source: zip.clone(),
            dest: format!(
                "{DIR}/lib/{}",
                zip.file_name().unwrap_or_default().to_string_lossy()
            ),
        },
    ];
    for example in EXAMPLES {
        let source = workspace.join(example);
        extras.push(Extra {
            dest: format!("{DIR}/examples/{}", file_name(&source)?),
            source,
        });
    }
    // Every shared object that will be loaded: the interpreter's libraries, the extension
    // modules, and what those need.
    let mut objects = vec![executable];
    for so in &dynload {
        let name = file_name(so)?;
        extras.push(Extra {
            source: strip(so, &stage.join("strip").join(&name))?,
            dest: format!("{DIR}/lib/python{version}/lib-dynload/{name}"),
        });
        objects.push(so.clone());
    }
    let mut package_files = 0;
    for entry in fs::read_dir(&package).context(|| format!("cannot read {}", package.display()))? {
        let path = entry
            .context(|| format!("cannot read {}", package.display()))?
            .path();
        let name = file_name(&path)?;
        if !path.is_file() {
            continue; // __pycache__
        }
        let source = if name.ends_with(".so") {
            objects.push(path.clone());
            strip(&path, &stage.join("strip").join(&name))?
        } else {
            path
        };
        extras.push(Extra {
            source,
            dest: format!("{DIR}/site-packages/capsule/{name}"),
        });
        package_files += 1;
    }
    let mut libs: Vec<(String, PathBuf)> = Vec::new();
    for object in &objects {
        let ldd = stdout_of(Command::new("ldd").arg(object))?;
        for (name, path) in parse_ldd(&ldd).context(|| format!("ldd {}", object.display()))? {
            if !libs.iter().any(|(n, _)| *n == name) {
                libs.push((name, path));
            }
        }
    }
    if !libs.iter().any(|(name, _)| name.starts_with("ld-linux")) {
        return Err(Error::msg(format!(
            "`ldd {}` names no dynamic loader (ld-linux*)",
            objects[0].display()
        )));
    }
    for (name, path) in &libs {
        // The loader runs as a program: left as it is.
        let source = if name.starts_with("ld-linux") {
            path.clone()
        } else {
            strip(path, &stage.join("strip").join(name))?
        };
        extras.push(Extra {
            source,
            dest: format!("{DIR}/lib/{name}"),
        });
    }
    let bytes: u64 = extras
        .iter()
        .filter_map(|e| fs::metadata(&e.source).ok())
        .map(|m| m.len())
        .sum();
    let summary = format!(
        "Python {} ({}): {} stdlib modules in {}, {} extension modules, {} shared libraries, \
         capsule ({} files); {:.1} MiB before gzip",
        manifest["full_version"].as_str().unwrap_or(&version),
        python.display(),
        manifest["zip_modules"].as_u64().unwrap_or(0),
        file_name(&zip)?,
        dynload.len(),
        libs.len(),
        package_files,
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(Packed { extras, summary })
}

/// The venv's interpreter, with `./python` installed and up to date: creates the venv with
/// `python3 -m venv` when it is missing, and runs `pip install ./python` when `capsule` is
/// not installed or older than its sources.
fn ensure_venv(workspace: &Path, venv: &Path) -> Result<PathBuf> {
    let python = venv.join("bin/python");
    if !python.is_file() {
        if !have_program("python3") {
            return Err(Error::msg(
                "no python3 in PATH: Python cannot be packed into L1 (--no-python skips it)",
            ));
        }
        run(Command::new("python3").arg("-m").arg("venv").arg(venv))?;
    }
    let installed = installed_native(&python);
    let reason = match &installed {
        None => Some("capsule is not installed in it".to_string()),
        Some(native) => {
            let built = fs::metadata(native).and_then(|m| m.modified()).ok();
            match (built, newest_source(workspace)) {
                (Some(built), Some((newest, path))) if newest > built => {
                    Some(format!("{} is newer than the installed package", path))
                }
                _ => None,
            }
        }
    };
    if let Some(reason) = reason {
        println!(
            "xtask:   building the Python package into {} ({reason})",
            venv.display()
        );
        run(Command::new(venv.join("bin/pip"))
            .current_dir(workspace)
            .args([
                "install",
                "--quiet",
                "--force-reinstall",
                "--no-deps",
                "./python",
            ]))?;
        if installed_native(&python).is_none() {
            return Err(Error::msg(format!(
                "`pip install ./python` did not install capsule's extension into {}",
                venv.display()
            )));
        }
    }
    Ok(python)
}

/// The installed `capsule._native` extension of the interpreter `python`, if any.
fn installed_native(python: &Path) -> Option<PathBuf> {
    let out = stdout_of(Command::new(python).args([
        "-c",
        "import importlib.util as u; s = u.find_spec('capsule'); \
         print(list(s.submodule_search_locations)[0] if s else '')",
    ]))
    .ok()?;
    let dir = PathBuf::from(out.trim());
    if out.trim().is_empty() {
        return None;
    }
    fs::read_dir(&dir).ok()?.find_map(|e| {
        let path = e.ok()?.path();
        let name = path.file_name()?.to_str()?;
        (name.starts_with("_native") && name.ends_with(".so")).then_some(path)
    })
}

/// The newest modification time among the tracked files of [`SOURCES`] (and that file), or
/// `None` when git cannot list them.
fn newest_source(workspace: &Path) -> Option<(SystemTime, String)> {
    let list = stdout_of(
        Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(["ls-files", "-z", "--"])
            .args(SOURCES),
    )
    .ok()?;
    list.split('\0')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let modified = fs::metadata(workspace.join(p)).ok()?.modified().ok()?;
            Some((modified, p.to_string()))
        })
        .max()
}

/// A copy of the shared object `source` without its symbol table and debug information at
/// `dest`; `source` itself when there is no `strip`.
fn strip(source: &Path, dest: &Path) -> Result<PathBuf> {
    if !have_program("strip") {
        return Ok(source.to_path_buf());
    }
    stdout_of(
        Command::new("strip")
            .arg("--strip-unneeded")
            .arg("-o")
            .arg(dest)
            .arg(source),
    )?;
    Ok(dest.to_path_buf())
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context(|| format!("{} has no file name", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_script_prunes_what_l1_does_not_need() {
        for name in [
            "\"test\"",
            "\"tkinter\"",
            "\"idlelib\"",
            "\"ensurepip\"",
            "\"lib2to3\"",
        ] {
            assert!(PACK_SCRIPT.contains(name), "{name}");
        }
        assert!(PACK_SCRIPT.contains("site-packages"));
    }

    #[test]
    fn examples_are_in_the_workspace() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for example in EXAMPLES {
            assert!(workspace.join(example).is_file(), "{example}");
        }
        let tests = fs::read_to_string(workspace.join("engine/tests/linux_python.rs")).unwrap();
        let names: Vec<&str> = tests
            .lines()
            .filter_map(|l| l.strip_prefix("fn "))
            .filter_map(|l| l.split('(').next())
            .collect();
        assert_eq!(
            names.iter().filter(|n| n.contains(TEST)).count(),
            2,
            "{names:?}"
        );
    }
}
