"""JWT verification as PROTOCOL.md "Authentication" defines it, and its fake."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from imcluster.auth import (
    INVALID_TOKEN,
    TOKEN_EXPIRED,
    AuthError,
    Identity,
    JWTAuthenticator,
    mint_token,
    valid_user_id,
)
from imcluster.config import GATEWAY, load_config
from imcluster.interfaces import IAuthenticator
from imcluster.testing import FakeAuthenticator

SECRET = "a-test-secret-that-is-32-bytes-long!"


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, payload: dict, key: bytes | None) -> str:
    """A token built by hand (PyJWT refuses to make the malicious ones)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def refused(auth, token, code=INVALID_TOKEN) -> AuthError:
    with pytest.raises(AuthError) as info:
        auth.authenticate(token)
    assert info.value.code == code
    return info.value



# --- the IAuthenticator contract, on the JWT authenticator and on FakeAuthenticator


class JWTTokens:
    """Tokens for the real authenticator: HS256 JWTs on the wall clock, no leeway."""

    def __init__(self) -> None:
        self.auth = JWTAuthenticator(secret=SECRET, leeway=0)

    def now(self) -> float:
        return time.time()

    def valid(self, user, ttl=60) -> str:
        return mint_token(SECRET, user, ttl)

    def expired(self, user) -> str:
        return mint_token(SECRET, user, 10, now=time.time() - 60)

    def with_sub(self, sub: str) -> str:
        return jwt.encode({"sub": sub, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")


class FakeTokens:
    """The same tokens for FakeAuthenticator (``user:<id>:<exp>``), its clock at the wall clock's time."""

    def __init__(self) -> None:
        clock = Clock()
        clock.advance(time.time())
        self.auth = FakeAuthenticator(clock=clock)

    def now(self) -> float:
        return self.auth.clock.seconds()

    def valid(self, user, ttl=60) -> str:
        return FakeAuthenticator.token(user, self.now() + ttl)

    def expired(self, user) -> str:
        return FakeAuthenticator.token(user, self.now() - 50)

    def with_sub(self, sub: str) -> str:
        return FakeAuthenticator.token(sub)


@pytest.fixture(params=["jwt", "fake"])
def tokens(request):
    """The authenticator under test and the tokens it takes: the real one, or the fake."""
    return JWTTokens() if request.param == "jwt" else FakeTokens()


def test_provides_iauthenticator(tokens):
    """A gateway built on an authenticator missing the interface would fail only at the first auth."""
    assert verifyObject(IAuthenticator, tokens.auth)


def test_valid_token_gives_the_identity(tokens):
    """A valid token would not authenticate as its user, or with another expiry than its own."""
    identity = tokens.auth.authenticate(tokens.valid("alice@example.com", 60))
    assert isinstance(identity, Identity)
    assert identity.user_id == "alice@example.com"
    assert abs(identity.exp - (tokens.now() + 60)) < 5


def test_expired_token_is_token_expired(tokens):
    """An expired token is refused with token_expired (so clients know to refresh, not re-login)."""
    err = refused(tokens.auth, tokens.expired("alice"), TOKEN_EXPIRED)
    assert str(err) == err.message and "expired" in err.message


@pytest.mark.parametrize("bad", ["", "not.a.jwt", "a.b", "ü", None, 42, b"bytes", "x" * 10000])
def test_garbage_is_invalid(tokens, bad):
    """Something that is not a token at all would authenticate, or crash the gateway instead of a refusal."""
    refused(tokens.auth, bad)


@pytest.mark.parametrize("sub", ["", "a b", "a#b", "x" * 129, "ü", "a\n"])
def test_sub_outside_the_charset_is_invalid(tokens, sub):
    """A `sub` that is not a valid user id (charset, length) is invalid_token."""
    refused(tokens.auth, tokens.with_sub(sub))


# --- JWT only: signatures, algorithms, claims the fake does not have


def test_valid_hs256_token_gives_the_identity():
    """A correctly signed token authenticates as its `sub`, with its other claims kept."""
    auth = JWTAuthenticator(secret=SECRET)
    identity = auth.authenticate(mint_token(SECRET, "alice@example.com", 60, device="x"))
    assert identity.user_id == "alice@example.com"
    assert identity.claims["device"] == "x"


def test_leeway_tolerates_small_clock_skew():
    """A token that expired a few seconds ago on a skewed clock still passes within the leeway."""
    token = mint_token(SECRET, "alice", 10, now=time.time() - 15)  # expired 5 s ago
    assert JWTAuthenticator(secret=SECRET, leeway=30).authenticate(token).user_id == "alice"
    refused(JWTAuthenticator(secret=SECRET, leeway=1), token, TOKEN_EXPIRED)


def test_wrong_secret_and_tampered_tokens_are_invalid():
    """Tokens signed with another secret, or altered after signing, never authenticate."""
    auth = JWTAuthenticator(secret=SECRET)
    refused(auth, mint_token("another-secret-of-32-bytes-length!!", "alice", 60))
    good = mint_token(SECRET, "alice", 60)
    head, payload, sig = good.split(".")
    tampered = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered["sub"] = "mallory"
    refused(auth, f"{head}.{b64(json.dumps(tampered).encode())}.{sig}")


def test_alg_none_is_refused():
    """An unsigned token (alg none) must never authenticate, whatever its claims."""
    auth = JWTAuthenticator(secret=SECRET)
    payload = {"sub": "alice", "exp": int(time.time()) + 60}
    refused(auth, forge({"alg": "none", "typ": "JWT"}, payload, None))
    refused(auth, forge({"alg": "None", "typ": "JWT"}, payload, None))
    with pytest.raises(ValueError):
        JWTAuthenticator(secret=SECRET, algorithms=["none"])
    with pytest.raises(ValueError):
        mint_token(SECRET, "alice", 60, algorithm="none")


@pytest.mark.parametrize("sub", [42, ["alice"]])
def test_sub_that_is_not_a_string_is_invalid(sub):
    """A `sub` claim of another JSON type than a string is invalid_token."""
    token = forge({"alg": "HS256", "typ": "JWT"}, {"sub": sub, "exp": int(time.time()) + 60}, SECRET.encode())
    refused(JWTAuthenticator(secret=SECRET), token)


def test_user_id_charset():
    """User ids follow PROTOCOL.md exactly: 1-128 of A-Z a-z 0-9 _ . @ -."""
    assert valid_user_id("a") and valid_user_id("A-z_0.9@x") and valid_user_id("x" * 128)
    for bad in ("", "x" * 129, "a b", "a/b", "a:b", "a#b", "é", "a\n", None, 1):
        assert not valid_user_id(bad)


def test_missing_exp_or_sub_is_invalid():
    """Tokens without an expiry or a subject are refused (a token must not live forever)."""
    auth = JWTAuthenticator(secret=SECRET)
    err = refused(auth, jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"))
    assert "exp" in err.message
    err = refused(auth, jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256"))
    assert "sub" in err.message
    refused(auth, jwt.encode({"sub": "alice", "exp": "9999999999"}, SECRET, algorithm="HS256"))


@pytest.mark.parametrize("claim, value", [
    ("exp", 10**400), ("exp", 1e300), ("exp", 253402300800), ("exp", "9999999999"), ("exp", True),
    ("iat", 10**400), ("iat", -1), ("iat", "0"), ("nbf", -(10**400)), ("nbf", "0"), ("nbf", [1]),
])
def test_time_claims_the_server_cannot_use_are_invalid_token(claim, value):
    """A signed exp of 10**400 used to pass PyJWT and then break the gateway's timer: any unusable exp/iat/nbf is invalid_token."""
    auth = JWTAuthenticator(secret=SECRET)
    payload = {"sub": "alice", "exp": int(time.time()) + 60, claim: value}
    err = refused(auth, forge({"alg": "HS256", "typ": "JWT"}, payload, SECRET.encode()))
    assert claim in err.message


def test_infinite_and_nan_time_claims_are_invalid_token():
    """JSON has no Infinity or NaN, but Python's parser reads them: such a token is invalid_token."""
    auth = JWTAuthenticator(secret=SECRET)
    for literal in ("Infinity", "NaN", "1e400"):
        now = int(time.time())
        raw = f'{{"sub":"alice","exp":{literal},"iat":{now}}}'.encode()
        signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(raw)}"
        sig = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
        refused(auth, f"{signing_input}.{b64(sig)}")


def test_time_claims_at_the_edges_are_accepted():
    """Ordinary and far-future (year 9999) times still authenticate."""
    auth = JWTAuthenticator(secret=SECRET)
    payload = {"sub": "alice", "exp": 253402300799, "iat": int(time.time()) - 5, "nbf": 0}
    assert auth.authenticate(jwt.encode(payload, SECRET, algorithm="HS256")).exp == 253402300799
    payload["exp"] = time.time() + 60.5  # a float is a number too
    auth.authenticate(jwt.encode(payload, SECRET, algorithm="HS256"))


def test_audience_and_issuer_are_checked_when_configured():
    """A token for another service (aud) or from another issuer (iss) is refused when they are configured."""
    auth = JWTAuthenticator(secret=SECRET, audience="im", issuer="https://login.example")
    ok = mint_token(SECRET, "alice", 60, aud="im", iss="https://login.example")
    assert auth.authenticate(ok).user_id == "alice"
    refused(auth, mint_token(SECRET, "alice", 60, aud="billing", iss="https://login.example"))
    refused(auth, mint_token(SECRET, "alice", 60, aud="im", iss="https://evil.example"))
    refused(auth, mint_token(SECRET, "alice", 60, iss="https://login.example"))  # no aud
    refused(auth, mint_token(SECRET, "alice", 60, aud="im"))  # no iss
    # not configured: not checked
    assert JWTAuthenticator(secret=SECRET).authenticate(ok).user_id == "alice"


def test_rs256_and_es256_public_keys(rsa_key, ec_key):
    """Tokens signed by the identity provider's RSA or EC key verify with its public key only."""
    rsa_auth = JWTAuthenticator(public_key=pem_public(rsa_key))
    assert rsa_auth.algorithms == ["RS256"]
    assert rsa_auth.authenticate(mint_token(pem_private(rsa_key), "bob", 60, algorithm="RS256")).user_id == "bob"
    ec_auth = JWTAuthenticator(public_key=pem_public(ec_key).decode())
    assert ec_auth.algorithms == ["ES256"]
    assert ec_auth.authenticate(mint_token(pem_private(ec_key), "carol", 60, algorithm="ES256")).user_id == "carol"
    # each key verifies only its own tokens
    refused(rsa_auth, mint_token(pem_private(ec_key), "carol", 60, algorithm="ES256"))
    refused(ec_auth, mint_token(pem_private(rsa_key), "bob", 60, algorithm="RS256"))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(rsa_auth, mint_token(pem_private(other), "bob", 60, algorithm="RS256"))
    refused(rsa_auth, mint_token(pem_private(rsa_key), "bob", 60, algorithm="RS256", now=time.time() - 120),
            TOKEN_EXPIRED)


def test_algorithm_confusion_is_refused(rsa_key):
    """An HS256 token "signed" with the public key as HMAC secret must not pass as the IdP's token."""
    public = pem_public(rsa_key)
    auth = JWTAuthenticator(public_key=public)
    payload = {"sub": "mallory", "exp": int(time.time()) + 60}
    refused(auth, forge({"alg": "HS256", "typ": "JWT"}, payload, public))
    # configuring HMAC algorithms with a public key is refused at start-up
    with pytest.raises(ValueError):
        JWTAuthenticator(public_key=public, algorithms=["HS256", "RS256"])
    # and a secret-configured authenticator never takes an asymmetric token
    with pytest.raises(ValueError):
        JWTAuthenticator(secret=SECRET, algorithms=["RS256"])
    refused(JWTAuthenticator(secret=SECRET), mint_token(pem_private(rsa_key), "bob", 60, algorithm="RS256"))


def test_each_hmac_algorithm_verifies_only_what_is_configured():
    """HS384/HS512 tokens pass when configured; an algorithm not configured never does, whatever the secret."""
    both = JWTAuthenticator(secret=SECRET, algorithms=["HS384", "HS512"])
    for alg in ("HS384", "HS512"):
        assert both.authenticate(mint_token(SECRET, "alice", 60, algorithm=alg)).user_id == "alice"
        refused(both, mint_token("another-secret-of-32-bytes-length!!", "alice", 60, algorithm=alg))
    refused(both, mint_token(SECRET, "alice", 60))  # HS256
    refused(JWTAuthenticator(secret=SECRET), mint_token(SECRET, "alice", 60, algorithm="HS512"))
    # the same secret given again (an equal string, another object) verifies the same tokens
    again = JWTAuthenticator(secret="".join(SECRET))
    assert again.authenticate(mint_token(SECRET, "bob", 60)).user_id == "bob"


def test_secret_that_is_a_pem_key_is_refused_at_start_up(rsa_key):
    """A public key given as the HMAC secret would refuse every token; the gateway says so when it starts."""
    with pytest.raises(ValueError, match="HMAC"):
        JWTAuthenticator(secret=pem_public(rsa_key).decode())


def test_from_config_with_secret_and_public_key(tmp_path, rsa_key):
    """The gateway's configuration (secret, or PEM file, audience, algorithms) builds the right verifier."""
    config = load_config(GATEWAY, {"jwt_secret": SECRET, "jwt_audience": "im", "jwt_leeway": "0"}, environ={})
    auth = JWTAuthenticator.from_config(config)
    assert auth.algorithms == ["HS256"] and auth.audience == "im" and auth.leeway == 0
    assert auth.authenticate(mint_token(SECRET, "alice", 60, aud="im")).user_id == "alice"
    path = tmp_path / "key.pem"
    path.write_bytes(pem_public(rsa_key))
    config = load_config(GATEWAY, {"jwt_public_key": str(path)}, environ={})
    auth = JWTAuthenticator.from_config(config)
    assert auth.authenticate(mint_token(pem_private(rsa_key), "bob", 60, algorithm="RS256")).user_id == "bob"
    path.write_text("not a key")
    with pytest.raises(ValueError, match="jwt_public_key"):
        JWTAuthenticator.from_config(config)
    path.write_bytes(pem_public(rsa_key))
    config = load_config(GATEWAY, {"jwt_public_key": str(path), "jwt_algorithms": "ES256"}, environ={})
    with pytest.raises(ValueError, match="RS256"):
        JWTAuthenticator.from_config(config)


def test_mint_token_refuses_bad_input():
    """Minting refuses what no verifier would accept: empty secret, bad user id, ttl <= 0."""
    with pytest.raises(ValueError, match="secret"):
        mint_token("", "alice", 60)
    with pytest.raises(ValueError, match="user id"):
        mint_token(SECRET, "a b", 60)
    for ttl in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="ttl"):
            mint_token(SECRET, "alice", ttl)


# --- fake only: what tests drive through it


def test_fake_tokens_follow_its_clock():
    """Tests of token expiry on a fake clock would see tokens expire at the wrong time, or never."""
    auth = FakeAuthenticator()
    assert auth.authenticate("user:alice") == Identity("alice", 3600.0)
    assert auth.authenticate(FakeAuthenticator.token("bob", 100)).exp == 100
    refused(auth, "expired:alice", TOKEN_EXPIRED)
    auth.clock.advance(100)
    refused(auth, FakeAuthenticator.token("bob", 100), TOKEN_EXPIRED)
    for exp in ("1e400", "nan", "inf", "253402300800"):
        refused(auth, f"user:bob:{exp}")
    assert auth.tokens[0] == "user:alice"
