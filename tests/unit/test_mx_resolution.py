"""MXResolver.targets against FakeDNS: every failure is one of two DNS errors,
and MX addresses outside public unicast space are dropped unless allowed.

Only look-ups happen here (to the fake on 127.0.0.1); nothing connects to the
addresses in the records.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaygate.config import DeliveryConfig
from relaygate.delivery.mx import MXResolver, PermanentDNSError, Target, TemporaryDNSError

_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:  # `fakes` lives in tests/, beside unit/
    sys.path.insert(0, _TESTS_DIR)
from fakes import FakeDNS  # noqa: E402

PUBLIC = "192.88.99.1"  # a global unicast address: only ever resolved, never contacted


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDNS]:
    with FakeDNS() as fake:
        fake.add_mx(
            "mixed.test", [(10, "lo.mixed.test"), (20, "ten.mixed.test"), (30, "pub.mixed.test")]
        )
        fake.add_a("lo.mixed.test", "127.0.0.1")
        fake.add_a("ten.mixed.test", "10.0.0.1", external_ok=True)
        fake.add_aaaa("ten.mixed.test", "fd00::1", external_ok=True)
        fake.add_a("pub.mixed.test", PUBLIC, external_ok=True)
        fake.add_mx("inside.test", [(10, "mx.inside.test")])
        fake.add_a("mx.inside.test", "127.0.0.7")
        fake.add_aaaa("mx.inside.test", "::ffff:169.254.169.254", external_ok=True)
        fake.add_a("implicit-private.test", "100.64.1.1", external_ok=True)
        fake.drop_queries("silent.test")
        yield fake


def _targets(dns: FakeDNS, domain: str, *, allow: bool = False) -> list[Target]:
    host, port = dns.address.rsplit(":", 1)
    config = DeliveryConfig(mode="mx", resolvers=((host, int(port)),), allow_private_targets=allow)
    return asyncio.run(MXResolver(config, timeout=0.5).targets(domain))


def test_private_targets_are_dropped_public_ones_kept(dns: FakeDNS) -> None:
    assert [t.address for t in _targets(dns, "mixed.test")] == [PUBLIC]
    allowed = _targets(dns, "mixed.test", allow=True)
    assert [t.address for t in allowed] == ["127.0.0.1", "fd00::1", "10.0.0.1", PUBLIC]


@pytest.mark.parametrize("domain", ["inside.test", "implicit-private.test"])
def test_only_private_targets_fail_permanently(dns: FakeDNS, domain: str) -> None:
    with pytest.raises(PermanentDNSError) as caught:
        _targets(dns, domain)
    assert str(caught.value).startswith(f"554 5.4.4 MX hosts of {domain} have only non-public")
    assert _targets(dns, domain, allow=True)


@pytest.mark.parametrize(
    "domain", ["\ufffd.test", "\u3002x.test", "u" * 64 + ".test", ".".join(["a" * 63] * 5)]
)
def test_names_dns_cannot_hold_fail_permanently(dns: FakeDNS, domain: str) -> None:
    with pytest.raises(PermanentDNSError) as caught:
        _targets(dns, domain)
    assert str(caught.value).startswith("550 5.1.2 Domain ")
    str(caught.value).encode("utf-8")  # storable


def test_a_silent_dns_server_is_temporary(dns: FakeDNS) -> None:
    with pytest.raises(TemporaryDNSError) as caught:
        _targets(dns, "silent.test")
    assert str(caught.value).startswith("451 4.4.3 DNS lookup of silent.test failed")
