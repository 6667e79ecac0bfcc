//! The benchmarks of `cordon-bench`, as a library so tests can run them.

pub mod fleet;
pub mod webhook;

/// What a benchmark's fresh store holds for it: an application allowed to
/// isolate, read and manage settings (webhooks; client id and secret) and an
/// enroll token without a limit of uses or time.
pub struct Prepared {
    pub client_id: String,
    pub secret: String,
    pub enroll_token: String,
}

/// Makes the benchmark's application (named `name`) and enroll token in
/// `store`.
pub async fn prepare_store(store: &store::Store, name: &str) -> anyhow::Result<Prepared> {
    let permissions = vec![
        "Machine.Isolate".into(),
        "Machine.Read.All".into(),
        "Machine.ReadWrite.All".into(),
    ];
    let (client_id, secret) = server::create_app(store, name, permissions).await?;
    let (_, enroll_token) = server::create_enroll_token(store, None, None).await?;
    Ok(Prepared {
        client_id,
        secret,
        enroll_token,
    })
}
