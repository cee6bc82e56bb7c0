//! HTTPS on the proxy listener (README "HTTPS"): the `tls.cert_file` / `tls.key_file` pair,
//! loaded, checked, served, and re-read when the files change.
//!
//! [`Tls::load`] reads the pair before the listener serves; [`Tls::acceptor`] is what the
//! accept loop wraps each connection in: TLS 1.3 (RFC 8446) or 1.2 (RFC 5246) with rustls on
//! the aws-lc-rs provider, offering ALPN `h2` and `http/1.1` (RFC 7301 §3.1; the identifiers
//! of RFC 9113 §3.2 and RFC 9112). [`Tls::watch`] polls the files and, when they changed and
//! hold a pair that loads, swaps the pair that new handshakes get; a connection keeps the
//! certificate it was opened with. A pair that does not load (unreadable, not PEM, a key that
//! does not match the certificate) is logged and counted, and the previous pair stays.
//!
//! Errors name the config key and the file, never the key's content.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use aws_lc_rs::digest;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use secrecy::{ExposeSecret, SecretSlice};
use tokio_rustls::TlsAcceptor;

use crate::config::{self, Problem};
use crate::metrics::{Metrics, RefreshResult};

/// ALPN protocol identifiers offered, in the server's order of preference (RFC 7301 §3.2).
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate and key pair cannot be served. Names the file, never the key's content.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {kind}")]
    Read {
        key: &'static str,
        path: PathBuf,
        kind: std::io::ErrorKind,
    },
    #[error("{path}: no PEM certificate (-----BEGIN CERTIFICATE-----) found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: a PEM certificate block is incomplete or does not decode")]
    CertificatePem { path: PathBuf },
    #[error("{path}: no complete PEM private key (PKCS#8, PKCS#1 or SEC1) found")]
    NoKey { path: PathBuf },
    #[error("{path}: the private key cannot be used")]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{path}: the first certificate is not a usable X.509 certificate")]
    Certificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{key_path} does not match the certificate in {cert_path}")]
    Mismatch {
        key_path: PathBuf,
        cert_path: PathBuf,
    },
    #[error("the TLS provider offers no protocol version")]
    Provider(#[source] rustls::Error),
}

impl TlsError {
    /// The config key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Read { key, .. } => key,
            Self::NoCertificate { .. } | Self::CertificatePem { .. } | Self::Certificate { .. } => {
                "tls.cert_file"
            }
            Self::NoKey { .. } | Self::Key { .. } | Self::Mismatch { .. } => "tls.key_file",
            Self::Provider(_) => "tls",
        }
    }

    /// The error and its cause as one configuration problem (as `check-config` prints it).
    pub fn problem(&self) -> Problem {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        Problem {
            key: self.key().into(),
            message,
        }
    }
}

/// Checks the pair of `config` as serving it would: both files read and parsed, the key
/// usable and matching the first certificate. Returns that certificate's serial number.
pub fn check(config: &config::Tls) -> Result<String, TlsError> {
    let provider = provider();
    let pair = parse(config, &read(config)?, &provider)?;
    Ok(serial(&pair))
}

/// The listener's TLS: the acceptor and the pair it serves.
pub struct Tls {
    acceptor: TlsAcceptor,
    current: Arc<Current>,
    reload: Reload,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("serial", &self.serial())
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads and checks the pair of `config` and builds the acceptor around it.
    pub fn load(config: &config::Tls) -> Result<Self, TlsError> {
        let provider = provider();
        let contents = read(config)?;
        let pair = parse(config, &contents, &provider)?;
        let current = Arc::new(Current(RwLock::new(pair)));
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Provider)?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            reload: Reload {
                files: config.clone(),
                provider,
                current: current.clone(),
                tried: fingerprint(&Ok(contents)),
                pending: None,
            },
            current,
        })
    }

    /// Wraps accepted connections; every handshake gets the pair current at that moment.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// The serial number of the certificate new connections get (hex, as `openssl x509
    /// -serial` prints it).
    pub fn serial(&self) -> String {
        serial(&self.current.get())
    }

    /// Polls the files every `config.poll_interval` for ever, swapping in each new pair that
    /// loads. Spawn it; abort it when the listener is gone.
    pub async fn watch(self, metrics: Arc<Metrics>) {
        let Self { mut reload, .. } = self;
        let mut ticks = tokio::time::interval(reload.files.poll_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let files = reload.files.clone();
            let contents = match tokio::task::spawn_blocking(move || read(&files)).await {
                Ok(read) => read,
                // The read panicked or was cancelled: nothing was learned; try next time.
                Err(_) => continue,
            };
            match reload.poll(contents) {
                Step::Unchanged => {}
                Step::Settling => tracing::debug!(
                    "tls.cert_file or tls.key_file changed: loading once they stay unchanged for a poll"
                ),
                Step::Reloaded { previous, serial } => {
                    metrics.tls_reloads.inc(RefreshResult::Success);
                    tracing::info!(%serial, %previous, "TLS certificate reloaded: new connections get it");
                }
                Step::Refused(e) => {
                    metrics.tls_reloads.inc(RefreshResult::Failure);
                    let p = e.problem();
                    tracing::error!(
                        key = %p.key,
                        error = %p.message,
                        serving = %reload.serial(),
                        "TLS certificate reload failed: still serving the previous certificate"
                    );
                }
            }
        }
    }
}

/// The aws-lc-rs provider: the crypto backend of everything else in the proxy.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The pair new handshakes get; replaced whole on a successful reload.
struct Current(RwLock<Arc<CertifiedKey>>);

impl Current {
    fn get(&self) -> Arc<CertifiedKey> {
        // A poisoned lock only means a panic elsewhere; the pair it holds is still whole.
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, pair: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = pair;
    }
}

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Current")
            .field(&serial(&self.get()))
            .finish()
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// Both files as read at one moment; the key's bytes are secret (zeroed when dropped).
struct Contents {
    cert: Vec<u8>,
    key: SecretSlice<u8>,
}

fn read(files: &config::Tls) -> Result<Contents, TlsError> {
    let read = |key: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::Read {
            key,
            path: path.to_path_buf(),
            kind: e.kind(),
        })
    };
    Ok(Contents {
        cert: read("tls.cert_file", &files.cert_file)?,
        key: SecretSlice::from(read("tls.key_file", &files.key_file)?),
    })
}

/// The chain and key of `contents`, checked to belong together.
fn parse(
    files: &config::Tls,
    contents: &Contents,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_path = || files.cert_file.clone();
    let key_path = || files.key_file.clone();
    let chain = CertificateDer::pem_slice_iter(&contents.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::CertificatePem { path: cert_path() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_path() });
    }
    // A PEM error can quote a line of the file: never pass it on for the key.
    let key = PrivateKeyDer::from_pem_slice(contents.key.expose_secret())
        .map_err(|_: pem::Error| TlsError::NoKey { path: key_path() })?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::Key {
            path: key_path(),
            source,
        })?;
    let pair = CertifiedKey::new(chain, signer);
    match pair.keys_match() {
        Ok(()) => Ok(Arc::new(pair)),
        // The aws-lc-rs keys all know their public half, so "unknown" cannot be vouched for.
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::Mismatch {
            key_path: key_path(),
            cert_path: cert_path(),
        }),
        Err(source) => Err(TlsError::Certificate {
            path: cert_path(),
            source,
        }),
    }
}

/// The serial number of the pair's end-entity certificate; `unknown` if it cannot be parsed
/// (it was parsed when the pair was loaded).
fn serial(pair: &CertifiedKey) -> String {
    pair.cert
        .first()
        .and_then(certificate_serial)
        .unwrap_or_else(|| "unknown".into())
}

/// A certificate's serial number as [`hex_serial`] prints it; `None` if it does not parse.
pub fn certificate_serial(cert: &CertificateDer<'_>) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(hex_serial(ee.serial()))
}

/// `serial` (a DER INTEGER's content octets) as `openssl x509 -serial` prints it: upper-case
/// hex without leading zero bytes.
pub fn hex_serial(serial: &[u8]) -> String {
    let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    let hex: String = serial[start..].iter().map(|b| format!("{b:02X}")).collect();
    if hex.is_empty() { "00".into() } else { hex }
}

/// What one poll of the files came to.
#[derive(Debug)]
enum Step {
    /// The files hold what was last loaded or tried.
    Unchanged,
    /// The files differ from the last poll: perhaps still being written; look again next time.
    Settling,
    /// A new pair is served.
    Reloaded { previous: String, serial: String },
    /// The files stayed the same for a poll but do not hold a pair that loads.
    Refused(TlsError),
}

/// The reload state: what was loaded or last tried, and what the previous poll saw.
struct Reload {
    files: config::Tls,
    provider: Arc<CryptoProvider>,
    current: Arc<Current>,
    /// Fingerprint of the files' state last loaded or refused: not tried again.
    tried: Vec<u8>,
    /// Fingerprint of a new state seen by the previous poll.
    pending: Option<Vec<u8>>,
}

impl Reload {
    /// One poll's outcome for the files as just `read`. A changed state is loaded only once two
    /// polls in a row saw it: a certificate manager that writes the two files one after the
    /// other (or a file in pieces) is not caught half-way, and a state that does not load is
    /// reported once, not at every poll.
    fn poll(&mut self, read: Result<Contents, TlsError>) -> Step {
        let seen = fingerprint(&read);
        if seen == self.tried {
            self.pending = None;
            return Step::Unchanged;
        }
        if self.pending.as_ref() != Some(&seen) {
            self.pending = Some(seen);
            return Step::Settling;
        }
        self.pending = None;
        self.tried = seen;
        match read.and_then(|contents| parse(&self.files, &contents, &self.provider)) {
            Ok(pair) => {
                let previous = self.serial();
                let serial = serial(&pair);
                self.current.set(pair);
                Step::Reloaded { previous, serial }
            }
            Err(e) => Step::Refused(e),
        }
    }

    fn serial(&self) -> String {
        serial(&self.current.get())
    }
}

/// SHA-256 over one poll's result: the two files' bytes (length-prefixed), or the error.
/// Only compared, never shown.
fn fingerprint(read: &Result<Contents, TlsError>) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    match read {
        Ok(c) => {
            ctx.update(b"files");
            for part in [c.cert.as_slice(), c.key.expose_secret()] {
                ctx.update(&(part.len() as u64).to_be_bytes());
                ctx.update(part);
            }
        }
        Err(e) => {
            ctx.update(b"error");
            ctx.update(e.to_string().as_bytes());
        }
    }
    ctx.finish().as_ref().to_vec()
}

#[cfg(test)]
mod tests;
