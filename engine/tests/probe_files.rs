//! The probe guest has no files: every `files()` call is `Error::Unsupported`, and the
//! capsule is unharmed. (Files in Linux capsules: `linux_files.rs`.)

mod common;

use std::time::Duration;

use capsule::{Error, Status, WriteOptions};
use common::{engine, probe};

#[test]
fn every_file_call_in_the_probe_is_unsupported() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let files = c.files().timeout(Duration::from_secs(5));
    let host = tempfile::tempdir().unwrap();
    let local = host.path().join("local");
    std::fs::write(&local, b"x").unwrap();

    let unsupported = |what: &str, r: Result<(), Error>| match r {
        Err(Error::Unsupported(why)) => assert!(why.contains("probe"), "{what}: {why}"),
        other => panic!("{what}: expected Unsupported, got {other:?}"),
    };
    unsupported("read", files.read("/etc/hostname").map(drop));
    unsupported("read_to_string", files.read_to_string("/x").map(drop));
    unsupported(
        "read_into",
        files.read_into("/x", std::io::sink()).map(drop),
    );
    unsupported("write", files.write("/tmp/x", "data"));
    unsupported(
        "write_with",
        files.write_with("/tmp/x", "data", WriteOptions::new().mode(0o600)),
    );
    unsupported(
        "write_from",
        files.write_from("/tmp/x", &b"data"[..]).map(drop),
    );
    unsupported("list", files.list("/", 2).map(drop));
    unsupported("exists", files.exists("/").map(drop));
    unsupported("stat", files.stat("/").map(drop));
    unsupported("make_dir", files.make_dir("/tmp/d"));
    unsupported("remove", files.remove("/tmp/d"));
    unsupported("rename", files.rename("/tmp/a", "/tmp/b"));
    unsupported("upload", files.upload(&local, "/tmp/x").map(drop));
    unsupported(
        "download",
        files.download("/x", host.path().join("d")).map(drop),
    );
    // The download wrote nothing on the host.
    assert!(!host.path().join("d").exists());
    assert_eq!(std::fs::read_dir(host.path()).unwrap().count(), 1);

    // The capsule carries on.
    assert_eq!(
        c.commands().run("echo still here").unwrap().exit_code,
        Some(0)
    );

    // Not running: the state comes first.
    c.pause().unwrap();
    assert!(matches!(
        c.files().read("/x"),
        Err(Error::InvalidState {
            status: Status::Paused,
            ..
        })
    ));
    c.destroy().unwrap();
    assert!(matches!(
        c.files().write("/x", "x"),
        Err(Error::InvalidState {
            status: Status::Stopped,
            ..
        })
    ));
}
