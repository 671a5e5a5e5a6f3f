"""imapi's operator controls and push targets (HTTP-API.md, version 1.1).

``POST /v1/users/{id}/kick`` and ``POST /v1/users/{id}/revoke`` (admin only)
reach the gateways that hold the user: the gateway uuids are the first part
of the fields of ``UCIR##<user>``, and each gets one
:class:`~imcluster.envelope.Control` item on its own routing key
``<ns>.wsserver.<uuid>`` (``mandatory``: a dead gateway's queue is gone, and
so are its connections). A revoke first stores ``REVOKED##<user>`` =
``notBefore`` (ms) in Redis for ``revoke_ttl`` seconds, in the same round
trip as the read of the user's connections, so that a connection
authenticating meanwhile either is in that read or reads the revocation in
its own registration pipeline (``auth_reply`` ``token_revoked``).

``PUT`` / ``DELETE /v1/users/{id}/devices/{deviceId}`` keep the ``device``
table that ``twistd impush`` reads (:mod:`imcluster.store.devices`).

:class:`ControlResources` is mixed into
:class:`~imcluster.api.resources.APIResource`: it uses its ``registry``,
``publisher.bus``, ``devices`` and ``revoke_ttl``.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer

from imcluster import envelope
from imcluster.store import valid_user_id
from imcluster.store.devices import check_device, valid_device_id

#: the longest a revocation must be remembered: the longest token lifetime (default 30 days)
DEFAULT_REVOKE_TTL = 30 * 86400.0


def _api_error(status: int, message: str) -> Exception:
    from imcluster.api.resources import APIError

    return APIError(status, message)


class ControlResources:
    """Handlers of the kick, revoke and devices routes (see the module docstring)."""

    devices: Any = None
    revoke_ttl: float = DEFAULT_REVOKE_TTL

    def _devices(self) -> Any:
        if self.devices is None:
            from imcluster.store.devices import DeviceStore

            self.devices = DeviceStore(self.store.db)  # the API's PostgreSQL
        return self.devices

    def _user_param(self, user_id: str) -> None:
        if not valid_user_id(user_id):
            raise _api_error(400, "not a user id (1-128 of A-Z a-z 0-9 _ . @ -)")

    def _admin_only(self, principal: Any, what: str) -> None:
        if not principal.admin:
            raise _api_error(403, f"only the admin key may {what}")

    async def _tell_gateways(self, user_id: str, fields: Any, body: bytes) -> int:
        """Publish ``body`` to every gateway named by the user's connection fields; how many took it."""
        bus = self.publisher.bus
        uuids = sorted({f.split(envelope.SEP, 1)[0] for f in fields if envelope.SEP in f})
        results = await defer.DeferredList(
            [bus.publish(bus.gateway_key(u), body, mandatory=True, persistent=False) for u in uuids],
            consumeErrors=True)
        told = 0
        for uuid, (ok, result) in zip(uuids, results):
            if ok:
                told += 1
            else:
                # a dead gateway's queue is gone with its connections (the reaper clears its entries)
                self.log.info("control for {user} not routed to gateway {uuid}: {err}", user=user_id,
                              uuid=uuid, err=result.getErrorMessage())
        return told

    async def kick(self, request: Any, principal: Any, user_id: str) -> tuple[int, dict]:
        self._admin_only(principal, "kick a user")
        self._user_param(user_id)
        body = self.json_object(request) if _has_body(request) else {}
        reason = body.get("reason")
        if "reason" in body and not isinstance(reason, str):
            raise _api_error(400, "reason must be a string")
        found = await self.registry.connections_of([user_id])
        told = await self._tell_gateways(user_id, found.get(user_id) or {},
                                         envelope.control_body(envelope.KICK, user_id))
        self.log.info("kick of {user} ({reason}): told {n} gateways", user=user_id, reason=reason, n=told)
        return 202, {"userId": user_id, "gateways": told}

    async def revoke(self, request: Any, principal: Any, user_id: str) -> tuple[int, dict]:
        self._admin_only(principal, "revoke a user's tokens")
        self._user_param(user_id)
        not_before = int(time.time() * 1000)
        fields = await self.registry.revoke(user_id, not_before, self.revoke_ttl)
        told = await self._tell_gateways(user_id, fields,
                                         envelope.control_body(envelope.REVOKE, user_id, not_before))
        self.log.info("revoke of {user} at {nb}: told {n} gateways", user=user_id, nb=not_before, n=told)
        return 202, {"userId": user_id, "notBefore": not_before}

    def _device_params(self, principal: Any, user_id: str, device_id: str) -> None:
        self._user_param(user_id)
        if not principal.admin and principal.user_id != user_id:
            raise _api_error(403, "a user may change only their own devices")
        if not valid_device_id(device_id):
            raise _api_error(400, "not a device id (1-128 of A-Z a-z 0-9 _ . : @ -)")

    async def put_device(self, request: Any, principal: Any, user_id: str, device_id: str) -> tuple[int, dict]:
        self._device_params(principal, user_id, device_id)
        body = self.json_object(request)
        why = check_device(body.get("platform"), body.get("token"))
        if why is not None:
            raise _api_error(400, why)
        try:
            await self._devices().put(user_id, device_id, body["platform"], body["token"])
        except Exception as e:
            raise _store_unavailable(e) from None
        return 200, {"userId": user_id, "deviceId": device_id, "platform": body["platform"]}

    async def delete_device(self, request: Any, principal: Any, user_id: str, device_id: str) -> tuple[int, Any]:
        self._device_params(principal, user_id, device_id)
        try:
            await self._devices().delete(user_id, device_id)
        except Exception as e:
            raise _store_unavailable(e) from None
        return 204, None


def _has_body(request: Any) -> bool:
    raw = request.content.getvalue() if hasattr(request.content, "getvalue") else b""
    return bool(raw.strip())


def _store_unavailable(e: Exception) -> Exception:
    from imcluster.db import DatabaseUnavailable
    from imcluster.store import StoreUnavailable

    return StoreUnavailable(str(e)) if isinstance(e, DatabaseUnavailable) else e
