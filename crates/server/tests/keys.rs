//! `cordon keys rotate`: a new token-signing key signs from then on, and
//! the old one keeps verifying its tokens, and stays in the JWKS, until
//! they have all expired; audit checkpoints it signed verify for ever.

mod common;

use std::process::Output;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use serde_json::Value;

fn succeeded(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn kid_of(token: &str) -> String {
    let header = URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    let header: Value = serde_json::from_slice(&header).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

async fn published_kids(server: &TestServer) -> Vec<String> {
    let reply = server
        .https()
        .request(
            http::Method::GET,
            &format!("/{}/discovery/v2.0/keys", server.tenant()),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
    reply.json().unwrap()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until `done` (5 s at most).
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_signs_new_tokens_while_the_old_ones_live_out_their_time() {
    let server = TestServer::start_with(|config| {
        config.key_reload = Duration::from_millis(100);
    })
    .await;
    let data = server.dir.0.clone();
    let mut before = server.api().await;
    let old_kid = kid_of(&before.token);
    assert_eq!(published_kids(&server).await, vec![old_kid.clone()]);
    // A checkpoint signed with the old key: a record, then a prune of it.
    succeeded(
        &cordon_cli(
            &[
                "app",
                "create",
                "--name",
                "Old",
                "--permission",
                "Machine.Read.All",
            ],
            &data,
        )
        .await,
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let now = proto::time::format_utc(server::now_nanos());
    let pruned =
        succeeded(&cordon_cli(&["audit", "prune", "--before", &now, "--json"], &data).await);
    assert!(pruned.contains("\"checkpointSeq\":1"), "{pruned}");

    let rotated: Value = serde_json::from_str(&succeeded(
        &cordon_cli(&["keys", "rotate", "--json"], &data).await,
    ))
    .unwrap();
    assert_eq!(rotated["oldKeyId"], old_kid.as_str());
    let new_kid = rotated["newKeyId"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);
    assert!(rotated["oldKeyValidUntil"].is_string(), "{rotated}");

    // The running server takes it: new tokens carry the new key, both are
    // published, and the token issued before still works.
    eventually("the server signs with the new key", || async {
        server.server.state.signing_key().kid() == new_kid
    })
    .await;
    let mut after = server.api().await;
    assert_eq!(kid_of(&after.token), new_kid);
    assert_eq!(
        published_kids(&server).await,
        [new_kid.clone(), old_kid.clone()]
    );
    assert_eq!(before.get("/api/machines").await.status, 200);
    assert_eq!(after.get("/api/machines").await.status, 200);
    let verified = succeeded(&cordon_cli(&["audit", "verify"], &data).await);
    assert!(verified.contains("chain intact"), "{verified}");

    // Once the old key's tokens have all expired (its retirement moved two
    // hours back), it verifies no token and is no longer published; it
    // still verifies the checkpoint it signed.
    server
        .store()
        .update_meta(vec!["retired_signing_keys".into()], |values| {
            let mut retired: Value = serde_json::from_str(values[0].as_deref().unwrap()).unwrap();
            let two_hours_ago = server::now_nanos() - 2 * 3600 * 1_000_000_000;
            retired[0]["retiredAt"] = two_hours_ago.into();
            Ok(vec![retired.to_string()])
        })
        .await
        .unwrap();
    eventually("the old key's tokens are refused", || {
        let server = &server;
        let token = before.token.clone();
        async move {
            let mut api = Api {
                http: server.https(),
                token,
            };
            api.get("/api/machines").await.status == 401
        }
    })
    .await;
    assert_eq!(published_kids(&server).await, vec![new_kid.clone()]);
    assert_eq!(after.get("/api/machines").await.status, 200);
    let verified = succeeded(&cordon_cli(&["audit", "verify"], &data).await);
    assert!(verified.contains("chain intact"), "{verified}");

    // Rotated twice: the trail names each rotation.
    succeeded(&cordon_cli(&["keys", "rotate"], &data).await);
    let trail = succeeded(&cordon_cli(&["audit", "export"], &data).await);
    assert_eq!(trail.matches("\"keys.rotate\"").count(), 2, "{trail}");
}
