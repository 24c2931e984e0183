//! `fork(n)`: new capsules in the exact state of a running or paused one, through an
//! anonymous template that goes with the last capsule mapping it.

mod common;

use capsule::{Error, Resource, Status};
use common::{engine, engine_with, probe};

/// The anonymous templates on disk (hidden directories under `templates/`).
fn fork_templates(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("templates"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count()
}

#[test]
fn forks_of_a_running_capsule_continue_its_state_and_diverge() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let source = engine.create(probe().vcpus(2)).unwrap();
    source.commands().run("count").unwrap();
    let sum = source
        .commands()
        .run("touch 300")
        .unwrap()
        .stdout_str()
        .into_owned();
    let forks = source.fork(3).unwrap();
    assert_eq!(forks.len(), 3);
    assert_eq!(fork_templates(dir.path()), 1);
    for (i, fork) in forks.iter().enumerate() {
        assert_ne!(fork.id(), source.id());
        assert_eq!(fork.status(), Status::Running);
        assert_eq!((fork.info().vcpus, fork.info().memory_mb), (2, 32));
        assert_eq!(
            fork.commands()
                .run("sum")
                .unwrap()
                .stdout_str()
                .into_owned(),
            sum
        );
        assert_eq!(
            fork.commands()
                .run("count")
                .unwrap()
                .stdout_str()
                .into_owned(),
            "2\n"
        );
        // Each diverges on its own.
        for _ in 0..i {
            fork.commands().run("count").unwrap();
        }
    }
    for (i, fork) in forks.iter().enumerate() {
        assert_eq!(
            fork.commands()
                .run("count")
                .unwrap()
                .stdout_str()
                .into_owned(),
            format!("{}\n", 3 + i)
        );
    }
    // The source went on untouched.
    assert_eq!(
        source
            .commands()
            .run("count")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "2\n"
    );
    assert_eq!(engine.list().len(), 4);
    // A fork pauses and resumes on its own; once every fork is gone, so is the template.
    forks[0].pause().unwrap();
    forks[0].resume().unwrap();
    assert_eq!(
        forks[0]
            .commands()
            .run("count")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "4\n"
    );
    for fork in &forks {
        fork.destroy().unwrap();
    }
    assert_eq!(fork_templates(dir.path()), 0);
    assert!(
        engine.templates().unwrap().is_empty(),
        "forks make no named template"
    );
}

#[test]
fn forks_of_a_paused_capsule_leave_it_paused() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let source = engine.create(probe()).unwrap();
    source.commands().run("count").unwrap();
    source.pause().unwrap();
    let forks = engine.fork(source.id(), 2).unwrap();
    assert_eq!(source.status(), Status::Paused);
    for fork in &forks {
        assert_eq!(
            fork.commands()
                .run("count")
                .unwrap()
                .stdout_str()
                .into_owned(),
            "2\n"
        );
    }
    // A paused fork keeps what it needs when the template goes.
    forks[1].pause().unwrap();
    forks[0].destroy().unwrap();
    assert_eq!(fork_templates(dir.path()), 0);
    forks[1].resume().unwrap();
    assert_eq!(
        forks[1]
            .commands()
            .run("count")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "3\n"
    );
    source.resume().unwrap();
    assert_eq!(
        source
            .commands()
            .run("count")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "2\n"
    );
    assert!(source.fork(0).unwrap().is_empty());
}

#[test]
fn a_fork_past_the_limits_leaves_nothing() {
    let Some((engine, dir)) = engine_with(|c| c.max_capsules(3)) else {
        return;
    };
    let source = engine.create(probe()).unwrap();
    match source.fork(3) {
        Err(Error::ResourceExhausted {
            resource: Resource::Capsules,
            limit: Some(3),
            ..
        }) => {}
        other => panic!("expected ResourceExhausted, got {other:?}"),
    }
    assert_eq!(engine.list().len(), 1, "no fork is left behind");
    assert_eq!(fork_templates(dir.path()), 0);
    // Within the limit it works, and the forks outlive their source.
    let forks = source.fork(2).unwrap();
    source.destroy().unwrap();
    assert_eq!(engine.list().len(), 2);
    for fork in &forks {
        assert_eq!(
            fork.commands()
                .run("echo alive")
                .unwrap()
                .stdout_str()
                .into_owned(),
            "alive\n"
        );
    }
}

#[test]
fn a_stopped_capsule_cannot_be_forked_and_stale_fork_templates_are_removed() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let source = engine.create(probe()).unwrap();
    let handle = source.clone();
    source.destroy().unwrap();
    assert!(matches!(
        handle.fork(1),
        Err(Error::InvalidState {
            status: Status::Stopped,
            ..
        })
    ));
    // Left by a process that died while forks ran: removed by the next engine.
    std::fs::create_dir(dir.path().join("templates/.fork-cl-leftover")).unwrap();
    drop((engine, handle, source));
    let engine =
        capsule::Engine::new(capsule::EngineConfig::builder().data_dir(dir.path())).unwrap();
    assert_eq!(fork_templates(dir.path()), 0);
    drop(engine);
}
