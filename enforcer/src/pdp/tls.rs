//! rustls configurations (the `ring` provider, chosen explicitly so that no process-wide
//! default has to be installed and no aws-lc build is needed).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates of `path`, a file no other user may change
/// ([`crate::fs::read_trusted`]): `what` says what one who could change it could do.
fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = crate::fs::read_trusted(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The server side: a certificate chain and its private key, both PEM.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain = load_certs(cert, "serve a certificate of their choosing")?;
    let pem = crate::fs::read_secret(key, "impersonate this server to its clients")?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .with_context(|| format!("reading a PEM private key from {}", key.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Well-known system CA bundles, used when no `--pdp-ca` is given.
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The client side: trust `ca` (PEM, one or more certificates), else the system CA bundle.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let source = match ca {
        Some(path) => path.to_path_buf(),
        None => SYSTEM_CA_FILES
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .context("no CA to trust for https: pass the PDP's CA certificate (--pdp-ca PEM)")?
            .to_path_buf(),
    };
    let (added, _ignored) = roots.add_parsable_certificates(load_certs(
        &source,
        "make this process trust a server of their choosing (for an agent: their PDP, and so \
         their policy)",
    )?);
    if added == 0 {
        bail!("{} holds no usable CA certificate", source.display());
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
