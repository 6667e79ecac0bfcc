//! The isolation exclusion rules (`docs/isolation-exclusions.md`): the five
//! endpoints over HTTPS against the real server, and what agents receive.

mod common;

use std::time::Duration;

use common::*;
use http::Method;
use proto::agent::{AgentMessage, Enforced, ExclusionSpec, PortRange, ServerMessage};
use serde_json::{Value, json};

const RULES: &str = "/api/isolationExclusionRules";
const UNKNOWN_RULE: &str = "00000000-0000-4000-8000-000000000000";

/// An API client of an app with `Machine.ReadWrite.All`.
async fn admin(server: &TestServer) -> Api {
    let (id, secret) =
        create_app(server.store(), "Settings admin", &["Machine.ReadWrite.All"]).await;
    Api {
        http: server.https(),
        token: server.token_for(&id, &secret).await,
    }
}

fn ssh_rule() -> Value {
    json!({
        "Name": "SSH from the jump hosts",
        "Description": "Operators keep their way in.",
        "SystemdUnit": "sshd.service",
        "Direction": "inbound",
        "RemoteAddresses": "198.18.0.5, 10.1.2.3/8",
        "RemotePorts": [22, "8000-8100"],
    })
}

async fn create(api: &mut Api, body: Value) -> Value {
    let reply = api.post(RULES, body).await;
    assert_eq!(
        reply.status,
        201,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    reply.json().unwrap()
}

/// The next message that is not an action-flow message, within 2 seconds.
async fn next_exclusions(session: &mut agent::Session) -> (i64, Vec<ExclusionSpec>) {
    let message = tokio::time::timeout(Duration::from_secs(2), session.recv())
        .await
        .expect("exclusion rules within 2 s")
        .expect("session open");
    exclusions_of(message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_round_trip_under_both_prefixes() {
    let server = TestServer::start().await;
    let mut api = admin(&server).await;

    let reply = api.get(RULES).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json().unwrap(),
        json!({"@odata.context": format!("{}/api/$metadata#IsolationExclusionRules", server.url), "value": []})
    );

    let reply = api.post(RULES, ssh_rule()).await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8")
    );
    assert_eq!(reply.header("odata-version"), Some("4.0"));
    let created = reply.json().unwrap();
    let keys: Vec<&str> = created
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "@odata.context",
            "id",
            "name",
            "description",
            "executablePath",
            "systemdUnit",
            "direction",
            "remoteAddresses",
            "remotePorts",
            "createdDateTimeUtc",
            "lastUpdateDateTimeUtc",
            "version"
        ]
    );
    assert_eq!(
        created["@odata.context"],
        format!(
            "{}/api/$metadata#IsolationExclusionRules/$entity",
            server.url
        )
    );
    assert_eq!(created["name"], "SSH from the jump hosts");
    assert_eq!(created["description"], "Operators keep their way in.");
    assert_eq!(created["executablePath"], Value::Null);
    assert_eq!(created["systemdUnit"], "sshd.service");
    assert_eq!(created["direction"], "Inbound");
    assert_eq!(
        created["remoteAddresses"],
        json!(["198.18.0.5/32", "10.0.0.0/8"])
    );
    assert_eq!(created["remotePorts"], json!(["22", "8000-8100"]));
    assert_eq!(created["version"], 1);
    assert_eq!(created["createdDateTimeUtc"].as_str().unwrap().len(), 28);
    assert_eq!(
        created["createdDateTimeUtc"],
        created["lastUpdateDateTimeUtc"]
    );
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36);

    // The same rule under /api/v1.0; the context keeps the contract's /api form.
    let reply = api
        .get(&format!("/api/v1.0/isolationExclusionRules/{id}"))
        .await;
    assert_eq!(reply.status, 200);
    let mut fetched = reply.json().unwrap();
    assert_eq!(
        fetched["@odata.context"],
        format!(
            "{}/api/$metadata#IsolationExclusionRules/$entity",
            server.url
        )
    );
    fetched["@odata.context"] = created["@odata.context"].clone();
    assert_eq!(fetched, created);
    // Ids are matched in any case.
    let reply = api.get(&format!("{RULES}/{}", id.to_uppercase())).await;
    assert_eq!(reply.status, 200);

    let backup = create(
        &mut api,
        json!({"Name": "Backups", "ExecutablePath": "/usr/bin/restic", "Direction": "Outbound", "RemotePorts": "443"}),
    )
    .await;
    assert_eq!(backup["version"], 2);
    assert_eq!(backup["direction"], "Outbound");
    assert_eq!(backup["remoteAddresses"], json!([]));
    let list = api
        .get("/api/v1.0/isolationExclusionRules")
        .await
        .json()
        .unwrap();
    assert_eq!(
        list["@odata.context"],
        format!("{}/api/$metadata#IsolationExclusionRules", server.url)
    );
    let names: Vec<&str> = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["SSH from the jump hosts", "Backups"]);
    assert!(list["value"][0].get("@odata.context").is_none());

    let reply = api
        .patch(
            &format!("/api/v1.0/isolationExclusionRules/{id}"),
            json!({"RemotePorts": "22"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let patched = reply.json().unwrap();
    assert_eq!(patched["remotePorts"], json!(["22"]));
    assert_eq!(patched["version"], 3);
    assert_eq!(patched["createdDateTimeUtc"], created["createdDateTimeUtc"]);
    assert!(patched["lastUpdateDateTimeUtc"].as_str() > created["lastUpdateDateTimeUtc"].as_str());

    let reply = api.delete(&format!("{RULES}/{id}")).await;
    assert_eq!(reply.status, 204);
    assert!(reply.body.is_empty());
    assert!(reply.header("request-id").is_some());
    let body = assert_error(
        &api.get(&format!("{RULES}/{id}")).await,
        404,
        "ResourceNotFound",
    );
    assert_eq!(
        body["error"]["message"],
        format!("Exclusion rule {id} was not found.")
    );
    assert_error(
        &api.delete(&format!("{RULES}/{id}")).await,
        404,
        "ResourceNotFound",
    );
    let list = api.get(RULES).await.json().unwrap();
    assert_eq!(list["value"].as_array().unwrap().len(), 1);
    // Every change made one version: two creates, an update, a delete.
    assert_eq!(server.store().exclusion_version().await.unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_get_the_contracts_errors_and_change_nothing() {
    let server = TestServer::start().await;
    let mut api = admin(&server).await;
    create(&mut api, json!({"Name": "Web", "RemotePorts": "443"})).await;
    let long = "x".repeat(201);
    let cases: Vec<(&str, Vec<u8>, u16, &str, &str)> = vec![
        (
            "malformed",
            b"{\"Name\": ".to_vec(),
            400,
            "InvalidRequestBody",
            "JSON",
        ),
        ("array", b"[]".to_vec(), 400, "InvalidRequestBody", "object"),
        ("empty", Vec::new(), 400, "InvalidRequestBody", "JSON"),
        (
            "name number",
            br#"{"Name":5,"RemotePorts":"22"}"#.to_vec(),
            400,
            "InvalidRequestBody",
            "Name",
        ),
        (
            "ports object",
            br#"{"Name":"x","RemotePorts":{}}"#.to_vec(),
            400,
            "InvalidRequestBody",
            "RemotePorts",
        ),
        (
            "addresses numbers",
            br#"{"Name":"x","RemoteAddresses":[10]}"#.to_vec(),
            400,
            "InvalidRequestBody",
            "RemoteAddresses",
        ),
        (
            "name missing",
            br#"{"RemotePorts":"22"}"#.to_vec(),
            400,
            "MissingRequiredParameter",
            "Parameter Name is missing.",
        ),
        (
            "name null",
            br#"{"Name":null,"RemotePorts":"22"}"#.to_vec(),
            400,
            "MissingRequiredParameter",
            "Parameter Name is missing.",
        ),
        (
            "name empty",
            br#"{"Name":"","RemotePorts":"22"}"#.to_vec(),
            400,
            "MissingRequiredParameter",
            "Parameter Name is missing.",
        ),
        (
            "name too long",
            format!(r#"{{"Name":"{long}","RemotePorts":"22"}}"#).into_bytes(),
            400,
            "InvalidInput",
            "Name",
        ),
        (
            "no condition",
            br#"{"Name":"x","Description":"d"}"#.to_vec(),
            400,
            "InvalidInput",
            "at least one condition",
        ),
        (
            "direction only",
            br#"{"Name":"x","Direction":"Outbound"}"#.to_vec(),
            400,
            "InvalidInput",
            "at least one condition",
        ),
        (
            "relative path",
            br#"{"Name":"x","ExecutablePath":"usr/bin/curl"}"#.to_vec(),
            400,
            "InvalidInput",
            "ExecutablePath 'usr/bin/curl'",
        ),
        (
            "bad unit",
            br#"{"Name":"x","SystemdUnit":"sshd"}"#.to_vec(),
            400,
            "InvalidInput",
            "SystemdUnit 'sshd'",
        ),
        (
            "bad direction",
            br#"{"Name":"x","Direction":"Up","RemotePorts":"22"}"#.to_vec(),
            400,
            "InvalidInput",
            "Direction 'Up'",
        ),
        (
            "bad cidr",
            br#"{"Name":"x","RemoteAddresses":"10.0.0.0/33"}"#.to_vec(),
            400,
            "InvalidInput",
            "RemoteAddresses: '10.0.0.0/33'",
        ),
        (
            "bad address",
            br#"{"Name":"x","RemoteAddresses":["198.18.0.1","198.18.0.256"]}"#.to_vec(),
            400,
            "InvalidInput",
            "'198.18.0.256'",
        ),
        (
            "port zero",
            br#"{"Name":"x","RemotePorts":[0]}"#.to_vec(),
            400,
            "InvalidInput",
            "RemotePorts: '0'",
        ),
        (
            "port too high",
            br#"{"Name":"x","RemotePorts":"65536"}"#.to_vec(),
            400,
            "InvalidInput",
            "RemotePorts: '65536'",
        ),
        (
            "backwards range",
            br#"{"Name":"x","RemotePorts":"100-10"}"#.to_vec(),
            400,
            "InvalidInput",
            "'100-10'",
        ),
        (
            "executable and unit",
            br#"{"Name":"x","ExecutablePath":"/usr/sbin/sshd","SystemdUnit":"sshd.service"}"#
                .to_vec(),
            400,
            "InvalidInput",
            "not both",
        ),
        (
            "duplicate name",
            br#"{"Name":"web","RemotePorts":"80"}"#.to_vec(),
            400,
            "InvalidInput",
            "named 'Web' already exists",
        ),
        (
            "duplicate name, other case",
            br#"{"Name":"WEB","ExecutablePath":"/bin/x"}"#.to_vec(),
            400,
            "InvalidInput",
            "already exists",
        ),
    ];
    for (label, body, status, code, says) in cases {
        let reply = api.post_raw(RULES, "application/json", body).await;
        assert_eq!(
            reply.status.as_u16(),
            status,
            "{label}: {:?}",
            String::from_utf8_lossy(&reply.body)
        );
        let error = assert_error(&reply, status, code);
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{label}: {message}");
    }
    assert_error(
        &api.post_raw(
            RULES,
            "text/plain",
            br#"{"Name":"x","RemotePorts":"22"}"#.to_vec(),
        )
        .await,
        415,
        "UnsupportedMediaType",
    );
    let huge = format!(
        r#"{{"Name":"x","Description":"{}"}}"#,
        "d".repeat(70 * 1024)
    );
    assert_error(
        &api.post_raw(RULES, "application/json", huge.into_bytes())
            .await,
        413,
        "RequestEntityTooLarge",
    );
    for bad_id in ["42", "not-a-guid", "'%20OR%201=1"] {
        let path = format!("{RULES}/{bad_id}");
        assert_error(&api.get(&path).await, 400, "InvalidInput");
        assert_error(&api.delete(&path).await, 400, "InvalidInput");
        assert_error(
            &api.patch(&path, json!({"RemotePorts": "1"})).await,
            400,
            "InvalidInput",
        );
    }
    let unknown = format!("{RULES}/{UNKNOWN_RULE}");
    let body = assert_error(&api.get(&unknown).await, 404, "ResourceNotFound");
    assert_eq!(
        body["error"]["message"],
        format!("Exclusion rule {UNKNOWN_RULE} was not found.")
    );
    assert_error(
        &api.patch(&unknown, json!({"RemotePorts": "1"})).await,
        404,
        "ResourceNotFound",
    );
    // A bad body is a 400 before an unknown rule is a 404.
    assert_error(
        &api.patch(&unknown, json!({"RemotePorts": "0"})).await,
        400,
        "InvalidInput",
    );
    assert_error(
        &api.get(&format!("{RULES}?$top=1")).await,
        400,
        "ODataError",
    );
    assert_eq!(api.get(&format!("{RULES}?pageSize=5")).await.status, 200);
    let reply = api
        .http
        .request(
            Method::PUT,
            &unknown,
            &[("authorization", &format!("Bearer {}", api.token))],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 405);
    assert!(reply.header("allow").unwrap().contains("PATCH"));

    // Nothing of the above changed the rules.
    let list = api.get(RULES).await.json().unwrap();
    assert_eq!(list["value"].as_array().unwrap().len(), 1);
    assert_eq!(server.store().exclusion_version().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_need_machine_readwrite_all() {
    let server = TestServer::start().await;
    // The test app has Machine.Isolate and Machine.Read.All only.
    let mut reader = server.api().await;
    let mut admin = admin(&server).await;
    let id = create(&mut admin, ssh_rule()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let one = format!("{RULES}/{id}");
    let unknown = format!("{RULES}/{UNKNOWN_RULE}");
    for reply in [
        reader.get(RULES).await,
        reader.get(&one).await,
        reader
            .post(RULES, json!({"Name": "x", "RemotePorts": "1"}))
            .await,
        reader.patch(&one, json!({"Name": "y"})).await,
        reader.delete(&one).await,
        // 403 before 415, 400 and 404.
        reader.post_raw(RULES, "text/plain", b"x".to_vec()).await,
        reader.post(RULES, json!({})).await,
        reader.patch(&unknown, json!({"Name": null})).await,
        reader.delete(&unknown).await,
    ] {
        let body = assert_error(&reply, 403, "Forbidden");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Machine.ReadWrite.All"),
            "{body}"
        );
    }
    let mut anonymous = server.https();
    for (method, path) in [
        (Method::GET, RULES.to_owned()),
        (Method::POST, RULES.to_owned()),
        (Method::GET, one.clone()),
        (Method::PATCH, one.clone()),
        (Method::DELETE, one.clone()),
    ] {
        let reply = anonymous
            .request(
                method,
                &path,
                &[("content-type", "application/json")],
                b"{}".to_vec(),
            )
            .await
            .unwrap();
        assert_error(&reply, 401, "Unauthorized");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
    // Still there, unchanged.
    assert_eq!(
        admin.get(&one).await.json().unwrap()["name"],
        "SSH from the jump hosts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_changes_only_what_it_names() {
    let server = TestServer::start().await;
    let mut api = admin(&server).await;
    let rule = create(
        &mut api,
        json!({
            "Name": "Updates", "Description": "apt", "ExecutablePath": "/usr/bin/apt",
            "Direction": "Outbound", "RemotePorts": "80,443",
        }),
    )
    .await;
    create(&mut api, json!({"Name": "Other", "RemotePorts": "1"})).await;
    let path = format!("{RULES}/{}", rule["id"].as_str().unwrap());

    // Absent fields are kept.
    let reply = api
        .patch(&path, json!({"Description": "apt and snap"}))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let patched = reply.json().unwrap();
    assert_eq!(
        patched["@odata.context"],
        format!(
            "{}/api/$metadata#IsolationExclusionRules/$entity",
            server.url
        )
    );
    assert_eq!(patched["description"], "apt and snap");
    for key in [
        "name",
        "executablePath",
        "direction",
        "remotePorts",
        "remoteAddresses",
        "id",
    ] {
        assert_eq!(patched[key], rule[key], "{key}");
    }
    assert_eq!(patched["version"], 3);

    // Null clears; Both is stored as no direction and shown as Both.
    let patched = api
        .patch(
            &path,
            json!({"Description": null, "RemotePorts": null, "Direction": "Both"}),
        )
        .await
        .json()
        .unwrap();
    assert_eq!(patched["description"], Value::Null);
    assert_eq!(patched["remotePorts"], json!([]));
    assert_eq!(patched["direction"], "Both");
    assert_eq!(patched["executablePath"], "/usr/bin/apt");
    assert_eq!(patched["version"], 4);

    // The last condition can't go.
    let reply = api.patch(&path, json!({"ExecutablePath": null})).await;
    let body = assert_error(&reply, 400, "InvalidInput");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at least one condition")
    );
    // ...unless another takes its place.
    let patched = api
        .patch(
            &path,
            json!({"ExecutablePath": null, "SystemdUnit": "apt-daily.service"}),
        )
        .await
        .json()
        .unwrap();
    assert_eq!(patched["executablePath"], Value::Null);
    assert_eq!(patched["systemdUnit"], "apt-daily.service");
    assert_eq!(patched["version"], 5);

    // Names stay unique; a rule may change the case of its own.
    let reply = api.patch(&path, json!({"Name": "OTHER"})).await;
    assert_error(&reply, 400, "InvalidInput");
    let reply = api.patch(&path, json!({"Name": null})).await;
    assert_error(&reply, 400, "MissingRequiredParameter");
    let patched = api
        .patch(&path, json!({"Name": "UPDATES"}))
        .await
        .json()
        .unwrap();
    assert_eq!(patched["name"], "UPDATES");
    assert_eq!(patched["version"], 6);

    // A change that changes nothing makes no version.
    let reply = api.patch(&path, json!({})).await;
    assert_eq!(reply.status, 200);
    let same = reply.json().unwrap();
    assert_eq!(same["version"], 6);
    assert_eq!(
        same["lastUpdateDateTimeUtc"],
        patched["lastUpdateDateTimeUtc"]
    );
    assert_eq!(server.store().exclusion_version().await.unwrap(), 6);
    assert_error(
        &api.send(Method::PATCH, &path, "text/plain", b"{}".to_vec())
            .await,
        415,
        "UnsupportedMediaType",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_the_rules_after_welcome_and_on_every_change() {
    let server = TestServer::start().await;
    let mut api = admin(&server).await;
    let agent = server.enroll("m1").await;
    let other = server.enroll("m2").await;

    // Right after welcome, before any action: the (empty) rule set.
    let (mut session, (version, rules)) = agent.connect_with_exclusions().await;
    assert_eq!((version, rules), (0, vec![]));
    let (mut other_session, _) = other.connect_with_exclusions().await;

    let created = create(&mut api, ssh_rule()).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let expected = ExclusionSpec {
        id: id.clone(),
        name: "SSH from the jump hosts".into(),
        executable_path: None,
        systemd_unit: Some("sshd.service".into()),
        direction: Some("Inbound".into()),
        remote_addresses: vec!["198.18.0.5/32".into(), "10.0.0.0/8".into()],
        remote_ports: vec![
            PortRange {
                first: 22,
                last: 22,
            },
            PortRange {
                first: 8000,
                last: 8100,
            },
        ],
    };
    // Every live session gets it, isolated or not.
    for session in [&mut session, &mut other_session] {
        assert_eq!(next_exclusions(session).await, (1, vec![expected.clone()]));
    }

    let both = create(
        &mut api,
        json!({"Name": "dns", "RemotePorts": "53", "Direction": "Both"}),
    )
    .await;
    let (version, rules) = next_exclusions(&mut session).await;
    assert_eq!(version, 2);
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[1].id, both["id"].as_str().unwrap());
    assert_eq!(rules[1].direction, None);

    api.patch(&format!("{RULES}/{id}"), json!({"Direction": "Outbound"}))
        .await;
    let (version, rules) = next_exclusions(&mut session).await;
    assert_eq!(version, 3);
    assert_eq!(rules[0].direction.as_deref(), Some("Outbound"));
    assert_eq!(api.delete(&format!("{RULES}/{id}")).await.status, 204);
    let (version, rules) = next_exclusions(&mut session).await;
    assert_eq!(version, 4);
    assert_eq!(rules.len(), 1);

    // A new session starts from the current set; the old one no longer
    // gets anything.
    drop(other_session);
    let (_, (version, rules)) = other.connect_with_exclusions().await;
    assert_eq!(version, 4);
    assert_eq!(rules[0].name, "dns");

    // The set is sent before undelivered actions.
    let mut isolator = server.api().await;
    let reply = isolator
        .post(
            &format!("/api/machines/{}/isolate", other.machine_id()),
            json!({"Comment": "x", "IsolationType": "Selective"}),
        )
        .await;
    assert_eq!(reply.status, 201);
    let action_id = reply.json().unwrap()["id"].as_str().unwrap().to_owned();
    let (mut other_session, (version, _)) = other.connect_with_exclusions().await;
    assert_eq!(version, 4);
    let order = next(&mut other_session).await;
    assert_eq!(action_id_of(&order), action_id);
    match order {
        ServerMessage::Action(order) => assert_eq!(order.scope.as_deref(), Some("Selective")),
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_machine_shows_the_rule_version_its_agent_applied() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;
    let mut api = server.api().await;
    let agent = server.enroll("m1").await;
    let mut session = agent.connect().await;
    let machine = api.machine(&agent.machine_id()).await;
    assert_eq!(machine["exclusionRulesVersion"], Value::Null);
    let keys: Vec<&str> = machine
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.last(), Some(&"exclusionRulesVersion"));

    // Isolated Selectively.
    let id = api
        .post(
            &format!("/api/machines/{}/isolate", agent.machine_id()),
            json!({"Comment": "x", "IsolationType": "Selective"}),
        )
        .await
        .json()
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(action_id_of(&next(&mut session).await), id);
    execute(&mut session, &id, true, Enforced::Selective).await;
    api.wait_status(&id, "Succeeded").await;

    create(&mut admin, ssh_rule()).await;
    assert_eq!(next_exclusions(&mut session).await.0, 1);
    // A failure is only logged.
    session
        .send(&AgentMessage::ExclusionsApplied {
            version: 1,
            succeeded: false,
            reason: Some("cgroup v2 is not mounted".into()),
        })
        .await
        .unwrap();
    session
        .send(&AgentMessage::ExclusionsApplied {
            version: 1,
            succeeded: true,
            reason: None,
        })
        .await
        .unwrap();
    let machine = wait_machine(&mut api, &agent.machine_id(), |m| {
        m["exclusionRulesVersion"] == 1
    })
    .await;
    assert_eq!(machine["isolationScope"], "Selective");
    let list = api.get("/api/machines").await.json().unwrap();
    assert_eq!(list["value"][0]["exclusionRulesVersion"], 1);

    // Heartbeats carry the version in force too, but only one the server
    // has sent: a version from the future is not recorded.
    for version in [7, -1] {
        session
            .send(&AgentMessage::Heartbeat {
                enforced: Enforced::Selective,
                exclusion_version: Some(version),
            })
            .await
            .unwrap();
    }
    // Messages are handled in order: once this one shows, those did.
    session
        .send(&AgentMessage::Facts(agent::host_facts(Some("m1-renamed"))))
        .await
        .unwrap();
    let machine = wait_machine(&mut api, &agent.machine_id(), |m| {
        m["computerDnsName"] == "m1-renamed"
    })
    .await;
    assert_eq!(machine["exclusionRulesVersion"], 1);
    create(&mut admin, json!({"Name": "second", "RemotePorts": [443]})).await;
    assert_eq!(next_exclusions(&mut session).await.0, 2);
    session
        .send(&AgentMessage::Heartbeat {
            enforced: Enforced::Selective,
            exclusion_version: Some(2),
        })
        .await
        .unwrap();
    wait_machine(&mut api, &agent.machine_id(), |m| {
        m["exclusionRulesVersion"] == 2
    })
    .await;
    session
        .send(&AgentMessage::Heartbeat {
            enforced: Enforced::Full,
            exclusion_version: None,
        })
        .await
        .unwrap();
    let machine = wait_machine(&mut api, &agent.machine_id(), |m| {
        m["exclusionRulesVersion"].is_null()
    })
    .await;
    assert_eq!(machine["isolationScope"], "Full");
}

/// Polls a machine until `done` holds (at most 5 s).
async fn wait_machine(api: &mut Api, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let machine = api.machine(id).await;
        if done(&machine) {
            return machine;
        }
        assert!(tokio::time::Instant::now() < deadline, "{machine}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
