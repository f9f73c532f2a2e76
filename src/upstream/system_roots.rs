//! The system's trusted roots for HTTPS upstreams, read on demand from the hashed directory.
//!
//! OpenSSL's default trust is a bundle file (`SSL_CERT_FILE`; on Debian
//! `/etc/ssl/certs/ca-certificates.crt`, about 140 roots) plus a hashed directory (`SSL_CERT_DIR`,
//! one file per root named after its subject hash). Every TLS context that loads the defaults
//! parses the whole bundle into a store of its own, and Sluice has five: Pingora builds one per
//! connector and HTTP version (Sluice's connector and the proxy service's), the OTLP exporter's
//! client one more. Together they held about 6 MiB of a 35 MiB idle sidecar. The hashed directory
//! holds the same roots; OpenSSL reads one only when a chain names it as issuer and keeps it in
//! that store, so a pooled upstream pays one file read per root it uses.
//!
//! Hence, before anything builds a TLS context: when the operator chose no bundle
//! (`SSL_CERT_FILE` unset) and a certificate directory holds hashed entries, `SSL_CERT_FILE`
//! names an empty file and `SSL_CERT_DIR` that directory. A system without such a directory
//! (some distributions ship only the bundle) keeps the bundle.

use std::path::{Path, PathBuf};

/// The environment variables OpenSSL reads its default trust from.
const CERT_FILE_VAR: &str = "SSL_CERT_FILE";
const CERT_DIR_VAR: &str = "SSL_CERT_DIR";

/// A bundle with no certificate in it: OpenSSL loads nothing from it and goes on to the directory.
const EMPTY_BUNDLE: &str = "/dev/null";

/// Where the system roots are read from, for the start-up log.
#[derive(Debug, PartialEq, Eq)]
pub enum SystemRoots {
    /// `SSL_CERT_FILE` was set: the operator's bundle, loaded in full.
    OperatorBundle(PathBuf),
    /// One root at a time from this hashed directory, when a chain needs it.
    OnDemand(PathBuf),
    /// No hashed directory was found: the bundle, loaded in full by every TLS context.
    Bundle,
}

/// Points OpenSSL's default trust at the hashed directory when there is one (see the module
/// docs). Sets environment variables, so it must run before any thread starts.
pub fn read_on_demand() -> SystemRoots {
    if let Some(bundle) = std::env::var_os(CERT_FILE_VAR) {
        return SystemRoots::OperatorBundle(bundle.into());
    }
    // The operator's `SSL_CERT_DIR` first, then the usual places.
    let candidates = openssl_probe::probe().cert_dir;
    let Some(dir) = candidates.into_iter().find(|dir| has_hashed_entries(dir)) else {
        return SystemRoots::Bundle;
    };
    if std::env::var_os(CERT_DIR_VAR).is_none() {
        std::env::set_var(CERT_DIR_VAR, &dir);
    }
    std::env::set_var(CERT_FILE_VAR, EMPTY_BUNDLE);
    SystemRoots::OnDemand(dir)
}

/// Whether `dir` holds at least one entry OpenSSL's directory lookup can find.
fn has_hashed_entries(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries
        .flatten()
        .any(|entry| entry.file_name().to_str().is_some_and(is_hashed_name))
}

/// `HHHHHHHH.N`: the subject hash in 8 hex digits and a sequence number (`c_rehash`'s names).
fn is_hashed_name(name: &str) -> bool {
    let Some((hash, index)) = name.split_once('.') else {
        return false;
    };
    hash.len() == 8
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
        && !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_names_are_told_from_other_files() {
        for name in ["002c0b4f.0", "ABCDEF01.12"] {
            assert!(is_hashed_name(name), "{name}");
        }
        for name in [
            "ca-certificates.crt",
            "002c0b4f",
            "002c0b4f.",
            "002c0b4f.pem",
            "02c0b4f.0",
            "002c0b4g.0",
            "ISRG_Root_X1.pem",
        ] {
            assert!(!is_hashed_name(name), "{name}");
        }
    }

    #[test]
    fn a_directory_counts_only_with_a_hashed_entry() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!has_hashed_entries(dir.path()));
        std::fs::write(dir.path().join("ca-certificates.crt"), "").unwrap();
        assert!(!has_hashed_entries(dir.path()));
        std::fs::write(dir.path().join("5ad8a5d6.0"), "").unwrap();
        assert!(has_hashed_entries(dir.path()));
        assert!(!has_hashed_entries(&dir.path().join("missing")));
    }
}
