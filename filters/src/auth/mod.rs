//! `auth`: who is calling. Callers present a Sluice key in the header their SDK already uses; the
//! key names a tenant, the tenant a tier, the tier the routes and models it may use. In
//! `passthrough` mode no Sluice key is asked for and the caller's provider key goes through.

mod directory;
pub mod jwt;
pub mod keys;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use http::{HeaderName, StatusCode};
use serde::{Deserialize, Serialize};

pub use directory::{Directory, DirectoryError, KeyRecord, Tenant, Tier};
use jwt::{JwtBuildError, JwtMaterial, JwtSettings, JwtValidator};
use keys::KeyHash;

use crate::chain::{Filter, Verdict};
use crate::exchange::{ErrorKind, Exchange, Rejection};
use crate::RequestHeader;

/// How a route identifies its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// A Sluice key is required (the default when the policy has tenants).
    Required,
    /// No Sluice key: the caller's provider key passes through; the tenant comes from a header.
    Passthrough,
    /// A JWT in the credential header names the tenant (and tier) in its claims.
    Jwt,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Required => "required",
            AuthMode::Passthrough => "passthrough",
            AuthMode::Jwt => "jwt",
        }
    }
}

/// A route's `auth:` — a mode (`auth: required`) or a map with settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum AuthSpec {
    Mode(AuthMode),
    Settings(Box<AuthSettings>),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub mode: AuthMode,
    /// Passthrough only: the request header naming the tenant (default: every caller is
    /// `anonymous`).
    #[serde(default)]
    pub tenant_header: Option<String>,
    /// Mode jwt only: how tokens are verified and read.
    #[serde(default)]
    pub jwt: Option<JwtSettings>,
}

impl AuthSpec {
    pub fn mode(&self) -> AuthMode {
        match self {
            AuthSpec::Mode(mode) => *mode,
            AuthSpec::Settings(settings) => settings.mode,
        }
    }

    fn tenant_header(&self) -> Option<&str> {
        match self {
            AuthSpec::Mode(_) => None,
            AuthSpec::Settings(settings) => settings.tenant_header.as_deref(),
        }
    }

    pub fn jwt(&self) -> Option<&JwtSettings> {
        match self {
            AuthSpec::Mode(_) => None,
            AuthSpec::Settings(settings) => settings.jwt.as_ref(),
        }
    }
}

/// The header a provider's SDKs carry their key in; Sluice keys travel in the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialHeader {
    /// `Authorization: Bearer <key>` (OpenAI and OpenAI-compatible SDKs).
    Bearer,
    /// `x-api-key: <key>` (Anthropic).
    XApiKey,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
    /// `Authorization: AWS4-HMAC-SHA256 Credential=<key>/<date>/<region>/<service>/aws4_request, …`
    /// (AWS SDKs, for Bedrock): the key is the access key id the caller signs with. The
    /// signature is not checked — the secret it was made with is the caller's own, any value —
    /// so the key is a bearer credential here as everywhere.
    SigV4,
}

impl CredentialHeader {
    pub fn name(self) -> HeaderName {
        match self {
            CredentialHeader::Bearer | CredentialHeader::SigV4 => http::header::AUTHORIZATION,
            CredentialHeader::XApiKey => HeaderName::from_static("x-api-key"),
            CredentialHeader::ApiKey => HeaderName::from_static("api-key"),
        }
    }
}

/// The access key id of a SigV4 `Authorization` header.
fn sigv4_access_key(value: &str) -> Option<&str> {
    let (algorithm, rest) = value.split_once(' ')?;
    if algorithm != "AWS4-HMAC-SHA256" {
        return None;
    }
    let credential = rest
        .split(',')
        .find_map(|part| part.trim().strip_prefix("Credential="))?;
    // `<key>/<date>/<region>/<service>/aws4_request`
    let (key, scope) = credential.split_once('/')?;
    (scope.split('/').count() == 4).then_some(key)
}

#[derive(Debug, thiserror::Error)]
pub enum AuthBuildError {
    #[error("`tenant_header` applies to mode passthrough only")]
    TenantHeaderNeedsPassthrough,
    #[error("invalid header name {0:?}")]
    HeaderName(String),
    #[error("mode jwt needs a `jwt:` block, and only mode jwt takes one")]
    JwtSettings,
    #[error("jwt: {0}")]
    Jwt(#[from] JwtBuildError),
}

/// The name a passthrough caller gets when it names no tenant.
pub const ANONYMOUS: &str = "anonymous";

#[derive(Debug)]
enum Mode {
    Keys,
    Passthrough { tenant_header: Option<HeaderName> },
    Jwt(Box<JwtValidator>),
}

#[derive(Debug)]
pub struct Auth {
    mode: Mode,
    credential: CredentialHeader,
    directory: Arc<Directory>,
    anonymous: Arc<str>,
}

fn unauthorized(message: impl Into<String>) -> Verdict {
    Verdict::Reject(Rejection::new(
        StatusCode::UNAUTHORIZED,
        ErrorKind::Authentication,
        message,
    ))
}

fn forbidden(message: String) -> Verdict {
    Verdict::Reject(Rejection::new(
        StatusCode::FORBIDDEN,
        ErrorKind::PermissionDenied,
        message,
    ))
}

impl Auth {
    /// `jwt_material` holds the key material a `jwt` route's settings name (read by the caller).
    pub fn new(
        spec: &AuthSpec,
        credential: CredentialHeader,
        directory: Arc<Directory>,
        jwt_material: Option<JwtMaterial>,
    ) -> Result<Self, AuthBuildError> {
        if (spec.mode() == AuthMode::Jwt) != spec.jwt().is_some() {
            return Err(AuthBuildError::JwtSettings);
        }
        let mode = match spec.mode() {
            AuthMode::Required | AuthMode::Jwt if spec.tenant_header().is_some() => {
                return Err(AuthBuildError::TenantHeaderNeedsPassthrough)
            }
            AuthMode::Required => Mode::Keys,
            AuthMode::Jwt => {
                let settings = spec.jwt().ok_or(AuthBuildError::JwtSettings)?;
                let material = jwt_material.unwrap_or_default();
                Mode::Jwt(Box::new(JwtValidator::new(settings, material)?))
            }
            AuthMode::Passthrough => Mode::Passthrough {
                tenant_header: spec
                    .tenant_header()
                    .map(|name| {
                        HeaderName::from_bytes(name.as_bytes())
                            .map_err(|_| AuthBuildError::HeaderName(name.to_owned()))
                    })
                    .transpose()?,
            },
        };
        Ok(Self {
            mode,
            credential,
            directory,
            anonymous: ANONYMOUS.into(),
        })
    }

    /// The key from the provider's credential header, refusing anything ambiguous.
    fn presented_key<'r>(&self, request: &'r RequestHeader) -> Result<&'r str, Verdict> {
        let name = self.credential.name();
        let mut values = request.headers.get_all(&name).iter();
        let Some(value) = values.next() else {
            return Err(unauthorized(format!(
                "missing credentials: send your Sluice key in the `{name}` header"
            )));
        };
        if values.next().is_some() {
            return Err(unauthorized(format!("more than one `{name}` header")));
        }
        let malformed = || {
            match self.credential {
            CredentialHeader::Bearer => {
                unauthorized("malformed `authorization` header: expected `Bearer <key>`")
            }
            CredentialHeader::SigV4 => unauthorized(
                "malformed `authorization` header: expected an AWS SigV4 signature made with your Sluice key as the access key id",
            ),
            _ => unauthorized(format!("malformed `{name}` header")),
        }
        };
        let text = value.to_str().map_err(|_| malformed())?.trim();
        let key = match self.credential {
            // The scheme is case-insensitive (RFC 9110 §11.1).
            CredentialHeader::Bearer => match text.split_once(' ') {
                Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
                _ => return Err(malformed()),
            },
            CredentialHeader::SigV4 => sigv4_access_key(text).ok_or_else(malformed)?,
            _ => text,
        };
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(malformed());
        }
        Ok(key)
    }

    fn check_tier(tier: &Tier, ex: &Exchange) -> Option<Verdict> {
        if !tier.allows_route(&ex.route) {
            return Some(forbidden(format!(
                "route `{}` is not allowed for tier `{}`",
                ex.route, tier.name
            )));
        }
        match ex.facts.model.as_deref() {
            Some(model) if !tier.allows_model(model) => Some(forbidden(format!(
                "model `{model}` is not allowed for tier `{}`",
                tier.name
            ))),
            _ => None,
        }
    }

    fn identify_by_key(&self, ex: &mut Exchange) -> Verdict {
        let key = match self.presented_key(&ex.request) {
            Ok(key) => key,
            Err(verdict) => return verdict,
        };
        let Some(record) = self.directory.key(&KeyHash::of(key)) else {
            return unauthorized("invalid Sluice key");
        };
        if record.revoked {
            return unauthorized("this Sluice key was revoked");
        }
        if let Some(expires) = record.expires {
            if expires <= SystemTime::now() {
                let when = humantime::format_rfc3339_seconds(expires);
                return unauthorized(format!("this Sluice key expired at {when}"));
            }
        }
        let tenant = &record.tenant;
        ex.tenant = Some(tenant.name.clone());
        ex.tier = Some(tenant.tier.name.clone());
        Self::check_tier(&tenant.tier, ex).unwrap_or(Verdict::Continue)
    }

    fn identify_by_token(&self, ex: &mut Exchange, validator: &JwtValidator) -> Verdict {
        let token = match self.presented_key(&ex.request) {
            Ok(token) => token,
            Err(verdict) => return verdict,
        };
        let claims = match validator.validate(token) {
            Ok(claims) => claims,
            Err(e) => return unauthorized(e.to_string()),
        };
        let claim = |name: &str| {
            claims
                .get(name)
                .and_then(|v| v.as_str())
                .filter(|v| !v.is_empty())
        };
        let Some(tenant) = claim(&validator.tenant_claim) else {
            return unauthorized(format!(
                "the token has no `{}` claim",
                validator.tenant_claim
            ));
        };
        let tier = match claim(&validator.tier_claim) {
            Some(name) => match self.directory.tier(name) {
                Some(tier) => tier.clone(),
                None => return forbidden(format!("the token names unknown tier `{name}`")),
            },
            None => match self.directory.tenant(tenant) {
                Some(declared) => declared.tier.clone(),
                None => {
                    return forbidden(format!(
                        "the token has no `{}` claim and tenant `{tenant}` is not declared",
                        validator.tier_claim
                    ))
                }
            },
        };
        ex.tenant = Some(tenant.into());
        ex.tier = Some(tier.name.clone());
        Self::check_tier(&tier, ex).unwrap_or(Verdict::Continue)
    }

    fn identify_by_header(&self, ex: &mut Exchange, header: Option<&HeaderName>) -> Verdict {
        let named = header
            .and_then(|name| ex.request.headers.get(name))
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
            .filter(|name| !name.is_empty() && name.len() <= 128);
        match named.and_then(|name| self.directory.tenant(name)) {
            Some(tenant) => {
                ex.tenant = Some(tenant.name.clone());
                ex.tier = Some(tenant.tier.name.clone());
                Self::check_tier(&tenant.tier, ex).unwrap_or(Verdict::Continue)
            }
            None => {
                ex.tenant = Some(match named {
                    Some(name) => name.into(),
                    None => self.anonymous.clone(),
                });
                Verdict::Continue
            }
        }
    }
}

#[async_trait]
impl Filter for Auth {
    fn name(&self) -> &'static str {
        "auth"
    }

    async fn on_request(&self, ex: &mut Exchange) -> Verdict {
        match &self.mode {
            Mode::Keys => self.identify_by_key(ex),
            Mode::Passthrough { tenant_header } => {
                self.identify_by_header(ex, tenant_header.as_ref())
            }
            Mode::Jwt(validator) => self.identify_by_token(ex, validator),
        }
    }

    fn on_upstream_request(&self, _ex: &Exchange, upstream: &mut RequestHeader) {
        // A Sluice key is Sluice's alone. The upstream request normally carries the upstream's
        // own key in this header (set after the filters run), so this only matters if it has none.
        if matches!(self.mode, Mode::Keys | Mode::Jwt(_)) {
            upstream.remove_header(&self.credential.name());
        }
    }
}

#[cfg(test)]
mod tests;
