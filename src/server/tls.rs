//! TLS for the main listener: PEM files or an in-memory self-signed certificate, served with
//! rustls on the ring provider and ALPN `h2`, `http/1.1` so one port speaks both protocols.

use super::ServerError;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// ALPN identifiers we offer, HTTP/2 first so capable clients (CockroachDB, load balancers)
/// multiplex over one connection.
pub(crate) const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A generated certificate with its key, in DER (to serve) and PEM (for clients to trust).
pub struct SelfSigned {
    pub(crate) certs: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The key stays out of Debug output.
impl std::fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSigned")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Generates the reference's localhost certificate: ECDSA P-256, SANs `localhost`,
/// `127.0.0.1`, `::1`, organisation "Cockroach Labs", server-auth, valid now → +1 year.
pub fn self_signed() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ServerError>
{
    let s = self_signed_pem()?;
    Ok((s.certs, s.key))
}

/// Like [`self_signed`], also returning the PEM texts (tests, bench and the feed trust the
/// certificate; tests write them to files).
pub fn self_signed_pem() -> Result<SelfSigned, ServerError> {
    let err = |e: rcgen::Error| ServerError::SelfSigned(e.into());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Cockroach Labs");
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    // rcgen wants a `time::OffsetDateTime`; the epoch plus a std duration avoids depending on
    // the `time` crate ourselves.
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| ServerError::SelfSigned("system clock is before 1970".into()))?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now;
    params.not_after = now + Duration::from_secs(365 * 24 * 3600);
    // 128 random bits, top bit cleared so the DER integer stays positive.
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let cert = params.self_signed(&key).map_err(err)?;
    Ok(SelfSigned {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        certs: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    })
}

/// Reads a PEM certificate chain (leaf first) and returns it with its PEM text.
pub(crate) fn load_certs(
    path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, String), ServerError> {
    let bytes = std::fs::read(path).map_err(|source| ServerError::TlsRead {
        path: path.display().to_string(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::TlsFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(ServerError::TlsFile {
            path: path.display().to_string(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok((certs, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Reads the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM file.
pub(crate) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ServerError> {
    let bytes = std::fs::read(path).map_err(|source| ServerError::TlsRead {
        path: path.display().to_string(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| ServerError::TlsFile {
        path: path.display().to_string(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => "no private key block found".into(),
            other => other.to_string(),
        },
    })
}

/// The rustls provider, chosen explicitly so no process-wide default is needed (and aws-lc
/// never sneaks in).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration. Without `client_roots` no client certificate is requested
/// (as the reference); with them every client must present one that chains to a root.
pub(crate) fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<Vec<CertificateDer<'static>>>,
) -> Result<Arc<ServerConfig>, ServerError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(ServerError::Tls)?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for cert in roots {
                store
                    .add(cert)
                    .map_err(|e| ServerError::ClientCa(e.into()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(store),
                provider(),
            )
            .build()
            .map_err(|e| ServerError::ClientCa(e.into()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(ServerError::Tls)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_builds_a_server_config() {
        let s = self_signed_pem().expect("generate");
        assert!(s.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(s.key_pem.contains("PRIVATE KEY"));
        let config = server_config(s.certs, s.key, None).expect("config");
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn serials_differ_between_certificates() {
        let a = self_signed_pem().expect("a");
        let b = self_signed_pem().expect("b");
        assert_ne!(a.certs[0], b.certs[0]);
    }

    #[test]
    fn pem_files_load_and_bad_files_say_why() {
        let dir = std::env::temp_dir().join(format!("cdc-sink-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let s = self_signed_pem().expect("generate");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, &s.cert_pem).expect("write");
        std::fs::write(&key, &s.key_pem).expect("write");
        let (certs, pem) = load_certs(&cert).expect("certs");
        assert_eq!(certs.len(), 1);
        assert_eq!(pem, s.cert_pem);
        load_key(&key).expect("key");
        let e = load_key(&cert).expect_err("a certificate is not a key");
        assert!(e.to_string().contains("no private key"), "{e}");
        let e = load_certs(&key).expect_err("a key is not a certificate");
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
        let e = load_certs(&dir.join("missing.pem")).expect_err("missing");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
