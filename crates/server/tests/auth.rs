//! The built-in authority and bearer-token validation, over HTTPS.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use http::Method;
use proto::auth::Claims;

fn claims(server: &TestServer) -> Claims {
    let now = server::unix_seconds();
    Claims {
        aud: "https://api.securitycenter.microsoft.com".into(),
        iss: server.server.state.issuer.clone(),
        iat: now,
        nbf: now,
        exp: now + 3599,
        tid: server.tenant().to_owned(),
        appid: Some(server.client_id.clone()),
        app_displayname: Some("Test SOAR".into()),
        oid: server.client_id.clone(),
        sub: None,
        ver: "2.0".into(),
        roles: Some(vec!["Machine.Isolate".into(), "Machine.Read.All".into()]),
        scp: None,
        upn: None,
        name: None,
        groups: None,
        jti: None,
    }
}

async fn status_with(server: &TestServer, token: &str) -> (u16, Option<String>) {
    let auth = format!("Bearer {token}");
    let reply = server
        .https()
        .request(
            Method::GET,
            "/api/machines",
            &[("authorization", &auth)],
            Vec::new(),
        )
        .await
        .unwrap();
    if reply.status != 200 {
        assert_error(&reply, reply.status.as_u16(), "Unauthorized");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
    (
        reply.status.as_u16(),
        reply.header("www-authenticate").map(str::to_owned),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_stale_tokens_are_refused() {
    let server = TestServer::start().await;
    let key = &server.server.state.signing_key();
    // The server's own signature on good claims works.
    assert_eq!(
        status_with(&server, &key.sign(&claims(&server))).await.0,
        200
    );

    let other_key = server::jwt::SigningKey::generate().unwrap();
    let foreign = other_key.sign(&claims(&server));
    // Another key, and another key's signature under the server's kid.
    let (_, rest) = foreign.split_once('.').unwrap();
    let own_header = key
        .sign(&claims(&server))
        .split('.')
        .next()
        .unwrap()
        .to_owned();
    let wrong_signature = format!("{own_header}.{rest}");

    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(&server)).unwrap());
    let none_header = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"alg":"none","typ":"JWT","kid":"{}"}}"#,
        key.kid()
    ));
    let alg_none = format!("{none_header}.{payload}.");
    // HS256 signed with the server's public key (the classic confusion attack).
    let hs_header = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"alg":"HS256","typ":"JWT","kid":"{}"}}"#,
        key.kid()
    ));
    let jwk = key.jwk();
    let hmac_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, jwk.n.as_bytes());
    let input = format!("{hs_header}.{payload}");
    let tag = aws_lc_rs::hmac::sign(&hmac_key, input.as_bytes());
    let hs256 = format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));

    let mut expired = claims(&server);
    expired.exp = server::unix_seconds() - 301;
    expired.iat = expired.exp - 3600;
    expired.nbf = expired.iat;
    let mut future = claims(&server);
    future.nbf = server::unix_seconds() + 600;
    let mut audience = claims(&server);
    audience.aud = "https://graph.microsoft.com".into();
    let mut issuer = claims(&server);
    issuer.iss = "https://login.microsoftonline.com/x/v2.0".into();
    let mut tenant = claims(&server);
    tenant.tid = "00000000-0000-0000-0000-000000000000".into();
    let mut unknown_app = claims(&server);
    unknown_app.appid = Some("00000000-0000-4000-8000-000000000001".into());

    let cases = [
        ("another key", foreign),
        ("wrong signature", wrong_signature),
        ("alg none", alg_none),
        ("HS256 with the public key", hs256),
        ("expired", key.sign(&expired)),
        ("not yet valid", key.sign(&future)),
        ("other audience", key.sign(&audience)),
        ("other issuer", key.sign(&issuer)),
        ("other tenant", key.sign(&tenant)),
        ("unknown app", key.sign(&unknown_app)),
        ("garbage", "not.a.jwt".into()),
        ("empty segments", "..".into()),
    ];
    for (label, token) in cases {
        assert_eq!(status_with(&server, &token).await.0, 401, "{label}");
    }

    // Missing and malformed Authorization headers.
    let mut http = server.https();
    for headers in [
        vec![],
        vec![("authorization", "Basic abc")],
        vec![("authorization", "Bearer ")],
    ] {
        let reply = http
            .request(Method::GET, "/api/machines", &headers, Vec::new())
            .await
            .unwrap();
        assert_error(&reply, 401, "Unauthorized");
    }
}

/// The token endpoints answer an oversized body in OAuth's format, as
/// every other refusal of theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_token_request_gets_an_oauth_error() {
    let server = TestServer::start().await;
    let mut body = client_credentials_form(&server.client_id, &server.client_secret);
    body.extend(std::iter::repeat_n(b'x', 70 * 1024));
    let reply = server
        .https()
        .request(
            Method::POST,
            &format!("/{}/oauth2/v2.0/token", server.tenant()),
            &[("content-type", "application/x-www-form-urlencoded")],
            body,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 413);
    let body = reply.json().unwrap();
    assert_eq!(body["error"], "invalid_request", "{body}");
    assert!(body["error_description"].is_string(), "{body}");
}

/// Two Authorization headers are ambiguous (a proxy in front may have
/// checked the other one): refused, whichever comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_refused() {
    let server = TestServer::start().await;
    let good = format!("Bearer {}", server.token().await);
    for pair in [
        [good.as_str(), "Bearer x"],
        ["Bearer x", good.as_str()],
        [good.as_str(), good.as_str()],
    ] {
        let reply = server
            .https()
            .request(
                Method::GET,
                "/api/machines",
                &[("authorization", pair[0]), ("authorization", pair[1])],
                Vec::new(),
            )
            .await
            .unwrap();
        let body = assert_error(&reply, 401, "Unauthorized");
        assert!(body.to_string().contains("more than one"), "{body}");
    }
    assert_eq!(status_with(&server, &good["Bearer ".len()..]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_apps_tokens_stop_working_at_once() {
    let server = TestServer::start().await;
    let token = server.token().await;
    assert_eq!(status_with(&server, &token).await.0, 200);
    server.store().delete_app(&server.client_id).await.unwrap();
    assert_eq!(status_with(&server, &token).await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_serves_discovery_tokens_and_keys() {
    let server = TestServer::start().await;
    let tenant = server.tenant().to_owned();
    let mut http = server.https();

    let reply = http
        .request(
            Method::GET,
            &format!("/{tenant}/v2.0/.well-known/openid-configuration"),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let doc = reply.json().unwrap();
    // Endpoints follow the host the client used; the issuer is canonical.
    assert_eq!(
        doc["token_endpoint"],
        format!("{}/{tenant}/oauth2/v2.0/token", server.url)
    );
    assert_eq!(
        doc["jwks_uri"],
        format!("{}/{tenant}/discovery/v2.0/keys", server.url)
    );
    assert_eq!(
        doc["issuer"],
        format!("{}/{tenant}/v2.0", server.server.public_url)
    );
    for field in [
        "authorization_endpoint",
        "response_types_supported",
        "subject_types_supported",
        "id_token_signing_alg_values_supported",
        "token_endpoint_auth_methods_supported",
    ] {
        assert!(!doc[field].is_null(), "{field}");
    }

    let reply = http
        .request(
            Method::GET,
            &format!("/{tenant}/discovery/v2.0/keys"),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
    let keys = reply.json().unwrap();
    let kid = keys["keys"][0]["kid"].as_str().unwrap().to_owned();
    assert_eq!(keys["keys"][0]["kty"], "RSA");

    // v2 with client_secret_post.
    let token = server.token().await;
    let header: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], kid);
    let claims: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], "https://api.securitycenter.microsoft.com");
    assert_eq!(claims["tid"], tenant);
    assert_eq!(claims["appid"], server.client_id);
    assert_eq!(claims["app_displayname"], "Test SOAR");
    assert_eq!(
        claims["roles"],
        serde_json::json!(["Machine.Isolate", "Machine.Read.All"])
    );
    for field in ["iss", "iat", "nbf", "exp", "oid", "ver"] {
        assert!(!claims[field].is_null(), "{field}");
    }

    let token_request = |path: String,
                         fields: Vec<(&'static str, String)>,
                         basic: Option<String>| {
        let ca = server.ca.clone();
        let url = server.url.clone();
        async move {
            let mut http =
                agent::HttpsClient::new(agent::https::tls_config(&ca).unwrap(), &url).unwrap();
            let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut headers = vec![(
                "content-type",
                "application/x-www-form-urlencoded".to_owned(),
            )];
            if let Some(b) = basic {
                headers.push(("authorization", b));
            }
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http.request(Method::POST, &path, &headers, form(&pairs))
                .await
                .unwrap()
        }
    };
    let v2 = format!("/{tenant}/oauth2/v2.0/token");
    let v1 = format!("/{tenant}/oauth2/token");
    let id = server.client_id.clone();
    let secret = server.client_secret.clone();

    // v1 with resource=, and HTTP Basic; extra fields are ignored.
    let reply = token_request(
        v1.clone(),
        vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", id.clone()),
            ("client_secret", secret.clone()),
            (
                "resource",
                "https://api.securitycenter.microsoft.com".into(),
            ),
        ],
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let body = reply.json().unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    );
    let reply = token_request(
        v2.clone(),
        vec![
            ("grant_type", "client_credentials".into()),
            (
                "scope",
                "https://api.security.microsoft.com/.default".into(),
            ),
            ("client_info", "1".into()),
        ],
        Some(basic),
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);

    let oauth_error = |reply: &agent::Reply, status: u16, error: &str| {
        assert_eq!(reply.status.as_u16(), status, "{:?}", reply.body);
        let body = reply.json().unwrap();
        assert_eq!(body["error"], error, "{body}");
        assert!(body["error_description"].is_string());
    };
    let good_scope = (
        "scope",
        "https://api.securitycenter.microsoft.com/.default".to_owned(),
    );
    let reply = token_request(
        v2.clone(),
        vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", id.clone()),
            ("client_secret", "wrong".into()),
            good_scope.clone(),
        ],
        None,
    )
    .await;
    oauth_error(&reply, 401, "invalid_client");
    let reply = token_request(
        v2.clone(),
        vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", "nobody".into()),
            ("client_secret", "x".into()),
            good_scope.clone(),
        ],
        None,
    )
    .await;
    oauth_error(&reply, 401, "invalid_client");
    let reply = token_request(
        v2.clone(),
        vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:device_code".into(),
            ),
            ("client_id", id.clone()),
            ("client_secret", secret.clone()),
            good_scope.clone(),
        ],
        None,
    )
    .await;
    oauth_error(&reply, 400, "unsupported_grant_type");
    let reply = token_request(
        v2.clone(),
        vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", id.clone()),
            ("client_secret", secret.clone()),
            ("scope", "https://graph.microsoft.com/.default".into()),
        ],
        None,
    )
    .await;
    oauth_error(&reply, 400, "invalid_scope");
    let reply = token_request(
        v2.clone(),
        vec![("client_id", id.clone()), ("client_secret", secret.clone())],
        None,
    )
    .await;
    oauth_error(&reply, 400, "invalid_request");
    let reply = token_request(
        "/not-the-tenant/oauth2/v2.0/token".into(),
        vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", id.clone()),
            ("client_secret", secret.clone()),
            good_scope.clone(),
        ],
        None,
    )
    .await;
    oauth_error(&reply, 400, "invalid_request");
    let reply = http
        .request(
            Method::GET,
            "/other-tenant/v2.0/.well-known/openid-configuration",
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
    oauth_error(&reply, 400, "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_are_checked_per_call() {
    let server = TestServer::start().await;
    let (isolator, secret) =
        create_app(server.store(), "Isolator only", &["Machine.Isolate"]).await;
    let token = server.token_for(&isolator, &secret).await;
    let mut api = Api {
        http: server.https(),
        token,
    };
    assert_error(&api.get("/api/machines").await, 403, "Forbidden");
    assert_error(&api.get("/api/machineactions").await, 403, "Forbidden");
    let agent = server.enroll("m1").await;
    assert_eq!(api.isolate(&agent.machine_id()).await.status, 201);
}

/// The form of a client-credentials request.
fn client_credentials_form(client_id: &str, secret: &str) -> Vec<u8> {
    form(&[
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_secret", secret),
        ("scope", "https://api.securitycenter.microsoft.com/.default"),
    ])
}

/// A client-credentials request for `client_id` with `secret`, from the
/// loopback address `source`, on a connection of its own.
async fn client_credentials(
    server: &TestServer,
    source: &str,
    client_id: &str,
    secret: &str,
) -> agent::Reply {
    let mut http = ClientFrom::connect(server, source).await.unwrap();
    http.request(
        Method::POST,
        &format!("/{}/oauth2/v2.0/token", server.tenant()),
        &[("content-type", "application/x-www-form-urlencoded")],
        client_credentials_form(client_id, secret),
    )
    .await
    .unwrap()
}

/// 200 wrong secrets used to cost 200 slow hashes (38 s of CPU) and hold
/// up everyone's token requests. Now a wrong secret costs one SHA-256, an
/// unknown client nothing, and failures are throttled per client id and per
/// address, while the real client, at the address it got tokens from
/// before, keeps getting them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_client_secrets_is_cheap_for_the_server_and_throttled() {
    // Five failures lock a client id: of the twenty attempts the attacker's
    // address gets, each connection alternating between the real id and
    // unknown ones, at least six name the real id whatever the interleaving
    // (with ten, the lock depended on it).
    let server = TestServer::start_with(|config| config.client_failures_per_client = 5).await;
    let (id, secret) = (server.client_id.clone(), server.client_secret.clone());
    let (legit, attacker, elsewhere) = ("127.0.0.1", "127.0.0.2", "127.0.0.3");
    let reply = client_credentials(&server, legit, &id, &secret).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);

    let path = format!("/{}/oauth2/v2.0/token", server.tenant());
    let attack = futures_util::future::join_all((0..8).map(|n| {
        let (server, id, path) = (&server, id.clone(), path.clone());
        async move {
            let mut http = ClientFrom::connect(server, attacker).await.unwrap();
            let mut statuses = Vec::new();
            for i in 0..25 {
                // Half against the real client id, half against unknown ones.
                let target = if (n + i) % 2 == 0 {
                    id.clone()
                } else {
                    server::crypto::new_guid()
                };
                let reply = http
                    .request(
                        Method::POST,
                        &path,
                        &[("content-type", "application/x-www-form-urlencoded")],
                        client_credentials_form(&target, "guess"),
                    )
                    .await
                    .unwrap();
                if reply.status == 429 {
                    let wait: u64 = reply.header("retry-after").unwrap().parse().unwrap();
                    assert!((1..=900).contains(&wait), "{wait}");
                }
                let body = reply.json().unwrap();
                assert_eq!(body["error"], "invalid_client", "{body}");
                statuses.push(reply.status.as_u16());
            }
            statuses
        }
    }));
    let during = async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let reply = client_credentials(&server, legit, &id, &secret).await;
        (reply.status, started.elapsed())
    };
    let (statuses, (legit_status, legit_took)) = tokio::join!(attack, during);
    let statuses: Vec<u16> = statuses.into_iter().flatten().collect();
    assert_eq!(statuses.len(), 200);
    let refused = statuses.iter().filter(|s| **s == 429).count();
    let checked = statuses.iter().filter(|s| **s == 401).count();
    assert_eq!(refused + checked, 200, "{statuses:?}");
    // The address gets 20 failures at most (attempts in flight count too).
    assert!(checked <= 20, "{checked} secrets were checked");
    assert_eq!(legit_status, 200);
    assert!(
        legit_took < std::time::Duration::from_secs(5),
        "a legitimate token request took {legit_took:?} during the attack"
    );

    // The attacker's address is locked out now, for any client id it names,
    let reply = client_credentials(&server, attacker, &server::crypto::new_guid(), "x").await;
    assert_eq!(reply.status, 429);
    // and so is the client id, from addresses it never got a token from,
    let reply = client_credentials(&server, elsewhere, &id, &secret).await;
    assert_eq!(reply.status, 429);
    let reply = client_credentials(&server, elsewhere, &server::crypto::new_guid(), "x").await;
    assert_eq!(reply.status, 401);
    // but not at the address the real client uses.
    let reply = client_credentials(&server, legit, &id, &secret).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}

/// Applications created before client secrets were hashed with SHA-256
/// keep working: the old slow hash is checked once and replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_slow_client_secret_hash_still_works_and_is_replaced() {
    let server = TestServer::start().await;
    let client_id = server::crypto::new_guid();
    let secret = server::crypto::new_secret();
    server
        .store()
        .create_app(store::App {
            client_id: client_id.clone(),
            name: "Old app".into(),
            secret_hash: server::crypto::hash_secret(&secret),
            permissions: vec!["Machine.Read.All".into()],
            created_at: server::now_nanos(),
        })
        .await
        .unwrap();
    let source = "127.0.0.1";
    let reply = client_credentials(&server, source, &client_id, "wrong").await;
    assert_eq!(reply.status, 401);
    let stored = || async {
        server
            .store()
            .get_app(&client_id)
            .await
            .unwrap()
            .unwrap()
            .secret_hash
    };
    assert!(stored().await.starts_with("pbkdf2-sha512$"));
    let reply = client_credentials(&server, source, &client_id, &secret).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(stored().await, server::crypto::hash_client_secret(&secret));
    let reply = client_credentials(&server, source, &client_id, &secret).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let reply = client_credentials(&server, source, &client_id, "wrong").await;
    assert_eq!(reply.status, 401);
}
