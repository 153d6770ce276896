//! Test certificates (rcgen) and small rustls helpers for integration tests.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A self-signed certificate and its key on disk (PEM).
#[derive(Clone, Debug)]
pub struct TestCert {
    /// The certificate (also usable as the CA file that trusts it).
    pub cert_pem: PathBuf,
    /// The private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub key_pem: PathBuf,
}

/// Self-signed cert (rcgen, ECDSA P-256) for SANs "localhost" and IP 127.0.0.1,
/// written into `dir` as `<name>.pem` / `<name>.key` (key PKCS#8 PEM).
/// Both files are mode 0644 so an unprivileged Dovecot user can read them.
pub fn self_signed(dir: &Path, name: &str) -> TestCert {
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("rcgen: certificate params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    dn.push(
        DnType::OrganizationName,
        format!("mailferry tests ({name})"),
    );
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("rcgen: generate key pair");
    let cert = params.self_signed(&key).expect("rcgen: self-sign");

    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let cert_pem = dir.join(format!("{name}.pem"));
    let key_pem = dir.join(format!("{name}.key"));
    write_readable(&cert_pem, cert.pem().as_bytes());
    write_readable(&key_pem, key.serialize_pem().as_bytes());
    TestCert { cert_pem, key_pem }
}

fn write_readable(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

impl TestCert {
    /// The certificate chain (DER) from `cert_pem`.
    pub fn certs(&self) -> Vec<CertificateDer<'static>> {
        load_certs(&self.cert_pem)
    }

    /// The private key (DER) from `key_pem`.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_file(&self.key_pem)
            .unwrap_or_else(|e| panic!("read key {}: {e}", self.key_pem.display()))
    }

    /// A rustls server config presenting this certificate (aws-lc-rs provider).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("rustls protocol versions")
            .with_no_client_auth()
            .with_single_cert(self.certs(), self.key())
            .expect("rustls server cert");
        Arc::new(cfg)
    }

    /// A rustls client config that trusts exactly this certificate.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        client_config(&self.cert_pem)
    }
}

/// All certificates in a PEM file.
pub fn load_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// The aws-lc-rs crypto provider (explicit, so no process-wide default is needed).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A rustls client config whose only trust anchor is the certificate(s) in `ca_pem`.
pub fn client_config(ca_pem: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca_pem) {
        roots.add(cert).expect("add trust anchor");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("rustls protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(cfg)
}

/// Blocking TLS client stream over std's TcpStream (for sync test helpers).
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// Connect with implicit TLS to `addr`, verifying the server as `server_name`
/// ("localhost" or "127.0.0.1") against `ca_pem`. The handshake is completed
/// before returning.
pub fn connect(addr: std::net::SocketAddr, server_name: &str, ca_pem: &Path) -> TlsStream {
    let tcp =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("TLS connect {addr}: {e}"));
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok();
    wrap(tcp, server_name, ca_pem)
}

/// Start TLS on an already connected socket (e.g. after STARTTLS) and finish the handshake.
pub fn wrap(tcp: std::net::TcpStream, server_name: &str, ca_pem: &Path) -> TlsStream {
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    let conn = rustls::ClientConnection::new(client_config(ca_pem), name).expect("rustls client");
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .unwrap_or_else(|e| panic!("TLS handshake with {server_name}: {e}"));
    }
    stream
}
