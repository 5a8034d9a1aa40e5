//! `migrate`: applies the schema to user_db and/or materialized_view_db.
//!
//! ```text
//! migrate --user-db-url postgres://... --view-db-url postgres://...
//! ```
//! Both URLs are also read from `USER_DB_URL` and `VIEW_DB_URL`. Re-running is a no-op.

use anyhow::{bail, Context};
use clap::Parser;
use schema::Database;

#[derive(Parser)]
#[command(
    version,
    about = "Apply the schema migrations of user_db and materialized_view_db"
)]
struct Args {
    /// Connection URL of user_db (e.g. postgres://user_service:...@127.0.0.1:55432/user_db).
    #[arg(long, env = "USER_DB_URL", hide_env_values = true)]
    user_db_url: Option<String>,
    /// Connection URL of materialized_view_db.
    #[arg(long, env = "VIEW_DB_URL", hide_env_values = true)]
    view_db_url: Option<String>,
}

impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs may carry passwords.
        f.debug_struct("Args").finish_non_exhaustive()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    service::init_tracing();
    let args = Args::parse();
    let targets = [
        (Database::UserDb, args.user_db_url),
        (Database::ViewDb, args.view_db_url),
    ];
    if targets.iter().all(|(_, url)| url.is_none()) {
        bail!("nothing to migrate: give --user-db-url and/or --view-db-url (or USER_DB_URL / VIEW_DB_URL)");
    }
    for (db, url) in targets {
        let Some(url) = url else { continue };
        let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {db}"))?;
        let conn = tokio::spawn(conn);
        let applied = schema::migrate(&mut client, db).await?;
        tracing::info!(database = %db, applied = ?applied, "schema is current");
        drop(client);
        conn.await
            .context("connection task panicked")?
            .with_context(|| format!("closing the connection to {db}"))?;
    }
    Ok(())
}
