//! TLS client set-up shared by every broker connection (the agent's MQTT client, the beacon
//! receivers' MQTT source): rustls with the `ring` provider (no C build), the configured CA or the
//! system store, optional client certificate.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The `tls` table of a broker connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificate(s) (PEM) that signed the broker's certificate. Default: the system store.
    /// The broker's certificate must name the configured host.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &data[..]).collect();
    let certs =
        certs.map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut &data[..])
        .map_err(|e| format!("{} is not a PEM private key: {e}", path.display()))?
        .ok_or_else(|| format!("{} holds no private key", path.display()))
}

/// Reads a secret (a password) from a file: the file's content without its trailing line break,
/// so `echo secret > file` works. The error is the I/O error (callers name the file and the
/// option); it never holds the content.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    let s = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    Ok(s.trim_end_matches(['\r', '\n']).to_string())
}

/// A rustls client config for `tls`; the error names the file and what is wrong with it.
pub fn client_config(tls: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = tls.ca_file.clone().unwrap_or_else(|| SYSTEM_CA.into());
    for cert in read_certs(&ca)? {
        roots
            .add(cert)
            .map_err(|e| format!("a CA certificate in {} is unusable: {e}", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS set-up failed: {e}"))?
    .with_root_certificates(roots);
    let config = match (&tls.cert_file, &tls.key_file) {
        (Some(c), Some(k)) => builder
            .with_client_auth_cert(read_certs(c)?, read_key(k)?)
            .map_err(|e| format!("the client certificate/key pair is unusable: {e}"))?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_loses_its_line_break_and_a_missing_one_is_an_error_without_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret pass\r\n").unwrap();
        assert_eq!(read_secret_file(&f).unwrap(), "s3cret pass");
        std::fs::write(&f, "two\nlines\n").unwrap();
        assert_eq!(read_secret_file(&f).unwrap(), "two\nlines");
        let e = read_secret_file(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
    }
}
