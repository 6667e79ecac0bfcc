//! Health, metrics and the action log.
//!
//! - `GET /healthz` and `GET /readyz` on the API port, without a token:
//!   the process is up; the store answers (503 when it doesn't).
//! - [`Metrics`]: the Prometheus families (`prometheus-client`), served in
//!   the OpenMetrics text format by a small plain-HTTP listener of its own
//!   ([`serve`], `--metrics-listen`), never on the API port.
//! - As the store's [`store::StoreObserver`], it times every commit, keeps
//!   the count of actions by type and status, observes each action's
//!   completion time and logs every action state change, from the one
//!   place where all of them are committed; it also hands each action
//!   change and audit record on to the live events ([`crate::events`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::AppState;

/// The default metrics address: loopback only.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// The route label of a request that matched no route (its raw path is
/// never a label).
pub const UNMATCHED: &str = "unmatched";

/// Where the metrics are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// Not served.
    Off,
    /// The default address: when it cannot be bound (another server on
    /// this host holds it) the server warns and runs without metrics.
    Default(SocketAddr),
    /// An address the operator gave: when it cannot be bound the server
    /// does not start.
    Given(SocketAddr),
}

impl MetricsListen {
    /// The default: [`DEFAULT_METRICS_LISTEN`].
    pub fn default_address() -> MetricsListen {
        MetricsListen::Default(DEFAULT_METRICS_LISTEN.parse().expect("address"))
    }

    /// `off`, or `IP:PORT` / `[IPv6]:PORT`, as the operator gave it.
    pub fn parse(text: &str) -> Result<MetricsListen, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") {
            return Ok(MetricsListen::Off);
        }
        text.parse().map(MetricsListen::Given).map_err(|_| {
            format!("'{text}' is not an address such as 127.0.0.1:9464 or [::1]:9464, nor 'off'")
        })
    }
}

/// Opens the metrics listener: `None` when metrics are off, or when the
/// default address is taken (with a warning); an error when an address the
/// operator gave cannot be bound.
pub fn bind(listen: &MetricsListen) -> anyhow::Result<Option<std::net::TcpListener>> {
    match listen {
        MetricsListen::Off => Ok(None),
        MetricsListen::Default(address) => match std::net::TcpListener::bind(address) {
            Ok(listener) => Ok(Some(listener)),
            Err(e) => {
                tracing::warn!(
                    %address,
                    error = %e,
                    "no metrics: the default metrics address is taken (another server \
                     on this host?); give another with --metrics-listen ADDR, or \
                     --metrics-listen off"
                );
                Ok(None)
            }
        },
        MetricsListen::Given(address) => std::net::TcpListener::bind(address)
            .map(Some)
            .with_context(|| {
                format!(
                    "cannot serve metrics on {address} (--metrics-listen; 'off' turns them off)"
                )
            }),
    }
}

const ACTION_TYPES: [&str; 2] = ["Isolate", "Unisolate"];
const ACTION_STATUSES: [&str; 6] = [
    "Pending",
    "InProgress",
    "Succeeded",
    "Failed",
    "Cancelled",
    "TimeOut",
];
const FINAL_STATUSES: [&str; 4] = ["Succeeded", "Failed", "Cancelled", "TimeOut"];
const OTHER: &str = "other";

/// A known label value, or `other` (so that the label set stays bounded
/// whatever the stored text).
fn known(value: &str, values: &[&'static str]) -> &'static str {
    values
        .iter()
        .find(|v| **v == value)
        .copied()
        .unwrap_or(OTHER)
}

fn method_label(method: &Method) -> &'static str {
    const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];
    known(method.as_str(), &METHODS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    r#type: &'static str,
    status: &'static str,
}

impl ActionLabels {
    fn of(action_type: &str, status: &str) -> ActionLabels {
        ActionLabels {
            r#type: known(action_type, &ACTION_TYPES),
            status: known(status, &ACTION_STATUSES),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// From half a millisecond (an agent already connected answers in a few)
/// to an hour (an action that waits for its machine, or its deadline).
const COMPLETION_BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 600.0, 3600.0,
];
/// From a tenth of a millisecond to ten seconds.
const REQUEST_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];
/// A commit is one `fsync`: from a tenth of a millisecond to a second.
const COMMIT_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Every metric the server exposes, and the readiness check's memory.
pub struct Metrics {
    registry: Registry,
    /// Live agent sessions (the gateway keeps it).
    pub agent_sessions: Gauge,
    machine_actions: Family<ActionLabels, Gauge>,
    action_completion: Family<ActionLabels, Histogram>,
    http_requests: Family<RequestLabels, Counter>,
    http_duration: Family<RouteLabels, Histogram>,
    store_commit: Histogram,
    /// Live-event streams (`GET /api/events`) open now.
    pub event_streams: Gauge,
    /// Events published to the live-event streams.
    pub events_published: Counter,
    /// Events removed from the event log past their retention.
    pub events_pruned: Counter,
    /// Streams that fell behind the live channel and caught up from the log.
    pub event_catchups: Counter,
    /// `resync` events sent to streams (a subscriber that fell behind, an
    /// unknown `Last-Event-ID`, changes dropped on the way).
    pub event_resyncs: Counter,
    /// Wakes the task that publishes the event log's new events.
    pub events_written: tokio::sync::Notify,
    webhook_attempts: Family<OutcomeLabels, Counter>,
    webhook_attempt_duration: Histogram,
    /// Wakes the webhook sender: a commit queued deliveries.
    pub webhook_deliveries_queued: tokio::sync::Notify,
    /// Wakes the webhook sender: a webhook was created or deleted here.
    pub webhooks_changed: tokio::sync::Notify,
    readiness: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let agent_sessions = Gauge::default();
        registry.register(
            "cordon_agent_sessions",
            "Agent sessions open now",
            agent_sessions.clone(),
        );
        let machine_actions = Family::<ActionLabels, Gauge>::default();
        registry.register(
            "cordon_machine_actions",
            "Machine actions in the store, by type and status",
            machine_actions.clone(),
        );
        let action_completion =
            Family::<ActionLabels, Histogram>::new_with_constructor(completion_histogram as _);
        registry.register_with_unit(
            "cordon_action_completion",
            "Time from an action's creation (201) to its final status, by type and final status",
            Unit::Seconds,
            action_completion.clone(),
        );
        let http_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "cordon_http_requests",
            "HTTP requests served on the API port, by method, route template and status",
            http_requests.clone(),
        );
        let http_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(request_histogram as _);
        registry.register_with_unit(
            "cordon_http_request_duration",
            "Time to answer an HTTP request on the API port, by route template",
            Unit::Seconds,
            http_duration.clone(),
        );
        let store_commit = Histogram::new(COMMIT_BUCKETS);
        registry.register_with_unit(
            "cordon_store_commit",
            "Time of each write transaction's commit (one group of writes, one fsync)",
            Unit::Seconds,
            store_commit.clone(),
        );
        let event_streams = Gauge::default();
        registry.register(
            "cordon_event_streams",
            "Live-event streams (GET /api/events) open now",
            event_streams.clone(),
        );
        let events_published = Counter::default();
        registry.register(
            "cordon_events_published",
            "Events published to the live-event streams",
            events_published.clone(),
        );
        let events_pruned = Counter::default();
        registry.register(
            "cordon_events_pruned",
            "Events removed from the event log past their retention (--event-retention)",
            events_pruned.clone(),
        );
        let event_catchups = Counter::default();
        registry.register(
            "cordon_event_catchups",
            "Live-event streams that fell more than 1,024 events behind and caught up from the event log",
            event_catchups.clone(),
        );
        let event_resyncs = Counter::default();
        registry.register(
            "cordon_event_resyncs",
            "resync events sent to live-event streams (the client refetches)",
            event_resyncs.clone(),
        );
        let webhook_attempts = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "cordon_webhook_attempts",
            "Webhook delivery attempts, by outcome: delivered, retry (failed, tried again later) or failed (given up)",
            webhook_attempts.clone(),
        );
        for outcome in ["delivered", "retry", "failed"] {
            let _ = webhook_attempts.get_or_create(&OutcomeLabels { outcome });
        }
        let webhook_attempt_duration = Histogram::new(REQUEST_BUCKETS);
        registry.register_with_unit(
            "cordon_webhook_attempt_duration",
            "Time of each webhook delivery attempt, from connecting (or taking a kept-alive connection) to the end of the answer",
            Unit::Seconds,
            webhook_attempt_duration.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "cordon_build_info",
            "Always 1; its label is the server's version",
            build_info,
        );
        for action_type in ACTION_TYPES {
            for status in ACTION_STATUSES {
                machine_actions
                    .get_or_create(&ActionLabels {
                        r#type: action_type,
                        status,
                    })
                    .set(0);
            }
            // Exposed from the start, so that rates over them begin at 0.
            for status in FINAL_STATUSES {
                let _ = action_completion.get_or_create(&ActionLabels {
                    r#type: action_type,
                    status,
                });
            }
        }
        Metrics {
            registry,
            agent_sessions,
            machine_actions,
            action_completion,
            http_requests,
            http_duration,
            store_commit,
            event_streams,
            events_published,
            events_pruned,
            event_catchups,
            event_resyncs,
            events_written: tokio::sync::Notify::new(),
            webhook_attempts,
            webhook_attempt_duration,
            webhook_deliveries_queued: tokio::sync::Notify::new(),
            webhooks_changed: tokio::sync::Notify::new(),
            readiness: tokio::sync::Mutex::new(None),
        }
    }

    /// Counts a webhook delivery attempt: `delivered`, `retry` or `failed`.
    pub fn webhook_attempt(&self, outcome: &'static str, duration_ms: i64) {
        self.webhook_attempts
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.webhook_attempt_duration
            .observe(duration_ms.max(0) as f64 / 1000.0);
    }

    /// The whole exposition, in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }

    /// Sets the action counts from the store's grouped count (at start,
    /// before any action can change).
    pub fn set_action_counts(&self, counts: &[(String, String, u64)]) {
        for (action_type, status, count) in counts {
            self.machine_actions
                .get_or_create(&ActionLabels::of(action_type, status))
                .inc_by(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// Counts one request answered on the API port.
    pub fn observe_request(
        &self,
        method: &Method,
        route: &str,
        status: StatusCode,
        elapsed: Duration,
    ) {
        self.http_requests
            .get_or_create(&RequestLabels {
                method: method_label(method),
                route: route.to_owned(),
                status: status.as_u16(),
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Whether the store answers a trivial read, and its writer a job that
    /// changes nothing, within [`READY_TIMEOUT`]; a
    /// result is reused for [`READY_REUSE`], and one check runs at a time,
    /// so however many callers ask, the store sees at most one read a second.
    pub async fn store_ready(&self, state: &AppState) -> bool {
        let mut last = self.readiness.lock().await;
        if let Some((at, ready)) = *last
            && at.elapsed() < READY_REUSE
        {
            return ready;
        }
        // A read, and the writer's queue (isolations are writes: a writer
        // stuck on its disk must make the server unready too).
        let check = async {
            match state.store.meta("tenant_id").await {
                Ok(Some(_)) => {}
                Ok(None) => return Some("the store has no tenant id".to_owned()),
                Err(e) => return Some(e.to_string()),
            }
            state
                .store
                .writer_answers()
                .await
                .err()
                .map(|e| format!("the store's writer: {e}"))
        };
        let why = match tokio::time::timeout(READY_TIMEOUT, check).await {
            Ok(why) => why,
            Err(_) => Some(format!(
                "no answer within {} s",
                READY_TIMEOUT.as_secs_f64()
            )),
        };
        if let Some(why) = &why
            && let Some(suppressed) = state.connections.log.allow("readiness check failed")
        {
            tracing::warn!(error = %why, suppressed, "readiness check failed: the store does not answer");
        }
        *last = Some((Instant::now(), why.is_none()));
        why.is_none()
    }
}

fn completion_histogram() -> Histogram {
    Histogram::new(COMPLETION_BUCKETS)
}

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

impl store::StoreObserver for Metrics {
    fn committed(&self, elapsed: Duration) {
        self.store_commit.observe(elapsed.as_secs_f64());
    }

    fn events_recorded(&self) {
        self.events_written.notify_one();
    }

    fn webhook_deliveries_queued(&self) {
        self.webhook_deliveries_queued.notify_one();
    }

    fn action_changed(&self, change: &store::ActionChange) {
        let action = &change.action;
        let to = ActionLabels::of(&action.action_type, &action.status);
        self.machine_actions.get_or_create(&to).inc();
        let Some(from) = &change.from else {
            tracing::info!(
                target: "cordon::action",
                action_id = %action.id,
                machine_id = %action.machine_id,
                action_type = %action.action_type,
                to = %action.status,
                requestor = %action.requestor,
                changed_by = %action.requestor,
                "action created"
            );
            return;
        };
        self.machine_actions
            .get_or_create(&ActionLabels::of(&action.action_type, from))
            .dec();
        if FINAL_STATUSES.contains(&action.status.as_str()) {
            let seconds = action.updated_at.saturating_sub(action.created_at).max(0) as f64 / 1e9;
            self.action_completion.get_or_create(&to).observe(seconds);
        }
        let changed_by = match action.status.as_str() {
            "Cancelled" => action
                .cancellation_requestor
                .as_deref()
                .unwrap_or("unknown"),
            "TimeOut" => "server",
            _ => "agent",
        };
        tracing::info!(
            target: "cordon::action",
            action_id = %action.id,
            machine_id = %action.machine_id,
            action_type = %action.action_type,
            from = %from,
            to = %action.status,
            requestor = %action.requestor,
            changed_by,
            "action status changed"
        );
    }
}

/// How long `/readyz` waits for the store.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a readiness result is reused.
pub const READY_REUSE: Duration = Duration::from_secs(1);

/// `/healthz` and `/readyz`, on the API port, without a token.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

fn plain(status: StatusCode, body: &'static str) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The process is up: no store access.
async fn healthz() -> Response {
    plain(StatusCode::OK, "ok\n")
}

/// The store answers a read.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.metrics.store_ready(&state).await {
        plain(StatusCode::OK, "ready\n")
    } else {
        plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the store does not answer\n",
        )
    }
}

/// Metrics connections open at once, at most; more wait in the kernel's
/// backlog.
const METRICS_CONNECTIONS: usize = 8;
/// Time to send the request's head.
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// A metrics connection is closed after this, whatever it does. With one
/// request a connection (no keep-alive), whoever holds every slot must
/// keep opening connections, and a scraper waiting in the backlog gets its
/// turn within seconds.
const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` in plain HTTP on `listener` until aborted.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    let log = crate::conns::LogLimiter::new(Duration::from_secs(10));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                if let Some(suppressed) = log.allow("metrics accept failed") {
                    tracing::warn!(error = %e, suppressed, "metrics: accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                let answer = answer(&metrics, request.method(), request.uri().path());
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(8192)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(METRICS_CONNECTION_LIFETIME, connection).await;
        });
    }
}

/// The metrics listener's answer: the exposition for `GET /metrics`, 405
/// for another method there, 404 anywhere else.
fn answer(metrics: &Metrics, method: &Method, path: &str) -> hyper::Response<Full<Bytes>> {
    let (status, content_type, body) = match (path, method) {
        ("/metrics", &Method::GET) => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Bytes::from(metrics.encode()),
        ),
        ("/metrics", _) => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"only GET\n"),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"not found; the metrics are at /metrics\n"),
        ),
    };
    let mut response = hyper::Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposed_names_are_the_documented_ones() {
        let metrics = Metrics::new();
        metrics.observe_request(
            &Method::POST,
            "/api/machines/{id}/isolate",
            StatusCode::CREATED,
            Duration::from_millis(3),
        );
        metrics.committed_for_test();
        let text = metrics.encode();
        for name in [
            "# TYPE cordon_agent_sessions gauge",
            "# TYPE cordon_machine_actions gauge",
            "# TYPE cordon_action_completion_seconds histogram",
            "# TYPE cordon_http_requests counter",
            "# TYPE cordon_http_request_duration_seconds histogram",
            "# TYPE cordon_store_commit_seconds histogram",
            "# TYPE cordon_event_streams gauge",
            "# TYPE cordon_events_published counter",
            "# TYPE cordon_event_resyncs counter",
            "# TYPE cordon_events_pruned counter",
            "# TYPE cordon_event_catchups counter",
            "cordon_http_requests_total{method=\"POST\",route=\"/api/machines/{id}/isolate\",status=\"201\"} 1",
            "cordon_http_request_duration_seconds_count{route=\"/api/machines/{id}/isolate\"} 1",
            "cordon_store_commit_seconds_count 1",
            "cordon_machine_actions{type=\"Isolate\",status=\"Pending\"} 0",
            "cordon_action_completion_seconds_count{type=\"Unisolate\",status=\"TimeOut\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        let build = format!(
            "cordon_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn unknown_methods_and_values_fall_into_one_label() {
        let metrics = Metrics::new();
        let odd = Method::from_bytes(b"BREW").unwrap();
        metrics.observe_request(&odd, UNMATCHED, StatusCode::NOT_FOUND, Duration::ZERO);
        metrics.set_action_counts(&[("Wipe".into(), "Strange".into(), 3)]);
        let text = metrics.encode();
        assert!(text.contains("method=\"other\""), "{text}");
        assert!(!text.contains("BREW"), "{text}");
        assert!(
            text.contains("cordon_machine_actions{type=\"other\",status=\"other\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn the_metrics_listener_answers_only_get_metrics() {
        let metrics = Metrics::new();
        assert_eq!(
            answer(&metrics, &Method::GET, "/metrics").status(),
            StatusCode::OK
        );
        let post = answer(&metrics, &Method::POST, "/metrics");
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET");
        assert_eq!(
            answer(&metrics, &Method::GET, "/").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            answer(&metrics, &Method::GET, "/metrics/x").status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn metrics_listen_parses_off_and_addresses_and_refuses_the_rest() {
        assert_eq!(MetricsListen::parse("off"), Ok(MetricsListen::Off));
        assert_eq!(MetricsListen::parse("OFF"), Ok(MetricsListen::Off));
        assert_eq!(
            MetricsListen::parse("0.0.0.0:9100"),
            Ok(MetricsListen::Given("0.0.0.0:9100".parse().unwrap()))
        );
        assert_eq!(
            MetricsListen::parse("[::1]:9464"),
            Ok(MetricsListen::Given("[::1]:9464".parse().unwrap()))
        );
        for bad in ["", "9464", "localhost:9464", "127.0.0.1", "on"] {
            let error = MetricsListen::parse(bad).unwrap_err();
            assert!(error.contains("127.0.0.1:9464"), "{error}");
        }
    }

    impl Metrics {
        fn committed_for_test(&self) {
            store::StoreObserver::committed(self, Duration::from_micros(700));
        }
    }
}
