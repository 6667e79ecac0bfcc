//! The analyst console: a single-page application served at `/`, every
//! file embedded in the binary (`crates/server/console/`, no build step).
//!
//! The page routes (`/`, `/machines/{id}`, `/actions`, …) all answer with
//! the same `index.html`, with the tenant id filled in; the browser then
//! signs in through the built-in authority (authorization code with PKCE,
//! client [`CONSOLE_CLIENT_ID`](crate::signin::CONSOLE_CLIENT_ID)) and calls
//! the public API with the user's token. Every page is sent with a strict
//! Content-Security-Policy: scripts and styles only from this server (plus
//! the one inline import map, by its hash), no inline code, no other host.

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;

use crate::AppState;
use crate::error::ApiError;

/// One embedded file: its path under `/console/`, media type, contents.
struct Asset {
    path: &'static str,
    media_type: &'static str,
    body: &'static [u8],
}

macro_rules! assets {
    ($($path:literal => $media:expr),* $(,)?) => {
        &[$(Asset {
            path: $path,
            media_type: $media,
            body: include_bytes!(concat!("../console/", $path)),
        }),*]
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file the console is made of (a test checks that none in the
/// folder is missing here).
static ASSETS: &[Asset] = assets![
    "style.css" => "text/css; charset=utf-8",
    "app.js" => JS,
    "lib/api.js" => JS,
    "lib/auth.js" => JS,
    "lib/live.js" => JS,
    "lib/ui.js" => JS,
    "pages/machines.js" => JS,
    "pages/machine.js" => JS,
    "pages/actions.js" => JS,
    "pages/exclusions.js" => JS,
    "pages/audit.js" => JS,
    "vendor/preact.mjs" => JS,
    "vendor/hooks.mjs" => JS,
    "vendor/htm.mjs" => JS,
    "vendor/LICENSE.preact" => "text/plain; charset=utf-8",
    "vendor/LICENSE.htm" => "text/plain; charset=utf-8",
    "favicon.svg" => "image/svg+xml",
];

const INDEX: &str = include_str!("../console/index.html");
const TENANT_MARK: &str = "{{tenant}}";

/// The page's Content-Security-Policy: nothing from anywhere but this
/// origin, no inline script but the import map (allowed by its hash), no
/// inline style, no framing, forms only to this origin.
static CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src 'self' '{}'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        import_map_hash(INDEX)
    )
});

/// `sha256-…` of the inline `<script type="importmap">` of `html`.
fn import_map_hash(html: &str) -> String {
    let open = "<script type=\"importmap\">";
    let start = html.find(open).expect("index.html has an import map") + open.len();
    let end = start + html[start..].find("</script>").expect("import map closes");
    let digest =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &html.as_bytes()[start..end]);
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

/// A strong validator of an embedded file.
fn etag(body: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body);
    format!(
        "\"{}\"",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16])
    )
}

static ETAGS: LazyLock<Vec<String>> =
    LazyLock::new(|| ASSETS.iter().map(|a| etag(a.body)).collect());

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(page))
        .route("/machines/{id}", get(page))
        .route("/actions", get(page))
        .route("/exclusions", get(page))
        .route("/audit", get(page))
        .route("/console/{*path}", get(asset))
}

/// Headers every console response carries.
fn secure(response: &mut Response, cache: &'static str) {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Ok(csp) = HeaderValue::from_str(&CSP) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
}

/// The application's page, for every client-side route.
async fn page(State(state): State<Arc<AppState>>) -> Response {
    // The tenant id is a GUID the server made; nothing to escape.
    let html = INDEX.replace(TENANT_MARK, &state.tenant_id);
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    secure(&mut response, "no-store");
    response
}

/// An embedded file, revalidated by its ETag.
async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|a| a.path == path) else {
        return ApiError::not_found("The requested resource was not found.").into_response();
    };
    let asset = &ASSETS[index];
    let tag = &ETAGS[index];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.media_type)], asset.body).into_response()
    };
    if let Ok(value) = HeaderValue::from_str(tag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    secure(&mut response, "no-cache");
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of the console folder is embedded, and nothing else.
    #[test]
    fn every_console_file_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
        let mut found = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if path.is_dir() {
                    if name != "node_modules" {
                        dirs.push(path);
                    }
                    continue;
                }
                if matches!(
                    name.as_str(),
                    "index.html" | "package.json" | "package-lock.json"
                ) {
                    continue;
                }
                let relative = path.strip_prefix(&root).unwrap().to_string_lossy();
                found.push(relative.replace('\\', "/"));
            }
        }
        found.sort();
        let mut listed: Vec<String> = ASSETS.iter().map(|a| a.path.to_owned()).collect();
        listed.sort();
        assert_eq!(found, listed);
    }

    #[test]
    fn the_policy_allows_exactly_the_import_map() {
        let hash = import_map_hash(INDEX);
        assert!(CSP.contains(&format!("'{hash}'")));
        assert!(!CSP.contains("unsafe"));
        // The page has no other inline script or style.
        assert_eq!(
            INDEX.matches("<script").count(),
            2,
            "the import map and app.js"
        );
        assert!(INDEX.contains("<script type=\"module\" src=\"/console/app.js\"></script>"));
        assert!(!INDEX.contains("<style"));
        assert!(!INDEX.contains("style="));
        assert!(INDEX.contains(TENANT_MARK));
    }

    /// The console's own code never writes markup from text (what
    /// SECURITY.md promises about machine names, comments and the like).
    #[test]
    fn the_console_never_writes_markup_from_text() {
        for asset in ASSETS.iter().filter(|a| !a.path.starts_with("vendor/")) {
            let text = std::str::from_utf8(asset.body).unwrap();
            for word in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
            ] {
                assert!(!text.contains(word), "{} uses {word}", asset.path);
            }
        }
    }

    #[test]
    fn etags_differ_by_content() {
        assert_ne!(etag(b"a"), etag(b"b"));
        assert_eq!(etag(b"a"), etag(b"a"));
    }
}
