//! Bulk isolation: `POST /api/machines/isolate` and
//! `POST /api/machines/unisolate` (docs/api-extensions.md).

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use proto::agent::Enforced;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery";

/// An API client of a new app holding `permissions`.
async fn app_api(server: &TestServer, name: &str, permissions: &[&str]) -> Api {
    let (id, secret) = create_app(server.store(), name, permissions).await;
    Api {
        http: server.https(),
        token: server.token_for(&id, &secret).await,
    }
}

/// Every action's id and machine, through the API (the app reaches all).
async fn all_actions(api: &mut Api) -> Vec<(String, String)> {
    let reply = api.get("/api/machineactions").await;
    assert_eq!(reply.status, 200);
    let page = reply.json().unwrap();
    assert!(page["@odata.nextLink"].is_null());
    page["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_owned(),
                a["machineId"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn entries(reply: &agent::Reply) -> Vec<Value> {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body = reply.json().unwrap();
    assert!(
        body["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("/api/$metadata#BulkMachineActionResults"),
        "{body}"
    );
    body["value"].as_array().unwrap().clone()
}

/// Asserts an entry's error in the contract's shape; returns it.
fn entry_error(entry: &Value, status: u16, code: &str, request_id: &str) -> Value {
    assert_eq!(entry["status"], status, "{entry}");
    assert!(entry.get("machineAction").is_none(), "{entry}");
    let error = entry["error"].clone();
    assert_eq!(error["code"], code, "{entry}");
    assert_eq!(error["target"], request_id, "{entry}");
    assert!(!error["message"].as_str().unwrap().is_empty());
    error
}

/// The test: a bulk isolate of 1,000 ids by a user whose machine
/// groups reach only some of them, with machines that have an action in
/// flight, unknown ids, malformed ids and duplicates. Each entry is the
/// single call's answer for that machine, nothing else is created, and the
/// audit trail holds one record per action and one for the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_isolate_of_a_thousand_ids_answers_each_machine_as_the_single_call_would() {
    let server = TestServer::start().await;
    create_prefix_group(&server, "North", 1, "north-", "north-team").await;
    create_prefix_group(&server, "South", 2, "south-", "south-team").await;
    let north = enroll_many(&server, "north-", 950).await;
    let south = enroll_many(&server, "south-", 25).await;
    create_user(
        &server,
        "ana@contoso.test",
        PASSWORD,
        "Responder",
        &["north-team"],
    )
    .await;
    let mut user = server.user_api("ana@contoso.test", PASSWORD).await;
    let mut app = server.api().await;

    // 30 north machines already have an action in flight.
    let mut in_flight = HashMap::new();
    for id in &north[..30] {
        in_flight.insert(id.clone(), app.isolate_action(id).await);
    }
    let unknown: Vec<String> = (0..20).map(|_| server::crypto::new_machine_id()).collect();
    let malformed = [
        "not-a-machine",
        "0123",
        "zz3456789012345678901234567890123456789z",
    ];

    // 1,000 entries: every north machine (one of them twice, in upper
    // case), the south machines, unknown and malformed ids, in a mix.
    let mut ids: Vec<String> = Vec::new();
    for (i, id) in north.iter().enumerate() {
        ids.push(id.clone());
        if i < south.len() {
            ids.push(south[i].clone());
        }
        if i < unknown.len() {
            ids.push(unknown[i].clone());
        }
        if i < malformed.len() {
            ids.push(malformed[i].to_owned());
        }
    }
    ids.push(north[100].to_ascii_uppercase());
    ids.push(north[5].clone());
    assert_eq!(ids.len(), 1_000);
    let body = json!({
        "Comment": "outbreak 42",
        "IsolationType": "selective",
        "ExternalId": "case-42",
        "Title": "Contain",
        "MachineIds": ids,
    });
    // 1,000 ids fit in the 64 KiB body limit with room to spare.
    assert!(body.to_string().len() > 40_000 && body.to_string().len() < 60 * 1024);
    let reply = user.post("/api/machines/isolate", body).await;
    let request_id = reply.header("request-id").unwrap().to_owned();
    let value = entries(&reply);

    // One entry per distinct id, in the order of first mention.
    let mut seen = HashSet::new();
    let expected: Vec<String> = ids
        .iter()
        .map(|id| {
            if server::crypto::is_machine_id(id) {
                id.to_ascii_lowercase()
            } else {
                id.clone()
            }
        })
        .filter(|id| seen.insert(id.clone()))
        .collect();
    assert_eq!(expected.len(), 998);
    let answered: Vec<&str> = value
        .iter()
        .map(|e| e["machineId"].as_str().unwrap())
        .collect();
    assert_eq!(answered, expected);

    let south: HashSet<&String> = south.iter().collect();
    let unknown: HashSet<&String> = unknown.iter().collect();
    let mut created = HashMap::new();
    for entry in &value {
        let id = entry["machineId"].as_str().unwrap().to_owned();
        if let Some(active) = in_flight.get(&id) {
            let error = entry_error(entry, 400, "ActiveRequestAlreadyExists", &request_id);
            assert_eq!(error["message"], "Action is already in progress");
            assert_eq!(error["activeActionId"], active.as_str());
        } else if south.contains(&id) || unknown.contains(&id) {
            // Out of reach reads exactly as unknown.
            let error = entry_error(entry, 404, "ResourceNotFound", &request_id);
            assert_eq!(error["message"], format!("Machine {id} was not found."));
            assert!(error.get("activeActionId").is_none());
        } else if malformed.contains(&id.as_str()) {
            let error = entry_error(entry, 400, "InvalidInput", &request_id);
            assert!(
                error["message"]
                    .as_str()
                    .unwrap()
                    .contains("is not a machine id"),
                "{error}"
            );
        } else {
            assert_eq!(entry["status"], 201, "{entry}");
            assert!(entry.get("error").is_none());
            let action = &entry["machineAction"];
            assert_eq!(action["type"], "Isolate");
            assert_eq!(action["status"], "Pending");
            assert_eq!(action["machineId"], id.as_str());
            assert_eq!(action["scope"], "Selective");
            assert_eq!(action["requestor"], "ana@contoso.test");
            assert_eq!(action["requestorComment"], "outbreak 42");
            assert_eq!(action["externalId"], "case-42");
            assert_eq!(action["title"], "Contain");
            // The user signed in through the console client.
            assert_eq!(action["requestSource"], "Portal");
            assert!(action.get("@odata.context").is_none());
            created.insert(action["id"].as_str().unwrap().to_owned(), id);
        }
    }
    assert_eq!(created.len(), 920);

    // Nothing else changed: the actions are the 30 before and the 920
    // created, each stored as answered (Pending, for its machine).
    let actions = all_actions(&mut app).await;
    assert_eq!(actions.len(), 950);
    for (action_id, machine_id) in &actions {
        match created.get(action_id) {
            Some(machine) => assert_eq!(machine, machine_id),
            None => assert_eq!(in_flight.get(machine_id), Some(action_id)),
        }
    }
    let machine = app.machine(&north[500]).await;
    assert_eq!(machine["isolationState"], "Isolating");
    let machine = app.machine(south.iter().next().unwrap()).await;
    assert_eq!(machine["isolationState"], "NotIsolated");

    // The audit trail: a record per action created, and the call's own.
    let mut auditor = app_api(&server, "Auditor", &["Machine.ReadWrite.All"]).await;
    let reply = auditor
        .get(&format!(
            "/api/auditEvents?$filter=requestId%20eq%20'{request_id}'&$count=true"
        ))
        .await;
    assert_eq!(reply.status, 200);
    let records = reply.json().unwrap();
    assert_eq!(records["@odata.count"], 921);
    let records = records["value"].as_array().unwrap();
    let mut audited = HashSet::new();
    for record in records.iter().filter(|r| r["action"] == "isolate") {
        assert_eq!(record["status"], 201);
        assert_eq!(record["outcome"], "Succeeded");
        assert_eq!(record["method"], "POST");
        assert!(
            record["principal"]
                .as_str()
                .unwrap()
                .contains("ana@contoso.test")
        );
        let detail = record["detail"].as_str().unwrap();
        let action_id = detail
            .strip_prefix("machine action ")
            .and_then(|d| d.split(',').next())
            .unwrap();
        let machine_id = &created[action_id];
        assert_eq!(
            record["target"],
            format!("/api/machines/{machine_id}/isolate")
        );
        audited.insert(action_id.to_owned());
    }
    assert_eq!(audited.len(), 920);
    let call: Vec<&Value> = records
        .iter()
        .filter(|r| r["action"] == "bulk.isolate")
        .collect();
    assert_eq!(call.len(), 1);
    assert_eq!(call[0]["status"], 200);
    assert_eq!(call[0]["target"], "/api/machines/isolate");
    let detail = call[0]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(
            "bulk isolate: 998 machines, 920 actions created, 78 refused \
             (ActiveRequestAlreadyExists 30, ResourceNotFound 45, InvalidInput 3); actions: "
        ),
        "{detail}"
    );
    assert!(detail.chars().count() <= 512, "{detail}");
    assert!(
        detail.ends_with("more, each with its own record"),
        "{detail}"
    );
    let named: Vec<&str> = detail
        .split("; actions: ")
        .nth(1)
        .unwrap()
        .split(" and ")
        .next()
        .unwrap()
        .split(", ")
        .collect();
    assert!(!named.is_empty());
    for id in named {
        assert!(created.contains_key(id), "{id}");
    }
}

/// A Filter over more than 1,000 machines is refused with the count and
/// creates nothing; one the caller's scope narrows to at most 1,000 acts
/// on the machines the list shows, in its order; zero matches is an empty
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_acts_on_what_the_list_shows_and_never_on_more_than_a_thousand() {
    let server = TestServer::start().await;
    create_prefix_group(&server, "North", 1, "north-", "north-team").await;
    create_prefix_group(&server, "South", 2, "south-", "south-team").await;
    enroll_many(&server, "north-", 1_001).await;
    enroll_many(&server, "south-", 40).await;
    let mut app = server.api().await;

    let reply = app
        .post(
            "/api/machines/isolate",
            json!({"Comment": "all of them", "Filter": "startswith(computerDnsName,'north-')"}),
        )
        .await;
    let error = assert_error(&reply, 400, "InvalidInput");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("matches 1001 machines"),
        "{error}"
    );
    assert!(all_actions(&mut app).await.is_empty());

    // A user of the south team: the same Filter's matches in reach are
    // the 40 south machines... of which none start with north-; a Filter
    // on every machine reaches the 40.
    create_user(
        &server,
        "sam@contoso.test",
        PASSWORD,
        "Responder",
        &["south-team"],
    )
    .await;
    let mut sam = server.user_api("sam@contoso.test", PASSWORD).await;
    let reply = sam
        .post(
            "/api/v1.0/machines/isolate",
            json!({"Comment": "c", "Filter": "startswith(computerDnsName,'north-')"}),
        )
        .await;
    assert!(entries(&reply).is_empty());
    let filter = "onboardingStatus eq 'Onboarded'";
    let list = sam
        .get(&format!(
            "/api/machines?$filter={}",
            filter.replace(' ', "%20")
        ))
        .await;
    let listed: Vec<String> = list.json().unwrap()["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed.len(), 40);
    let reply = sam
        .post(
            "/api/machines/unisolate",
            json!({"Comment": "release south", "Filter": filter}),
        )
        .await;
    let value = entries(&reply);
    let answered: Vec<String> = value
        .iter()
        .map(|e| e["machineId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(answered, listed);
    for entry in &value {
        assert_eq!(entry["status"], 201);
        assert_eq!(entry["machineAction"]["type"], "Unisolate");
        assert!(entry["machineAction"]["scope"].is_null());
    }
    assert_eq!(all_actions(&mut app).await.len(), 40);
}

/// The bulk-created actions reach their connected agents at once, and
/// finish like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_actions_are_pushed_to_connected_agents() {
    let server = TestServer::start().await;
    let mut agents = Vec::new();
    for name in ["live-1", "live-2", "live-3"] {
        agents.push(server.enroll(name).await);
    }
    let mut sessions = Vec::new();
    for agent in &agents {
        sessions.push(agent.connect().await);
    }
    let mut api = server.api().await;
    let ids: Vec<String> = agents.iter().map(|a| a.machine_id()).collect();
    let reply = api
        .post(
            "/api/machines/isolate",
            json!({"Comment": "contain", "MachineIds": ids}),
        )
        .await;
    let value = entries(&reply);
    for ((entry, session), id) in value.iter().zip(&mut sessions).zip(&ids) {
        assert_eq!(entry["machineId"], id.as_str());
        let action_id = entry["machineAction"]["id"].as_str().unwrap().to_owned();
        let message = next(session).await;
        assert_eq!(action_id_of(&message), action_id);
        execute(session, &action_id, true, Enforced::Full).await;
        api.wait_status(&action_id, "Succeeded").await;
    }
    for id in &ids {
        assert_eq!(api.machine(id).await["isolationState"], "Isolated");
    }
}

/// Each bulk-created action is on the live-event stream, as a single
/// call's is (`machineAction.created`, with the MachineAction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_actions_are_on_the_event_stream() {
    use http_body_util::BodyExt;

    let server = TestServer::start().await;
    let ids = enroll_many(&server, "ev-", 20).await;
    let mut api = server.api().await;
    // The stream, on a connection of its own.
    let tls = tls_from(&server, "127.0.0.1").await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::builder()
        .uri("/api/events")
        .header("host", "localhost")
        .header("accept", "text/event-stream")
        .header("authorization", format!("Bearer {}", api.token))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    // The stream is open once its first message (a comment) arrives.
    let mut text = String::new();
    while !text.contains("\n\n") {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&frame.into_data().unwrap()).unwrap());
    }

    let reply = api
        .post(
            "/api/machines/isolate",
            json!({"Comment": "watch", "MachineIds": ids}),
        )
        .await;
    let mut waiting: HashMap<String, String> = entries(&reply)
        .iter()
        .map(|e| {
            (
                e["machineAction"]["id"].as_str().unwrap().to_owned(),
                e["machineId"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(waiting.len(), 20);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !waiting.is_empty() {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("every action's event within 10 s")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&frame.into_data().unwrap()).unwrap());
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            if !block.contains("event: machineAction.created\n") {
                continue;
            }
            let data = block
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap();
            let event: Value = serde_json::from_str(data).unwrap();
            let action = &event["data"];
            let id = action["id"].as_str().unwrap();
            let machine = waiting
                .remove(id)
                .expect("an action of the bulk call, once");
            assert_eq!(action["machineId"], machine.as_str());
            assert_eq!(action["status"], "Pending");
        }
    }
}

/// Bulk and single calls racing on the same machines: each machine ends
/// with exactly one action in flight, whoever won, and every loser was told
/// which action won.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_action_in_flight_per_machine_holds_against_concurrent_calls() {
    let server = TestServer::start().await;
    let ids = enroll_many(&server, "race-", 60).await;
    let mut singles = tokio::task::JoinSet::new();
    for id in ids.clone() {
        let mut api = server.api().await;
        singles.spawn(async move {
            let reply = api.isolate(&id).await;
            (id, reply.status.as_u16(), reply.json().unwrap())
        });
    }
    let mut bulk_api = server.api().await;
    let bulk = bulk_api
        .post(
            "/api/machines/isolate",
            json!({"Comment": "race", "MachineIds": ids}),
        )
        .await;
    let mut won: HashMap<String, String> = HashMap::new();
    let mut lost: HashMap<String, String> = HashMap::new();
    for entry in entries(&bulk) {
        let id = entry["machineId"].as_str().unwrap().to_owned();
        match entry["status"].as_u64().unwrap() {
            201 => {
                won.insert(id, entry["machineAction"]["id"].as_str().unwrap().into());
            }
            400 => {
                let active = entry["error"]["activeActionId"].as_str().unwrap();
                lost.insert(id, active.into());
            }
            other => panic!("unexpected status {other}: {entry}"),
        }
    }
    while let Some(joined) = singles.join_next().await {
        let (id, status, body) = joined.unwrap();
        match status {
            201 => {
                assert_eq!(
                    lost.get(&id),
                    body["id"].as_str().map(String::from).as_ref()
                );
                won.insert(id, body["id"].as_str().unwrap().into());
            }
            400 => {
                assert_eq!(body["error"]["code"], "ActiveRequestAlreadyExists");
                assert_eq!(
                    won.get(&id).map(String::as_str),
                    body["error"]["activeActionId"].as_str()
                );
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!(won.len(), 60);
    let mut app = server.api().await;
    let actions = all_actions(&mut app).await;
    assert_eq!(actions.len(), 60, "one action per machine");
    for (action_id, machine_id) in actions {
        assert_eq!(won[&machine_id], action_id);
    }
}

/// A bulk call is one call for the rate limit, whatever its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_call_counts_once_for_the_rate_limit() {
    let server = TestServer::start_with(|config| config.rate_limit_per_minute = 2).await;
    let ids = enroll_many(&server, "rl-", 200).await;
    let mut api = server.api().await;
    let reply = api
        .post(
            "/api/machines/isolate",
            json!({"Comment": "first", "MachineIds": ids[..100]}),
        )
        .await;
    assert_eq!(entries(&reply).len(), 100);
    let reply = api
        .post(
            "/api/v1.0/machines/isolate",
            json!({"Comment": "second", "MachineIds": ids[100..]}),
        )
        .await;
    assert_eq!(entries(&reply).len(), 100);
    let reply = api
        .post(
            "/api/machines/isolate",
            json!({"Comment": "third", "MachineIds": ids[..1]}),
        )
        .await;
    assert_error(&reply, 429, "TooManyRequests");
    assert!(reply.header("retry-after").is_some());
}

/// Bad bodies get the contract's errors, in the single call's order, and
/// change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bulk_requests_get_contract_errors_and_change_nothing() {
    let server = TestServer::start().await;
    let ids = enroll_many(&server, "bad-", 3).await;
    let mut api = server.api().await;
    let too_many: Vec<String> = (0..1_001)
        .map(|_| server::crypto::new_machine_id())
        .collect();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"Comment": "c"}), 400, "MissingRequiredParameter"),
        (
            json!({"Comment": "c", "MachineIds": null, "Filter": null}),
            400,
            "MissingRequiredParameter",
        ),
        (
            json!({"Comment": "c", "MachineIds": ids, "Filter": "id eq 'x'"}),
            400,
            "InvalidRequestBody",
        ),
        (
            json!({"Comment": "c", "MachineIds": []}),
            400,
            "InvalidInput",
        ),
        (
            json!({"Comment": "c", "MachineIds": too_many}),
            400,
            "InvalidInput",
        ),
        (
            json!({"Comment": "c", "MachineIds": ids[0]}),
            400,
            "InvalidRequestBody",
        ),
        (
            json!({"Comment": "c", "MachineIds": [1, 2]}),
            400,
            "InvalidRequestBody",
        ),
        (
            json!({"Comment": "c", "MachineIds": [null]}),
            400,
            "InvalidRequestBody",
        ),
        (
            json!({"Comment": "c", "Filter": 7}),
            400,
            "InvalidRequestBody",
        ),
        (json!({"Comment": "c", "Filter": ""}), 400, "ODataError"),
        (
            json!({"Comment": "c", "Filter": "id eq"}),
            400,
            "ODataError",
        ),
        (
            json!({"Comment": "c", "Filter": "colour eq 'red'"}),
            400,
            "ODataError",
        ),
        // The single call's checks, in its order: types before Comment,
        // Comment before IsolationType, all before the targets.
        (json!({"MachineIds": 5}), 400, "InvalidRequestBody"),
        (
            json!({"Comment": " ", "MachineIds": ids}),
            400,
            "MissingRequiredParameter",
        ),
        (
            json!({"Comment": "c", "IsolationType": "Partial", "MachineIds": "x"}),
            400,
            "InvalidRequestBody",
        ),
        (
            json!({"Comment": "c", "IsolationType": "Partial"}),
            400,
            "InvalidInput",
        ),
        (
            json!({"Comment": "c", "Title": "t".repeat(1001), "MachineIds": ids}),
            400,
            "InvalidInput",
        ),
        (json!(["not", "an", "object"]), 400, "InvalidRequestBody"),
    ];
    for (body, status, code) in cases {
        let reply = api.post("/api/machines/isolate", body.clone()).await;
        let error = assert_error(&reply, status, code);
        assert!(error["error"].get("activeActionId").is_none(), "{body}");
    }
    let reply = api
        .post_raw(
            "/api/machines/isolate",
            "application/json",
            b"{\"Comment\":\"a\",\"Comment\":\"b\",\"MachineIds\":[]}".to_vec(),
        )
        .await;
    assert_error(&reply, 400, "InvalidRequestBody");
    let reply = api
        .post_raw("/api/machines/unisolate", "text/plain", b"{}".to_vec())
        .await;
    assert_error(&reply, 415, "UnsupportedMediaType");
    let huge = json!({"Comment": "x".repeat(70 * 1024), "MachineIds": ids});
    let reply = api.post("/api/machines/isolate", huge).await;
    assert_error(&reply, 413, "RequestEntityTooLarge");
    // Without the permission: 403 before the body is looked at.
    let mut reader = app_api(&server, "Reader", &["Machine.Read.All"]).await;
    let reply = reader.post("/api/machines/isolate", json!({})).await;
    assert_error(&reply, 403, "Forbidden");
    create_user(&server, "vic@contoso.test", PASSWORD, "Viewer", &[]).await;
    let mut viewer = server.user_api("vic@contoso.test", PASSWORD).await;
    let reply = viewer
        .post(
            "/api/machines/unisolate",
            json!({"Comment": "c", "MachineIds": ids}),
        )
        .await;
    assert_error(&reply, 403, "Forbidden");
    assert!(all_actions(&mut api).await.is_empty());
}

/// The bulk paths don't hide a machine named `isolate` from
/// `GET /api/machines/{name}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_named_isolate_is_still_found_by_name() {
    let server = TestServer::start().await;
    let ids = enroll_many(&server, "isolate", 1).await;
    assert_eq!(ids.len(), 1);
    // Named exactly "isolate": rename through the facts.
    server
        .store()
        .update_facts(
            &ids[0],
            store::Facts {
                computer_dns_name: "isolate".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut api = server.api().await;
    for path in ["/api/machines/isolate", "/api/v1.0/machines/isolate"] {
        let reply = api.get(path).await;
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.json().unwrap()["id"], ids[0].as_str());
    }
    let reply = api.get("/api/machines/unisolate").await;
    assert_error(&reply, 404, "ResourceNotFound");
}
