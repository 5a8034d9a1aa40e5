-- The partition count of each topic a cdc-reader slot publishes to, as it was when the reader first
-- published there. The reader places each key in a partition by its hash among that many
-- partitions; when the count changes, keys move to other partitions and their order across the
-- change is lost, so a reader finding another count stops with an error that says what to do.
CREATE TABLE cdc_reader_topics (
    slot          text        NOT NULL,
    topic         text        NOT NULL,
    partitions    integer     NOT NULL CHECK (partitions > 0),
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, topic)
);
