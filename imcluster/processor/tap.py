"""``twistd improcessor``: options and the processor daemon's service tree.

The tree (children start in order and stop in reverse)::

    DaemonService "improcessor"        gives up after --shutdown-timeout
      PostgresService "postgres"       shared clients first ...
      PostgresService "postgres-replica-<n>"  (--postgres-replica) history reads
      (migrations, with --migrate)     applied before anything consumes
      RedisService    "redis"
      AMQPService     "amqp"
      "metrics" (--metrics)            /metrics and /healthz (imcluster.web)
      GuardedLoop     "reaper"         every --heartbeat seconds
      GuardedLoop     "liveness"       every --presence-check seconds (0: none): gateways killed
                                       without exiting are reaped within --presence-grace
      GuardedLoop     "redeliver"      every --redeliver-interval seconds (0: none)
      WebhookService  "webhooks"       (--webhook-url) calls the business server
      GuardedLoop     "retention"      every --retention-interval seconds (with --retention-days)
      ProcessorService "processor"     ... the consumer last, so it stops first

Stopping (SIGTERM) therefore runs: the consumer finishes the window in
flight and is cancelled (unacknowledged messages go back to RabbitMQ for
another processor), the reaper stops, then AMQP, Redis and PostgreSQL close;
all within ``--shutdown-timeout``.

The moderation filters (``--filters``) are loaded while the options are
parsed: an unknown filter or an unreadable word list stops twistd before
anything starts.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.python import usage

from imcluster.config import PROCESSOR, ConfigError, make_options
from imcluster.service import DaemonService


class Options(make_options(PROCESSOR, "twistd improcessor [options]")):
    """The processor's options (imcluster.config OPTIONS), plus the filters, checked before start."""

    def postOptions(self) -> None:  # noqa: N802 (Twisted API)
        super().postOptions()
        from imcluster.processor.filters import load_filters

        try:
            self.filters = load_filters(self.config)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


class MigrateService(service.Service):
    """Applies pending migrations when it starts (``--migrate``); the daemon stops if one fails."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.setName("migrate")

    def startService(self):  # noqa: N802 (Twisted API)
        super().startService()
        from imcluster.db import apply_migrations

        return apply_migrations(self.db)


def makeService(options: Any) -> DaemonService:  # noqa: N802 (twistd API)
    """Assemble the processor daemon from ``options.config``."""
    from imcluster.bus import AMQPService
    from imcluster.db import PostgresService, ReadPool
    from imcluster.processor.filters import load_filters
    from imcluster.processor.reaper import Reaper
    from imcluster.processor.service import ProcessorService
    from imcluster.store.postgres import MessageStore
    from imcluster.registry import RedisService
    from imcluster.web import dependency_probes, make_metrics_service

    config = options.config
    filters = getattr(options, "filters", None)
    if filters is None:
        filters = load_filters(config)
    root = DaemonService("improcessor", config.shutdown_timeout)
    db = PostgresService.from_config(config)
    db.setServiceParent(root)
    # --postgres-replica: history and the HTTP API's reads (never sync, seq or de-duplication)
    reader = ReadPool.from_config(config, db)
    for replica in reader.replicas:
        replica.setServiceParent(root)
    if config.migrate:
        MigrateService(db).setServiceParent(root)
    redis = RedisService.from_config(config)
    redis.setServiceParent(root)
    amqp = AMQPService.from_config(config)
    amqp.setServiceParent(root)
    store = MessageStore(db, config.max_group_size, reader=reader)
    from imcluster.presence import Tracker

    # a reaped gateway's users go offline: presence frames and user.offline events
    tracker = Tracker(redis, amqp, config)
    tracker.start()  # declares <ns>.webhooks with the topology when user.* events are published
    reaper = Reaper(redis, tracker)
    # calls to business servers (business.py): the moderation service is the last filter
    from imcluster.processor import business

    more_filters, outgoing, webhooks = business.build(config, amqp)
    processor = ProcessorService(config, amqp, redis, store, [*filters, *more_filters], reaper=reaper)
    if outgoing is not None:
        outgoing.declare()  # on every connection: a publish to a queue not there would be lost
        processor.pipeline.outgoing = outgoing
    probes = dependency_probes(redis=redis, amqp=amqp, postgres=db)
    probes["processor"] = lambda: processor.healthy
    make_metrics_service(config, probes).setServiceParent(root)
    reaper.service(config.heartbeat).setServiceParent(root)
    if config.presence_check > 0:
        from imcluster.processor.liveness import LivenessWatch

        LivenessWatch(redis, reaper, config.presence_grace).service(config.presence_check).setServiceParent(root)
    if config.redeliver_interval > 0:
        from imcluster.processor.redeliver import Redeliverer

        Redeliverer(store, processor.router, config).service().setServiceParent(root)
    if webhooks is not None:
        webhooks.setServiceParent(root)
    if config.retention_days > 0:
        from imcluster.processor.retention import Retention

        Retention(db, redis, config).service().setServiceParent(root)
    processor.setServiceParent(root)
    return root
