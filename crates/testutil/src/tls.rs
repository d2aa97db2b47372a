//! Certificates for TLS tests, made at test time: a CA and leaf certificates written in the
//! layout QEMU's `tls-creds-x509` reads (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
//! `client-cert.pem`, `client-key.pem`), with the key usages QEMU and gnutls check.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};

/// The organisation every test certificate carries: `CN=<name>,O=coloblk test`.
pub const ORG: &str = "coloblk test";

/// A test certificate authority.
pub struct TestCa {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM.
pub struct Leaf {
    /// The certificate.
    pub cert_pem: String,
    /// Its key (unencrypted PKCS#8).
    pub key_pem: String,
}

/// How a leaf is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Valid from 2020 to 2099.
    Valid,
    /// Expired at the start of 2021.
    Expired,
}

impl TestCa {
    /// A new CA named `CN=<name>,O=coloblk test`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORG);
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2099, 12, 31);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf `CN=<cn>,O=coloblk test` for servers and clients alike, valid for `localhost`,
    /// `127.0.0.1` and `::1`.
    pub fn leaf(&self, cn: &str, validity: Validity) -> Leaf {
        let sans = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORG);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = match validity {
            Validity::Valid => date_time_ymd(2099, 12, 31),
            Validity::Expired => date_time_ymd(2021, 1, 1),
        };
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes a credentials directory `dir` (created): this CA, a server certificate
    /// `CN=<server>` and a client certificate `CN=<client>`, both valid. Returns `dir`.
    pub fn creds(&self, dir: &Path, server: &str, client: &str) -> PathBuf {
        let server = self.leaf(server, Validity::Valid);
        let client = self.leaf(client, Validity::Valid);
        write_creds(dir, &self.cert_pem, Some(&server), Some(&client))
    }
}

/// Writes a credentials directory in QEMU's layout (keys mode 0600). Returns `dir`.
pub fn write_creds(
    dir: &Path,
    ca_pem: &str,
    server: Option<&Leaf>,
    client: Option<&Leaf>,
) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).expect("creds dir");
    std::fs::write(dir.join("ca-cert.pem"), ca_pem).expect("ca-cert.pem");
    for (role, leaf) in [("server", server), ("client", client)] {
        if let Some(leaf) = leaf {
            std::fs::write(dir.join(format!("{role}-cert.pem")), &leaf.cert_pem).expect("cert");
            let key = dir.join(format!("{role}-key.pem"));
            std::fs::write(&key, &leaf.key_pem).expect("key");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
    }
    dir.to_path_buf()
}

/// The identity QEMU's `authz-simple` and coloblk's `--tls-authz` compare for a test leaf.
pub fn dn(cn: &str) -> String {
    format!("CN={cn},O={ORG}")
}
