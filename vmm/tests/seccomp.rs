//! The seccomp filters on real threads and real KVM: a confined vCPU thread runs the probe,
//! is kicked, saves its vCPU and restarts it, and is refused (EPERM) everything outside its
//! list, KVM ioctls included; a confined device thread serves eventfds, epoll and a socket
//! and nothing else; threads that did not install a filter are untouched.

mod common;

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use capsule_vmm::seccomp::{confine_current_thread, ThreadRole, DENIED_ERRNO, VCPU_IOCTLS};
use capsule_vmm::{machine::probe, VcpuEvent, VmOptions};
use vmm_sys_util::eventfd::EventFd;

/// The errno of a raw libc call that returned -1, or 0 if it succeeded.
fn errno_of(rc: libc::c_long) -> i32 {
    if rc == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

fn socket() -> i32 {
    // SAFETY: creates a socket (closed below when it succeeds); no memory is passed.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    let errno = errno_of(fd as libc::c_long);
    if fd >= 0 {
        // SAFETY: the descriptor was just created here and is closed once.
        unsafe { libc::close(fd) };
    }
    errno
}

fn open_dev_null() -> i32 {
    // SAFETY: a NUL-terminated path; the descriptor is closed below when it opened.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    let errno = errno_of(fd as libc::c_long);
    if fd >= 0 {
        // SAFETY: the descriptor was just opened here and is closed once.
        unsafe { libc::close(fd) };
    }
    errno
}

#[test]
fn the_vcpu_ioctl_list_is_the_one_documented() {
    assert_eq!(VCPU_IOCTLS.len(), 16);
    let mut numbers: Vec<u32> = VCPU_IOCTLS.iter().map(|(n, _)| *n).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(
        numbers.len(),
        VCPU_IOCTLS.len(),
        "duplicate request numbers"
    );
    assert!(VCPU_IOCTLS
        .iter()
        .any(|(n, why)| *n == 0xAE80 && why.starts_with("KVM_RUN")));
}

#[test]
fn a_confined_vcpu_thread_does_its_job_and_nothing_else() {
    capsule_vmm::vcpu::install_kick_handler().unwrap();
    let Some(mut p) = common::boot_with(VmOptions {
        irqchip: true,
        ..Default::default()
    }) else {
        return;
    };
    let msrs = p.hv.msrs_to_save(true).unwrap().to_vec();
    let kicker = p.vcpu.kicker();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let vcpu_thread = std::thread::spawn(move || {
        confine_current_thread(ThreadRole::Vcpu).unwrap();
        // Allowed: running the guest, answering a command, being kicked out of a spin.
        p.start();
        assert_eq!(p.command(1, "echo confined"), "confined");
        common::request(&p.vm, 2, "spin 100000000000");
        started_tx.send(()).unwrap();
        assert_eq!(p.vcpu.run(&p.pio, &p.mmio).unwrap(), VcpuEvent::Kicked);
        // Allowed: saving the vCPU (every KVM_GET_* of a freeze), restarting it, its position
        // and the code and stack there.
        p.vcpu.complete_pending_exit().unwrap();
        let state = p.vcpu.save_state(&msrs).unwrap();
        assert!(state.lapic.is_some());
        probe::restart(&p.vcpu, common::MEM as u64).unwrap();
        p.vcpu.position().unwrap();
        assert!(p.vcpu.context(p.vm.memory()).unwrap().code.is_some());
        p.start();
        assert_eq!(p.command(3, "echo again"), "again");

        // Refused with EPERM: files, sockets, threads, and KVM ioctls outside the list.
        let refused_sregs = p.vcpu.set_sregs(&p.vcpu.sregs().unwrap());
        let refused_vcpu = p.vm.create_vcpu(1);
        let refused_thread = std::thread::Builder::new().spawn(|| ());
        let kvm_errno = |r: capsule_vmm::Result<()>| match r {
            Err(capsule_vmm::Error::Kvm { source, .. }) => source.raw_os_error(),
            other => panic!("expected a refused KVM ioctl, got {other:?}"),
        };
        (
            socket(),
            open_dev_null(),
            kvm_errno(refused_sregs),
            kvm_errno(refused_vcpu.map(drop)),
            refused_thread.err().and_then(|e| e.raw_os_error()),
        )
    });
    started_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    kicker.kick();
    let (socket_errno, open_errno, sregs_errno, vcpu_errno, thread_errno) =
        vcpu_thread.join().unwrap();
    assert_eq!(socket_errno, DENIED_ERRNO);
    assert_eq!(open_errno, DENIED_ERRNO);
    assert_eq!(sregs_errno, Some(DENIED_ERRNO));
    assert_eq!(vcpu_errno, Some(DENIED_ERRNO));
    // Starting a thread is refused: glibc reports the filter's EPERM from clone, musl (the
    // nested harness's builds) reports any clone failure as EAGAIN.
    assert!(
        thread_errno == Some(DENIED_ERRNO) || thread_errno == Some(libc::EAGAIN),
        "{thread_errno:?}"
    );
    // The filter was the vCPU thread's alone.
    assert_eq!(socket(), 0);
    assert_eq!(open_dev_null(), 0);
}

#[test]
fn a_confined_device_thread_serves_eventfds_epoll_and_its_socket_only() {
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let (mut host, mut device) = UnixStream::pair().unwrap();
    let device_thread = std::thread::spawn(move || {
        // SAFETY: creates an epoll instance before the filter (the event loop does the same).
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0);
        confine_current_thread(ThreadRole::Devices).unwrap();
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 7,
        };
        // SAFETY: a valid epoll fd, eventfd and event struct.
        let rc =
            unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, evt.as_raw_fd(), &mut event) };
        assert_eq!(rc, 0);
        evt.write(1).unwrap();
        let mut ready = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: `ready` has room for the 4 events asked for.
        let n = unsafe { libc::epoll_wait(epoll, ready.as_mut_ptr(), 4, 10_000) };
        assert_eq!(n, 1);
        assert_eq!(evt.read().unwrap(), 1);
        let mut buf = [0u8; 4];
        device.read_exact(&mut buf).unwrap();
        device.write_all(b"pong").unwrap();
        let mut entropy = [0u8; 16];
        // SAFETY: fills the 16 bytes of `entropy`.
        let got = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
        assert_eq!(got, 16);
        // Refused: new files, sockets, epoll instances, and every ioctl.
        // SAFETY: creates nothing when refused; closed if it ever succeeded.
        let new_epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        let epoll_errno = errno_of(new_epoll as libc::c_long);
        let mut pending: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int into `pending`.
        let rc = unsafe { libc::ioctl(evt.as_raw_fd(), libc::FIONREAD, &mut pending) };
        let ioctl_errno = errno_of(rc as libc::c_long);
        (socket(), open_dev_null(), epoll_errno, ioctl_errno)
    });
    host.write_all(b"ping").unwrap();
    let mut answer = [0u8; 4];
    host.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    host.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"pong");
    let errnos = device_thread.join().unwrap();
    assert_eq!(
        errnos,
        (DENIED_ERRNO, DENIED_ERRNO, DENIED_ERRNO, DENIED_ERRNO)
    );
    assert_eq!(socket(), 0);
}
