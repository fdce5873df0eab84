"""Bearer-token verification (relaygate/oauth/): every way a token is refused,
the JWKS parsing bounds, and the key source's rotation, rate limit and
keep-the-last-good-set rules."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from fakes.identity_provider import (
    AUDIENCE,
    ISSUER,
    JwksServer,
    SigningKey,
    claims,
    hmac_token,
    unsigned_token,
)
from relaygate import logs
from relaygate.config import ConfigError, OAuthConfig, config_from_dict
from relaygate.oauth import OAuthTokens
from relaygate.oauth import jwks as jwks_module
from relaygate.oauth.jwks import FetchError, JwksSource, fetch_url
from relaygate.oauth.keys import MAX_JWKS_BYTES, MAX_KEYS, JwksError, KeySet
from relaygate.oauth.tokens import MAX_TOKEN, TokenVerifier

CONFIG = OAuthConfig(issuer=ISSUER, audience=(AUDIENCE,), jwks_url="http://127.0.0.1:1/jwks.json")
RSA = SigningKey.rsa("k1")
EC = SigningKey.ec("k2")
ED = SigningKey.ed25519("k3")
PS = SigningKey.rsa("k4", alg="PS256")


def keyset(*keys: SigningKey, with_alg: bool = True) -> KeySet:
    return KeySet.parse(json.dumps({"keys": [k.jwk(with_alg) for k in keys]}))


KEYS = keyset(RSA, EC, ED, PS)
VERIFIER = TokenVerifier(CONFIG)


def reason(token: str, keys: KeySet = KEYS, now: float | None = None) -> str:
    return VERIFIER.verify(token, keys, time.time() if now is None else now).reason


# ------------------------------------------------------------ the verdicts


@pytest.mark.parametrize("key", [RSA, EC, ED, PS], ids=lambda k: k.alg)
def test_a_valid_token_names_its_address(key: SigningKey) -> None:
    check = VERIFIER.verify(key.token(email="Alice@Example.test"), KEYS, time.time())
    assert check.ok and check.address == "Alice@Example.test"


def test_expired_beyond_the_leeway_is_refused_within_it_accepted() -> None:
    now = time.time()
    token = RSA.token(now=now - 400, lifetime=300)  # expired 100 s ago
    assert reason(token, now=now) == "expired"
    assert reason(RSA.token(now=now - 330, lifetime=300), now=now) == "ok"  # 30 s < 60 s leeway


def test_not_yet_valid_is_refused() -> None:
    now = time.time()
    assert reason(RSA.token(nbf=int(now + 600)), now=now) == "not_before"
    assert reason(RSA.token(nbf=int(now + 30)), now=now) == "ok"


def test_wrong_audience_and_wrong_issuer() -> None:
    assert reason(RSA.token(audience="someone-else")) == "audience"
    assert reason(RSA.token(audience=["someone-else", AUDIENCE])) == "ok"
    assert reason(RSA.token(issuer="https://evil.example/realms/mail")) == "issuer"
    assert reason(RSA.token(issuer=ISSUER + "/")) == "issuer"  # exact match only


def test_missing_claims() -> None:
    assert reason(RSA.token(email=None)) == "claim_missing"
    assert reason(RSA.token(email="not-an-address")) == "claim_missing"
    assert reason(RSA.token(email="a@b.example\r\nRCPT TO:<x@y>")) == "claim_missing"
    assert reason(RSA.token(email=["alice@example.test"])) == "claim_missing"
    assert reason(RSA.token(email_verified=False)) == "email_unverified"
    assert reason(RSA.token(email_verified=True)) == "ok"


def test_signed_by_another_key_under_a_known_kid_is_a_bad_signature() -> None:
    impostor = SigningKey.rsa("k1")  # same kid as RSA, other key
    assert reason(impostor.token()) == "signature"


def test_a_changed_payload_breaks_the_signature() -> None:
    header, _, signature = RSA.token().split(".")
    other = RSA.token(email="mallory@example.test").split(".")[1]
    assert reason(f"{header}.{other}.{signature}") == "signature"


def test_alg_none_is_refused() -> None:
    assert reason(unsigned_token(claims())) == "algorithm"
    assert reason(unsigned_token(claims()).rstrip(".") + ".c2ln") == "algorithm"


def test_hs256_with_the_public_key_as_secret_is_refused() -> None:
    # The classic confusion attack: verify HMAC with the RSA public key's PEM.
    assert reason(hmac_token(claims(), RSA.public_pem(), kid="k1")) == "algorithm"
    # Even if someone listed HS256, the config loader refuses it (test_config).


def test_an_algorithm_not_allowed_here_is_refused() -> None:
    rs512 = SigningKey.rsa("k9", alg="RS512")
    assert reason(rs512.token(), keyset(rs512)) == "algorithm"  # not in the default list
    allowed = TokenVerifier(OAuthConfig(ISSUER, (AUDIENCE,), algorithms=("RS512",)))
    assert allowed.verify(rs512.token(), keyset(rs512), time.time()).ok


def test_a_token_naming_a_key_of_another_kind_is_refused() -> None:
    # An ES256 header pointing at the RSA key's kid: never tried with that key.
    forged = EC.token(kid="k1")
    assert reason(forged) == "algorithm"
    # A JWK saying it is for PS256 does not verify RS256.
    assert reason(SigningKey("k4", "RS256", PS.private).token()) == "algorithm"


def test_unknown_kid_and_kid_less_tokens() -> None:
    assert reason(RSA.token(kid="nobody")) == "key_unknown"
    # Without a kid, the one key of its kind is used; with two, none is guessed.
    assert reason(RSA.token(kid=None), keyset(RSA, EC)) == "ok"
    assert reason(RSA.token(kid=None), keyset(RSA, PS)) == "key_unknown"


def test_garbage_and_oversized_tokens() -> None:
    for junk in ("", "abc", "a.b.c", "....", "\x00\x01", "eyJhbGciOiJSUzI1NiJ9.x.y", "é.é.é"):
        assert reason(junk) == "malformed", junk
    assert reason(RSA.token(padding="x" * MAX_TOKEN)) == "too_large"
    assert reason(RSA.token(padding="x" * 2000)) == "ok"  # 3 KB: real tokens' size


def test_a_header_with_a_non_string_kid_or_alg_is_malformed() -> None:
    from fakes.identity_provider import b64url

    body = RSA.token().split(".", 1)[1]
    for header in ({"alg": "RS256", "kid": 5}, {"alg": ["RS256"]}, [1, 2]):
        token = b64url(json.dumps(header).encode()) + "." + body
        assert reason(token) in ("malformed", "algorithm")


# ------------------------------------------------------------ JWKS parsing


def test_jwks_keeps_only_public_signing_keys_we_can_use() -> None:
    weak = SigningKey.rsa("weak", bits=1024)
    private = {**RSA.jwk(), "kid": "private", "d": "AQAB"}
    encryption = {**RSA.jwk(), "kid": "enc", "use": "enc"}
    hmac_key = {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0", "alg": "HS256"}
    mislabeled = {**RSA.jwk(), "kid": "mislabeled", "alg": "HS256"}
    broken = {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"}
    document = {
        "keys": [weak.jwk(), private, encryption, hmac_key, mislabeled, broken, RSA.jwk(), "x", 7]
    }
    keys = KeySet.parse(json.dumps(document))
    assert keys.kids == ("k1",)


def test_jwks_is_bounded() -> None:
    many = [{**EC.jwk(), "kid": f"k{i}"} for i in range(MAX_KEYS + 10)]
    assert len(KeySet.parse(json.dumps({"keys": many}))) == MAX_KEYS
    with pytest.raises(JwksError, match="larger"):
        KeySet.parse(b" " * (MAX_JWKS_BYTES + 1))
    for bad in (b"not json", b"[]", b'{"keys": {}}', b'{"keys": []}', b"[" * 100000):
        with pytest.raises(JwksError):
            KeySet.parse(bad)


# ------------------------------------------------------------ the key source


class FakeProvider:
    """The fetch function a JwksSource is given: counts calls, can fail or hang."""

    def __init__(self, *keys: SigningKey) -> None:
        self.document = json.dumps({"keys": [k.jwk() for k in keys]}).encode()
        self.calls = 0
        self.fail: Exception | None = None
        self.hang = False

    async def __call__(self) -> bytes:
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail is not None:
            raise self.fail
        return self.document

    def rotate(self, *keys: SigningKey) -> None:
        self.document = json.dumps({"keys": [k.jwk() for k in keys]}).encode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rotation_an_unknown_kid_fetches_the_new_set() -> None:
    async def run() -> None:
        provider, clock = FakeProvider(RSA), Clock()
        source = JwksSource(CONFIG, fetch=provider, clock=clock)
        tokens = OAuthTokens(CONFIG, source)
        await tokens.start()
        assert (await tokens.check(RSA.token())).ok
        new = SigningKey.rsa("k-new")
        provider.rotate(new)
        clock.now += CONFIG.jwks_min_interval  # a while after the last fetch
        assert (await tokens.check(new.token())).ok  # fetched on the unknown kid
        assert provider.calls == 2
        assert (await tokens.check(RSA.token())).reason == "key_unknown"  # rotated out
        await tokens.close()

    asyncio.run(run())


def test_random_kid_flood_fetches_at_most_once_per_interval() -> None:
    async def run() -> None:
        provider, clock = FakeProvider(RSA), Clock()
        source = JwksSource(CONFIG, fetch=provider, clock=clock)
        tokens = OAuthTokens(CONFIG, source)
        await tokens.start()
        clock.now += CONFIG.jwks_min_interval
        # 200 tokens with made-up kids, many at once: one fetch between them.
        flood = [RSA.token(kid=f"random-{i}") for i in range(200)]
        results = await asyncio.gather(*(tokens.check(t) for t in flood))
        assert {r.reason for r in results} == {"key_unknown"}
        assert provider.calls == 2  # start + one
        for token in flood[:50]:  # and none more until the interval has passed
            assert (await tokens.check(token)).reason == "key_unknown"
        assert provider.calls == 2
        clock.now += CONFIG.jwks_min_interval
        await tokens.check(flood[0])
        assert provider.calls == 3
        assert (await tokens.check(RSA.token())).ok  # the real key still works
        await tokens.close()

    asyncio.run(run())


def test_a_failed_fetch_keeps_the_last_good_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(logs._sink, "stream", log)

    async def run() -> None:
        provider, clock = FakeProvider(RSA), Clock()
        source = JwksSource(CONFIG, fetch=provider, clock=clock)
        await source.start()
        for failure, document in (
            (FetchError("HTTP 503"), None),
            (None, b"<html>maintenance</html>"),
            (None, b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'),
        ):
            provider.fail = failure
            if document is not None:
                provider.document = document
            clock.now += CONFIG.jwks_min_interval
            await source.refresh("periodic")
            assert source.keys.kids == ("k1",)
        await source.close()

    asyncio.run(run())
    err = log.getvalue()
    assert err.count("event=oauth.jwks_failed") == 3
    assert "keys_kept=1" in err


def test_no_keys_at_start_means_a_temporary_failure_then_recovery() -> None:
    async def run() -> None:
        provider, clock = FakeProvider(RSA), Clock()
        provider.fail = FetchError("connection refused")
        tokens = OAuthTokens(CONFIG, JwksSource(CONFIG, fetch=provider, clock=clock))
        await tokens.start()
        assert (await tokens.check(RSA.token())).reason == "keys_unavailable"
        provider.fail = None
        assert (await tokens.check(RSA.token())).reason == "keys_unavailable"  # rate limited
        clock.now += CONFIG.jwks_min_interval
        assert (await tokens.check(RSA.token())).ok
        await tokens.close()

    asyncio.run(run())


def test_a_hanging_provider_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jwks_module, "FETCH_TIMEOUT", 0.2)

    async def run() -> None:
        provider, clock = FakeProvider(RSA), Clock()
        source = JwksSource(CONFIG, fetch=provider, clock=clock)
        await source.start()
        provider.hang = True
        clock.now += CONFIG.jwks_min_interval
        started = time.monotonic()
        keys = await source.keys_for("unknown")
        assert time.monotonic() - started < 2
        assert keys.kids == ("k1",)
        await source.close()

    asyncio.run(run())


def test_malformed_tokens_never_trigger_a_fetch() -> None:
    async def run() -> None:
        provider, clock = FakeProvider(RSA), Clock()
        tokens = OAuthTokens(CONFIG, JwksSource(CONFIG, fetch=provider, clock=clock))
        await tokens.start()
        clock.now += 3600
        for token in ("junk", unsigned_token(claims(), kid="new"), "x" * (MAX_TOKEN + 1)):
            assert not (await tokens.check(token)).ok
        assert provider.calls == 1
        await tokens.close()

    asyncio.run(run())


def test_jwks_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [RSA.jwk()]}))
    config = OAuthConfig(ISSUER, (AUDIENCE,), jwks_file=path)
    clock = Clock()

    async def run() -> None:
        tokens = OAuthTokens(config, JwksSource(config, clock=clock))
        await tokens.start()
        assert (await tokens.check(RSA.token())).ok
        path.write_text(json.dumps({"keys": [EC.jwk()]}))
        os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
        clock.now += 2
        assert (await tokens.check(EC.token())).ok
        assert (await tokens.check(RSA.token())).reason == "key_unknown"
        path.write_text("{ half written")  # a broken file: the last good set stays
        os.utime(path, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
        clock.now += 2
        assert (await tokens.check(EC.token())).ok
        await tokens.close()

    asyncio.run(run())


# ------------------------------------------------------------ fetching over HTTP


def test_fetch_url_against_a_loopback_server() -> None:
    async def run(server: JwksServer) -> None:
        assert KeySet.parse(await fetch_url(server.url)).kids == ("k1",)
        server.serve_raw(b"{}", status=500)
        with pytest.raises(FetchError, match="HTTP 500"):
            await fetch_url(server.url)
        server.serve_raw(b"x" * (MAX_JWKS_BYTES + 10))
        with pytest.raises(FetchError, match="larger"):
            await fetch_url(server.url)
        with pytest.raises(FetchError, match="HTTP 404"):
            await fetch_url(server.url.replace("jwks.json", "other"))

    with JwksServer([RSA]) as server:
        asyncio.run(run(server))
    with pytest.raises(FetchError):
        asyncio.run(fetch_url(server.url))  # nobody listening any more


# ------------------------------------------------------------ [oauth] config


def _load(section: Mapping[str, object]) -> OAuthConfig | list[str]:
    try:
        config = config_from_dict({"oauth": section}, Path("/"))
    except ConfigError as exc:
        return exc.problems
    assert config.oauth is not None
    return config.oauth


GOOD = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": "https://sso.example.test/certs"}


def test_config_good_and_defaults() -> None:
    oauth = _load(GOOD)
    assert isinstance(oauth, OAuthConfig)
    assert oauth.audience == (AUDIENCE,) and oauth.address_claim == "email"
    assert oauth.algorithms == ("RS256", "ES256", "PS256", "EdDSA") and oauth.leeway == 60
    assert config_from_dict({}, Path("/")).oauth is None
    listed = _load({**GOOD, "audience": ["a", "b"], "jwks_url": "http://127.0.0.1:8080/j"})
    assert isinstance(listed, OAuthConfig) and listed.audience == ("a", "b")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"algorithms": ["RS256", "HS256"]}, "oauth.algorithms: 'HS256' is not allowed"),
        ({"algorithms": ["none"]}, "oauth.algorithms: 'none' is not allowed"),
        ({"algorithms": []}, "oauth.algorithms: must be a non-empty list"),
        ({"jwks_url": "http://sso.example.test/certs"}, "oauth.jwks_url: must be https://"),
        ({"jwks_url": "ftp://x/y"}, "oauth.jwks_url: must be a https:// or http:// URL"),
        ({"jwks_file": "/etc/passwd"}, "oauth: jwks_url and jwks_file: give one, not both"),
        ({"audience": ""}, "oauth.audience: must be a string or a list of strings"),
        ({"audience": [1]}, "oauth.audience: must be a string or a list of strings"),
        ({"leeway": 3600}, "oauth.leeway: must be at most 300 seconds"),
        ({"issuer": ""}, "oauth.issuer: must be a non-empty string"),
        ({"jwks_min_interval": 0}, "oauth.jwks_min_interval: must be a number of seconds > 0"),
        ({"colour": "blue"}, "oauth.colour: unknown setting"),
    ],
)
def test_config_problems_are_one_line_each(change: dict[str, object], problem: str) -> None:
    problems = _load({**GOOD, **change})
    assert isinstance(problems, list)
    assert any(p.startswith(problem) for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_config_needs_issuer_and_a_key_source() -> None:
    problems = _load({"audience": AUDIENCE})
    assert isinstance(problems, list)
    assert "oauth.issuer: is required (the tokens' iss claim)" in problems
    assert "oauth: needs jwks_url or jwks_file (one of them)" in problems


def test_a_changed_oauth_section_waits_for_a_restart() -> None:
    from relaygate.server.reload import merge

    running = config_from_dict({"oauth": GOOD}, Path("/"))
    new = config_from_dict({"oauth": {**GOOD, "audience": "other"}}, Path("/"))
    merged, needs_restart = merge(running, new)
    assert "oauth" in needs_restart
    assert merged.oauth == running.oauth


def test_a_login_before_the_first_fetch_ends_waits_for_it() -> None:
    async def run() -> None:
        provider, clock = FakeProvider(RSA), Clock()
        tokens = OAuthTokens(CONFIG, JwksSource(CONFIG, fetch=provider, clock=clock))
        await tokens.start(wait=False)  # as a worker starts: listening at once
        results = await asyncio.gather(*(tokens.check(RSA.token()) for _ in range(5)))
        assert all(r.ok for r in results)
        assert provider.calls == 1
        await tokens.close()

    asyncio.run(run())
