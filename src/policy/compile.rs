//! From the file a user wrote to the policy the proxy runs: every error collected, none fatal
//! until the end, so `sluice check` shows them all at once.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderName, HeaderValue, Uri};
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};
use sluice_filters::{Chain, FilterSpec};

use super::error::PolicyError;
use super::interpolate::interpolate;
use super::schema::{PolicyFile, ProviderKind, RouteSpec, UpstreamSpec};
use super::{ListenAddrs, Policy, Route, ServerRuntime};
use crate::upstream::{AzureSettings, Upstream};

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn compile_text(text: &str, source: &Path, env: Env) -> Result<Policy, Vec<PolicyError>> {
    let hash = hex::encode(Sha256::digest(text.as_bytes()));
    let file: PolicyFile = serde_saphyr::from_str(text).map_err(|e| vec![parse_error(&e)])?;
    let mut errors = Vec::new();
    let listen = ListenAddrs {
        proxy: socket_addr(&file.listen.proxy, "listen.proxy", &mut errors),
        admin: socket_addr(&file.listen.admin, "listen.admin", &mut errors),
    };
    if listen.proxy == listen.admin && listen.proxy.port() != 0 {
        errors.push(
            PolicyError::new("listen.admin", "must differ from listen.proxy")
                .at(file.listen.admin.referenced),
        );
    }
    let server = ServerRuntime {
        threads: file.server.threads,
        drain_timeout: file.server.drain_timeout.0,
        upstream_pool_size: file.server.upstream_pool_size,
        client_body_timeout: file.server.client_body_timeout.0,
    };
    if server.threads == 0 {
        errors.push(PolicyError::new("server.threads", "must be at least 1"));
    }

    let mut upstreams = BTreeMap::new();
    for (name, spec) in &file.upstreams {
        let path = format!("upstreams.{name}");
        if let Some(upstream) = compile_upstream(name, spec, &path, env, &mut errors) {
            upstreams.insert(name.clone(), Arc::new(upstream));
        }
    }

    let mut routes = Vec::with_capacity(file.routes.len());
    let mut names = HashSet::new();
    for (index, spec) in file.routes.iter().enumerate() {
        let path = format!("routes[{index}]");
        if !names.insert(spec.value.name.as_str()) {
            errors.push(
                PolicyError::new(
                    &path,
                    format!("route name `{}` is used twice", spec.value.name),
                )
                .at(spec.referenced),
            );
        }
        if let Some(route) = compile_route(spec, &path, &upstreams, &file.upstreams, &mut errors) {
            routes.push(route);
        }
    }
    if file.routes.is_empty() {
        errors.push(PolicyError::new(
            "routes",
            "no routes: every request would get 404",
        ));
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    let redacted = serde_json::to_value(&file).unwrap_or_default();
    Ok(Policy {
        hash,
        loaded_at: SystemTime::now(),
        source: source.to_path_buf(),
        listen,
        server,
        routes,
        upstreams,
        redacted,
    })
}

/// serde-saphyr stops at the first structural error (unknown field, wrong type, bad syntax);
/// it comes with its line and column.
fn parse_error(error: &serde_saphyr::Error) -> PolicyError {
    let message = error.to_string();
    // The message may carry a rendered source snippet after its first line; the location is
    // reported separately, so keep the sentence.
    let first_line = message.lines().next().unwrap_or("invalid YAML").trim();
    // Drop serde-saphyr's own `error: line L column C:` lead; the location is reported apart.
    let sentence = first_line
        .strip_prefix("error:")
        .unwrap_or(first_line)
        .trim();
    let sentence = match sentence
        .strip_prefix("line ")
        .and_then(|rest| rest.split_once(": "))
    {
        Some((_, text)) => text,
        None => sentence,
    };
    let mut out = PolicyError::new("", sentence.to_owned());
    if let Some(location) = error.location() {
        out = out.at(location);
    }
    out
}

fn socket_addr(spec: &Spanned<String>, path: &str, errors: &mut Vec<PolicyError>) -> SocketAddr {
    spec.value.parse().unwrap_or_else(|_| {
        errors.push(
            PolicyError::new(
                path,
                format!("`{}` is not an address like 127.0.0.1:8787", spec.value),
            )
            .at(spec.referenced),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// Interpolates one string, recording every problem at the string's location.
fn resolve(
    template: &Spanned<String>,
    path: &str,
    env: Env,
    errors: &mut Vec<PolicyError>,
) -> Option<String> {
    match interpolate(&template.value, env) {
        Ok(value) => Some(value),
        Err(problems) => {
            errors.extend(
                problems
                    .into_iter()
                    .map(|p| PolicyError::new(path, p.to_string()).at(template.referenced)),
            );
            None
        }
    }
}

fn compile_upstream(
    name: &str,
    spec: &Spanned<UpstreamSpec>,
    path: &str,
    env: Env,
    errors: &mut Vec<PolicyError>,
) -> Option<Upstream> {
    let before = errors.len();
    let at = spec.referenced;
    let spec = &spec.value;

    let base_url_path = format!("{path}.base_url");
    let base = resolve(&spec.base_url, &base_url_path, env, errors)
        .and_then(|url| parse_base_url(&url, &base_url_path, spec.base_url.referenced, errors));

    let mut keys = Vec::with_capacity(spec.keys.len());
    for (i, key) in spec.keys.iter().enumerate() {
        let key_path = format!("{path}.keys[{i}]");
        if let Some(value) = resolve(&key.0, &key_path, env, errors) {
            if value.trim().is_empty() {
                errors.push(PolicyError::new(&key_path, "the key is empty").at(key.0.referenced));
            } else if HeaderValue::from_str(&value).is_err() {
                errors.push(
                    PolicyError::new(&key_path, "the key has characters not allowed in a header")
                        .at(key.0.referenced),
                );
            } else {
                keys.push(value);
            }
        }
    }

    let mut extra_headers = Vec::with_capacity(spec.headers.len());
    for (header, template) in &spec.headers {
        let header_path = format!("{path}.headers.{header}");
        let Ok(header_name) = HeaderName::from_bytes(header.as_bytes()) else {
            errors.push(
                PolicyError::new(&header_path, "invalid header name").at(template.0.referenced),
            );
            continue;
        };
        if let Some(value) = resolve(&template.0, &header_path, env, errors) {
            if value.is_empty() {
                // `${OPTIONAL:-}` unset: no header rather than an empty one.
                continue;
            }
            match HeaderValue::from_str(&value) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    extra_headers.push((header_name, value));
                }
                Err(_) => errors.push(
                    PolicyError::new(
                        &header_path,
                        "the value has characters not allowed in a header",
                    )
                    .at(template.0.referenced),
                ),
            }
        }
    }

    let is_azure = spec.provider == ProviderKind::AzureOpenai;
    if !is_azure && (spec.api_version.is_some() || !spec.deployments.is_empty()) {
        errors.push(
            PolicyError::new(
                path,
                "`api_version` and `deployments` apply to provider azure_openai only",
            )
            .at(at),
        );
    }
    let api_version = match &spec.api_version {
        Some(version) => resolve(version, &format!("{path}.api_version"), env, errors),
        None => is_azure.then(|| "2024-10-21".to_owned()),
    };

    let ca = spec.tls.ca_file.as_ref().and_then(|file| {
        let ca_path = format!("{path}.tls.ca_file");
        if base.as_ref().is_some_and(|(tls, ..)| !tls) {
            errors.push(
                PolicyError::new(&ca_path, "applies to https:// upstreams only")
                    .at(file.referenced),
            );
            return None;
        }
        load_ca(&file.value)
            .map_err(|message| errors.push(PolicyError::new(&ca_path, message).at(file.referenced)))
            .ok()
    });

    if errors.len() > before {
        return None;
    }
    let (tls, host, port, base_path) = base?;
    let authority = Upstream::authority_for(tls, &host, port)
        .map_err(|e| errors.push(PolicyError::new(&base_url_path, e.to_string()).at(at)))
        .ok()?;
    let credentials = keys
        .iter()
        .map(|key| spec.provider.credential_value(key))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| errors.push(PolicyError::new(format!("{path}.keys"), e.to_string()).at(at)))
        .ok()?;
    Some(Upstream {
        name: name.into(),
        provider: spec.provider,
        tls,
        host,
        port,
        authority,
        base_path,
        credentials,
        extra_headers,
        connect_timeout: spec.timeouts.connect.0,
        first_byte_timeout: spec.timeouts.first_byte.0,
        idle_timeout: spec.timeouts.idle.0,
        azure: AzureSettings {
            api_version,
            deployments: spec.deployments.clone(),
        },
        ca,
        next_credential: Default::default(),
    })
}

/// The certificates of a PEM file, for an upstream's trust store.
fn load_ca(file: &str) -> Result<Arc<pingora::protocols::tls::CaType>, String> {
    let pem = std::fs::read(file).map_err(|e| format!("cannot read `{file}`: {e}"))?;
    let certificates = pingora::tls::x509::X509::stack_from_pem(&pem)
        .map_err(|e| format!("`{file}` is not PEM certificates: {e}"))?;
    if certificates.is_empty() {
        return Err(format!("`{file}` holds no certificate"));
    }
    Ok(Arc::new(certificates.into_boxed_slice()))
}

/// `(tls, host, port, base_path)` from `http(s)://host[:port][/path]`.
fn parse_base_url(
    url: &str,
    path: &str,
    at: serde_saphyr::Location,
    errors: &mut Vec<PolicyError>,
) -> Option<(bool, String, u16, String)> {
    let mut fail = |message: String| {
        errors.push(PolicyError::new(path, message).at(at));
        None
    };
    let Ok(uri) = url.parse::<Uri>() else {
        return fail(format!("`{url}` is not a URL"));
    };
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return fail(format!(
                "`{url}` must start with https:// (or http:// for a local server)"
            ))
        }
    };
    let Some(authority) = uri.authority() else {
        return fail(format!("`{url}` has no host"));
    };
    if authority.as_str().contains('@') {
        return fail("credentials in the URL are not allowed; use `keys`".to_owned());
    }
    if uri.query().is_some() {
        return fail(format!("`{url}` must not have a query string"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Some((tls, host, port, base_path))
}

fn compile_route(
    spec: &Spanned<RouteSpec>,
    path: &str,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    declared: &BTreeMap<String, Spanned<UpstreamSpec>>,
    errors: &mut Vec<PolicyError>,
) -> Option<Route> {
    let before = errors.len();
    let at = spec.referenced;
    let spec = &spec.value;
    if spec.name.trim().is_empty() {
        errors.push(PolicyError::new(format!("{path}.name"), "must not be empty").at(at));
    }
    let prefix = &spec.matcher.path_prefix;
    if !prefix.starts_with('/') {
        errors.push(
            PolicyError::new(
                format!("{path}.match.path_prefix"),
                format!("`{prefix}` must start with /"),
            )
            .at(at),
        );
    }
    if !spec.rewrite_prefix.is_empty() && !spec.rewrite_prefix.starts_with('/') {
        errors.push(
            PolicyError::new(
                format!("{path}.rewrite_prefix"),
                format!("`{}` must be empty or start with /", spec.rewrite_prefix),
            )
            .at(at),
        );
    }
    if spec.max_body.0 == 0 {
        errors.push(PolicyError::new(format!("{path}.max_body"), "must be more than 0").at(at));
    }
    let upstream = upstreams.get(&spec.upstream.value).cloned();
    if upstream.is_none() && !declared.contains_key(&spec.upstream.value) {
        let known: Vec<&str> = declared.keys().map(String::as_str).collect();
        errors.push(
            PolicyError::new(
                format!("{path}.upstream"),
                format!(
                    "unknown upstream `{}` (declared: {})",
                    spec.upstream.value,
                    known.join(", ")
                ),
            )
            .at(spec.upstream.referenced),
        );
    }
    let specs = spec.filters.clone().unwrap_or_else(FilterSpec::defaults);
    for problem in FilterSpec::validate_order(&specs) {
        errors.push(PolicyError::new(format!("{path}.filters"), problem.to_string()).at(at));
    }
    let mut filters = Vec::with_capacity(specs.len());
    for (i, filter) in specs.iter().enumerate() {
        match filter.build() {
            Ok(built) => filters.push(built),
            Err(e) => {
                errors.push(PolicyError::new(format!("{path}.filters[{i}]"), e.to_string()).at(at))
            }
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(Route {
        name: spec.name.as_str().into(),
        hosts: spec
            .matcher
            .hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        path_prefix: prefix.trim_end_matches('/').to_owned(),
        rewrite_prefix: spec.rewrite_prefix.trim_end_matches('/').to_owned(),
        // Absent only when the upstream itself failed to compile, which is already an error.
        upstream: upstream?,
        max_body: spec.max_body.0,
        chain: Chain::new(filters),
    })
}
