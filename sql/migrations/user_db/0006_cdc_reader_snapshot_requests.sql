-- Snapshots asked of the running cdc-reader (`cdc-reader snapshot [--table T]`): the reader takes the
-- oldest unfinished request of its slot within a second and publishes the rows of the tables while it
-- keeps streaming; a request interrupted by a restart is taken again.
CREATE TABLE cdc_reader_snapshot_requests (
    id           bigserial   PRIMARY KEY,
    slot         text        NOT NULL,
    -- schema.table names; NULL: every table the reader captures.
    tables       text[],
    requested_at timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    done_at      timestamptz,
    -- 'done', or why not.
    outcome      text,
    -- Rows published.
    rows         bigint
);
CREATE INDEX cdc_reader_snapshot_requests_open_idx ON cdc_reader_snapshot_requests (slot, id)
    WHERE done_at IS NULL;
