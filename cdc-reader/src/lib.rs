//! cdc-reader: PostgreSQL WAL (logical replication, `pgoutput`) → Kafka change events.
//!
//! Not built yet: this crate is reserved in the workspace so that the layout names the data flow
//! (`cdc-reader/` → `projector/` → `api/`). It has no binary, so `scripts/dev up` does not start
//! it and `scripts/dev status` reports it as `not-built`. The reader is the subject of its own issue
//! (decode, stream and publish, see DESIGN.md).
