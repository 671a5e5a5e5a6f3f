"""Prometheus metrics of every daemon (prometheus-client).

Defined once here so that the gateway, the processor and the API count the
same way; the ``--metrics`` endpoint (and imapi's ``/metrics``) exposes them.
Names follow Prometheus conventions: ``imcluster_<what>_<unit>``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000, 100000)

# --- gateway
CONNECTIONS = Gauge(
    "imcluster_connections", "Open client connections",
    ["transport", "authenticated"])
FRAMES_IN = Counter("imcluster_frames_in_total", "Client frames received", ["transport", "type"])
FRAMES_OUT = Counter("imcluster_frames_out_total", "Frames sent to clients", ["transport"])
BYTES_IN = Counter("imcluster_bytes_in_total", "Bytes of client frames received", ["transport"])
BYTES_OUT = Counter("imcluster_bytes_out_total", "Bytes of frames sent to clients", ["transport"])
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
DEAD_LETTERED = Counter("imcluster_dead_lettered_total", "Queue messages dead-lettered as poison")
RETRIES = Counter("imcluster_retries_total", "Batches retried after a transient failure")

# --- HTTP API (imapi); route is the path template, e.g. /v1/sessions/{id}
HTTP_REQUESTS = Counter(
    "imcluster_http_requests_total", "HTTP API requests answered", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "imcluster_http_request_seconds", "HTTP API request durations", ["route"], buckets=_LATENCY_BUCKETS)
API_MESSAGES = Counter(
    "imcluster_api_messages_total", "Messages posted over the HTTP API, by outcome "
    "(created, duplicate, or the processors' error code)", ["result"])

# --- shared clients
RECONNECTS = Counter("imcluster_reconnects_total", "Reconnections to a shared service", ["service"])
