"""Push targets (the ``device`` table of migration 0005): written by imapi, read by ``twistd impush``.

HTTP-API.md: ``PUT /v1/users/{id}/devices/{deviceId}`` registers
``{"platform","token"}``, ``DELETE`` removes it; impush looks up the devices
of every user of one AMQP message in one statement
(:meth:`DeviceStore.devices_of`) and removes those the push provider answered
404/410 for (:meth:`DeviceStore.remove`).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from twisted.internet import defer

#: HTTP-API.md: the platforms a push target may be for
PLATFORMS = ("fcm", "apns", "webpush")
#: a device id: what a client names its installation (URL path segment safe)
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}\Z")
#: a provider token (an FCM registration token, an APNs device token, a Web Push subscription as JSON)
TOKEN_MAX = 4096


def valid_device_id(value: Any) -> bool:
    """True for 1-128 characters of ``A-Z a-z 0-9 _ . : @ -``."""
    return isinstance(value, str) and DEVICE_ID_RE.match(value) is not None


def check_device(platform: Any, token: Any) -> str | None:
    """Why ``{"platform","token"}`` is not a push target (None when it is)."""
    if platform not in PLATFORMS:
        return f"platform must be one of {', '.join(PLATFORMS)}"
    if not isinstance(token, str) or not token or len(token) > TOKEN_MAX or "\x00" in token:
        return f"token must be a string of 1-{TOKEN_MAX} characters"
    return None


class DeviceStore:
    """The ``device`` table through :class:`imcluster.db.PostgresService` ``db``."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def put(self, user_id: str, device_id: str, platform: str, token: str) -> defer.Deferred:
        """Register (or replace) one push target."""
        return self.db.run_operation(
            "INSERT INTO device (user_id, device_id, platform, token) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (user_id, device_id) DO UPDATE SET platform = EXCLUDED.platform, "
            "token = EXCLUDED.token, updated_at = now()", (user_id, device_id, platform, token))

    def delete(self, user_id: str, device_id: str) -> defer.Deferred:
        """Remove one push target; fires with the number of rows removed (0 or 1)."""
        return self.db.run_operation("DELETE FROM device WHERE user_id = %s AND device_id = %s",
                                     (user_id, device_id))

    def devices_of(self, user_ids: Iterable[str]) -> defer.Deferred:
        """``{user_id: [{"deviceId","platform","token"}]}`` of every user that has a device, one statement."""
        users = sorted(set(user_ids))
        if not users:
            return defer.succeed({})
        d = self.db.run_query(
            "SELECT user_id, device_id, platform, token FROM device WHERE user_id = ANY(%s) "
            "ORDER BY user_id, device_id", (users,))

        def grouped(rows: list) -> dict:
            out: dict[str, list[dict]] = {}
            for user_id, device_id, platform, token in rows:
                out.setdefault(user_id, []).append({"deviceId": device_id, "platform": platform, "token": token})
            return out

        return d.addCallback(grouped)

    def remove(self, user_id: str, device_ids: Iterable[str], token_of: dict | None = None) -> defer.Deferred:
        """Remove devices of ``user_id`` the provider called invalid; fires with how many went.

        ``token_of`` (device id -> token as pushed): only a row that still
        holds that token goes, so a device registered again meanwhile with a
        fresh token is kept.
        """
        ids = sorted(set(device_ids))
        if not ids:
            return defer.succeed(0)
        if token_of:
            pairs = [(i, token_of.get(i)) for i in ids]
            return self.db.run_operation(
                "DELETE FROM device d USING unnest(%s::text[], %s::text[]) AS x(device_id, token) "
                "WHERE d.user_id = %s AND d.device_id = x.device_id AND d.token = x.token",
                ([p[0] for p in pairs], [p[1] for p in pairs], user_id))
        return self.db.run_operation("DELETE FROM device WHERE user_id = %s AND device_id = ANY(%s)",
                                     (user_id, ids))
