-- cdc-reader's record of finished initial snapshots, one row per replication slot. A slot without a
-- row here had its snapshot interrupted: the reader drops it and snapshots again.
CREATE TABLE cdc_reader_snapshots (
    slot             text        PRIMARY KEY,
    consistent_point pg_lsn      NOT NULL,
    rows             bigint      NOT NULL,
    completed_at     timestamptz NOT NULL DEFAULT now()
);
