//! JWT bearer tokens instead of Sluice keys: HS256 with a shared secret, or RS256/ES256 with
//! public keys from a JWKS file. `exp` is required and `nbf` honoured; `alg: none` and any
//! algorithm not configured are refused before a signature is even looked at.

use std::collections::HashMap;

use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// `auth: { mode: jwt, jwt: {...} }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    /// Accepted algorithms: any of HS256, RS256, ES256.
    pub algorithms: Vec<String>,
    /// HS256: a file holding the shared secret (e.g. a mounted Secret); read on (re)load.
    #[serde(default)]
    pub hs256_secret_file: Option<String>,
    /// RS256/ES256: a JWKS file (`{"keys": [...]}`); a token's `kid` picks the key.
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// The claim naming the tenant.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// The claim naming the tier; without it the tenant's declared tier applies.
    #[serde(default = "default_tier_claim")]
    pub tier_claim: String,
    /// Required `iss`, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[serde(default)]
    pub leeway_seconds: u64,
}

fn default_tenant_claim() -> String {
    "tenant".to_owned()
}

fn default_tier_claim() -> String {
    "tier".to_owned()
}

/// The key material, read by the process from the files the settings name.
#[derive(Default)]
pub struct JwtMaterial {
    pub hs256_secret: Option<Vec<u8>>,
    pub jwks: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtBuildError {
    #[error("unsupported algorithm `{0}` (use HS256, RS256 or ES256)")]
    Algorithm(String),
    #[error("no algorithms listed")]
    NoAlgorithms,
    #[error("HS256 needs `hs256_secret_file` (a non-empty secret)")]
    MissingSecret,
    #[error("RS256/ES256 need `jwks_file`")]
    MissingJwks,
    #[error("the JWKS file is not valid: {0}")]
    Jwks(String),
}

/// Why a token was refused; every one is a 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm {0} is not accepted here")]
    Algorithm(String),
    #[error("no key matches the token's `kid`")]
    UnknownKey,
    #[error("invalid token signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token rejected: {0}")]
    Claims(String),
}

pub struct JwtValidator {
    algorithms: Vec<Algorithm>,
    secret: Option<DecodingKey>,
    /// JWKS keys by `kid`, with the algorithm each is for.
    keys: HashMap<String, (Algorithm, DecodingKey)>,
    validation: Validation,
    pub tenant_claim: String,
    pub tier_claim: String,
}

impl std::fmt::Debug for JwtValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtValidator")
            .field("algorithms", &self.algorithms)
            .field("jwks_keys", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl JwtValidator {
    pub fn new(settings: &JwtSettings, material: JwtMaterial) -> Result<Self, JwtBuildError> {
        let algorithms = settings
            .algorithms
            .iter()
            .map(|name| match name.as_str() {
                "HS256" => Ok(Algorithm::HS256),
                "RS256" => Ok(Algorithm::RS256),
                "ES256" => Ok(Algorithm::ES256),
                other => Err(JwtBuildError::Algorithm(other.to_owned())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(JwtBuildError::NoAlgorithms);
        }
        let secret = if algorithms.contains(&Algorithm::HS256) {
            match material.hs256_secret.filter(|s| !s.is_empty()) {
                Some(secret) => Some(DecodingKey::from_secret(&secret)),
                None => return Err(JwtBuildError::MissingSecret),
            }
        } else {
            None
        };
        let mut keys = HashMap::new();
        if algorithms.iter().any(|a| *a != Algorithm::HS256) {
            let jwks = material.jwks.ok_or(JwtBuildError::MissingJwks)?;
            let set: JwkSet =
                serde_json::from_str(&jwks).map_err(|e| JwtBuildError::Jwks(e.to_string()))?;
            for (index, jwk) in set.keys.iter().enumerate() {
                let key =
                    DecodingKey::from_jwk(jwk).map_err(|e| JwtBuildError::Jwks(e.to_string()))?;
                let algorithm = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    _ => {
                        return Err(JwtBuildError::Jwks(
                            "only RSA and P-256 keys are supported".into(),
                        ))
                    }
                };
                let kid = jwk
                    .common
                    .key_id
                    .clone()
                    .unwrap_or_else(|| index.to_string());
                keys.insert(kid, (algorithm, key));
            }
        }
        let mut validation = Validation::new(algorithms[0]);
        validation.leeway = settings.leeway_seconds;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &settings.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        Ok(Self {
            algorithms,
            secret,
            keys,
            validation,
            tenant_claim: settings.tenant_claim.clone(),
            tier_claim: settings.tier_claim.clone(),
        })
    }

    /// Verifies a token and returns its claims.
    pub fn validate(
        &self,
        token: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, TokenError> {
        // An unknown `alg` (including `none`) fails here: the library knows no such algorithm.
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let key = match header.alg {
            Algorithm::HS256 => self.secret.as_ref(),
            alg => {
                let by_kid = header.kid.as_deref().and_then(|kid| self.keys.get(kid));
                // A set with one key of the right kind needs no `kid`.
                let only = || {
                    let mut matching = self.keys.values().filter(|(a, _)| *a == alg);
                    match (matching.next(), matching.next()) {
                        (Some(one), None) => Some(one),
                        _ => None,
                    }
                };
                by_kid
                    .or_else(|| header.kid.is_none().then(only).flatten())
                    .filter(|(a, _)| *a == alg)
                    .map(|(_, key)| key)
            }
        }
        .ok_or(TokenError::UnknownKey)?;
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                JwtErrorKind::ExpiredSignature => TokenError::Expired,
                JwtErrorKind::ImmatureSignature => TokenError::NotYetValid,
                JwtErrorKind::InvalidSignature => TokenError::Signature,
                JwtErrorKind::InvalidToken
                | JwtErrorKind::Base64(_)
                | JwtErrorKind::Json(_)
                | JwtErrorKind::Utf8(_) => TokenError::Malformed,
                other => TokenError::Claims(format!("{other:?}")),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    /// A P-256 key made for these tests only.
    const TEST_EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgsabkHbCwNiGoK2fz
5SHKx17+d6nYKex4o6HFEQIFU1GhRANCAASijmoGT9QZ9NVG5ZkJlkOqCCB6ow5E
mSV7zfeWJu+bImrzTgPVnNCm67LNoWHsVFUfALtt2zHaD5l2lgXyk/qy
-----END PRIVATE KEY-----";
    const TEST_EC_JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","use":"sig","alg":"ES256",
        "x":"oo5qBk_UGfTVRuWZCZZDqgggeqMORJkle833libvmyI","y":"avNOA9Wc0Kbrss2hYexUVR8Au23bMdoPmXaWBfKT-rI"}]}"#;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn settings(algorithms: &[&str]) -> JwtSettings {
        JwtSettings {
            algorithms: algorithms.iter().map(|a| a.to_string()).collect(),
            hs256_secret_file: None,
            jwks_file: None,
            tenant_claim: default_tenant_claim(),
            tier_claim: default_tier_claim(),
            issuer: None,
            audience: None,
            leeway_seconds: 0,
        }
    }

    fn hs256(secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn es256(claims: serde_json::Value, kid: Option<&str>) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_owned);
        encode(
            &header,
            &claims,
            &EncodingKey::from_ec_pem(TEST_EC_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn hs_validator() -> JwtValidator {
        let material = JwtMaterial {
            hs256_secret: Some(b"s3cret".to_vec()),
            jwks: None,
        };
        JwtValidator::new(&settings(&["HS256"]), material).unwrap()
    }

    fn es_validator() -> JwtValidator {
        let material = JwtMaterial {
            hs256_secret: None,
            jwks: Some(TEST_EC_JWKS.into()),
        };
        JwtValidator::new(&settings(&["ES256"]), material).unwrap()
    }

    #[test]
    fn a_good_hs256_token_yields_its_claims() {
        let token = hs256(
            b"s3cret",
            json!({"tenant": "t", "tier": "pro", "exp": now() + 60}),
        );
        let claims = hs_validator().validate(&token).unwrap();
        assert_eq!(claims["tenant"], "t");
    }

    #[test]
    fn a_good_es256_token_verifies_with_the_jwks() {
        let validator = es_validator();
        let claims = json!({"tenant": "t", "exp": now() + 60});
        assert!(validator
            .validate(&es256(claims.clone(), Some("k1")))
            .is_ok());
        assert!(
            validator.validate(&es256(claims.clone(), None)).is_ok(),
            "one key needs no kid"
        );
        assert_eq!(
            validator.validate(&es256(claims, Some("other"))),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn expired_and_not_yet_valid_tokens_are_refused() {
        let validator = hs_validator();
        let expired = hs256(b"s3cret", json!({"tenant": "t", "exp": now() - 10}));
        assert_eq!(validator.validate(&expired), Err(TokenError::Expired));
        let early = hs256(
            b"s3cret",
            json!({"tenant": "t", "exp": now() + 60, "nbf": now() + 30}),
        );
        assert_eq!(validator.validate(&early), Err(TokenError::NotYetValid));
        let no_exp = hs256(b"s3cret", json!({"tenant": "t"}));
        assert!(validator.validate(&no_exp).is_err(), "exp is required");
    }

    #[test]
    fn wrong_signatures_are_refused() {
        let forged = hs256(b"not-the-secret", json!({"tenant": "t", "exp": now() + 60}));
        assert_eq!(hs_validator().validate(&forged), Err(TokenError::Signature));
    }

    #[test]
    fn algorithms_not_configured_are_refused() {
        // An ES256 token on an HS256-only route, and an HS256 token on an ES256-only route
        // (the classic key-confusion attack: the public key used as an HMAC secret).
        let es_token = es256(json!({"tenant": "t", "exp": now() + 60}), Some("k1"));
        assert!(matches!(
            hs_validator().validate(&es_token),
            Err(TokenError::Algorithm(_))
        ));
        let hs_token = hs256(
            TEST_EC_JWKS.as_bytes(),
            json!({"tenant": "t", "exp": now() + 60}),
        );
        assert!(matches!(
            es_validator().validate(&hs_token),
            Err(TokenError::Algorithm(_))
        ));
    }

    #[test]
    fn alg_none_is_refused() {
        let b64 = base64_url_nopad;
        let token = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(format!(r#"{{"tenant":"t","exp":{}}}"#, now() + 60).as_bytes())
        );
        assert_eq!(hs_validator().validate(&token), Err(TokenError::Malformed));
        assert_eq!(
            hs_validator().validate("not.a.jwt"),
            Err(TokenError::Malformed)
        );
    }

    fn base64_url_nopad(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }

    #[test]
    fn settings_are_checked_when_built() {
        assert!(matches!(
            JwtValidator::new(&settings(&["HS512"]), JwtMaterial::default()),
            Err(JwtBuildError::Algorithm(_))
        ));
        assert_eq!(
            JwtValidator::new(&settings(&["HS256"]), JwtMaterial::default()).unwrap_err(),
            JwtBuildError::MissingSecret
        );
        assert_eq!(
            JwtValidator::new(&settings(&["RS256"]), JwtMaterial::default()).unwrap_err(),
            JwtBuildError::MissingJwks
        );
        assert_eq!(
            JwtValidator::new(&settings(&[]), JwtMaterial::default()).unwrap_err(),
            JwtBuildError::NoAlgorithms
        );
    }
}
