//! Input the server once read too kindly: repeated JSON keys, extreme token
//! times, and absolute URLs built from the `Host` header despite
//! `--public-url`. (Redirect URIs are checked by `signin`'s unit tests.)

mod common;

use common::*;
use serde_json::{Value, json};

const JSON: &str = "application/json";

/// A key given twice: a proxy or WAF in front may have read the other value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_key_given_twice_is_refused_everywhere() {
    let server = TestServer::start().await;
    let machine = server.enroll("m1").await.machine_id();
    let mut api = server.api().await;

    let reply = api
        .post_raw(
            &format!("/api/machines/{machine}/isolate"),
            JSON,
            br#"{"Comment":"a","IsolationType":"Full","Comment":"b"}"#.to_vec(),
        )
        .await;
    let body = assert_error(&reply, 400, "InvalidRequestBody");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'Comment'"),
        "{body}"
    );
    let actions = api.get("/api/machineactions").await.json().unwrap();
    assert_eq!(actions["value"], json!([]), "nothing was created");

    let (id, secret) = create_app(server.store(), "Admin", &["Machine.ReadWrite.All"]).await;
    let mut admin = Api {
        http: server.https(),
        token: server.token_for(&id, &secret).await,
    };
    let reply = admin
        .post_raw(
            &format!("/api/machines/{machine}/tags"),
            JSON,
            br#"{"Value":"a","Action":"Add","Value":"b"}"#.to_vec(),
        )
        .await;
    assert_error(&reply, 400, "InvalidRequestBody");
    assert_eq!(admin.machine(&machine).await["machineTags"], json!([]));
    let reply = admin
        .post_raw(
            "/api/isolationExclusionRules",
            JSON,
            br#"{"Name":"ssh","RemotePorts":[22],"Name":"everything"}"#.to_vec(),
        )
        .await;
    assert_error(&reply, 400, "InvalidRequestBody");
    let rules = admin
        .get("/api/isolationExclusionRules")
        .await
        .json()
        .unwrap();
    assert_eq!(rules["value"], json!([]));

    // The agent gateway too.
    let reply = server
        .https()
        .request(
            http::Method::POST,
            proto::agent::ENROLL_PATH,
            &[("content-type", JSON)],
            br#"{"token":"a","token":"b","publicKey":"","proof":"","facts":{"computerDnsName":"x"}}"#
                .to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 400);
    let body: Value = reply.json().unwrap();
    assert_eq!(body["code"], "InvalidRequestBody", "{body}");
}

/// `exp` near the largest integer once wrapped around (a panic, so a 500,
/// in a debug build).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_times_at_the_ends_of_the_integers_do_not_wrap() {
    let server = TestServer::start().await;
    let state = &server.server.state;
    let claims = |nbf: i64, exp: i64| proto::auth::Claims {
        aud: "https://api.securitycenter.microsoft.com".into(),
        iss: state.issuer.clone(),
        iat: server::unix_seconds(),
        nbf,
        exp,
        tid: server.tenant().to_owned(),
        appid: Some(server.client_id.clone()),
        app_displayname: Some("Test SOAR".into()),
        oid: server.client_id.clone(),
        sub: None,
        ver: "1.0".into(),
        roles: Some(vec!["Machine.Read.All".into()]),
        scp: None,
        upn: None,
        name: None,
        groups: None,
        jti: None,
    };
    let now = server::unix_seconds();
    for (nbf, exp, status) in [
        (now, i64::MAX, 200),
        (i64::MIN, now + 60, 200),
        (i64::MIN, i64::MAX, 200),
        (now, i64::MIN, 401),
        (i64::MAX, i64::MAX, 401),
    ] {
        let mut api = Api {
            http: server.https(),
            token: state.signing_key().sign(&claims(nbf, exp)),
        };
        let reply = api.get("/api/machines").await;
        assert_eq!(
            reply.status, status,
            "nbf {nbf}, exp {exp}: {:?}",
            reply.body
        );
    }
}

/// With `--public-url`, every absolute URL comes from it, whatever `Host`
/// the client sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_urls_come_from_the_public_url_when_it_is_set() {
    let public = "https://cordon.example.com:9443";
    let server = TestServer::start_with(|config| config.public_url = Some(public.into())).await;
    server.enroll("m1").await;
    server.enroll("m2").await;
    // Reached by address: the Host header says 127.0.0.1:<port>.
    let by_address = format!("https://127.0.0.1:{}", server.server.local_addr.port());
    let http = || {
        agent::HttpsClient::new(agent::https::tls_config(&server.ca).unwrap(), &by_address).unwrap()
    };
    let mut api = Api {
        http: http(),
        token: server.token().await,
    };
    let list = api.get("/api/machines?pageSize=1").await.json().unwrap();
    assert_eq!(
        list["@odata.context"],
        format!("{public}/api/$metadata#Machines")
    );
    let next = list["@odata.nextLink"].as_str().unwrap();
    assert!(
        next.starts_with(&format!("{public}/api/machines?")),
        "{next}"
    );
    let id = list["value"][0]["id"].as_str().unwrap();
    let one = api
        .get(&format!("/api/machines/{id}"))
        .await
        .json()
        .unwrap();
    assert!(
        one["@odata.context"].as_str().unwrap().starts_with(public),
        "{one}"
    );

    let discovery = http()
        .request(
            http::Method::GET,
            &format!("/{}/v2.0/.well-known/openid-configuration", server.tenant()),
            &[],
            Vec::new(),
        )
        .await
        .unwrap()
        .json()
        .unwrap();
    for key in [
        "issuer",
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
    ] {
        let url = discovery[key].as_str().unwrap();
        assert!(url.starts_with(&format!("{public}/")), "{key}: {url}");
    }
}
