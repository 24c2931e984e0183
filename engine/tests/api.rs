//! The public API's conventions, where behaviour is observable: serde on the reported
//! types, `snapshot` returning what `templates` lists, typed errors for a snapshot that
//! does not match its capsule.

mod common;

use std::time::Duration;

use capsule::{CapsuleId, CapsuleInfo, Error, Status, TemplateInfo};
use common::{engine, probe};

#[test]
fn reported_types_round_trip_through_serde() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let capsule = engine
        .create(probe().timeout(Duration::from_secs(60)))
        .unwrap();
    let info = capsule.info();
    let json = serde_json::to_string(&info).unwrap();
    assert!(json.contains("\"status\":\"running\""), "{json}");
    assert!(
        json.contains(&format!("\"id\":\"{}\"", capsule.id())),
        "{json}"
    );
    let back: CapsuleInfo = serde_json::from_str(&json).unwrap();
    assert_eq!(back, info);

    let template = capsule.snapshot("serde-t").unwrap();
    let back: TemplateInfo =
        serde_json::from_str(&serde_json::to_string(&template).unwrap()).unwrap();
    assert_eq!(back, template);

    for status in Status::ALL {
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(json, format!("\"{status}\""));
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), status);
    }
    // Deserializing an id checks it like parsing does.
    assert!(serde_json::from_str::<CapsuleId>("\"cl-../x\"").is_err());
    assert_eq!(
        serde_json::from_str::<CapsuleId>(&format!("\"{}\"", capsule.id())).unwrap(),
        *capsule.id()
    );
}

#[test]
fn snapshot_returns_the_template_as_listed() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let capsule = engine.create(probe()).unwrap();
    capsule.commands().run("touch 64").unwrap();
    let made = capsule.snapshot("listed").unwrap();
    assert!(made.disk_bytes >= 64 * 4096, "{made:?}");
    assert_eq!(engine.templates().unwrap(), vec![made]);
}

#[test]
fn a_snapshot_of_another_machine_is_refused_and_the_capsule_stays_paused() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let small = engine.create(probe().memory_mb(32)).unwrap();
    let large = engine.create(probe().memory_mb(64)).unwrap();
    small.pause().unwrap();
    large.pause().unwrap();
    // Put the small capsule's snapshot where the large one's was.
    let snapshots = |c: &capsule::Capsule| {
        dir.path()
            .join("capsules")
            .join(c.id().as_str())
            .join("snapshot")
    };
    let (from, to) = (snapshots(&small), snapshots(&large));
    std::fs::remove_dir_all(&to).unwrap();
    std::fs::create_dir(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    match large.resume() {
        Err(Error::SnapshotMismatch(why)) => assert!(why.contains("64 MiB"), "{why}"),
        other => panic!("expected SnapshotMismatch, got {other:?}"),
    }
    assert_eq!(large.status(), Status::Paused);
    large.destroy().unwrap();
    small.resume().unwrap();
    assert_eq!(
        small
            .commands()
            .run("echo back")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "back\n"
    );
}
