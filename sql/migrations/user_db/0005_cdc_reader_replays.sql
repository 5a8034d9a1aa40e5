-- Replays asked of the running cdc-reader (`cdc-reader replay --from-lsn`), one per slot: the reader
-- takes a request within a second, streams again from from_lsn (sending only what Kafka lacks) and
-- marks it done once Kafka has everything up to until_lsn (the WAL's end when it was asked).
CREATE TABLE cdc_reader_replays (
    slot            text        PRIMARY KEY,
    from_lsn        pg_lsn      NOT NULL,
    until_lsn       pg_lsn      NOT NULL,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    done_at         timestamptz,
    -- 'done', or why the reader refused it.
    outcome         text,
    -- Records of the replayed range Kafka had already (not sent again), and records sent.
    records_skipped bigint,
    records_sent    bigint
);
