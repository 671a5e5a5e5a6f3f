"""``twistd imgateway``: options and the gateway daemon's service tree.

The tree (children start in order and stop in reverse)::

    DaemonService "imgateway"              gives up after --shutdown-timeout
      RedisService "redis"                 shared clients first ...
      AMQPService  "amqp"
      "metrics" (--metrics)                /metrics and /healthz (imcluster.web)
      GatewayService "gateway"             registers in Redis and consumes its queue,
                                           then starts its own children:
        GuardedLoop "heartbeat"              refreshes WSSERVER_<uuid> (survives failures)
        TransportListener "ws <endpoint>"    one per --ws endpoint (WebSocket) ...
        TransportListener "tcp <endpoint>"   ... one per --tcp endpoint (raw TCP) ...
        TransportListener "stream <endpoint>" ... one per --stream endpoint (HTTP streaming):
                                             listeners last, so they stop first

Stopping (SIGTERM) therefore runs: listeners stop, the heartbeat stops,
clients are told "going away", the gateway's Redis entries are removed, then
AMQP and Redis close.
"""

from __future__ import annotations

from typing import Any

from imcluster.config import GATEWAY, make_options
from imcluster.service import DaemonService

def _check(config: Any) -> Any:
    """Load the JWT key now, so a bad one is a usage error, not a traceback at start."""
    from imcluster.auth import JWTAuthenticator

    return JWTAuthenticator.from_config(config)


Options = make_options(GATEWAY, "twistd imgateway [options]", check=_check)


def makeService(options: Any) -> DaemonService:  # noqa: N802 (twistd API)
    """Assemble the gateway daemon from ``options.config``."""
    from imcluster.auth import JWTAuthenticator
    from imcluster.bus import AMQPService
    from imcluster.gateway.service import GatewayService
    from imcluster.registry import RedisService
    from imcluster.web import dependency_probes, make_metrics_service

    config = options.config
    root = DaemonService("imgateway", config.shutdown_timeout)
    redis = RedisService.from_config(config)
    redis.setServiceParent(root)
    amqp = AMQPService.from_config(config)
    amqp.setServiceParent(root)
    authenticator = getattr(options, "checked", None) or JWTAuthenticator.from_config(config)
    gateway = GatewayService(config, redis, amqp, authenticator)
    probes = dependency_probes(redis=redis, amqp=amqp)
    probes["gateway"] = lambda: gateway.accepting
    make_metrics_service(config, probes).setServiceParent(root)
    gateway.setServiceParent(root)
    return root
