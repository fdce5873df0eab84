"""relaygate verify's sans-IO core: syntax, IDN, role, disposable, and the
rules from DNS facts and RCPT replies to a result with reasons."""

from __future__ import annotations

import pytest

from relaygate.verify.cache import TTLCache
from relaygate.verify.classify import Parsed, Probe, Reply, decide, is_disposable, is_role, parse
from relaygate.verify.domain_check import refusal
from relaygate.verify.verifier import DomainAnswer


def parsed(text: str) -> Parsed:
    found = parse(text)
    assert isinstance(found, Parsed), found
    return found


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no-at-sign",
        "a@@b.test",
        "a..b@x.test",
        ".a@x.test",
        "a@-x.test",
        "a@x..test",
        "a@localhost",
        "a@[127.0.0.1]",
        "a\r\nRCPT TO:<b@x.test>@x.test",
        "a\x00@x.test",
        "\x1b[31mred@x.test",
        "x" * 65 + "@x.test",
        "a@" + "b" * 64 + ".test",
        "a@" + ".".join(["abcdefghi"] * 30) + ".test",
        '"unclosed@x.test',
    ],
)
def test_malformed_addresses_are_syntax_errors(text: str) -> None:
    found = parse(text)
    assert isinstance(found, str) and found
    verdict = decide(text, found)
    assert (verdict.result, verdict.reasons) == ("undeliverable", ["syntax"])


def test_quoted_local_parts_and_plus_tags_pass() -> None:
    assert parsed('"john smith"@example.test').local == '"john smith"'
    assert parsed("a+tag@example.test").domain == "example.test"
    assert parsed("<a@Example.TEST>").domain == "example.test"


def test_idn_domains_become_a_labels() -> None:
    assert parsed("user@bücher.example").domain == "xn--bcher-kva.example"
    assert parsed("用户@例子.测试").domain == "xn--fsqu00a.xn--0zwm56d"
    assert isinstance(parse("a@xn--zz.test"), str)  # an invalid A-label


def test_role_and_disposable() -> None:
    assert is_role("postmaster") and is_role("Info") and is_role("noreply+x")
    assert not is_role("alice")
    assert is_disposable("mailinator.com") and is_disposable("sub.mailinator.com")
    assert not is_disposable("example.com")


def test_dns_facts() -> None:
    p = parsed("a@x.test")
    for kind, reason, result in [
        ("no_domain", "no_domain", "undeliverable"),
        ("null_mx", "null_mx", "undeliverable"),
        ("no_mx", "no_mx", "undeliverable"),
        ("timeout", "timeout", "unknown"),
        ("no_mx_address", "no_mx", "unknown"),
    ]:
        verdict = decide("a@x.test", p, dns_kind=kind, dns_text="550\x1b[2J text\r\n")
        assert (verdict.result, verdict.reasons) == (result, [reason])
        assert "\x1b" not in verdict.detail and "\r" not in verdict.detail


def test_dns_only_results() -> None:
    assert decide("a@x.test", parsed("a@x.test"), mx=["mx.x.test"]).result == "deliverable"
    verdict = decide("info@mailinator.com", parsed("info@mailinator.com"))
    assert (verdict.result, verdict.reasons) == ("risky", ["disposable", "role"])


def probe_verdict(probe: Probe, address: str = "a@x.test") -> tuple[str, list[str], object]:
    verdict = decide(address, parsed(address), mx=["mx.x.test"], probe=probe)
    return verdict.result, verdict.reasons, verdict.catch_all


def test_replies_to_results() -> None:
    ok, no, later = Reply(250, "2.1.5 Ok"), Reply(550, "5.1.1 No"), Reply(450, "4.2.0 Later")
    assert probe_verdict(Probe(rcpt=ok, random_rcpt=no)) == ("deliverable", [], False)
    assert probe_verdict(Probe(rcpt=ok, random_rcpt=ok)) == ("risky", ["catch_all"], True)
    assert probe_verdict(Probe(rcpt=ok, random_rcpt=later)) == ("deliverable", [], None)
    assert probe_verdict(Probe(rcpt=ok, catch_all=True)) == ("risky", ["catch_all"], True)
    assert probe_verdict(Probe(rcpt=no)) == ("undeliverable", ["mailbox_unknown"], None)
    assert probe_verdict(Probe(rcpt=later)) == ("unknown", ["greylisted"], None)
    assert probe_verdict(Probe(failure="timeout", failure_text="t")) == (
        "unknown",
        ["timeout"],
        None,
    )
    assert probe_verdict(Probe(rcpt=Reply(354, "?"))) == ("unknown", ["unexpected_reply"], None)


def test_remote_text_is_cleaned() -> None:
    reply = Reply.of(550, "5.1.1 no\r\nsuch\x00 user \x1b[31m\udcff")
    assert reply.text == "5.1.1 no such\\x00 user \\x1b[31m\\xff"
    verdict = decide("a@x.test", parsed("a@x.test"), probe=Probe(rcpt=reply))
    assert verdict.as_json()["smtp"] == {"code": 550, "text": reply.text}


def test_rcpt_time_refusals() -> None:
    assert refusal("x.test", DomainAnswer(kind="no_domain")) == (
        b"550 5.1.2 Domain x.test does not exist\r\n"
    )
    assert refusal("x.test", DomainAnswer(kind="null_mx")) == (
        b"550 5.1.2 Domain x.test accepts no mail (null MX)\r\n"
    )
    assert refusal("x.test", DomainAnswer(kind="timeout")) == (
        b"451 4.4.3 DNS lookup for x.test timed out, try again later\r\n"
    )
    assert refusal("x.test", DomainAnswer(kind="private")) is None
    assert refusal("x.test", DomainAnswer()) is None


def test_cache_expires_and_is_bounded() -> None:
    now = [0.0]
    cache: TTLCache[int] = TTLCache(2, clock=lambda: now[0])
    cache.put("a", 1, 10)
    cache.put("b", 2, 10)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3, 10)
    assert (cache.get("b"), cache.get("a"), cache.get("c")) == (None, 1, 3)
    now[0] = 10.0
    assert cache.get("a") is None and len(cache) == 1
