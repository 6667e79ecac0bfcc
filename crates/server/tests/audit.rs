//! The audit trail: what is recorded, `GET /api/auditEvents`, and
//! `cordon audit verify` against a tampered database.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use serde_json::{Value, json};

fn cordon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cordon"))
}

/// Every record, oldest first.
async fn records(server: &TestServer) -> Vec<store::AuditRecord> {
    server
        .store()
        .list_audit(store::Query::default())
        .await
        .unwrap()
        .items
}

fn request_id(reply: &agent::Reply) -> String {
    reply.header("request-id").unwrap().to_owned()
}

/// The one record of the request `reply` answered.
fn record_of<'a>(
    records: &'a [store::AuditRecord],
    reply: &agent::Reply,
) -> &'a store::AuditRecord {
    let id = request_id(reply);
    let found: Vec<_> = records
        .iter()
        .filter(|r| r.event.request_id == id)
        .collect();
    assert_eq!(found.len(), 1, "records of {id}: {records:#?}");
    found[0]
}

/// An API client of an administrator app (`Machine.ReadWrite.All`).
async fn admin(server: &TestServer) -> Api {
    let (id, secret) = create_app(server.store(), "Auditor", &["Machine.ReadWrite.All"]).await;
    Api {
        http: server.https(),
        token: server.token_for(&id, &secret).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_and_refusals_are_recorded_and_successful_reads_are_not() {
    let server = TestServer::start_with(|c| c.rate_limit_per_minute = 2).await;
    let agent = server.enroll("m1").await;
    let machine = agent.machine_id();
    let mut api = server.api().await;
    let principal = format!("{} (Test SOAR)", server.client_id);

    let isolate = api.isolate(&machine).await;
    assert_eq!(isolate.status, 201);
    let action_id = isolate.json().unwrap()["id"].as_str().unwrap().to_owned();
    let cancel = api
        .post(
            &format!("/api/v1.0/machineactions/{action_id}/cancel"),
            json!({"Comment": "changed my mind"}),
        )
        .await;
    assert_eq!(cancel.status, 200);
    let unisolate = api.unisolate(&machine).await;
    assert_eq!(unisolate.status, 201);
    let read = api.get("/api/machines").await;
    assert_eq!(read.status, 200);

    let mut anonymous = Api {
        http: server.https(),
        token: "not-a-token".into(),
    };
    let unauthorized = anonymous.isolate(&machine).await;
    assert_eq!(unauthorized.status, 401);
    let unauthorized_read = anonymous.get("/api/machines").await;
    assert_eq!(unauthorized_read.status, 401);
    let forbidden = api
        .post(
            "/api/isolationExclusionRules",
            json!({"Name": "x", "RemotePorts": ["22"]}),
        )
        .await;
    assert_eq!(forbidden.status, 403);
    // Successful reads up to the limit, then a 429.
    let mut limited = api.get("/api/machineactions").await;
    for _ in 0..10 {
        if limited.status == 429 {
            break;
        }
        assert_eq!(limited.status, 200);
        limited = api.get("/api/machineactions").await;
    }
    assert_eq!(limited.status, 429);
    let bad_token = server
        .https()
        .request(
            Method::POST,
            &format!("/{}/oauth2/v2.0/token", server.tenant()),
            &[("content-type", "application/x-www-form-urlencoded")],
            form(&[
                ("grant_type", "client_credentials"),
                ("client_id", &server.client_id),
                ("client_secret", "wrong"),
                ("scope", "https://api.securitycenter.microsoft.com/.default"),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(bad_token.status, 401);

    let all = records(&server).await;
    let expect = [
        (&isolate, "isolate", "Succeeded", 201, principal.as_str()),
        (&cancel, "cancel", "Succeeded", 200, &principal),
        (&unisolate, "unisolate", "Succeeded", 201, &principal),
        (&unauthorized, "isolate", "Refused", 401, "anonymous"),
        (
            &unauthorized_read,
            "machine.list",
            "Refused",
            401,
            "anonymous",
        ),
        (&forbidden, "exclusion.create", "Refused", 403, &principal),
        (&limited, "action.list", "Refused", 429, &principal),
        (&bad_token, "token", "Refused", 401, "anonymous"),
    ];
    for (reply, action, outcome, status, who) in expect {
        let record = record_of(&all, reply);
        assert_eq!(record.event.action, action, "{record:?}");
        assert_eq!(record.event.outcome, outcome, "{record:?}");
        assert_eq!(record.event.status, status, "{record:?}");
        assert_eq!(record.event.principal, who, "{record:?}");
        assert_eq!(record.event.source_address, "127.0.0.1", "{record:?}");
    }
    let isolate_record = record_of(&all, &isolate);
    assert_eq!(
        isolate_record.event.target,
        format!("/api/machines/{machine}/isolate")
    );
    assert_eq!(isolate_record.event.method, "POST");
    assert_eq!(
        record_of(&all, &cancel).event.target,
        format!("/api/v1.0/machineactions/{action_id}/cancel")
    );
    assert!(
        record_of(&all, &forbidden)
            .event
            .detail
            .as_deref()
            .is_some_and(|d| d.starts_with("Forbidden:"))
    );
    // The successful reads left no record; the enrollment did.
    assert!(all.iter().all(|r| r.event.request_id != request_id(&read)));
    assert_eq!(all.iter().filter(|r| r.event.action == "enroll").count(), 1);
    assert_eq!(all.len(), expect.len() + 1, "{all:#?}");
    assert_eq!(
        server.store().verify_audit().await.unwrap(),
        Ok(all.len() as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_are_listed_with_odata_options_to_administrators_only() {
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let mut api = server.api().await;
    let isolate = api.isolate(&agent.machine_id()).await;
    assert_eq!(isolate.status, 201);

    // A non-admin app is refused, and the refusal itself is recorded.
    let refused = api.get("/api/auditEvents").await;
    assert_error(&refused, 403, "Forbidden");

    let mut admin = admin(&server).await;
    let reply = admin
        .get("/api/v1.0/auditEvents?$filter=action%20eq%20'isolate'%20and%20status%20eq%20201")
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let body = reply.json().unwrap();
    assert!(
        body["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("/api/$metadata#AuditEvents")
    );
    let events = body["value"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{body}");
    let event = &events[0];
    assert_eq!(event["requestId"], request_id(&isolate));
    assert_eq!(event["outcome"], "Succeeded");
    assert_eq!(event["method"], "POST");
    assert_eq!(
        event["principal"],
        format!("{} (Test SOAR)", server.client_id)
    );
    let keys: Vec<&str> = event
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, server::odata::AUDIT_PROPERTIES);
    assert_eq!(event["hash"].as_str().unwrap().len(), 64);

    // $top, $orderby and paging.
    let reply = admin
        .get("/api/auditEvents?$top=1&$orderby=dateTimeUtc%20desc&$count=true")
        .await;
    let body = reply.json().unwrap();
    assert_eq!(body["value"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["value"][0]["status"], 403);
    assert_eq!(body["value"][0]["requestId"], request_id(&refused));
    assert_eq!(body["@odata.count"], 3, "{body}");
    let reply = admin.get("/api/auditEvents?pageSize=2").await;
    let body = reply.json().unwrap();
    assert_eq!(body["value"].as_array().unwrap().len(), 2);
    let next = body["@odata.nextLink"].as_str().unwrap();
    let next = &next[next.find("/api/").unwrap()..];
    let body = admin.get(next).await.json().unwrap();
    assert_eq!(body["value"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["value"][0]["status"], 403);

    let reply = admin.get("/api/auditEvents?$filter=nope%20eq%201").await;
    assert_error(&reply, 400, "ODataError");
}

fn verify(dir: &Path) -> std::process::Output {
    cordon()
        .args(["audit", "verify", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_the_edited_or_deleted_record() {
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let mut api = server.api().await;
    for _ in 0..3 {
        let isolate = api.isolate(&agent.machine_id()).await;
        let id = isolate.json().unwrap()["id"].as_str().unwrap().to_owned();
        let cancel = api
            .post(&format!("/api/machineactions/{id}/cancel"), json!({}))
            .await;
        assert_eq!(cancel.status, 200);
    }
    let all = records(&server).await;
    assert_eq!(all.len(), 7);
    let dir = server.dir.0.clone();

    let output = verify(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(stdout.trim(), "7 records, chain intact");

    // Export: JSON lines of AuditEvent, all of them or the recent ones.
    let output = cordon()
        .args(["audit", "export", "--since", "1h", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7);
    assert_eq!(lines[1]["action"], "isolate");
    assert_eq!(lines[1]["previousHash"], lines[0]["hash"]);
    let output = cordon()
        .args([
            "audit",
            "export",
            "--since",
            "2999-01-01T00:00:00Z",
            "--data-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(output.stdout.is_empty());

    // Edit one stored record's target.
    let edited = &all[3];
    let db = rusqlite::Connection::open(dir.join("cordon.db")).unwrap();
    db.execute(
        "UPDATE audit_events SET target = '/api/machines/other/isolate' WHERE seq = ?1",
        [edited.seq],
    )
    .unwrap();
    let output = verify(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(
        stderr.contains(&format!("record {} ({})", edited.seq, edited.event.id)),
        "{stderr}"
    );

    // Put it back, then delete a middle record: the one after it is named.
    db.execute(
        "UPDATE audit_events SET target = ?2 WHERE seq = ?1",
        rusqlite::params![edited.seq, edited.event.target],
    )
    .unwrap();
    assert!(verify(&dir).status.success());
    db.execute("DELETE FROM audit_events WHERE seq = ?1", [all[2].seq])
        .unwrap();
    let output = verify(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(
        stderr.contains(&format!("record {} ({})", all[3].seq, all[3].event.id)),
        "{stderr}"
    );
    drop(db);
}

/// Size of the database and its write-ahead log.
fn database_bytes(dir: &Path) -> u64 {
    ["cordon.db", "cordon.db-wal"]
        .iter()
        .filter_map(|name| std::fs::metadata(dir.join(name)).ok())
        .map(|m| m.len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_refusals_is_folded_and_the_server_stays_usable() {
    let server = TestServer::start_with(|c| c.audit_fold_window = Duration::from_secs(1)).await;
    let agent = server.enroll("m1").await;
    let mut api = server.api().await;
    let before = database_bytes(&server.dir.0);

    // 400 unauthenticated calls with 32 KiB paths, 8 at a time.
    const CALLS: usize = 400;
    let long_path = format!("/api/machines/{}/isolate", "a".repeat(32 * 1024));
    let mut attackers = Vec::new();
    for _ in 0..8 {
        let mut http = server.https();
        let path = long_path.clone();
        attackers.push(tokio::spawn(async move {
            for _ in 0..CALLS / 8 {
                let reply = http
                    .request(
                        Method::POST,
                        &path,
                        &[("content-type", "application/json")],
                        b"{}".to_vec(),
                    )
                    .await
                    .unwrap();
                assert_eq!(reply.status, 401);
            }
        }));
    }
    // A legitimate isolation meanwhile is answered, and promptly.
    let started = Instant::now();
    let isolate = api.isolate(&agent.machine_id()).await;
    assert_eq!(isolate.status, 201, "{:?}", isolate.body);
    assert!(started.elapsed() < Duration::from_secs(10));
    for attacker in attackers {
        attacker.await.unwrap();
    }

    // Once the window ends, the refusals are two records: the first, and
    // one that counts the rest.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let refused: Vec<_> = records(&server)
            .await
            .into_iter()
            .filter(|r| r.event.status == 401 && r.event.action == "isolate")
            .collect();
        if refused.iter().map(|r| r.event.count).sum::<i64>() == CALLS as i64 {
            break refused;
        }
        assert!(Instant::now() < deadline, "{refused:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert_eq!(refused[0].event.count, 1);
    assert_eq!(refused[1].event.count, CALLS as i64 - 1);
    assert!(
        refused[1]
            .event
            .detail
            .as_deref()
            .unwrap()
            .starts_with(&format!("{} calls like this from ", CALLS - 1))
    );
    for record in &refused {
        assert_eq!(record.event.principal, "anonymous");
        assert_eq!(record.event.target.chars().count(), 512);
        assert!(record.event.target.ends_with('…'));
    }
    // Before: 400 records of 32 KiB each, 13 MB and more.
    let grown = database_bytes(&server.dir.0).saturating_sub(before);
    assert!(grown < 1024 * 1024, "the database grew by {grown} bytes");
    assert_eq!(
        server.store().verify_audit().await.unwrap(),
        Ok(records(&server).await.len() as u64)
    );

    // Through the API, the folded record carries its count.
    let mut admin = admin(&server).await;
    let body = admin
        .get("/api/auditEvents?$filter=status%20eq%20401&$orderby=dateTimeUtc%20desc&$top=1")
        .await
        .json()
        .unwrap();
    assert_eq!(body["value"][0]["count"], CALLS as i64 - 1, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_pages_are_bounded_in_bytes_whatever_the_records_hold() {
    let server = TestServer::start().await;
    // 200 records of 64 KiB, as the trail stored them before records were
    // capped (written here straight into the database).
    {
        let db = rusqlite::Connection::open(server.dir.0.join("cordon.db")).unwrap();
        db.busy_timeout(Duration::from_secs(10)).unwrap();
        let target = "x".repeat(64 * 1024);
        for n in 0..200 {
            db.execute(
                "INSERT INTO audit_events (id, at, principal, source_address, request_id, \
                 method, target, action, outcome, status, detail, prev_hash, hash) \
                 VALUES (?1, ?2, 'anonymous', '127.0.0.1', 'r', 'GET', ?3, 'machine.list', \
                 'Refused', 401, NULL, '', '')",
                rusqlite::params![format!("big-{n}"), n, target],
            )
            .unwrap();
        }
    }
    let mut admin = admin(&server).await;
    let mut next =
        Some("/api/auditEvents?$top=10000&$filter=action%20eq%20'machine.list'".to_owned());
    let mut seen = Vec::new();
    let mut pages = 0;
    while let Some(path) = next {
        let reply = admin.get(&path).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        // Before: one page of 13 MB.
        assert!(
            reply.body.len() < 6 * 1024 * 1024,
            "{} bytes",
            reply.body.len()
        );
        let body = reply.json().unwrap();
        for event in body["value"].as_array().unwrap() {
            seen.push(event["id"].as_str().unwrap().to_owned());
        }
        next = body["@odata.nextLink"]
            .as_str()
            .map(|link| link[link.find("/api/").unwrap()..].to_owned());
        pages += 1;
        assert!(pages < 20);
    }
    assert!(pages > 1);
    let expected: Vec<String> = (0..200).map(|n| format!("big-{n}")).collect();
    assert_eq!(seen, expected, "each record once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_prune_leaves_a_signed_checkpoint_that_verify_starts_from() {
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let mut api = server.api().await;
    for _ in 0..3 {
        let isolate = api.isolate(&agent.machine_id()).await;
        let id = isolate.json().unwrap()["id"].as_str().unwrap().to_owned();
        let cancel = api
            .post(&format!("/api/machineactions/{id}/cancel"), json!({}))
            .await;
        assert_eq!(cancel.status, 200);
    }
    let all = records(&server).await;
    assert_eq!(all.len(), 7);
    let cut = proto::time::format_utc(all[4].event.at);
    let dir = server.dir.0.clone();

    let prune = |before: &str| {
        cordon()
            .args(["audit", "prune", "--before", before, "--data-dir"])
            .arg(&dir)
            .output()
            .unwrap()
    };
    let output = prune(&cut);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with(&format!(
            "removed 4 audit records before {cut}; the chain now starts after record {}",
            all[3].seq
        )),
        "{stdout}"
    );
    let kept = records(&server).await;
    assert_eq!(kept[0].seq, all[4].seq);
    // The prune is itself recorded.
    let last = kept.last().unwrap();
    assert_eq!(last.event.action, "audit.prune");
    assert_eq!(last.event.method, "CLI");
    assert!(last.event.principal.starts_with("cli "));
    let output = verify(&dir);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap(),
        format!(
            "4 records, chain intact from the signed checkpoint (records up to {} pruned on {})",
            all[3].seq,
            String::from_utf8_lossy(&output.stdout)
                .trim_end()
                .rsplit("pruned on ")
                .next()
                .unwrap()
                .trim_end_matches(')')
        )
    );

    // Nothing left before the cut: says so, changes nothing.
    let output = prune(&cut);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("no audit records before {cut}; nothing removed")
    );
    assert_eq!(records(&server).await.len(), kept.len());
    // Bad times are refused.
    for bad in ["2999-01-01T00:00:00Z", "yesterday"] {
        let output = prune(bad);
        assert!(!output.status.success(), "{output:?}");
    }

    // A checkpoint moved back to hide deleted records no longer verifies.
    let db = rusqlite::Connection::open(dir.join("cordon.db")).unwrap();
    db.execute(
        "UPDATE audit_checkpoints SET seq = seq + 1, hash = ?1",
        [&kept[0].hash],
    )
    .unwrap();
    db.execute("DELETE FROM audit_events WHERE seq = ?1", [kept[0].seq])
        .unwrap();
    let output = verify(&dir);
    assert!(!output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("is not signed by this server's key"),
        "{output:?}"
    );
    // Without its checkpoint, the pruned chain is missing its start.
    db.execute("DELETE FROM audit_checkpoints", []).unwrap();
    let output = verify(&dir);
    assert!(!output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("records before it are missing"),
        "{output:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_prunes_records_past_the_audit_retention() {
    let dir = TempDir::new("retention");
    {
        let store = server::init_data_dir(&dir.0).unwrap();
        for n in 0..5 {
            store
                .append_audit(store::NewAuditEvent {
                    id: format!("old-{n}"),
                    at: 1_000 + n,
                    principal: "anonymous".into(),
                    source_address: "127.0.0.1".into(),
                    request_id: "r".into(),
                    method: "GET".into(),
                    target: "/api/machines".into(),
                    action: "machine.list".into(),
                    outcome: "Refused".into(),
                    status: 401,
                    detail: None,
                    count: 1,
                })
                .await
                .unwrap();
        }
    }
    let mut config = test_config(&dir.0);
    config.audit_retention = Some(Duration::from_secs(24 * 3600));
    config.audit_fold_window = Duration::from_secs(1);
    let running = server::start(config).await.unwrap();
    let store = running.state.store.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = store.list_audit(store::Query::default()).await.unwrap();
        // Between the prune's delete and its own record the page is empty.
        if !page.items.is_empty() && page.items.iter().all(|r| !r.event.id.starts_with("old-")) {
            assert_eq!(page.items.len(), 1, "{:#?}", page.items);
            assert_eq!(page.items[0].event.action, "audit.prune");
            assert_eq!(page.items[0].event.principal, "server (audit retention)");
            break;
        }
        assert!(Instant::now() < deadline, "not pruned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(store.verify_audit().await.unwrap(), Ok(1));
    drop(running);
    let output = verify(&dir.0);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn serve_takes_the_audit_retention_from_its_flag_or_environment() {
    let output = cordon().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("--audit-retention"), "{help}");
    assert!(help.contains("CORDON_AUDIT_RETENTION"), "{help}");
    let dir = TempDir::new("retention-flag");
    for (args, env) in [
        (vec!["serve", "--audit-retention", "soon"], None),
        (vec!["serve"], Some("a year")),
    ] {
        let mut command = cordon();
        command.args(&args).env("CORDON_DATA_DIR", &dir.0);
        if let Some(value) = env {
            command.env("CORDON_AUDIT_RETENTION", value);
        }
        let output = command.output().unwrap();
        assert!(!output.status.success(), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--audit-retention"), "{stderr}");
        assert!(stderr.contains("not a duration"), "{stderr}");
    }
}
