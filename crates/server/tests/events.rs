//! The console's live channel and the caller's self-description:
//! `GET /api/events` (server-sent events, scoped like the API, resumable
//! with `Last-Event-ID`, bounded) and `GET /api/me`; and `requestSource`
//! `Portal` for actions made through the console.

mod common;

use std::time::Duration;

use agent::Reply;
use common::*;
use http::Method;
use http_body_util::BodyExt;
use proto::agent::Enforced;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery";

// ---- set-up -----------------------------------------------------------------

async fn add_user(server: &TestServer, upn: &str, role: &str, user_groups: &[&str]) -> String {
    create_user(server, upn, PASSWORD, role, user_groups).await
}

async fn user_api(server: &TestServer, upn: &str) -> Api {
    server.user_api(upn, PASSWORD).await
}

/// An API client of a new app holding `permissions`.
async fn app_api(server: &TestServer, name: &str, permissions: &[&str]) -> Api {
    let (id, secret) = create_app(server.store(), name, permissions).await;
    Api {
        http: server.https(),
        token: server.token_for(&id, &secret).await,
    }
}

// ---- an SSE client -------------------------------------------------------------

/// One SSE message as the client parses it.
#[derive(Debug, Clone, Default)]
struct Frame {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    comments: Vec<String>,
}

impl Frame {
    fn json(&self) -> Value {
        serde_json::from_str(self.data.as_deref().unwrap_or("null")).unwrap()
    }
}

/// A live-event stream opened on a connection of its own.
struct EventStream {
    headers: http::HeaderMap,
    body: hyper::body::Incoming,
    buffer: String,
    /// The last id the stream gave (as `EventSource.lastEventId`).
    last_id: Option<String>,
    keep_alives: usize,
}

enum Opened {
    Stream(EventStream),
    Refused(Reply),
}

impl Opened {
    fn stream(self) -> EventStream {
        match self {
            Opened::Stream(stream) => stream,
            Opened::Refused(reply) => panic!(
                "stream refused: {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            ),
        }
    }

    fn refused(self) -> Reply {
        match self {
            Opened::Stream(_) => panic!("the stream was accepted"),
            Opened::Refused(reply) => reply,
        }
    }
}

async fn open_at(
    server: &TestServer,
    path: &str,
    token: Option<&str>,
    last_event_id: Option<&str>,
) -> Opened {
    let tls = tls_from(server, "127.0.0.1").await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = http::Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", "localhost")
        .header("accept", "text/event-stream");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let request = request
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    if parts.status != 200 {
        return Opened::Refused(Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        });
    }
    Opened::Stream(EventStream {
        headers: parts.headers,
        body,
        buffer: String::new(),
        last_id: None,
        keep_alives: 0,
    })
}

async fn open(server: &TestServer, token: &str, last_event_id: Option<&str>) -> EventStream {
    open_at(server, "/api/events", Some(token), last_event_id)
        .await
        .stream()
}

impl EventStream {
    /// The next message (a keep-alive comment too), `None` when the stream
    /// ended; panics after `wait`.
    async fn frame_within(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut frame = Frame::default();
                for line in block.lines().filter(|l| !l.is_empty()) {
                    if let Some(comment) = line.strip_prefix(':') {
                        frame.comments.push(comment.trim().to_owned());
                        continue;
                    }
                    let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                    match field {
                        "id" => frame.id = Some(value.to_owned()),
                        "event" => frame.event = Some(value.to_owned()),
                        "data" => {
                            assert!(frame.data.is_none(), "one data line per event: {block}");
                            frame.data = Some(value.to_owned());
                        }
                        other => panic!("unexpected field {other} in {block:?}"),
                    }
                }
                if frame.id.is_some() {
                    self.last_id = frame.id.clone();
                }
                if frame.comments.iter().any(|c| c == "keep-alive") {
                    self.keep_alives += 1;
                }
                return Some(frame);
            }
            let next = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .expect("a message in time");
            match next {
                None => return None,
                Some(Err(e)) => panic!("stream failed: {e}"),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.push_str(std::str::from_utf8(&data).unwrap());
                    }
                }
            }
        }
    }

    /// The next event (keep-alives and id-only messages skipped), within 10 s.
    async fn event(&mut self) -> Frame {
        loop {
            let frame = self
                .frame_within(Duration::from_secs(10))
                .await
                .expect("the stream is open");
            if frame.event.is_some() {
                return frame;
            }
        }
    }

    /// Events until one satisfies `done` (included).
    async fn events_until(&mut self, done: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        let mut events = Vec::new();
        loop {
            let event = self.event().await;
            let stop = done(&event);
            events.push(event);
            if stop {
                return events;
            }
        }
    }

    /// Whether an event arrives within `wait` (keep-alives don't count).
    async fn quiet_for(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let next =
                tokio::time::timeout(left, self.frame_within(Duration::from_secs(3600))).await;
            match next {
                Err(_) => return None,
                Ok(None) => panic!("the stream ended"),
                Ok(Some(frame)) if frame.event.is_some() => return Some(frame),
                Ok(Some(_)) => {}
            }
        }
    }
}

fn kinds(events: &[Frame]) -> Vec<String> {
    events.iter().map(|e| e.event.clone().unwrap()).collect()
}

/// The sequence number of an event id (`<marker>-<n>`).
/// Event ids are the event log's sequence numbers.
fn seq(id: &str) -> u64 {
    id.parse().unwrap()
}

fn is(kind: &str, action_id: &str) -> impl Fn(&Frame) -> bool {
    let kind = kind.to_owned();
    let action_id = action_id.to_owned();
    move |f| f.event.as_deref() == Some(&kind) && f.json()["data"]["id"] == action_id.as_str()
}

fn without_context(mut entity: Value) -> Value {
    entity.as_object_mut().unwrap().remove("@odata.context");
    entity
}

// ---- GET /api/me --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn me_tells_apps_and_users_of_each_role_what_they_may_do() {
    let server = TestServer::start().await;
    let finance = create_prefix_group(&server, "Finance", 1, "FIN-", "soc-eu").await;
    let hr = create_prefix_group(&server, "HR", 2, "hr-", "soc-hr").await;
    // Everything a caller who reaches every group can filter by: the
    // default group first, then by name.
    let every_group = json!([
        {"id": 0, "name": "Ungrouped devices (default)"},
        {"id": finance, "name": "Finance"},
        {"id": hr, "name": "HR"},
    ]);
    add_user(&server, "vera@example.com", "Viewer", &["SOC-EU"]).await;
    add_user(&server, "rick@example.com", "Responder", &[]).await;
    add_user(&server, "ada@example.com", "Administrator", &[]).await;

    let mut app = server.api().await;
    let me = app.get("/api/me").await;
    assert_eq!(me.status, 200);
    assert_eq!(me.header("cache-control"), Some("no-store"));
    assert_eq!(
        me.json().unwrap(),
        json!({
            "id": server.client_id,
            "displayName": "Test SOAR",
            "kind": "application",
            "upn": null,
            "role": null,
            "permissions": {"read": true, "isolate": true, "settings": false, "audit": false},
            "machineGroups": null,
            "visibleMachineGroups": every_group,
        })
    );
    // Group names are for callers who may read machines.
    let mut isolator = app_api(&server, "Isolate only", &["Machine.Isolate"]).await;
    let me = isolator.get("/api/me").await.json().unwrap();
    assert_eq!(me["permissions"]["read"], false);
    assert_eq!(me["visibleMachineGroups"], json!([]));
    let mut admin_app = app_api(&server, "Admin app", &["Machine.ReadWrite.All"]).await;
    let me = admin_app.get("/api/v1.0/me").await.json().unwrap();
    assert_eq!(
        me["permissions"],
        json!({"read": true, "isolate": false, "settings": true, "audit": true})
    );

    let vera = user_api(&server, "vera@example.com")
        .await
        .get("/api/me")
        .await;
    assert_eq!(vera.status, 200);
    let vera = vera.json().unwrap();
    assert_eq!(vera["kind"], "user");
    assert_eq!(vera["displayName"], "Display vera@example.com");
    assert_eq!(vera["upn"], "vera@example.com");
    assert_eq!(vera["role"], "Viewer");
    assert_eq!(
        vera["permissions"],
        json!({"read": true, "isolate": false, "settings": false, "audit": false})
    );
    assert_eq!(
        vera["machineGroups"],
        json!([
            {"id": 0, "name": "Ungrouped devices (default)"},
            {"id": finance, "name": "Finance"},
        ])
    );
    assert_eq!(vera["visibleMachineGroups"], vera["machineGroups"]);
    let rick = user_api(&server, "rick@example.com")
        .await
        .get("/api/me")
        .await
        .json()
        .unwrap();
    assert_eq!(rick["role"], "Responder");
    assert_eq!(
        rick["permissions"],
        json!({"read": true, "isolate": true, "settings": false, "audit": false})
    );
    assert_eq!(
        rick["machineGroups"],
        json!([{"id": 0, "name": "Ungrouped devices (default)"}])
    );
    assert_eq!(rick["visibleMachineGroups"], rick["machineGroups"]);
    let ada = user_api(&server, "ada@example.com")
        .await
        .get("/api/me")
        .await
        .json()
        .unwrap();
    assert_eq!(ada["role"], "Administrator");
    assert_eq!(
        ada["permissions"],
        json!({"read": true, "isolate": true, "settings": true, "audit": true})
    );
    assert_eq!(ada["machineGroups"], Value::Null);
    assert_eq!(ada["visibleMachineGroups"], every_group);

    // A token and nothing else: a bad one is the usual 401.
    let mut bad = Api {
        http: server.https(),
        token: "not.a.token".into(),
    };
    assert_error(&bad.get("/api/me").await, 401, "Unauthorized");
    let none = server
        .https()
        .request(Method::GET, "/api/me", &[], Vec::new())
        .await
        .unwrap();
    assert_error(&none, 401, "Unauthorized");
}

// ---- requestSource --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_made_through_the_console_come_from_the_portal() {
    let server = TestServer::start().await;
    let first = server.enroll("m1").await.machine_id();
    let second = server.enroll("m2").await.machine_id();
    add_user(&server, "rick@example.com", "Responder", &[]).await;

    let mut console = user_api(&server, "rick@example.com").await;
    let created = console.isolate(&first).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let created = created.json().unwrap();
    assert_eq!(created["requestSource"], "Portal");
    assert_eq!(created["requestor"], "rick@example.com");
    let id = created["id"].as_str().unwrap();
    assert_eq!(console.action(id).await["requestSource"], "Portal");

    let mut app = server.api().await;
    let by_app = app.isolate(&second).await.json().unwrap();
    assert_eq!(by_app["requestSource"], "PublicApi");
}

// ---- GET /api/events ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolation_streams_its_whole_life_in_order() {
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let machine_id = agent.machine_id();
    let mut session = agent.connect().await;
    let mut api = server.api().await;
    let mut events = open(&server, &api.token, None).await;
    assert_eq!(events.headers["content-type"], "text/event-stream");
    assert_eq!(events.headers["cache-control"], "no-store");
    assert_eq!(events.headers["x-accel-buffering"], "no");
    assert!(events.headers.contains_key("request-id"));
    // The stream starts with its position, before any event.
    let first = events.frame_within(Duration::from_secs(5)).await.unwrap();
    assert!(first.event.is_none() && first.data.is_none(), "{first:?}");
    assert!(first.id.is_some());

    let action_id = api.isolate_action(&machine_id).await;
    let created = events
        .events_until(is("machineAction.created", &action_id))
        .await;
    assert_eq!(kinds(&created), ["machineAction.created"]);
    let body = created[0].json();
    assert_eq!(body["type"], "machineAction.created");
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'), "{body}");
    assert_eq!(body["data"]["status"], "Pending");
    assert_eq!(body["data"]["type"], "Isolate");
    assert!(body["data"].get("@odata.context").is_none());
    let isolating = events.event().await;
    assert_eq!(isolating.event.as_deref(), Some("machine.isolationChanged"));
    assert_eq!(isolating.json()["data"]["id"], machine_id.as_str());
    assert_eq!(isolating.json()["data"]["isolationState"], "Isolating");

    assert_eq!(action_id_of(&next(&mut session).await), action_id);
    execute(&mut session, &action_id, true, Enforced::Full).await;
    let rest = events
        .events_until(|f| f.event.as_deref() == Some("machine.isolationChanged"))
        .await;
    assert_eq!(
        kinds(&rest),
        [
            "machineAction.updated",
            "machineAction.completed",
            "machine.isolationChanged"
        ]
    );
    assert_eq!(rest[0].json()["data"]["status"], "InProgress");
    assert_eq!(rest[1].json()["data"]["status"], "Succeeded");
    let machine = rest[2].json()["data"].clone();
    assert_eq!(machine["isolationState"], "Isolated");
    assert_eq!(machine["isolationScope"], "Full");
    // The entities as the API renders them.
    assert_eq!(
        rest[1].json()["data"],
        without_context(api.action(&action_id).await)
    );
    let fetched = without_context(api.machine(&machine_id).await);
    assert_eq!(machine["id"], fetched["id"]);
    assert_eq!(machine["rbacGroupName"], fetched["rbacGroupName"]);
    assert_eq!(machine["computerDnsName"], fetched["computerDnsName"]);
    // Ids increase.
    let ids: Vec<u64> = created
        .iter()
        .chain([&isolating])
        .chain(&rest)
        .map(|f| seq(f.id.as_deref().unwrap()))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    // The same under /api/v1.0.
    let v1 = open_at(&server, "/api/v1.0/events", Some(&api.token), None).await;
    assert!(matches!(v1, Opened::Stream(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_of_one_group_never_sees_another_groups_machines_nor_does_a_viewer() {
    let server = TestServer::start().await;
    create_prefix_group(&server, "Finance", 1, "FIN-", "soc-eu").await;
    create_prefix_group(&server, "HR", 2, "hr-", "soc-hr").await;
    let fin = server.enroll("fin-ws-1").await.machine_id();
    let hr = server.enroll("hr-ws-1").await.machine_id();
    add_user(&server, "alice@example.com", "Responder", &["soc-eu"]).await;
    let alice = user_api(&server, "alice@example.com").await;
    // A Viewer of the same group, reading only.
    add_user(&server, "victor@example.com", "Viewer", &["soc-eu"]).await;
    let victor = user_api(&server, "victor@example.com").await;
    let mut victors = open(&server, &victor.token, None).await;
    let mut app = server.api().await;

    let mut alices = open(&server, &alice.token, None).await;
    let start = alices
        .frame_within(Duration::from_secs(5))
        .await
        .unwrap()
        .id
        .unwrap();
    let mut apps = open(&server, &app.token, None).await;
    // HR first: had Alice been sent it, it would come before Finance's.
    let hr_action = app.isolate_action(&hr).await;
    let fin_action = app.isolate_action(&fin).await;
    let moved = |f: &Frame| f.event.as_deref() == Some("machine.isolationChanged");
    let mut seen = alices.events_until(moved).await;
    assert_eq!(
        kinds(&seen),
        ["machineAction.created", "machine.isolationChanged"]
    );
    assert_eq!(seen[1].json()["data"]["isolationState"], "Isolating");
    for action in [&hr_action, &fin_action] {
        let reply = app
            .post(
                &format!("/api/machineactions/{action}/cancel"),
                json!({"Comment": "no"}),
            )
            .await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    let ended = alices.events_until(moved).await;
    assert_eq!(
        kinds(&ended),
        ["machineAction.completed", "machine.isolationChanged"]
    );
    assert_eq!(ended[0].json()["data"]["status"], "Cancelled");
    assert_eq!(ended[1].json()["data"]["isolationState"], "NotIsolated");
    seen.extend(ended);
    for event in &seen {
        let data = &event.json()["data"];
        let machine = data.get("machineId").unwrap_or(&data["id"]);
        assert_eq!(machine, fin.as_str(), "{event:?}");
    }
    assert!(alices.quiet_for(Duration::from_millis(500)).await.is_none());
    // The Viewer got the same events, Finance's only.
    let viewed = victors
        .events_until(is("machineAction.completed", &fin_action))
        .await;
    assert!(!viewed.is_empty());
    assert!(
        viewed.iter().filter(|f| f.event.is_some()).all(|f| !f
            .data
            .as_ref()
            .unwrap()
            .contains(&hr)),
        "{viewed:?}"
    );
    assert!(
        viewed
            .iter()
            .any(|f| f.json()["data"]["id"] == fin_action.as_str())
    );
    // The app reaches every group: it saw both.
    let all = apps
        .events_until(is("machineAction.completed", &fin_action))
        .await;
    assert!(
        all.iter()
            .any(|f| f.json()["data"]["id"] == hr_action.as_str())
    );
    // A replay is scoped the same way.
    let mut replay = open(&server, &alice.token, Some(&start)).await;
    let replayed = replay
        .events_until(is("machineAction.completed", &fin_action))
        .await;
    assert_eq!(kinds(&replayed), kinds(&seen[..3]));
    assert!(
        replayed
            .iter()
            .all(|f| !f.data.as_ref().unwrap().contains(&hr))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_stream_misses_nothing_and_an_unknown_id_resyncs() {
    let server = TestServer::start().await;
    let machines = [
        server.enroll("m1").await.machine_id(),
        server.enroll("m2").await.machine_id(),
    ];
    let mut app = server.api().await;
    let mut watching = open(&server, &app.token, None).await;
    let mut leaving = open(&server, &app.token, None).await;
    leaving.frame_within(Duration::from_secs(5)).await.unwrap();
    let first = app.isolate_action(&machines[0]).await;
    leaving
        .events_until(is("machineAction.created", &first))
        .await;
    let resume_from = leaving.last_id.clone().unwrap();
    drop(leaving);

    // While it is away.
    let reply = app
        .post(&format!("/api/machineactions/{first}/cancel"), json!({}))
        .await;
    assert_eq!(reply.status, 200);
    let second = app.isolate_action(&machines[1]).await;
    let all = watching
        .events_until(is("machineAction.created", &second))
        .await;
    let missed: Vec<_> = all
        .iter()
        .skip_while(|f| f.id.as_deref() != Some(&resume_from))
        .skip(1)
        .map(|f| (f.id.clone(), f.event.clone(), f.data.clone()))
        .collect();
    assert_eq!(missed.len(), 4, "{all:?}"); // completed, moved back, created, moved

    let mut resumed = open(&server, &app.token, Some(&resume_from)).await;
    let mut replayed = Vec::new();
    for _ in 0..missed.len() {
        let f = resumed.event().await;
        replayed.push((f.id, f.event, f.data));
    }
    assert_eq!(replayed, missed);
    // And it follows on live.
    let reply = app
        .post(&format!("/api/machineactions/{second}/cancel"), json!({}))
        .await;
    assert_eq!(reply.status, 200);
    let live = resumed
        .events_until(is("machineAction.completed", &second))
        .await;
    assert_eq!(
        kinds(&live),
        ["machine.isolationChanged", "machineAction.completed"]
    );

    // An id this server never gave, or one from another process.
    for unknown in ["bogus", "0123456789ab-3", &format!("{resume_from}9999")] {
        let mut stream = open(&server, &app.token, Some(unknown)).await;
        let first = stream.frame_within(Duration::from_secs(5)).await.unwrap();
        assert_eq!(first.event.as_deref(), Some("resync"), "{unknown}");
        assert_eq!(first.data.as_deref(), Some("{}"));
        assert!(first.id.is_some());
    }
    let metrics = server.server.state.metrics.encode();
    assert!(
        metrics.contains("cordon_event_resyncs_total 3"),
        "{metrics}"
    );
}

/// The id a fresh stream starts at (its first, id-only frame).
async fn position(server: &TestServer, token: &str) -> String {
    let mut stream = open(server, token, None).await;
    let first = stream.frame_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.event, None, "{first:?}");
    first.id.unwrap()
}

/// Event ids are the event log's: a stream resumes from an id given
/// before a restart, getting what happened before the restart after that
/// id and what happened since, no `resync`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_ids_survive_a_restart() {
    let server = TestServer::start().await;
    let machine = server.enroll("m1").await.machine_id();
    let mut app = server.api().await;
    let mut leaving = open(&server, &app.token, None).await;
    let first = app.isolate_action(&machine).await;
    leaving
        .events_until(is("machineAction.created", &first))
        .await;
    let resume_from = leaving.last_id.clone().unwrap();
    drop(leaving);
    // While it is away, before the restart.
    let reply = app
        .post(&format!("/api/machineactions/{first}/cancel"), json!({}))
        .await;
    assert_eq!(reply.status, 200);

    let TestServer {
        server: running,
        dir,
        ..
    } = server;
    running.stop();
    drop(running);
    let server = TestServer::start_in(dir, |_| {}).await;
    let mut app = server.api().await;
    let second = app.isolate_action(&machine).await;

    let mut resumed = open(&server, &app.token, Some(&resume_from)).await;
    let frames = resumed
        .events_until(is("machineAction.created", &second))
        .await;
    assert_eq!(
        kinds(&frames),
        [
            "machine.isolationChanged",
            "machineAction.completed",
            "machine.isolationChanged",
            "machineAction.created"
        ],
        "{frames:?}"
    );
    assert_eq!(frames[0].json()["data"]["isolationState"], "Isolating");
    assert_eq!(frames[1].json()["data"]["id"], first.as_str());
    assert_eq!(frames[1].json()["data"]["status"], "Cancelled");
    assert_eq!(frames[2].json()["data"]["isolationState"], "NotIsolated");
    // Numbered on from where the log was: the next id, then increasing.
    let ids: Vec<u64> = frames
        .iter()
        .map(|f| seq(f.id.as_deref().unwrap()))
        .collect();
    assert_eq!(ids[0], seq(&resume_from) + 1, "{ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    // And it follows on live.
    let reply = app
        .post(&format!("/api/machineactions/{second}/cancel"), json!({}))
        .await;
    assert_eq!(reply.status, 200);
    resumed
        .events_until(is("machineAction.completed", &second))
        .await;
}

/// A change made by another process on the same database (an admin
/// command: `cordon exclusion add`) is in the event log with its own id,
/// and reaches the open streams within a second or so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_by_another_process_reach_the_streams() {
    let server = TestServer::start().await;
    let admin = app_api(&server, "Admin", &["Machine.ReadWrite.All"]).await;
    let mut stream = open(&server, &admin.token, None).await;
    let start = stream.frame_within(Duration::from_secs(5)).await.unwrap();
    // The store as an admin command opens it.
    let other = server::open_store(&server.dir.0).unwrap();
    let fields = server::exclusions::new_rule(
        server::exclusions::parse_input(br#"{"Name": "Backups", "SystemdUnit": "restic.service"}"#)
            .unwrap(),
    )
    .unwrap();
    let rule = server::exclusions::create_rule(&other, fields)
        .await
        .unwrap();
    drop(other);
    let frame = tokio::time::timeout(
        Duration::from_secs(5),
        stream.events_until(|f| f.event.as_deref() == Some("exclusionRule.changed")),
    )
    .await
    .expect("the change arrives")
    .pop()
    .unwrap();
    let data = &frame.json()["data"];
    assert_eq!(data["id"], rule.id.as_str());
    assert_eq!(data["change"], "created");
    assert_eq!(data["rule"]["name"], "Backups");
    assert!(seq(frame.id.as_deref().unwrap()) > seq(start.id.as_deref().unwrap()));
}

/// A client that stops reading while thousands of events are written
/// falls behind the live channel; once it reads again it catches up from
/// the log: every event, in order, no `resync`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_falls_behind_catches_up_from_the_log() {
    const EVENTS: usize = 25_000;
    let server = TestServer::start_with(|c| c.event_replay_max = 1_000_000).await;
    let admin = app_api(&server, "Admin", &["Machine.ReadWrite.All"]).await;
    let mut stream = open(&server, &admin.token, None).await;
    stream.frame_within(Duration::from_secs(5)).await.unwrap();
    // Written while the client reads nothing: more than the socket
    // buffers and the live channel hold.
    let store = server.store().clone();
    let writes = (0..EVENTS).map(|n| {
        let store = store.clone();
        async move {
            store
                .append_audit(store::NewAuditEvent {
                    id: format!("flood-{n}"),
                    at: server::now_nanos(),
                    principal: "test".into(),
                    source_address: "local".into(),
                    request_id: String::new(),
                    method: "CLI".into(),
                    target: format!("record {n}"),
                    action: "test.flood".into(),
                    outcome: "Succeeded".into(),
                    status: 0,
                    detail: Some("x".repeat(200)),
                    count: 1,
                })
                .await
                .unwrap()
        }
    });
    futures_util::future::join_all(writes).await;
    let mut ids = Vec::new();
    let mut last = 0;
    while ids.len() < EVENTS {
        let frame = stream.event().await;
        assert_ne!(frame.event.as_deref(), Some("resync"));
        let seq = seq(frame.id.as_deref().unwrap());
        assert!(seq > last, "{seq} after {last}");
        last = seq;
        let data = frame.json()["data"].clone();
        if data["action"] == "test.flood" {
            ids.push(data["id"].as_str().unwrap().to_owned());
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), EVENTS);
    let metrics = server.server.state.metrics.encode();
    assert!(
        !metrics.contains("cordon_event_catchups_total 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cordon_event_resyncs_total 0"),
        "{metrics}"
    );
}

/// A `Last-Event-ID` whose next event is older than `--event-retention`
/// gets `resync`, whether or not the event was pruned yet; pruning
/// removes the events past their retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_older_than_the_retention_resyncs() {
    let server = TestServer::start_with(|c| c.event_retention = Duration::from_millis(1500)).await;
    let machine = server.enroll("m1").await.machine_id();
    let mut app = server.api().await;
    let before = position(&server, &app.token).await;
    let action = app.isolate_action(&machine).await;
    // Within the retention: replayed.
    let mut within = open(&server, &app.token, Some(&before)).await;
    let first = within.event().await;
    assert_eq!(first.event.as_deref(), Some("machineAction.created"));
    assert_eq!(first.json()["data"]["id"], action.as_str());

    tokio::time::sleep(Duration::from_millis(1600)).await;
    let mut stale = open(&server, &app.token, Some(&before)).await;
    let first = stale.frame_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.event.as_deref(), Some("resync"), "{first:?}");
    let resync_at = seq(first.id.as_deref().unwrap());
    assert!(resync_at > seq(&before));

    // Pruned: gone from the log, and still a resync.
    assert!(server::prune_events(&server.server.state).await.unwrap() >= 2);
    assert_eq!(server.store().event_count().await.unwrap(), 0);
    let mut pruned = open(&server, &app.token, Some(&before)).await;
    let first = pruned.frame_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.event.as_deref(), Some("resync"), "{first:?}");
    // From the resync's id, nothing was missed: the stream follows on.
    let mut after = open(&server, &app.token, Some(&resync_at.to_string())).await;
    let reply = app
        .post(&format!("/api/machineactions/{action}/cancel"), json!({}))
        .await;
    assert_eq!(reply.status, 200);
    let first = after.event().await;
    assert_eq!(first.event.as_deref(), Some("machineAction.completed"));
}

/// A `Last-Event-ID` further behind than the replay cap gets `resync`
/// instead of a replay of everything it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_over_the_cap_resyncs() {
    let server = TestServer::start_with(|c| c.event_replay_max = 3).await;
    let machines = [
        server.enroll("m1").await.machine_id(),
        server.enroll("m2").await.machine_id(),
    ];
    let mut app = server.api().await;
    let before = position(&server, &app.token).await;
    // Two events: created, isolating.
    app.isolate_action(&machines[0]).await;
    let mut stream = open(&server, &app.token, Some(&before)).await;
    let replayed = stream
        .events_until(|f| f.event.as_deref() == Some("machine.isolationChanged"))
        .await;
    assert_eq!(
        kinds(&replayed),
        ["machineAction.created", "machine.isolationChanged"]
    );
    // Two more: four behind, over the cap of three.
    let second = app.isolate_action(&machines[1]).await;
    let mut stream = open(&server, &app.token, Some(&before)).await;
    let first = stream.frame_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.event.as_deref(), Some("resync"), "{first:?}");
    // At the log's last event: what follows comes live.
    let reply = app
        .post(&format!("/api/machineactions/{second}/cancel"), json!({}))
        .await;
    assert_eq!(reply.status, 200);
    let next = stream.event().await;
    assert_eq!(next.event.as_deref(), Some("machineAction.completed"));
    assert_eq!(
        seq(next.id.as_deref().unwrap()),
        seq(first.id.as_deref().unwrap()) + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_need_a_valid_token_with_read() {
    let server = TestServer::start().await;
    let refused = open_at(&server, "/api/events", None, None).await.refused();
    assert_error(&refused, 401, "Unauthorized");
    let refused = open_at(&server, "/api/events", Some("not.a.token"), None)
        .await
        .refused();
    assert_error(&refused, 401, "Unauthorized");
    // Never a token in the query string.
    let token = server.token().await;
    let refused = open_at(
        &server,
        &format!("/api/events?access_token={token}"),
        None,
        None,
    )
    .await
    .refused();
    assert_error(&refused, 401, "Unauthorized");
    let isolate_only = app_api(&server, "Isolate only", &["Machine.Isolate"]).await;
    let refused = open_at(&server, "/api/events", Some(&isolate_only.token), None)
        .await
        .refused();
    assert_error(&refused, 403, "Forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_bounded_per_caller_and_in_all_and_a_closed_one_frees_its_slot() {
    let server = TestServer::start_with(|config| {
        config.event_streams = server::events::Limits {
            total: 3,
            per_caller: 2,
        };
    })
    .await;
    let app = server.api().await;
    let other = app_api(&server, "Other", &["Machine.Read.All"]).await;
    let first = open(&server, &app.token, None).await;
    let _second = open(&server, &app.token, None).await;
    let refused = open_at(&server, "/api/events", Some(&app.token), None)
        .await
        .refused();
    assert_error(&refused, 429, "TooManyRequests");
    assert!(refused.header("retry-after").is_some());
    // Another caller still gets one, up to the total.
    let _third = open(&server, &other.token, None).await;
    let refused = open_at(&server, "/api/events", Some(&other.token), None)
        .await
        .refused();
    assert_error(&refused, 429, "TooManyRequests");
    let metrics = server.server.state.metrics.encode();
    assert!(metrics.contains("cordon_event_streams 3"), "{metrics}");

    // A client that goes away gives its slot back at once.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match open_at(&server, "/api/events", Some(&app.token), None).await {
            Opened::Stream(_) => break,
            Opened::Refused(reply) => {
                assert_eq!(reply.status, 429);
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the slot was not freed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_audit_events_go_only_to_callers_allowed_them() {
    let server = TestServer::start().await;
    let machine = server.enroll("m1").await.machine_id();
    let mut admin = app_api(
        &server,
        "Admin",
        &["Machine.ReadWrite.All", "Machine.Isolate"],
    )
    .await;
    let viewer = app_api(&server, "Viewer", &["Machine.Read.All"]).await;
    let mut admins = open(&server, &admin.token, None).await;
    let mut viewers = open(&server, &viewer.token, None).await;

    let created = admin
        .post(
            "/api/isolationExclusionRules",
            json!({
                "Name": "SSH from the jump hosts",
                "SystemdUnit": "sshd.service",
                "Direction": "inbound",
                "RemoteAddresses": "198.18.0.5",
                "RemotePorts": [22],
            }),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let rule_id = created.json().unwrap()["id"].as_str().unwrap().to_owned();
    let deleted = admin
        .delete(&format!("/api/isolationExclusionRules/{rule_id}"))
        .await;
    assert_eq!(deleted.status, 204);
    let action_id = admin.isolate_action(&machine).await;

    let seen = admins
        .events_until(is("machineAction.created", &action_id))
        .await;
    let rules: Vec<Value> = seen
        .iter()
        .filter(|f| f.event.as_deref() == Some("exclusionRule.changed"))
        .map(|f| f.json()["data"].clone())
        .collect();
    assert_eq!(rules.len(), 2, "{seen:?}");
    assert_eq!(rules[0]["id"], rule_id.as_str());
    assert_eq!(rules[0]["change"], "created");
    assert_eq!(rules[0]["rule"]["name"], "SSH from the jump hosts");
    assert_eq!(rules[1]["change"], "deleted");
    assert_eq!(rules[1]["rule"], Value::Null);
    // Each state-changing call is audited, and the trail's readers see it.
    let audited: Vec<Value> = seen
        .iter()
        .filter(|f| f.event.as_deref() == Some("audit.appended"))
        .map(|f| f.json()["data"].clone())
        .collect();
    assert!(
        audited.iter().any(|a| a["method"] == "DELETE"
            && a["target"] == format!("/api/isolationExclusionRules/{rule_id}")),
        "{audited:?}"
    );
    let trail = admin.get("/api/auditEvents").await.json().unwrap();
    let listed = trail["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == audited[0]["id"])
        .cloned()
        .unwrap();
    assert_eq!(listed, audited[0]);

    // The viewer's first event is the action: nothing about rules or the trail.
    let first = viewers.event().await;
    assert_eq!(
        first.event.as_deref(),
        Some("machineAction.created"),
        "{first:?}"
    );
}

/// The trail names machines of every group: a user whose role may read it
/// but who reaches only some groups gets no `audit.appended` events (as
/// `GET /api/auditEvents` refuses them), and `/api/me` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_reaches_some_groups_gets_no_audit_events() {
    let server = TestServer::start().await;
    create_prefix_group(&server, "Finance", 1, "FIN-", "soc-eu").await;
    create_prefix_group(&server, "HR", 2, "hr-", "soc-hr").await;
    server
        .store()
        .create_role(store::RoleRecord {
            name: "EUAuditor".into(),
            permissions: vec!["View data".into(), "Manage portal system settings".into()],
            created_at: server::now_nanos(),
        })
        .await
        .unwrap();
    add_user(&server, "carol@example.com", "EUAuditor", &["soc-eu"]).await;
    let fin = server.enroll("FIN-01").await.machine_id();
    let hr = server.enroll("hr-01").await.machine_id();
    let mut carol = user_api(&server, "carol@example.com").await;
    let me = carol.get("/api/me").await.json().unwrap();
    assert_eq!(me["permissions"]["audit"], false, "{me}");
    assert_error(&carol.get("/api/auditEvents").await, 403, "Forbidden");
    let mut carols = open(&server, &carol.token, None).await;

    // Other groups' activity, written to the trail...
    let mut app = server.api().await;
    let hidden = app.isolate_action(&hr).await;
    let mut bad = Api {
        http: server.https(),
        token: "not-a-token".into(),
    };
    assert_eq!(bad.get("/api/machines").await.status, 401);
    // ...then one of her own group's, which she does see.
    let seen = app.isolate_action(&fin).await;
    let events = carols
        .events_until(is("machineAction.created", &seen))
        .await;
    assert!(
        events
            .iter()
            .all(|f| f.event.as_deref() != Some("audit.appended")),
        "{events:?}"
    );
    assert!(
        !events.iter().any(is("machineAction.created", &hidden)),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_outlives_the_connection_idle_timeout() {
    let server = TestServer::start_with(|config| {
        config.idle_timeout = Duration::from_millis(400);
    })
    .await;
    let machine = server.enroll("m1").await.machine_id();
    let mut app = server.api().await;
    let mut stream = open(&server, &app.token, None).await;
    // Five idle timeouts with nothing to say.
    assert!(stream.quiet_for(Duration::from_secs(2)).await.is_none());
    assert!(
        stream.keep_alives >= 3,
        "{} keep-alives",
        stream.keep_alives
    );
    let action_id = app.isolate_action(&machine).await;
    let created = stream.event().await;
    assert!(
        is("machineAction.created", &action_id)(&created),
        "{created:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_before_its_connection_reaches_its_lifetime() {
    let server = TestServer::start_with(|config| {
        config.max_connection_lifetime = Duration::from_millis(2500);
    })
    .await;
    let app = server.api().await;
    let mut stream = open(&server, &app.token, None).await;
    let started = tokio::time::Instant::now();
    while stream.frame_within(Duration::from_secs(10)).await.is_some() {}
    // Ended by the server (a clean end of the body), a second early.
    let lasted = started.elapsed();
    assert!(lasted >= Duration::from_millis(1000), "{lasted:?}");
    assert!(lasted < Duration::from_millis(2500), "{lasted:?}");
    // The slot is free again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        server.server.state.events.open_streams(&server.client_id),
        (0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_expires() {
    use base64::Engine;
    let server = TestServer::start().await;
    let token = server.token().await;
    let payload = token.split('.').nth(1).unwrap();
    let mut claims: proto::auth::Claims = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    claims.exp = server::unix_seconds() + 2;
    let short = server.server.state.signing_key().sign(&claims);
    let mut stream = open(&server, &short, None).await;
    let started = tokio::time::Instant::now();
    while stream.frame_within(Duration::from_secs(10)).await.is_some() {}
    let lasted = started.elapsed();
    assert!(lasted <= Duration::from_secs(3), "{lasted:?}");
    assert!(lasted >= Duration::from_millis(500), "{lasted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_follows_its_users_access_and_ends_when_read_is_lost() {
    let server = TestServer::start_with(|config| {
        config.event_recheck = Duration::from_millis(200);
    })
    .await;
    create_prefix_group(&server, "Finance", 1, "FIN-", "soc-eu").await;
    let fin = server.enroll("fin-ws-1").await.machine_id();
    let other = server.enroll("misc-1").await.machine_id();
    add_user(&server, "vera@example.com", "Viewer", &["soc-eu"]).await;
    let vera = user_api(&server, "vera@example.com").await;
    let mut app = server.api().await;
    let mut stream = open(&server, &vera.token, None).await;
    stream.frame_within(Duration::from_secs(5)).await.unwrap();

    // Out of soc-eu: Finance's machines leave her stream.
    let mut user = server
        .store()
        .get_user_by_upn("vera@example.com")
        .await
        .unwrap()
        .unwrap();
    server
        .store()
        .delete_user("vera@example.com")
        .await
        .unwrap();
    user.user_groups = Vec::new();
    server.store().create_user(user).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    app.isolate_action(&fin).await;
    let seen = app.isolate_action(&other).await;
    let first = stream.event().await;
    assert!(is("machineAction.created", &seen)(&first), "{first:?}");

    // Disabled: the stream ends.
    server
        .store()
        .set_user_disabled("vera@example.com", true)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    while stream.frame_within(Duration::from_secs(10)).await.is_some() {}
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_stream_counts_for_the_rate_limit() {
    let server = TestServer::start_with(|config| {
        config.rate_limit_per_minute = 2;
    })
    .await;
    let token = server.token().await;
    let _first = open(&server, &token, None).await;
    let _second = open(&server, &token, None).await;
    let refused = open_at(&server, "/api/events", Some(&token), None)
        .await
        .refused();
    let body = assert_error(&refused, 429, "TooManyRequests");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Rate limit is exceeded"),
        "{body}"
    );
}
