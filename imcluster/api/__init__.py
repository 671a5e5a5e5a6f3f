"""``twistd imapi``: the HTTP API of HTTP-API.md (sessions, members, history, server-side
publish, presence), with ``/healthz``, ``/metrics`` and ``/openapi.json``."""
