//! Passwords kept out of messages and logs.

/// The URL with its password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_query_password(url);
    };
    let (userinfo, host, tail) = split_authority(rest);
    let tail = redact_query_password(tail);
    match userinfo.map(|u| {
        u.split_once(':')
            .map_or((u, false), |(user, _)| (user, true))
    }) {
        Some((user, true)) => format!("{scheme}://{user}:***@{host}{tail}"),
        Some((user, false)) => format!("{scheme}://{user}@{host}{tail}"),
        None => format!("{scheme}://{host}{tail}"),
    }
}

/// The host part of a URL (`db:5432`, or libpq's `h1:5432,h2:5432`), where it has one.
pub fn url_hosts(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    Some(split_authority(rest).1)
}

/// What follows a URL's `scheme://`, split into its user information, its host part and the
/// rest (path and query). The user information ends at the last `@` that a host follows: a
/// password may hold `/`, `?` or `@`, a host none of them. Where that is unclear, more is
/// taken for the user information, never less.
fn split_authority(rest: &str) -> (Option<&str>, &str, &str) {
    let at = rest
        .rmatch_indices('@')
        .map(|(i, _)| i)
        .find(|i| is_host(&rest[i + 1..]));
    let (userinfo, after) = match at {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    };
    let (host, tail) = after
        .find(['/', '?'])
        .map_or((after, ""), |i| after.split_at(i));
    (userinfo, host, tail)
}

/// Whether `text` starts with a host (and port) up to the path or query: what may follow the
/// user information of a URL. Several, separated by commas, are libpq's form for failover.
fn is_host(text: &str) -> bool {
    let host = text.split(['/', '?']).next().unwrap_or_default();
    host.chars().all(|c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']' | '%' | ',')
    })
}

/// URL parameters whose values are shown: the drivers' own, none of them secret. Any other
/// parameter's value is hidden: a password (`password=`, `sslpassword=`) or a mistyped one.
const SHOWN_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "application_name",
    "target_session_attrs",
    "options",
    "statement-cache-capacity",
    "charset",
    "collation",
    "socket",
    "timezone",
];

/// Hides the value of every query parameter not known to be harmless.
fn redact_query_password(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if SHOWN_URL_PARAMETERS.contains(&k) => format!("{k}={v}"),
            Some((k, _)) => format!("{k}=***"),
            None => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", params.join("&"))
}
