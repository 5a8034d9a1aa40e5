//! The projector against a real PostgreSQL and broker: the views follow `users` exactly, bad events
//! go to the dead-letter topic, and a projector killed mid-batch loses and doubles nothing.

// Helpers of a test binary: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use e2e::{unique_suffix, Projector, Reader, Stack, TestDb, UserApi};
use rand::Rng;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// user_db with a reader, materialized_view_db with a projector, one topic between them.
struct Pipeline {
    stack: Stack,
    user_db: TestDb,
    view_db: TestDb,
    topic: String,
    reader: Reader,
}

async fn pipeline(prefix: &str) -> Pipeline {
    let stack = Stack::from_env();
    let user_db = TestDb::create(
        &stack,
        &format!("{prefix}_u"),
        Some(schema::Database::UserDb),
    )
    .await
    .unwrap();
    let view_db = TestDb::create(
        &stack,
        &format!("{prefix}_v"),
        Some(schema::Database::ViewDb),
    )
    .await
    .unwrap();
    let topic = format!("t-users-{}", unique_suffix());
    let config = Reader::config(
        &stack,
        &user_db,
        &["public.users"],
        &[format!("public.users={topic}")],
    );
    let reader = Reader::start(config).await.unwrap();
    reader.wait_streaming().await.unwrap();
    Pipeline {
        stack,
        user_db,
        view_db,
        topic,
        reader,
    }
}

impl Pipeline {
    fn projector_config(&self) -> projector::Config {
        Projector::config(&self.stack, &self.view_db, &self.topic)
    }

    /// Waits until user_view equals users column for column and department_stats equals the
    /// GROUP BY of both.
    async fn converged(&self) {
        let users = self.user_db.client().await.unwrap();
        let views = self.view_db.client().await.unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let difference = self.difference(&users, &views).await;
            let Some(difference) = difference else { return };
            assert!(
                tokio::time::Instant::now() < deadline,
                "the views did not converge within {WAIT:?}: {difference}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How the views differ from the source, if they do.
    async fn difference(
        &self,
        users: &tokio_postgres::Client,
        views: &tokio_postgres::Client,
    ) -> Option<String> {
        let source = rows(
            users,
            "SELECT id, name, email, department, status, created_at, updated_at \
             FROM users ORDER BY id",
        )
        .await;
        let view = rows(
            views,
            "SELECT user_id AS id, name, email, department, status, created_at, updated_at \
             FROM user_view ORDER BY user_id",
        )
        .await;
        if source != view {
            let first = source
                .iter()
                .zip(&view)
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("; first difference {a:?} / {b:?}"));
            return Some(format!(
                "{} rows in users, {} in user_view{}",
                source.len(),
                view.len(),
                first.unwrap_or_default()
            ));
        }
        let group_by = "SELECT department, count(*) AS user_count, \
                        count(*) FILTER (WHERE status = 'ACTIVE') AS active_users, \
                        count(*) FILTER (WHERE status <> 'ACTIVE') AS inactive_users FROM {} \
                        GROUP BY department ORDER BY department";
        let expected = rows(users, &group_by.replace("{}", "users")).await;
        let from_view = rows(views, &group_by.replace("{}", "user_view")).await;
        let stats = rows(
            views,
            "SELECT department, user_count, active_users, inactive_users \
             FROM department_stats ORDER BY department",
        )
        .await;
        (stats != expected || stats != from_view)
            .then(|| format!("department_stats {stats:?}, expected {expected:?}"))
    }
}

/// Every row of `sql` as text, for comparisons across databases.
async fn rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<String>> {
    let wrapped = format!("SELECT to_jsonb(r)::text FROM ({sql}) r");
    client
        .query(&wrapped, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_str(r.get::<_, &str>(0)).unwrap();
            v.as_object()
                .unwrap()
                .values()
                .map(Value::to_string)
                .collect()
        })
        .collect()
}

const DEPARTMENTS: [&str; 5] = ["Engineering", "Sales", "Ops", "Design", "Legal"];

/// Random inserts, updates and deletes in transactions of 1 to `max_tx` statements.
async fn random_sql_workload(db: &tokio_postgres::Client, transactions: usize, max_tx: usize) {
    let mut rng = rand::rng();
    for t in 0..transactions {
        let size = rng.random_range(1..=max_tx);
        let mut sql = String::from("BEGIN;");
        for i in 0..size {
            let dept = DEPARTMENTS[rng.random_range(0..DEPARTMENTS.len())];
            let status = if rng.random_bool(0.7) {
                "ACTIVE"
            } else {
                "INACTIVE"
            };
            match rng.random_range(0..10) {
                0..=4 => sql.push_str(&format!(
                    "INSERT INTO users (name, email, department, status) \
                     VALUES ('n{t}_{i}', 'u{t}_{i}_{}@example.org', '{dept}', '{status}');",
                    unique_suffix()
                )),
                5..=7 => sql.push_str(&format!(
                    "UPDATE users SET department = '{dept}', status = '{status}', \
                     name = name || '.', updated_at = now() \
                     WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1);"
                )),
                _ => sql.push_str(
                    "DELETE FROM users WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1);",
                ),
            }
        }
        sql.push_str("COMMIT;");
        db.batch_execute(&sql).await.unwrap();
    }
}

#[tokio::test]
async fn the_views_equal_the_source_under_a_random_workload() {
    let p = pipeline("proj_random").await;
    let projector = Projector::start(p.projector_config()).await.unwrap();
    let db = p.user_db.client().await.unwrap();
    let api = UserApi::start(&p.user_db.url).await.unwrap();
    let http = reqwest::Client::new();

    // Mixed transaction sizes over SQL, interleaved with requests through the user API.
    for round in 0..4 {
        let (transactions, size) = [(300, 1), (100, 5), (20, 50), (4, 500)][round];
        random_sql_workload(&db, transactions, size).await;
        for i in 0..25 {
            let dept = DEPARTMENTS[i % DEPARTMENTS.len()];
            let created: Value = http
                .post(api.url("/api/users"))
                .json(&json!({"name": format!("api {round} {i}"),
                              "email": format!("api{round}_{i}_{}@example.org", unique_suffix()),
                              "department": dept}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let id = created["id"].as_i64().unwrap();
            if i % 3 == 0 {
                let r = http
                    .patch(api.url(&format!("/api/users/{id}")))
                    .json(&json!({"status": "INACTIVE", "department": "Ops"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
            if i % 5 == 0 {
                let r = http
                    .delete(api.url(&format!("/api/users/{id}")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 204);
            }
        }
    }
    p.converged().await;
    let users: i64 = db
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert!(users > 100, "the workload left {users} users");
    assert_eq!(
        projector
            .metric("projector_dead_lettered_total")
            .await
            .unwrap(),
        0.0
    );
    projector.stop().await.unwrap();
    api.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}
