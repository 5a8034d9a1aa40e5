//! The compose stack (`compose/docker-compose.yml`, `Dockerfile`), checked without a Docker engine:
//! the file parses (and `docker-compose config -q` accepts it); every variable a service sets is one
//! its binary reads, read from the binary's `--help`; listen ports, published ports and healthchecks
//! agree with the code's defaults; topic and group are the code's; services wait for what they
//! need; the Dockerfile builds every binary the file runs; and the PostgreSQL init script, run
//! against the test cluster, grants what each service needs and no more.

// Helpers of a test binary: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn compose_path() -> PathBuf {
    repo().join("compose/docker-compose.yml")
}

fn compose() -> Value {
    let text = std::fs::read_to_string(compose_path()).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn services(compose: &Value) -> &serde_yaml::Mapping {
    compose["services"]
        .as_mapping()
        .expect("services is a mapping")
}

fn name(key: &Value) -> &str {
    key.as_str().unwrap()
}

/// A service's `environment` as a map (the file uses the mapping form).
fn environment(service: &Value) -> BTreeMap<String, String> {
    let Some(env) = service.get("environment") else {
        return BTreeMap::new();
    };
    env.as_mapping()
        .expect("environment is a mapping")
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => panic!("environment value {other:?} is not a scalar"),
            };
            (name(k).to_owned(), value)
        })
        .collect()
}

/// The services built from this repository, with the binary each runs.
fn our_services(compose: &Value) -> Vec<(String, String, &Value)> {
    services(compose)
        .iter()
        .filter(|(_, s)| s.get("build").is_some())
        .map(|(k, s)| {
            let bin = s["command"][0]
                .as_str()
                .unwrap_or_else(|| panic!("{} has no command naming its binary", name(k)));
            (name(k).to_owned(), bin.to_owned(), s)
        })
        .collect()
}

/// One environment variable a binary reads, as its `--help` says.
#[derive(Debug)]
struct EnvOption {
    flag: String,
    default: Option<String>,
}

/// What `BIN --help` (with an empty environment) says about the variables the binary reads, and
/// which flags it requires.
struct Help {
    env: BTreeMap<String, EnvOption>,
    required: BTreeSet<String>,
}

fn help(bin: &str) -> Help {
    let text = e2e::config_docs::help_text(bin, None).unwrap();
    let parsed = e2e::config_docs::parse(&text).unwrap();
    let env: BTreeMap<String, EnvOption> = parsed
        .options
        .iter()
        .filter_map(|o| {
            let option = EnvOption {
                flag: o.long()?.to_owned(),
                default: o.default.clone(),
            };
            Some((o.env.clone()?, option))
        })
        .collect();
    let required = parsed
        .usage
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(str::to_owned)
        .collect();
    assert!(
        !env.is_empty(),
        "{bin} --help names no environment variable:\n{text}"
    );
    Help { env, required }
}

/// Read by every binary (service::init_tracing), not a flag.
const COMMON_ENV: [&str; 1] = ["RUST_LOG"];

#[test]
fn every_variable_a_service_sets_is_one_its_binary_reads() {
    let compose = compose();
    let ours = our_services(&compose);
    let bins: BTreeSet<&str> = ours.iter().map(|(_, bin, _)| bin.as_str()).collect();
    assert_eq!(
        bins,
        BTreeSet::from(["cdc-reader", "migrate", "post-api", "projector", "user-api"]),
        "the compose file runs every service of the pipeline and the migrations"
    );
    for (service, bin, spec) in &ours {
        let help = help(bin);
        let env = environment(spec);
        for var in env.keys() {
            assert!(
                help.env.contains_key(var) || COMMON_ENV.contains(&var.as_str()),
                "{service} sets {var}, which {bin} does not read (it reads {:?})",
                help.env.keys().collect::<Vec<_>>()
            );
        }
        for flag in &help.required {
            let (var, _) = help
                .env
                .iter()
                .find(|(_, o)| &o.flag == flag)
                .unwrap_or_else(|| panic!("{bin} requires {flag}, which has no variable"));
            assert!(
                env.contains_key(var),
                "{service} does not set {var}, which {bin} requires"
            );
        }
    }
    // migrate requires neither URL by flag but does nothing without them.
    let (_, _, migrate) = ours.iter().find(|(_, bin, _)| bin == "migrate").unwrap();
    let env = environment(migrate);
    assert!(env.contains_key("USER_DB_URL") && env.contains_key("VIEW_DB_URL"));
}

#[test]
fn listen_ports_published_ports_and_healthchecks_agree_with_the_code() {
    let compose = compose();
    let mut seen = BTreeMap::new();
    for (service, bin, spec) in our_services(&compose) {
        let help = help(&bin);
        let Some((var, option)) = help
            .env
            .iter()
            .find(|(_, o)| o.flag == "--listen" || o.flag == "--http-listen")
        else {
            assert_eq!(bin, "migrate", "{service} serves nothing");
            continue;
        };
        let default = option.default.as_deref().unwrap();
        let port = default.rsplit_once(':').unwrap().1;
        let env = environment(spec);
        assert_eq!(
            env.get(var).map(String::as_str),
            Some(format!("0.0.0.0:{port}").as_str()),
            "{service} must listen on every interface of its container, on its default port {port}"
        );
        let ports: Vec<&str> = spec["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(
            ports,
            [format!("{port}:{port}")],
            "{service} publishes its port"
        );
        let check = serde_yaml::to_string(&spec["healthcheck"]["test"]).unwrap();
        assert!(
            check.contains(&format!("http://127.0.0.1:{port}/health")),
            "{service}'s healthcheck asks its /health on {port}: {check}"
        );
        seen.insert(service, port.to_owned());
    }
    // DESIGN.md's ports.
    let want = [
        ("cdc-reader", "9101"),
        ("post-api", "8082"),
        ("projector", "9102"),
        ("user-api", "8081"),
    ];
    assert_eq!(
        seen,
        want.iter()
            .map(|(s, p)| (s.to_string(), p.to_string()))
            .collect()
    );
    // The healthchecks run curl inside our image: the runtime stage must have it.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let runtime = dockerfile.split("AS runtime").nth(1).unwrap();
    assert!(runtime.contains(" curl"), "the runtime image installs curl");
}

#[test]
fn services_reach_the_compose_kafka_and_postgres_with_the_codes_topic_and_group() {
    let compose = compose();
    let all = services(&compose);
    let kafka = environment(&all["kafka"]);
    let internal = kafka["KAFKA_ADVERTISED_LISTENERS"]
        .split(',')
        .find_map(|l| l.strip_prefix(&format!("{}://", kafka["KAFKA_INTER_BROKER_LISTENER_NAME"])))
        .unwrap()
        .to_owned();
    assert!(internal.starts_with("kafka:"), "{internal}");
    assert!(kafka["KAFKA_ADVERTISED_LISTENERS"].contains("EXTERNAL://localhost:9092"));
    assert_eq!(
        kafka["KAFKA_PROCESS_ROLES"], "broker,controller",
        "KRaft, no ZooKeeper"
    );
    assert_eq!(kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"], "1");
    assert_eq!(
        environment(&all["kafka-ui"])["KAFKA_CLUSTERS_0_BOOTSTRAPSERVERS"],
        internal
    );
    let postgres = &all["postgres"];
    let command: Vec<&str> = postgres["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(command.contains(&"wal_level=logical"), "{command:?}");
    let image = postgres["image"].as_str().unwrap();
    let major: u32 = image
        .split_once(':')
        .unwrap()
        .1
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(major >= 16, "{image}: PostgreSQL 16 or newer");
    let init = std::fs::read_to_string(repo().join("compose/postgres/10-cdc-pipeline.sh")).unwrap();

    let mut reader_topic = None;
    for (service, bin, spec) in our_services(&compose) {
        let env = environment(spec);
        let help = help(&bin);
        if let Some(brokers) = env.get("KAFKA_BROKERS") {
            assert_eq!(
                brokers, &internal,
                "{service} reaches Kafka on the compose network"
            );
        }
        for (var, db) in [
            ("USER_DB_URL", "user_db"),
            ("VIEW_DB_URL", "materialized_view_db"),
            ("CDC_READER_DATABASE_URL", "user_db"),
        ] {
            let Some(url) = env.get(var) else { continue };
            let config: tokio_postgres::Config = url.parse().unwrap();
            assert_eq!(config.get_dbname(), Some(db), "{service} {var}");
            assert_eq!(
                format!("{:?}", config.get_hosts()),
                r#"[Tcp("postgres")]"#,
                "{service} {var}"
            );
            assert_eq!(config.get_ports(), [5432], "{service} {var}");
            let role = config.get_user().unwrap();
            assert!(
                init.contains(&format!("('{role}', :'")),
                "{service} connects as {role}, which the init script does not create"
            );
        }
        // Values the file states must be the code's defaults, which DESIGN.md names.
        let stated_or_default = |var: &str| {
            env.get(var)
                .cloned()
                .or_else(|| help.env[var].default.clone())
                .unwrap()
        };
        match bin.as_str() {
            "cdc-reader" => {
                for var in ["CDC_READER_TOPICS", "CDC_READER_TABLES"] {
                    if let Some(v) = env.get(var) {
                        assert_eq!(Some(v), help.env[var].default.as_ref(), "{var}");
                    }
                }
                let topics = stated_or_default("CDC_READER_TOPICS");
                reader_topic = topics
                    .split(',')
                    .find_map(|e| e.strip_prefix("public.users="))
                    .map(str::to_owned);
            }
            "projector" => {
                assert_eq!(stated_or_default("PROJECTOR_TOPIC"), "user-events");
                assert_eq!(stated_or_default("PROJECTOR_GROUP"), "post-service-streams");
                for var in ["PROJECTOR_TOPIC", "PROJECTOR_GROUP"] {
                    assert_eq!(env.get(var), help.env[var].default.as_ref(), "{var}");
                }
            }
            _ => {}
        }
    }
    assert_eq!(reader_topic.as_deref(), Some("user-events"));
}

#[test]
fn services_wait_for_what_they_need() {
    let compose = compose();
    let all = services(&compose);
    for (service, spec) in all {
        let service = name(service);
        let Some(deps) = spec.get("depends_on") else {
            continue;
        };
        for (dep, how) in deps.as_mapping().unwrap() {
            let dep = name(dep);
            let target = all
                .get(dep)
                .unwrap_or_else(|| panic!("{service} depends on unknown {dep}"));
            match how["condition"].as_str() {
                Some("service_healthy") => assert!(
                    target.get("healthcheck").is_some(),
                    "{service} waits for {dep} to be healthy, which has no healthcheck"
                ),
                Some("service_completed_successfully") => assert_eq!(dep, "migrate"),
                other => panic!("{service} → {dep}: condition {other:?}"),
            }
        }
    }
    for (service, bin, spec) in our_services(&compose) {
        let deps = spec.get("depends_on").and_then(Value::as_mapping);
        let waits_for = |dep: &str| deps.is_some_and(|d| d.contains_key(dep));
        assert!(waits_for("postgres"), "{service} waits for postgres");
        let env = environment(spec);
        if env.contains_key("KAFKA_BROKERS") {
            assert!(waits_for("kafka"), "{service} waits for kafka");
        }
        if bin != "migrate" {
            assert!(waits_for("migrate"), "{service} waits for the migrations");
            assert_eq!(
                spec["restart"].as_str(),
                Some("unless-stopped"),
                "{service}"
            );
        }
        // A service that skips its migrations relies on the migrate step.
        for (var, value) in &env {
            if var.ends_with("_SKIP_MIGRATIONS") {
                assert_eq!(value, "true");
            }
        }
    }
}

#[test]
fn the_dockerfile_builds_every_binary_the_compose_file_runs() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let binaries: BTreeSet<&str> = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG BINARIES="))
        .unwrap()
        .trim_matches('"')
        .split_whitespace()
        .collect();
    let compose = compose();
    for (service, bin, spec) in our_services(&compose) {
        assert!(
            binaries.contains(bin.as_str()),
            "{service} runs {bin}, not in the image"
        );
        assert_eq!(spec["build"]["dockerfile"].as_str(), Some("Dockerfile"));
        assert_eq!(spec["build"]["context"].as_str(), Some(".."));
        assert_eq!(spec["image"].as_str(), Some("cdc-pipeline:local"));
    }
    // Each binary belongs to a package the build line names.
    let metadata = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(metadata.status.success(), "{metadata:?}");
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let build = dockerfile
        .lines()
        .find(|l| l.contains("cargo build --release --locked"))
        .unwrap();
    for bin in &binaries {
        let package = metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                p["targets"].as_array().unwrap().iter().any(|t| {
                    t["name"] == *bin && t["kind"].as_array().unwrap().iter().any(|k| k == "bin")
                })
            })
            .unwrap_or_else(|| panic!("{bin} is no binary of the workspace"));
        let package = package["name"].as_str().unwrap();
        assert!(
            build.contains(&format!("-p {package} ")),
            "{bin}: package {package} is not built: {build}"
        );
    }
    // Non-root at run time.
    let runtime = dockerfile.split("AS runtime").nth(1).unwrap();
    let user = runtime
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .unwrap();
    assert!(user != "root" && user != "0", "USER {user}");
    // The build context keeps every workspace member and the lock file.
    let ignored = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for member in metadata["workspace_members"].as_array().unwrap() {
        let package = metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == *member)
            .unwrap();
        let manifest = Path::new(package["manifest_path"].as_str().unwrap());
        let dir = manifest.parent().unwrap().strip_prefix(repo()).unwrap();
        let dir = dir.to_str().unwrap();
        assert!(
            !ignored.lines().any(|l| l.trim() == dir),
            ".dockerignore drops workspace member {dir}"
        );
    }
    assert!(!ignored.lines().any(|l| l.trim() == "Cargo.lock"));
}

/// Users with Docker run the Kafka our scripts run and test against: one version, the pom's.
#[test]
fn compose_runs_the_kafka_version_the_scripts_pin() {
    let pom = std::fs::read_to_string(repo().join("scripts/kafka/pom.xml")).unwrap();
    let version = pom
        .split_once("<kafka.version>")
        .and_then(|(_, rest)| rest.split_once("</kafka.version>"))
        .map(|(v, _)| v.trim())
        .expect("scripts/kafka/pom.xml names <kafka.version>");
    let image = services(&compose())["kafka"]["image"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(image, format!("apache/kafka:{version}"));
}

#[test]
fn docker_compose_accepts_the_file() {
    // scripts/test installs Debian's docker-compose; `config` needs no engine.
    let out = Command::new("docker-compose")
        .args(["-f", compose_path().to_str().unwrap(), "config", "-q"])
        .output()
        .expect("docker-compose is not installed (scripts/test installs it with apt)");
    assert!(
        out.status.success(),
        "docker-compose config -q: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The init script against the test cluster (twice: the dev stack re-runs it), then what each
/// role may and may not do.
#[tokio::test]
async fn the_postgres_init_script_grants_each_service_what_it_needs_and_no_more() {
    let stack = e2e::Stack::from_env();
    let admin: tokio_postgres::Config = stack.pg_admin_url.parse().unwrap();
    let host = match &admin.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        other => panic!("{other:?}"),
    };
    let port = admin.get_ports()[0].to_string();
    let password = String::from_utf8(admin.get_password().unwrap().to_vec()).unwrap();
    let psql = std::env::var("CDC_TEST_PSQL").unwrap_or_else(|_| "psql".into());
    let psql_dir = Path::new(&psql).parent().unwrap_or(Path::new(""));
    let path = format!("{}:{}", psql_dir.display(), std::env::var("PATH").unwrap());
    for _ in 0..2 {
        let out = Command::new("sh")
            .arg(repo().join("compose/postgres/10-cdc-pipeline.sh"))
            .env("PATH", &path)
            .env("PGHOST", &host)
            .env("PGPORT", &port)
            .env("PGPASSWORD", &password)
            .env("POSTGRES_USER", admin.get_user().unwrap())
            .env("USER_SERVICE_PASSWORD", "user-service-pw")
            .env("VIEW_SERVICE_PASSWORD", "view-service-pw")
            .env("CDC_READER_PASSWORD", "cdc'reader-pw")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init script: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let url = |role: &str, pw: &str, db: &str| {
        let pw = pw.replace('\'', "%27");
        format!("postgres://{role}:{pw}@{host}:{port}/{db}")
    };
    // Each owner migrates its database.
    let mut users = e2e::connect(&url("user_service", "user-service-pw", "user_db"))
        .await
        .unwrap();
    schema::migrate(&mut users, schema::Database::UserDb)
        .await
        .unwrap();
    let mut views = e2e::connect(&url(
        "view_service",
        "view-service-pw",
        "materialized_view_db",
    ))
    .await
    .unwrap();
    schema::migrate(&mut views, schema::Database::ViewDb)
        .await
        .unwrap();
    // The reader: replication, reading users, creating its publication, recording snapshots.
    let reader = e2e::connect(&url("cdc_reader", "cdc'reader-pw", "user_db"))
        .await
        .unwrap();
    let replication: bool = reader
        .query_one(
            "SELECT rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(replication);
    let publication = format!("init_check_{}", std::process::id());
    reader
        .batch_execute(&format!(
            "SELECT count(*) FROM users; CREATE PUBLICATION {publication} FOR TABLE users; \
             DROP PUBLICATION {publication}; SELECT count(*) FROM cdc_reader_snapshots"
        ))
        .await
        .unwrap();
    // No role reaches the other side's database.
    for (role, pw, db) in [
        ("cdc_reader", "cdc'reader-pw", "materialized_view_db"),
        ("view_service", "view-service-pw", "user_db"),
        ("user_service", "user-service-pw", "materialized_view_db"),
    ] {
        let err = e2e::connect(&url(role, pw, db)).await.err();
        let err = err.unwrap_or_else(|| panic!("{role} may connect to {db}"));
        let code = err
            .chain()
            .find_map(|e| e.downcast_ref::<tokio_postgres::Error>())
            .and_then(|e| e.code().cloned());
        assert_eq!(
            code,
            Some(tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{role} → {db}: {err:#}"
        );
    }
    // Only the reader replicates; no service is a superuser.
    let admin_client = e2e::connect(&stack.pg_admin_url).await.unwrap();
    let rows = admin_client
        .query(
            "SELECT rolname, rolsuper, rolreplication, rolcreatedb, rolcreaterole FROM pg_roles \
             WHERE rolname IN ('user_service', 'view_service', 'cdc_reader') ORDER BY rolname",
            &[],
        )
        .await
        .unwrap();
    let roles: Vec<(String, bool, bool, bool, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        roles,
        [
            ("cdc_reader".into(), false, true, false, false),
            ("user_service".into(), false, false, false, false),
            ("view_service".into(), false, false, false, false),
        ]
    );
}

/// docs/configuration.md is what the binaries' `--help` say (scripts/config-docs writes it).
#[test]
fn the_configuration_reference_is_what_the_binaries_say() {
    let path = repo().join("docs/configuration.md");
    let file = std::fs::read_to_string(&path).unwrap_or_default();
    let page = e2e::config_docs::render().unwrap();
    assert!(
        file == page,
        "{} is stale: run scripts/config-docs",
        path.display()
    );
}
