//! The benchmarks of `cordon-bench`, as a library so tests can run them.

pub mod fleet;

/// What a benchmark's fresh store holds for it: an application allowed to
/// isolate and read (client id and secret) and an enroll token without a
/// limit of uses or time.
pub struct Prepared {
    pub client_id: String,
    pub secret: String,
    pub enroll_token: String,
}

/// Makes the benchmark's application (named `name`) and enroll token in
/// `store`.
pub async fn prepare_store(store: &store::Store, name: &str) -> anyhow::Result<Prepared> {
    let client_id = server::crypto::new_guid();
    let secret = server::crypto::new_secret();
    store
        .create_app(store::App {
            client_id: client_id.clone(),
            name: name.into(),
            secret_hash: server::crypto::hash_client_secret(&secret),
            permissions: vec!["Machine.Isolate".into(), "Machine.Read.All".into()],
            created_at: server::now_nanos(),
        })
        .await?;
    let enroll_token = server::crypto::new_secret();
    store
        .create_enroll_token(store::EnrollToken {
            id: server::crypto::new_guid(),
            token_hash: server::crypto::sha256_hex(enroll_token.as_bytes()),
            created_at: server::now_nanos(),
            expires_at: None,
            max_uses: None,
        })
        .await?;
    Ok(Prepared {
        client_id,
        secret,
        enroll_token,
    })
}
