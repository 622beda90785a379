//! TLS for the replication connection, with libpq's `sslmode` semantics (rustls, ring).
//!
//! | sslmode | TLS | certificate check |
//! |---|---|---|
//! | disable | never | — |
//! | allow, prefer | if the server offers it | none (as libpq, unless a root certificate is configured: then as verify-ca) |
//! | require | must | none (as libpq, unless a root certificate is configured: then as verify-ca) |
//! | verify-ca | must | chain to `sslrootcert` |
//! | verify-full | must | chain to `sslrootcert` and the host name |
//!
//! `sslrootcert` defaults to `~/.postgresql/root.crt`, like libpq. `allow` is treated as
//! `prefer` (libpq tries plain first; we try TLS first, which is never less safe).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::conninfo::{ConnParams, SslMode};
use super::AsyncStream;

/// Negotiate TLS on a fresh TCP connection as `params.sslmode` says.
pub(super) async fn negotiate(mut tcp: TcpStream, host: &str, params: &ConnParams) -> Result<Box<dyn AsyncStream>> {
    if params.sslmode == SslMode::Disable {
        return Ok(Box::new(tcp));
    }
    let mut req = bytes::BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut req);
    tcp.write_all(&req).await.context("send SSLRequest")?;
    let answer = tcp.read_u8().await.context("read the answer to SSLRequest")?;
    match answer {
        b'S' => {}
        b'N' => {
            if matches!(params.sslmode, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull) {
                bail!("the server does not support SSL, but sslmode={:?} requires it\nHINT: enable ssl in postgresql.conf, or lower sslmode", params.sslmode);
            }
            return Ok(Box::new(tcp));
        }
        other => bail!("unexpected answer {other:#x} to SSLRequest"),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = verifier(params, provider.clone())?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let name =
        ServerName::try_from(host.to_string()).with_context(|| format!("invalid server name {host:?} for TLS"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {host}"))?;
    Ok(Box::new(tls))
}

fn root_cert_path(params: &ConnParams) -> Option<PathBuf> {
    params
        .sslrootcert
        .clone()
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt")))
}

fn verifier(params: &ConnParams, provider: Arc<CryptoProvider>) -> Result<Arc<dyn ServerCertVerifier>> {
    let path = root_cert_path(params).filter(|p| p.exists());
    let strict = matches!(params.sslmode, SslMode::VerifyCa | SslMode::VerifyFull);
    let Some(path) = path else {
        if strict {
            bail!(
                "sslmode={:?} needs a root certificate, and none was found\nHINT: set sslrootcert=/path/to/root.crt (or put it in ~/.postgresql/root.crt)",
                params.sslmode
            );
        }
        return Ok(Arc::new(NoVerify(provider)));
    };
    let mut roots = RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(&path).with_context(|| format!("read root certificate {}", path.display()))?
    {
        roots.add(cert.with_context(|| format!("parse {}", path.display()))?)?;
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
    if params.sslmode == SslMode::VerifyFull {
        Ok(webpki)
    } else {
        Ok(Arc::new(ChainOnly(webpki)))
    }
}

/// sslmode require/prefer without a root certificate: encrypt, trust any certificate.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// verify-ca: the chain must lead to the root certificate; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
