//! Tokens of external OpenID Connect providers: a second, real Cordon
//! server over HTTPS, and a small provider in the test over loopback HTTP
//! that signs whatever claims a test needs and counts its key fetches.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use http::{StatusCode, Uri};
use proto::auth::{Claims, Jwk, Jwks};
use serde_json::json;
use server::jwt::SigningKey;
use server::oidc::{ExternalIdentity, OidcError, OidcSettings, Provider, Verifier};

const AUDIENCE: &str = "api://cordon";

/// What the in-test provider serves: its discovery document at any
/// `<path>/.well-known/openid-configuration`, naming the base URL as the
/// issuer, and its keys at `/keys`.
#[derive(Clone)]
struct Served {
    issuer: String,
    keys: Arc<Mutex<Vec<Jwk>>>,
    key_fetches: Arc<AtomicU64>,
}

struct LocalProvider {
    served: Served,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LocalProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LocalProvider {
    async fn start(keys: &[&SigningKey]) -> LocalProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let served = Served {
            issuer: format!("http://{}", listener.local_addr().unwrap()),
            keys: Arc::new(Mutex::new(Vec::new())),
            key_fetches: Arc::default(),
        };
        let app = Router::new()
            .route(
                "/keys",
                get(|State(served): State<Served>| async move {
                    served.key_fetches.fetch_add(1, Ordering::SeqCst);
                    Json(Jwks {
                        keys: served.keys.lock().unwrap().clone(),
                    })
                }),
            )
            .fallback(|State(served): State<Served>, uri: Uri| async move {
                if !uri.path().ends_with("/.well-known/openid-configuration") {
                    return StatusCode::NOT_FOUND.into_response();
                }
                let jwks_uri = format!("{}/keys", served.issuer);
                Json(json!({"issuer": served.issuer, "jwks_uri": jwks_uri})).into_response()
            })
            .with_state(served.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let provider = LocalProvider { served, task };
        provider.serve(keys);
        provider
    }

    fn issuer(&self) -> &str {
        &self.served.issuer
    }

    fn serve(&self, keys: &[&SigningKey]) {
        *self.served.keys.lock().unwrap() = keys.iter().map(|k| k.jwk()).collect();
    }

    fn key_fetches(&self) -> u64 {
        self.served.key_fetches.load(Ordering::SeqCst)
    }

    fn verifier(&self, issuer: &str) -> Verifier {
        Verifier::new(OidcSettings::new(vec![Provider {
            issuer: issuer.to_owned(),
            audience: AUDIENCE.into(),
        }]))
        .unwrap()
    }

    /// A user's claims, valid for an hour.
    fn claims(&self) -> Claims {
        let now = server::unix_seconds();
        Claims {
            aud: AUDIENCE.into(),
            iss: self.issuer().to_owned(),
            iat: now,
            nbf: now,
            exp: now + 3600,
            tid: "tenant".into(),
            appid: None,
            app_displayname: None,
            oid: "user-object-id".into(),
            sub: Some("user-subject".into()),
            ver: "2.0".into(),
            roles: Some(vec!["Machine.Isolate".into()]),
            scp: Some("Machine.Read Machine.Isolate".into()),
            upn: Some("ann@example.com".into()),
            name: Some("Ann".into()),
            groups: None,
            jti: None,
        }
    }
}

/// A client-credentials token of `server`'s test app for `resource`.
async fn token_for_resource(server: &TestServer, resource: &str) -> String {
    server
        .token_for_resource(&server.client_id, &server.client_secret, resource)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_another_cordon_server_verify_and_forgeries_do_not() {
    let provider = TestServer::start().await;
    let issuer = provider.server.state.issuer.clone();
    let mut settings = OidcSettings::new(vec![Provider {
        issuer: issuer.clone(),
        audience: "https://API.securitycenter.microsoft.com/".into(),
    }]);
    settings.role_map = vec![("Machine.Isolate".into(), "Responder".into())];
    settings.ca_file = Some(provider.ca.clone());
    let verifier = Verifier::new(settings).unwrap();
    assert!(!verifier.is_empty());

    let token = provider.token().await;
    assert_eq!(
        verifier.provider_for(&token).map(|p| p.issuer.as_str()),
        Some(issuer.as_str())
    );
    let expected = ExternalIdentity {
        issuer: issuer.clone(),
        subject: provider.client_id.clone(),
        upn: provider.client_id.clone(),
        name: "Test SOAR".into(),
        roles: vec!["Responder".into()],
        user_groups: Vec::new(),
        scopes: None,
        application_roles: Some(vec!["Machine.Isolate".into(), "Machine.Read.All".into()]),
    };
    assert_eq!(verifier.verify(&token).await.unwrap(), expected);
    // The keys are cached.
    assert_eq!(verifier.verify(&token).await.unwrap(), expected);
    assert_eq!(verifier.jwks_fetches(), 1);

    let elsewhere = token_for_resource(&provider, "https://api.security.microsoft.com").await;
    let refused = verifier.verify(&elsewhere).await;
    assert!(matches!(refused, Err(OidcError::Audience)), "{refused:?}");

    let (signed, signature) = token.rsplit_once('.').unwrap();
    let mut signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
    signature[10] ^= 1;
    let tampered = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&signature));
    let refused = verifier.verify(&tampered).await;
    assert!(matches!(refused, Err(OidcError::Signature)), "{refused:?}");

    // Claims with more roles under the provider's real signature.
    let mut claims: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    claims["roles"] = json!(["Machine.ReadWrite.All"]);
    let (header, _) = token.split_once('.').unwrap();
    let (_, signature) = token.rsplit_once('.').unwrap();
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let swapped = format!("{header}.{payload}.{signature}");
    let refused = verifier.verify(&swapped).await;
    assert!(matches!(refused, Err(OidcError::Signature)), "{refused:?}");

    // `none`, and HS256 keyed with the provider's public key.
    let kid = provider.server.state.signing_key().kid().to_owned();
    let public = serde_json::to_vec(&provider.server.state.signing_key().jwk()).unwrap();
    for alg in ["none", "HS256"] {
        let header =
            URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT", "kid": kid}).to_string());
        let input = format!("{header}.{payload}");
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &public);
        let mac = aws_lc_rs::hmac::sign(&key, input.as_bytes());
        let signature = if alg == "none" {
            String::new()
        } else {
            URL_SAFE_NO_PAD.encode(mac)
        };
        let refused = verifier.verify(&format!("{input}.{signature}")).await;
        assert!(
            matches!(refused, Err(OidcError::Algorithm)),
            "{alg}: {refused:?}"
        );
    }

    // A token of an issuer that is not configured is not this verifier's.
    let stranger = SigningKey::generate().unwrap();
    let mut foreign = serde_json::from_value::<Claims>(claims).unwrap();
    foreign.iss = "https://login.example.com/tenant/v2.0".into();
    let foreign = stranger.sign(&foreign);
    assert!(verifier.provider_for(&foreign).is_none());
    assert!(matches!(
        verifier.verify(&foreign).await,
        Err(OidcError::NotExternal)
    ));
    assert!(verifier.provider_for("not a token").is_none());
    assert!(matches!(
        verifier.verify("not a token").await,
        Err(OidcError::NotExternal)
    ));
    assert_eq!(verifier.jwks_fetches(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_refetched_for_an_unknown_kid_at_most_every_30_seconds() {
    let first = SigningKey::generate().unwrap();
    let second = SigningKey::generate().unwrap();
    let never_served = SigningKey::generate().unwrap();
    let provider = LocalProvider::start(&[&first]).await;
    let verifier = provider.verifier(provider.issuer());

    // Concurrent first verifications fetch the keys once.
    let token = first.sign(&provider.claims());
    let all = futures_util::future::join_all((0..8).map(|_| verifier.verify(&token))).await;
    for identity in all {
        let identity = identity.unwrap();
        assert_eq!(
            (identity.subject.as_str(), identity.upn.as_str()),
            ("user-object-id", "ann@example.com")
        );
        assert_eq!(identity.name, "Ann");
        assert_eq!(identity.roles, ["Machine.Isolate"]);
        assert_eq!(
            identity.scopes.unwrap(),
            ["Machine.Read", "Machine.Isolate"]
        );
    }
    assert_eq!((verifier.jwks_fetches(), provider.key_fetches()), (1, 1));

    // The provider rotates its key: the new kid is fetched once.
    provider.serve(&[&second]);
    assert!(
        verifier
            .verify(&second.sign(&provider.claims()))
            .await
            .is_ok()
    );
    assert_eq!((verifier.jwks_fetches(), provider.key_fetches()), (2, 2));

    // The old key is gone, and further unknown kids fetch nothing for 30 s.
    for key in [&first, &never_served, &never_served] {
        let refused = verifier.verify(&key.sign(&provider.claims())).await;
        assert!(matches!(refused, Err(OidcError::UnknownKey)), "{refused:?}");
    }
    assert_eq!((verifier.jwks_fetches(), provider.key_fetches()), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_audience_and_the_discovery_issuer_are_checked() {
    let key = SigningKey::generate().unwrap();
    let provider = LocalProvider::start(&[&key]).await;
    let verifier = provider.verifier(provider.issuer());
    let now = server::unix_seconds();
    let token = |change: fn(&mut Claims, i64)| {
        let mut claims = provider.claims();
        change(&mut claims, now);
        key.sign(&claims)
    };
    assert!(verifier.verify(&token(|_, _| {})).await.is_ok());
    // Five minutes of clock skew are tolerated, not more.
    assert!(
        verifier
            .verify(&token(|c, now| c.exp = now - 200))
            .await
            .is_ok()
    );
    let expired = verifier.verify(&token(|c, now| c.exp = now - 400)).await;
    assert!(matches!(expired, Err(OidcError::Expired)), "{expired:?}");
    assert!(
        verifier
            .verify(&token(|c, now| c.nbf = now + 200))
            .await
            .is_ok()
    );
    let early = verifier.verify(&token(|c, now| c.nbf = now + 400)).await;
    assert!(matches!(early, Err(OidcError::NotYetValid)), "{early:?}");
    let other = verifier
        .verify(&token(|c, _| c.aud = "api://other".into()))
        .await;
    assert!(matches!(other, Err(OidcError::Audience)), "{other:?}");
    assert!(
        verifier
            .verify(&token(|c, _| c.aud = "API://Cordon/".into()))
            .await
            .is_ok()
    );
    assert_eq!(verifier.jwks_fetches(), 1);

    // A discovery document naming another issuer is not trusted, and a
    // failed fetch is not retried at once.
    let configured = format!("{}/tenant", provider.issuer());
    let misnamed = provider.verifier(&configured);
    let mut claims = provider.claims();
    claims.iss = configured;
    let token = key.sign(&claims);
    let refused = misnamed.verify(&token).await;
    let named = |r: &Result<_, _>, text| matches!(r, Err(OidcError::Fetch(e)) if e.contains(text));
    assert!(named(&refused, "names the issuer"), "{refused:?}");
    let again = misnamed.verify(&token).await;
    assert!(named(&again, "retrying later"), "{again:?}");
    assert_eq!(misnamed.jwks_fetches(), 1);
    assert_eq!(provider.key_fetches(), 1);
}

#[test]
fn only_https_or_loopback_issuers_are_accepted() {
    let settings = |issuer: &str| {
        OidcSettings::new(vec![Provider {
            issuer: issuer.into(),
            audience: AUDIENCE.into(),
        }])
    };
    assert!(Verifier::new(settings("http://localhost:8080/tenant")).is_ok());
    assert!(Verifier::new(settings("http://login.example.com/tenant")).is_err());
    assert!(Verifier::new(settings("login.example.com")).is_err());
    assert!(
        Verifier::new(OidcSettings::new(Vec::new()))
            .unwrap()
            .is_empty()
    );
    let mut missing_ca = settings("https://login.example.com/tenant");
    missing_ca.ca_file = Some("/nonexistent/ca.pem".into());
    assert!(Verifier::new(missing_ca).is_err());
}

/// A user of provider B, with these user groups, and their delegated token
/// from B's password grant.
async fn user_token_of(provider: &TestServer, upn: &str, user_groups: &[&str]) -> String {
    let password = "a long enough password";
    create_user(provider, upn, password, "Viewer", user_groups).await;
    provider.user_token(upn, password).await
}

/// Server A trusts server B as an identity provider, mapping B's user
/// group `soc-tier2` to the Responder role and taking B's groups as user
/// groups: B's users act on A through the real API, within their role and
/// machine groups.
#[tokio::test]
async fn external_users_act_within_their_mapped_role_and_machine_groups() {
    let provider = TestServer::start().await;
    let issuer = provider.server.state.issuer.clone();
    let ca = provider.ca.clone();
    let server = TestServer::start_with(move |config| {
        let mut settings = OidcSettings::new(vec![Provider {
            issuer,
            audience: "https://api.securitycenter.microsoft.com".into(),
        }]);
        settings.role_claim = "groups".into();
        settings.group_claim = "groups".into();
        settings.role_map = vec![("soc-tier2".into(), "Responder".into())];
        settings.ca_file = Some(ca);
        config.oidc = settings;
    })
    .await;
    create_prefix_group(&server, "Finance", 1, "fin-", "fin").await;
    create_prefix_group(&server, "HR", 2, "hr-", "hr").await;
    let finance = server.enroll("fin-ws-1").await;
    let hr = server.enroll("hr-ws-1").await;

    let mut bob = Api {
        http: server.https(),
        token: user_token_of(&provider, "bob@b.example", &["soc-tier2", "fin"]).await,
    };
    let listed = bob.get("/api/machines").await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    let names: Vec<String> = listed.json().unwrap()["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["computerDnsName"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, vec!["fin-ws-1"]);
    let reply = bob.isolate(&finance.machine_id()).await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    assert_eq!(reply.json().unwrap()["requestor"], "bob@b.example");
    let reply = bob.isolate(&hr.machine_id()).await;
    assert_error(&reply, 404, "ResourceNotFound");

    // A user of B whose groups map to no Cordon role may do nothing.
    let mut carol = Api {
        http: server.https(),
        token: user_token_of(&provider, "carol@b.example", &["fin"]).await,
    };
    assert_error(&carol.get("/api/machines").await, 403, "Forbidden");

    // B's applications are applications at A (as an Entra ID app calling
    // with client credentials): their application permissions, every group.
    let mut soar = Api {
        http: server.https(),
        token: token_for_resource(&provider, "https://api.securitycenter.microsoft.com").await,
    };
    let listed = soar.get("/api/machines").await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    assert_eq!(listed.json().unwrap()["value"].as_array().unwrap().len(), 2);
    let reply = soar.isolate(&hr.machine_id()).await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    assert_eq!(reply.json().unwrap()["requestor"], "Test SOAR");
    // Without Machine.ReadWrite.All, the app may not read the audit trail.
    assert_error(&soar.get("/api/auditEvents").await, 403, "Forbidden");

    // B's app token for another audience is refused; A's own tokens still work.
    let mut other = Api {
        http: server.https(),
        token: token_for_resource(&provider, "https://api.security.microsoft.com").await,
    };
    assert_error(&other.get("/api/machines").await, 401, "Unauthorized");
    let mut own = server.api().await;
    assert_eq!(own.get("/api/machines").await.status, 200);
}
