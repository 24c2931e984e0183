//! PID 1 reaping mode: a global `waitpid(-1)` reaper must route each exit
//! status to its command and swallow orphans. This file is its own test
//! binary (process), because the reaper reaps every child of the process.

mod common;

use std::sync::Arc;
use std::time::Duration;

use capsule_agent::{ExecConfig, Reaper, ServeConfig, WaitMode};
use capsule_agent_protocol::*;
use common::*;

#[test]
fn global_reaper_routes_statuses_and_reaps_orphans() {
    // Orphans of our commands come back to this process, as they would to PID 1.
    Reaper::become_subreaper().unwrap();
    let reaper = Reaper::new(Duration::from_millis(5));
    let r2 = Arc::clone(&reaper);
    std::thread::spawn(move || r2.run());
    let config = ServeConfig {
        pid1: true,
        exec: ExecConfig {
            wait_mode: WaitMode::Global(Arc::clone(&reaper)),
            ..ExecConfig::default()
        },
        ..ServeConfig::default()
    };
    let mut h = Host::start_with(config);
    assert_ne!(h.hello.capabilities & caps::PID1, 0);

    // Each command leaves an orphan that exits (with another code) around
    // the time the command does.
    let ids: Vec<u32> = (1..=16).collect();
    for &id in &ids {
        let script = format!(
            "(sleep 0.0{}; exit 99) >/dev/null 2>&1 & exit {id}",
            id % 10
        );
        h.send(id, &Message::Run(shell(&script)));
    }
    let replies = h.collect(&ids);
    for &id in &ids {
        assert_eq!(
            replies[&id].exit().status,
            ExitStatus::Code(id as i32),
            "id {id}"
        );
    }
    // Timeout still kills and reports the signal in this mode.
    let r = h.run(
        100,
        RunRequest {
            timeout_ms: 100,
            ..shell("sleep 100")
        },
    );
    assert!(r.exit().timed_out);
    assert_eq!(r.exit().status, ExitStatus::Signal(9));
    // Spawn failures do not upset the reaper.
    let r = h.run(
        101,
        RunRequest {
            command: Command::Exec {
                program: "/nope".into(),
                args: vec![],
            },
            ..shell("")
        },
    );
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::SPAWN_FAILED));

    for _ in 0..200 {
        if reaper.orphans_reaped() >= 16 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        reaper.orphans_reaped() >= 16,
        "orphans reaped: {}",
        reaper.orphans_reaped()
    );
    drop(h);
}
