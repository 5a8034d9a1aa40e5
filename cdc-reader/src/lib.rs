//! cdc-reader: PostgreSQL WAL (logical replication, `pgoutput`) → Kafka change events.
//!
//! ```text
//!  slot (pgoutput bytes) ──► decode ──► (events) ──► Kafka
//! ```
//!
//! - [`decode`]: pgoutput protocol v1 bytes → typed messages; pure, never panics.
//! - [`values`]: column values in text form → natural JSON; pure.
//!
//! Built so far: the decoder. Streaming from the slot, the change-event envelope and publishing
//! are not built yet, so the crate has no binary; `scripts/dev status` reports it as `not-built`.

pub mod decode;
pub mod values;
