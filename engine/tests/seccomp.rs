//! vCPU threads run under their seccomp filter by default: a call outside the vCPU list,
//! made on a real probe capsule's vCPU thread, fails with EPERM, while that capsule, another
//! capsule and the process carry on; `EngineConfig::seccomp(false)` leaves the threads
//! unfiltered.

mod common;

use std::time::Duration;

use capsule::{Engine, Status};

/// The errno of each call, 0 when it succeeded: (socket, openat).
type Errnos = (i32, i32);

fn errno_of(rc: libc::c_int) -> i32 {
    if rc == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        // SAFETY: `rc` is a descriptor just opened by the caller and closed only here.
        unsafe { libc::close(rc) };
        0
    }
}

/// Opens a socket and a file on a vCPU thread of `capsule`.
fn forbidden_calls_on_a_vcpu_thread(engine: &Engine, capsule: &capsule::CapsuleId) -> Errnos {
    let (tx, rx) = crossbeam_channel::bounded(1);
    engine
        .run_on_vcpu_thread(capsule, move || {
            // SAFETY: creates a socket; no memory is passed.
            let socket = errno_of(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) });
            // SAFETY: a NUL-terminated path.
            let open = errno_of(unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) });
            let _ = tx.send((socket, open));
        })
        .unwrap();
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the vCPU thread ran the test code")
}

#[test]
fn a_vcpu_thread_is_refused_calls_outside_its_list_and_everything_carries_on() {
    let Some((engine, _dir)) = common::engine() else {
        return;
    };
    assert!(engine.config().seccomp(), "filters are on by default");
    let confined = engine.create(common::probe().vcpus(2)).unwrap();
    let other = engine.create(common::probe()).unwrap();

    assert_eq!(
        forbidden_calls_on_a_vcpu_thread(&engine, confined.id()),
        (libc::EPERM, libc::EPERM)
    );

    // The refused calls harmed nobody: both capsules work, pause and resume (the vCPU
    // threads save their state under the filter), and the process opens files as before.
    for capsule in [&confined, &other] {
        assert_eq!(
            capsule
                .commands()
                .run("echo on")
                .unwrap()
                .stdout_str()
                .into_owned(),
            "on\n"
        );
    }
    confined.pause().unwrap();
    confined.resume().unwrap();
    assert_eq!(confined.commands().run("count").unwrap().exit_code, Some(0));
    assert_eq!(confined.info().status, Status::Running);
    assert_eq!(other.info().status, Status::Running);
    assert!(std::fs::File::open("/dev/null").is_ok());
    // Resumed on new threads: filtered again.
    assert_eq!(
        forbidden_calls_on_a_vcpu_thread(&engine, confined.id()),
        (libc::EPERM, libc::EPERM)
    );

    // A guest crash is reported from a filtered thread: the capsule goes to Error and its VM
    // is released (on an unfiltered thread), the other capsule carries on.
    assert!(confined.commands().run("crash").is_err());
    assert_eq!(confined.info().status, Status::Error);
    assert_eq!(
        other
            .commands()
            .run("echo still")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "still\n"
    );
    confined.destroy().unwrap();
    other.destroy().unwrap();
}

#[test]
fn switched_off_the_vcpu_threads_are_not_filtered() {
    let Some((engine, _dir)) = common::engine_with(|c| c.seccomp(false)) else {
        return;
    };
    assert!(!engine.config().seccomp());
    let capsule = engine.create(common::probe()).unwrap();
    assert_eq!(
        forbidden_calls_on_a_vcpu_thread(&engine, capsule.id()),
        (0, 0)
    );
    assert_eq!(
        capsule
            .commands()
            .run("echo hi")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "hi\n"
    );
    capsule.destroy().unwrap();
}
