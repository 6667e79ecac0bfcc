//! People: users who sign in to the built-in authority (password grant,
//! authorization code with PKCE behind the sign-in page), what their roles
//! let them do, which machines their machine groups let them see, the
//! throttling and audit of failed sign-ins, and `cordon user|role|group`
//! run against a live server's data directory.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Output, Stdio};

use agent::Reply;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use http::Method;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const PASSWORD: &str = "correct horse battery";
const SCOPE: &str = "https://api.securitycenter.microsoft.com/.default";
const RESOURCE: &str = "https://api.securitycenter.microsoft.com";
const CONSOLE: &str = "cordon-console";
const REDIRECT: &str = "http://localhost:1234/cb";
const UNKNOWN_MACHINE: &str = "0123456789abcdef0123456789abcdef01234567";
const UNKNOWN_ACTION: &str = "00000000-0000-4000-8000-000000000000";
const DEFAULT_GROUP: &str = "Ungrouped devices (default)";

// ---- set-up -----------------------------------------------------------------

/// Creates a user with [`PASSWORD`]; returns their object id.
async fn add_user(server: &TestServer, upn: &str, role: &str, user_groups: &[&str]) -> String {
    create_user(server, upn, PASSWORD, role, user_groups).await
}

async fn add_role(server: &TestServer, name: &str, permissions: &[&str]) {
    server
        .store()
        .create_role(store::RoleRecord {
            name: name.into(),
            permissions: permissions.iter().map(|p| p.to_string()).collect(),
            created_at: server::now_nanos(),
        })
        .await
        .unwrap();
}

/// A group without rules (set them with struct update syntax).
fn group(name: &str, rank: i64, user_groups: &[&str]) -> store::NewGroup {
    store::NewGroup {
        name: name.into(),
        rank,
        match_tag: None,
        match_name_prefix: None,
        match_os: None,
        user_groups: user_groups.iter().map(|g| g.to_string()).collect(),
        now: server::now_nanos(),
    }
}

/// Creates a machine group; returns its id (`rbacGroupId`).
async fn add_group(server: &TestServer, new: store::NewGroup) -> i64 {
    server.store().create_group(new).await.unwrap().id
}

/// An API client of an app with every application permission.
async fn admin_app(server: &TestServer) -> Api {
    let (id, secret) = create_app(
        server.store(),
        "Settings admin",
        &["Machine.ReadWrite.All", "Machine.Isolate"],
    )
    .await;
    Api {
        http: server.https(),
        token: server.token_for(&id, &secret).await,
    }
}

/// The SSH exclusion rule of `exclusions.rs`, a valid body.
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

async fn tag(api: &mut Api, machine_id: &str, value: &str, action: &str) -> Reply {
    api.post(
        &format!("/api/machines/{machine_id}/tags"),
        json!({"Value": value, "Action": action}),
    )
    .await
}

async fn cancel(api: &mut Api, action_id: &str) -> Reply {
    api.post(
        &format!("/api/machineactions/{action_id}/cancel"),
        json!({"Comment": "not now"}),
    )
    .await
}

fn id_of(reply: &Reply) -> String {
    assert!(
        reply.status.is_success(),
        "{}: {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
    reply.json().unwrap()["id"].as_str().unwrap().to_owned()
}

/// The sorted `computerDnsName`s of a machine list.
fn names(reply: &Reply) -> Vec<String> {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let mut names: Vec<String> = reply.json().unwrap()["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["computerDnsName"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// The ids of a collection.
fn ids(reply: &Reply) -> Vec<String> {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    reply.json().unwrap()["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

fn text(reply: &Reply) -> String {
    String::from_utf8_lossy(&reply.body).into_owned()
}

// ---- the authority ----------------------------------------------------------

async fn post_form(server: &TestServer, path: &str, fields: &[(&str, &str)]) -> Reply {
    server
        .https()
        .request(
            Method::POST,
            path,
            &[("content-type", "application/x-www-form-urlencoded")],
            form(fields),
        )
        .await
        .unwrap()
}

fn token_v2(server: &TestServer) -> String {
    format!("/{}/oauth2/v2.0/token", server.tenant())
}

fn token_v1(server: &TestServer) -> String {
    format!("/{}/oauth2/token", server.tenant())
}

/// The v2 password grant for the console.
async fn password_grant(server: &TestServer, username: &str, password: &str) -> Reply {
    post_form(
        server,
        &token_v2(server),
        &[
            ("grant_type", "password"),
            ("client_id", CONSOLE),
            ("username", username),
            ("password", password),
            ("scope", SCOPE),
        ],
    )
    .await
}

fn access_token(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "{}", text(reply));
    reply.json().unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// An API client holding `upn`'s token from the password grant.
async fn sign_in(server: &TestServer, upn: &str) -> Api {
    Api {
        http: server.https(),
        token: access_token(&password_grant(server, upn, PASSWORD).await),
    }
}

/// The decoded payload of a JWT.
fn claims_of(token: &str) -> Value {
    serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap()
}

/// Asserts an RFC 6749 error and returns its body.
fn oauth_error(reply: &Reply, status: u16, error: &str) -> Value {
    assert_eq!(reply.status.as_u16(), status, "{}", text(reply));
    let body = reply.json().unwrap();
    assert_eq!(body["error"], error, "{body}");
    assert!(body["error_description"].is_string(), "{body}");
    body
}

/// A PKCE verifier and its S256 challenge.
fn pkce() -> (String, String) {
    let verifier = server::crypto::new_secret();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
    (verifier, URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

/// The parameters of an authorization request of the console.
fn authorize_fields<'a>(
    challenge: &'a str,
    redirect_uri: &'a str,
    state: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("client_id", CONSOLE),
        ("response_type", "code"),
        ("redirect_uri", redirect_uri),
        (
            "scope",
            "https://api.securitycenter.microsoft.com/.default openid",
        ),
        ("state", state),
        ("code_challenge", challenge),
        ("code_challenge_method", "S256"),
    ]
}

fn authorize_path(server: &TestServer) -> String {
    format!("/{}/oauth2/v2.0/authorize", server.tenant())
}

async fn authorize_get(server: &TestServer, fields: &[(&str, &str)]) -> Reply {
    let query = String::from_utf8(form(fields)).unwrap();
    server
        .https()
        .request(
            Method::GET,
            &format!("{}?{query}", authorize_path(server)),
            &[],
            Vec::new(),
        )
        .await
        .unwrap()
}

/// Posts the sign-in form: the request's parameters plus the credentials.
async fn authorize_post(
    server: &TestServer,
    fields: &[(&str, &str)],
    login: &str,
    passwd: &str,
) -> Reply {
    let mut all = fields.to_vec();
    all.push(("login", login));
    all.push(("passwd", passwd));
    post_form(server, &authorize_path(server), &all).await
}

/// Splits a redirect's `Location` into the URI before `?` and the query.
fn redirected(reply: &Reply) -> (String, HashMap<String, String>) {
    assert_eq!(reply.status, 303, "{}", text(reply));
    let location = reply.header("location").expect("a Location header");
    let (base, query) = location.split_once('?').expect("a query");
    let params = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    (base.to_owned(), params)
}

/// Signs `login` in on the sign-in page and returns the code.
async fn code_for(server: &TestServer, challenge: &str, login: &str) -> String {
    let fields = authorize_fields(challenge, REDIRECT, "xyz");
    let reply = authorize_post(server, &fields, login, PASSWORD).await;
    let (base, params) = redirected(&reply);
    assert_eq!(base, REDIRECT);
    assert_eq!(params["state"], "xyz");
    params["code"].clone()
}

async fn exchange(server: &TestServer, code: &str, verifier: &str) -> Reply {
    post_form(
        server,
        &token_v2(server),
        &[
            ("grant_type", "authorization_code"),
            ("client_id", CONSOLE),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
        ],
    )
    .await
}

fn assert_html_page(reply: &Reply) {
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{:?}",
        reply.headers
    );
    assert_eq!(reply.header("x-frame-options"), Some("DENY"));
}

// ---- the CLI ----------------------------------------------------------------

/// Runs `cordon <args> --data-dir <dir>`, with `stdin` on standard input.
async fn cordon(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("CORDON_DATA_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    child.wait_with_output().await.unwrap()
}

/// Runs a command that must succeed; returns its standard output.
async fn cordon_ok(dir: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let output = cordon(dir, args, stdin).await;
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs a command that must fail; returns its standard error.
async fn cordon_fails(dir: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let output = cordon(dir, args, stdin).await;
    assert!(
        !output.status.success(),
        "{args:?} should fail: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stderr).unwrap()
}

// ---- roles ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_built_in_role_allows_its_calls_and_refuses_the_others() {
    let server = TestServer::start().await;
    let machine = server.enroll("ws-1").await.machine_id();
    let mut app = server.api().await;
    let app_action = id_of(&app.isolate(&machine).await);
    for (upn, role) in [
        ("viewer@example.com", "Viewer"),
        ("responder@example.com", "Responder"),
        ("admin@example.com", "Administrator"),
    ] {
        add_user(&server, upn, role, &[]).await;
    }

    // Viewer: reads only.
    let mut viewer = sign_in(&server, "viewer@example.com").await;
    assert_eq!(names(&viewer.get("/api/machines").await), ["ws-1"]);
    assert_eq!(
        viewer.get(&format!("/api/machines/{machine}")).await.status,
        200
    );
    assert_eq!(viewer.get("/api/machines/ws-1").await.status, 200);
    assert_eq!(
        ids(&viewer.get("/api/machineactions").await),
        [app_action.as_str()]
    );
    assert_eq!(viewer.action(&app_action).await["status"], "Pending");
    let refused = assert_error(&viewer.isolate(&machine).await, 403, "Forbidden");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Active remediation actions"),
        "{refused}"
    );
    assert_error(&viewer.unisolate(&machine).await, 403, "Forbidden");
    assert_error(&cancel(&mut viewer, &app_action).await, 403, "Forbidden");
    // Permission is checked before existence.
    assert_error(&viewer.isolate(UNKNOWN_MACHINE).await, 403, "Forbidden");
    assert_error(&cancel(&mut viewer, UNKNOWN_ACTION).await, 403, "Forbidden");
    assert_error(
        &tag(&mut viewer, &machine, "x", "Add").await,
        403,
        "Forbidden",
    );
    assert_error(
        &viewer
            .post("/api/isolationExclusionRules", ssh_rule())
            .await,
        403,
        "Forbidden",
    );
    assert_error(
        &viewer.get("/api/isolationExclusionRules").await,
        403,
        "Forbidden",
    );
    assert_error(&viewer.get("/api/auditEvents").await, 403, "Forbidden");
    assert_eq!(app.action(&app_action).await["status"], "Pending");

    // Responder: reads and remediation, no settings.
    let mut responder = sign_in(&server, "responder@example.com").await;
    assert_eq!(names(&responder.get("/api/machines").await), ["ws-1"]);
    let cancelled = cancel(&mut responder, &app_action).await;
    assert_eq!(cancelled.status, 200, "{}", text(&cancelled));
    let cancelled = cancelled.json().unwrap();
    assert_eq!(cancelled["status"], "Cancelled");
    assert_eq!(cancelled["cancellationRequestor"], "responder@example.com");
    let created = responder.isolate(&machine).await;
    assert_eq!(created.status, 201, "{}", text(&created));
    let responder_action = id_of(&created);
    assert_eq!(
        created.json().unwrap()["requestor"],
        "responder@example.com"
    );
    let refused = assert_error(
        &tag(&mut responder, &machine, "x", "Add").await,
        403,
        "Forbidden",
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Manage security settings"),
        "{refused}"
    );
    assert_error(
        &responder
            .post("/api/isolationExclusionRules", ssh_rule())
            .await,
        403,
        "Forbidden",
    );
    assert_error(&responder.get("/api/auditEvents").await, 403, "Forbidden");

    // Administrator: everything.
    let mut admin = sign_in(&server, "admin@example.com").await;
    assert_eq!(names(&admin.get("/api/machines").await), ["ws-1"]);
    assert_eq!(cancel(&mut admin, &responder_action).await.status, 200);
    let created = admin.isolate(&machine).await;
    assert_eq!(created.status, 201, "{}", text(&created));
    assert_eq!(created.json().unwrap()["requestor"], "admin@example.com");
    let tagged = tag(&mut admin, &machine, "vip", "Add").await;
    assert_eq!(tagged.status, 200, "{}", text(&tagged));
    assert_eq!(tagged.json().unwrap()["machineTags"], json!(["vip"]));
    let rule = admin.post("/api/isolationExclusionRules", ssh_rule()).await;
    assert_eq!(rule.status, 201, "{}", text(&rule));
    assert_eq!(admin.get("/api/isolationExclusionRules").await.status, 200);
    let audit = admin.get("/api/auditEvents").await;
    assert_eq!(audit.status, 200, "{}", text(&audit));
    // The trail names the user who acted.
    let events = audit.json().unwrap();
    assert!(
        events["value"].as_array().unwrap().iter().any(|e| {
            e["action"] == "isolate"
                && e["status"] == 201
                && e["principal"]
                    .as_str()
                    .unwrap()
                    .contains("responder@example.com")
        }),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_role_grants_only_the_permissions_it_names() {
    let server = TestServer::start().await;
    add_group(
        &server,
        store::NewGroup {
            match_name_prefix: Some("sec-".into()),
            ..group("Secret", 1, &["vault"])
        },
    )
    .await;
    let ws = server.enroll("ws-1").await.machine_id();
    let secret = server.enroll("sec-1").await.machine_id();
    add_role(&server, "Auditor", &["Manage portal system settings"]).await;
    add_role(
        &server,
        "Tagger",
        &["View data", "Manage security settings"],
    )
    .await;
    add_user(&server, "auditor@example.com", "Auditor", &[]).await;
    add_user(&server, "tagger@example.com", "tagger", &["ops"]).await;

    // No View data: no reads, not even of the list.
    let mut auditor = sign_in(&server, "auditor@example.com").await;
    let refused = assert_error(&auditor.get("/api/machines").await, 403, "Forbidden");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("View data"),
        "{refused}"
    );
    assert_error(
        &auditor.get(&format!("/api/machines/{ws}")).await,
        403,
        "Forbidden",
    );
    assert_error(&auditor.get("/api/machineactions").await, 403, "Forbidden");
    assert_error(&auditor.isolate(&ws).await, 403, "Forbidden");
    // The trail names machines of every group: a custom role, limited to
    // some groups, may not read it even with the permission.
    let refused = assert_error(&auditor.get("/api/auditEvents").await, 403, "Forbidden");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("every machine group"),
        "{refused}"
    );

    // Settings within the user's machine groups; no remediation.
    let mut tagger = sign_in(&server, "tagger@example.com").await;
    assert_eq!(names(&tagger.get("/api/machines").await), ["ws-1"]);
    let tagged = tag(&mut tagger, &ws, "Reviewed", "Add").await;
    assert_eq!(tagged.status, 200, "{}", text(&tagged));
    assert_error(
        &tag(&mut tagger, &secret, "Reviewed", "Add").await,
        404,
        "ResourceNotFound",
    );
    let mut app = server.api().await;
    assert_eq!(app.machine(&secret).await["machineTags"], json!([]));
    assert_eq!(tagger.get("/api/isolationExclusionRules").await.status, 200);
    assert_error(&tagger.isolate(&ws).await, 403, "Forbidden");
    assert_error(&tagger.get("/api/auditEvents").await, 403, "Forbidden");
}

// ---- machine groups ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_see_and_act_on_the_machines_of_their_groups_only() {
    let server = TestServer::start().await;
    let finance = add_group(
        &server,
        store::NewGroup {
            match_name_prefix: Some("FIN-".into()),
            ..group("Finance", 1, &["SOC-EU"])
        },
    )
    .await;
    let hr = add_group(
        &server,
        store::NewGroup {
            match_name_prefix: Some("hr-".into()),
            ..group("HR", 2, &["soc-hr"])
        },
    )
    .await;
    let lab = add_group(
        &server,
        store::NewGroup {
            match_name_prefix: Some("lab-".into()),
            match_os: Some("linux".into()),
            ..group("Lab", 3, &[])
        },
    )
    .await;
    let fin_machine = server.enroll("fin-ws-1").await.machine_id();
    let hr_machine = server.enroll("hr-ws-1").await.machine_id();
    server.enroll("lab-1").await;
    server.enroll("misc-1").await;
    add_user(&server, "alice@example.com", "Responder", &["soc-eu"]).await;
    add_user(&server, "bob@example.com", "Viewer", &[]).await;
    add_user(&server, "carol@example.com", "Administrator", &[]).await;

    let mut app = server.api().await;
    let hr_action = id_of(&app.isolate(&hr_machine).await);
    let machine = app.machine(&fin_machine).await;
    assert_eq!(machine["rbacGroupId"], finance);
    assert_eq!(machine["rbacGroupName"], "Finance");
    assert_eq!(app.machine(&hr_machine).await["rbacGroupId"], hr);
    assert_eq!(app.machine("lab-1").await["rbacGroupId"], lab);
    let misc = app.machine("misc-1").await;
    assert_eq!(misc["rbacGroupId"], 0);
    assert_eq!(misc["rbacGroupName"], DEFAULT_GROUP);

    // Alice (user group soc-eu, any case) reaches Finance, the open Lab
    // group and the default group.
    let mut alice = sign_in(&server, "alice@example.com").await;
    let mine = ["fin-ws-1", "lab-1", "misc-1"];
    assert_eq!(names(&alice.get("/api/machines").await), mine);
    let counted = alice.get("/api/machines?$count=true").await;
    assert_eq!(counted.json().unwrap()["@odata.count"], 3);
    let filtered = alice
        .get(&format!(
            "/api/machines?$count=true&$filter=rbacGroupId%20eq%20{hr}"
        ))
        .await;
    assert_eq!(names(&filtered), Vec::<String>::new());
    assert_eq!(filtered.json().unwrap()["@odata.count"], 0);
    let filtered = alice
        .get("/api/machines?$count=true&$filter=startswith(computerDnsName,'hr-')%20or%20startswith(computerDnsName,'fin-')")
        .await;
    assert_eq!(names(&filtered), ["fin-ws-1"]);
    assert_eq!(filtered.json().unwrap()["@odata.count"], 1);
    // Paging yields the same machines, each once.
    let mut paged = Vec::new();
    let mut next = Some("/api/machines?pageSize=1".to_owned());
    while let Some(path) = next {
        let page = alice.get(&path).await;
        assert_eq!(page.status, 200, "{}", text(&page));
        let body = page.json().unwrap();
        assert!(body["value"].as_array().unwrap().len() <= 1, "{body}");
        paged.extend(names(&page));
        next = body["@odata.nextLink"].as_str().map(|link| {
            let at = link.find("/api/").unwrap();
            link[at..].to_owned()
        });
    }
    paged.sort();
    assert_eq!(paged, mine);

    // HR's machine is as good as unknown to her, by id and by name.
    for path in [
        format!("/api/machines/{hr_machine}"),
        format!("/api/machines/{}", hr_machine.to_uppercase()),
        "/api/machines/hr-ws-1".to_owned(),
        "/api/machines/HR-WS-1".to_owned(),
        format!("/api/machines/{UNKNOWN_MACHINE}"),
        "/api/machines/nobody-1".to_owned(),
    ] {
        assert_error(&alice.get(&path).await, 404, "ResourceNotFound");
    }
    assert_eq!(alice.get("/api/machines/fin-ws-1").await.status, 200);
    assert_eq!(alice.get("/api/machines/LAB-1").await.status, 200);
    assert_error(&alice.isolate(&hr_machine).await, 404, "ResourceNotFound");
    assert_error(&alice.unisolate(&hr_machine).await, 404, "ResourceNotFound");
    for path in [
        format!("/api/machineactions/{hr_action}"),
        format!("/api/machineactions/{UNKNOWN_ACTION}"),
    ] {
        assert_error(&alice.get(&path).await, 404, "ResourceNotFound");
    }
    assert_error(
        &cancel(&mut alice, &hr_action).await,
        404,
        "ResourceNotFound",
    );
    assert_eq!(app.action(&hr_action).await["status"], "Pending");

    // Her own action on her machine is hers to see; HR's is not listed.
    let own = id_of(&alice.isolate(&fin_machine).await);
    assert_eq!(alice.action(&own).await["requestor"], "alice@example.com");
    assert_eq!(ids(&alice.get("/api/machineactions").await), [own.as_str()]);
    let counted = alice.get("/api/machineactions?$count=true").await;
    assert_eq!(counted.json().unwrap()["@odata.count"], 1);
    let filtered = alice
        .get(&format!(
            "/api/machineactions?$filter=machineId%20eq%20'{hr_machine}'"
        ))
        .await;
    assert_eq!(ids(&filtered), Vec::<String>::new());

    // Bob is in no user group: the open group and the default group.
    let mut bob = sign_in(&server, "bob@example.com").await;
    assert_eq!(names(&bob.get("/api/machines").await), ["lab-1", "misc-1"]);
    assert_error(
        &bob.get("/api/machines/fin-ws-1").await,
        404,
        "ResourceNotFound",
    );
    assert_eq!(
        ids(&bob.get("/api/machineactions").await),
        Vec::<String>::new()
    );

    // The administrator and the application see everything.
    let all = ["fin-ws-1", "hr-ws-1", "lab-1", "misc-1"];
    let mut carol = sign_in(&server, "carol@example.com").await;
    assert_eq!(names(&carol.get("/api/machines").await), all);
    assert_eq!(carol.action(&hr_action).await["machineId"], hr_machine);
    assert_eq!(ids(&carol.get("/api/machineactions").await).len(), 2);
    assert_eq!(names(&app.get("/api/machines").await), all);
    assert_eq!(ids(&app.get("/api/machineactions").await).len(), 2);
    let cancelled = cancel(&mut carol, &hr_action).await;
    assert_eq!(cancelled.status, 200, "{}", text(&cancelled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagging_a_machine_moves_it_between_groups_and_scope_follows() {
    let server = TestServer::start().await;
    let finance = add_group(
        &server,
        store::NewGroup {
            match_tag: Some("finance".into()),
            ..group("Finance", 1, &["fin"])
        },
    )
    .await;
    let machine = server.enroll("ws-1").await.machine_id();
    add_user(&server, "hannah@example.com", "Responder", &["hr"]).await;
    add_user(&server, "frank@example.com", "Viewer", &["fin"]).await;
    let mut admin = admin_app(&server).await;
    let mut hannah = sign_in(&server, "hannah@example.com").await;
    let mut frank = sign_in(&server, "frank@example.com").await;

    // In the default group: everyone sees it.
    assert_eq!(names(&hannah.get("/api/machines").await), ["ws-1"]);
    assert_eq!(names(&frank.get("/api/machines").await), ["ws-1"]);
    let action = id_of(&hannah.isolate(&machine).await);

    // Tagged Finance (any case): now in Finance, out of Hannah's reach.
    let tagged = tag(&mut admin, &machine, "FINANCE", "Add").await;
    assert_eq!(tagged.status, 200, "{}", text(&tagged));
    let tagged = tagged.json().unwrap();
    assert_eq!(tagged["rbacGroupId"], finance);
    assert_eq!(tagged["rbacGroupName"], "Finance");
    assert_eq!(
        names(&hannah.get("/api/machines").await),
        Vec::<String>::new()
    );
    assert_error(
        &hannah.get("/api/machines/ws-1").await,
        404,
        "ResourceNotFound",
    );
    assert_error(
        &hannah.get(&format!("/api/machineactions/{action}")).await,
        404,
        "ResourceNotFound",
    );
    assert_eq!(
        ids(&hannah.get("/api/machineactions").await),
        Vec::<String>::new()
    );
    assert_error(&cancel(&mut hannah, &action).await, 404, "ResourceNotFound");
    assert_eq!(admin.action(&action).await["status"], "Pending");
    assert_eq!(names(&frank.get("/api/machines").await), ["ws-1"]);
    assert_eq!(frank.action(&action).await["status"], "Pending");

    // Of two machines of one name, a lookup by name finds the one in reach.
    let twin = server.enroll("ws-1").await.machine_id();
    assert_eq!(admin.machine("ws-1").await["id"], twin);
    assert_eq!(hannah.machine("ws-1").await["id"], twin);
    assert_eq!(frank.machine("ws-1").await["id"], twin);
    tag(&mut admin, &twin, "finance", "Add").await;
    assert_eq!(frank.machine("ws-1").await["id"], twin);
    assert_error(
        &hannah.get("/api/machines/ws-1").await,
        404,
        "ResourceNotFound",
    );
    tag(&mut admin, &twin, "finance", "Remove").await;
    tag(&mut admin, &machine, "FINANCE", "Remove").await;
    assert_eq!(hannah.machine("ws-1").await["id"], twin);
    tag(&mut admin, &twin, "finance", "Add").await;
    assert_eq!(hannah.machine("ws-1").await["id"], machine);
    tag(&mut admin, &twin, "finance", "Remove").await;
    tag(&mut admin, &machine, "FINANCE", "Add").await;

    // Untagged: back in the default group, and in reach again.
    let untagged = tag(&mut admin, &machine, "FINANCE", "Remove").await;
    assert_eq!(untagged.status, 200, "{}", text(&untagged));
    assert_eq!(untagged.json().unwrap()["rbacGroupName"], DEFAULT_GROUP);
    assert_eq!(names(&hannah.get("/api/machines").await), ["ws-1", "ws-1"]);
    assert_eq!(
        ids(&hannah.get("/api/machineactions").await),
        [action.as_str()]
    );
    let cancelled = cancel(&mut hannah, &action).await;
    assert_eq!(cancelled.status, 200, "{}", text(&cancelled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_made_with_the_cli_rank_machines_while_the_server_runs() {
    let server = TestServer::start().await;
    let dir = server.dir.0.clone();
    let fin = server.enroll("fin-1").await.machine_id();
    let other = server.enroll("x-1").await.machine_id();
    add_user(&server, "olga@example.com", "Viewer", &["ops"]).await;
    let mut app = server.api().await;
    let mut olga = sign_in(&server, "olga@example.com").await;

    cordon_ok(
        &dir,
        &[
            "group",
            "create",
            "--name",
            "Linux fleet",
            "--rank",
            "1",
            "--match-os",
            "LINUX",
            "--user-group",
            "ops",
        ],
        None,
    )
    .await;
    assert_eq!(app.machine(&fin).await["rbacGroupName"], "Linux fleet");
    assert_eq!(app.machine(&other).await["rbacGroupName"], "Linux fleet");
    assert_eq!(names(&olga.get("/api/machines").await), ["fin-1", "x-1"]);

    // A group created at rank 1 pushes the others down and takes its
    // machines at once.
    cordon_ok(
        &dir,
        &[
            "group",
            "create",
            "--name",
            "Finance",
            "--rank",
            "1",
            "--match-name-prefix",
            "FIN-",
            "--user-group",
            "fin",
        ],
        None,
    )
    .await;
    assert_eq!(app.machine(&fin).await["rbacGroupName"], "Finance");
    assert_eq!(app.machine(&other).await["rbacGroupName"], "Linux fleet");
    assert_eq!(names(&olga.get("/api/machines").await), ["x-1"]);
    assert_error(
        &olga.get(&format!("/api/machines/{fin}")).await,
        404,
        "ResourceNotFound",
    );

    let ranks = |listed: &str| -> Vec<(String, Value)> {
        serde_json::from_str::<Value>(listed)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|g| (g["name"].as_str().unwrap().to_owned(), g["rank"].clone()))
            .collect()
    };
    let expected = vec![
        ("Finance".to_owned(), json!(1)),
        ("Linux fleet".to_owned(), json!(2)),
        (DEFAULT_GROUP.to_owned(), Value::Null),
    ];
    let listed = cordon_ok(&dir, &["group", "list", "--json"], None).await;
    assert_eq!(ranks(&listed), expected);

    // A name taken (in any case) is refused and changes nothing.
    cordon_fails(
        &dir,
        &[
            "group",
            "create",
            "--name",
            "fINANCE",
            "--rank",
            "1",
            "--match-tag",
            "t",
        ],
        None,
    )
    .await;
    cordon_fails(
        &dir,
        &[
            "group",
            "create",
            "--name",
            DEFAULT_GROUP,
            "--rank",
            "1",
            "--match-tag",
            "t",
        ],
        None,
    )
    .await;
    let listed = cordon_ok(&dir, &["group", "list", "--json"], None).await;
    assert_eq!(ranks(&listed), expected);
    assert_eq!(app.machine(&fin).await["rbacGroupName"], "Finance");

    // A rank past the end appends; rank 0 and a group without rules are refused.
    cordon_ok(
        &dir,
        &[
            "group",
            "create",
            "--name",
            "Tagged",
            "--rank",
            "9",
            "--match-tag",
            "t",
        ],
        None,
    )
    .await;
    cordon_fails(
        &dir,
        &[
            "group",
            "create",
            "--name",
            "Zero",
            "--rank",
            "0",
            "--match-tag",
            "t",
        ],
        None,
    )
    .await;
    cordon_fails(
        &dir,
        &["group", "create", "--name", "Empty", "--rank", "1"],
        None,
    )
    .await;
    let listed = cordon_ok(&dir, &["group", "list", "--json"], None).await;
    let mut appended = expected.clone();
    appended.insert(2, ("Tagged".to_owned(), json!(3)));
    assert_eq!(ranks(&listed), appended);

    // Deleting a group hands its machines to the next match.
    cordon_ok(&dir, &["group", "delete", "--name", "finance"], None).await;
    assert_eq!(app.machine(&fin).await["rbacGroupName"], "Linux fleet");
    assert_eq!(names(&olga.get("/api/machines").await), ["fin-1", "x-1"]);
    cordon_fails(&dir, &["group", "delete", "--name", "Finance"], None).await;
}

// ---- the password grant -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_grant_gives_a_user_token_the_api_accepts() {
    let server = TestServer::start().await;
    server.enroll("ws-1").await;
    let alice = add_user(&server, "alice@example.com", "Responder", &["soc"]).await;

    let reply = password_grant(&server, "alice@example.com", PASSWORD).await;
    let body = reply.json().unwrap();
    assert_eq!(body["token_type"], "Bearer", "{body}");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    let token = access_token(&reply);
    let claims = claims_of(&token);
    assert_eq!(claims["upn"], "alice@example.com");
    assert_eq!(claims["name"], "Display alice@example.com");
    assert_eq!(claims["oid"], alice);
    assert_eq!(
        claims["scp"],
        "Machine.Read Machine.ReadWrite Machine.Isolate"
    );
    assert_eq!(claims["appid"], CONSOLE);
    assert_eq!(claims["aud"], RESOURCE);
    assert_eq!(claims["tid"], server.tenant());
    assert_eq!(claims["ver"], "2.0");
    assert!(claims.get("roles").is_none_or(Value::is_null), "{claims}");
    let mut api = Api {
        http: server.https(),
        token,
    };
    assert_eq!(names(&api.get("/api/machines").await), ["ws-1"]);

    // v1, for a registered application (a public client: no secret), and
    // the sign-in name in another case.
    let reply = post_form(
        &server,
        &token_v1(&server),
        &[
            ("grant_type", "password"),
            ("client_id", &server.client_id),
            ("username", "ALICE@Example.com"),
            ("password", PASSWORD),
            ("resource", RESOURCE),
        ],
    )
    .await;
    let token = access_token(&reply);
    let claims = claims_of(&token);
    assert_eq!(claims["upn"], "alice@example.com");
    assert_eq!(claims["appid"], server.client_id);
    assert_eq!(claims["ver"], "1.0");
    let mut api = Api {
        http: server.https(),
        token,
    };
    let machine = api_machine_id(&mut api).await;
    let created = api.isolate(&machine).await;
    assert_eq!(created.status, 201, "{}", text(&created));
    assert_eq!(created.json().unwrap()["requestor"], "alice@example.com");

    // A registered application's secret, when sent, must be right.
    let reply = post_form(
        &server,
        &token_v2(&server),
        &[
            ("grant_type", "password"),
            ("client_id", &server.client_id),
            ("client_secret", "wrong"),
            ("username", "alice@example.com"),
            ("password", PASSWORD),
            ("scope", SCOPE),
        ],
    )
    .await;
    oauth_error(&reply, 401, "invalid_client");

    // A token asking for less than the role allows gets only that.
    let reply = post_form(
        &server,
        &token_v2(&server),
        &[
            ("grant_type", "password"),
            ("client_id", CONSOLE),
            ("username", "alice@example.com"),
            ("password", PASSWORD),
            ("scope", "Machine.Read openid"),
        ],
    )
    .await;
    let token = access_token(&reply);
    assert_eq!(claims_of(&token)["scp"], "Machine.Read");
    let mut reader = Api {
        http: server.https(),
        token,
    };
    assert_eq!(names(&reader.get("/api/machines").await), ["ws-1"]);
    let refused = assert_error(&reader.unisolate(&machine).await, 403, "Forbidden");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Machine.Isolate"),
        "{refused}"
    );
    for scope in ["openid profile", "https://graph.microsoft.com/.default"] {
        let reply = post_form(
            &server,
            &token_v2(&server),
            &[
                ("grant_type", "password"),
                ("client_id", CONSOLE),
                ("username", "alice@example.com"),
                ("password", PASSWORD),
                ("scope", scope),
            ],
        )
        .await;
        oauth_error(&reply, 400, "invalid_scope");
    }

    // A user token for an application dies with the application.
    server.store().delete_app(&server.client_id).await.unwrap();
    assert_error(&api.get("/api/machines").await, 401, "Unauthorized");
    assert_eq!(names(&reader.get("/api/machines").await), ["ws-1"]);

    // A wrong password and an unknown account look the same.
    let wrong = password_grant(&server, "alice@example.com", "not the password").await;
    let unknown = password_grant(&server, "nobody@example.com", PASSWORD).await;
    let wrong_body = oauth_error(&wrong, 400, "invalid_grant");
    let unknown_body = oauth_error(&unknown, 400, "invalid_grant");
    assert_eq!(wrong_body, unknown_body);
    assert!(wrong.header("retry-after").is_none());
}

/// The id of the one machine `api` sees.
async fn api_machine_id(api: &mut Api) -> String {
    let reply = api.get("/api/machines").await;
    ids(&reply).remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_failed_sign_ins_lock_the_account_even_against_the_right_password() {
    let server = TestServer::start().await;
    add_user(&server, "alice@example.com", "Viewer", &[]).await;
    add_user(&server, "bob@example.com", "Viewer", &[]).await;

    // Failures count against the account whatever the case of its name.
    for name in [
        "alice@example.com",
        "ALICE@example.com",
        "alice@example.com",
        " Alice@Example.com ",
        "alice@example.com",
    ] {
        let reply = password_grant(&server, name, "wrong password").await;
        oauth_error(&reply, 400, "invalid_grant");
    }
    let locked = password_grant(&server, "alice@example.com", PASSWORD).await;
    let body = oauth_error(&locked, 429, "invalid_grant");
    let wait: u64 = locked
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains(&wait.to_string()),
        "{body}"
    );
    // The sign-in page shares the lock-out.
    let (_, challenge) = pkce();
    let fields = authorize_fields(&challenge, REDIRECT, "xyz");
    let page = authorize_post(&server, &fields, "alice@example.com", PASSWORD).await;
    assert_eq!(page.status, 429, "{}", text(&page));
    assert!(page.header("retry-after").is_some());
    assert!(page.header("location").is_none());

    // Another account is not affected.
    access_token(&password_grant(&server, "bob@example.com", PASSWORD).await);

    // An unknown account is throttled the same way.
    for _ in 0..5 {
        let reply = password_grant(&server, "ghost@example.com", PASSWORD).await;
        oauth_error(&reply, 400, "invalid_grant");
    }
    let reply = password_grant(&server, "ghost@example.com", PASSWORD).await;
    oauth_error(&reply, 429, "invalid_grant");
    assert!(reply.header("retry-after").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_sign_in_clears_the_failures_of_the_account() {
    let server = TestServer::start_with(|config| config.signin_failures_per_user = 3).await;
    add_user(&server, "alice@example.com", "Viewer", &[]).await;
    for _ in 0..2 {
        for _ in 0..2 {
            let reply = password_grant(&server, "alice@example.com", "wrong password").await;
            oauth_error(&reply, 400, "invalid_grant");
        }
        access_token(&password_grant(&server, "alice@example.com", PASSWORD).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_across_accounts_lock_the_source_address() {
    let server = TestServer::start_with(|config| {
        config.signin_failures_per_user = 100;
        config.signin_failures_per_source = 3;
    })
    .await;
    add_user(&server, "alice@example.com", "Viewer", &[]).await;
    for n in 0..3 {
        let reply = password_grant(&server, &format!("guess{n}@example.com"), "x-password").await;
        oauth_error(&reply, 400, "invalid_grant");
    }
    let reply = password_grant(&server, "alice@example.com", PASSWORD).await;
    oauth_error(&reply, 429, "invalid_grant");
    assert!(reply.header("retry-after").is_some());
}

// ---- the authorization code flow --------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sign_in_page_and_pkce_code_exchange_work_end_to_end() {
    let server = TestServer::start().await;
    server.enroll("ws-1").await;
    add_user(&server, "alice@example.com", "Viewer", &[]).await;
    let (verifier, challenge) = pkce();
    let fields = authorize_fields(&challenge, REDIRECT, "xyz");

    let page = authorize_get(&server, &fields).await;
    assert_eq!(page.status, 200, "{}", text(&page));
    assert_html_page(&page);
    let html = text(&page);
    assert!(html.contains("name=\"login\""), "{html}");
    assert!(html.contains("name=\"passwd\""), "{html}");
    assert!(html.contains(&format!("value=\"{challenge}\"")), "{html}");
    assert!(html.contains("value=\"xyz\""), "{html}");

    // A wrong password: the form again, with no redirect.
    let refused = authorize_post(&server, &fields, "alice@example.com", "wrong password").await;
    assert_eq!(refused.status, 401, "{}", text(&refused));
    assert_html_page(&refused);
    assert!(refused.header("location").is_none());
    assert!(text(&refused).contains("name=\"passwd\""));

    // The right one: back to the client with a code and the state.
    let code = code_for(&server, &challenge, "alice@example.com").await;
    let reply = exchange(&server, &code, &verifier).await;
    let token = access_token(&reply);
    let claims = claims_of(&token);
    assert_eq!(claims["upn"], "alice@example.com");
    assert_eq!(claims["appid"], CONSOLE);
    assert_eq!(
        claims["scp"],
        "Machine.Read Machine.ReadWrite Machine.Isolate"
    );
    let mut api = Api {
        http: server.https(),
        token,
    };
    assert_eq!(names(&api.get("/api/machines").await), ["ws-1"]);
    // A code works once.
    oauth_error(
        &exchange(&server, &code, &verifier).await,
        400,
        "invalid_grant",
    );

    // A wrong verifier spends the code too.
    let code = code_for(&server, &challenge, "alice@example.com").await;
    let (other_verifier, _) = pkce();
    oauth_error(
        &exchange(&server, &code, &other_verifier).await,
        400,
        "invalid_grant",
    );
    oauth_error(
        &exchange(&server, &code, &verifier).await,
        400,
        "invalid_grant",
    );

    // Another redirect URI than the one signed in for is refused.
    let code = code_for(&server, &challenge, "alice@example.com").await;
    let reply = post_form(
        &server,
        &token_v2(&server),
        &[
            ("grant_type", "authorization_code"),
            ("client_id", CONSOLE),
            ("code", &code),
            ("redirect_uri", "http://localhost:1234/other"),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    oauth_error(&reply, 400, "invalid_grant");

    // So is another client than the one signed in for.
    let code = code_for(&server, &challenge, "alice@example.com").await;
    let reply = post_form(
        &server,
        &token_v2(&server),
        &[
            ("grant_type", "authorization_code"),
            ("client_id", &server.client_id),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    oauth_error(&reply, 400, "invalid_grant");

    // A made-up code is refused.
    oauth_error(
        &exchange(&server, "not-a-code", &verifier).await,
        400,
        "invalid_grant",
    );

    // The v1 endpoints take a resource instead of a scope.
    let v1_fields = [
        ("client_id", CONSOLE),
        ("response_type", "code"),
        ("redirect_uri", REDIRECT),
        ("resource", RESOURCE),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let mut v1_form = v1_fields.to_vec();
    v1_form.push(("login", "alice@example.com"));
    v1_form.push(("passwd", PASSWORD));
    let reply = post_form(
        &server,
        &format!("/{}/oauth2/authorize", server.tenant()),
        &v1_form,
    )
    .await;
    let (_, params) = redirected(&reply);
    let reply = post_form(
        &server,
        &token_v1(&server),
        &[
            ("grant_type", "authorization_code"),
            ("client_id", CONSOLE),
            ("code", &params["code"]),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    let claims = claims_of(&access_token(&reply));
    assert_eq!(claims["ver"], "1.0");
    assert_eq!(claims["aud"], RESOURCE);
    assert_eq!(claims["upn"], "alice@example.com");

    // A loopback address on any port is a fine redirect URI.
    let loopback = authorize_fields(&challenge, "http://127.0.0.1:5555/done", "s2");
    let reply = authorize_post(&server, &loopback, "alice@example.com", PASSWORD).await;
    let (base, params) = redirected(&reply);
    assert_eq!(base, "http://127.0.0.1:5555/done");
    assert_eq!(params["state"], "s2");
    assert!(params.contains_key("code"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sign_in_page_refuses_foreign_redirects_missing_pkce_and_script() {
    let server = TestServer::start().await;
    add_user(&server, "alice@example.com", "Viewer", &[]).await;
    let (_, challenge) = pkce();

    // A redirect URI elsewhere: an error page, never a redirect, not even
    // with the right password.
    for evil in [
        "https://evil.example/cb",
        "http://localhost.evil.example/cb",
        "http://localhost@evil.example/cb",
    ] {
        let fields = authorize_fields(&challenge, evil, "xyz");
        let page = authorize_get(&server, &fields).await;
        assert_eq!(page.status, 400, "{evil}: {}", text(&page));
        assert_html_page(&page);
        assert!(page.header("location").is_none());
        assert!(!text(&page).contains("name=\"passwd\""), "{evil}");
        let posted = authorize_post(&server, &fields, "alice@example.com", PASSWORD).await;
        assert_eq!(posted.status, 400, "{evil}: {}", text(&posted));
        assert!(posted.header("location").is_none(), "{evil}");
    }

    // Without PKCE: back to the client with an error, and no code.
    let mut fields = authorize_fields(&challenge, REDIRECT, "xyz");
    fields.retain(|(name, _)| !name.starts_with("code_challenge"));
    let (base, params) = redirected(&authorize_get(&server, &fields).await);
    assert_eq!(base, REDIRECT);
    assert_eq!(params["error"], "invalid_request");
    assert_eq!(params["state"], "xyz");
    let reply = authorize_post(&server, &fields, "alice@example.com", PASSWORD).await;
    let (_, params) = redirected(&reply);
    assert_eq!(params["error"], "invalid_request");
    assert!(!params.contains_key("code"));

    // Other flows than the code flow, and scopes of no API, go back as errors.
    let mut implicit = authorize_fields(&challenge, REDIRECT, "xyz");
    implicit[1] = ("response_type", "token");
    let (_, params) = redirected(&authorize_get(&server, &implicit).await);
    assert_eq!(params["error"], "unsupported_response_type");
    let mut openid_only = authorize_fields(&challenge, REDIRECT, "xyz");
    openid_only[3] = ("scope", "openid profile");
    let (_, params) = redirected(&authorize_get(&server, &openid_only).await);
    assert_eq!(params["error"], "invalid_scope");
    assert_eq!(params["state"], "xyz");

    // The state goes back as it came, and can't smuggle in a code.
    let fields = authorize_fields(
        &challenge,
        "http://localhost:1234/cb?tab=1",
        "a&code=forged",
    );
    let reply = authorize_post(&server, &fields, "alice@example.com", PASSWORD).await;
    let (base, params) = redirected(&reply);
    assert_eq!(base, "http://localhost:1234/cb");
    assert_eq!(params["tab"], "1");
    assert_eq!(params["state"], "a&code=forged");
    assert_ne!(params["code"], "forged");

    // Reflected values are escaped.
    let script = "\"><script>alert(1)</script>";
    let fields = authorize_fields(&challenge, REDIRECT, script);
    let page = authorize_get(&server, &fields).await;
    assert_eq!(page.status, 200, "{}", text(&page));
    let html = text(&page);
    assert!(!html.contains("\"><script>"), "{html}");
    assert!(!html.contains("<script"), "{html}");
    assert!(html.contains("&quot;&gt;&lt;script&gt;"), "{html}");
    let login = "<img src=x onerror=alert(1)>";
    let refused = authorize_post(&server, &fields, login, "wrong password").await;
    assert_eq!(refused.status, 401, "{}", text(&refused));
    let html = text(&refused);
    assert!(!html.contains("<img"), "{html}");
    assert!(!html.contains("<script"), "{html}");
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{html}"
    );
    let mut hinted = authorize_fields(&challenge, REDIRECT, "xyz");
    hinted.push(("login_hint", "\"><script>alert(2)</script>"));
    let html = text(&authorize_get(&server, &hinted).await);
    assert!(!html.contains("<script"), "{html}");
    assert!(html.contains("&quot;&gt;&lt;script&gt;alert(2)"), "{html}");
    // Even the name of a repeated parameter, on the error page.
    let mut repeated = authorize_fields(&challenge, REDIRECT, "xyz");
    repeated.push(("<script>x", "1"));
    repeated.push(("<script>x", "2"));
    let page = authorize_get(&server, &repeated).await;
    assert_eq!(page.status, 400, "{}", text(&page));
    assert_html_page(&page);
    assert!(!text(&page).contains("<script"), "{}", text(&page));
}

/// Under a public URL with a path, a redirect URI that climbs out of it with
/// `..` (raw or `%2e%2e`), or merely starts with the same letters, gets the
/// error page: no sign-in form, and never a redirect, not even for an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_that_climb_out_of_the_public_path_are_refused() {
    let public = "https://cordon.example.com:28450/cordon";
    let server = TestServer::start_with(|config| config.public_url = Some(public.into())).await;
    add_user(&server, "alice@example.com", "Viewer", &[]).await;
    let (_, challenge) = pkce();

    let inside = format!("{public}/cb");
    let page = authorize_get(&server, &authorize_fields(&challenge, &inside, "xyz")).await;
    assert_eq!(page.status, 200, "{}", text(&page));
    assert!(text(&page).contains("name=\"passwd\""));

    for evil in [
        format!("{public}/../evil"),
        format!("{public}/%2e%2e/evil"),
        format!("{public}/%2E%2E/evil"),
        format!("{public}/cb/./../../evil"),
        format!("{public}%2f..%2fevil"),
        format!("{public}x/cb"),
    ] {
        let fields = authorize_fields(&challenge, &evil, "xyz");
        let page = authorize_get(&server, &fields).await;
        assert_eq!(page.status, 400, "{evil}: {}", text(&page));
        assert_html_page(&page);
        assert!(page.header("location").is_none(), "{evil}");
        assert!(!text(&page).contains("name=\"passwd\""), "{evil}");
        // An error that would otherwise go back to the client.
        let mut no_pkce = fields.clone();
        no_pkce.retain(|(name, _)| !name.starts_with("code_challenge"));
        let page = authorize_get(&server, &no_pkce).await;
        assert_eq!(page.status, 400, "{evil}: {}", text(&page));
        assert!(page.header("location").is_none(), "{evil}");
        let posted = authorize_post(&server, &fields, "alice@example.com", PASSWORD).await;
        assert_eq!(posted.status, 400, "{evil}: {}", text(&posted));
        assert!(posted.header("location").is_none(), "{evil}");
    }
}

// ---- users who leave --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_and_deleted_users_lose_access_at_once() {
    let server = TestServer::start().await;
    let dir = server.dir.0.clone();
    add_user(&server, "alice@example.com", "Responder", &[]).await;
    add_user(&server, "bob@example.com", "Viewer", &[]).await;
    add_user(&server, "carol@example.com", "Viewer", &[]).await;
    let mut alice = sign_in(&server, "alice@example.com").await;
    let mut bob = sign_in(&server, "bob@example.com").await;
    assert_eq!(alice.get("/api/machines").await.status, 200);
    assert_eq!(bob.get("/api/machines").await.status, 200);
    let wrong_password = password_grant(&server, "alice@example.com", "wrong password").await;
    let wrong_password = oauth_error(&wrong_password, 400, "invalid_grant");

    cordon_ok(
        &dir,
        &["user", "disable", "--name", "alice@example.com"],
        None,
    )
    .await;
    let reply = alice.get("/api/machines").await;
    assert_error(&reply, 401, "Unauthorized");
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    assert_error(&alice.isolate(UNKNOWN_MACHINE).await, 401, "Unauthorized");
    // A disabled account can't sign in, and says no more than a wrong password.
    let reply = password_grant(&server, "alice@example.com", PASSWORD).await;
    assert_eq!(oauth_error(&reply, 400, "invalid_grant"), wrong_password);
    let users: Value =
        serde_json::from_str(&cordon_ok(&dir, &["user", "list", "--json"], None).await).unwrap();
    let listed = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "alice@example.com")
        .unwrap();
    assert_eq!(listed["disabled"], true);

    cordon_ok(
        &dir,
        &["user", "enable", "--name", "alice@example.com"],
        None,
    )
    .await;
    let mut alice = sign_in(&server, "alice@example.com").await;
    assert_eq!(alice.get("/api/machines").await.status, 200);

    cordon_ok(&dir, &["user", "delete", "--name", "bob@example.com"], None).await;
    assert_error(&bob.get("/api/machines").await, 401, "Unauthorized");
    let reply = password_grant(&server, "bob@example.com", PASSWORD).await;
    oauth_error(&reply, 400, "invalid_grant");
    cordon_fails(&dir, &["user", "delete", "--name", "bob@example.com"], None).await;
    // A new user of the same name is someone else: the old token stays dead.
    add_user(&server, "bob@example.com", "Viewer", &[]).await;
    assert_error(&bob.get("/api/machines").await, 401, "Unauthorized");
    let mut new_bob = sign_in(&server, "bob@example.com").await;
    assert_eq!(new_bob.get("/api/machines").await.status, 200);

    // A code issued before the user was disabled can't be exchanged after.
    let (verifier, challenge) = pkce();
    let code = code_for(&server, &challenge, "carol@example.com").await;
    server
        .store()
        .set_user_disabled("carol@example.com", true)
        .await
        .unwrap();
    oauth_error(
        &exchange(&server, &code, &verifier).await,
        400,
        "invalid_grant",
    );
}

// ---- the CLI ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_roles_and_users_who_then_sign_in() {
    let server = TestServer::start().await;
    let dir = server.dir.0.clone();
    let machine = server.enroll("ws-1").await.machine_id();

    cordon_ok(
        &dir,
        &[
            "role",
            "create",
            "--name",
            "Tier 1",
            "--permission",
            "view-data",
            "--permission",
            "Active remediation actions",
        ],
        None,
    )
    .await;
    // Names are taken without regard to case, built-in ones included.
    for (name, why) in [
        ("viewer", "built-in"),
        ("ADMINISTRATOR", "built-in"),
        ("tier 1", "already exists"),
        (" Tier 1 ", "already exists"),
    ] {
        let stderr = cordon_fails(
            &dir,
            &[
                "role",
                "create",
                "--name",
                name,
                "--permission",
                "View data",
            ],
            None,
        )
        .await;
        assert!(stderr.contains(why), "{name}: {stderr}");
    }
    cordon_fails(
        &dir,
        &[
            "role",
            "create",
            "--name",
            "Root",
            "--permission",
            "Everything",
        ],
        None,
    )
    .await;
    let roles: Value =
        serde_json::from_str(&cordon_ok(&dir, &["role", "list", "--json"], None).await).unwrap();
    let roles = roles.as_array().unwrap();
    let names: Vec<&str> = roles.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Viewer", "Responder", "Administrator", "Tier 1"]);
    assert_eq!(
        roles[3]["permissions"],
        json!(["View data", "Active remediation actions"])
    );
    assert_eq!(roles[3]["builtIn"], false);

    // Users: an unknown role, a short password or a taken name fail.
    let stderr = cordon_fails(
        &dir,
        &[
            "user",
            "create",
            "--name",
            "mallory@example.com",
            "--role",
            "Owner",
            "--password-stdin",
        ],
        Some("long enough password\n"),
    )
    .await;
    assert!(stderr.contains("no role named 'Owner'"), "{stderr}");
    cordon_fails(
        &dir,
        &[
            "user",
            "create",
            "--name",
            "mallory@example.com",
            "--role",
            "Viewer",
            "--password-stdin",
        ],
        Some("short\n"),
    )
    .await;
    let users = cordon_ok(&dir, &["user", "list", "--json"], None).await;
    assert_eq!(serde_json::from_str::<Value>(&users).unwrap(), json!([]));

    let created = cordon_ok(
        &dir,
        &[
            "user",
            "create",
            "--name",
            "eve@example.com",
            "--role",
            "tier 1",
            "--user-group",
            "soc",
            "--password-stdin",
            "--json",
        ],
        Some("eve's own password\n"),
    )
    .await;
    let created: Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["role"], "Tier 1");
    assert!(created.get("password").is_none(), "{created}");
    cordon_fails(
        &dir,
        &[
            "user",
            "create",
            "--name",
            "EVE@example.com",
            "--role",
            "Viewer",
            "--password-stdin",
        ],
        Some("long enough password\n"),
    )
    .await;

    // Eve signs in with the password she gave and acts within her role.
    let reply = password_grant(&server, "eve@example.com", "eve's own password").await;
    let token = access_token(&reply);
    let claims = claims_of(&token);
    assert_eq!(claims["upn"], "eve@example.com");
    assert_eq!(claims["oid"], created["id"]);
    let mut eve = Api {
        http: server.https(),
        token,
    };
    assert_eq!(eve.isolate(&machine).await.status, 201);
    assert_error(&eve.get("/api/auditEvents").await, 403, "Forbidden");

    assert_eq!(claims["name"], "eve@example.com");

    // Without --password-stdin a password is generated and shown once.
    let created = cordon_ok(
        &dir,
        &[
            "user",
            "create",
            "--name",
            "gen@example.com",
            "--role",
            "Viewer",
            "--json",
        ],
        None,
    )
    .await;
    let created: Value = serde_json::from_str(&created).unwrap();
    let generated = created["password"].as_str().unwrap();
    assert!(generated.len() >= 8, "{created}");
    access_token(&password_grant(&server, "gen@example.com", generated).await);
    cordon_fails(
        &dir,
        &["user", "create", "--name", "two words", "--role", "Viewer"],
        None,
    )
    .await;

    // A held role can't be deleted.
    cordon_fails(&dir, &["role", "delete", "--name", "Tier 1"], None).await;
    cordon_fails(&dir, &["role", "delete", "--name", "Viewer"], None).await;

    // A new password replaces the old one.
    cordon_ok(
        &dir,
        &[
            "user",
            "set-password",
            "--name",
            "eve@example.com",
            "--password-stdin",
        ],
        Some("a brand new password\n"),
    )
    .await;
    oauth_error(
        &password_grant(&server, "eve@example.com", "eve's own password").await,
        400,
        "invalid_grant",
    );
    access_token(&password_grant(&server, "eve@example.com", "a brand new password").await);

    // Once no one holds it, the role can go.
    cordon_ok(&dir, &["user", "delete", "--name", "eve@example.com"], None).await;
    cordon_ok(&dir, &["role", "delete", "--name", "tier 1"], None).await;
}

// ---- audit ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sign_ins_are_recorded_in_the_audit_trail() {
    let server = TestServer::start_with(|config| {
        config.signin_failures_per_user = 2;
        // Repeated refusals from one source are folded into one counted
        // record written when the window ends: short here, so it shows.
        config.audit_fold_window = std::time::Duration::from_millis(200);
    })
    .await;
    add_user(&server, "alice@example.com", "Viewer", &[]).await;
    add_user(&server, "bob@example.com", "Viewer", &[]).await;

    let wrong = password_grant(&server, "alice@example.com", "wrong password").await;
    oauth_error(&wrong, 400, "invalid_grant");
    let unknown = password_grant(&server, "ghost@example.com", "wrong password").await;
    oauth_error(&unknown, 400, "invalid_grant");
    let wrong = password_grant(&server, "alice@example.com", "wrong password").await;
    oauth_error(&wrong, 400, "invalid_grant");
    let locked = password_grant(&server, "alice@example.com", PASSWORD).await;
    oauth_error(&locked, 429, "invalid_grant");
    access_token(&password_grant(&server, "bob@example.com", PASSWORD).await);

    let (_, challenge) = pkce();
    let fields = authorize_fields(&challenge, REDIRECT, "xyz");
    let page = authorize_post(&server, &fields, "bob@example.com", "wrong password").await;
    assert_eq!(page.status, 401);
    code_for(&server, &challenge, "bob@example.com").await;

    let mut admin = admin_app(&server).await;
    // Alice's second failure, from the same address within the window, is
    // folded: its record (count 1) is written when the window ends.
    let expected: Vec<(String, String, String, i64, i64)> = [
        ("signin", "user bob@example.com", "Refused", 401, 1),
        ("signin", "user bob@example.com", "Succeeded", 303, 1),
        ("token", "user alice@example.com", "Failed", 400, 1),
        ("token", "user alice@example.com", "Failed", 400, 1),
        ("token", "user alice@example.com", "Refused", 429, 1),
        ("token", "user ghost@example.com", "Failed", 400, 1),
    ]
    .iter()
    .map(|(a, p, o, s, c)| (a.to_string(), p.to_string(), o.to_string(), *s, *c))
    .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let reply = admin.get("/api/auditEvents?$orderby=dateTimeUtc").await;
        assert_eq!(reply.status, 200, "{}", text(&reply));
        let mut events: Vec<(String, String, String, i64, i64)> = reply.json().unwrap()["value"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "token" || e["action"] == "signin")
            .map(|e| {
                (
                    e["action"].as_str().unwrap().to_owned(),
                    e["principal"].as_str().unwrap().to_owned(),
                    e["outcome"].as_str().unwrap().to_owned(),
                    e["status"].as_i64().unwrap(),
                    e["count"].as_i64().unwrap(),
                )
            })
            .collect();
        events.sort();
        if events == expected || std::time::Instant::now() > deadline {
            assert_eq!(events, expected);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `response_mode=form_post`: the code comes back in a form the browser
/// posts to the redirect URI, and exchanges like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_post_answer_carries_a_code_that_exchanges_for_a_token() {
    let server = TestServer::start().await;
    add_user(&server, "fay@example.com", "Viewer", &[]).await;
    let (verifier, challenge) = pkce();
    let mut fields = authorize_fields(&challenge, REDIRECT, "st&<ate>");
    fields.push(("response_mode", "form_post"));
    let reply = authorize_post(&server, &fields, "fay@example.com", PASSWORD).await;
    assert_eq!(reply.status, 200, "{}", text(&reply));
    assert!(reply.header("location").is_none());
    let page = text(&reply);
    assert!(page.contains(&format!("action=\"{REDIRECT}\"")), "{page}");
    assert!(page.contains("value=\"st&amp;&lt;ate&gt;\""), "{page}");
    let code = page
        .split("name=\"code\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a code field")
        .to_owned();
    let reply = exchange(&server, &code, &verifier).await;
    assert_eq!(reply.status, 200, "{}", text(&reply));
    assert_eq!(claims_of(&access_token(&reply))["upn"], "fay@example.com");

    // An unsupported mode is refused back to the client, in the query.
    let mut fields = authorize_fields(&challenge, REDIRECT, "s");
    fields.push(("response_mode", "fragment"));
    let reply = authorize_get(&server, &fields).await;
    let (_, params) = redirected(&reply);
    assert_eq!(params["error"], "invalid_request");
}

/// Guesses sent all at once get no more tries than guesses one after
/// another: attempts in flight count against the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_simultaneous_guesses_gets_no_more_tries_than_the_limit() {
    let server = std::sync::Arc::new(TestServer::start().await);
    add_user(&server, "gus@example.com", "Viewer", &[]).await;
    let mut guesses = Vec::new();
    for n in 0..20 {
        let server = server.clone();
        guesses.push(tokio::spawn(async move {
            password_grant(&server, "gus@example.com", &format!("guess number {n}"))
                .await
                .status
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for guess in guesses {
        statuses.push(guess.await.unwrap());
    }
    let checked = statuses.iter().filter(|s| **s == 400).count();
    assert!(checked <= 5, "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        20 - checked,
        "{statuses:?}"
    );
    // And the account is locked now, even against the right password.
    assert_eq!(
        password_grant(&server, "gus@example.com", PASSWORD)
            .await
            .status,
        429
    );
}

/// Admin commands that change something are in the audit trail too: who
/// ran them, what they changed, never a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_are_recorded_in_the_audit_trail() {
    let server = TestServer::start().await;
    let dir = server.dir.0.clone();
    cordon_ok(
        &dir,
        &[
            "user",
            "create",
            "--name",
            "ivy@example.com",
            "--role",
            "Viewer",
            "--password-stdin",
        ],
        Some("ivy's long password\n"),
    )
    .await;
    cordon_ok(
        &dir,
        &[
            "group",
            "create",
            "--name",
            "Labs",
            "--rank",
            "1",
            "--match-tag",
            "lab",
        ],
        None,
    )
    .await;
    // The name may also be given without --name.
    cordon_ok(&dir, &["user", "disable", "ivy@example.com"], None).await;
    // A command that fails changes nothing and records nothing.
    cordon_fails(&dir, &["user", "delete"], None).await;
    cordon_fails(&dir, &["user", "delete", "--name", "a@x", "b@x"], None).await;
    cordon_fails(
        &dir,
        &["user", "delete", "--name", "nobody@example.com"],
        None,
    )
    .await;

    let mut admin = admin_app(&server).await;
    let reply = admin
        .get("/api/auditEvents?$filter=startswith(principal,'cli%20')")
        .await;
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let events = reply.json().unwrap()["value"].as_array().unwrap().clone();
    let seen: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            assert_eq!(e["method"], "CLI", "{e}");
            assert_eq!(e["outcome"], "Succeeded", "{e}");
            assert_eq!(e["sourceAddress"], "local", "{e}");
            (
                e["action"].as_str().unwrap().to_owned(),
                e["target"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("user.create".to_owned(), "ivy@example.com".to_owned()),
            ("group.create".to_owned(), "Labs".to_owned()),
            ("user.disable".to_owned(), "ivy@example.com".to_owned()),
        ]
    );
    assert!(!reply.body.windows(8).any(|w| w == b"long pas"));
    // And the chain still verifies.
    cordon_ok(&dir, &["audit", "verify"], None).await;
}
