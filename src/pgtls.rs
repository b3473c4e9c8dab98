//! TLS for database connections: rustls client configurations with the verification libpq's
//! `sslmode` asks for.
//!
//! Invariants: `verify-full` checks chain and host name; `verify-ca` checks the chain against
//! the given root certificates and nothing else; `require` (and `prefer`, `allow`) verify like
//! `verify-ca` when a root certificate is given, and otherwise accept any certificate while still
//! checking the handshake signatures (encryption without authentication, as in libpq). This
//! module reads no file: [`Material`] comes loaded from `config`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::conninfo::SslMode;

/// Certificates of a connection, loaded by `config` from `sslrootcert`, `sslcert` and `sslkey`.
#[derive(Debug, Default)]
pub struct Material {
    /// The trusted authorities (`sslrootcert`: a file's certificates or the system's); `None`
    /// when no root certificate was given.
    pub roots: Option<Vec<CertificateDer<'static>>>,
    /// The client certificate chain and its key (`sslcert`, `sslkey`).
    pub client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Nothing but the handshake signatures.
    Nothing,
    /// The chain against the roots, not the host name.
    Chain,
    /// Chain and host name.
    Full,
}

impl Verify {
    /// libpq's rule: the weaker modes verify the chain exactly when a root certificate is given.
    pub fn for_mode(mode: SslMode, has_roots: bool) -> Verify {
        match mode {
            SslMode::VerifyFull => Verify::Full,
            SslMode::VerifyCa => Verify::Chain,
            SslMode::Disable | SslMode::Allow | SslMode::Prefer | SslMode::Require if has_roots => Verify::Chain,
            SslMode::Disable | SslMode::Allow | SslMode::Prefer | SslMode::Require => Verify::Nothing,
        }
    }
}

/// The connector for one connection attempt.
pub fn connector(verify: Verify, material: &Material) -> Result<MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Nothing => Arc::new(AnyCertificate(Arc::clone(&provider))),
        Verify::Chain | Verify::Full => {
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(material.roots.iter().flatten().cloned());
            if added == 0 {
                return Err("sslrootcert holds no usable certificate".to_string());
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .map_err(|e| e.to_string())?;
            if verify == Verify::Full {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    let config = match &material.client {
        Some((chain, key)) => {
            builder.with_client_auth_cert(chain.clone(), key.clone_key()).map_err(|e| format!("sslcert/sslkey: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

/// `verify-ca`: webpki's verification with the host-name mismatch forgiven.
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
    ) -> Result<ServerCertVerified, Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` without a root certificate: any certificate, but a valid handshake with its key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_verification_levels() {
        assert_eq!(Verify::for_mode(SslMode::Require, false), Verify::Nothing);
        assert_eq!(Verify::for_mode(SslMode::Require, true), Verify::Chain, "require with sslrootcert = verify-ca");
        assert_eq!(Verify::for_mode(SslMode::Prefer, true), Verify::Chain);
        assert_eq!(Verify::for_mode(SslMode::VerifyCa, true), Verify::Chain);
        assert_eq!(Verify::for_mode(SslMode::VerifyFull, true), Verify::Full);
    }
}
