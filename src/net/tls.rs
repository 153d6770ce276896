//! TLS configurations, built once and swapped on reload: the proxy's server side and a client
//! side per backend.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Failures loading certificates or keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Installs the one crypto provider (aws-lc-rs); idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// The proxy's server configuration. ALPN is strict: a client that offers ALPN without
/// "imap" is refused during the handshake (cross-protocol attacks, RFC 9051 §11.1).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    install_provider();
    let certs = load_certs(cert)?;
    let key_pem = std::fs::read(key).map_err(|e| file_err(key, e))?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| file_err(key, e))?;
    let mut cfg = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    cfg.alpn_protocols = vec![b"imap".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client configuration towards a backend: system roots plus an optional extra CA file.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    install_provider();
    let mut roots = RootCertStore::empty();
    let system = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if system.exists() {
        if let Ok(certs) = load_certs(system) {
            roots.add_parsable_certificates(certs);
        }
    }
    if let Some(ca) = ca_file {
        for cert in load_certs(ca)? {
            roots.add(cert)?;
        }
    }
    let cfg = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A server configuration that can be replaced while sessions run (SIGHUP).
pub struct ReloadableServer {
    current: RwLock<Arc<ServerConfig>>,
}

impl ReloadableServer {
    /// Wraps an initial configuration.
    pub fn new(cfg: Arc<ServerConfig>) -> Self {
        ReloadableServer {
            current: RwLock::new(cfg),
        }
    }

    /// The configuration new handshakes use.
    pub fn get(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the configuration; sessions already established keep theirs.
    pub fn set(&self, cfg: Arc<ServerConfig>) {
        match self.current.write() {
            Ok(mut g) => *g = cfg,
            Err(poisoned) => *poisoned.into_inner() = cfg,
        }
    }
}
