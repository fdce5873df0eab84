"""ConnectionLimiter in one process and across real forked processes."""

from __future__ import annotations

import os
import select
import signal
import struct
import time
from collections.abc import Callable

import pytest

from relaygate.config import ConnectionLimitsConfig
from relaygate.server.connlimit import ConnectionLimiter

T0 = 1_800_000_000.0  # the start of a minute (divisible by 60)
CHILD_TIMEOUT = 20.0


def limiter(concurrent: int = 0, per_minute: int = 0, slots: int = 8192) -> ConnectionLimiter:
    return ConnectionLimiter(ConnectionLimitsConfig(concurrent, per_minute), slots=slots)


# ------------------------------------------------------------------ one process


def test_concurrent_limit() -> None:
    limits = limiter(concurrent=3)
    assert [limits.open("192.0.2.1", T0) for _ in range(3)] == [None, None, None]
    assert limits.open("192.0.2.1", T0) == "concurrent"
    assert limits.open("192.0.2.2", T0) is None  # another client
    assert limits.usage("192.0.2.1", T0) == (3, 3)  # the refused one is not counted
    limits.close("192.0.2.1")
    assert limits.open("192.0.2.1", T0 + 1) is None
    assert limits.open("192.0.2.1", T0 + 1) == "concurrent"


def test_rate_limit_per_minute() -> None:
    limits = limiter(per_minute=5)
    for _ in range(5):
        assert limits.open("192.0.2.1", T0 + 10) is None
        limits.close("192.0.2.1")
    assert limits.open("192.0.2.1", T0 + 59.999) == "rate"
    assert limits.usage("192.0.2.1", T0 + 59) == (0, 5)
    assert limits.open("192.0.2.1", T0 + 60) is None  # a new minute
    assert limits.usage("192.0.2.1", T0 + 60) == (1, 1)


def test_exempt_networks_are_never_limited_or_counted() -> None:
    limits = ConnectionLimiter(
        ConnectionLimitsConfig(1, 1, exempt=("127.0.0.0/8", "::1/128", "10.0.0.0/8"))
    )
    for ip in ("127.0.0.1", "127.9.9.9", "::1", "10.1.2.3", "::ffff:10.1.2.3"):
        assert [limits.open(ip, T0) for _ in range(3)] == [None] * 3
        assert limits.usage(ip, T0) == (0, 0)
        limits.close(ip)


def test_ipv6_counts_per_slash64_and_mapped_ipv4_as_ipv4() -> None:
    limits = limiter(concurrent=2)
    assert limits.open("2001:db8:1:2::1", T0) is None
    assert limits.open("2001:db8:1:2::ffff", T0) is None
    assert limits.open("2001:db8:1:2:abcd::1", T0) == "concurrent"
    assert limits.open("2001:db8:1:3::1", T0) is None
    assert limits.open("192.0.2.1", T0) is None
    assert limits.open("::ffff:192.0.2.1", T0) is None
    assert limits.open("192.0.2.1", T0) == "concurrent"


def test_non_ip_clients_are_limited_by_name() -> None:
    limits = limiter(concurrent=1)
    assert limits.open("?", T0) is None
    assert limits.open("?", T0) == "concurrent"


def test_close_never_goes_below_zero() -> None:
    limits = limiter(concurrent=1)
    limits.close("192.0.2.1")  # never opened
    limits.close("192.0.2.1")
    assert limits.open("192.0.2.1", T0) is None
    limits.close("192.0.2.1")
    limits.close("192.0.2.1")
    assert limits.usage("192.0.2.1", T0) == (0, 1)
    assert limits.open("192.0.2.1", T0) is None
    assert limits.open("192.0.2.1", T0) == "concurrent"


def test_zero_limits_are_off() -> None:
    limits = limiter()
    assert all(limits.open("192.0.2.1", T0) is None for _ in range(1000))
    assert limits.usage("192.0.2.1", T0) == (0, 0)


def test_leaked_counts_are_forgotten_after_an_hour() -> None:
    # A worker killed with connections open never calls close().
    limits = limiter(concurrent=2)
    limits.open("192.0.2.1", T0)
    limits.open("192.0.2.1", T0)
    assert limits.open("192.0.2.1", T0 + 3600) == "concurrent"
    assert limits.open("192.0.2.1", T0 + 3660) is None  # 61 minutes without a new connection
    assert limits.usage("192.0.2.1", T0 + 3660) == (1, 1)


def test_full_table_fails_open_and_idle_slots_are_reused() -> None:
    limits = limiter(concurrent=1, slots=1)
    assert limits.open("192.0.2.1", T0) is None
    # The one slot holds a live client: another is let through uncounted.
    assert limits.open("192.0.2.2", T0) is None
    assert limits.open("192.0.2.2", T0) is None
    assert limits.usage("192.0.2.2", T0) == (0, 0)
    # Once a client has nothing open and its minute is over, its slot is free.
    limits.close("192.0.2.1")
    assert limits.open("192.0.2.2", T0 + 30) is None  # same minute: .1's count still holds
    assert limits.usage("192.0.2.2", T0 + 30) == (0, 0)
    assert limits.open("192.0.2.2", T0 + 60) is None
    assert limits.open("192.0.2.2", T0 + 60) == "concurrent"
    assert limits.usage("192.0.2.1", T0 + 60) == (0, 0)  # gave its slot up


def test_many_clients_are_kept_apart() -> None:
    limits = limiter(concurrent=1, slots=8192)
    ips = [f"10.{i >> 8}.{i & 255}.1" for i in range(1500)] + [
        f"2001:db8:{i:x}::1" for i in range(1500)
    ]
    assert all(limits.open(ip, T0) is None for ip in ips)
    refused = sum(limits.open(ip, T0) == "concurrent" for ip in ips)
    assert refused == len(ips)  # every one has a slot of its own


def test_lock_timeout_fails_open_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    from relaygate.server import connlimit

    monkeypatch.setattr(connlimit, "_LOCK_TIMEOUT", 0.01)
    limits = limiter(concurrent=1)
    limits._lock.acquire()  # as if a worker died holding it
    try:
        assert limits.open("192.0.2.1", T0) is None
        assert limits.open("192.0.2.1", T0 + 1) is None  # skipped without waiting
    finally:
        limits._lock.release()
    assert limits.open("192.0.2.1", T0 + 30) is None  # still backing off: uncounted
    assert limits.open("192.0.2.1", T0 + 61) is None  # counted again
    assert limits.open("192.0.2.1", T0 + 61) == "concurrent"


def test_rejects_an_empty_table() -> None:
    with pytest.raises(ValueError, match="slots"):
        limiter(slots=0)


# ------------------------------------------------------------------ forked processes


def in_child(limits: ConnectionLimiter, work: Callable[[ConnectionLimiter], bytes]) -> bytes:
    """Run ``work`` in a forked child; its result comes back through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            os.close(read_end)
            os.write(write_end, work(limits))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        chunks = []
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail("child process timed out")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        while True:  # the pipe closed: the child is exiting
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("child process did not exit")
            time.sleep(0.005)
        assert os.waitstatus_to_exitcode(status) == 0
        return b"".join(chunks)
    finally:
        os.close(read_end)


def run_children(
    limits: ConnectionLimiter, count: int, work: Callable[[ConnectionLimiter], bytes]
) -> list[bytes]:
    """Like in_child, but ``count`` children at once, released together."""
    go_read, go_write = os.pipe()
    children: list[tuple[int, int]] = []
    for _ in range(count):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(read_end)
                os.close(go_write)
                select.select([go_read], [], [], CHILD_TIMEOUT)  # start together
                os.write(write_end, work(limits))
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        children.append((pid, read_end))
    os.close(go_read)
    os.close(go_write)  # EOF on go_read: every child starts now
    results = []
    deadline = time.monotonic() + CHILD_TIMEOUT
    try:
        for pid, read_end in children:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                pytest.fail("child process timed out")
            results.append(os.read(read_end, 65536))
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    pytest.fail("child process did not exit")
                time.sleep(0.005)
    finally:
        for pid, read_end in children:
            os.close(read_end)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return results


def test_children_share_the_counts() -> None:
    limits = limiter(concurrent=3)

    def open_two(shared: ConnectionLimiter) -> bytes:
        return repr([shared.open("192.0.2.1", T0) for _ in range(2)]).encode()

    assert in_child(limits, open_two) == b"[None, None]"
    # The parent sees the child's two connections; they count against the limit.
    assert limits.usage("192.0.2.1", T0) == (2, 2)
    assert limits.open("192.0.2.1", T0) is None
    assert in_child(limits, open_two) == b"['concurrent', 'concurrent']"

    def close_all(shared: ConnectionLimiter) -> bytes:
        for _ in range(3):
            shared.close("192.0.2.1")
        return b"ok"

    assert in_child(limits, close_all) == b"ok"
    assert limits.usage("192.0.2.1", T0) == (0, 3)


def test_concurrent_children_never_exceed_the_limit() -> None:
    limits = limiter(concurrent=10)

    def grab(shared: ConnectionLimiter) -> bytes:
        allowed = sum(shared.open("198.51.100.7", T0) is None for _ in range(25))
        return struct.pack("=I", allowed)

    results = run_children(limits, 4, grab)
    assert sum(struct.unpack("=I", r)[0] for r in results) == 10
    assert limits.usage("198.51.100.7", T0) == (10, 10)


def test_concurrent_children_count_exactly() -> None:
    # Many open/close pairs from four processes at once: the lock must lose none.
    limits = limiter(concurrent=1000, per_minute=1_000_000)
    rounds = 2000

    def churn(shared: ConnectionLimiter) -> bytes:
        refused = 0
        for _ in range(rounds):
            if shared.open("203.0.113.5", T0) is None:
                shared.close("203.0.113.5")
            else:
                refused += 1
        return struct.pack("=I", refused)

    results = run_children(limits, 4, churn)
    assert [struct.unpack("=I", r)[0] for r in results] == [0, 0, 0, 0]
    assert limits.usage("203.0.113.5", T0) == (0, 4 * rounds)
