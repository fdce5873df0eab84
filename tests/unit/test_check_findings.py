"""The checklist of `relaygate check` (relaygate.audit.findings): every rule, no sockets."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest

from relaygate.audit.findings import (
    CHECK_IDS,
    Certificate,
    Observations,
    Reply,
    Result,
    Smuggling,
    evaluate,
    failed,
)
from relaygate.audit.probe import Settings, name_matches
from relaygate.audit.target import Target
from relaygate.audit.text import clean

NOW = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
GOOD_PLAIN = ["PIPELINING", "SIZE 1000", "STARTTLS"]
GOOD_TLS = ["PIPELINING", "SIZE 1000", "AUTH PLAIN LOGIN SCRAM-SHA-256"]


def good(**changes: object) -> Observations:
    """What a well-configured STARTTLS server looks like."""
    obs = Observations(
        implicit=False,
        now=NOW,
        greeting=Reply(220, "mail.example.com ESMTP"),
        ehlo_plain=list(GOOD_PLAIN),
        ehlo_plain_first="mail.example.com",
        starttls_reply=Reply(220, "2.0.0 go"),
        tls_version="TLSv1.3",
        ehlo_tls=list(GOOD_TLS),
        legacy_tls={"TLSv1": "refused", "TLSv1.1": "refused"},
        certificate=Certificate(NOW + timedelta(days=60), True, ("mail.example.com",), None),
        auth_before_tls=Reply(530, "5.7.0 Must issue a STARTTLS command first"),
        relay={
            "before TLS": [Reply(530, "5.7.0 STARTTLS first")],
            "after TLS": [Reply(250, "ok"), Reply(554, "5.7.1 Relay access denied")],
        },
    )
    for key, value in changes.items():
        setattr(obs, key, value)
    return obs


def by_id(results: list[Result]) -> dict[str, Result]:
    return {r.id: r for r in results}


def test_a_good_server_passes_everything_in_the_fixed_order() -> None:
    results = evaluate(good())
    assert [r.id for r in results] == [i for i in CHECK_IDS if i != "smuggling.bare_lf"]
    assert {r.status for r in results} == {"pass"}, results
    assert not failed(results)


def test_implicit_tls_has_no_starttls_check() -> None:
    results = by_id(evaluate(good(implicit=True, ehlo_plain=None, starttls_reply=None)))
    assert "starttls.offered" not in results
    assert results["auth.before_tls"].status == "pass"


def test_starttls_missing_refused_or_broken_fails() -> None:
    assert by_id(evaluate(good(ehlo_plain=["SIZE 1"])))["starttls.offered"].status == "fail"
    refused = by_id(evaluate(good(starttls_reply=Reply(454, "4.7.0 no"))))["starttls.offered"]
    assert (refused.status, refused.detail) == ("fail", "STARTTLS refused: 454 4.7.0 no")
    broken = evaluate(good(tls_error="handshake failure", ehlo_tls=None, tls_version=None))
    r = by_id(broken)
    assert r["starttls.offered"].detail == "STARTTLS handshake failed: handshake failure"
    assert r["tls.versions"].status == "fail"
    assert failed(broken)


@pytest.mark.parametrize(
    ("legacy", "negotiated", "status", "detail"),
    [
        (
            {"TLSv1": "accepted", "TLSv1.1": "refused"},
            "TLSv1.3",
            "fail",
            "TLS 1.0 accepted (RFC 8996 forbids them)",
        ),
        (
            {"TLSv1": "accepted", "TLSv1.1": "accepted"},
            "TLSv1.2",
            "fail",
            "TLS 1.0 and TLS 1.1 accepted (RFC 8996 forbids them)",
        ),
        (
            {"TLSv1": "refused", "TLSv1.1": "refused"},
            "TLSv1.2",
            "warn",
            "TLS 1.3 not offered (best: TLS 1.2)",
        ),
        (
            {"TLSv1": "untestable", "TLSv1.1": "refused"},
            "TLSv1.3",
            "warn",
            "could not test TLS 1.0 (local OpenSSL refuses it)",
        ),
    ],
)
def test_tls_versions(legacy: dict[str, str], negotiated: str, status: str, detail: str) -> None:
    obs = good(
        tls_version=negotiated,
        legacy_tls=legacy,
        legacy_errors={"TLSv1": "local OpenSSL refuses it"},
    )
    result = by_id(evaluate(obs))["tls.versions"]
    assert (result.status, result.detail) == (status, detail)


@pytest.mark.parametrize(
    ("days", "names_match", "chain_error", "status", "words"),
    [
        (60, True, None, "pass", "chain verified, name matches, valid until 2027-02-02"),
        (14, True, None, "warn", "expires in 14 days (2026-12-18)"),
        (1, True, None, "warn", "expires in 1 days"),
        (-1, True, "certificate has expired", "fail", "expired on 2026-12-03"),
        (60, False, None, "fail", "name mismatch (certificate names: other.example)"),
        (60, True, "self-signed certificate", "fail", "chain not trusted: self-signed"),
        (-1, False, "self-signed certificate", "fail", "expired on 2026-12-03; name mismatch"),
    ],
)
def test_tls_certificate(
    days: int, names_match: bool, chain_error: str | None, status: str, words: str
) -> None:
    cert = Certificate(NOW + timedelta(days=days), names_match, ("other.example",), chain_error)
    result = by_id(evaluate(good(certificate=cert)))["tls.certificate"]
    assert result.status == status
    assert words in result.detail


def test_an_expired_certificate_is_not_also_reported_as_untrusted() -> None:
    cert = Certificate(NOW - timedelta(days=1), True, ("x",), "certificate has expired")
    assert by_id(evaluate(good(certificate=cert)))["tls.certificate"].detail == (
        "expired on 2026-12-03"
    )


def test_no_certificate_fails() -> None:
    obs = good(certificate=None, certificate_error="the server sent no certificate")
    assert by_id(evaluate(obs))["tls.certificate"].status == "fail"


def test_auth_advertised_before_tls_fails_both_auth_checks() -> None:
    results = by_id(evaluate(good(ehlo_plain=["STARTTLS", "AUTH PLAIN LOGIN"])))
    assert results["auth.before_tls"].detail == "AUTH PLAIN LOGIN advertised before TLS"
    assert results["auth.mechanisms"].status == "fail"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (530, "pass"),
        (538, "pass"),
        (503, "pass"),
        (502, "pass"),
        (504, "pass"),
        (334, "fail"),
        (235, "fail"),
        (535, "fail"),
        (250, "fail"),
    ],
)
def test_auth_plain_before_tls_answers(code: int, status: str) -> None:
    result = by_id(evaluate(good(auth_before_tls=Reply(code, "x"))))["auth.before_tls"]
    assert result.status == status


@pytest.mark.parametrize(
    ("mechanisms", "status"),
    [
        ("AUTH PLAIN SCRAM-SHA-256", "pass"),
        ("AUTH PLAIN LOGIN", "warn"),
        (None, "warn"),
        ("AUTH scram-sha-1", "pass"),
    ],
)
def test_auth_mechanisms_after_tls(mechanisms: str | None, status: str) -> None:
    caps = ["SIZE 1"] + ([mechanisms] if mechanisms else [])
    assert by_id(evaluate(good(ehlo_tls=caps)))["auth.mechanisms"].status == status


@pytest.mark.parametrize(
    ("relay", "status"),
    [
        ({"after TLS": [Reply(250, "ok"), Reply(250, "ok")]}, "fail"),
        ({"after TLS": [Reply(250, "ok"), Reply(251, "will forward")]}, "fail"),
        (
            {"before TLS": [Reply(250, "ok"), Reply(250, "ok")], "after TLS": [Reply(530, "auth")]},
            "fail",
        ),
        ({"after TLS": [Reply(250, "ok"), Reply(454, "4.7.1 later")]}, "warn"),
        ({"after TLS": [Reply(530, "5.7.0 auth required")]}, "pass"),
        ({"after TLS": [Reply(250, "ok"), Reply(550, "5.7.1 no relay")]}, "pass"),
        ({}, "fail"),
    ],
)
def test_relay_unauthenticated(relay: dict[str, list[Reply]], status: str) -> None:
    assert by_id(evaluate(good(relay=relay)))["relay.unauthenticated"].status == status


def test_smuggling_is_listed_only_when_tested() -> None:
    assert "smuggling.bare_lf" not in by_id(evaluate(good()))
    refused = Smuggling(Reply(235, "ok"), None, {"<LF>.<LF>": [Reply(550, "bare LF")]})
    result = by_id(evaluate(good(smuggling=refused)))["smuggling.bare_lf"]
    assert (result.status, result.detail) == (
        "pass",
        "bare LF never ends the data: <LF>.<LF> refused (550)",
    )
    one = Smuggling(Reply(235, "ok"), None, {"<LF>.<LF>": [Reply(250, "queued")]})
    assert "one message (250)" in by_id(evaluate(good(smuggling=one)))["smuggling.bare_lf"].detail


def test_smuggling_refused_then_closed_passes() -> None:
    probe = Smuggling(Reply(235, "ok"), None, {"<LF>.<LF>": [Reply(521, "5.5.2 bare <LF>")]})
    probe.closed_after_refusal = True
    result = by_id(evaluate(good(smuggling=probe)))["smuggling.bare_lf"]
    assert (result.status, result.detail) == (
        "pass",
        "bare LF never ends the data: <LF>.<LF> refused (521);"
        " then the server closed the connection",
    )
    temporary = Smuggling(Reply(235, "ok"), None, {"<LF>.<LF>": [Reply(451, "later")]})
    assert "refused (451)" in by_id(evaluate(good(smuggling=temporary)))["smuggling.bare_lf"].detail


@pytest.mark.parametrize(
    "probe",
    [
        Smuggling(Reply(235, "ok"), None, {"<LF>.<LF>": [Reply(250, "q"), Reply(250, "mail")]}),
        Smuggling(Reply(535, "bad password"), None, {}),
        Smuggling(None, "no reply within 1 s", {}),
        Smuggling(Reply(235, "ok"), "MAIL refused: 553 no", {}),
        Smuggling(Reply(235, "ok"), None, {}),
    ],
)
def test_smuggling_failures(probe: Smuggling) -> None:
    assert by_id(evaluate(good(smuggling=probe)))["smuggling.bare_lf"].status == "fail"


@pytest.mark.parametrize(
    ("greeting", "first", "status"),
    [
        ("mx.example.com ESMTP Postfix 3.7.6", "", "warn"),
        ("mx.example.com ESMTP Exim 4.96 Fri, 04 Dec 2026 10:00:00 +0000", "", "warn"),
        ("mx.example.com ESMTP Sendmail 8.15.2/8.15.2; ready", "", "warn"),
        ("mx.example.com Microsoft ESMTP MAIL Service, Version: 10.0.17763.1", "", "warn"),
        ("mx.example.com ESMTP", "mx.example.com Exim/4.97", "warn"),
        ("mx.example.com ESMTP Postfix (Debian/GNU)", "mx.example.com", "pass"),
        ("mx1.example.com ESMTP ready at 192.0.2.10", "mx1.example.com [192.0.2.1]", "pass"),
        ("localhost ESMTP relaygate", "localhost", "pass"),
    ],
)
def test_banner(greeting: str, first: str, status: str) -> None:
    obs = good(greeting=Reply(220, greeting), ehlo_plain_first=first)
    assert by_id(evaluate(obs))["banner"].status == status


@pytest.mark.parametrize(
    ("caps", "status", "detail"),
    [
        (["SIZE 10240000"], "pass", "SIZE 10240000 bytes"),
        (["SIZE"], "pass", "SIZE advertised without a fixed limit"),
        (["PIPELINING"], "warn", "SIZE not advertised (RFC 1870)"),
        (["SIZE lots"], "warn", "SIZE advertised with a malformed value: lots"),
    ],
)
def test_limits_size(caps: list[str], status: str, detail: str) -> None:
    result = by_id(evaluate(good(ehlo_tls=[*caps, "AUTH SCRAM-SHA-256"])))["limits.size"]
    assert (result.status, result.detail) == (status, detail)


def test_server_text_is_made_printable_and_short() -> None:
    hostile = "a\x1b[2Jb\x00c\rd\ne\x7f\u202ef" + "x" * 500
    text = clean(hostile)
    assert text.startswith("a\\x1b[2Jb\\x00c\\x0dd\\x0ae\\x7f\\u202ef")
    assert text.endswith("...") and len(text) <= 163
    assert not any(ord(c) < 0x20 for c in text)
    obs = good(greeting=Reply(220, "evil \x1b]0;title\x07 Postfix 3.7.6"))
    for result in evaluate(obs):
        assert "\x1b" not in result.detail and "\x07" not in result.detail


@pytest.mark.parametrize(
    ("host", "dns", "ips", "matches"),
    [
        ("mail.example.com", ["mail.example.com"], [], True),
        ("MAIL.example.com.", ["mail.example.com"], [], True),
        ("mail.example.com", ["*.example.com"], [], True),
        ("a.mail.example.com", ["*.example.com"], [], False),
        ("example.com", ["*.example.com"], [], False),
        ("mail.example.com", ["other.example.com"], [], False),
        ("127.0.0.1", ["127.0.0.1"], [], False),  # an IP matches only IP names
        ("127.0.0.1", [], ["127.0.0.1"], True),
        ("::1", [], ["::1"], True),
    ],
)
def test_certificate_names(host: str, dns: list[str], ips: list[str], matches: bool) -> None:
    addresses = [ipaddress.ip_address(ip) for ip in ips]
    assert name_matches(host, dns, addresses) is matches


def test_servername_overrides_the_host_for_names() -> None:
    settings = Settings(Target("127.0.0.1", 587, False), servername="localhost")
    assert settings.tls_name == "localhost"
    assert Settings(Target("::1", 587, False)).tls_name == "::1"
