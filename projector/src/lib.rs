//! projector: Kafka change events → materialized view tables in `materialized_view_db`.
//!
//! Not built yet: this crate is reserved in the workspace so that the layout names the data flow
//! (`cdc-reader/` → `projector/` → `api/`). It has no binary, so `scripts/dev up` does not start
//! it and `scripts/dev status` reports it as `not-built`. The tables it will maintain are already
//! in `sql/migrations/materialized_view_db`.
