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
    let key = &server.server.state.signing_key;
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
