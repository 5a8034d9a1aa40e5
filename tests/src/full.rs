//! A whole pipeline over real HTTP: user-api → user_db → reader → topic → projector →
//! materialized_view_db ← post-api, for tests that drive it as a user would.

// Helpers of test binaries: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{json, Value};

use crate::{wait_for, Pipeline, PostApi, Projector, UserApi};

/// How long a change may take to reach post-api.
pub const WAIT: Duration = Duration::from_secs(30);

/// A whole pipeline: user-api → user_db → reader → topic → projector → view db ← post-api.
#[derive(Debug)]
pub struct Full {
    pub pipeline: Pipeline,
    pub projector: Projector,
    pub users: UserApi,
    pub posts: PostApi,
    pub http: reqwest::Client,
}

pub async fn full(prefix: &str) -> Full {
    crate::init_logs();
    let pipeline = Pipeline::start(prefix).await.unwrap();
    let projector = Projector::start(pipeline.projector_config()).await.unwrap();
    let users = UserApi::start(&pipeline.user_db.url).await.unwrap();
    let group = pipeline.projector_config().group;
    let posts = PostApi::start_for(&pipeline.view_db.url, &group, Duration::from_secs(10))
        .await
        .unwrap();
    Full {
        pipeline,
        projector,
        users,
        posts,
        http: reqwest::Client::new(),
    }
}

impl Full {
    pub async fn stop(self) {
        self.users.stop().await.unwrap();
        self.posts.stop().await.unwrap();
        self.projector.stop().await.unwrap();
        self.pipeline.reader.stop().await.unwrap();
    }

    /// POST to user-api; the created user.
    pub async fn create_user(&self, name: &str, email: &str, department: &str) -> Value {
        let r = self
            .http
            .post(self.users.url("/api/users"))
            .json(&json!({"name": name, "email": email, "department": department}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.posts.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Polls GET `path` on post-api until `check` accepts the JSON body.
    pub async fn eventually(
        &self,
        path: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(what, WAIT, || async {
            let (status, body) = self.get(path).await;
            Ok((status == 200 && check(&body)).then_some(body))
        })
        .await
        .unwrap()
    }
}
