//! Certificates for the HTTPS tests: a throwaway CA that issues server certificates for
//! `localhost` and `127.0.0.1` with chosen serial numbers (rcgen on aws-lc-rs). Shared by the
//! integration tests and the unit tests of `src/tls.rs`.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::pki_types::CertificateDer;

/// A CA whose certificate the test clients trust.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate.
    pub der: CertificateDer<'static>,
    pub pem: String,
}

/// A server certificate (followed by its CA's in `chain_pem`) and its key.
pub struct Leaf {
    pub chain_pem: String,
    pub key_pem: String,
    /// The serial number's bytes, as chosen.
    pub serial: Vec<u8>,
}

impl Ca {
    /// A new CA with a fresh P-256 key.
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "txp test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1` with serial number `serial`.
    pub fn issue(&self, serial: &[u8]) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        params.serial_number = Some(SerialNumber::from_slice(serial));
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
            serial: serial.to_vec(),
        }
    }
}

impl Leaf {
    /// Writes the chain to `cert` and the key to `key` (each file replaced whole).
    pub fn write(&self, cert: &Path, key: &Path) {
        std::fs::write(cert, &self.chain_pem).expect("write certificate");
        std::fs::write(key, &self.key_pem).expect("write key");
    }
}
