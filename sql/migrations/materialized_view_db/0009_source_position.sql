-- Read-your-writes: how far in the source's history the views are complete.
--
-- complete_lsn (per partition): every source transaction that ended at or before it is applied,
-- as far as this partition's records go. The reader commits, with each Kafka transaction, the
-- position of the last record of every partition; once a partition has been applied that far,
-- the projector raises complete_lsn to the end LSN committed with it (an idle partition too).
-- last_position: the `cdc.position` header (commit_lsn:event_index:sub) of the last record
-- applied from the partition, so that a restarted projector (or the one a partition moves to)
-- knows how far it is, even when no record of the partition comes again.
ALTER TABLE projector_offsets
  ADD COLUMN complete_lsn pg_lsn,
  ADD COLUMN last_position text;

-- The partitions of each topic a projector group consumes, so a partition that has no row yet
-- holds the position back.
CREATE TABLE projector_topics (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partitions     integer     NOT NULL CHECK (partitions > 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic)
);

-- Per projector group and topic: every source transaction that ended at or before complete_lsn
-- is in the views (null until every partition has one). post-api waits on it for
-- X-Min-Source-LSN.
CREATE VIEW projector_source_position AS
SELECT t.consumer_group,
       t.topic,
       CASE WHEN count(o.complete_lsn) >= t.partitions THEN min(o.complete_lsn) END AS complete_lsn
  FROM projector_topics t
  LEFT JOIN projector_offsets o
    ON o.consumer_group = t.consumer_group AND o.topic = t.topic AND o.partition < t.partitions
 GROUP BY t.consumer_group, t.topic, t.partitions;
