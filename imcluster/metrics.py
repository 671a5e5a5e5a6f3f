"""Prometheus metrics of every daemon (prometheus-client).

Defined once here so that the gateway, the processor and the API count the
same way; the ``--metrics`` endpoint (and imapi's ``/metrics``) exposes them.
Names follow Prometheus conventions: ``imcluster_<what>_<unit>``.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000, 100000)


class _Cell:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Tally:
    """A Prometheus counter for per-frame paths: ``labels(...).inc(n)`` adds to a plain number.

    prometheus-client's Counter takes a lock on every ``inc`` (~1 us; 4-6 of
    them per frame were 5 % of a gateway's CPU in the fan-out benchmark).
    Only the reactor thread writes these, and ``/metrics`` is served on it
    too, so no lock is needed: the registry reads the numbers at scrape time.
    """

    def __init__(self, name: str, documentation: str, labelnames: list[str], registry: Any = REGISTRY) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._cells: dict[tuple[str, ...], _Cell] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, **values: str) -> _Cell:
        key = tuple(str(values[n]) for n in self.labelnames)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = _Cell()
        return cell

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, cell in list(self._cells.items()):
            family.add_metric(list(key), cell.value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


# --- gateway
CONNECTIONS = Gauge(
    "imcluster_connections", "Open client connections",
    ["transport", "authenticated"])
FRAMES_IN = Tally("imcluster_frames_in_total", "Client frames received", ["transport", "type"])
FRAMES_OUT = Tally("imcluster_frames_out_total", "Frames sent to clients", ["transport"])
BYTES_IN = Tally("imcluster_bytes_in_total", "Bytes of client frames received", ["transport"])
BYTES_OUT = Tally("imcluster_bytes_out_total", "Bytes of frames sent to clients", ["transport"])
ERRORS = Counter("imcluster_errors_total", "Error codes sent to clients", ["code"])
AUTH_FAILURES = Counter("imcluster_auth_failures_total", "Failed authentications", ["code"])
CLOSES = Counter("imcluster_closes_total", "Connections closed by the server", ["reason"])
PUBLISH_BATCH = Histogram(
    "imcluster_publish_batch_size", "Client frames per AMQP publish", buckets=_SIZE_BUCKETS)

# --- processor
MESSAGES_STORED = Counter("imcluster_messages_stored_total", "Messages stored in messagerecv")
DUPLICATES = Counter("imcluster_duplicates_total", "Messages recognised as duplicates by clientMsgId")
DELIVERIES = Counter("imcluster_deliveries_routed_total", "message_send frames routed to connections")
ACKS = Counter("imcluster_acks_total", "msgIds acknowledged by clients")
SYNC_SIZE = Histogram("imcluster_sync_messages", "Messages sent per sync", buckets=_SIZE_BUCKETS)
BATCH_SIZE = Histogram("imcluster_batch_size", "Queue items handled per transaction", buckets=_SIZE_BUCKETS)
QUEUE_TO_COMMIT = Histogram(
    "imcluster_queue_to_commit_seconds", "From the gateway's receipt to the processor's commit",
    buckets=_LATENCY_BUCKETS)
END_TO_END = Histogram(
    "imcluster_end_to_end_seconds", "From the gateway's receipt to the routing publish",
    buckets=_LATENCY_BUCKETS)
REAPED = Counter("imcluster_reaped_gateways_total", "Dead gateways whose entries were reaped")
DEAD_LETTERED = Counter("imcluster_dead_lettered_total",
                        "Queue messages and items dead-lettered to <ns>.dead as poison")
POISON = Counter("imcluster_poison_items_total", "Items answered with an error as poison, by reason",
                 ["reason"])
PUBLISH_REFUSED = Counter("imcluster_publish_refused_total",
                          "AMQP publishes refused for good (above max_publish_bytes, or a 406 from the broker)")
REDELIVERED = Counter("imcluster_redelivered_total",
                      "message_send deliveries sent again by the sweep of rows left undelivered")
SWEEP_ROWS = Counter("imcluster_redeliver_rows_total", "Undelivered rows the sweep looked at")
RETRIES = Counter("imcluster_retries_total", "Batches retried after a transient failure")

# --- calls to business servers (moderation service, webhooks; kind: moderation | webhook)
BUSINESS_CALLS = Counter(
    "imcluster_business_calls_total", "HTTP calls made to business servers, by kind and outcome "
    "(ok, failed: an error, a timeout or an answer that is not 2xx)", ["kind", "outcome"])
BUSINESS_RETRIES = Counter(
    "imcluster_business_retries_total", "Calls to business servers made again after a failure", ["kind"])
BUSINESS_DEAD = Counter(
    "imcluster_business_dead_lettered_total", "Events given up after webhook_retry and dead-lettered to "
    "<ns>.dead", ["kind"])
BUSINESS_LATENCY = Histogram(
    "imcluster_business_call_seconds", "Durations of calls to business servers (failed ones too)", ["kind"],
    buckets=_LATENCY_BUCKETS)
BUSINESS_PUBLISHED = Counter(
    "imcluster_business_published_total", "Webhook events and push requests published to <ns>.webhooks and "
    "<ns>.push", ["queue"])

# --- HTTP listeners (imcluster.web.GuardedSite) and the HTTP API (imapi); route is the path
# template, e.g. /v1/sessions/{id}
HTTP_REQUESTS = Counter(
    "imcluster_http_requests_total", "HTTP API requests answered", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "imcluster_http_request_seconds", "HTTP API request durations", ["route"], buckets=_LATENCY_BUCKETS)
HTTP_CONNECTIONS = Gauge(
    "imcluster_http_connections", "Open HTTP connections, by listener (api, metrics)", ["listener"])
HTTP_REFUSED = Counter(
    "imcluster_http_connections_refused_total", "HTTP connections closed at once: max_connections were open",
    ["listener"])
HTTP_TIMEOUTS = Counter(
    "imcluster_http_timeouts_total", "HTTP connections closed because a request's headers (http_header_timeout) "
    "or body (http_body_timeout) did not arrive in time", ["listener", "phase"])
API_MESSAGES = Counter(
    "imcluster_api_messages_total", "Messages posted over the HTTP API, by outcome "
    "(created, duplicate, or the processors' error code)", ["result"])

# --- shared clients
RECONNECTS = Counter("imcluster_reconnects_total", "Reconnections to a shared service", ["service"])
RESYNCS = Counter("imcluster_resync_requests_total",
                  "Connections a gateway asked to sync again after its queue or Redis entries were lost")
PRESENCE_TRANSITIONS = Counter("imcluster_presence_transitions_total",
                               "Users that went online or offline, counted by the daemon that detected it")
PRESENCE_FRAMES = Counter("imcluster_presence_frames_total", "presence frames sent to subscribed connections")
TYPING_DROPPED = Counter("imcluster_typing_dropped_total",
                         "typing frames a gateway dropped (more than one per typing_interval per session)")


# --- impush (offline push, HTTP-API.md 1.1)
PUSH_CALLS = Counter(
    "imcluster_push_calls_total",
    "Push requests POSTed to push_url, by outcome: ok, invalid (404/410: devices removed), failed "
    "(will be retried), refused (a 4xx that a retry cannot cure: dead-lettered)", ["result"])
PUSH_RETRIES = Counter("imcluster_push_retries_total", "Push requests scheduled again after a failed call")
PUSH_DEAD = Counter("imcluster_push_dead_lettered_total",
                    "Push requests dead-lettered to <ns>.dead (push_retry passed, or refused)")
PUSH_DEVICES_REMOVED = Counter("imcluster_push_devices_removed_total",
                               "Devices removed because the push provider called them invalid")
PUSH_SKIPPED = Counter("imcluster_push_skipped_total",
                       "Push requests not sent: the user has no device (or the request was malformed)",
                       ["reason"])
PUSH_LATENCY = Histogram("imcluster_push_call_seconds", "Duration of one call to push_url",
                         buckets=_LATENCY_BUCKETS)

