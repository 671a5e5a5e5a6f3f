-- imcluster 0001: the seed's tables (ARCHITECTURE.md "PostgreSQL tables").
-- Applied by `imcluster migrate` in one transaction, recorded in schema_migrations.

CREATE TABLE session (
    id          text PRIMARY KEY,
    kind        text NOT NULL DEFAULT 'group' CHECK (kind IN ('group', 'p2p')),
    last_seq    bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE session_member (
    session_id  text NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    user_id     text NOT NULL,
    role        text NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'member')),
    joined_at   timestamptz NOT NULL DEFAULT now(),
    -- the read cursor of PROTOCOL.md "Read receipts": never moves back
    read_seq    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, user_id)
);
-- a user's sessions (GET /v1/users/{id}/sessions)
CREATE INDEX session_member_user ON session_member (user_id);

-- every accepted message, once
CREATE TABLE messagerecv (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id     text NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    seq            bigint NOT NULL,
    sender_id      text NOT NULL,
    client_msg_id  text NOT NULL,
    body           jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- the seed's "is clientMsgId already in messagerecv": racing processors cannot both insert
    CONSTRAINT messagerecv_sender_client_msg_id UNIQUE (sender_id, client_msg_id),
    -- per-session order; also serves history (session_id, seq < beforeSeq)
    CONSTRAINT messagerecv_session_seq UNIQUE (session_id, seq)
);
-- unread counts: a user's own messages above the read cursor
CREATE INDEX messagerecv_session_sender_seq ON messagerecv (session_id, sender_id, seq);

-- one row per (recipient, message); the sender has none for its own message.
-- session_id and seq are copied from messagerecv so that sync can page through
-- a backlog in (session_id, seq) order on one index, without a join or sort.
CREATE TABLE messagesend (
    user_id     text NOT NULL,
    msg_id      bigint NOT NULL REFERENCES messagerecv (id) ON DELETE CASCADE,
    session_id  text NOT NULL,
    seq         bigint NOT NULL,
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sending', 'delivered')),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, msg_id)
);
-- sync: undelivered (pending or sending) rows of a user in (session_id, seq) order
CREATE INDEX messagesend_undelivered ON messagesend (user_id, session_id, seq)
    WHERE status <> 'delivered';
-- ON DELETE CASCADE from messagerecv
CREATE INDEX messagesend_msg ON messagesend (msg_id);
