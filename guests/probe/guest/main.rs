//! The probe guest: a tiny program that runs at CPL 3 in 64-bit mode, with IOPL 3 so that it
//! may `out` to the doorbell port, no interrupts and no IDT. The host builds its page tables,
//! GDT and TSS and enters `_start` directly with `rdi` = vCPU index and `rsi` = RAM size.
//!
//! Each vCPU serves its own mailbox (see `probe_abi`); state that commands share (the counter,
//! the touched pages) lives in this program's statics and is guarded for concurrent vCPUs.
//!
//! Built by `guests/probe/build.rs` with the host's `rustc` for the host target, freestanding
//! (`-nostartfiles -nostdlib -static`, linked at `IMAGE_ADDR` by `link.ld`).
#![no_std]
#![no_main]
#![allow(unused_attributes, dead_code)]

#[path = "../../probe-abi/src/lib.rs"]
mod abi;

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "    call {main}",
    "    ud2",
    main = sym probe_main,
);

/// Calls since start: the `count` command.
static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Serialises `touch` and `sum`, which share the cursor and the touched pages. Holds the
/// owning vCPU's index + 1, or 0 when free, so a vCPU the host restarted (after killing a
/// timed-out command) can release a lock it died holding.
static TOUCH_LOCK: AtomicU64 = AtomicU64::new(0);
/// Touch state, only accessed under `TOUCH_LOCK`.
static mut TOUCH: TouchState = TouchState {
    cursor: 0,
    touched: 0,
    generation: 0,
};

struct TouchState {
    /// Next page index `touch` writes.
    cursor: u64,
    /// Distinct pages written so far (they are 0..touched).
    touched: u64,
    /// Incremented by every `touch`, so rewriting a page changes its contents.
    generation: u64,
}

/// A reply under construction in the vCPU's mailbox.
struct Out {
    mailbox: *mut u8,
    stdout_len: usize,
    stderr_len: usize,
    flags: u32,
    exit_code: i32,
}

impl Out {
    fn stdout(&mut self, bytes: &[u8]) {
        let (len, truncated) = append(
            self.mailbox,
            abi::STDOUT_OFFSET,
            abi::STDOUT_MAX,
            self.stdout_len,
            bytes,
        );
        self.stdout_len = len;
        if truncated {
            self.flags |= abi::FLAG_STDOUT_TRUNCATED;
        }
    }

    fn stderr(&mut self, bytes: &[u8]) {
        let (len, truncated) = append(
            self.mailbox,
            abi::STDERR_OFFSET,
            abi::STDERR_MAX,
            self.stderr_len,
            bytes,
        );
        self.stderr_len = len;
        if truncated {
            self.flags |= abi::FLAG_STDERR_TRUNCATED;
        }
    }

    fn stdout_u64(&mut self, value: u64) {
        let mut digits = [0u8; 21];
        let text = format_u64(value, &mut digits);
        self.stdout(text);
        self.stdout(b"\n");
    }

    fn fail(&mut self, code: i32, message: &[&[u8]]) {
        self.exit_code = code;
        for part in message {
            self.stderr(part);
        }
        self.stderr(b"\n");
    }
}

fn append(mailbox: *mut u8, area: usize, max: usize, used: usize, bytes: &[u8]) -> (usize, bool) {
    let room = max - used;
    let n = bytes.len().min(room);
    // SAFETY: the area [area, area + max) lies inside this vCPU's mailbox and used + n <= max.
    unsafe { copy_bytes(mailbox.add(area + used), bytes.as_ptr(), n) };
    (used + n, n < bytes.len())
}

#[no_mangle]
extern "C" fn probe_main(cpu: u64, mem_size: u64) -> ! {
    // The host restarts a vCPU here after killing its command; drop what it held.
    let _ = TOUCH_LOCK.compare_exchange(cpu + 1, 0, Ordering::AcqRel, Ordering::Relaxed);
    let mailbox = abi::mailbox_addr(cpu) as *mut u8;
    write_reply(
        mailbox,
        &Out {
            mailbox,
            stdout_len: 0,
            stderr_len: 0,
            flags: 0,
            exit_code: 0,
        },
        0,
    );
    doorbell(abi::DOORBELL_READY);
    loop {
        // The host wrote the next request before re-entering us.
        let seq = read_u32(mailbox, abi::REQ_SEQ_OFFSET);
        let len = (read_u32(mailbox, abi::REQ_LEN_OFFSET) as usize).min(abi::REQUEST_MAX);
        // SAFETY: the request area is inside the mailbox and len <= REQUEST_MAX.
        let request =
            unsafe { core::slice::from_raw_parts(mailbox.add(abi::REQUEST_OFFSET), len) };
        let mut out = Out {
            mailbox,
            stdout_len: 0,
            stderr_len: 0,
            flags: 0,
            exit_code: 0,
        };
        handle(request, cpu, mem_size, &mut out);
        write_reply(mailbox, &out, seq);
        doorbell(abi::DOORBELL_REPLY);
    }
}

fn handle(request: &[u8], cpu: u64, mem_size: u64, out: &mut Out) {
    let line = trim(request);
    let (verb, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], trim(&line[i + 1..])),
        None => (line, &line[line.len()..]),
    };
    match verb {
        b"echo" => {
            out.stdout(rest);
            out.stdout(b"\n");
        }
        b"exit" => match parse_i64(rest) {
            Some(code) if code >= i32::MIN as i64 && code <= i32::MAX as i64 => {
                out.exit_code = code as i32
            }
            _ => out.fail(2, &[b"exit: not a number: ", rest]),
        },
        b"count" => {
            let value = COUNTER.fetch_add(1, Ordering::SeqCst) + 1;
            out.stdout_u64(value);
        }
        b"touch" => match parse_i64(rest) {
            Some(n) if n >= 0 => touch(n as u64, cpu, mem_size, out),
            _ => out.fail(2, &[b"touch: not a page count: ", rest]),
        },
        b"sum" => {
            lock(cpu);
            // SAFETY: TOUCH is only accessed under TOUCH_LOCK.
            let touched = unsafe { (*core::ptr::addr_of!(TOUCH)).touched };
            let sum = checksum_pages(0, touched);
            unlock();
            out.stdout_u64(sum);
        }
        b"spin" => match parse_i64(rest) {
            Some(n) if n >= 0 => {
                for i in 0..n as u64 {
                    // Keeps the loop from being folded away.
                    // SAFETY: an empty asm statement with one input register.
                    unsafe { asm!("/* {0} */", in(reg) i, options(nomem, nostack)) };
                }
            }
            _ => out.fail(2, &[b"spin: not an iteration count: ", rest]),
        },
        b"crash" => crash(),
        _ => out.fail(127, &[b"probe: unknown command: ", verb]),
    }
}

fn touch(n: u64, cpu: u64, mem_size: u64, out: &mut Out) {
    let capacity = abi::touch_capacity(mem_size);
    if n > capacity {
        let mut a = [0u8; 21];
        let mut b = [0u8; 21];
        out.fail(
            1,
            &[
                b"touch: ",
                format_u64(n, &mut a),
                b" pages requested, the guest has room for ",
                format_u64(capacity, &mut b),
            ],
        );
        return;
    }
    lock(cpu);
    // SAFETY: TOUCH is only accessed under TOUCH_LOCK.
    let state = unsafe { &mut *core::ptr::addr_of_mut!(TOUCH) };
    state.generation += 1;
    let mut sum = 0u64;
    for i in 0..n {
        let page = (state.cursor + i) % capacity.max(1);
        fill_page(page, state.generation);
        sum = mix(sum, checksum_page(page));
    }
    state.cursor = (state.cursor + n) % capacity.max(1);
    state.touched = (state.touched + n).min(capacity);
    unlock();
    out.stdout_u64(sum);
}

fn page_ptr(page: u64) -> *mut u64 {
    (abi::TOUCH_ADDR + page * abi::PAGE_SIZE) as *mut u64
}

fn fill_page(page: u64, generation: u64) {
    let words = page_ptr(page);
    let seed = generation.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ page.wrapping_mul(0xff51_afd7_ed55_8ccd);
    for w in 0..(abi::PAGE_SIZE / 8) as usize {
        // SAFETY: the page lies inside guest RAM (page < touch_capacity) and is ours to write.
        unsafe { words.add(w).write_volatile(seed.wrapping_add(w as u64)) };
    }
}

fn checksum_page(page: u64) -> u64 {
    let words = page_ptr(page);
    let mut sum = page;
    for w in 0..(abi::PAGE_SIZE / 8) as usize {
        // SAFETY: as in fill_page.
        sum = mix(sum, unsafe { words.add(w).read_volatile() });
    }
    sum
}

fn checksum_pages(first: u64, count: u64) -> u64 {
    let mut sum = 0u64;
    for page in first..first + count {
        sum = mix(sum, checksum_page(page));
    }
    sum
}

fn mix(acc: u64, value: u64) -> u64 {
    (acc ^ value).wrapping_mul(0x100_0000_01b3).rotate_left(17)
}

fn lock(cpu: u64) {
    while TOUCH_LOCK
        .compare_exchange_weak(0, cpu + 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
}

fn unlock() {
    TOUCH_LOCK.store(0, Ordering::Release);
}

/// Faults on purpose. Without an IDT the fault cannot be delivered, so the vCPU shuts down
/// (a triple fault), which the host must report as a crashed capsule.
fn crash() -> ! {
    // SAFETY: deliberately executes an undefined instruction; nothing after it runs.
    unsafe { asm!("ud2", options(noreturn)) }
}

fn write_reply(mailbox: *mut u8, out: &Out, seq: u32) {
    let header = abi::ReplyHeader {
        seq,
        exit_code: out.exit_code,
        stdout_len: out.stdout_len as u32,
        stderr_len: out.stderr_len as u32,
        flags: out.flags,
    };
    let bytes = header.to_bytes();
    // SAFETY: the reply header lies inside the mailbox.
    unsafe {
        copy_bytes(
            mailbox.add(abi::REPLY_HEADER_OFFSET),
            bytes.as_ptr(),
            bytes.len(),
        )
    };
}

fn read_u32(mailbox: *mut u8, offset: usize) -> u32 {
    // SAFETY: offset + 4 lies inside the mailbox; unaligned reads are fine on x86.
    unsafe { (mailbox.add(offset) as *const u32).read_unaligned() }
}

/// Rings the doorbell: one exit to the host, which re-enters us with the next request.
fn doorbell(value: u32) {
    // SAFETY: IOPL is 3, so `out` is allowed at CPL 3; the asm also acts as a compiler barrier
    // (no `nomem`), so the reply is in memory before the exit and the request is re-read after.
    unsafe {
        asm!("out dx, eax", in("dx") abi::DOORBELL_PORT, in("eax") value, options(nostack));
    }
}

fn trim(mut bytes: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = bytes {
        if first.is_ascii_whitespace() {
            bytes = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = bytes {
        if last.is_ascii_whitespace() {
            bytes = rest;
        } else {
            break;
        }
    }
    bytes
}

fn parse_i64(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut value: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add((d - b'0') as i64)?;
    }
    Some(if negative { -value } else { value })
}

fn format_u64(mut value: u64, buf: &mut [u8; 21]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    &buf[i..]
}

/// # Safety
/// `dst` and `src` must be valid for `n` bytes and not overlap.
unsafe fn copy_bytes(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller guarantees both ranges; `rep movsb` copies exactly n bytes forwards.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
}

// The compiler may emit calls to these for slice copies and zeroing; no libc exists here.
#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: memcpy's contract is copy_bytes's.
    unsafe { copy_bytes(dst, src, n) };
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is safe when dst does not start inside [src, src + n).
        unsafe { copy_bytes(dst, src, n) };
    } else {
        // SAFETY: backwards copy with the direction flag set, restored afterwards.
        unsafe {
            asm!("std", "rep movsb", "cld", inout("rcx") n => _,
                 inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                 options(nostack));
        }
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees dst is valid for n bytes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") value as u8,
             options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both are valid for n bytes.
        // Volatile reads keep the compiler from turning this loop back into a memcmp call.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    crash()
}

/// The precompiled `core` for the host target references this unwinding hook; with
/// `panic=abort` nothing ever calls it.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
