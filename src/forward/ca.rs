//! The sidecar's certificate authority: loaded from PEM files (a mounted Secret) or generated
//! at first start, it mints a leaf certificate for each intercepted host on first use (rcgen),
//! kept in a bounded cache. The private key is read from its file and kept in memory; it is
//! never written anywhere but its own file, and never shown (no `Debug`, no error quotes it).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pingora::tls::pkey::{PKey, Private};
use pingora::tls::x509::X509;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// How long a minted leaf certificate is valid, and how long it stays cached (shorter, so a
/// cached certificate is never near its end).
const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
const LEAF_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Clients with a clock slightly behind still accept a certificate minted just now.
const BACKDATE: Duration = Duration::from_secs(3600);
/// A generated CA's lifetime.
const GENERATED_CA_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("holds no PEM certificate")]
    NoCertificate,
    #[error("is not a CA certificate (basicConstraints CA:TRUE is missing)")]
    NotACa,
    #[error("is not a valid X.509 certificate: {0}")]
    BadCertificate(String),
    #[error("expired on {0}")]
    Expired(String),
    #[error("is not valid before {0}")]
    NotYetValid(String),
    // The key's parser errors are not quoted: the caller shows this message for a secret file.
    #[error("is not an unencrypted PEM private key (PKCS#8, EC or RSA)")]
    BadKey,
    #[error("does not belong to the CA certificate (its public key differs)")]
    KeyMismatch,
    #[error("cannot sign certificates with this CA: {0}")]
    CannotSign(String),
    #[error("cannot make a certificate for `{host}`: {why}")]
    Leaf { host: String, why: String },
}

/// A certificate Sluice presents for one intercepted host.
pub struct LeafCertificate {
    pub certificate: X509,
}

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM: public, for the app's trust store.
    pub certificate_pem: String,
    /// SHA-256 of the CA certificate's DER, hex: how the CA is named in logs.
    pub fingerprint: String,
    pub subject: String,
    /// One key for every minted leaf: minting then costs one signature, no key generation.
    leaf_key: KeyPair,
    leaf_key_openssl: PKey<Private>,
    leaves: moka::sync::Cache<String, Arc<LeafCertificate>>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject", &self.subject)
            .field("fingerprint", &self.fingerprint)
            .field("cached_leaves", &self.leaves.entry_count())
            .finish_non_exhaustive()
    }
}

/// Which file a load problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaFile {
    Certificate,
    Key,
}

impl CertificateAuthority {
    /// From the PEM files' bytes; checks that the certificate is a CA valid now, that the key
    /// is its own, and that a leaf certificate can be made with them.
    pub fn from_pem(
        certificate_pem: &[u8],
        key_pem: &[u8],
        cache_size: u64,
    ) -> Result<Self, (CaFile, CaError)> {
        let cert = |e| (CaFile::Certificate, e);
        let key = |e| (CaFile::Key, e);
        let certificate = X509::stack_from_pem(certificate_pem)
            .map_err(|e| cert(CaError::BadCertificate(e.to_string())))?
            .into_iter()
            .next()
            .ok_or(cert(CaError::NoCertificate))?;
        let der = certificate
            .to_der()
            .map_err(|e| cert(CaError::BadCertificate(e.to_string())))?;
        check_ca_certificate(&der).map_err(cert)?;
        let private = PKey::private_key_from_pem(key_pem).map_err(|_| key(CaError::BadKey))?;
        let public = certificate
            .public_key()
            .map_err(|e| cert(CaError::BadCertificate(e.to_string())))?;
        if !public.public_eq(&private) {
            return Err(key(CaError::KeyMismatch));
        }
        // rcgen signs with ring, which reads PKCS#8; OpenSSL reads every usual PEM form.
        let pkcs8 = private
            .private_key_to_pkcs8()
            .map_err(|_| key(CaError::BadKey))?;
        let signing_key = KeyPair::try_from(pkcs8.as_slice())
            .map_err(|e| key(CaError::CannotSign(e.to_string())))?;
        let issuer = Issuer::from_ca_cert_der(&der.as_slice().into(), signing_key)
            .map_err(|e| cert(CaError::BadCertificate(e.to_string())))?;
        let pem = certificate
            .to_pem()
            .map_err(|e| cert(CaError::BadCertificate(e.to_string())))?;
        let authority = Self::new(
            issuer,
            String::from_utf8_lossy(&pem).into_owned(),
            &der,
            cache_size,
        )
        .map_err(cert)?;
        // Mint once now: an unusable CA (a key type ring cannot sign with, key usages that
        // forbid signing) is a load error, not a failed handshake later.
        authority
            .mint("sluice-ca-check.invalid")
            .map_err(|e| cert(CaError::CannotSign(e.to_string())))?;
        Ok(authority)
    }

    /// A new CA (ECDSA P-256), and its key as PEM for the key file.
    pub fn generate(cache_size: u64) -> Result<(Self, String), CaError> {
        let signing_key = KeyPair::generate().map_err(|e| CaError::CannotSign(e.to_string()))?;
        let key_pem = signing_key.serialize_pem();
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        let suffix = hex::encode(rand::random::<[u8; 4]>());
        name.push(DnType::CommonName, format!("Sluice sidecar CA {suffix}"));
        name.push(DnType::OrganizationName, "Sluice");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + GENERATED_CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let certificate = params
            .self_signed(&signing_key)
            .map_err(|e| CaError::CannotSign(e.to_string()))?;
        let issuer = Issuer::new(params, signing_key);
        let (pem, der) = (certificate.pem(), certificate.der().to_vec());
        Ok((Self::new(issuer, pem, &der, cache_size)?, key_pem))
    }

    fn new(
        issuer: Issuer<'static, KeyPair>,
        certificate_pem: String,
        der: &[u8],
        cache_size: u64,
    ) -> Result<Self, CaError> {
        let leaf_key = KeyPair::generate().map_err(|e| CaError::CannotSign(e.to_string()))?;
        let leaf_key_openssl = PKey::private_key_from_der(&leaf_key.serialize_der())
            .map_err(|e| CaError::CannotSign(e.to_string()))?;
        let subject = x509_parser::parse_x509_certificate(der)
            .map(|(_, parsed)| parsed.subject().to_string())
            .unwrap_or_default();
        Ok(Self {
            issuer,
            certificate_pem,
            fingerprint: hex::encode(Sha256::digest(der)),
            subject,
            leaf_key,
            leaf_key_openssl,
            leaves: moka::sync::Cache::builder()
                .max_capacity(cache_size.max(1))
                .time_to_live(LEAF_CACHE_TTL)
                .build(),
        })
    }

    /// The certificate for `host` (normalised), minted on first use and then cached.
    pub fn leaf(&self, host: &str) -> Result<Arc<LeafCertificate>, CaError> {
        self.leaves
            .try_get_with(host.to_owned(), || self.mint(host).map(Arc::new))
            .map_err(|e| CaError::Leaf {
                host: host.to_owned(),
                why: e.to_string(),
            })
    }

    /// The key every leaf certificate is for.
    pub fn leaf_key(&self) -> &PKey<Private> {
        &self.leaf_key_openssl
    }

    fn mint(&self, host: &str) -> Result<LeafCertificate, CaError> {
        let leaf_error = |why: String| CaError::Leaf {
            host: host.to_owned(),
            why,
        };
        // `new` makes an IP address SAN for an address, a DNS name SAN otherwise.
        let mut params =
            CertificateParams::new(vec![host.to_owned()]).map_err(|e| leaf_error(e.to_string()))?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_VALIDITY;
        params.serial_number = Some(random_serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let minted = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(|e| leaf_error(e.to_string()))?;
        let certificate = X509::from_der(minted.der()).map_err(|e| leaf_error(e.to_string()))?;
        Ok(LeafCertificate { certificate })
    }
}

fn random_serial() -> SerialNumber {
    // Positive (high bit clear) and at most 20 bytes, as RFC 5280 asks.
    let mut bytes = rand::random::<[u8; 16]>();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn check_ca_certificate(der: &[u8]) -> Result<(), CaError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::BadCertificate(e.to_string()))?;
    if !parsed.is_ca() {
        return Err(CaError::NotACa);
    }
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        return Err(CaError::Expired(validity.not_after.to_string()));
    }
    if validity.not_before > now {
        return Err(CaError::NotYetValid(validity.not_before.to_string()));
    }
    Ok(())
}

/// Writes a generated CA: the key first, created new with mode 0600 (never over an existing
/// file), then the certificate (0644: the app reads it).
pub fn write_generated(
    certificate_path: &Path,
    key_path: &Path,
    authority: &CertificateAuthority,
    key_pem: &str,
) -> std::io::Result<()> {
    write_new(key_path, key_pem.as_bytes(), 0o600)?;
    write_new(
        certificate_path,
        authority.certificate_pem.as_bytes(),
        0o644,
    )
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    #[test]
    fn a_generated_ca_mints_leaves_for_names_and_addresses() {
        let (ca, key_pem) = CertificateAuthority::generate(8).unwrap();
        assert!(key_pem.contains("PRIVATE KEY"));
        let debug = format!("{ca:?}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
        // The files round-trip: a CA loaded from what generation wrote signs the same way.
        let loaded =
            CertificateAuthority::from_pem(ca.certificate_pem.as_bytes(), key_pem.as_bytes(), 8)
                .unwrap();
        assert_eq!(loaded.fingerprint, ca.fingerprint);

        let leaf = loaded.leaf("api.openai.com").unwrap();
        let again = loaded.leaf("api.openai.com").unwrap();
        assert!(Arc::ptr_eq(&leaf, &again), "cached");
        let der = leaf.certificate.to_der().unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let names: Vec<String> = parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(dns) => dns.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["api.openai.com"]);
        assert!(!parsed.is_ca());
        // Signed by the CA: OpenSSL verifies the signature with the CA's public key.
        let ca_cert = X509::from_pem(ca.certificate_pem.as_bytes()).unwrap();
        assert!(leaf
            .certificate
            .verify(&ca_cert.public_key().unwrap())
            .unwrap());
        assert!(leaf
            .certificate
            .public_key()
            .unwrap()
            .public_eq(loaded.leaf_key()));

        let ip = loaded.leaf("127.0.0.1").unwrap();
        let der = ip.certificate.to_der().unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        assert!(matches!(
            san.value.general_names[0],
            GeneralName::IPAddress([127, 0, 0, 1])
        ));
    }

    #[test]
    fn bad_files_are_named_without_quoting_the_key() {
        let (ca, key_pem) = CertificateAuthority::generate(8).unwrap();
        let (other, other_key) = CertificateAuthority::generate(8).unwrap();
        let load = |cert: &str, key: &str| {
            CertificateAuthority::from_pem(cert.as_bytes(), key.as_bytes(), 8).unwrap_err()
        };
        assert_eq!(load("not pem", &key_pem).0, CaFile::Certificate);
        let (file, error) = load(
            &ca.certificate_pem,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        assert_eq!(file, CaFile::Key);
        assert!(matches!(error, CaError::BadKey));
        let (file, error) = load(&ca.certificate_pem, &other_key);
        assert_eq!(file, CaFile::Key);
        assert!(matches!(error, CaError::KeyMismatch), "{error}");
        assert!(!error.to_string().contains("PRIVATE"));
        // A leaf is not a CA.
        let leaf = other.leaf("x.example").unwrap();
        let leaf_pem = String::from_utf8(leaf.certificate.to_pem().unwrap()).unwrap();
        let leaf_key =
            String::from_utf8(other.leaf_key().private_key_to_pem_pkcs8().unwrap()).unwrap();
        let (file, error) = load(&leaf_pem, &leaf_key);
        assert_eq!(file, CaFile::Certificate);
        assert!(matches!(error, CaError::NotACa), "{error}");
    }
}
