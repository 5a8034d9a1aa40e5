//! The derived views over posts and user_view (post_stats, user_activity,
//! department_performance): the original example's scenarios over real HTTP, post-api's
//! endpoints for them, and a random concurrent workload of user-api and post-api writers during
//! which every table keeps equal to its definition in every snapshot a checker takes.

// Helpers of a test binary: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::full::{full, Full, WAIT};
use e2e::{derived_differences, Pipeline, PostApi, Projector, Stack, TestDb, UserApi};
use rand::Rng;
use serde_json::{json, Value};

/// POST /api/posts; (status, body).
async fn post(f: &Full, title: &str, author: i64) -> (u16, Value) {
    post_at(&f.http, &f.posts.url("/api/posts"), title, author).await
}

/// POST a post to `url` (post-api's /api/posts); (status, body).
async fn post_at(http: &reqwest::Client, url: &str, title: &str, author: i64) -> (u16, Value) {
    let r = http
        .post(url)
        .json(&json!({"title": title, "content": "", "authorId": author}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A concurrent writer's post: the new post, or None when post-api refused it because its author
/// is not (or no longer, or not yet) in user_view (422). Any other answer fails the test.
async fn writer_post(http: &reqwest::Client, url: &str, author: i64) -> Option<Value> {
    let (status, body) = post_at(http, url, "t", author).await;
    assert!(matches!(status, 201 | 422), "post-api answered {status}");
    (status == 201).then_some(body)
}

fn department<'a>(all: &'a Value, name: &str) -> Option<&'a Value> {
    all.as_array()?.iter().find(|d| d["department"] == name)
}

#[tokio::test]
async fn posts_counts_follow_their_authors_through_moves_and_deletes() {
    let f = full("dv_scn").await;
    let ann = f.create_user("Ann", "ann@example.org", "Engineering").await;
    let bob = f.create_user("Bob", "bob@example.org", "Sales").await;
    let (ann_id, bob_id) = (ann["id"].as_i64().unwrap(), bob["id"].as_i64().unwrap());
    for id in [ann_id, bob_id] {
        f.eventually(
            &format!("/api/posts/users/{id}/activity"),
            "the user's activity",
            |_| true,
        )
        .await;
    }
    let (_, bob_activity) = f.get(&format!("/api/posts/users/{bob_id}/activity")).await;
    assert_eq!(
        bob_activity,
        json!({
            "userId": bob_id, "name": "Bob", "department": "Sales", "status": "ACTIVE",
            "postCount": 0, "lastPostAt": null, "lastProfileChangeAt": bob["updatedAt"],
            "lastActivityAt": bob["updatedAt"],
        })
    );

    let mut posts = Vec::new();
    for (title, author) in [("a1", ann_id), ("a2", ann_id), ("b1", bob_id)] {
        let (status, p) = post(&f, title, author).await;
        assert_eq!(status, 201, "{p}");
        posts.push(p);
    }
    // Written in post-api's transaction: no waiting.
    let (status, ann_stats) = f.get(&format!("/api/posts/stats/authors/{ann_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        ann_stats,
        json!({"authorId": ann_id, "postCount": 2, "firstPostAt": posts[0]["createdAt"],
               "lastPostAt": posts[1]["createdAt"]})
    );
    let (_, activity) = f.get(&format!("/api/posts/users/{ann_id}/activity")).await;
    assert_eq!(
        (
            &activity["postCount"],
            &activity["lastPostAt"],
            &activity["lastActivityAt"]
        ),
        (&json!(2), &posts[1]["createdAt"], &posts[1]["createdAt"])
    );
    let (_, all) = f.get("/api/posts/stats/departments/performance").await;
    assert_eq!(
        department(&all, "Engineering").unwrap(),
        &json!({"department": "Engineering", "userCount": 1, "activeUsers": 1, "postCount": 2,
                "postsPerActiveUser": 2.0, "lastPostAt": posts[1]["createdAt"]})
    );
    assert_eq!(department(&all, "Sales").unwrap()["postCount"], 1);

    // Ann moves to Sales, inactive: her posts' counts move with her.
    let r = f
        .http
        .patch(f.users.url(&format!("/api/users/{ann_id}")))
        .json(&json!({"department": "Sales", "status": "INACTIVE"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sales = f
        .eventually(
            "/api/posts/stats/departments/performance/Sales",
            "Ann's posts to count in Sales",
            |d| d["userCount"] == 2,
        )
        .await;
    assert_eq!(
        sales,
        json!({"department": "Sales", "userCount": 2, "activeUsers": 1, "postCount": 3,
               "postsPerActiveUser": 3.0, "lastPostAt": posts[2]["createdAt"]})
    );
    let (status, body) = f
        .get("/api/posts/stats/departments/performance/Engineering")
        .await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));

    // Bob's only post goes: his author row goes, Sales's last post is Ann's again.
    let b1 = format!("/api/posts/{}", posts[2]["id"]);
    assert_eq!(
        f.http
            .delete(f.posts.url(&b1))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let (status, _) = f.get(&format!("/api/posts/stats/authors/{bob_id}")).await;
    assert_eq!(status, 404);
    let (_, sales) = f
        .get("/api/posts/stats/departments/performance/Sales")
        .await;
    assert_eq!(
        (&sales["postCount"], &sales["lastPostAt"]),
        (&json!(2), &posts[1]["createdAt"])
    );

    // Ann is deleted: gone from user_activity and the department's counts; her posts stay in
    // post_stats.
    let r = f
        .http
        .delete(f.users.url(&format!("/api/users/{ann_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let sales = f
        .eventually(
            "/api/posts/stats/departments/performance/Sales",
            "Ann to leave Sales's counts",
            |d| d["userCount"] == 1,
        )
        .await;
    assert_eq!(
        sales,
        json!({"department": "Sales", "userCount": 1, "activeUsers": 1, "postCount": 0,
               "postsPerActiveUser": 0.0, "lastPostAt": null})
    );
    let (status, body) = f.get(&format!("/api/posts/users/{ann_id}/activity")).await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
    let (_, ann_stats) = f.get(&format!("/api/posts/stats/authors/{ann_id}")).await;
    assert_eq!(ann_stats["postCount"], 2);

    let view = f.pipeline.view_db.client().await.unwrap();
    assert_eq!(derived_differences(&view).await.unwrap(), vec![]);
    f.stop().await;
}

#[tokio::test]
async fn post_api_pages_the_author_stats_and_rejects_bad_requests() {
    let f = full("dv_http").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let u = f
            .create_user(&format!("U{i}"), &format!("u{i}@example.org"), "Ops")
            .await;
        ids.push(u["id"].as_i64().unwrap());
    }
    let last = *ids.last().unwrap();
    f.eventually(
        &format!("/api/posts/users/{last}/activity"),
        "the users",
        |_| true,
    )
    .await;
    for id in &ids {
        assert_eq!(post(&f, "p", *id).await.0, 201);
    }

    let r = f
        .http
        .get(f.posts.url("/api/posts/stats/authors?limit=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let link = r.headers()["link"].to_str().unwrap().to_owned();
    assert_eq!(
        link,
        format!(
            "</api/posts/stats/authors?limit=2&after={}>; rel=\"next\"",
            ids[1]
        )
    );
    let page: Value = r.json().await.unwrap();
    let authors: Vec<i64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["authorId"].as_i64().unwrap())
        .collect();
    assert_eq!(authors, ids[..2]);
    let (_, rest) = f
        .get(&format!(
            "/api/posts/stats/authors?limit=2&after={}",
            ids[1]
        ))
        .await;
    assert_eq!(rest.as_array().unwrap().len(), 1);

    for (path, status, code) in [
        ("/api/posts/stats/authors/abc", 400, "invalid_id"),
        ("/api/posts/stats/authors/0", 400, "invalid_id"),
        ("/api/posts/stats/authors/999999999", 404, "not_found"),
        ("/api/posts/stats/authors?limit=0", 422, "validation_failed"),
        ("/api/posts/stats/authors?page=2", 400, "invalid_query"),
        ("/api/posts/users/-1/activity", 400, "invalid_id"),
        ("/api/posts/users/999999999/activity", 404, "not_found"),
        (
            "/api/posts/stats/departments/performance/%FF",
            400,
            "invalid_department",
        ),
        (
            "/api/posts/stats/departments/performance/Nobody",
            404,
            "not_found",
        ),
    ] {
        let (got, body) = f.get(path).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}: {body}"
        );
    }
    let r = f
        .http
        .post(f.posts.url("/api/posts/stats/authors"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    f.stop().await;
}

/// What the random writers did, for the report.
#[derive(Default)]
struct Counts {
    user_writes: AtomicUsize,
    post_writes: AtomicUsize,
    checks: AtomicUsize,
}

/// The checker: every derived table against its definition, one snapshot at a time, every `pause`
/// until `stop`; what differed in each snapshot that saw a difference.
async fn check_until(
    p: &Pipeline,
    stop: &Arc<AtomicBool>,
    counts: &Arc<Counts>,
    pause: Duration,
) -> tokio::task::JoinHandle<Vec<Vec<(String, i64)>>> {
    let (stop, counts) = (stop.clone(), counts.clone());
    let view = p.view_db.client().await.unwrap();
    tokio::spawn(async move {
        let mut found = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let differences = derived_differences(&view).await.unwrap();
            if !differences.is_empty() {
                found.push(differences);
            }
            counts.checks.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(pause).await;
        }
        found
    })
}

fn assert_no_differences(found: &[Vec<(String, i64)>], checks: usize) {
    assert!(
        found.is_empty(),
        "{} of {checks} snapshots saw a derived view differ from its definition, first: {:?}",
        found.len(),
        found[0]
    );
}

#[tokio::test]
async fn concurrent_user_and_post_writers_keep_every_view_equal_to_its_definition() {
    e2e::init_logs();
    // Three partitions shared by two projectors of one group: their transactions run at once too.
    let p = Pipeline::start_with(Stack::from_env(), "dv_conc", 3)
        .await
        .unwrap();
    let config = projector::Config {
        transactions: projector::Transactions::PerMember,
        ..p.projector_config()
    };
    let projectors = [
        Projector::start(config.clone()).await.unwrap(),
        Projector::start(config).await.unwrap(),
    ];
    let users = UserApi::start(&p.user_db.url).await.unwrap();
    let posts = PostApi::start(&p.view_db.url).await.unwrap();
    let http = reqwest::Client::new();
    let ids = Arc::new(Mutex::new(Vec::new()));
    for i in 0..40 {
        let r = http
            .post(users.url("/api/users"))
            .json(
                &json!({"name": format!("seed {i}"), "email": format!("seed{i}@example.org"),
                          "department": e2e::DEPARTMENTS[i % 5]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let u: Value = r.json().await.unwrap();
        ids.lock().unwrap().push(u["id"].as_i64().unwrap());
    }
    p.converged(WAIT).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let pick = |ids: &Mutex<Vec<i64>>| {
        let ids = ids.lock().unwrap();
        ids[rand::rng().random_range(0..ids.len())]
    };
    let mut writers = Vec::new();
    for w in 0..2 {
        let (http, url, ids, stop, counts) = (
            http.clone(),
            users.url("/api/users"),
            ids.clone(),
            stop.clone(),
            counts.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let (op, dept, active) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..10),
                        e2e::DEPARTMENTS[rng.random_range(0..5)],
                        rng.random_bool(0.6),
                    )
                };
                let status = if active { "ACTIVE" } else { "INACTIVE" };
                let r = match op {
                    0..=2 => {
                        let r = http
                            .post(&url)
                            .json(&json!({"name": format!("w{w} {n}"),
                                          "email": format!("w{w}.{n}@example.org"),
                                          "department": dept, "status": status}))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(r.status(), 201);
                        let u: Value = r.json().await.unwrap();
                        ids.lock().unwrap().push(u["id"].as_i64().unwrap());
                        continue;
                    }
                    3..=8 => {
                        http.patch(format!("{url}/{}", pick(&ids)))
                            .json(&json!({"department": dept, "status": status}))
                            .send()
                            .await
                    }
                    _ => http.delete(format!("{url}/{}", pick(&ids))).send().await,
                };
                let status = r.unwrap().status().as_u16();
                assert!(
                    matches!(status, 200 | 204 | 404),
                    "user-api answered {status}"
                );
                counts.user_writes.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let post_ids = Arc::new(Mutex::new(Vec::<i64>::new()));
    for _ in 0..4 {
        let (http, url, ids, post_ids, stop, counts) = (
            http.clone(),
            posts.url("/api/posts"),
            ids.clone(),
            post_ids.clone(),
            stop.clone(),
            counts.clone(),
        );
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let op = rand::rng().random_range(0..10);
                let author = pick(&ids);
                let known = post_ids.lock().unwrap().len();
                let r = if op < 6 || known == 0 {
                    if let Some(p) = writer_post(&http, &url, author).await {
                        post_ids.lock().unwrap().push(p["id"].as_i64().unwrap());
                    }
                    counts.post_writes.fetch_add(1, Ordering::Relaxed);
                    continue;
                } else {
                    let id = pick(&post_ids);
                    if op < 8 {
                        http.put(format!("{url}/{id}"))
                            .json(&json!({"title": "u", "content": "c", "authorId": author}))
                            .send()
                            .await
                    } else {
                        http.delete(format!("{url}/{id}")).send().await
                    }
                };
                let status = r.unwrap().status().as_u16();
                assert!(
                    matches!(status, 200 | 204 | 404 | 422),
                    "post-api answered {status}"
                );
                counts.post_writes.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let checker = check_until(&p, &stop, &counts, Duration::from_millis(20)).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let found = checker.await.unwrap();
    let (user_writes, post_writes, checks) = (
        counts.user_writes.load(Ordering::Relaxed),
        counts.post_writes.load(Ordering::Relaxed),
        counts.checks.load(Ordering::Relaxed),
    );
    eprintln!("{user_writes} user writes, {post_writes} post writes, {checks} snapshots checked");
    assert_no_differences(&found, checks);
    assert!(
        user_writes > 100 && post_writes > 100 && checks > 50,
        "too little happened: {user_writes} user writes, {post_writes} post writes, {checks} checks"
    );
    // Once the projectors caught up: user_view equals users, and the derived views still hold.
    p.converged(WAIT).await.unwrap();
    let view = p.view_db.client().await.unwrap();
    let orphans: i64 = view
        .query_one(
            "SELECT count(*) FROM post_stats s \
             WHERE NOT EXISTS (SELECT 1 FROM user_view u WHERE u.user_id = s.author_id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!("{orphans} authors have posts but no user");
    users.stop().await.unwrap();
    posts.stop().await.unwrap();
    for projector in projectors {
        projector.stop().await.unwrap();
    }
    p.reader.stop().await.unwrap();
}

/// Writers at the level of SQL, where user-api cannot reach: two appliers of disjoint users (as
/// two projectors of one group are) that also re-create deleted users under their old ids (as a
/// replay does) while six post writers add, move and delete posts, also of deleted authors.
#[tokio::test]
async fn re_created_users_and_their_orphan_posts_stay_exact_under_concurrent_sql_writers() {
    e2e::init_logs();
    let stack = Stack::from_env();
    let db = TestDb::create(&stack, "dv_sql", Some(schema::Database::ViewDb))
        .await
        .unwrap();
    const USERS: i64 = 200;
    db.client()
        .await
        .unwrap()
        .batch_execute(&format!(
            "INSERT INTO user_view (user_id, name, email, department, status, created_at, \
                                    updated_at, source_lsn, source_seq) \
             SELECT g, 'u' || g, 'u' || g || '@example.org', 'D' || g % 5, 'ACTIVE', now(), \
                    now(), '0/1', 0 FROM generate_series(1, {USERS}) g; \
             INSERT INTO posts (title, content, author_id) \
             SELECT 't', 'c', g % {USERS} + 1 FROM generate_series(1, 600) g"
        ))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for parity in 0..2_i64 {
        let (client, stop) = (db.client().await.unwrap(), stop.clone());
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (dept, first, deleted) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..5),
                        rng.random_range(0..USERS / 2),
                        rng.random_range(0..USERS / 2) * 2 + parity + 1,
                    )
                };
                // Only this applier's users (ids of its parity), in id order.
                client
                    .batch_execute(&format!(
                        "BEGIN; \
                         UPDATE user_view SET department = 'D{dept}', updated_at = clock_timestamp(), \
                                status = CASE WHEN random() < 0.5 THEN 'ACTIVE' ELSE 'INACTIVE' END \
                          WHERE user_id IN (SELECT g * 2 + {parity} + 1 \
                                            FROM generate_series({first}, {first} + 15) g); \
                         DELETE FROM user_view WHERE user_id = {deleted}; \
                         INSERT INTO user_view (user_id, name, email, department, status, \
                                                created_at, updated_at, source_lsn, source_seq) \
                         SELECT g * 2 + {parity} + 1, 'again', 'a@example.org', 'D{dept}', \
                                'ACTIVE', now(), now(), '0/1', 0 \
                           FROM generate_series(0, {USERS} / 2 - 1) g WHERE random() < 0.05 \
                             ON CONFLICT (user_id) DO NOTHING; \
                         COMMIT"
                    ))
                    .await
                    .unwrap();
            }
        }));
    }
    for _ in 0..6 {
        let (client, stop) = (db.client().await.unwrap(), stop.clone());
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (a, b) = {
                    let mut rng = rand::rng();
                    (rng.random_range(1..=USERS), rng.random_range(1..=USERS))
                };
                // As post-api writes (an existing author for new and moved posts), and deletes
                // of any post, its author there or not.
                client
                    .batch_execute(&format!(
                        "INSERT INTO posts (title, content, author_id) SELECT 't', 'c', {a} \
                          WHERE EXISTS (SELECT 1 FROM user_view WHERE user_id = {a}); \
                         DELETE FROM posts WHERE id = (SELECT min(id) FROM posts WHERE author_id = {b}); \
                         UPDATE posts SET author_id = {a} \
                          WHERE id = (SELECT max(id) FROM posts WHERE author_id = {b}) \
                            AND EXISTS (SELECT 1 FROM user_view WHERE user_id = {a});"
                    ))
                    .await
                    .unwrap();
            }
        }));
    }
    let view = db.client().await.unwrap();
    let (mut checks, mut found) = (0, Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        let differences = derived_differences(&view).await.unwrap();
        if !differences.is_empty() {
            found.push(differences);
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let at_end = derived_differences(&view).await.unwrap();
    assert!(
        found.is_empty() && at_end.is_empty(),
        "{} of {checks} snapshots saw a derived view differ from its definition, first: {:?}; \
         at the end: {at_end:?}",
        found.len(),
        found.first()
    );
}

/// The two orders in which a transaction that re-creates a deleted user (as a replay does) and one
/// that writes a post of that id can meet: each has run its refresh and holds it open while the
/// other commits. Neither can see the other's new rows, so only a lock on the user's key, taken
/// also where no row of it exists yet, keeps the second from committing a count without the
/// first's post.
#[tokio::test]
async fn a_user_re_created_while_a_post_of_theirs_is_written_counts_it_in_either_order() {
    e2e::init_logs();
    let stack = Stack::from_env();
    let db = TestDb::create(&stack, "dv_order", Some(schema::Database::ViewDb))
        .await
        .unwrap();
    const RECREATE: &str = "INSERT INTO user_view (user_id, name, email, department, status, \
                                                   created_at, updated_at, source_lsn, source_seq) \
                            VALUES (7, 'again', 'a@example.org', 'D', 'ACTIVE', now(), now(), \
                                    '0/1', 0)";
    const POST: &str = "INSERT INTO posts (title, content, author_id) VALUES ('t', 'c', 7)";
    for (first, second) in [(RECREATE, POST), (POST, RECREATE)] {
        let held = db.client().await.unwrap();
        held.batch_execute("TRUNCATE user_view, posts")
            .await
            .unwrap();
        // The deferred refresh runs now, and its locks stay until COMMIT.
        held.batch_execute(&format!("BEGIN; {first}; SET CONSTRAINTS ALL IMMEDIATE"))
            .await
            .unwrap();
        let other = db.client().await.unwrap();
        let pid: i32 = other
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let committing = tokio::spawn(async move { other.batch_execute(second).await });
        // Until the other has committed or waits for a lock of the held one.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !committing.is_finished() {
            let waiting: bool = held
                .query_one(
                    "SELECT coalesce(bool_or(wait_event_type = 'Lock'), false) \
                       FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .await
                .unwrap()
                .get(0);
            if waiting {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{second} neither ended nor waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        held.batch_execute("COMMIT").await.unwrap();
        committing.await.unwrap().unwrap();
        let differences = derived_differences(&held).await.unwrap();
        assert!(
            differences.is_empty(),
            "{first:?} held, then {second:?}: {differences:?}"
        );
    }
}

/// Keys change too (by hand, or a replay): a post given another id and author, a user another
/// id. And a writer under REPEATABLE READ, whose snapshot cannot show what the refresh must see,
/// is refused at its write with an error that says why.
#[tokio::test]
async fn re_keyed_rows_count_and_repeatable_read_writers_are_refused() {
    e2e::init_logs();
    let stack = Stack::from_env();
    let db = TestDb::create(&stack, "dv_keys", Some(schema::Database::ViewDb))
        .await
        .unwrap();
    let c = db.client().await.unwrap();
    c.batch_execute(
        "INSERT INTO user_view (user_id, name, email, department, status, created_at, \
                                updated_at, source_lsn, source_seq) \
         VALUES (1, 'a', 'a@example.org', 'D', 'ACTIVE', now(), now(), '0/1', 0), \
                (2, 'b', 'b@example.org', 'E', 'ACTIVE', now(), now(), '0/1', 0); \
         INSERT INTO posts (title, content, author_id) VALUES ('t', 'c', 1), ('t', 'c', 1); \
         UPDATE posts SET id = id + 100, author_id = 2 WHERE id = (SELECT min(id) FROM posts); \
         UPDATE user_view SET user_id = 5 WHERE user_id = 1",
    )
    .await
    .unwrap();
    assert_eq!(derived_differences(&c).await.unwrap(), vec![]);
    let counts: Vec<(i64, i64)> = c
        .query(
            "SELECT user_id, post_count FROM user_activity ORDER BY user_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(counts, [(2, 1), (5, 0)]);
    for level in ["REPEATABLE READ", "SERIALIZABLE"] {
        let err = c
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL {level}; \
                 INSERT INTO posts (title, content, author_id) VALUES ('t', 'c', 2)"
            ))
            .await
            .unwrap_err();
        let db_error = err.as_db_error().unwrap();
        assert_eq!(
            db_error.code(),
            &tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED
        );
        assert!(
            db_error.message().contains("READ COMMITTED only"),
            "{}",
            db_error.message()
        );
        c.batch_execute("ROLLBACK").await.unwrap();
    }
}

/// A backlog applied two view transactions at a time (one written while the one before it
/// commits, on the projector's second connection), while post-api writes posts of the same users:
/// every snapshot the checker takes during the catch-up sees each table equal to its definition,
/// and the views converge. The backlog's source transactions share users (moves, status flips,
/// deletes of users created earlier in it), so view transactions that cannot go side by side are
/// met too.
#[tokio::test]
async fn a_backlog_applied_two_view_transactions_at_a_time_keeps_every_view_exact() {
    e2e::init_logs();
    let p = Pipeline::start_with(Stack::from_env(), "dv_pipe", 3)
        .await
        .unwrap();
    let source = p.user_db.client().await.unwrap();
    // 300 users, then 400 source transactions over them and over users they create: moves and
    // status flips of 1–5 users, deletes, and new users changed again in the next transaction
    // (in a view transaction after the one that inserts them, or the same); no projector yet.
    e2e::insert_bench_users(&source, 300, 10).await.unwrap();
    let mut created = Vec::new();
    for i in 0..400_i64 {
        let (op, first, n) = {
            let mut rng = rand::rng();
            (
                rng.random_range(0..10),
                rng.random_range(1..=300_i64),
                rng.random_range(1..=5_i64),
            )
        };
        let statement = match op {
            0..=3 => {
                "UPDATE users SET department = 'Dept ' || (($3::bigint + id) % 7), \
                                  updated_at = now() \
                 WHERE id BETWEEN $1 AND $1 + $2 - 1"
            }
            4..=5 => {
                "UPDATE users SET status = CASE WHEN status = 'ACTIVE' THEN 'INACTIVE' \
                                            ELSE 'ACTIVE' END, updated_at = now() \
                 WHERE id BETWEEN $1 AND $1 + $2 - 1 AND $3::bigint >= 0"
            }
            6 => "DELETE FROM users WHERE id BETWEEN $1 AND $1 + $2 - 1 AND $3::bigint >= 0",
            _ => {
                let row = source
                    .query_one(
                        "INSERT INTO users (name, email, department, status) \
                         VALUES ('new ' || $1::bigint, 'new' || $1::bigint || '@example.org', \
                                 'Dept ' || ($1::bigint % 7), 'ACTIVE') RETURNING id",
                        &[&i],
                    )
                    .await
                    .unwrap();
                created.push(row.get::<_, i64>(0));
                "UPDATE users SET department = 'Moved ' || ($3::bigint % 3), updated_at = now() \
                 WHERE id BETWEEN $1 AND $1 + $2 - 1"
            }
        };
        // (The new user itself, moved in the next source transaction.)
        let (first, n) = match op {
            7.. => (*created.last().unwrap(), 1),
            _ => (first, n),
        };
        source.execute(statement, &[&first, &n, &i]).await.unwrap();
    }
    let posts = PostApi::start(&p.view_db.url).await.unwrap();
    let http = reqwest::Client::new();
    let projector = Projector::start(projector::Config {
        // Small view transactions: many of them, several ready at once.
        batch_max_events: 4,
        ..p.projector_config()
    })
    .await
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut writers = Vec::new();
    for _ in 0..3 {
        let (http, url, stop, counts) = (
            http.clone(),
            posts.url("/api/posts"),
            stop.clone(),
            counts.clone(),
        );
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let author = rand::rng().random_range(1..=300_i64 + 400);
                writer_post(&http, &url, author).await;
                counts.post_writes.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let checker = check_until(&p, &stop, &counts, Duration::from_millis(5)).await;
    p.converged(WAIT).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let found = checker.await.unwrap();
    let checks = counts.checks.load(Ordering::Relaxed);
    let view_txs = projector.metric("projector_batches_total").await.unwrap();
    let overlapped = projector
        .metric("projector_transactions_overlapped_total")
        .await
        .unwrap();
    eprintln!(
        "{view_txs} view transactions, {overlapped} written while the one before committed; \
         {} post writes, {checks} snapshots checked",
        counts.post_writes.load(Ordering::Relaxed)
    );
    assert_no_differences(&found, checks);
    assert!(
        overlapped > 0.0,
        "no view transaction was written while another committed"
    );
    // The posts written last are in the views too.
    p.converged(WAIT).await.unwrap();
    posts.stop().await.unwrap();
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}
