-- imcluster 0003: the redelivery sweep (ARCHITECTURE.md "Failure rules": deliveries heal
-- by themselves). Processors look, every few seconds, at the rows left undelivered
-- (pending or sending) for a few seconds, in updated_at order from a cursor, and deliver
-- them again to recipients who are online. This partial index makes that a range scan
-- of the undelivered rows only; a row leaves it when it is acknowledged, as it leaves
-- messagesend_undelivered. Its cost on inserts is measured in docs/benchmarks.rst.

CREATE INDEX messagesend_stale ON messagesend (updated_at) WHERE status <> 'delivered';
