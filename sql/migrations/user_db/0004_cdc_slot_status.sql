-- Inspection: the logical replication slots of this database, what they retain and how far
-- behind the current WAL they confirmed (SELECT * FROM cdc_slot_status).
CREATE VIEW cdc_slot_status AS
SELECT s.slot_name,
       s.active,
       s.active_pid,
       s.confirmed_flush_lsn,
       s.restart_lsn,
       pg_current_wal_lsn()                                  AS current_wal_lsn,
       (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint AS lag_bytes,
       (pg_current_wal_lsn() - s.restart_lsn)::bigint         AS retained_wal_bytes,
       pg_size_pretty((pg_current_wal_lsn() - s.restart_lsn)::bigint) AS retained_wal,
       s.wal_status,
       CASE WHEN a.slot IS NOT NULL THEN 'in progress'
            WHEN d.slot IS NOT NULL THEN 'done'
            ELSE 'none' END                                  AS initial_snapshot,
       d.rows                                                AS snapshot_rows,
       d.completed_at                                        AS snapshot_completed_at
  FROM pg_replication_slots s
  LEFT JOIN cdc_reader_snapshots d ON d.slot = s.slot_name
  LEFT JOIN cdc_reader_snapshot_attempts a ON a.slot = s.slot_name
 WHERE s.slot_type = 'logical' AND s.database = current_database();
