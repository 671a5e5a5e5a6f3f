"""``twistd imgateway``: options and the gateway daemon's service tree.

The tree (children start in order and stop in reverse)::

    DaemonService "imgateway"          gives up after --shutdown-timeout
      RedisService "redis"             shared clients first ...
      AMQPService  "amqp"
      metrics site (--metrics)         /metrics and /healthz
      GatewayService "gateway"         ... listeners last, so they stop first

Stopping (SIGTERM) therefore runs: listeners stop, clients are told "going
away", the gateway's Redis entries are removed, then AMQP and Redis close.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.application import service, strports
from twisted.web import resource, server

from imcluster.config import GATEWAY, make_options
from imcluster.service import DaemonService

Options = make_options(GATEWAY, "twistd imgateway [options]")


class HealthResource(resource.Resource):
    """``/healthz``: 200 with ``{"ok": true, ...}`` when every check passes, else 503."""

    isLeaf = True

    def __init__(self, checks: dict[str, Callable[[], bool]]) -> None:
        super().__init__()
        self.checks = checks

    def render_GET(self, request):  # noqa: N802 (Twisted API)
        results = {}
        for name, check in self.checks.items():
            try:
                results[name] = bool(check())
            except Exception:
                results[name] = False
        ok = all(results.values())
        request.setResponseCode(200 if ok else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps({"ok": ok, **results}).encode()


class _QuietSite(server.Site):
    """No access log line per scrape: a Prometheus poll every few seconds would drown the log."""

    def log(self, request):
        pass


def metrics_site(checks: dict[str, Callable[[], bool]]) -> server.Site:
    """A twisted.web site serving the Prometheus text format on ``/metrics`` and ``/healthz``."""
    from prometheus_client.twisted import MetricsResource

    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource())
    root.putChild(b"healthz", HealthResource(checks))
    site = _QuietSite(root)
    site.noisy = False
    site.displayTracebacks = False
    return site


def makeService(options: Any) -> DaemonService:  # noqa: N802 (twistd API)
    """Assemble the gateway daemon from ``options.config``."""
    from imcluster.auth import JWTAuthenticator
    from imcluster.bus import AMQPService
    from imcluster.gateway.service import GatewayService
    from imcluster.registry import RedisService

    config = options.config
    root = DaemonService("imgateway", config.shutdown_timeout)
    redis = RedisService.from_config(config)
    redis.setServiceParent(root)
    amqp = AMQPService.from_config(config)
    amqp.setServiceParent(root)
    gateway = GatewayService(config, redis, amqp, JWTAuthenticator.from_config(config))
    if config.metrics:
        checks = {
            "redis": lambda: redis.connected,
            "amqp": lambda: amqp.connected,
            "gateway": lambda: gateway.accepting,
        }
        site = metrics_site(checks)
        for description in config.metrics:
            listener = strports.service(description, site)
            listener.setName(f"metrics {description}")
            listener.setServiceParent(root)
    gateway.setServiceParent(root)
    return root
