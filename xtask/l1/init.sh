#!/bin/sh
# /init of the L1 VM booted by `cargo xtask nested-test` (see xtask/README.md).
# Loads KVM (nested SVM under QEMU TCG), runs every test binary in /nested/tests, then
# /nested/linux-report when packed (`--linux-report`: JSON metric lines), prints NESTED-* marker
# lines that the xtask parses, and ends the VM with an exit code through
# QEMU's isa-debug-exit device: 0 all tests passed, 1 a test binary failed, 2 L1 set-up failed.
export PATH=/bin

finish() {
    echo "NESTED-DONE rc=$1"
    sync
    /bin/nested-exit "$1"
    poweroff -f
}
fail_setup() {
    echo "NESTED-ERROR $*"
    finish 2
}

mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc || fail_setup "cannot mount /proc"
mount -t sysfs sysfs /sys || fail_setup "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail_setup "cannot mount devtmpfs on /dev"
# Pseudo-terminals, for the tests that open one on the host side (the engine's unit tests
# run a real agent, whose terminals need /dev/ptmx and /dev/pts).
mkdir -p /dev/pts
mount -t devpts -o ptmxmode=0666 devpts /dev/pts || fail_setup "cannot mount devpts on /dev/pts"
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777 tmpfs /tmp || fail_setup "cannot mount tmpfs on /tmp"
# KVM's event counters for linux-report (/sys/kernel/debug/kvm); optional.
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
echo # ends the firmware's last line
echo "NESTED-INIT kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs, $(grep MemTotal /proc/meminfo | tr -s ' ')"

while read -r module params; do
    [ -n "$module" ] || continue
    # shellcheck disable=SC2086 # one argument per parameter
    insmod "/nested/modules/$module" $params || fail_setup "insmod $module $params failed"
done < /nested/modules.list
dmesg | grep -i -E 'kvm|svm' | sed 's/^/NESTED-DMESG /'
[ -c /dev/kvm ] || fail_setup "no /dev/kvm after loading the KVM modules"
echo "NESTED-KVM-READY $(grep -o -w -m1 -E 'svm|vmx' /proc/cpuinfo) $(ls -l /dev/kvm)"

. /nested/config.sh
# Extra libtest arguments (the filter), one per line.
set --
while IFS= read -r arg; do
    set -- "$@" "$arg"
done < /nested/args

mkdir -p /tmp/home
export HOME=/tmp/home TMPDIR=/tmp RUST_BACKTRACE=1
export CAPSULE_NESTED=1 CAPSULE_NESTED_EXTRA=/nested/extra

if [ -x /nested/host-report ]; then
    echo "NESTED-HOST-BEGIN"
    /nested/host-report </dev/null 2>&1
    echo "NESTED-HOST-END rc=$?"
fi

# The names libtest lists as failed at the end of the output in $1: the indented lines of
# its last "failures:" block (the one before "test result:").
failed_tests() {
    last=$(grep -n '^failures:$' "$1" | tail -n 1 | sed 's/:.*//')
    [ -n "$last" ] || return 0
    tail -n "+$last" "$1" | sed -n '/^test result:/q;p' | grep -E '^    [A-Za-z0-9_:]+$' |
        sed 's/^ *//'
}

# After an L1 run that broke down (xtask/README.md), /nested/resume.list says what it saw
# end: `done BINARY` (not run again) and `passed BINARY TEST` (skipped in that binary).
touch /nested/resume.list
done_list=" $(sed -n 's/^done //p' /nested/resume.list | tr '\n' ' ') "

# Heartbeat: every 60 s a NESTED-HB line with L1's uptime and load; once the test output has
# not grown for two beats, also every thread of each process run from /nested (the test
# binaries, the examples): name, state, kernel wait channel, CPU ticks. A silent console then
# tells an L1 that hung (no heartbeat either) from a test that is stuck while L1 runs on, and
# the threads say where (the xtask does not count these lines as output).
(
    size=-1
    quiet=0
    while sleep 60; do
        echo "NESTED-HB uptime $(cut -d' ' -f1 /proc/uptime) load $(cut -d' ' -f1-3 /proc/loadavg)"
        now=$(wc -c </tmp/test-output 2>/dev/null || echo 0)
        if [ "$now" = "$size" ]; then quiet=$((quiet + 1)); else quiet=0; fi
        size=$now
        [ "$quiet" -ge 2 ] || continue
        for p in /proc/[0-9]*; do
            exe=$(readlink "$p/exe" 2>/dev/null) || continue
            case "$exe" in /nested/*) ;; *) continue ;; esac
            for t in "$p"/task/*; do
                stat=$(cat "$t/stat" 2>/dev/null) || continue
                # Fields after the name: state, then utime and stime are the 12th and 13th.
                rest=${stat##*) }
                set -- $rest
                echo "NESTED-HB   ${p#/proc/}/${t##*/} $(cat "$t/comm" 2>/dev/null) $1 $(cat "$t/wchan" 2>/dev/null) ticks $((${12} + ${13}))"
            done
        done
    done
) &

failed=0
while IFS= read -r name; do
    [ -n "$name" ] || continue
    case "$done_list" in
    *" $name "*)
        echo "NESTED-TEST-SKIP $name (finished in an earlier L1 run)"
        continue
        ;;
    esac
    # libtest's --skip matches substrings: a test is skipped only if no other test's name
    # contains its own.
    skips=""
    tests=$(sed -n "s/^passed $name //p" /nested/resume.list)
    if [ -n "$tests" ]; then
        "/nested/tests/$name" --list </dev/null 2>/dev/null | sed -n 's/: test$//p' >/tmp/names
        for test in $tests; do
            [ "$(grep -c -F -- "$test" /tmp/names)" = 1 ] && skips="$skips --skip $test"
        done
        echo "NESTED-TEST-RESUMED $name:$skips"
    fi
    echo "NESTED-TEST-BEGIN $name"
    # shellcheck disable=SC2086 # one argument per word of $skips
    { "/nested/tests/$name" --test-threads="$TEST_THREADS" "$@" $skips </dev/null 2>&1; echo $? >/tmp/rc; } |
        tee /tmp/test-output
    rc=$(cat /tmp/rc)
    echo "NESTED-TEST-END $name rc=$rc"
    [ "$rc" -eq 0 ] && continue
    # TCG's emulation of nested SVM corrupts guest state now and then (see xtask/README.md):
    # tests that failed run once more, alone; the summary reports them as flaky.
    retry=$(failed_tests /tmp/test-output | tr '\n' ' ')
    if [ "$RETRY_FAILED" = 1 ] && [ -n "$retry" ]; then
        echo "NESTED-RETRY-BEGIN $name $retry"
        # shellcheck disable=SC2086 # one argument per test name
        "/nested/tests/$name" --test-threads=1 --exact $retry </dev/null 2>&1
        rc=$?
        echo "NESTED-RETRY-END $name rc=$rc"
    fi
    [ "$rc" -eq 0 ] || failed=1
done < /nested/tests.list

if [ -x /nested/linux-report ]; then
    echo "NESTED-REPORT-BEGIN"
    /nested/linux-report </dev/null 2>&1
    rc=$?
    echo "NESTED-REPORT-END rc=$rc"
    [ "$rc" -eq 0 ] || failed=1
fi
finish "$failed"
