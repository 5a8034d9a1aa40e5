//! The REST services of the pipeline.
//!
//! ```text
//!  client ──REST──► user_api ──SQL──► user_db.users          (the only write of the user service)
//!  client ──REST──► post-api (later) ──SQL──► materialized_view_db (views kept by the projector)
//! ```
//!
//! - [`user_api`]: routes, validation ([`user_api::model`]) and SQL of the user service.
//! - [`http`]: the error format clients see, bounded JSON bodies, rejection mapping.
//! - [`db`]: connection pool, start-up migration with backoff.

pub mod db;
pub mod http;
pub mod user_api;
