"""The message store, shared by the processors and the HTTP API.

Like Buildbot's ``mq``: the contract (:mod:`.base`, re-exported here: value
types, errors, id rules) apart from the implementations
(:mod:`.postgres`; :class:`imcluster.testing.FakeStore` in memory). Import
the contract from ``imcluster.store``; only a daemon's ``tap.py`` (and
tests) names an implementation, so importing this package pulls in no
driver.
"""

from imcluster.store.base import (  # noqa: F401 (the package's API)
    BAD_REQUEST, BIGINT_MAX, CLIENT_MSG_ID_MAX, CONFLICT, ERROR_CODES, HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT,
    NO_SESSION, NOT_MEMBER, P2P_PREFIX, P2P_SESSION_ID_MAX, SESSION_ID_RE, TOO_LARGE, Incoming, Rejected, Stored, StoreError,
    StoreUnavailable, WindowAborted, WindowTransaction, bytes_key, check_member_change, check_new_session, clamp_bigint, copy_answer, p2p_session_id,
    p2p_recipients, parse_msg_id, parse_p2p, sorted_pairs, storable_json, valid_client_msg_id, valid_session_id, valid_user_id,
)
from imcluster.store.base import (  # noqa: F401 (1.1: events in the session's order)
    EDIT, EVENT_KINDS, MEMBERS, MESSAGE_KIND, NO_MESSAGE, NOT_ALLOWED, RECALL, Event, entry_fields,
)
