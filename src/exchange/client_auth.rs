//! How the proxy authenticates itself at the token endpoint (`exchange.client_auth`).
//!
//! - `client_secret_basic` (RFC 6749 §2.3.1): `Authorization: Basic base64(id ":" secret)`,
//!   where id and secret are each application/x-www-form-urlencoded first (Appendix B), so a
//!   `:` or `%` in either survives ([`basic_authorization`], shared with introspection).
//! - `client_secret_post` (RFC 6749 §2.3.1): `client_id` and `client_secret` in the form.
//! - `private_key_jwt` (RFC 7523 §2.2 and §3, OIDC Core §9): a fresh JWT signed by
//!   jsonwebtoken with the PEM key in `private_key_file` (RSA → RS256, P-256 → ES256,
//!   P-384 → ES384), with
//!   `iss` = `sub` = client id, `aud` = the token endpoint, a random `jti`, `iat` and
//!   `exp` = `iat` + [`ASSERTION_LIFETIME`]; `kid` from `key_id`; with `certificate_file`, the
//!   certificate's SHA-1 and SHA-256 thumbprints as `x5t` and `x5t#S256` (RFC 7515 §4.1.7–8),
//!   which Microsoft Entra ID uses to find the certificate credential.
//! - `client_assertion_file` (RFC 7521 §4.2): a ready-made assertion (e.g. a projected
//!   service-account token) read afresh on every use, since the kubelet rotates it.
//! - `none`: a public client; only `client_id` is sent.
//!
//! The assertion methods also send `client_id` (RFC 7521 §4.2 allows it), which some IdPs need
//! to find the client when the assertion's `sub` is not the client id (federated tokens).
//!
//! Secret and key files are [`SecretFile`]s, re-read when they change; the parsed key is kept
//! until the file's content changes. Nothing read from these files is ever logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::HeaderValue;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use url::Url;

use crate::config::ClientAuth;
use crate::idp::basic_authorization;
use crate::secret::{self, SecretError, SecretFile};

/// RFC 7521 §4.2 / RFC 7523 §2.2: the assertion type for a JWT client assertion.
pub const JWT_BEARER_ASSERTION_TYPE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Lifetime of a signed client assertion: long enough for clock skew and one request, short
/// enough that a captured assertion is useless soon (RFC 7523 §3 item 4 asks for a limit).
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);
/// Random bytes in a `jti` (RFC 7519 §4.1.7): 128 bits never collide.
const JTI_BYTES: usize = 16;

/// Why credentials could not be produced. Names files, never their content.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A secret, key or assertion file cannot be read, or is empty.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The private key file is not a usable unencrypted RSA, P-256 or P-384 PEM key.
    #[error("exchange.client_auth.private_key_file {path}: {why}")]
    Key { path: PathBuf, why: &'static str },
    /// The certificate file holds no PEM `CERTIFICATE`.
    #[error("exchange.client_auth.certificate_file {path}: {why}")]
    Certificate { path: PathBuf, why: &'static str },
    /// Signing (or drawing randomness for `jti`) failed.
    #[error("cannot sign the client assertion")]
    Sign,
}

/// What a token request carries to authenticate the proxy.
pub(crate) struct Credentials {
    /// An `Authorization` header (client_secret_basic), marked sensitive.
    pub(crate) authorization: Option<HeaderValue>,
    /// Form parameters.
    pub(crate) params: Vec<(&'static str, SecretString)>,
}

/// Produces [`Credentials`] for each token request.
pub(crate) struct ClientAuthenticator {
    client_id: String,
    method: Method,
}

enum Method {
    Basic {
        secret: SecretFile,
    },
    Post {
        secret: SecretFile,
    },
    PrivateKeyJwt {
        key: KeyFile,
        key_id: Option<String>,
        certificate: Option<PathBuf>,
    },
    AssertionFile {
        path: PathBuf,
    },
    None,
}

impl std::fmt::Debug for ClientAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let method = match &self.method {
            Method::Basic { .. } => "client_secret_basic",
            Method::Post { .. } => "client_secret_post",
            Method::PrivateKeyJwt { .. } => "private_key_jwt",
            Method::AssertionFile { .. } => "client_assertion_file",
            Method::None => "none",
        };
        f.debug_struct("ClientAuthenticator")
            .field("client_id", &self.client_id)
            .field("method", &method)
            .finish()
    }
}

impl ClientAuthenticator {
    /// Sets up `auth` for `client_id`. Checks now, synchronously, that the files it needs can
    /// be read (and the private key parsed), so that a broken mount fails the start-up
    /// instead of every request.
    pub(crate) fn new(client_id: &str, auth: &ClientAuth) -> Result<Self, CredentialError> {
        let method = match auth {
            ClientAuth::ClientSecretBasic { secret_file } => {
                check_readable(secret_file)?;
                Method::Basic {
                    secret: SecretFile::new(secret_file),
                }
            }
            ClientAuth::ClientSecretPost { secret_file } => {
                check_readable(secret_file)?;
                Method::Post {
                    secret: SecretFile::new(secret_file),
                }
            }
            ClientAuth::PrivateKeyJwt {
                private_key_file,
                key_id,
                certificate_file,
            } => {
                let pem = check_readable(private_key_file)?;
                SigningKey::from_pem(pem.expose_secret(), private_key_file)?;
                if let Some(path) = certificate_file {
                    Thumbprints::from_pem(check_readable(path)?.expose_secret(), path)?;
                }
                Method::PrivateKeyJwt {
                    key: KeyFile::new(private_key_file),
                    key_id: key_id.clone(),
                    certificate: certificate_file.clone(),
                }
            }
            ClientAuth::ClientAssertionFile { assertion_file } => {
                check_readable(assertion_file)?;
                Method::AssertionFile {
                    path: assertion_file.clone(),
                }
            }
            ClientAuth::None => Method::None,
        };
        Ok(Self {
            client_id: client_id.to_owned(),
            method,
        })
    }

    /// The credentials for one request to `token_endpoint` (the audience of a signed
    /// assertion).
    pub(crate) async fn credentials(
        &self,
        token_endpoint: &Url,
    ) -> Result<Credentials, CredentialError> {
        let id = || SecretString::from(self.client_id.clone());
        Ok(match &self.method {
            Method::Basic { secret } => Credentials {
                authorization: Some(basic_authorization(&self.client_id, &secret.get().await?)),
                params: vec![],
            },
            Method::Post { secret } => Credentials {
                authorization: None,
                params: vec![("client_id", id()), ("client_secret", secret.get().await?)],
            },
            Method::PrivateKeyJwt {
                key,
                key_id,
                certificate,
            } => {
                let key = key.get().await?;
                // Read on every use, like the key: cert-manager renews both together.
                let thumbprints = match certificate {
                    Some(path) => Some(Thumbprints::from_pem(
                        secret::read_trimmed(path).await?.expose_secret(),
                        path,
                    )?),
                    None => None,
                };
                let assertion = key.sign_assertion(
                    &self.client_id,
                    token_endpoint.as_str(),
                    AssertionHeader {
                        key_id: key_id.as_deref(),
                        thumbprints: thumbprints.as_ref(),
                    },
                    SystemTime::now(),
                )?;
                assertion_params(id(), assertion)
            }
            Method::AssertionFile { path } => {
                assertion_params(id(), secret::read_trimmed(path).await?)
            }
            Method::None => Credentials {
                authorization: None,
                params: vec![("client_id", id())],
            },
        })
    }
}

fn assertion_params(client_id: SecretString, assertion: SecretString) -> Credentials {
    Credentials {
        authorization: None,
        params: vec![
            ("client_id", client_id),
            (
                "client_assertion_type",
                SecretString::from(JWT_BEARER_ASSERTION_TYPE),
            ),
            ("client_assertion", assertion),
        ],
    }
}

/// Reads a file once at set-up, to fail early; the running proxy re-reads it.
fn check_readable(path: &Path) -> Result<SecretString, CredentialError> {
    let text = std::fs::read_to_string(path).map_err(|e| SecretError::Read {
        path: path.to_path_buf(),
        kind: e.kind(),
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SecretError::Empty(path.to_path_buf()).into());
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

/// A private key file, parsed again only when its content changes.
struct KeyFile {
    file: SecretFile,
    parsed: Mutex<Option<(SecretString, Arc<SigningKey>)>>,
}

impl KeyFile {
    fn new(path: &Path) -> Self {
        Self {
            file: SecretFile::new(path),
            parsed: Mutex::new(None),
        }
    }

    async fn get(&self) -> Result<Arc<SigningKey>, CredentialError> {
        let pem = self.file.get().await?;
        {
            let cached = self.parsed.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((p, key)) = cached.as_ref()
                && p.expose_secret() == pem.expose_secret()
            {
                return Ok(key.clone());
            }
        }
        let key = Arc::new(SigningKey::from_pem(pem.expose_secret(), self.file.path())?);
        *self.parsed.lock().unwrap_or_else(PoisonError::into_inner) = Some((pem, key.clone()));
        Ok(key)
    }
}

/// A key that signs client assertions, and the JWS `alg` it signs with.
pub(crate) struct SigningKey {
    key: EncodingKey,
    alg: Algorithm,
}

/// The algorithms a key may sign assertions with, tried in this order: RS256 for an RSA key
/// (RFC 7518 §3.3), ES256 or ES384 for an EC key on P-256 or P-384 (RFC 7518 §3.4).
const ASSERTION_ALGS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::ES384];

impl SigningKey {
    /// Parses an unencrypted PEM private key: PKCS#8 (`PRIVATE KEY`, RSA or EC) or PKCS#1
    /// (`RSA PRIVATE KEY`), read by jsonwebtoken, or SEC 1 (`EC PRIVATE KEY`, what
    /// `openssl ecparam -genkey` writes), which jsonwebtoken does not read and which is turned
    /// into PKCS#8 here ([`sec1_as_pkcs8`]). The key signs once now, so that a key that parses
    /// but cannot sign fails at set-up rather than at the first exchange; the first of
    /// [`ASSERTION_ALGS`] it signs with is its `alg`, since jsonwebtoken does not tell an EC
    /// key's curve.
    pub(crate) fn from_pem(pem: &str, path: &Path) -> Result<Self, CredentialError> {
        let err = |why| CredentialError::Key {
            path: path.to_path_buf(),
            why,
        };
        if is_encrypted(pem) {
            return Err(err("encrypted keys are not supported"));
        }
        let key = EncodingKey::from_rsa_pem(pem.as_bytes())
            .or_else(|_| EncodingKey::from_ec_pem(pem.as_bytes()))
            .ok()
            .or_else(|| sec1_as_pkcs8(pem).map(|der| EncodingKey::from_ec_der(&der)))
            .ok_or_else(|| err("not a PEM private key"))?;
        let alg = ASSERTION_ALGS
            .into_iter()
            .find(|alg| jsonwebtoken::crypto::sign(b"", &key, *alg).is_ok())
            .ok_or_else(|| err("not an RSA, P-256 or P-384 private key"))?;
        Ok(Self { key, alg })
    }

    /// A client assertion (RFC 7523 §3): `iss` = `sub` = `client_id`, `aud` = `audience`,
    /// random `jti`, `iat` = now, `exp` = now + [`ASSERTION_LIFETIME`]; `typ` is `JWT`, and
    /// `kid`, `x5t` and `x5t#S256` as `header_fields` says.
    pub(crate) fn sign_assertion(
        &self,
        client_id: &str,
        audience: &str,
        header_fields: AssertionHeader<'_>,
        now: SystemTime,
    ) -> Result<SecretString, CredentialError> {
        #[derive(Serialize)]
        struct Claims<'a> {
            iss: &'a str,
            sub: &'a str,
            aud: &'a str,
            jti: String,
            iat: u64,
            exp: u64,
        }
        let iat = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut jti = [0u8; JTI_BYTES];
        aws_lc_rs::rand::fill(&mut jti).map_err(|_| CredentialError::Sign)?;
        let mut header = Header::new(self.alg);
        header.kid = header_fields.key_id.map(str::to_owned);
        if let Some(t) = header_fields.thumbprints {
            header.x5t = Some(t.sha1.clone());
            header.x5t_s256 = Some(t.sha256.clone());
        }
        let claims = Claims {
            iss: client_id,
            sub: client_id,
            aud: audience,
            jti: URL_SAFE_NO_PAD.encode(jti),
            iat,
            exp: iat + ASSERTION_LIFETIME.as_secs(),
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map(SecretString::from)
            .map_err(|_| CredentialError::Sign)
    }
}

/// What a client assertion's JOSE header names besides `alg` and `typ`.
#[derive(Clone, Copy, Default)]
pub(crate) struct AssertionHeader<'a> {
    /// `kid`.
    pub(crate) key_id: Option<&'a str>,
    /// `x5t` and `x5t#S256`.
    pub(crate) thumbprints: Option<&'a Thumbprints>,
}

/// A certificate's thumbprints (RFC 7515 §4.1.7–8): base64url of the SHA-1 and SHA-256
/// digests of its DER encoding. SHA-1 here only names a certificate; it protects nothing.
pub(crate) struct Thumbprints {
    sha1: String,
    sha256: String,
}

impl Thumbprints {
    /// The thumbprints of the first `CERTIFICATE` block of `pem` (RFC 7468 §5).
    pub(crate) fn from_pem(pem: &str, path: &Path) -> Result<Self, CredentialError> {
        let err = |why| CredentialError::Certificate {
            path: path.to_path_buf(),
            why,
        };
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| err("no CERTIFICATE block"))?;
        let digest = |alg| URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(alg, &der));
        Ok(Self {
            sha1: digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY),
            sha256: digest(&aws_lc_rs::digest::SHA256),
        })
    }
}

/// True for an encrypted PEM key: PKCS#8 `ENCRYPTED PRIVATE KEY` (RFC 5958 §3), or a legacy
/// key with an RFC 1421 `Proc-Type: 4,ENCRYPTED` header.
fn is_encrypted(pem: &str) -> bool {
    pem.lines().map(str::trim).any(|line| {
        line == "-----BEGIN ENCRYPTED PRIVATE KEY-----"
            || line.starts_with("Proc-Type: 4,ENCRYPTED")
    })
}

/// The first SEC 1 `EC PRIVATE KEY` block of `pem` (RFC 5915; RFC 7468 §2 for the text), on
/// P-256 or P-384, as PKCS#8 DER.
fn sec1_as_pkcs8(pem: &str) -> Option<Vec<u8>> {
    let (_, rest) = pem.split_once("-----BEGIN EC PRIVATE KEY-----")?;
    let (body, _) = rest.split_once("-----END EC PRIVATE KEY-----")?;
    let der = STANDARD
        .decode(body.split_whitespace().collect::<String>())
        .ok()?;
    [
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &ECDSA_P384_SHA384_FIXED_SIGNING,
    ]
    .into_iter()
    .find_map(|alg| {
        let pair = EcdsaKeyPair::from_private_key_der(alg, &der).ok()?;
        pair.to_pkcs8v1().ok()
    })
    .map(|pkcs8| pkcs8.as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{self, EcdsaSigningAlgorithm, KeyPair};

    use super::*;

    fn pem(label: &str, der: &[u8]) -> String {
        let b64 = STANDARD.encode(der);
        let body: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            body.join("\n")
        )
    }

    fn kid(id: &str) -> AssertionHeader<'_> {
        AssertionHeader {
            key_id: Some(id),
            thumbprints: None,
        }
    }

    #[test]
    fn certificate_thumbprints_are_base64url_digests_of_the_der() {
        // FIPS 180 test vectors: the digests of "abc".
        let t =
            Thumbprints::from_pem(&pem("CERTIFICATE", b"abc"), Path::new("c.pem")).expect("parse");
        assert_eq!(t.sha1, "qZk-NkcGgWq6PiVxeFDCbJzQ2J0");
        assert_eq!(t.sha256, "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0");
        let e = Thumbprints::from_pem(&pem("PRIVATE KEY", b"abc"), Path::new("c.pem"))
            .err()
            .expect("a key is not a certificate");
        assert_eq!(
            e.to_string(),
            "exchange.client_auth.certificate_file c.pem: no CERTIFICATE block"
        );

        let (_, pkcs8) = ec_pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let key = SigningKey::from_pem(&pem("PRIVATE KEY", pkcs8.as_ref()), Path::new("k.pem"))
            .expect("parse");
        let header = AssertionHeader {
            key_id: None,
            thumbprints: Some(&t),
        };
        let jws = key
            .sign_assertion("txp", "aud", header, SystemTime::now())
            .expect("sign");
        let (h, _) = jws.expose_secret().split_once('.').expect("parts");
        let h: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).expect("b64")).expect("json");
        assert_eq!(h["x5t"], "qZk-NkcGgWq6PiVxeFDCbJzQ2J0");
        assert_eq!(h["x5t#S256"], "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0");
    }

    /// A fresh EC key pair on the curve of `alg`, and its PKCS#8 form.
    fn ec_pair(alg: &'static EcdsaSigningAlgorithm) -> (EcdsaKeyPair, Vec<u8>) {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &SystemRandom::new()).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref()).expect("key");
        (pair, pkcs8.as_ref().to_vec())
    }

    fn verify(
        jws: &str,
        alg: &'static dyn signature::VerificationAlgorithm,
        public: &[u8],
    ) -> serde_json::Value {
        let (signed, sig) = jws.rsplit_once('.').expect("three parts");
        let sig = URL_SAFE_NO_PAD.decode(sig).expect("b64");
        signature::UnparsedPublicKey::new(alg, public)
            .verify(signed.as_bytes(), &sig)
            .expect("signature verifies");
        let (header, claims) = signed.split_once('.').expect("parts");
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).expect("b64")).expect("json");
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).expect("b64")).expect("json");
        claims["header"] = header;
        claims
    }

    #[test]
    fn ec_assertions_are_es256_with_the_rfc7523_claims() {
        let (pair, pkcs8) = ec_pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let key = SigningKey::from_pem(&pem("PRIVATE KEY", pkcs8.as_ref()), Path::new("k.pem"))
            .expect("parse");
        assert_eq!(key.alg, Algorithm::ES256);
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let jws = key
            .sign_assertion("txp", "https://idp/token", kid("k1"), now)
            .expect("sign");
        let c = verify(
            jws.expose_secret(),
            &signature::ECDSA_P256_SHA256_FIXED,
            pair.public_key().as_ref(),
        );
        assert_eq!(c["header"]["alg"], "ES256");
        assert_eq!(c["header"]["typ"], "JWT");
        assert_eq!(c["header"]["kid"], "k1");
        assert_eq!(c["iss"], "txp");
        assert_eq!(c["sub"], "txp");
        assert_eq!(c["aud"], "https://idp/token");
        assert_eq!(c["iat"], 1_700_000_000);
        assert_eq!(c["exp"], 1_700_000_060);
        let again = key
            .sign_assertion("txp", "https://idp/token", kid("k1"), now)
            .expect("sign");
        let c2 = verify(
            again.expose_secret(),
            &signature::ECDSA_P256_SHA256_FIXED,
            pair.public_key().as_ref(),
        );
        assert_ne!(c["jti"], c2["jti"], "jti must be fresh");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(c["jti"].as_str().expect("jti"))
                .expect("b64")
                .len(),
            JTI_BYTES
        );
    }

    #[test]
    fn sec1_ec_keys_and_p384_are_accepted() {
        let (pair, _) = ec_pair(&ECDSA_P384_SHA384_FIXED_SIGNING);
        let sec1 = pair.private_key().as_der().expect("sec1");
        let key = SigningKey::from_pem(&pem("EC PRIVATE KEY", sec1.as_ref()), Path::new("k.pem"))
            .expect("parse");
        assert_eq!(key.alg, Algorithm::ES384);
        let jws = key
            .sign_assertion("txp", "aud", AssertionHeader::default(), SystemTime::now())
            .expect("sign");
        let c = verify(
            jws.expose_secret(),
            &signature::ECDSA_P384_SHA384_FIXED,
            pair.public_key().as_ref(),
        );
        assert!(c["header"].get("kid").is_none());
    }

    #[test]
    fn a_sec1_key_after_its_ec_parameters_block_is_read() {
        let (pair, _) = ec_pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let sec1 = pair.private_key().as_der().expect("sec1");
        // What `openssl ecparam -name prime256v1 -genkey` writes: the curve's OID, then the key.
        let text = format!(
            "{}{}",
            pem(
                "EC PARAMETERS",
                &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
            ),
            pem("EC PRIVATE KEY", sec1.as_ref())
        );
        let key = SigningKey::from_pem(&text, Path::new("k.pem")).expect("parse");
        assert_eq!(key.alg, Algorithm::ES256);
    }

    #[test]
    fn rsa_keys_sign_rs256() {
        let pair = signature::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa");
        let pkcs8 = pair.as_der().expect("pkcs8");
        let key = SigningKey::from_pem(&pem("PRIVATE KEY", pkcs8.as_ref()), Path::new("k.pem"))
            .expect("parse");
        assert_eq!(key.alg, Algorithm::RS256);
        let jws = key
            .sign_assertion("txp", "aud", AssertionHeader::default(), SystemTime::now())
            .expect("sign");
        verify(
            jws.expose_secret(),
            &signature::RSA_PKCS1_2048_8192_SHA256,
            pair.public_key().as_ref(),
        );
    }

    #[test]
    fn bad_keys_are_refused_naming_the_file_only() {
        let p = Path::new("/keys/k.pem");
        for text in [
            "",
            "hello",
            "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----",
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\nAAAA\n-----END RSA PRIVATE KEY-----",
        ] {
            let err = SigningKey::from_pem(text, p).map(|_| ()).expect_err(text);
            let msg = err.to_string();
            assert!(msg.contains("/keys/k.pem"), "{msg}");
            assert!(!msg.contains("AAAA"), "{msg}");
        }
    }

    #[tokio::test]
    async fn each_method_produces_its_parameters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cr3t\n").expect("write");
        let endpoint: Url = "https://idp.example.com/token".parse().expect("url");
        let names = |c: &Credentials| c.params.iter().map(|(k, _)| *k).collect::<Vec<_>>();

        let basic = ClientAuthenticator::new(
            "txp",
            &ClientAuth::ClientSecretBasic {
                secret_file: secret.clone(),
            },
        )
        .expect("basic");
        let c = basic.credentials(&endpoint).await.expect("creds");
        let authorization = c.authorization.expect("header");
        assert!(authorization.is_sensitive());
        assert_eq!(
            authorization,
            basic_authorization("txp", &SecretString::from("s3cr3t"))
        );
        assert!(c.params.is_empty());

        let post = ClientAuthenticator::new(
            "txp",
            &ClientAuth::ClientSecretPost {
                secret_file: secret.clone(),
            },
        )
        .expect("post");
        let c = post.credentials(&endpoint).await.expect("creds");
        assert!(c.authorization.is_none());
        assert_eq!(names(&c), ["client_id", "client_secret"]);
        assert_eq!(c.params[1].1.expose_secret(), "s3cr3t");

        let assertion = dir.path().join("assertion");
        std::fs::write(&assertion, "first.assertion.jwt\n").expect("write");
        let file = ClientAuthenticator::new(
            "txp",
            &ClientAuth::ClientAssertionFile {
                assertion_file: assertion.clone(),
            },
        )
        .expect("file");
        let c = file.credentials(&endpoint).await.expect("creds");
        assert_eq!(
            names(&c),
            ["client_id", "client_assertion_type", "client_assertion"]
        );
        assert_eq!(c.params[1].1.expose_secret(), JWT_BEARER_ASSERTION_TYPE);
        assert_eq!(c.params[2].1.expose_secret(), "first.assertion.jwt");
        // Same length, same second: still re-read.
        std::fs::write(&assertion, "secnd.assertion.jwt\n").expect("write");
        let c = file.credentials(&endpoint).await.expect("creds");
        assert_eq!(c.params[2].1.expose_secret(), "secnd.assertion.jwt");

        let none = ClientAuthenticator::new("txp", &ClientAuth::None).expect("none");
        let c = none.credentials(&endpoint).await.expect("creds");
        assert_eq!(names(&c), ["client_id"]);
        assert_eq!(c.params[0].1.expose_secret(), "txp");
    }

    #[tokio::test]
    async fn a_replaced_private_key_is_used_from_the_next_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        let gen_key = || {
            let (pair, pkcs8) = ec_pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
            (
                pem("PRIVATE KEY", &pkcs8),
                pair.public_key().as_ref().to_vec(),
            )
        };
        let (pem1, pub1) = gen_key();
        std::fs::write(&path, &pem1).expect("write");
        let auth = ClientAuthenticator::new(
            "txp",
            &ClientAuth::PrivateKeyJwt {
                private_key_file: path.clone(),
                key_id: Some("k1".into()),
                certificate_file: None,
            },
        )
        .expect("jwt");
        let endpoint: Url = "https://idp.example.com/token".parse().expect("url");
        let c = auth.credentials(&endpoint).await.expect("creds");
        let c = verify(
            c.params[2].1.expose_secret(),
            &signature::ECDSA_P256_SHA256_FIXED,
            &pub1,
        );
        assert_eq!(c["aud"], "https://idp.example.com/token");

        let (pem2, pub2) = gen_key();
        // Make sure the file's stamp changes even on a coarse-grained file system.
        std::fs::write(&path, format!("{pem2}\n\n")).expect("write");
        let c = auth.credentials(&endpoint).await.expect("creds");
        verify(
            c.params[2].1.expose_secret(),
            &signature::ECDSA_P256_SHA256_FIXED,
            &pub2,
        );
    }

    #[test]
    fn unreadable_files_fail_the_setup() {
        let missing = PathBuf::from("/nonexistent/txp/secret");
        for auth in [
            ClientAuth::ClientSecretBasic {
                secret_file: missing.clone(),
            },
            ClientAuth::ClientSecretPost {
                secret_file: missing.clone(),
            },
            ClientAuth::PrivateKeyJwt {
                private_key_file: missing.clone(),
                key_id: None,
                certificate_file: None,
            },
            ClientAuth::ClientAssertionFile {
                assertion_file: missing.clone(),
            },
        ] {
            let err = ClientAuthenticator::new("txp", &auth).expect_err("missing file");
            assert!(err.to_string().contains("/nonexistent/txp/secret"), "{err}");
        }
    }
}
