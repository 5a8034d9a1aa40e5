//! The REST services of the pipeline.
//!
//! ```text
//!  client ──REST──► user_api ──SQL──► user_db.users          (the only write of the user service)
//!  client ──REST──► post_api ──SQL──► materialized_view_db  (posts; user_view and department_stats
//!                                                            kept by the projector)
//! ```
//!
//! - [`user_api`]: routes, validation ([`user_api::model`]) and SQL of the user service.
//! - [`post_api`]: routes, validation ([`post_api::model`]) and SQL of the post service.
//! - [`http`]: the error format clients see, bounded JSON bodies, rejection mapping.
//! - [`db`]: connection pool, query errors as clients see them, `/health`.
//! - [`serve`]: pool, migrations, serving and draining, for both services.

pub mod db;
pub mod http;
pub mod post_api;
pub mod serve;
pub mod user_api;
