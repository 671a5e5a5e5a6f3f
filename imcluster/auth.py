"""Client authentication: JWTs as PROTOCOL.md "Authentication" defines them.

A token's ``sub`` is the user id (1-128 characters of ``A-Z a-z 0-9 _ . @
-``) and ``exp`` is required. Tokens are verified with an HS256 secret or an
RS256/ES256 public key (PEM), never both: the accepted algorithms are checked
against the kind of key when the authenticator is built, so an HMAC token
"signed" with the public key (algorithm confusion) or ``alg: none`` can never
verify. ``aud`` and ``iss`` are checked when configured (a token's ``aud`` is
ignored when no audience is configured).

:func:`mint_token` makes tokens for development and tests (``imcluster
token``). :class:`imcluster.testing.FakeAuthenticator` is the test double.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import jwt
from jwt.algorithms import HMACAlgorithm
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, ed448, rsa
from twisted.logger import Logger
from zope.interface import implementer

from imcluster.interfaces import IAuthenticator
# the one user-id rule (PROTOCOL.md): a token's ``sub`` must satisfy it
from imcluster.protocol import is_user_id as valid_user_id

# PyJWT warns on every decode with an HMAC secret shorter than the hash; the
# authenticator says it once, at start-up, in the log instead
warnings.filterwarnings("ignore", category=jwt.warnings.InsecureKeyLengthWarning)

#: shortest HMAC secret (bytes) that does not draw a start-up warning (RFC 7518 3.2)
MIN_SECRET_BYTES = 32


INVALID_TOKEN = "invalid_token"
TOKEN_EXPIRED = "token_expired"

#: the latest time a token's ``exp``, ``iat`` or ``nbf`` may name: 9999-12-31T23:59:59Z
MAX_TIMESTAMP = 253402300799

#: the registered time claims; each one a token carries must pass :func:`usable_timestamp`
TIME_CLAIMS = ("exp", "iat", "nbf")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
#: an EC key verifies only the algorithm of its curve
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512", "secp256k1": "ES256K"}

#: the hash of each HMAC algorithm (PyJWT's names)
HMAC_HASHES = {"HS256": HMACAlgorithm.SHA256, "HS384": HMACAlgorithm.SHA384, "HS512": HMACAlgorithm.SHA512}

DEFAULT_SECRET_ALGORITHMS = ["HS256"]
DEFAULT_PUBLIC_KEY_ALGORITHMS = ["RS256", "ES256"]


def usable_timestamp(value: Any) -> bool:
    """True when ``value`` is a time the server can compute with (PROTOCOL.md "Authentication").

    A number (int or float, not bool) of seconds since the epoch between 0
    and :data:`MAX_TIMESTAMP`. PyJWT lets through what ``int()`` accepts, so
    a validly signed ``exp`` of ``10**400`` (no float holds it), a string, or
    a time past year 9999 would reach timers and Redis; every such claim is
    ``invalid_token`` instead. NaN and infinities fail the range test.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value <= MAX_TIMESTAMP


def check_time_claims(claims: dict) -> None:
    """Raise ``invalid_token`` for an ``exp``/``iat``/``nbf`` claim that is not :func:`usable_timestamp`."""
    for name in TIME_CLAIMS:
        if name in claims and not usable_timestamp(claims[name]):
            raise AuthError(INVALID_TOKEN, f"token '{name}' must be a number of seconds since the "
                                           f"epoch between 0 and {MAX_TIMESTAMP}")


@dataclass(frozen=True)
class Identity:
    """Who a verified token says the client is.

    ``exp`` is the token's expiry in seconds since the epoch; ``claims`` is
    the whole verified payload.
    """

    user_id: str
    exp: float
    claims: dict = field(default_factory=dict, compare=False)


class AuthError(Exception):
    """A token was refused: ``code`` is ``invalid_token`` or ``token_expired``,
    ``message`` says why (never echoes the token); ``str(error)`` is the message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class TokenRevoked(AuthError):
    """The token was issued before its user's revocation (HTTP-API.md revoke): ``token_revoked``."""

    def __init__(self, message: str = "this token was revoked; get a new one") -> None:
        super().__init__("token_revoked", message)


def is_revoked(claims: Any, not_before_ms: Any) -> bool:
    """Whether a token with ``claims`` falls under a revocation at ``not_before_ms`` (None: none).

    Refused: ``iat`` before ``notBefore`` (``iat`` is in seconds, often whole:
    a token issued in the same second as the revoke is refused too), and a
    token without a usable ``iat`` (nothing says it is newer).
    """
    if not_before_ms is None:
        return False
    iat = claims.get("iat") if isinstance(claims, dict) else None
    if not isinstance(iat, (int, float)) or isinstance(iat, bool):
        return True
    return iat * 1000 < not_before_ms


def load_public_key(pem: bytes | str) -> Any:
    """A ``cryptography`` public key from a PEM public key or X.509 certificate; ValueError otherwise."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a PEM public key or certificate: {e}") from None


def algorithms_for_key(key: Any) -> list[str]:
    """The JWT algorithms that ``key`` (a public key object) can verify."""
    if isinstance(key, rsa.RSAPublicKey):
        return list(RSA_ALGORITHMS)
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHMS.get(key.curve.name)
        return [alg] if alg else []
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ["EdDSA"]
    return []


class _PreparedHMAC(HMACAlgorithm):
    """PyJWT's HMAC algorithm with the authenticator's secret prepared once.

    PyJWT prepares the key on every decode (bytes, then two scans for PEM
    and SSH key markers): 9.5 of the 67 us a token cost. Any other key is
    prepared as PyJWT would.
    """

    def __init__(self, hash_alg: Any, secret: str | bytes) -> None:
        super().__init__(hash_alg)
        self._secret = secret
        self._prepared = super().prepare_key(secret)

    def prepare_key(self, key: Any) -> bytes:
        if key is self._secret:
            return self._prepared
        return super().prepare_key(key)


def _decoder(secret: str | bytes | None, algorithms: Sequence[str]) -> Any:
    """A PyJWT of this authenticator's own (``jwt.decode``'s rules), its HMAC key prepared once.

    PyJWT keeps its JWS layer in ``PyJWT._jws`` (2.10 and later); where it
    has none, the decoder works as ``jwt.decode`` does, preparing the key
    on every call.
    """
    decoder = jwt.PyJWT()
    jws = getattr(decoder, "_jws", None)
    if secret is not None and jws is not None and hasattr(jws, "register_algorithm"):
        for name in algorithms:
            try:
                jws.unregister_algorithm(name)
            except KeyError:
                pass
            try:
                prepared = _PreparedHMAC(HMAC_HASHES[name], secret)
            except jwt.PyJWTError as e:  # a secret that looks like a PEM or SSH key
                raise ValueError(f"the JWT secret cannot be an HMAC key: {e}") from None
            jws.register_algorithm(name, prepared)
    return decoder


@implementer(IAuthenticator)
class JWTAuthenticator:
    """Verifies client JWTs (IAuthenticator).

    Give exactly one of ``secret`` (HMAC) or ``public_key`` (PEM bytes or
    str, or a ``cryptography`` public key object). ``algorithms`` defaults
    to HS256 with a secret and to RS256 and ES256 with a public key; those
    that the key cannot verify are dropped, and none left, or an algorithm
    of the other family, is a ValueError here, at start-up.
    """

    log = Logger()

    def __init__(self, secret: str | bytes | None = None, public_key: Any = None,
                 algorithms: Sequence[str] | None = None, audience: str | None = None,
                 issuer: str | None = None, leeway: float = 10.0) -> None:
        if (secret is None or secret == "") == (public_key is None):
            raise ValueError("give a JWT secret or a public key (exactly one)")
        wanted = list(algorithms) if algorithms else None
        if wanted and any(a.lower() == "none" for a in wanted):
            raise ValueError("the JWT algorithm 'none' is never accepted")
        if secret is not None:
            wanted = wanted or list(DEFAULT_SECRET_ALGORITHMS)
            wrong = [a for a in wanted if a not in HMAC_ALGORITHMS]
            if wrong:
                raise ValueError(f"a JWT secret verifies only {', '.join(HMAC_ALGORITHMS)}, not {', '.join(wrong)}")
            self._key: Any = secret
            self.algorithms = wanted
            size = len(secret.encode("utf-8") if isinstance(secret, str) else secret)
            if size < MIN_SECRET_BYTES:
                self.log.warn("the JWT secret is only {size} bytes; use at least {min} random bytes",
                              size=size, min=MIN_SECRET_BYTES)
        else:
            key = public_key if not isinstance(public_key, (bytes, str)) else load_public_key(public_key)
            usable = algorithms_for_key(key)
            if not usable:
                raise ValueError(f"unsupported public key type {type(key).__name__}")
            known = set(RSA_ALGORITHMS) | set(EC_ALGORITHMS.values()) | {"EdDSA"}
            if wanted:
                wrong = [a for a in wanted if a not in known]
                if wrong:
                    raise ValueError(f"a public key verifies asymmetric algorithms only, not {', '.join(wrong)}")
            chosen = [a for a in (wanted or DEFAULT_PUBLIC_KEY_ALGORITHMS) if a in usable]
            if not chosen:
                raise ValueError(
                    f"this public key verifies {', '.join(usable)}, none of the accepted algorithms "
                    f"{', '.join(wanted or DEFAULT_PUBLIC_KEY_ALGORITHMS)}")
            self._key = key
            self.algorithms = chosen
        self.audience = audience or None
        self.issuer = issuer or None
        self.leeway = float(leeway)
        self._jwt = _decoder(secret, self.algorithms)

    @classmethod
    def from_config(cls, config: Any) -> "JWTAuthenticator":
        """Build from a Config (``jwt_secret`` or ``jwt_public_key`` (a PEM file), ``jwt_algorithms``,
        ``jwt_audience``, ``jwt_issuer``, ``jwt_leeway``); ValueError names what is wrong."""
        v = config.values
        public_key = None
        if v.get("jwt_public_key"):
            path = v["jwt_public_key"]
            try:
                with open(path, "rb") as f:
                    public_key = f.read()
            except OSError as e:
                raise ValueError(f"jwt_public_key: cannot read {path}: {e.strerror}") from None
            try:
                load_public_key(public_key)
            except ValueError as e:
                raise ValueError(f"jwt_public_key {path}: {e}") from None
        return cls(secret=v.get("jwt_secret") or None, public_key=public_key,
                   algorithms=v.get("jwt_algorithms"), audience=v.get("jwt_audience"),
                   issuer=v.get("jwt_issuer"), leeway=v.get("jwt_leeway", 10.0))

    def authenticate(self, token: Any) -> Identity:
        """Verify ``token``; returns an :class:`Identity` or raises :class:`AuthError`."""
        if not isinstance(token, str) or not token:
            raise AuthError(INVALID_TOKEN, "token must be a non-empty string")
        # the times are checked below, once they are known to be usable: PyJWT lets
        # through whatever int() takes (10**400, "9999999999", true)
        options: dict[str, Any] = {"require": ["exp", "sub"], "verify_aud": self.audience is not None,
                                   "verify_exp": False, "verify_nbf": False, "verify_iat": False}
        try:
            claims = self._jwt.decode(token, self._key, algorithms=self.algorithms, options=options,
                                audience=self.audience, issuer=self.issuer, leeway=self.leeway)
        except jwt.ExpiredSignatureError:
            raise AuthError(TOKEN_EXPIRED, "token has expired") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(INVALID_TOKEN, f"token lacks the '{e.claim}' claim") from None
        except jwt.InvalidAudienceError:
            raise AuthError(INVALID_TOKEN, "token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError(INVALID_TOKEN, "token is from another issuer") from None
        except jwt.ImmatureSignatureError:
            raise AuthError(INVALID_TOKEN, "token is not valid yet") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(INVALID_TOKEN, "token algorithm is not accepted") from None
        except jwt.InvalidSignatureError:
            raise AuthError(INVALID_TOKEN, "token signature does not verify") from None
        except jwt.PyJWTError as e:
            # InvalidKeyError (key/algorithm mismatch) is a PyJWTError, not an InvalidTokenError
            raise AuthError(INVALID_TOKEN, f"token is not valid: {type(e).__name__}") from None
        except (ValueError, TypeError, OverflowError) as e:
            raise AuthError(INVALID_TOKEN, f"token is malformed: {type(e).__name__}") from None
        sub = claims.get("sub")
        if not valid_user_id(sub):
            raise AuthError(INVALID_TOKEN, "token 'sub' is not a valid user id (1-128 of A-Z a-z 0-9 _ . @ -)")
        check_time_claims(claims)
        now = time.time()
        if claims["exp"] <= now - self.leeway:
            raise AuthError(TOKEN_EXPIRED, "token has expired")
        if claims.get("nbf", 0) > now + self.leeway or claims.get("iat", 0) > now + self.leeway:
            raise AuthError(INVALID_TOKEN, "token is not valid yet")
        return Identity(sub, claims["exp"], claims)


def mint_token(secret: str | bytes, user_id: str, ttl: float, algorithm: str = "HS256",
               now: float | None = None, **claims: Any) -> str:
    """A signed JWT for ``user_id`` valid for ``ttl`` seconds (development and tests).

    ``secret`` is the HMAC secret, or the PEM private key for RS*/ES*
    algorithms. ``claims`` are added (e.g. ``aud=``, ``iss=``); ``iat`` and
    ``exp`` come from ``now`` (default: the current time). ValueError on an
    empty secret, a bad user id or ``ttl <= 0``.
    """
    if secret is None or secret == "" or secret == b"":
        raise ValueError("the secret must not be empty")
    if not valid_user_id(user_id):
        raise ValueError(f"bad user id {user_id!r}: 1-128 characters of A-Z a-z 0-9 _ . @ -")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0 or math.isinf(ttl):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl:g}"
                         if isinstance(ttl, (int, float)) else f"ttl must be a number, got {ttl!r}")
    if algorithm.lower() == "none":
        raise ValueError("refusing to mint an unsigned token (alg none)")
    issued = int(time.time() if now is None else now)
    payload = {"sub": user_id, "iat": issued, "exp": issued + math.ceil(ttl)}
    payload.update({k: v for k, v in claims.items() if v is not None})
    try:
        return jwt.encode(payload, secret, algorithm=algorithm)
    except (jwt.PyJWTError, ValueError, TypeError, NotImplementedError) as e:
        raise ValueError(f"cannot sign with {algorithm}: {e}") from None
