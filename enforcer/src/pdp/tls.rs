//! rustls configurations (the `ring` provider, chosen explicitly so that no process-wide
//! default has to be installed and no aws-lc build is needed).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, ServerConnection};

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

/// The server side: a certificate chain and its private key, both PEM. With `client_ca`
/// (PEM, one or more CA certificates), a client certificate is asked for and, when one is
/// presented, verified against those CAs (a certificate they did not sign fails the
/// handshake); a client may still present none, so that a caller can tell the two apart per
/// request ([`client_certified`]) and keep an unauthenticated health check.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>> {
    let chain = load_certs(cert, "serve a certificate of their choosing")?;
    let pem = crate::fs::read_secret(key, "impersonate this server to its clients")?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .with_context(|| format!("reading a PEM private key from {}", key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(load_certs(
                path,
                "make this server take their clients for the ones it trusts",
            )?);
            if added == 0 {
                bail!("{} holds no usable CA certificate", path.display());
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .with_context(|| format!("client certificate CAs of {}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
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

/// Whether the client of `connection` presented a certificate that the server's client
/// verifier accepted ([`server_config`] with a `client_ca`; a certificate it refused never
/// gets this far: the handshake failed).
pub fn client_certified(connection: &ServerConnection) -> bool {
    connection
        .peer_certificates()
        .is_some_and(|chain| !chain.is_empty())
}
