//! Absolute http(s) URLs read strictly: the redirect URIs of the sign-in
//! page ([`crate::signin`]) and the server's own public URL
//! (`--public-url`), by one parser.

/// A URL taken apart for comparison: scheme, host (lower case, IPv6
/// without brackets), effective port, and path.
#[derive(Debug, PartialEq)]
pub struct UrlParts {
    pub scheme: String,
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// Parses an absolute http(s) URL strictly: no user info, no fragment, a
/// host of letters, digits, `-` and `.` (or an IP literal), if there is
/// a port, one of 1 to 65535 written in digits only, and a path that
/// [`plain_path`] accepts, so that `https://127.0.0.1:8443.evil.com/` and
/// `http://localhost:99999999/` are not URLs at all rather than URLs on
/// 127.0.0.1 and localhost, and `https://host/app/../evil` is not a URL
/// under `/app`. A query is allowed. The error says what is wrong.
pub fn parse(uri: &str) -> Result<UrlParts, &'static str> {
    if uri.len() > 2048 {
        return Err("is longer than 2048 characters");
    }
    if uri.chars().any(|c| c.is_control()) {
        return Err("has a control character");
    }
    if uri.contains('#') {
        return Err("has a fragment (#)");
    }
    let parsed = uri
        .parse::<axum::http::Uri>()
        .map_err(|_| "is not an absolute URL")?;
    let scheme = parsed
        .scheme_str()
        .ok_or("is not an absolute URL")?
        .to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return Err("is not an http or https URL"),
    };
    let authority = parsed.authority().ok_or("has no host")?.as_str();
    if authority.contains('@') {
        return Err("has user info (@)");
    }
    // Host and port split by hand: `Uri` accepts any text after the colon.
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (literal, after) = rest.split_once(']').ok_or("has an invalid host")?;
        let _: std::net::Ipv6Addr = literal.parse().map_err(|_| "has an invalid host")?;
        (literal.to_ascii_lowercase(), after)
    } else {
        match authority.split_once(':') {
            Some((host, _)) => (host.to_ascii_lowercase(), &authority[host.len()..]),
            None => (authority.to_ascii_lowercase(), ""),
        }
    };
    if host.is_empty() {
        return Err("has no host");
    }
    let valid_host = host.parse::<std::net::IpAddr>().is_ok()
        || host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid_host {
        return Err("has an invalid host (letters, digits, - and . only, or an IP address)");
    }
    let port = match port {
        "" => default_port,
        _ => {
            const BAD_PORT: &str = "has an invalid port (1 to 65535, in digits)";
            let digits = port.strip_prefix(':').ok_or(BAD_PORT)?;
            if digits.is_empty() || digits.len() > 5 || !digits.chars().all(|c| c.is_ascii_digit())
            {
                return Err(BAD_PORT);
            }
            match digits.parse::<u16>() {
                Ok(0) | Err(_) => return Err(BAD_PORT),
                Ok(port) => port,
            }
        }
    };
    let path = parsed.path();
    if !plain_path(path) {
        return Err("has a . or .. segment, %2f or \\ in its path");
    }
    Ok(UrlParts {
        scheme,
        host,
        port,
        path: path.to_owned(),
    })
}

/// Whether a URL path means what its text says: no `.` or `..` segment,
/// raw or percent-encoded in any case (`%2e`, `.%2E`), which a browser
/// resolves before following the URL, and no `/` hidden as `%2f` nor
/// written `\` (which browsers read as `/` in http(s) URLs).
pub fn plain_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    !lower.contains("%2f")
        && !lower.contains('\\')
        && lower
            .split('/')
            .all(|segment| !matches!(segment.replace("%2e", ".").as_str(), "." | ".."))
}

/// Checks the server's public URL (`--public-url`): an absolute `https://`
/// URL with a host, an optional port of 1 to 65535 in digits and an
/// optional path, without user info, query or fragment, as [`parse`] reads
/// it. Returns it without its trailing slashes, or what is wrong with it.
pub fn public_url(url: &str) -> Result<String, String> {
    let wrong = |what: &str| {
        format!(
            "{:?} {what}: give an absolute https URL with a host, an optional port \
             (1 to 65535) and an optional path, without user info, query or fragment, \
             such as https://cordon.example.com:8443",
            url.chars().take(200).collect::<String>()
        )
    };
    if !url.starts_with("https://") {
        return Err(wrong("does not start with https://"));
    }
    if url.contains('?') {
        return Err(wrong("has a query (?)"));
    }
    let url = url.trim_end_matches('/');
    parse(url).map_err(wrong)?;
    Ok(url.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_urls_are_absolute_https_urls_with_a_host_and_nothing_else() {
        for (ok, kept) in [
            ("https://cordon.example.com", "https://cordon.example.com"),
            ("https://cordon.example.com/", "https://cordon.example.com"),
            (
                "https://cordon.example.com:8443",
                "https://cordon.example.com:8443",
            ),
            ("https://x:65535/a/b/", "https://x:65535/a/b"),
            ("https://127.0.0.1:1/cordon", "https://127.0.0.1:1/cordon"),
            ("https://[::1]:8443/", "https://[::1]:8443"),
        ] {
            assert_eq!(public_url(ok).as_deref(), Ok(kept), "{ok}");
        }
        for (bad, why) in [
            ("http://x", "https://"),
            ("x.example.com", "https://"),
            ("HTTPS://x", "https://"),
            ("https://", "not an absolute URL"),
            ("https:///a", ""),
            ("https://u:p@x", "user info"),
            ("https://x@y", "user info"),
            ("https://x:8443.evil.com", "port"),
            ("https://x:99999", "port"),
            ("https://x:0", "port"),
            ("https://x:", "port"),
            ("https://x:+1", "port"),
            ("https://x/a?b", "query"),
            ("https://x/a?", "query"),
            ("https://x?b", "query"),
            ("https://x/a#f", "fragment"),
            ("https://x#", "fragment"),
            ("https://x/a/../b", ".."),
            ("https://x/a/%2E%2E/b", ".."),
            ("https://x/a%2fb", "%2f"),
            ("https://x_y", "host"),
            ("https://[::1", ""),
            ("https://x/a\u{7}", "control"),
        ] {
            let error = public_url(bad).expect_err(bad);
            assert!(error.contains(why), "{bad}: {error}");
            assert!(error.contains("absolute https URL"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_host_is_read_for_the_certificate() {
        let host = |url: &str| parse(url).unwrap().host;
        assert_eq!(
            host("https://Cordon.Example.com:8443/x"),
            "cordon.example.com"
        );
        assert_eq!(host("https://[::1]:8443"), "::1");
        assert_eq!(host("https://10.0.0.1"), "10.0.0.1");
    }
}
