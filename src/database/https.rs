//! The remote-write client's connections: plain TCP for `http://` URLs, TLS
//! (rustls, the client tonic already brings) for `https://`.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper::{
    Uri,
    rt::{Read, ReadBufCursor, Write},
};
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{ClientConfig, RootCertStore, client::ResolvesClientCert, crypto::ring, sign::CertifiedKey},
};
use tonic::codegen::Service;

/// Opens connections for the client: TLS when the URL says https.
#[derive(Clone)]
pub(crate) struct Connector {
    /// The TCP part.
    http: HttpConnector,
    /// The TLS part, when the database is reached over https.
    tls: Option<TlsConnector>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("tls", &self.tls.is_some()).finish()
    }
}

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("no usable CA certificate, or a client certificate and key that do not go together")]
pub(crate) struct NoRoots;

impl Connector {
    /// Connections over `http`, in TLS trusting the CAs of `roots` (PEM)
    /// when given, showing the certificate chain and key of `identity`
    /// (PEM) to a server that asks for one.
    pub(crate) fn new(
        mut http: HttpConnector,
        roots: Option<&str>,
        identity: Option<(&str, &str)>,
    ) -> Result<Self, NoRoots> {
        http.enforce_http(false);
        let Some(roots) = roots else { return Ok(Self { http, tls: None }) };
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let mut store = RootCertStore::empty();
        // A system bundle may hold a certificate rustls cannot use; the rest
        // still count.
        let (added, _) = store.add_parsable_certificates(CertificateDer::pem_slice_iter(roots.as_bytes()).flatten());
        if added == 0 {
            return Err(NoRoots);
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|_| NoRoots)?
            .with_root_certificates(store);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let chain = CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<Vec<_>, _>>();
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes());
                let (Ok(chain), Ok(key)) = (chain, key) else { return Err(NoRoots) };
                let signer = ring::sign::any_supported_type(&key).map_err(|_| NoRoots)?;
                // Not `with_client_auth_cert`, whose check of the key against
                // the certificate (through webpki) refuses X.509 v1
                // certificates; the configuration made that check already.
                let identity = Arc::new(CertifiedKey::new(chain, signer));
                builder.with_client_cert_resolver(Arc::new(Identity(identity)))
            }
        };
        Ok(Self { http, tls: Some(TlsConnector::from(Arc::new(config))) })
    }
}

/// The one certificate and key shown to a database that asks for one.
#[derive(Debug)]
struct Identity(Arc<CertifiedKey>);

impl ResolvesClientCert for Identity {
    fn resolve(&self, _: &[&[u8]], _: &[tokio_rustls::rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The error a connection attempt ends with.
type ConnectError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Uri> for Connector {
    type Response = Stream;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let https = uri.scheme() == Some(&hyper::http::uri::Scheme::HTTPS);
        let tls = self.tls.clone();
        let host = uri.host().unwrap_or("").trim_matches(['[', ']']).to_owned();
        let connecting = self.http.call(uri);
        Box::pin(async move {
            if https && tls.is_none() {
                // Never plaintext where TLS was asked for.
                return Err("an https URL without TLS set up".into());
            }
            let tcp = connecting.await?;
            let Some(tls) = tls.filter(|_| https) else { return Ok(Stream::Plain(tcp)) };
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host)?;
            let stream = tls.connect(name, tcp.into_inner()).await?;
            Ok(Stream::Tls(Box::new(TokioIo::new(stream))))
        })
    }
}

/// A connection to the database.
#[derive(Debug)]
pub(crate) enum Stream {
    /// Plain TCP.
    Plain(TokioIo<TcpStream>),
    /// TLS over TCP (boxed: its state is a kilobyte).
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Self::Plain(stream) => stream.connected(),
            Self::Tls(stream) => stream.inner().get_ref().0.connected(),
        }
    }
}

impl Read for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// An X.509 v1 client certificate (what `openssl x509 -req` makes
    /// without an extension file) passes the configuration's check of its
    /// key and sets up: rustls' own check, through webpki, refuses v1.
    #[test]
    fn a_version_1_client_certificate_is_taken() {
        let ca = include_str!("../../tests/data/v1-ca.crt");
        let cert = include_str!("../../tests/data/v1-client.crt");
        let key = include_str!("../../tests/data/v1-client.key");
        let (cert_file, key_file) = (("CERT", Path::new("cert.pem")), ("KEY", Path::new("key.pem")));
        assert!(crate::config::check_identity(cert_file, key_file, cert, key, false).is_ok());
        assert!(Connector::new(HttpConnector::new(), Some(ca), Some((cert, key))).is_ok());
        // Another key is still refused, and so is v1 where only v3 will do.
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let refused = crate::config::check_identity(cert_file, key_file, cert, &other, false).unwrap_err();
        assert!(refused.to_string().contains("KEY"), "{refused}");
        let refused = crate::config::check_identity(cert_file, key_file, cert, key, true).unwrap_err();
        assert!(refused.to_string().contains("CERT") && refused.to_string().contains("version 1"), "{refused}");
    }
}
