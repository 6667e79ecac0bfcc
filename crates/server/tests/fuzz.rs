//! Property-based fuzzing of what a stranger or an agent can feed the
//! server: the `$filter` parser, request bodies, agent protocol frames and
//! bearer tokens. Inputs come from structured generators (well-formed input
//! first, then mutated), so most cases get past the first check and reach the
//! code behind it.
//!
//! Each target runs `CORDON_FUZZ_CASES` cases (default: a short run fit for
//! every `cargo test`); SECURITY.md gives the figures of a long run:
//! `CORDON_FUZZ_CASES=20000 cargo test --release -p server --test fuzz`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agent::Reply;
use common::{Api, TestServer, assert_error};
use http::Method;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use proto::agent::{AgentMessage, Enforced, HostAddress, HostFacts};
use proto::auth::{Claims, JwtHeader};
use serde_json::{Value, json};
use server::jwt::SigningKey;
use server::odata;
use tokio::sync::Mutex;

/// How many cases each target runs: `CORDON_FUZZ_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("CORDON_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runner(default_cases: u32) -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases: cases(default_cases),
        // The runner shrinks a failure to a small input and the assertion
        // prints it; nothing is written into the source tree.
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------- $filter

/// A string literal: any text, with `'` doubled as OData wants.
fn literal() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ._-]{0,12}",
        "\\PC{0,8}",
        Just("O'Brien".to_owned()),
        Just(String::new()),
    ]
    .prop_map(|text| format!("'{}'", text.replace('\'', "''")))
}

fn datetime() -> impl Strategy<Value = String> {
    (
        1971i32..2200,
        1u32..13,
        1u32..29,
        0u32..24,
        0u32..60,
        0u32..60,
        0u32..10_000_000,
    )
        .prop_map(|(y, mo, d, h, mi, s, frac)| {
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{frac:07}Z")
        })
}

fn comparison() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["eq", "ne", "gt", "ge", "lt", "le"])
}

/// One predicate on a Machine field, of the right type for the field.
fn machine_predicate() -> impl Strategy<Value = String> {
    let text_field = prop::sample::select(vec![
        "computerDnsName",
        "lastIpAddress",
        "healthStatus",
        "osPlatform",
        "onboardingStatus",
        "isolationState",
        "isolationScope",
    ]);
    let time_field = prop::sample::select(vec!["lastSeen", "firstSeen"]);
    prop_oneof![
        (
            text_field.clone(),
            prop::sample::select(vec!["eq", "ne"]),
            literal()
        )
            .prop_map(|(f, op, v)| format!("{f} {op} {v}")),
        (time_field, comparison(), datetime()).prop_map(|(f, op, v)| format!("{f} {op} {v}")),
        (comparison(), 0i64..100_000).prop_map(|(op, v)| format!("rbacGroupId {op} {v}")),
        (text_field.clone(), prop::collection::vec(literal(), 1..6))
            .prop_map(|(f, vs)| format!("{f} in ({})", vs.join(","))),
        (text_field, literal()).prop_map(|(f, v)| format!("startswith({f},{v})")),
        prop::collection::vec(literal(), 1..8).prop_map(|vs| {
            let terms: Vec<String> = vs.iter().map(|v| format!("t eq {v}")).collect();
            format!("machineTags/any(t: {})", terms.join(" or "))
        }),
    ]
}

/// A well-formed `$filter`: predicates joined by and/or, negated and
/// parenthesised, a few levels deep.
fn machine_filter() -> impl Strategy<Value = String> {
    machine_predicate().prop_recursive(4, 24, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a} and {b}")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a} or {b}")),
            inner.clone().prop_map(|a| format!("not ({a})")),
            inner.prop_map(|a| format!("({a})")),
        ]
    })
}

/// A well-formed `$filter`, then damaged: cut, spliced with OData tokens and
/// stray characters, or with a piece repeated.
fn damaged_filter() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "(",
        ")",
        "'",
        "''",
        " and ",
        " or ",
        "not ",
        ",",
        "/",
        ":",
        "any(",
        "t",
        " eq ",
        "null",
        "true",
        "-",
        "9999999999999999999999",
        "2026-13-45T99:99:99Z",
        "\u{0}",
        "\u{feff}",
        "%",
        "$",
        "in (",
        "startswith(",
    ]);
    (
        machine_filter(),
        prop::collection::vec((any::<prop::sample::Index>(), token), 1..5),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(filter, splices, cut, truncate)| {
            let mut text = filter;
            for (at, piece) in splices {
                let at = floor_char_boundary(&text, at.index(text.len() + 1));
                text.insert_str(at, piece);
            }
            if truncate {
                let at = floor_char_boundary(&text, cut.index(text.len() + 1));
                text.truncate(at);
            }
            text
        })
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn query_string(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

#[test]
fn well_formed_filters_parse_and_damaged_ones_are_refused_with_a_short_message() {
    let mut runner = runner(2_000);
    runner
        .run(&machine_filter(), |filter| {
            let query = query_string(&[("$filter", &filter)]);
            let parsed = odata::parse(
                Some(&query),
                odata::MACHINE_FIELDS,
                odata::MACHINE_PROPERTIES,
            );
            prop_assert!(parsed.is_ok(), "{filter:?}: {:?}", parsed.err());
            Ok(())
        })
        .unwrap();
    runner
        .run(
            &(damaged_filter(), prop::option::of("[$a-zA-Z]{1,10}")),
            |(filter, extra)| {
                let mut pairs = vec![("$filter", filter.as_str())];
                if let Some(name) = &extra {
                    pairs.push((name.as_str(), "1"));
                }
                let query = query_string(&pairs);
                // Must not panic; a refusal names the problem briefly.
                if let Err(message) = odata::parse(
                    Some(&query),
                    odata::MACHINE_FIELDS,
                    odata::MACHINE_PROPERTIES,
                ) {
                    prop_assert!(!message.is_empty());
                    prop_assert!(message.len() <= 300, "{} bytes: {message}", message.len());
                }
                Ok(())
            },
        )
        .unwrap();
}

/// Answers in the contract's format: 200, or 400 `ODataError`; never 500.
fn check_list_reply(reply: &Reply, filter: &str) -> Result<(), TestCaseError> {
    match reply.status.as_u16() {
        200 => {
            let body = reply
                .json()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(body["value"].is_array(), "{filter:?}: {body}");
        }
        400 => {
            assert_error(reply, 400, "ODataError");
        }
        other => prop_assert!(
            false,
            "{filter:?}: {other} {}",
            String::from_utf8_lossy(&reply.body)
        ),
    }
    Ok(())
}

#[test]
fn filters_reach_the_database_and_never_make_the_server_fail() {
    let rt = runtime();
    let server = rt.block_on(TestServer::start());
    let api = Mutex::new(rt.block_on(async {
        for name in ["alpha", "beta", "gamma.example.com"] {
            server.enroll(name).await;
        }
        server.api().await
    }));
    let mut runner = runner(150);
    runner
        .run(&machine_filter(), |filter| {
            rt.block_on(async {
                let path = format!(
                    "/api/machines?{}",
                    query_string(&[("$filter", &filter), ("$count", "true")])
                );
                let reply = api.lock().await.get(&path).await;
                prop_assert_eq!(
                    reply.status.as_u16(),
                    200,
                    "{:?}: {}",
                    filter,
                    String::from_utf8_lossy(&reply.body)
                );
                Ok(())
            })
        })
        .unwrap();
    runner
        .run(&damaged_filter(), |filter| {
            rt.block_on(async {
                let path = format!("/api/machines?{}", query_string(&[("$filter", &filter)]));
                let reply = api.lock().await.get(&path).await;
                check_list_reply(&reply, &filter)
            })
        })
        .unwrap();
    // Still serving after all of it.
    rt.block_on(async {
        assert_eq!(api.lock().await.get("/api/machines").await.status, 200);
    });
}

// ---------------------------------------------------------- request bodies

/// Any JSON value, small.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
        "[a-zA-Z]{4000,4100}".prop_map(Value::from),
        prop::sample::select(vec![
            "Full",
            "selective",
            "FULL",
            "Add",
            "Remove",
            "Inbound",
            "Both",
            "/usr/bin/curl",
            "sshd.service",
            "198.18.0.0/15",
            "22,80-90",
            "0",
            "65536"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[A-Za-z]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The body of one of the write calls: its own field names with values of
/// any type, other keys, sometimes a key written twice, sometimes not an
/// object or not JSON at all.
fn request_body() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "Comment",
        "IsolationType",
        "ExternalId",
        "Title",
        "Value",
        "Action",
        "Name",
        "Description",
        "ExecutablePath",
        "SystemdUnit",
        "Direction",
        "RemoteAddresses",
        "RemotePorts",
        "comment",
        "",
        "__proto__",
    ]);
    let object = prop::collection::vec((key, json_value()), 0..6).prop_map(|fields| {
        let members: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", Value::from(*k)))
            .collect();
        format!("{{{}}}", members.join(","))
    });
    prop_oneof![
        6 => object,
        1 => json_value().prop_map(|v| v.to_string()),
        1 => "\\PC{0,40}",
        1 => prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

async fn action_count(api: &mut Api) -> u64 {
    let reply = api.get("/api/machineactions?$count=true&$top=0").await;
    assert_eq!(reply.status, 200);
    reply.json().unwrap()["@odata.count"].as_u64().unwrap()
}

async fn snapshot(api: &mut Api, machine_id: &str) -> (u64, Value, Value) {
    let rules = api
        .get("/api/isolationExclusionRules")
        .await
        .json()
        .unwrap();
    let mut machine = api.machine(machine_id).await;
    // Liveness changes with time, not with request bodies.
    let fields = machine.as_object_mut().unwrap();
    fields.remove("lastSeen");
    fields.remove("healthStatus");
    (action_count(api).await, rules["value"].clone(), machine)
}

#[test]
fn request_bodies_are_answered_in_the_contract_format_and_refused_ones_change_nothing() {
    let rt = runtime();
    let server = rt.block_on(TestServer::start());
    let (api, machine_id, action_id) = rt.block_on(async {
        let agent = server.enroll("fuzzed").await;
        let (client_id, secret) = common::create_app(
            server.store(),
            "Fuzzer",
            &[
                "Machine.Isolate",
                "Machine.Read.All",
                "Machine.ReadWrite.All",
            ],
        )
        .await;
        let token = server.token_for(&client_id, &secret).await;
        let mut api = Api {
            http: server.https(),
            token,
        };
        let reply = api.isolate(&agent.machine_id()).await;
        assert_eq!(reply.status, 201);
        let action_id = reply.json().unwrap()["id"].as_str().unwrap().to_owned();
        (Mutex::new(api), agent.machine_id(), action_id)
    });
    let targets = vec![
        (Method::POST, format!("/api/machines/{machine_id}/isolate")),
        (
            Method::POST,
            format!("/api/machines/{machine_id}/unisolate"),
        ),
        (
            Method::POST,
            format!("/api/machineactions/{action_id}/cancel"),
        ),
        (Method::POST, format!("/api/machines/{machine_id}/tags")),
        (Method::POST, "/api/isolationExclusionRules".to_owned()),
    ];
    let strategy = (prop::sample::select(targets), request_body());
    runner(200)
        .run(&strategy, |((method, path), body)| {
            rt.block_on(async {
                let mut api = api.lock().await;
                let before = snapshot(&mut api, &machine_id).await;
                let reply = api
                    .send(method, &path, "application/json", body.clone().into_bytes())
                    .await;
                let status = reply.status.as_u16();
                let text = &body;
                prop_assert!(
                    matches!(status, 200 | 201 | 400 | 409 | 413),
                    "{path} {text:?}: {status} {}",
                    String::from_utf8_lossy(&reply.body)
                );
                if status >= 400 {
                    // The contract's error body, with the request id as target.
                    let error = reply
                        .json()
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let code = error["error"]["code"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    assert_error(&reply, status, &code);
                    let after = snapshot(&mut api, &machine_id).await;
                    prop_assert_eq!(&before, &after, "{} {:?} changed something", path, text);
                }
                Ok(())
            })
        })
        .unwrap();
}

// ----------------------------------------------------- agent protocol frames

fn address() -> impl Strategy<Value = HostAddress> {
    (
        prop_oneof![
            "\\PC{0,20}",
            "198\\.18\\.[0-9]{1,3}\\.[0-9]{1,3}",
            Just("fd00::1".to_owned())
        ],
        prop::option::of("\\PC{0,20}"),
    )
        .prop_map(|(ip_address, mac_address)| HostAddress {
            ip_address,
            mac_address,
            interface_type: None,
            operational_status: None,
        })
}

fn host_facts() -> impl Strategy<Value = HostFacts> {
    (
        "\\PC{0,40}",
        prop::collection::vec(address(), 0..6),
        "\\PC{0,20}",
    )
        .prop_map(|(name, addresses, os_version)| {
            let mut facts = agent::host_facts(Some("fuzzed"));
            facts.computer_dns_name = name;
            facts.addresses = addresses;
            facts.os_version = Some(os_version);
            facts
        })
}

fn enforced() -> impl Strategy<Value = Enforced> {
    prop_oneof![
        Just(Enforced::NotIsolated),
        Just(Enforced::Full),
        Just(Enforced::Selective),
    ]
}

/// One frame an agent (or someone holding its key) might send: messages of
/// the protocol with hostile values, messages naming another machine's
/// action (`others_action`), and lines that are not messages at all.
fn agent_frame(others_action: String) -> impl Strategy<Value = Vec<u8>> {
    let action_id = prop_oneof![
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "\\PC{0,40}",
        Just(others_action),
    ];
    let message = prop_oneof![
        action_id
            .clone()
            .prop_map(|action_id| AgentMessage::Ack { action_id }),
        (
            action_id,
            any::<bool>(),
            any::<i64>(),
            prop::option::of("\\PC{0,200}"),
            enforced()
        )
            .prop_map(|(action_id, succeeded, error_h_result, reason, enforced)| {
                AgentMessage::Result {
                    action_id,
                    succeeded,
                    error_h_result,
                    reason,
                    enforced,
                }
            }),
        host_facts().prop_map(AgentMessage::Facts),
        (enforced(), prop::option::of(any::<i64>())).prop_map(|(enforced, exclusion_version)| {
            AgentMessage::Heartbeat {
                enforced,
                exclusion_version,
            }
        }),
        (any::<i64>(), any::<bool>(), prop::option::of("\\PC{0,100}")).prop_map(
            |(version, succeeded, reason)| AgentMessage::ExclusionsApplied {
                version,
                succeeded,
                reason,
            }
        ),
        ("\\PC{0,200}", any::<bool>())
            .prop_map(|(detail, restored)| AgentMessage::Tamper { detail, restored }),
    ];
    prop_oneof![
        4 => message.prop_map(|m| serde_json::to_vec(&m).unwrap()),
        2 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..80)
            .prop_map(|b| b.into_iter().filter(|c| *c != b'\n').collect()),
    ]
    .prop_map(|mut line| {
        line.push(b'\n');
        line
    })
}

#[test]
fn agent_frames_never_break_the_server_or_another_machine() {
    let rt = runtime();
    let server = rt.block_on(TestServer::start());
    let (api, fuzzed, bystander, bystander_action) = rt.block_on(async {
        let fuzzed = server.enroll("fuzzed").await;
        let bystander = server.enroll("bystander").await;
        let mut api = server.api().await;
        let reply = api.isolate(&bystander.machine_id()).await;
        assert_eq!(reply.status, 201);
        let action = reply.json().unwrap()["id"].as_str().unwrap().to_owned();
        (Mutex::new(api), fuzzed, bystander, action)
    });
    let fuzzed = Arc::new(fuzzed);
    let frames = prop::collection::vec(agent_frame(bystander_action.clone()), 1..6);
    runner(100)
        .run(&frames, |frames| {
            rt.block_on(async {
                let mut session = fuzzed.connect().await;
                for frame in &frames {
                    if session.send_raw(frame).await.is_err() {
                        break; // the server closed the session: allowed
                    }
                }
                // Whatever the session said, the server answers, the
                // bystander's pending action is untouched, and the fuzzed
                // machine still reads as a valid Machine.
                let mut api = api.lock().await;
                let action = api.action(&bystander_action).await;
                prop_assert_eq!(&action["status"], "Pending");
                let machine = api.machine(&fuzzed.machine_id()).await;
                prop_assert!(machine["id"].is_string());
                drop(session);
                Ok(())
            })
        })
        .unwrap();
    rt.block_on(async {
        // The bystander's agent still gets its action.
        let mut session = bystander.connect().await;
        let order = tokio::time::timeout(Duration::from_secs(5), session.recv())
            .await
            .expect("the pending action is pushed")
            .unwrap();
        assert_eq!(common::action_id_of(&order), bystander_action);
    });
}

// ------------------------------------------------------------------ tokens

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn claims() -> Claims {
    serde_json::from_value(json!({
        "aud": "https://api.securitycenter.microsoft.com",
        "iss": "https://localhost/t/v2.0",
        "iat": 1_700_000_000, "nbf": 1_700_000_000, "exp": 4_000_000_000i64,
        "tid": "t", "appid": "a", "app_displayname": "x", "oid": "o", "ver": "1.0",
        "roles": ["Machine.Isolate"]
    }))
    .unwrap()
}

/// A change to a validly signed token.
#[derive(Debug, Clone)]
enum TokenDamage {
    /// Replace byte `at` with `byte`.
    Byte(prop::sample::Index, u8),
    /// Re-encode the header with these fields, keeping payload and signature.
    Header { alg: String, kid: Option<String> },
    /// Swap in another payload, keeping header and signature.
    Payload(Value),
    /// Cut the token at a point.
    Truncate(prop::sample::Index),
    /// Append text (another segment, padding, garbage).
    Append(String),
}

fn token_damage() -> impl Strategy<Value = TokenDamage> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| TokenDamage::Byte(i, b)),
        (
            prop::sample::select(vec![
                "none", "None", "HS256", "RS512", "PS256", "ES256", "rs256", "RS256 "
            ]),
            prop::option::of("[A-Za-z0-9_-]{0,40}"),
        )
            .prop_map(|(alg, kid)| TokenDamage::Header {
                alg: alg.into(),
                kid
            }),
        json_value().prop_map(TokenDamage::Payload),
        any::<prop::sample::Index>().prop_map(TokenDamage::Truncate),
        prop_oneof![
            Just(".".to_owned()),
            Just("=".to_owned()),
            Just(".e30".to_owned()),
            "\\PC{1,10}"
        ]
        .prop_map(TokenDamage::Append),
    ]
}

fn damage(token: &str, how: &TokenDamage) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    match how {
        TokenDamage::Byte(at, byte) => {
            let mut bytes = token.as_bytes().to_vec();
            let at = at.index(bytes.len());
            bytes[at] = *byte;
            String::from_utf8_lossy(&bytes).into_owned()
        }
        TokenDamage::Header { alg, kid } => {
            let header = JwtHeader {
                alg: alg.clone(),
                typ: Some("JWT".into()),
                kid: kid.clone(),
            };
            let header = b64(&serde_json::to_vec(&header).unwrap());
            format!("{header}.{}.{}", parts[1], parts[2])
        }
        TokenDamage::Payload(value) => {
            format!(
                "{}.{}.{}",
                parts[0],
                b64(value.to_string().as_bytes()),
                parts[2]
            )
        }
        TokenDamage::Truncate(at) => token[..at.index(token.len())].to_owned(),
        TokenDamage::Append(text) => format!("{token}{text}"),
    }
}

#[test]
fn the_token_verifier_accepts_only_the_tokens_it_signed() {
    let key = SigningKey::generate().unwrap();
    let other = SigningKey::generate().unwrap();
    let token = key.sign(&claims());
    assert!(key.verify(&token).is_ok());
    assert!(
        key.verify(&other.sign(&claims())).is_err(),
        "another key's token"
    );
    runner(3_000)
        .run(&token_damage(), |how| {
            let damaged = damage(&token, &how);
            if damaged != token {
                prop_assert!(key.verify(&damaged).is_err(), "{how:?} accepted: {damaged}");
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn hostile_authorization_headers_get_401_in_the_contract_format() {
    let rt = runtime();
    let server = rt.block_on(TestServer::start());
    let (http, token) = rt.block_on(async { (Mutex::new(server.https()), server.token().await) });
    let header = prop_oneof![
        token_damage().prop_map({
            let token = token.clone();
            move |how| format!("Bearer {}", damage(&token, &how))
        }),
        "[ -~]{0,200}",
        "Bearer [ -~]{0,300}",
        Just("Bearer".to_owned()),
        Just(format!("bearer  {token}x")),
        Just(format!("Basic {token}")),
    ];
    runner(200)
        .run(&header, |authorization| {
            // Only what a client can put in a header at all.
            prop_assume!(http::HeaderValue::from_str(&authorization).is_ok());
            rt.block_on(async {
                let reply = http
                    .lock()
                    .await
                    .request(
                        Method::GET,
                        "/api/machines",
                        &[("authorization", authorization.as_str())],
                        Vec::new(),
                    )
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                if reply.status == 200 {
                    // Only the token itself (in another spelling of the scheme).
                    prop_assert!(authorization.contains(&token), "{authorization:?} let in");
                } else {
                    assert_error(&reply, 401, "Unauthorized");
                    prop_assert!(reply.header("www-authenticate").is_some());
                }
                Ok(())
            })
        })
        .unwrap();
}
