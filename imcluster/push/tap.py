"""``twistd impush``: options and the push daemon's service tree.

The tree (children start in order and stop in reverse)::

    DaemonService "impush"             gives up after --shutdown-timeout; a clean stop exits 0
      PostgresService "postgres"       shared clients first ...
      AMQPService     "amqp"
      "metrics" (--metrics)            /metrics and /healthz (imcluster.web)
      PushService     "push"           ... the consumer last, so it stops first

Stopping (SIGTERM): the consumer lets the calls in flight finish and is
cancelled (unacknowledged messages go back to ``<ns>.push`` for another
impush), then AMQP and PostgreSQL close.
"""

from __future__ import annotations

from typing import Any

from imcluster.config import PUSH, make_options
from imcluster.service import DaemonService


def _check(config: Any) -> None:
    if not config.push_url:
        raise ValueError("push_url is required: the URL of your push relay (--push-url, IMCLUSTER_PUSH_URL, "
                         "or push_url in the configuration file)")


Options = make_options(PUSH, "twistd impush [options]", check=_check)


def build(config: Any) -> tuple[DaemonService, Any]:
    """The impush tree for ``config`` and its :class:`~imcluster.push.service.PushService`."""
    from imcluster.bus import AMQPService
    from imcluster.db import PostgresService
    from imcluster.push.client import PushClient
    from imcluster.push.service import PushService
    from imcluster.store.devices import DeviceStore
    from imcluster.web import dependency_probes, make_metrics_service

    root = DaemonService("impush", config.shutdown_timeout)
    db = PostgresService.from_config(config)
    db.setServiceParent(root)
    amqp = AMQPService.from_config(config, name="amqp")
    amqp.setServiceParent(root)
    client = PushClient(config.push_url, config.webhook_secret, config.push_timeout, config.push_concurrency)
    push = PushService(config, amqp, DeviceStore(db), client, push_hold=config.push_hold)
    probes = dependency_probes(amqp=amqp, postgres=db)
    probes["push"] = lambda: push.healthy
    make_metrics_service(config, probes).setServiceParent(root)
    push.setServiceParent(root)
    return root, push


def makeService(options: Any) -> DaemonService:  # noqa: N802 (twistd API)
    """Assemble the push daemon from ``options.config``."""
    return build(options.config)[0]
