"""``twistd imapi``: options and the HTTP API daemon's service tree.

The tree (children start in order and stop in reverse)::

    DaemonService "imapi"              gives up after --shutdown-timeout; a clean stop exits 0
      PostgresService "postgres"       shared clients first ...
      PostgresService "postgres-replica-<n>"  (--postgres-replica) history, session reads
      RedisService "redis"
      AMQPService "amqp"
      MessagePublisher "publisher"     consumes <ns>.gateway.<api-uuid> (replies)
      HTTP listeners (--http)          ... listeners last, so they stop first

Stopping (SIGTERM): the listeners close, requests still waiting for the
processors' reply answer 503, then AMQP, Redis and PostgreSQL close.
"""

from __future__ import annotations

from typing import Any

from imcluster.config import API, make_options
from imcluster.service import DaemonService

def _check(config: Any) -> Any:
    """Load the JWT key now, so a bad one is a usage error, not a traceback at start."""
    from imcluster.auth import JWTAuthenticator

    return JWTAuthenticator.from_config(config)


Options = make_options(API, "twistd imapi [options]", check=_check)


def build(config: Any, authenticator: Any = None) -> tuple[DaemonService, Any]:
    """The imapi tree for ``config`` and its :class:`~imcluster.api.resources.APIResource`."""
    from imcluster.api.publisher import MessagePublisher
    from imcluster.api.resources import APIResource, make_site
    from imcluster.api.webapp import mount
    from imcluster.auth import JWTAuthenticator
    from imcluster.bus import AMQPService
    from imcluster.db import PostgresService, ReadPool
    from imcluster.store.postgres import MessageStore
    from imcluster.registry import RedisService
    from imcluster.web import ListenerService, dependency_probes

    root = DaemonService("imapi", config.shutdown_timeout)
    db = PostgresService.from_config(config)
    db.setServiceParent(root)
    # --postgres-replica: history and the HTTP API's reads (never sync, seq or de-duplication)
    reader = ReadPool.from_config(config, db)
    for replica in reader.replicas:
        replica.setServiceParent(root)
    redis = RedisService.from_config(config)
    redis.setServiceParent(root)
    amqp = AMQPService.from_config(config)
    amqp.setServiceParent(root)
    publisher = MessagePublisher.from_config(config, amqp)
    publisher.setServiceParent(root)
    probes = dependency_probes(redis=redis, amqp=amqp, postgres=db)
    api = APIResource(
        MessageStore(db, config.max_group_size, reader=reader), redis, publisher,
        authenticator or JWTAuthenticator.from_config(config),
        config.api_key, probes, health_timeout=config.health_timeout, max_json_depth=config.max_json_depth,
        max_frame_size=config.max_frame_size)
    from imcluster.api.events import SessionEvents

    events = SessionEvents(amqp, config)
    if events.enabled:
        events.declare()
        api.session_events = events
    # HTTP-API.md 1.1: push targets and revocations (imcluster/api/control.py)
    from imcluster.store.devices import DeviceStore

    api.devices = DeviceStore(db)
    api.revoke_ttl = config.revoke_ttl
    # the web chat page (/app/) and, with --dev-login only, POST /v1/dev/login
    site = make_site(mount(api, config), config)
    for description in config.http:
        ListenerService(description, site).setServiceParent(root)
    return root, api


def makeService(options: Any) -> DaemonService:  # noqa: N802 (twistd API)
    """Assemble the API daemon from ``options.config``."""
    return build(options.config, getattr(options, "checked", None))[0]
