"""The benchmark's pure helpers: message building, statistics, /proc parsing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is made
    spec.loader.exec_module(module)
    return module


loadgen = _load("loadgen")
run = _load("run")


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert loadgen.percentile(values, 50) == 50.0
    assert loadgen.percentile(values, 99) == 99.0
    assert loadgen.percentile(values, 100) == 100.0
    assert loadgen.percentile([7.0], 1) == 7.0
    assert loadgen.percentile([], 50) == 0.0


def test_summarize_latencies_in_ms() -> None:
    summary = loadgen.summarize_latencies([0.003, 0.001, 0.002])
    assert summary["n"] == 3
    assert summary["p50_ms"] == 2.0
    assert summary["max_ms"] == 3.0
    assert summary["mean_ms"] == 2.0
    assert loadgen.summarize_latencies([])["n"] == 0


def test_dot_stuffing() -> None:
    assert loadgen.dot_stuff(b".a\r\nb\r\n.\r\n..c\r\n") == b"..a\r\nb\r\n..\r\n...c\r\n"
    assert loadgen.dot_stuff(b"no dots\r\n") == b"no dots\r\n"


@pytest.mark.parametrize("length", [2, 3, 77, 78, 79, 80, 1000, 4000, 65536])
def test_body_has_exact_length_and_clean_lines(length: int) -> None:
    body = loadgen.make_body(length)
    assert len(body) == length
    assert body.endswith(b"\r\n")
    assert b"\n" not in body.replace(b"\r\n", b"")
    assert b"\r" not in body.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in body.split(b"\r\n"))


def test_body_exercises_dot_stuffing() -> None:
    assert b"\r\n." in loadgen.make_body(4096)


def test_message_size_headers_and_payload() -> None:
    message = loadgen.make_message(
        "user1@example.test",
        "rcpt1@remote.example.net",
        4096,
        "Subject text",
        "1.2.3@loadgen.bench.test",
        "Sun, 29 Nov 2026 01:45:00 GMT",
    )
    assert len(message) == 4096
    head, _, _ = message.partition(b"\r\n\r\n")
    names = {line.split(b":", 1)[0] for line in head.split(b"\r\n")}
    assert {b"From", b"To", b"Subject", b"Date", b"Message-ID"} <= names
    payload = loadgen.data_payload(message)
    assert payload.endswith(b"\r\n.\r\n")
    # Undo the stuffing: every line that starts with '.' had it doubled.
    lines = payload[: -len(b".\r\n")].split(b"\r\n")
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines)
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    assert unstuffed == message


def test_users_from_patterns_and_file(tmp_path: Path) -> None:
    users = loadgen.load_users(None, "u{i}@x.test", "pw{i}", 3, 5)
    assert users == [("u5@x.test", "pw5"), ("u6@x.test", "pw6"), ("u7@x.test", "pw7")]
    listing = tmp_path / "users.txt"
    listing.write_text("# comment\na@x.test:secret:with:colons\n\nb@x.test:pw\n")
    assert loadgen.load_users(listing, "", "", 0) == [
        ("a@x.test", "secret:with:colons"),
        ("b@x.test", "pw"),
    ]
    listing.write_text("nocolon\n")
    with pytest.raises(ValueError, match="bad line"):
        loadgen.load_users(listing, "", "", 0)


def test_split_evenly_adds_up() -> None:
    for total in (1, 7, 20, 101):
        for parts in (1, 2, 3, 8):
            shares = [loadgen.split_evenly(total, parts, k) for k in range(parts)]
            assert sum(shares) == total
            assert max(shares) - min(shares) <= 1


def test_only_loopback_targets() -> None:
    assert loadgen.loopback_addresses("127.0.0.1", 25) == ["127.0.0.1"]
    assert loadgen.loopback_addresses("127.5.6.7", 25) == ["127.5.6.7"]
    for host in ("10.0.0.1", "192.168.1.1", "8.8.8.8", "::2"):
        with pytest.raises(ValueError, match="non-loopback"):
            loadgen.loopback_addresses(host, 25)


def test_ehlo_keywords() -> None:
    texts = ["mx.example greets you", "PIPELINING", "size 1000", "AUTH PLAIN LOGIN"]
    assert loadgen.ehlo_keywords(texts) == {"PIPELINING", "SIZE", "AUTH"}


def test_results_merge_round_trip() -> None:
    one = loadgen.Results(accepted=2, attempted=3, duration_s=1.5)
    one.failures["eod:451"] += 1
    one.message_latencies += [0.001, 0.002]
    merged = loadgen.Results()
    merged.merge_json(one.to_json())
    merged.merge_json(one.to_json())
    assert merged.accepted == 4
    assert merged.attempted == 6
    assert merged.failures["eod:451"] == 2
    assert len(merged.message_latencies) == 4
    assert merged.duration_s == 1.5


def test_step_failure_reason_and_code() -> None:
    failure = loadgen.StepFailed("rcpt", "550", "no")
    assert failure.reason == "rcpt:550"
    assert failure.code == 550
    assert loadgen.StepFailed("eod", "timeout").code is None


def test_parse_proc_stat_with_odd_command_name() -> None:
    fields = " ".join(str(n) for n in range(5, 53))
    line = f"1234 (we (ird) name) S 77 {fields}\n"
    ppid, ticks = run.parse_proc_stat(line)
    assert ppid == 77
    # utime..cstime are fields 14..17, which hold 14..17 in this made-up line.
    assert ticks == 14 + 15 + 16 + 17


def test_parse_machine_busy() -> None:
    text = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
    assert run.parse_machine_busy(text) == pytest.approx(161 / run.CLOCK_TICKS)
    with pytest.raises(ValueError, match="no 'cpu' line"):
        run.parse_machine_busy("intr 1 2 3\n")


def test_tree_members() -> None:
    table = {1: (0, 0), 10: (1, 5), 11: (10, 5), 12: (11, 5), 20: (1, 5), 21: (20, 5)}
    assert run.tree_members(table, [10]) == {10, 11, 12}
    assert run.tree_members(table, [10, 20]) == {10, 11, 12, 20, 21}
    assert run.tree_members(table, [99]) == set()


def test_tree_cpu_of_this_process_grows() -> None:
    pid = run.os.getpid()
    before = run.tree_cpu_seconds([pid])
    deadline = run.time.process_time() + 0.05
    while run.time.process_time() < deadline:
        pass
    assert run.tree_cpu_seconds([pid]) > before


def test_ratio() -> None:
    assert run.ratio(2.0, 4.0) == 0.5
    assert run.ratio(1.0, 0) is None
    assert run.ratio(None, 1.0) is None
