-- Inspection: per consumer group, topic and partition, how far the projector applied and how
-- fresh that was (SELECT * FROM projector_status).
--
-- last_record_at: the Kafka timestamp (when cdc-reader produced it) of the newest record of the
-- partition's last applied batch.
ALTER TABLE projector_offsets ADD COLUMN last_record_at timestamptz;

CREATE VIEW projector_status AS
SELECT consumer_group,
       topic,
       partition,
       next_offset,
       source_lsn                   AS applied_source_lsn,
       updated_at                   AS last_applied_at,
       -- How long the newest applied record took from the reader to the views.
       updated_at - last_record_at  AS freshness,
       now() - updated_at           AS since_last_apply
  FROM projector_offsets;
