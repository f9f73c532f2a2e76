//! `forward:` and `resolve:` compiled: the forward listener's rules, its CA (loaded from its
//! files, or generated at first start), and the name-resolution overrides.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::super::schema::{CaSpec, ForwardSpec, PolicyFile};
use super::super::{PolicyError, SharedState};
use super::Sources;
use crate::forward::ca::{self, CaError, CaFile, CertificateAuthority};
use crate::forward::rules::{normalize_host, CaOrigin, ForwardPolicy, HostPattern};
use crate::upstream::ResolveOverrides;

/// What loading a policy does when neither of its CA files exists (and `generate` is on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MissingCa {
    /// `sluice check`: a CA would be generated at startup; one is made in memory, nothing is
    /// written.
    #[default]
    Describe,
    /// The first load of `sluice run`: generate the CA and write its files.
    Generate,
    /// A reload: the files went missing, which is an error (the app trusts the CA it has).
    Refuse,
}

impl SharedState {
    pub fn set_missing_ca(&self, mode: MissingCa) {
        *self.missing_ca.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    fn missing_ca(&self) -> MissingCa {
        *self.missing_ca.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The CA for these files: the existing one (and its minted certificates) if they are
    /// unchanged.
    fn certificate_authority(
        &self,
        certificate: &[u8],
        key: &[u8],
        cache_size: u64,
    ) -> Result<Arc<CertificateAuthority>, (CaFile, CaError)> {
        let mut identity = Sha256::new();
        identity.update(Sha256::digest(certificate));
        identity.update(Sha256::digest(key));
        identity.update(cache_size.to_le_bytes());
        let identity = identity.finalize().to_vec();
        let mut slot = self
            .certificate_authority
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((current, authority)) = slot.as_ref() {
            if *current == identity {
                return Ok(authority.clone());
            }
        }
        let authority = Arc::new(CertificateAuthority::from_pem(
            certificate,
            key,
            cache_size,
        )?);
        *slot = Some((identity, authority.clone()));
        Ok(authority)
    }
}

/// The `resolve:` overrides, every bad entry reported.
pub(super) fn compile_resolve(
    file: &PolicyFile,
    errors: &mut Vec<PolicyError>,
) -> ResolveOverrides {
    let mut overrides = ResolveOverrides::default();
    for (host, address) in &file.resolve {
        let host = normalize_host(host);
        if let Err(e) = overrides.insert(&host, &address.value) {
            let error = PolicyError::new(format!("resolve.{host}"), e.to_string());
            errors.push(error.at(address.referenced));
        }
    }
    overrides
}

/// The forward listener's rules when `listen.forward` is set (`forward:` or its defaults).
pub(super) fn compile_forward(
    file: &PolicyFile,
    shared: &SharedState,
    sources: &mut Sources,
    errors: &mut Vec<PolicyError>,
) -> Option<Arc<ForwardPolicy>> {
    let Some(_) = &file.listen.forward else {
        if let Some(spec) = &file.forward {
            errors.push(
                PolicyError::new("forward", "applies when `listen.forward` is set")
                    .at(spec.referenced),
            );
        }
        return None;
    };
    let default = ForwardSpec::default();
    let (spec, at) = match &file.forward {
        Some(spec) => (&spec.value, spec.referenced),
        None => (&default, serde_saphyr::Location::UNKNOWN),
    };
    let before = errors.len();
    let mut patterns = |list: &[serde_saphyr::Spanned<String>], path: &str| -> Vec<HostPattern> {
        list.iter()
            .enumerate()
            .filter_map(|(i, host)| {
                HostPattern::parse(&host.value)
                    .map_err(|e| {
                        let at = if host.referenced == serde_saphyr::Location::UNKNOWN {
                            at
                        } else {
                            host.referenced
                        };
                        errors.push(PolicyError::new(format!("{path}[{i}]"), e.to_string()).at(at))
                    })
                    .ok()
            })
            .collect()
    };
    let intercept_hosts = patterns(&spec.intercept.hosts, "forward.intercept.hosts");
    let tunnel_hosts = patterns(&spec.tunnel.hosts, "forward.tunnel.hosts");
    for (path, ports) in [
        ("forward.intercept.ports", &spec.intercept.ports),
        ("forward.tunnel.ports", &spec.tunnel.ports),
    ] {
        if ports.contains(&0) {
            errors.push(PolicyError::new(path, "0 is not a port").at(at));
        }
    }
    if spec.certificate_cache == 0 {
        errors.push(PolicyError::new("forward.certificate_cache", "must be at least 1").at(at));
    }
    for (path, duration) in [
        ("forward.handshake_timeout", spec.handshake_timeout.0),
        (
            "forward.tunnel.connect_timeout",
            spec.tunnel.connect_timeout.0,
        ),
        ("forward.tunnel.idle_timeout", spec.tunnel.idle_timeout.0),
    ] {
        if duration.is_zero() {
            errors.push(PolicyError::new(path, "must be more than 0").at(at));
        }
    }
    let ca = compile_ca(
        &spec.ca,
        spec.certificate_cache.max(1),
        shared,
        sources,
        errors,
    );
    if errors.len() > before {
        return None;
    }
    let (ca, ca_origin) = ca?;
    Some(Arc::new(ForwardPolicy {
        intercept_hosts,
        intercept_ports: spec.intercept.ports.clone(),
        tunnel_hosts,
        tunnel_ports: spec.tunnel.ports.clone(),
        allow_private: spec.tunnel.allow_private,
        connect_timeout: spec.tunnel.connect_timeout.0,
        idle_timeout: spec.tunnel.idle_timeout.0,
        handshake_timeout: spec.handshake_timeout.0,
        ca,
        ca_origin,
    }))
}

/// The CA from its two files (part of the policy: hashed and watched), generated when neither
/// exists on the first start.
fn compile_ca(
    spec: &CaSpec,
    cache_size: u64,
    shared: &SharedState,
    sources: &mut Sources,
    errors: &mut Vec<PolicyError>,
) -> Option<(Arc<CertificateAuthority>, CaOrigin)> {
    let cert_path = sources.folder.join(&spec.cert_file.value);
    let key_path = sources.folder.join(&spec.key_file.value);
    let cert_error = |message: String| {
        PolicyError::new("forward.ca.cert_file", message).at(spec.cert_file.referenced)
    };
    let key_error = |message: String| {
        PolicyError::new("forward.ca.key_file", message).at(spec.key_file.referenced)
    };
    match (cert_path.exists(), key_path.exists()) {
        (false, false) if spec.generate => match shared.missing_ca() {
            MissingCa::Describe => {
                // Nothing is written by a check; the CA it makes is a stand-in, thrown away.
                return CertificateAuthority::generate(cache_size)
                    .map(|(authority, _key)| {
                        (
                            Arc::new(authority),
                            CaOrigin::ToBeGenerated(cert_path.clone()),
                        )
                    })
                    .map_err(|e| errors.push(cert_error(e.to_string())))
                    .ok();
            }
            MissingCa::Generate => {
                if let Err(e) = generate(&cert_path, &key_path, cache_size) {
                    errors.push(cert_error(e.to_string()));
                    return None;
                }
            }
            MissingCa::Refuse => {
                errors.push(cert_error(format!(
                    "neither `{}` nor `{}` exists: a CA is generated at startup only, never on reload (restore the files, or restart to make a new CA the app must then trust)",
                    cert_path.display(),
                    key_path.display()
                )));
                return None;
            }
        },
        (false, false) => {
            errors.push(cert_error(format!(
                "`{}` does not exist (and `generate: false`): mount the CA's certificate and key, or set `generate: true`",
                cert_path.display()
            )));
            return None;
        }
        (true, false) => {
            errors.push(key_error(format!(
                "`{}` does not exist, but the certificate does: give both files (or neither, to have a CA generated at startup)",
                key_path.display()
            )));
            return None;
        }
        (false, true) => {
            errors.push(cert_error(format!(
                "`{}` does not exist, but the key does: give both files (or neither, to have a CA generated at startup)",
                cert_path.display()
            )));
            return None;
        }
        (true, true) => {}
    }
    let certificate = sources
        .read(&spec.cert_file.value)
        .map_err(|message| errors.push(cert_error(message)))
        .ok();
    let key = sources
        .read(&spec.key_file.value)
        .map_err(|message| errors.push(key_error(message)))
        .ok();
    let ((cert_path, certificate), (key_path, key)) = (certificate?, key?);
    shared
        .certificate_authority(&certificate, &key, cache_size)
        .map_err(|(file, e)| {
            errors.push(match file {
                CaFile::Certificate => cert_error(format!("`{}` {e}", cert_path.display())),
                CaFile::Key => key_error(format!("`{}` {e}", key_path.display())),
            })
        })
        .ok()
        .map(|authority| (authority, CaOrigin::Files))
}

#[derive(Debug, thiserror::Error)]
enum GenerateError {
    #[error("cannot make a CA: {0}")]
    Make(#[from] CaError),
    #[error("cannot write the generated CA to `{}` and `{}`: {source}", certificate.display(), key.display())]
    Write {
        certificate: PathBuf,
        key: PathBuf,
        source: std::io::Error,
    },
}

fn generate(cert_path: &Path, key_path: &Path, cache_size: u64) -> Result<(), GenerateError> {
    let (authority, key_pem) = CertificateAuthority::generate(cache_size)?;
    ca::write_generated(cert_path, key_path, &authority, &key_pem).map_err(|source| {
        GenerateError::Write {
            certificate: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            source,
        }
    })?;
    tracing::info!(
        target: "sluice::forward",
        certificate = %cert_path.display(),
        fingerprint = %authority.fingerprint,
        "generated a new CA; the app must trust its certificate (SSL_CERT_FILE, REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS)"
    );
    Ok(())
}
