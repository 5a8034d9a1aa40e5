#!/bin/sh
# The service roles and the two databases, each role reaching only what its service needs. The
# postgres image runs this once, when it initializes an empty data volume; `scripts/dev` runs it on
# its private cluster too (it is idempotent: what exists is left as it is, passwords included).
#
#   user_service  owns user_db (user-api writes users; `migrate` applies the user_db schema)
#   view_service  owns materialized_view_db (projector, post-api; `migrate` applies its schema)
#   cdc_reader    logical replication from user_db; a member of user_service, because PostgreSQL
#                 lets only a table's owner add it to a publication (Debezium documents the same
#                 shared-owner setup). To narrow it: create the publication as user_service
#                 beforehand and grant cdc_reader SELECT on the captured tables and SELECT, INSERT,
#                 UPDATE, DELETE on cdc_reader_snapshots, cdc_reader_snapshot_attempts,
#                 cdc_reader_topics and
#                 cdc_reader_replays instead of the membership.
# Neither database is open to PUBLIC: the reader cannot connect to the views, the view roles cannot
# connect to user_db.
#
# Environment: POSTGRES_USER (a superuser), USER_SERVICE_PASSWORD, VIEW_SERVICE_PASSWORD,
# CDC_READER_PASSWORD; psql's PG* variables say where the server is.
set -eu
psql -X -q -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v user_service_password="$USER_SERVICE_PASSWORD" \
  -v view_service_password="$VIEW_SERVICE_PASSWORD" \
  -v cdc_reader_password="$CDC_READER_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', role, password)
  FROM (VALUES ('user_service', :'user_service_password'),
               ('view_service', :'view_service_password'),
               ('cdc_reader', :'cdc_reader_password')) AS wanted (role, password)
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role) \gexec
ALTER ROLE cdc_reader REPLICATION;
SELECT 'GRANT user_service TO cdc_reader'
 WHERE NOT pg_has_role('cdc_reader', 'user_service', 'MEMBER') \gexec
SELECT 'CREATE DATABASE user_db OWNER user_service'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'user_db') \gexec
SELECT 'CREATE DATABASE materialized_view_db OWNER view_service'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'materialized_view_db') \gexec
REVOKE ALL ON DATABASE user_db, materialized_view_db FROM PUBLIC;
GRANT CONNECT ON DATABASE user_db TO cdc_reader;
SQL
