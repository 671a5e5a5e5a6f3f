-- imcluster 0002: sync pages through a user's undelivered rows in (session_id, seq)
-- order with session ids in BYTE order (PROTOCOL.md "Sync"), i.e. COLLATE "C".
-- 0001's index uses the database's default collation, which is not byte order
-- in most locales (en_US.UTF-8, even C.UTF-8 as far as the planner knows), so
-- ORDER BY session_id COLLATE "C" could not use it and sorted the whole backlog
-- for every page. Same columns, same partial predicate, byte-order collation.

CREATE INDEX messagesend_undelivered_c ON messagesend (user_id, session_id COLLATE "C", seq)
    WHERE status <> 'delivered';
DROP INDEX messagesend_undelivered;
ALTER INDEX messagesend_undelivered_c RENAME TO messagesend_undelivered;
