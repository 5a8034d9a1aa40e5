-- cdc-reader's record of an initial snapshot under way, one row per replication slot, written
-- before its first record is sent and removed when the snapshot is recorded as finished. When an
-- attempt is interrupted, the next one reads back what the earlier attempts published (from these
-- offsets on, records at or after first_point) so that it sends only rows that changed since, and a
-- delete for rows that are gone.
CREATE TABLE cdc_reader_snapshot_attempts (
    slot          text        PRIMARY KEY,
    -- The consistent point of the first attempt: earlier attempts' records sit just below it or later.
    first_point   pg_lsn      NOT NULL,
    -- {"topic": {"partition": offset, ...}, ...}: where each partition ended before the first attempt.
    start_offsets jsonb       NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now()
);
