"""Talking to what runs in a capsule: background commands with stdin, signals and streamed
output, the guest's process list, reconnecting after a pause, files in and out, a terminal.

The template comes from ``CAPSULE_TEST_TEMPLATE`` ("probe" unless set). With "minimal" (a
Linux capsule: hardware virtualization and the image from ``cargo xtask build-minimal``)
every part runs; the probe, the engine's built-in test guest, runs its verbs in the
background and refuses the rest with ``UnsupportedError``, which this example checks. Each
part prints one ``name: result`` line. Run by ``tests/test_example.py`` (probe) and
``engine/tests/linux_python.rs`` (minimal, in the nested harness); by hand:
``CAPSULE_TEST_TEMPLATE=minimal python guest_io.py``.
"""

import io
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import capsule
from capsule import Capsule

TEMPLATE = os.environ.get("CAPSULE_TEST_TEMPLATE", "probe")
STEP = 60  # seconds any one step may take (a nested guest is slow)
# How far the guest's clock (set to the host's at every start and resume) may be off.
RECENT = timedelta(minutes=10)


def read_until(handle: capsule.CommandHandle, want: bytes) -> bytes:
    """Output chunks of a background command until ``want`` appears in them."""
    seen = b""
    while want not in seen:
        chunk = handle.next_chunk(timeout=STEP)
        assert chunk is not None, f"ended before {want!r}: {seen!r}"
        seen += chunk[1]
    return seen


def pty_until(pty: capsule.PtyHandle, want: bytes) -> bytes:
    """What a terminal shows until ``want`` appears."""
    seen = b""
    while want not in seen:
        chunk = pty.next_chunk(timeout=STEP)
        assert chunk is not None, f"ended before {want!r}: {seen!r}"
        seen += chunk
    return seen


def probe_part(c: Capsule) -> None:
    """What the probe does: its verbs in the background and streamed to callbacks; the rest
    is refused."""
    chunks: list[str] = []
    echo = c.commands.run("echo streamed", background=True, on_stdout=chunks.append)
    result = echo.wait(timeout=STEP)
    print(f"background: pid {echo.pid}, exit {result.exit_code}, callback {''.join(chunks)!r}")

    spin = c.commands.run("spin 100000000000", background=True)
    still = "no"
    try:
        spin.wait(timeout=0.2)
    except capsule.TimeoutError as e:
        still = e.timeout_kind
    spin.kill()
    killed = spin.wait(timeout=STEP)
    print(f"kill: wait timed out ({still}), then signal {killed.signal}")

    refused = []
    calls: list[tuple[str, Callable[[], object]]] = [
        ("stdin", lambda: c.commands.run("echo x", stdin="input")),
        ("user", lambda: c.commands.run("echo x", user="root")),
        ("argv", lambda: c.commands.run(["echo", "x"])),
        ("list", c.commands.list),
        ("files", lambda: c.files.read("/etc/hostname")),
        ("pty", c.pty.create),
    ]
    for name, call in calls:
        try:
            call()
        except capsule.UnsupportedError:
            refused.append(name)
    print(f"unsupported: {','.join(refused)}")


def linux_part(c: Capsule) -> None:
    """Everything, on a Linux capsule."""
    # A background command fed on stdin; its output streamed to a callback, on a thread of
    # the command's own.
    chunks: list[str] = []
    threads: set[int] = set()

    def collect(text: str) -> None:
        chunks.append(text)
        threads.add(threading.get_ident())

    tr = c.commands.run("tr a-z A-Z", background=True, on_stdout=collect)
    tr.send_stdin("hello ")
    tr.send_stdin(b"capsule\n")
    tr.close_stdin()
    result = tr.wait(timeout=STEP)
    own_thread = threading.get_ident() not in threads
    print(f"stdin: {''.join(chunks).strip()} exit {result.exit_code} own thread {own_thread}")

    # Callbacks on a foreground run: stdout and stderr as they come; a character cut by a
    # chunk boundary arrives whole (two writes 0.2 s apart: two chunks).
    out: list[str] = []
    err: list[str] = []
    result = c.commands.run(
        "echo one; sleep 0.2; echo two >&2; printf '\\303'; sleep 0.2; printf '\\251\\n'",
        on_stdout=out.append,
        on_stderr=err.append,
        timeout=STEP,
    )
    text = "".join(out)
    whole = text == "one\n\u00e9\n"
    print(f"callbacks: whole {whole} stderr {''.join(err).strip()} kept {result.stdout == text}")

    # A signal the command handles; argv form, without a shell.
    trap = c.commands.run(
        ["sh", "-c", "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.1; done"],
        background=True,
    )
    read_until(trap, b"ready")
    trap.signal(signal.SIGTERM)
    result = trap.wait(timeout=STEP)
    print(f"signal: exit {result.exit_code} {result.stdout.strip()}")

    # The process list, connect (which detaches the old handle) and kill by pid.
    sleeper = c.commands.run("sleep 300", background=True)
    listed = [p for p in c.commands.list() if p.pid == sleeper.pid]
    again = c.commands.connect(sleeper.pid)
    try:
        sleeper.wait(timeout=STEP)
        detached = False
    except capsule.ProcessDetachedError:
        detached = True
    c.commands.kill(sleeper.pid)
    result = again.wait(timeout=STEP)
    deadline = time.monotonic() + STEP
    while any(p.pid == sleeper.pid for p in c.commands.list()):
        assert time.monotonic() < deadline, "the killed process is still listed"
        time.sleep(0.1)
    commands = [p.command for p in listed]
    recent = all(abs(datetime.now(timezone.utc) - p.started_at) < RECENT for p in listed)
    print(
        f"processes: listed {commands} recent {recent} detached {detached} "
        f"killed {result.signal}"
    )
    try:
        c.commands.connect(sleeper.pid)
        print("connect: no error")
    except capsule.ProcessNotFoundError as e:
        print(f"connect: ProcessNotFoundError {isinstance(e, ProcessLookupError)}")

    # A process across a pause: its handle is detached, connect gets the rest and the exit.
    late = c.commands.run('echo started; read x; echo "got $x"; exit 4', background=True)
    read_until(late, b"started")
    c.pause()
    c.resume()
    try:
        late.wait(timeout=STEP)
        detached = False
    except capsule.ProcessDetachedError:
        detached = True
    listed_after = any(p.pid == late.pid for p in c.commands.list())
    late = c.commands.connect(late.pid)
    late.send_stdin("hello\n")
    result = late.wait(timeout=STEP)
    print(
        f"pause: detached {detached} listed {listed_after} "
        f"reconnected exit {result.exit_code} {result.stdout.strip()}"
    )

    # Files in and out.
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    c.files.write("/tmp/py-io/in/data.bin", data, mode=0o600)
    same = c.files.read("/tmp/py-io/in/data.bin") == data
    st = c.files.stat("/tmp/py-io/in/data.bin")
    c.files.write("/tmp/py-io/note.txt", "héllo")
    c.files.make_dir("/tmp/py-io/empty")
    names = [f"{e.path.removeprefix('/tmp/py-io/')}:{e.type}" for e in c.files.list("/tmp/py-io", depth=2)]
    c.files.rename("/tmp/py-io/note.txt", "/tmp/py-io/moved.txt")
    text = c.files.read_text("/tmp/py-io/moved.txt")
    recent = abs(datetime.now(timezone.utc) - st.modified) < RECENT
    print(
        f"files: roundtrip {same} size {st.size} mode {oct(st.mode)} {st.type} "
        f"recent {recent} text {text == 'héllo'}"
    )
    print(f"list: {' '.join(names)}")
    with tempfile.TemporaryDirectory() as tmp:
        host_in = os.path.join(tmp, "up.bin")
        host_out = os.path.join(tmp, "down.bin")
        blob = os.urandom(3 * 1024 * 1024 + 5)
        with open(host_in, "wb") as out_file:
            out_file.write(blob)
        up = c.files.upload(host_in, "/tmp/py-io/up.bin")
        down = c.files.download("/tmp/py-io/up.bin", host_out)
        with open(host_out, "rb") as in_file:
            back = in_file.read() == blob
    print(f"transfer: up {up} down {down} same {back}")

    # Streams from and to Python file objects, each request with a 30 s timeout; an
    # exception of a file object is raised as it is, and a write it cut leaves the old file.
    files = c.files.with_timeout(30)
    blob = os.urandom(3 * 1024 * 1024 + 3)
    up = files.write_from("/tmp/py-io/stream.bin", io.BytesIO(blob), mode=0o640)
    sink = io.BytesIO()
    down = files.read_into("/tmp/py-io/stream.bin", sink)
    same = sink.getvalue() == blob
    assert up == down == len(blob) and same, (up, down, same)
    mode = files.stat("/tmp/py-io/stream.bin").mode

    class Full:
        """A file object whose ``write`` fails."""

        def write(self, data: bytes, /) -> int:
            raise RuntimeError("stop")

    class Failing:
        """A file object whose second ``read`` fails."""

        def __init__(self) -> None:
            self.reads = 0

        def read(self, size: int, /) -> bytes:
            self.reads += 1
            if self.reads > 1:
                raise RuntimeError("stop")
            return bytes(size)

    raised = []
    streams: list[Callable[[], object]] = [
        lambda: files.read_into("/tmp/py-io/stream.bin", Full()),
        lambda: files.write_from("/tmp/py-io/stream.bin", Failing()),
    ]
    for stream in streams:
        try:
            stream()
            raised.append("nothing")
        except RuntimeError as e:
            raised.append(f"{type(e).__name__}:{e}")
    kept = files.read("/tmp/py-io/stream.bin") == blob
    print(
        f"stream: up {up} down {down} same {same} mode {oct(mode)} "
        f"raised {' '.join(raised)} kept {kept}"
    )
    c.files.remove("/tmp/py-io")
    errors = []
    reads: list[Callable[[], object]] = [
        lambda: c.files.read("/tmp/py-io/moved.txt"),
        lambda: c.files.read("/tmp"),
    ]
    for read in reads:
        try:
            read()
        except capsule.FileError as e:
            errors.append(f"{type(e).__name__}:{e.kind}:{isinstance(e, OSError)}")
    print(f"file errors: {' '.join(errors)} exists {c.files.exists('/tmp/py-io')}")

    # Another user: added to the guest's passwd through the files API.
    passwd = c.files.read_text("/etc/passwd")
    c.files.write("/etc/passwd", passwd + "tester:x:1000:1000::/home/tester:/bin/sh\n")
    c.files.write("/etc/group", c.files.read_text("/etc/group") + "tester:x:1000:\n")
    who = c.commands.run("id -u; echo $HOME", user="tester", timeout=STEP).stdout.split()
    try:
        c.commands.run("true", user="nobody-here", timeout=STEP)
        unknown = "accepted"
    except capsule.InvalidArgumentError:
        unknown = "refused"
    print(f"user: {' '.join(who)} unknown {unknown}")

    # A terminal: an interactive shell that answers, reports its size, and resizes.
    pty = c.pty.create(rows=24, cols=80)
    pty.write(b"stty size\n")
    pty_until(pty, b"24 80")
    pty.resize(50, 132)
    pty.write("stty size\n")
    pty_until(pty, b"50 132")
    pty.write(b"exit 3\n")
    result = pty.wait(timeout=STEP)
    print(f"pty: 24 80 then 50 132, exit {result.exit_code}")


c = Capsule(template=TEMPLATE, timeout=300, wait=True)
try:
    if TEMPLATE == "probe":
        probe_part(c)
    else:
        linux_part(c)
finally:
    c.destroy()
print("done")
