"""FakeAuthenticator: tokens without signatures, behind the IAuthenticator contract."""

from __future__ import annotations

from twisted.internet.task import Clock as _AuthClock
from zope.interface import implementer

from imcluster.auth import INVALID_TOKEN
from imcluster.auth import TOKEN_EXPIRED
from imcluster.auth import AuthError
from imcluster.auth import Identity
from imcluster.auth import check_time_claims
from imcluster.auth import valid_user_id
from imcluster.interfaces import IAuthenticator as _IAuthenticator


@implementer(_IAuthenticator)
class FakeAuthenticator:
    """IAuthenticator without cryptography: the token names the user.

    ``"user:<id>"``
        valid; ``exp`` is ``clock.seconds() + ttl``.
    ``"user:<id>:<exp>"``
        valid until ``<exp>`` (seconds since the epoch, on ``clock``):
        ``token_expired`` once ``clock.seconds() >= exp``.
    ``"expired:<id>"``
        ``token_expired``.
    anything else, an ``<id>`` outside PROTOCOL.md's charset, or an
    ``<exp>`` the real authenticator would not take (``1e400``, ``nan``,
    past year 9999: :func:`imcluster.auth.usable_timestamp`)
        ``invalid_token``.

    ``clock`` (default: a fresh ``Clock`` at 0) lets tests move time;
    ``tokens`` lists every token seen, in order.
    """

    def __init__(self, clock=None, ttl=3600.0):
        self.clock = clock if clock is not None else _AuthClock()
        self.ttl = ttl
        self.tokens: list = []

    @staticmethod
    def token(user_id, exp=None):
        """The token string for ``user_id`` (with an explicit ``exp`` when given)."""
        # every digit: ":g" would round an epoch time (1.76516e+09) to the past
        return f"user:{user_id}" if exp is None else f"user:{user_id}:{exp:.17g}"

    def authenticate(self, token):
        self.tokens.append(token)
        if not isinstance(token, str):
            raise AuthError(INVALID_TOKEN, "token must be a non-empty string")
        kind, _, rest = token.partition(":")
        now = self.clock.seconds()
        if kind == "expired" and valid_user_id(rest):
            raise AuthError(TOKEN_EXPIRED, "token has expired")
        if kind != "user":
            raise AuthError(INVALID_TOKEN, "token is not valid")
        user_id, _, exp_text = rest.partition(":")
        if not valid_user_id(user_id):
            raise AuthError(INVALID_TOKEN, "token 'sub' is not a valid user id")
        if exp_text:
            try:
                exp = float(exp_text)
            except ValueError:
                raise AuthError(INVALID_TOKEN, "token 'exp' must be a number") from None
            check_time_claims({"exp": exp})
            if now >= exp:
                raise AuthError(TOKEN_EXPIRED, "token has expired")
        else:
            exp = now + self.ttl
        return Identity(user_id, exp, {"sub": user_id, "exp": exp})
