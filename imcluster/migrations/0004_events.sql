-- imcluster 0004: events in the session's order (PROTOCOL.md 1.1 "Events in the session's
-- order"). A recall, an edit and a membership change are entries of messagerecv like
-- messages: they take the next seq under the session's lock, have messagesend rows (sync,
-- acknowledgement), and are listed in history. `kind` tells them apart ('message' for
-- every row written before), `ref` names the message a recall or an edit is about.
-- The original keeps its latest state in place: a recall sets `recalled` and erases
-- its body (null), an edit writes the new body and sets `edited`. NOT NULL columns with
-- a constant default are metadata only (no table rewrite).

ALTER TABLE messagerecv
    ADD COLUMN kind text NOT NULL DEFAULT 'message'
        CHECK (kind IN ('message', 'recall', 'edit', 'members')),
    ADD COLUMN ref bigint,
    ADD COLUMN recalled boolean NOT NULL DEFAULT false,
    ADD COLUMN edited boolean NOT NULL DEFAULT false;

-- unread counts leave events out: the events above a read cursor, counted on this
-- (small) partial index beside messagerecv_session_sender_seq
CREATE INDEX messagerecv_session_events ON messagerecv (session_id, seq) WHERE kind <> 'message';
