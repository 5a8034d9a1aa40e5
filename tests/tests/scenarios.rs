//! The original example's scenarios end to end, over real HTTP: users written through user-api
//! reach post-api only through the WAL → Kafka → projector path. Also the README's walkthrough
//! (`scripts/walkthrough`), run against a whole pipeline, so the two cannot drift apart.

// Helpers of a test binary: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use e2e::full::full;
use serde_json::{json, Value};

fn stats_of<'a>(stats: &'a Value, department: &str) -> Option<&'a Value> {
    stats
        .as_array()?
        .iter()
        .find(|s| s["department"] == department)
}

#[tokio::test]
async fn created_users_appear_in_the_views_and_the_post_service() {
    let f = full("scn_create").await;
    let hong = f.create_user("홍길동", "hong@example.com", "개발팀").await;
    let jang = f.create_user("장웅", "jang@example.com", "개발팀").await;
    let dev = "%EA%B0%9C%EB%B0%9C%ED%8C%80"; // 개발팀

    let users = f
        .eventually("/api/posts/users", "both users in user_view", |b| {
            b.as_array().is_some_and(|a| a.len() == 2)
        })
        .await;
    // The post service's copy has what the user service stored, field for field.
    assert_eq!(users[0], hong);
    assert_eq!(users[1], jang);
    let (_, in_dept) = f.get(&format!("/api/posts/users/department/{dev}")).await;
    assert_eq!(in_dept, json!([hong, jang]));
    let (_, nobody) = f.get("/api/posts/users/department/Sales").await;
    assert_eq!(nobody, json!([]));

    let (_, stats) = f.get("/api/posts/stats/departments").await;
    let dev_stats = stats_of(&stats, "개발팀").unwrap();
    assert_eq!(
        (
            &dev_stats["userCount"],
            &dev_stats["activeUsers"],
            &dev_stats["inactiveUsers"]
        ),
        (&json!(2), &json!(2), &json!(0))
    );
    // And in SQL, as a user inspecting the views would see them.
    let view = f.pipeline.view_db.client().await.unwrap();
    let row = view
        .query_one(
            "SELECT user_count, active_users FROM department_stats WHERE department = '개발팀'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (2, 2));
    f.stop().await;
}

#[tokio::test]
async fn posts_carry_their_authors_data_and_follow_its_changes() {
    let f = full("scn_posts").await;
    let hong = f
        .create_user("홍길동", "hong@example.com", "Engineering")
        .await;
    let jang = f
        .create_user("장웅", "jang@example.com", "Engineering")
        .await;
    let (hong_id, jang_id) = (hong["id"].as_i64().unwrap(), jang["id"].as_i64().unwrap());
    f.eventually("/api/posts/users", "both users projected", |b| {
        b.as_array().is_some_and(|a| a.len() == 2)
    })
    .await;

    // 2. A post is enriched with its author's data.
    let r = f
        .http
        .post(f.posts.url("/api/posts"))
        .json(&json!({"title": "첫 글", "content": "안녕하세요", "authorId": hong_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let post: Value = r.json().await.unwrap();
    assert_eq!(location, format!("/api/posts/{}", post["id"]));
    assert_eq!(post["authorName"], "홍길동");
    assert_eq!(post["authorEmail"], "hong@example.com");
    assert_eq!(post["authorDepartment"], "Engineering");
    assert_eq!(post["title"], "첫 글");
    let post_id = post["id"].as_i64().unwrap();
    let post_path = format!("/api/posts/{post_id}");
    let (_, listed) = f.get("/api/posts").await;
    assert_eq!(listed, json!([post]));

    // An author that is not in user_view is refused, naming the id.
    let r = f
        .http
        .post(f.posts.url("/api/posts"))
        .json(&json!({"title": "t", "content": "c", "authorId": 999_999}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["field"], "authorId");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("999999"));

    // 3. The author moves: the old post follows, by-department follows, the counts move.
    let r = f
        .http
        .patch(f.users.url(&format!("/api/users/{hong_id}")))
        .json(&json!({"department": "Marketing"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    f.eventually(&post_path, "the post to show the new department", |p| {
        p["authorDepartment"] == "Marketing"
    })
    .await;
    let (_, marketing) = f.get("/api/posts/by-department/Marketing").await;
    assert_eq!(marketing.as_array().unwrap().len(), 1);
    assert_eq!(marketing[0]["id"], post_id);
    let (_, engineering) = f.get("/api/posts/by-department/Engineering").await;
    assert_eq!(engineering, json!([]));
    let (_, stats) = f.get("/api/posts/stats/departments").await;
    assert_eq!(stats_of(&stats, "Engineering").unwrap()["userCount"], 1);
    assert_eq!(stats_of(&stats, "Marketing").unwrap()["userCount"], 1);

    // The post can be rewritten, also to another author.
    let r = f
        .http
        .put(f.posts.url(&post_path))
        .json(&json!({"title": "고친 글", "content": "", "authorId": jang_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rewritten: Value = r.json().await.unwrap();
    assert_eq!(
        (&rewritten["title"], &rewritten["authorName"]),
        (&json!("고친 글"), &json!("장웅"))
    );
    let r = f
        .http
        .put(f.posts.url(&post_path))
        .json(&json!({"title": "x", "content": "", "authorId": hong_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // 4. The author is deleted: gone from user_view and the counts; the post stays, author null.
    let r = f
        .http
        .delete(f.users.url(&format!("/api/users/{hong_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let orphan = f
        .eventually(&post_path, "the post's author fields to be null", |p| {
            p["authorName"].is_null()
        })
        .await;
    assert_eq!(orphan["authorEmail"], Value::Null);
    assert_eq!(orphan["authorDepartment"], Value::Null);
    assert_eq!(orphan["authorId"], hong_id);
    let (_, users) = f.get("/api/posts/users").await;
    assert_eq!(users.as_array().unwrap().len(), 1);
    assert_eq!(users[0]["id"], jang_id);
    let (_, stats) = f.get("/api/posts/stats/departments").await;
    assert!(stats_of(&stats, "Marketing").is_none(), "{stats}");
    assert_eq!(stats_of(&stats, "Engineering").unwrap()["userCount"], 1);
    let (_, marketing) = f.get("/api/posts/by-department/Marketing").await;
    assert_eq!(marketing, json!([]));

    // Delete, then 404.
    let r = f.http.delete(f.posts.url(&post_path)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let (status, body) = f.get(&post_path).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    f.stop().await;
}

#[tokio::test]
async fn post_api_rejects_bad_requests_like_the_user_api() {
    let f = full("scn_bad").await;
    let url = f.posts.url("/api/posts");
    let send = |body: &'static str, content_type: &'static str| {
        f.http
            .post(url.clone())
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    for (body, content_type, status, code) in [
        ("{", "application/json", 400, "malformed_json"),
        ("[]", "application/json", 400, "malformed_json"),
        (
            r#"{"title":1,"content":"c","authorId":1}"#,
            "application/json",
            400,
            "invalid_type",
        ),
        (
            r#"{"title":"t","content":"c","authorId":1,"x":1}"#,
            "application/json",
            400,
            "unknown_field",
        ),
        (
            r#"{"title":"","content":"c","authorId":1}"#,
            "application/json",
            422,
            "validation_failed",
        ),
        (
            r#"{"title":"t","content":"c"}"#,
            "application/json",
            422,
            "validation_failed",
        ),
        (
            "title=t",
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
        ),
    ] {
        let r = send(body, content_type).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{body}");
    }
    let huge = json!({"title": "t", "content": "x".repeat(300_000), "authorId": 1}).to_string();
    let r = f
        .http
        .post(url.clone())
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let long = json!({"title": "t", "content": "x".repeat(20_001), "authorId": 1});
    let r = f.http.post(url.clone()).json(&long).send().await.unwrap();
    assert_eq!(r.status(), 422);

    for (path, status) in [
        ("/api/posts/0", 400),
        ("/api/posts/abc", 400),
        ("/api/posts/12345", 404),
        ("/api/posts?limit=0", 422),
        ("/api/posts?limit=x", 400),
        ("/api/posts/users?page=2", 400),
        ("/api/posts/nope/nope", 404),
    ] {
        let (got, body) = f.get(path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
    }
    let r = f
        .http
        .delete(f.posts.url("/api/posts/12345"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = f
        .http
        .put(f.posts.url("/api/posts/12345"))
        .json(&json!({"title": "t", "content": "c", "authorId": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let (status, health) = f.get("/health").await;
    assert_eq!((status, &health["status"]), (200, &json!("UP")));
    f.stop().await;
}

#[tokio::test]
async fn lists_page_with_a_link_to_the_next_page() {
    let f = full("scn_pages").await;
    for i in 0..5 {
        f.create_user(&format!("u{i}"), &format!("u{i}@example.com"), "Ops")
            .await;
    }
    f.eventually("/api/posts/users", "five users projected", |b| {
        b.as_array().is_some_and(|a| a.len() == 5)
    })
    .await;
    let mut path = "/api/posts/users/department/Ops?limit=2".to_owned();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let r = f.http.get(f.posts.url(&path)).send().await.unwrap();
        let next = r
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_owned());
        let page: Vec<Value> = r.json().await.unwrap();
        seen.extend(page.iter().map(|u| u["name"].as_str().unwrap().to_owned()));
        let Some(link) = next else { break };
        path = link
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap()
            .to_owned();
    }
    assert_eq!(seen, ["u0", "u1", "u2", "u3", "u4"]);
    f.stop().await;
}

/// The README's walkthrough is `scripts/walkthrough`: it runs green against a whole pipeline, and
/// the README quotes every call it makes.
#[tokio::test]
async fn the_readme_walkthrough_works_and_is_quoted_in_the_readme() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = std::fs::read_to_string(root.join("scripts/walkthrough")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let calls: Vec<&str> = script
        .lines()
        .map(str::trim)
        // Its writes (the reads are `check` calls, shown in the README as plain curl lines).
        .filter(|l| l.contains("curl -s") && l.contains(" -X "))
        .collect();
    assert!(calls.len() >= 6, "{calls:?}");
    for call in calls {
        assert!(
            readme.contains(call),
            "README.md does not quote this call of scripts/walkthrough:\n{call}"
        );
    }

    let f = full("scn_walk").await;
    let out = tokio::process::Command::new("bash")
        .arg(root.join("scripts/walkthrough"))
        .env("USER_API_URL", &f.users.base_url)
        .env("POST_API_URL", &f.posts.base_url)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "scripts/walkthrough failed:\n{text}");
    assert!(text.contains("walkthrough passed"), "{text}");
    // It cleans up after itself, so it runs again.
    let again = tokio::process::Command::new("bash")
        .arg(root.join("scripts/walkthrough"))
        .env("USER_API_URL", &f.users.base_url)
        .env("POST_API_URL", &f.posts.base_url)
        .output()
        .await
        .unwrap();
    assert!(again.status.success(), "a second run failed");
    f.stop().await;
}

/// The department and author lookups of post-api are index scans on a realistic amount of data.
#[tokio::test]
async fn department_and_author_lookups_use_indexes() {
    let stack = e2e::Stack::from_env();
    let db = e2e::TestDb::create(&stack, "scn_plan", Some(schema::Database::ViewDb))
        .await
        .unwrap();
    let c = db.client().await.unwrap();
    c.batch_execute(
        "INSERT INTO user_view (user_id, name, email, department, status, created_at, updated_at,
                                source_lsn, source_seq)
         SELECT i, 'u' || i, 'u' || i || '@example.org', 'Dept ' || (i % 50), 'ACTIVE', now(),
                now(), '0/1', i FROM generate_series(1, 20000) i;
         INSERT INTO posts (title, content, author_id)
         SELECT 'p' || i, 'c', 1 + i % 20000 FROM generate_series(1, 50000) i;
         ANALYZE user_view; ANALYZE posts;",
    )
    .await
    .unwrap();
    for (what, sql) in [
        (
            "posts by department",
            "EXPLAIN SELECT p.id FROM user_view u JOIN posts p ON p.author_id = u.user_id \
             WHERE u.department = 'Dept 7' AND p.id > 0 ORDER BY p.id LIMIT 51",
        ),
        (
            "users of a department",
            "EXPLAIN SELECT user_id FROM user_view WHERE department = 'Dept 7' AND user_id > 0 \
             ORDER BY user_id LIMIT 51",
        ),
        (
            "posts of an author",
            "EXPLAIN SELECT id FROM posts WHERE author_id = 42 ORDER BY id",
        ),
    ] {
        let plan: Vec<String> = c
            .query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(!plan.contains("Seq Scan"), "{what}:\n{plan}");
        assert!(plan.contains("Index"), "{what}:\n{plan}");
    }
}
