//! TLS material for the HTTPS listener: a self-made CA and server certificate
//! on first start, or the operator's own certificate and key.
//!
//! Why this exists: the API is served over HTTPS only, because MSAL and the
//! Azure identity libraries refuse an `http://` authority. To make a fresh
//! installation work without any setup, the server creates its own CA in its
//! data directory and issues itself a server certificate from it; clients are
//! pointed at `ca.pem` once. Keeping the CA separate from the server
//! certificate means the server certificate can be reissued (when the set of
//! names changes, or it nears expiry) without clients having to trust anything
//! new.
//!
//! The generated certificates are built to pass strict X.509 verification
//! (OpenSSL's `-x509_strict`, which Python 3.13+ enables by default): subject
//! and authority key identifiers, critical basic constraints (CA only on the
//! CA), key usage, an extended key usage of serverAuth, and a subject
//! alternative name for every DNS name and IP address served.
//!
//! To decide whether an existing server certificate can be reused, this module
//! reads a few fields back out of its own certificates with a small DER
//! reader: rcgen can only parse certificates with its `x509-parser` feature,
//! which the workspace does not enable.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use rcgen::string::{BmpString, Ia5String, PrintableString, UniversalString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tracing::{debug, info, warn};

/// File name of the self-made CA certificate inside the data directory.
const CA_CERT_FILE: &str = "ca.pem";
/// File name of the self-made CA's private key inside the data directory.
const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the generated server certificate inside the data directory.
const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the generated server certificate's key inside the data directory.
const SERVER_KEY_FILE: &str = "server-key.pem";

/// Certificates start this long before "now", to tolerate clock skew.
const BACKDATE: Duration = Duration::from_secs(60 * 60);
/// Lifetime of the self-made CA (ten years, counting leap days).
const CA_LIFETIME: Duration = Duration::from_secs(3653 * 24 * 60 * 60);
/// Lifetime of a generated server certificate (the most Apple platforms accept).
const SERVER_LIFETIME: Duration = Duration::from_secs(825 * 24 * 60 * 60);
/// A server certificate expiring within this window is reissued.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Upper bound X.520 puts on a common name.
const MAX_COMMON_NAME: usize = 64;

/// Certificates the server presents, and where the CA file is (`None` when the
/// operator supplied their own).
pub struct TlsMaterial {
    /// The certificate chain to present, end-entity certificate first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key of the end-entity certificate.
    pub key: PrivateKeyDer<'static>,
    /// The self-made CA certificate clients should trust, when the server made one.
    pub ca_path: Option<PathBuf>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            ca_path: self.ca_path.clone(),
        }
    }
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field(
                "chain",
                &format_args!("[{} certificate(s)]", self.chain.len()),
            )
            .field("key", &"[redacted]")
            .field("ca_path", &self.ca_path)
            .finish()
    }
}

/// On first start creates `<data_dir>/ca.pem` and `<data_dir>/ca-key.pem` (a
/// self-made CA, key file mode 0600), then a server certificate
/// `<data_dir>/server.pem` + `<data_dir>/server-key.pem` (0600) signed by that
/// CA, with subject alternative names for every entry of `names` (each either
/// a DNS name or an IP address literal, IPv4 or IPv6, as decided by
/// [`std::net::IpAddr`]'s parser). On later starts reuses the CA, and reuses
/// the server certificate unless its SAN set differs from `names` (as a set)
/// or it expires within 30 days, in which case it issues a new one from the
/// same CA. Files are written atomically (write to temp file, fsync, rename).
///
/// DNS names are compared case-insensitively and stored in lower case; an
/// IPv6 literal may be given in brackets (`[::1]`); `*.example.com` wildcards
/// are accepted. The first name becomes the certificate's common name. The
/// server certificate is also reissued when it was not signed by the current
/// CA, does not match `server-key.pem`, or cannot be read. The returned chain
/// holds the server certificate only (clients already hold the CA).
///
/// # Errors
///
/// When `names` is empty or holds something that is neither a DNS name nor an
/// IP address; when a file cannot be read or written; and when the set of
/// files is partial: `ca.pem` without its `ca-key.pem` or the reverse, a key
/// that does not match, or a server certificate without any CA. The CA and
/// its key are never replaced or overwritten (every enrolled agent trusts
/// only that CA): the error says what is missing and how to recover. No CA
/// at all while machines are enrolled is refused the same way, unless
/// `guard.allow_new_ca`.
pub fn ensure_self_signed(
    data_dir: &Path,
    names: &[String],
    guard: NewCaGuard,
) -> Result<TlsMaterial> {
    let wanted = WantedNames::parse(names)?;
    fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let now = unix_now()?;
    let ca = load_or_create_ca(data_dir, now, guard)?;

    let cert_path = data_dir.join(SERVER_CERT_FILE);
    let key_path = data_dir.join(SERVER_KEY_FILE);
    let (cert, key) = match reusable_server_cert(&ca, &wanted, &cert_path, &key_path, now) {
        Ok(found) => {
            debug!(path = %cert_path.display(), "reusing the server certificate");
            found
        }
        Err(reason) => {
            info!(
                path = %cert_path.display(),
                names = ?wanted.ordered,
                "issuing a new server certificate: {reason:#}"
            );
            issue_server_cert(&ca, &wanted, data_dir, now, SERVER_LIFETIME)?
        }
    };
    Ok(TlsMaterial {
        chain: vec![cert],
        key,
        ca_path: Some(data_dir.join(CA_CERT_FILE)),
    })
}

/// Loads an operator-supplied PEM certificate chain and PEM private key
/// (PKCS#8, PKCS#1 or SEC1); clear errors naming the file on failure.
///
/// The chain is presented in file order, so the server's own certificate must
/// come first. The returned material has no `ca_path`.
///
/// # Errors
///
/// When either file cannot be read, the certificate file holds no PEM
/// certificate, the key file holds no usable (unencrypted) private key, or
/// the key does not belong to the first certificate; the message names the
/// file(s) concerned.
pub fn load_operator(cert: &Path, key: &Path) -> Result<TlsMaterial> {
    let cert_pem = fs::read(cert)
        .with_context(|| format!("cannot read TLS certificate {}", cert.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("invalid PEM in TLS certificate file {}", cert.display()))?;
    ensure!(
        !chain.is_empty(),
        "no certificate (\"BEGIN CERTIFICATE\" block) found in {}",
        cert.display()
    );

    let key_pem =
        fs::read(key).with_context(|| format!("cannot read TLS private key {}", key.display()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        let hint = if contains(&key_pem, b"ENCRYPTED PRIVATE KEY") {
            " (the key is encrypted; supply it unencrypted)"
        } else {
            " (expected a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block)"
        };
        anyhow!("no usable private key in {}{hint}: {e}", key.display())
    })?;

    // Check now, with both file names at hand, what rustls would otherwise
    // only report when the server configuration is built.
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), key_der.clone_key(), &provider).map_err(
        |e| match e {
            rustls::Error::InconsistentKeys(_) => anyhow!(
                "the private key in {} does not belong to the first certificate in {}",
                key.display(),
                cert.display()
            ),
            e => anyhow!(
                "cannot use the private key in {} with the certificate in {}: {e}",
                key.display(),
                cert.display()
            ),
        },
    )?;

    Ok(TlsMaterial {
        chain,
        key: key_der,
        ca_path: None,
    })
}

/// A rustls server config with the aws-lc-rs provider, TLS 1.2 and 1.3, ALPN
/// `["http/1.1"]`, no client auth.
///
/// # Errors
///
/// When the key is unusable or does not belong to the first certificate.
pub fn server_config(material: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions not supported by the crypto provider")?
        .with_no_client_auth()
        .with_single_cert(material.chain.clone(), material.key.clone_key())
        .context("cannot use the TLS certificate and key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A rustls client config trusting only the CA certificates in the given PEM
/// file (used by the agent and tests).
///
/// It offers TLS 1.2 and 1.3 with the aws-lc-rs provider and ALPN
/// `["http/1.1"]`, and presents no client certificate.
///
/// # Errors
///
/// When the file cannot be read, or holds no usable PEM certificate; the
/// message names the file.
pub fn client_config_trusting(ca_pem_path: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let pem = fs::read(ca_pem_path)
        .with_context(|| format!("cannot read CA certificate file {}", ca_pem_path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| {
            format!(
                "invalid PEM in CA certificate file {}",
                ca_pem_path.display()
            )
        })?;
        roots
            .add(cert)
            .with_context(|| format!("unusable CA certificate in {}", ca_pem_path.display()))?;
    }
    ensure!(
        !roots.is_empty(),
        "no certificate (\"BEGIN CERTIFICATE\" block) found in {}",
        ca_pem_path.display()
    );
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions not supported by the crypto provider")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

// ---------------------------------------------------------------------------
// Names

/// One subject alternative name, in the form used for set comparison.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SanName {
    /// A DNS name, lower case.
    Dns(String),
    /// An IP address.
    Ip(IpAddr),
    /// Any other kind of name (its context tag and encoded value).
    Other(u8, Vec<u8>),
}

/// The names the server certificate must carry.
struct WantedNames {
    /// In the order given, without duplicates; the first becomes the CN.
    ordered: Vec<SanName>,
    set: BTreeSet<SanName>,
}

impl WantedNames {
    fn parse(names: &[String]) -> Result<Self> {
        let mut ordered = Vec::new();
        let mut set = BTreeSet::new();
        for raw in names {
            let name = parse_name(raw)?;
            if set.insert(name.clone()) {
                ordered.push(name);
            }
        }
        ensure!(
            !ordered.is_empty(),
            "at least one DNS name or IP address is needed for the server certificate"
        );
        Ok(Self { ordered, set })
    }
}

fn parse_name(raw: &str) -> Result<SanName> {
    let name = raw.trim();
    let unbracketed = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(SanName::Ip(ip));
    }
    let dns = name.to_ascii_lowercase();
    let base = dns.strip_prefix("*.").unwrap_or(&dns);
    match ServerName::try_from(base) {
        Ok(ServerName::DnsName(_)) => Ok(SanName::Dns(dns)),
        _ => bail!("{raw:?} is neither a valid DNS name nor an IP address"),
    }
}

fn san_type(name: &SanName) -> Result<SanType> {
    Ok(match name {
        SanName::Dns(dns) => SanType::DnsName(Ia5String::try_from(dns.as_str())?),
        SanName::Ip(ip) => SanType::IpAddress(*ip),
        SanName::Other(..) => bail!("unsupported subject alternative name"),
    })
}

impl fmt::Display for SanName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SanName::Dns(dns) => f.write_str(dns),
            SanName::Ip(ip) => write!(f, "{ip}"),
            SanName::Other(tag, _) => write!(f, "<general name [{tag}]>"),
        }
    }
}

// ---------------------------------------------------------------------------
// The CA

/// The self-made CA, as needed to issue server certificates.
struct Ca {
    /// rcgen's view of the CA: its subject, key identifier and key.
    issuer: Issuer<'static, KeyPair>,
    /// The DER of the CA certificate's subject, which issued certificates must repeat.
    subject_der: Vec<u8>,
    /// The CA certificate's notAfter, in Unix seconds.
    not_after: i64,
}

/// Whether a data directory without any CA may have a new one made.
#[derive(Debug, Clone, Copy, Default)]
pub struct NewCaGuard {
    /// Machines in the database (revoked ones included): they were enrolled
    /// with the CA of this data directory and trust only that one.
    pub enrolled_machines: u64,
    /// The operator accepts that every enrolled agent loses the server
    /// (`cordon serve --new-ca`).
    pub allow_new_ca: bool,
}

fn load_or_create_ca(data_dir: &Path, now: i64, guard: NewCaGuard) -> Result<Ca> {
    let cert_path = data_dir.join(CA_CERT_FILE);
    let key_path = data_dir.join(CA_KEY_FILE);
    let present = |name: &str| data_dir.join(name).symlink_metadata().is_ok();
    let (has_cert, has_key) = (present(CA_CERT_FILE), present(CA_KEY_FILE));
    if !has_cert && !has_key {
        // A server certificate without its CA was issued by a CA that is
        // gone: the enrolled agents trust that one, and only that one.
        if let Some(left) = [SERVER_CERT_FILE, SERVER_KEY_FILE]
            .into_iter()
            .find(|name| present(name))
        {
            bail!(
                "{} holds {left} but no CA ({CA_CERT_FILE}, {CA_KEY_FILE}): the CA that the \
                 enrolled agents trust is missing. Restore {CA_CERT_FILE} and {CA_KEY_FILE} \
                 from a backup. Only if you accept that every enrolled agent loses this \
                 server (and must be enrolled again), move {left} away to have a new CA made.",
                data_dir.display()
            );
        }
        if guard.enrolled_machines > 0 {
            if !guard.allow_new_ca {
                bail!(
                    "{} has no CA ({CA_CERT_FILE}, {CA_KEY_FILE}) but its database has {} \
                     enrolled machine(s): they trust only the CA that is missing, and would \
                     lose this server (an isolated machine could then not be released). \
                     Restore {CA_CERT_FILE} and {CA_KEY_FILE} from a backup (an agent's state \
                     directory holds a copy of {CA_CERT_FILE}, but the key is needed too). \
                     Only if you accept that every enrolled agent loses this server (and must \
                     be enrolled again), start with --new-ca (CORDON_NEW_CA=true) to have a \
                     new CA made.",
                    data_dir.display(),
                    guard.enrolled_machines
                );
            }
            warn!(
                enrolled_machines = guard.enrolled_machines,
                "no CA in {}: making a new one as --new-ca asks; every enrolled agent must \
                 be enrolled again",
                data_dir.display()
            );
        }
        create_ca(&cert_path, &key_path, now)?;
    } else if !has_cert {
        bail!(
            "the CA certificate {} is missing but its key {} is there; the CA is never \
             replaced on its own, because every enrolled agent trusts only this CA. Restore \
             {CA_CERT_FILE} from a backup (or copy it back from an agent's state directory, \
             where it is kept as ca.pem). Only if you accept that every enrolled agent loses \
             this server (and must be enrolled again), move {CA_KEY_FILE}, {SERVER_CERT_FILE} \
             and {SERVER_KEY_FILE} out of {} to have a new CA made.",
            cert_path.display(),
            key_path.display(),
            data_dir.display()
        );
    }

    let cert_pem = fs::read(&cert_path)
        .with_context(|| format!("cannot read CA certificate {}", cert_path.display()))?;
    let cert_der = CertificateDer::from_pem_slice(&cert_pem)
        .map_err(|e| anyhow!("no CA certificate in {}: {e}", cert_path.display()))?;
    let key_pem = match fs::read(&key_path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "the CA certificate {} exists but its key {} is missing; restore the key from a \
             backup. Only if you accept that every enrolled agent loses this server (and must \
             be enrolled again), move {CA_CERT_FILE}, {SERVER_CERT_FILE} and {SERVER_KEY_FILE} \
             out of {} to have a new CA made.",
            cert_path.display(),
            key_path.display(),
            data_dir.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read CA key {}", key_path.display()));
        }
    };
    warn_if_readable_by_others(&key_path);
    let key = key_pair_from_pem(&key_pem)
        .with_context(|| format!("unusable CA key {}", key_path.display()))?;

    let cert = CertInfo::parse(&cert_der)
        .with_context(|| format!("cannot parse CA certificate {}", cert_path.display()))?;
    ensure!(
        cert.spki == key.subject_public_key_info().as_slice(),
        "the CA key {} does not belong to the CA certificate {}",
        key_path.display(),
        cert_path.display()
    );
    if cert.not_after <= now {
        warn!(
            path = %cert_path.display(),
            "the CA certificate has expired; move {CA_CERT_FILE}, {CA_KEY_FILE}, \
             {SERVER_CERT_FILE} and {SERVER_KEY_FILE} out of {} to have a new CA created \
             (every agent must then be enrolled again)",
            data_dir.display()
        );
    } else if cert.not_after <= now.saturating_add(secs(RENEW_BEFORE)) {
        warn!(path = %cert_path.display(), "the CA certificate expires within 30 days");
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = parse_distinguished_name(cert.subject).with_context(|| {
        format!(
            "unsupported subject in CA certificate {}",
            cert_path.display()
        )
    })?;
    params.key_identifier_method = match cert.subject_key_id {
        Some(id) => KeyIdMethod::PreSpecified(id.to_vec()),
        None => KeyIdMethod::Sha256,
    };
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(Ca {
        issuer: Issuer::new(params, key),
        subject_der: cert.subject.to_vec(),
        not_after: cert.not_after,
    })
}

fn create_ca(cert_path: &Path, key_path: &Path, now: i64) -> Result<()> {
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Cordon");
    dn.push(
        DnType::CommonName,
        format!("Cordon CA {}", hex(&random_bytes::<4>()?)),
    );
    params.distinguished_name = dn;
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, now - secs(BACKDATE), now + secs(CA_LIFETIME))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.key_identifier_method = KeyIdMethod::Sha256;
    let cert = params
        .self_signed(&key)
        .context("cannot create the CA certificate")?;

    // Never over an existing file: key material is never replaced.
    create_atomically(key_path, key.serialize_pem().as_bytes())?;
    create_atomically(cert_path, cert.pem().as_bytes())?;
    info!(
        path = %cert_path.display(),
        "created a new CA; clients must trust this file to connect"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The server certificate

/// The server certificate and key on disk, if they can be used as they are;
/// otherwise the reason they cannot.
fn reusable_server_cert(
    ca: &Ca,
    wanted: &WantedNames,
    cert_path: &Path,
    key_path: &Path,
    now: i64,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    for path in [cert_path, key_path] {
        ensure!(path.exists(), "{} does not exist yet", path.display());
    }
    let cert_pem =
        fs::read(cert_path).with_context(|| format!("cannot read {}", cert_path.display()))?;
    let cert_der = CertificateDer::from_pem_slice(&cert_pem)
        .map_err(|e| anyhow!("no certificate in {}: {e}", cert_path.display()))?;
    let key_pem =
        fs::read(key_path).with_context(|| format!("cannot read {}", key_path.display()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| anyhow!("no private key in {}: {e}", key_path.display()))?;
    let key = KeyPair::try_from(&key_der)
        .with_context(|| format!("unusable private key in {}", key_path.display()))?;
    let cert = CertInfo::parse(&cert_der)
        .with_context(|| format!("cannot parse {}", cert_path.display()))?;

    ensure!(
        cert.spki == key.subject_public_key_info().as_slice(),
        "{} does not belong to {}",
        key_path.display(),
        cert_path.display()
    );
    ensure!(
        cert.issuer == ca.subject_der.as_slice() && signed_by(&cert, ca.issuer.key()),
        "it was not issued by the current CA"
    );
    let have = cert.sans.unwrap_or_default();
    if have != wanted.set {
        let list = |s: &BTreeSet<SanName>| s.iter().map(ToString::to_string).collect::<Vec<_>>();
        bail!(
            "its names {:?} differ from the wanted {:?}",
            list(&have),
            list(&wanted.set)
        );
    }
    ensure!(cert.not_before <= now, "it is not valid yet");
    ensure!(
        cert.not_after > now.saturating_add(secs(RENEW_BEFORE)),
        "it expires within 30 days"
    );
    warn_if_readable_by_others(key_path);
    Ok((cert_der, key_der))
}

/// Whether `cert` carries a valid signature by `ca_key`.
fn signed_by(cert: &CertInfo<'_>, ca_key: &KeyPair) -> bool {
    // ecdsa-with-SHA256, the only kind of CA this module creates.
    const ECDSA_WITH_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    if ca_key.algorithm() != &PKCS_ECDSA_P256_SHA256 || cert.signature_oid != ECDSA_WITH_SHA256 {
        return false;
    }
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, ca_key.public_key_raw())
        .verify(cert.tbs, cert.signature)
        .is_ok()
}

fn issue_server_cert(
    ca: &Ca,
    wanted: &WantedNames,
    data_dir: &Path,
    now: i64,
    lifetime: Duration,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let key = KeyPair::generate().context("cannot generate the server key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let first = wanted.ordered[0].to_string();
    let common_name = if first.len() <= MAX_COMMON_NAME {
        first
    } else {
        "Cordon server".to_owned()
    };
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = wanted.ordered.iter().map(san_type).collect::<Result<_>>()?;
    params.serial_number = Some(random_serial()?);
    // Never outlive the CA: a chain is only as valid as its shortest link.
    let not_after = (now + secs(lifetime)).min(ca.not_after);
    set_validity(&mut params, now - secs(BACKDATE), not_after)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = KeyIdMethod::Sha256;
    let cert = params
        .signed_by(&key, &ca.issuer)
        .context("cannot issue the server certificate")?;

    // The CA's subject was rebuilt from its certificate; make sure it came
    // out byte for byte the same, or verifiers would not find the issuer.
    let issued = CertInfo::parse(cert.der()).context("cannot parse the issued certificate")?;
    ensure!(
        issued.issuer == ca.subject_der.as_slice(),
        "the issued certificate's issuer does not match the CA certificate's subject"
    );

    // Key first: a crash in between leaves a certificate that does not match
    // the key, which the next start detects and replaces.
    write_atomically(
        &data_dir.join(SERVER_KEY_FILE),
        key.serialize_pem().as_bytes(),
    )?;
    write_atomically(&data_dir.join(SERVER_CERT_FILE), cert.pem().as_bytes())?;
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok((cert.der().clone(), key_der))
}

fn key_pair_from_pem(pem: &[u8]) -> Result<KeyPair> {
    let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| anyhow!("no private key: {e}"))?;
    Ok(KeyPair::try_from(&der)?)
}

// ---------------------------------------------------------------------------
// Files, time, randomness

/// Writes `contents` to `path` through a temporary file in the same directory
/// (fsynced, then renamed over `path`), so readers see the old or the new
/// file, never a partial one. Files are created with mode 0600 (certificates
/// too: the owner, who runs the server, copies `ca.pem` to clients).
fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    write_through_temporary(path, contents, |tmp, path| fs::rename(tmp, path))
}

/// Like [`write_atomically`], but fails if `path` exists already: it is
/// never replaced (the temporary file is hard-linked, not renamed, into place).
fn create_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    write_through_temporary(path, contents, |tmp, path| {
        fs::hard_link(tmp, path)?;
        fs::remove_file(tmp)
    })
}

fn write_through_temporary(
    path: &Path,
    contents: &[u8],
    put_in_place: impl FnOnce(&Path, &Path) -> io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        hex(&random_bytes::<4>()?)
    ));
    let tmp = dir.join(tmp_name);

    let result = (|| -> io::Result<()> {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        put_in_place(&tmp, path)?;
        // Make the rename itself durable.
        #[cfg(unix)]
        fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path).map(|m| m.permissions().mode());
        if mode.is_ok_and(|mode| mode & 0o077 != 0) {
            warn!(
                path = %path.display(),
                "private key file is accessible to other users; consider chmod 600"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn unix_now() -> Result<i64> {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    Ok(i64::try_from(since.as_secs())?)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Sets the validity period, given in Unix seconds. (Done here rather than
/// through a conversion function so that rcgen's date type, from the `time`
/// crate, need not be named.)
fn set_validity(params: &mut CertificateParams, not_before: i64, not_after: i64) -> Result<()> {
    let since_epoch = |unix: i64| -> Result<Duration> {
        Ok(Duration::from_secs(
            u64::try_from(unix).context("date before 1970")?,
        ))
    };
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(not_before)?;
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(not_after)?;
    Ok(())
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| anyhow!("the system random number generator failed"))?;
    Ok(out)
}

/// A random positive 16-octet serial number, 126 bits of it random (RFC 5280
/// allows up to 20 octets; the fixed bits keep it positive and 16 octets long).
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = random_bytes::<16>()?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------
// A minimal DER reader, for the few certificate fields this module checks

mod tag {
    pub const BOOLEAN: u8 = 0x01;
    pub const INTEGER: u8 = 0x02;
    pub const BIT_STRING: u8 = 0x03;
    pub const OCTET_STRING: u8 = 0x04;
    pub const OID: u8 = 0x06;
    pub const UTF8_STRING: u8 = 0x0c;
    pub const PRINTABLE_STRING: u8 = 0x13;
    pub const IA5_STRING: u8 = 0x16;
    pub const UTC_TIME: u8 = 0x17;
    pub const GENERALIZED_TIME: u8 = 0x18;
    pub const UNIVERSAL_STRING: u8 = 0x1c;
    pub const BMP_STRING: u8 = 0x1e;
    pub const SEQUENCE: u8 = 0x30;
    pub const SET: u8 = 0x31;
    /// `[0]` constructed: the certificate version.
    pub const VERSION: u8 = 0xa0;
    /// `[3]` constructed: the extensions.
    pub const EXTENSIONS: u8 = 0xa3;
    /// `[0]` primitive: `AuthorityKeyIdentifier.keyIdentifier`.
    pub const KEY_ID: u8 = 0x80;
    /// `[2]` primitive: a `GeneralName`'s `dNSName`.
    pub const DNS_NAME: u8 = 0x82;
    /// `[7]` primitive: a `GeneralName`'s `iPAddress`.
    pub const IP_ADDRESS: u8 = 0x87;
}

/// Encoded OIDs of the extensions read here.
const OID_SUBJECT_KEY_ID: &[u8] = &[0x55, 0x1d, 0x0e];
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
const OID_AUTHORITY_KEY_ID: &[u8] = &[0x55, 0x1d, 0x23];

/// One DER element: its tag, its contents, and its full encoding.
#[derive(Clone, Copy)]
struct Tlv<'a> {
    tag: u8,
    value: &'a [u8],
    raw: &'a [u8],
}

struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.0.first().copied()
    }

    fn read(&mut self) -> Result<Tlv<'a>> {
        let input = self.0;
        let (&tag, rest) = input.split_first().context("truncated DER")?;
        ensure!(tag & 0x1f != 0x1f, "unsupported DER tag");
        let (&first, mut rest) = rest.split_first().context("truncated DER")?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            ensure!((1..=4).contains(&n), "unsupported DER length");
            ensure!(rest.len() >= n, "truncated DER");
            let mut len = 0usize;
            for &b in &rest[..n] {
                len = (len << 8) | usize::from(b);
            }
            rest = &rest[n..];
            len
        };
        ensure!(rest.len() >= len, "truncated DER");
        let header = input.len() - rest.len();
        let tlv = Tlv {
            tag,
            value: &rest[..len],
            raw: &input[..header + len],
        };
        self.0 = &rest[len..];
        Ok(tlv)
    }

    fn expect(&mut self, tag: u8) -> Result<Tlv<'a>> {
        let tlv = self.read()?;
        ensure!(
            tlv.tag == tag,
            "unexpected DER tag {:#04x} (wanted {tag:#04x})",
            tlv.tag
        );
        Ok(tlv)
    }

    fn optional(&mut self, tag: u8) -> Result<Option<Tlv<'a>>> {
        if self.peek_tag() == Some(tag) {
            self.read().map(Some)
        } else {
            Ok(None)
        }
    }
}

/// The fields of a certificate this module looks at.
struct CertInfo<'a> {
    /// The encoded `TBSCertificate`, which the signature covers.
    tbs: &'a [u8],
    /// The contents of the signature algorithm's OID.
    signature_oid: &'a [u8],
    /// The signature bits.
    signature: &'a [u8],
    /// The encoded issuer Name.
    issuer: &'a [u8],
    /// The encoded subject Name.
    subject: &'a [u8],
    /// notBefore, Unix seconds.
    not_before: i64,
    /// notAfter, Unix seconds.
    not_after: i64,
    /// The encoded `SubjectPublicKeyInfo`.
    spki: &'a [u8],
    subject_key_id: Option<&'a [u8]>,
    #[cfg_attr(not(test), allow(dead_code))]
    authority_key_id: Option<&'a [u8]>,
    /// None when there is no subject alternative name extension.
    sans: Option<BTreeSet<SanName>>,
}

impl<'a> CertInfo<'a> {
    fn parse(der: &'a [u8]) -> Result<Self> {
        let mut outer = Der(der);
        let cert = outer.expect(tag::SEQUENCE)?;
        ensure!(outer.is_empty(), "trailing data after the certificate");
        let mut cert = Der(cert.value);
        let tbs = cert.expect(tag::SEQUENCE)?;
        let mut sig_alg = Der(cert.expect(tag::SEQUENCE)?.value);
        let signature_oid = sig_alg.expect(tag::OID)?.value;
        let signature = cert.expect(tag::BIT_STRING)?.value;
        let (&unused_bits, signature) = signature.split_first().context("empty signature")?;
        ensure!(unused_bits == 0, "signature is not a whole number of bytes");

        let mut t = Der(tbs.value);
        t.optional(tag::VERSION)?;
        t.expect(tag::INTEGER)?;
        t.expect(tag::SEQUENCE)?;
        let issuer = t.expect(tag::SEQUENCE)?.raw;
        let mut validity = Der(t.expect(tag::SEQUENCE)?.value);
        let not_before = parse_time(validity.read()?)?;
        let not_after = parse_time(validity.read()?)?;
        let subject = t.expect(tag::SEQUENCE)?.raw;
        let spki = t.expect(tag::SEQUENCE)?.raw;

        let mut info = CertInfo {
            tbs: tbs.raw,
            signature_oid,
            signature,
            issuer,
            subject,
            not_before,
            not_after,
            spki,
            subject_key_id: None,
            authority_key_id: None,
            sans: None,
        };
        while let Some(next) = t.peek_tag() {
            let field = t.read()?;
            if next != tag::EXTENSIONS {
                continue; // issuerUniqueID, subjectUniqueID
            }
            let mut exts = Der(Der(field.value).expect(tag::SEQUENCE)?.value);
            while !exts.is_empty() {
                let mut ext = Der(exts.expect(tag::SEQUENCE)?.value);
                let oid = ext.expect(tag::OID)?.value;
                ext.optional(tag::BOOLEAN)?;
                let value = ext.expect(tag::OCTET_STRING)?.value;
                match oid {
                    OID_SUBJECT_KEY_ID => {
                        info.subject_key_id = Some(Der(value).expect(tag::OCTET_STRING)?.value);
                    }
                    OID_AUTHORITY_KEY_ID => {
                        let mut aki = Der(Der(value).expect(tag::SEQUENCE)?.value);
                        info.authority_key_id = aki.optional(tag::KEY_ID)?.map(|k| k.value);
                    }
                    OID_SUBJECT_ALT_NAME => info.sans = Some(parse_general_names(value)?),
                    _ => {}
                }
            }
        }
        Ok(info)
    }
}

fn parse_general_names(der: &[u8]) -> Result<BTreeSet<SanName>> {
    let mut names = Der(Der(der).expect(tag::SEQUENCE)?.value);
    let mut out = BTreeSet::new();
    while !names.is_empty() {
        let name = names.read()?;
        out.insert(match name.tag {
            tag::DNS_NAME => SanName::Dns(
                std::str::from_utf8(name.value)
                    .context("non-ASCII DNS name")?
                    .to_ascii_lowercase(),
            ),
            tag::IP_ADDRESS => match name.value.len() {
                4 => SanName::Ip(IpAddr::from(<[u8; 4]>::try_from(name.value)?)),
                16 => SanName::Ip(IpAddr::from(<[u8; 16]>::try_from(name.value)?)),
                _ => SanName::Other(name.tag, name.value.to_vec()),
            },
            other => SanName::Other(other, name.value.to_vec()),
        });
    }
    Ok(out)
}

/// A `UTCTime` or `GeneralizedTime` of the form RFC 5280 requires, as Unix seconds.
fn parse_time(tlv: Tlv<'_>) -> Result<i64> {
    let text = std::str::from_utf8(tlv.value).context("invalid time")?;
    let digits = text.strip_suffix('Z').context("time not in UTC")?;
    ensure!(
        digits.bytes().all(|b| b.is_ascii_digit()),
        "invalid time {text:?}"
    );
    let num = |range: std::ops::Range<usize>| -> Result<i64> {
        Ok(digits.get(range).context("invalid time")?.parse::<i64>()?)
    };
    let (year, rest) = match (tlv.tag, digits.len()) {
        (tag::UTC_TIME, 12) => {
            let yy = num(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (tag::GENERALIZED_TIME, 14) => (num(0..4)?, 4),
        _ => bail!("invalid time {text:?}"),
    };
    let field = |i: usize| num(rest + 2 * i..rest + 2 * i + 2);
    let (month, day, hour, minute, second) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    ensure!(
        (1..=12).contains(&month)
            && (1..=31).contains(&day)
            && hour < 24
            && minute < 60
            && second < 61,
        "invalid time {text:?}"
    );
    Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Rebuilds rcgen's form of an encoded Name, one attribute per RDN.
fn parse_distinguished_name(der: &[u8]) -> Result<DistinguishedName> {
    let mut rdns = Der(Der(der).expect(tag::SEQUENCE)?.value);
    let mut dn = DistinguishedName::new();
    while !rdns.is_empty() {
        let mut rdn = Der(rdns.expect(tag::SET)?.value);
        let mut atv = Der(rdn.expect(tag::SEQUENCE)?.value);
        ensure!(rdn.is_empty(), "multi-valued RDN");
        let ty = DnType::from_oid(&decode_oid(atv.expect(tag::OID)?.value)?);
        let value = atv.read()?;
        let text = || std::str::from_utf8(value.value).context("invalid string in name");
        let value = match value.tag {
            tag::UTF8_STRING => DnValue::Utf8String(text()?.to_owned()),
            tag::PRINTABLE_STRING => DnValue::PrintableString(PrintableString::try_from(text()?)?),
            tag::IA5_STRING => DnValue::Ia5String(Ia5String::try_from(text()?)?),
            tag::BMP_STRING => DnValue::BmpString(BmpString::from_utf16be(value.value.to_vec())?),
            tag::UNIVERSAL_STRING => {
                DnValue::UniversalString(UniversalString::from_utf32be(value.value.to_vec())?)
            }
            other => bail!("unsupported string type {other:#04x} in name"),
        };
        ensure!(dn.get(&ty).is_none(), "repeated attribute in name");
        dn.push(ty, value);
    }
    Ok(dn)
}

fn decode_oid(bytes: &[u8]) -> Result<Vec<u64>> {
    let mut arcs = Vec::new();
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        ensure!(value >> 57 == 0, "OID arc too large");
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        } else {
            ensure!(i + 1 < bytes.len(), "truncated OID");
        }
    }
    ensure!(!arcs.is_empty(), "empty OID");
    Ok(arcs)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// A data directory whose database has no machine yet.
    fn ensure_self_signed(data_dir: &Path, names: &[String]) -> Result<TlsMaterial> {
        super::ensure_self_signed(data_dir, names, NewCaGuard::default())
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "cordon-tls-{label}-{}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst),
                hex(&random_bytes::<4>().unwrap())
            ));
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }

        fn file(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }

        fn read(&self, name: &str) -> Vec<u8> {
            fs::read(self.file(name)).unwrap()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn name_set(list: &[&str]) -> BTreeSet<SanName> {
        list.iter().map(|s| parse_name(s).unwrap()).collect()
    }

    fn cert_file(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    fn key_file(path: &Path) -> KeyPair {
        key_pair_from_pem(&fs::read(path).unwrap()).unwrap()
    }

    fn common_name(info: &CertInfo<'_>) -> String {
        match parse_distinguished_name(info.subject)
            .unwrap()
            .get(&DnType::CommonName)
        {
            Some(DnValue::Utf8String(cn)) => cn.clone(),
            other => panic!("unexpected CN {other:?}"),
        }
    }

    /// Checks that the server certificate in `dir` was issued by the CA in `dir`.
    fn assert_chains_to_ca(dir: &TempDir) {
        let ca_der = cert_file(&dir.file(CA_CERT_FILE));
        let ca = CertInfo::parse(&ca_der).unwrap();
        let server_der = cert_file(&dir.file(SERVER_CERT_FILE));
        let server = CertInfo::parse(&server_der).unwrap();
        assert_eq!(server.issuer, ca.subject);
        assert!(ca.subject_key_id.is_some());
        assert_eq!(server.authority_key_id, ca.subject_key_id);
        assert!(signed_by(&server, &key_file(&dir.file(CA_KEY_FILE))));
        let server_key = key_file(&dir.file(SERVER_KEY_FILE));
        assert_eq!(server.spki, server_key.subject_public_key_info().as_slice());
    }

    fn pem(label: &str, der: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    b64.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    b64.push('=');
                }
            }
        }
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    /// The inner private key of a PKCS#8 structure: PKCS#1 for RSA, SEC1 for EC.
    fn pkcs8_inner(pkcs8: &[u8]) -> Vec<u8> {
        let mut p = Der(Der(pkcs8).expect(tag::SEQUENCE).unwrap().value);
        p.expect(tag::INTEGER).unwrap();
        p.expect(tag::SEQUENCE).unwrap();
        p.expect(tag::OCTET_STRING).unwrap().value.to_vec()
    }

    #[test]
    fn first_start_creates_ca_and_server_certificate() {
        let dir = TempDir::new("first");
        let material =
            ensure_self_signed(dir.path(), &names(&["localhost", "127.0.0.1", "::1"])).unwrap();

        assert_eq!(material.ca_path, Some(dir.file(CA_CERT_FILE)));
        let mut files: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        // Nothing else, in particular no temporary files left behind.
        assert_eq!(
            files,
            ["ca-key.pem", "ca.pem", "server-key.pem", "server.pem"]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [CA_KEY_FILE, SERVER_KEY_FILE] {
                let mode = fs::metadata(dir.file(key)).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{key}");
            }
        }

        let now = unix_now().unwrap();
        let ca_der = cert_file(&dir.file(CA_CERT_FILE));
        let ca = CertInfo::parse(&ca_der).unwrap();
        assert!(common_name(&ca).starts_with("Cordon CA "));
        assert_eq!(
            parse_distinguished_name(ca.subject)
                .unwrap()
                .get(&DnType::OrganizationName),
            Some(&DnValue::Utf8String("Cordon".into()))
        );
        assert_eq!(ca.issuer, ca.subject);
        assert!(ca.not_before <= now - 3500 && ca.not_before >= now - 3700);
        assert!(ca.not_after > now + 3650 * 86_400);

        let server_der = cert_file(&dir.file(SERVER_CERT_FILE));
        assert_eq!(material.chain, vec![server_der.clone()]);
        let server = CertInfo::parse(&server_der).unwrap();
        assert_eq!(common_name(&server), "localhost");
        assert_eq!(
            server.sans,
            Some(name_set(&["localhost", "127.0.0.1", "::1"]))
        );
        assert!(server.subject_key_id.is_some());
        assert!(server.not_after > now + 820 * 86_400);
        assert!(server.not_after < now + 830 * 86_400);
        assert_chains_to_ca(&dir);

        // The returned key is the one on disk, and the pair is usable.
        let on_disk = PrivateKeyDer::from_pem_file(dir.file(SERVER_KEY_FILE)).unwrap();
        assert_eq!(material.key.secret_der(), on_disk.secret_der());
        server_config(&material).unwrap();
    }

    #[test]
    fn restart_with_same_names_reuses_everything() {
        let dir = TempDir::new("reuse");
        let first = ensure_self_signed(dir.path(), &names(&["localhost", "127.0.0.1"])).unwrap();
        let before: Vec<_> = [CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE]
            .iter()
            .map(|f| dir.read(f))
            .collect();

        // Same set: order, case, duplicates and brackets don't matter.
        let second = ensure_self_signed(
            dir.path(),
            &names(&["127.0.0.1", "LocalHost", "localhost", "[127.0.0.1]"]),
        )
        .unwrap();
        let after: Vec<_> = [CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE]
            .iter()
            .map(|f| dir.read(f))
            .collect();
        assert!(before == after, "files changed on restart");
        assert_eq!(first.chain, second.chain);
        assert_eq!(first.key.secret_der(), second.key.secret_der());
    }

    #[test]
    fn changed_names_reissue_from_the_same_ca() {
        let dir = TempDir::new("names");
        ensure_self_signed(dir.path(), &names(&["localhost"])).unwrap();
        let ca_before = (dir.read(CA_CERT_FILE), dir.read(CA_KEY_FILE));
        let server_before = dir.read(SERVER_CERT_FILE);

        let material = ensure_self_signed(
            dir.path(),
            &names(&[
                "localhost",
                "cordon.example.com",
                "192.0.2.7",
                "2001:db8::7",
            ]),
        )
        .unwrap();
        assert_eq!((dir.read(CA_CERT_FILE), dir.read(CA_KEY_FILE)), ca_before);
        assert_ne!(dir.read(SERVER_CERT_FILE), server_before);
        let server = CertInfo::parse(&material.chain[0]).unwrap();
        assert_eq!(
            server.sans,
            Some(name_set(&[
                "localhost",
                "cordon.example.com",
                "192.0.2.7",
                "2001:db8::7"
            ]))
        );
        assert_chains_to_ca(&dir);

        // Dropping a name also reissues.
        let middle = dir.read(SERVER_CERT_FILE);
        let material = ensure_self_signed(dir.path(), &names(&["cordon.example.com"])).unwrap();
        assert_ne!(dir.read(SERVER_CERT_FILE), middle);
        let server = CertInfo::parse(&material.chain[0]).unwrap();
        assert_eq!(server.sans, Some(name_set(&["cordon.example.com"])));
        assert_eq!(common_name(&server), "cordon.example.com");
        assert_eq!((dir.read(CA_CERT_FILE), dir.read(CA_KEY_FILE)), ca_before);
        assert_chains_to_ca(&dir);
    }

    #[test]
    fn certificate_expiring_within_30_days_is_reissued() {
        let dir = TempDir::new("expiry");
        let wanted = names(&["localhost"]);
        ensure_self_signed(dir.path(), &wanted).unwrap();
        let ca_before = dir.read(CA_CERT_FILE);

        // Replace the server certificate by one with only 10 days left.
        let now = unix_now().unwrap();
        let ca = load_or_create_ca(dir.path(), now, NewCaGuard::default()).unwrap();
        let parsed = WantedNames::parse(&wanted).unwrap();
        issue_server_cert(
            &ca,
            &parsed,
            dir.path(),
            now,
            Duration::from_secs(10 * 86_400),
        )
        .unwrap();
        let short = dir.read(SERVER_CERT_FILE);
        assert!(
            CertInfo::parse(&cert_file(&dir.file(SERVER_CERT_FILE)))
                .unwrap()
                .not_after
                < now + 11 * 86_400
        );

        let material = ensure_self_signed(dir.path(), &wanted).unwrap();
        assert_ne!(dir.read(SERVER_CERT_FILE), short);
        assert!(CertInfo::parse(&material.chain[0]).unwrap().not_after > now + 800 * 86_400);
        assert_eq!(dir.read(CA_CERT_FILE), ca_before);
        assert_chains_to_ca(&dir);
    }

    #[test]
    fn certificate_from_another_ca_or_with_another_key_is_reissued() {
        let dir = TempDir::new("foreign");
        let wanted = names(&["localhost"]);
        ensure_self_signed(dir.path(), &wanted).unwrap();

        // A new CA (the operator replaced the old one with another): the
        // server certificate must be reissued from it.
        let old_ca = dir.read(CA_CERT_FILE);
        let old_server = dir.read(SERVER_CERT_FILE);
        let other = TempDir::new("other-ca");
        ensure_self_signed(other.path(), &wanted).unwrap();
        for file in [CA_CERT_FILE, CA_KEY_FILE] {
            fs::copy(other.file(file), dir.file(file)).unwrap();
        }
        ensure_self_signed(dir.path(), &wanted).unwrap();
        assert_ne!(dir.read(CA_CERT_FILE), old_ca);
        assert_ne!(dir.read(SERVER_CERT_FILE), old_server);
        assert_chains_to_ca(&dir);

        // A server key that does not match the certificate.
        let old_server = dir.read(SERVER_CERT_FILE);
        let stray = KeyPair::generate().unwrap();
        write_atomically(&dir.file(SERVER_KEY_FILE), stray.serialize_pem().as_bytes()).unwrap();
        ensure_self_signed(dir.path(), &wanted).unwrap();
        assert_ne!(dir.read(SERVER_CERT_FILE), old_server);
        assert_chains_to_ca(&dir);

        // A missing server key.
        let old_server = dir.read(SERVER_CERT_FILE);
        fs::remove_file(dir.file(SERVER_KEY_FILE)).unwrap();
        ensure_self_signed(dir.path(), &wanted).unwrap();
        assert_ne!(dir.read(SERVER_CERT_FILE), old_server);
        assert_chains_to_ca(&dir);
    }

    #[test]
    fn no_ca_at_all_with_enrolled_machines_needs_the_override() {
        let dir = TempDir::new("noca-enrolled");
        let enrolled = NewCaGuard {
            enrolled_machines: 2,
            allow_new_ca: false,
        };
        let err = super::ensure_self_signed(dir.path(), &names(&["localhost"]), enrolled)
            .map(|_| ())
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("2 enrolled machine(s)"), "{msg}");
        assert!(msg.contains("--new-ca"), "{msg}");
        assert!(!dir.file(CA_CERT_FILE).exists());
        assert!(!dir.file(CA_KEY_FILE).exists());

        let forced = NewCaGuard {
            allow_new_ca: true,
            ..enrolled
        };
        super::ensure_self_signed(dir.path(), &names(&["localhost"]), forced).unwrap();
        assert_chains_to_ca(&dir);
        // Once the CA is there, the guard is not consulted again.
        super::ensure_self_signed(dir.path(), &names(&["localhost"]), enrolled).unwrap();
    }

    #[test]
    fn ca_certificate_without_its_key_is_an_error() {
        let dir = TempDir::new("nokey");
        ensure_self_signed(dir.path(), &names(&["localhost"])).unwrap();
        let ca_before = dir.read(CA_CERT_FILE);
        fs::remove_file(dir.file(CA_KEY_FILE)).unwrap();
        let err = ensure_self_signed(dir.path(), &names(&["localhost"])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("ca-key.pem"), "{msg}");
        // The CA certificate is left alone.
        assert_eq!(dir.read(CA_CERT_FILE), ca_before);
    }

    /// Deleting `ca.pem` once made the server create a new CA over the old
    /// key: every enrolled agent then lost the server for good.
    #[test]
    fn a_partial_ca_stops_start_up_and_no_key_is_overwritten() {
        let dir = TempDir::new("partial");
        let wanted = names(&["localhost"]);
        ensure_self_signed(dir.path(), &wanted).unwrap();
        let before: Vec<_> = [CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE]
            .map(|f| dir.read(f))
            .into();

        fs::remove_file(dir.file(CA_CERT_FILE)).unwrap();
        let msg = format!("{:#}", ensure_self_signed(dir.path(), &wanted).unwrap_err());
        assert!(
            msg.contains("ca.pem") && msg.contains("is missing"),
            "{msg}"
        );
        assert!(msg.contains("backup"), "{msg}");
        assert!(!dir.file(CA_CERT_FILE).exists());
        let after: Vec<_> = [CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE]
            .map(|f| dir.read(f))
            .into();
        assert_eq!(after, before, "key material was rewritten");

        // Both CA files gone, the server certificate of the lost CA left.
        fs::remove_file(dir.file(CA_KEY_FILE)).unwrap();
        let msg = format!("{:#}", ensure_self_signed(dir.path(), &wanted).unwrap_err());
        assert!(
            msg.contains("server.pem") && msg.contains("backup"),
            "{msg}"
        );
        assert!(!dir.file(CA_CERT_FILE).exists() && !dir.file(CA_KEY_FILE).exists());

        // Moved away deliberately: a new CA.
        fs::remove_file(dir.file(SERVER_CERT_FILE)).unwrap();
        fs::remove_file(dir.file(SERVER_KEY_FILE)).unwrap();
        ensure_self_signed(dir.path(), &wanted).unwrap();
        assert_chains_to_ca(&dir);
    }

    #[test]
    fn an_existing_file_is_never_overwritten_by_create() {
        let dir = TempDir::new("create-new");
        fs::write(dir.file("ca-key.pem"), b"old key").unwrap();
        assert!(create_atomically(&dir.file("ca-key.pem"), b"new key").is_err());
        assert_eq!(dir.read("ca-key.pem"), b"old key");
        create_atomically(&dir.file("fresh.pem"), b"fresh").unwrap();
        assert_eq!(dir.read("fresh.pem"), b"fresh");
        let leftovers = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".tmp-")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn names_are_validated() {
        let dir = TempDir::new("invalid");
        for bad in [
            &[][..],
            &[""],
            &["bad name"],
            &["localhost", "exa mple.com"],
            &["ünï.example"],
        ] {
            let err = ensure_self_signed(dir.path(), &names(bad));
            assert!(err.is_err(), "{bad:?} accepted");
        }
        let material =
            ensure_self_signed(dir.path(), &names(&["*.example.com", "[::1]", " host-1 "]))
                .unwrap();
        let server = CertInfo::parse(&material.chain[0]).unwrap();
        assert_eq!(
            server.sans,
            Some(BTreeSet::from([
                SanName::Dns("*.example.com".into()),
                SanName::Dns("host-1".into()),
                SanName::Ip("::1".parse().unwrap()),
            ]))
        );
    }

    #[test]
    fn load_operator_accepts_pkcs8_sec1_and_pkcs1_keys() {
        let dir = TempDir::new("operator");
        let generated = ensure_self_signed(dir.path(), &names(&["localhost"])).unwrap();
        let cert = dir.file(SERVER_CERT_FILE);

        // PKCS#8, as written by ensure_self_signed.
        let material = load_operator(&cert, &dir.file(SERVER_KEY_FILE)).unwrap();
        assert_eq!(material.ca_path, None);
        assert_eq!(material.chain, generated.chain);
        server_config(&material).unwrap();

        // SEC1 ("EC PRIVATE KEY"), with a chain of two certificates.
        let sec1 = pkcs8_inner(generated.key.secret_der());
        let sec1_path = dir.file("sec1.pem");
        fs::write(&sec1_path, pem("EC PRIVATE KEY", &sec1)).unwrap();
        let chain_path = dir.file("chain.pem");
        let mut chain_pem = dir.read(SERVER_CERT_FILE);
        chain_pem.extend(dir.read(CA_CERT_FILE));
        fs::write(&chain_path, chain_pem).unwrap();
        let material = load_operator(&chain_path, &sec1_path).unwrap();
        assert!(matches!(material.key, PrivateKeyDer::Sec1(_)));
        assert_eq!(material.chain.len(), 2);
        server_config(&material).unwrap();

        // PKCS#1 ("RSA PRIVATE KEY").
        let rsa = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let rsa_cert = CertificateParams::new(names(&["localhost"]))
            .unwrap()
            .self_signed(&rsa)
            .unwrap();
        let rsa_cert_path = dir.file("rsa.pem");
        let rsa_key_path = dir.file("rsa-key.pem");
        fs::write(&rsa_cert_path, rsa_cert.pem()).unwrap();
        fs::write(
            &rsa_key_path,
            pem("RSA PRIVATE KEY", &pkcs8_inner(rsa.serialized_der())),
        )
        .unwrap();
        let material = load_operator(&rsa_cert_path, &rsa_key_path).unwrap();
        assert!(matches!(material.key, PrivateKeyDer::Pkcs1(_)));
        server_config(&material).unwrap();
    }

    #[test]
    fn load_operator_errors_name_the_file() {
        let dir = TempDir::new("operator-errors");
        ensure_self_signed(dir.path(), &names(&["localhost"])).unwrap();
        let cert = dir.file(SERVER_CERT_FILE);
        let key = dir.file(SERVER_KEY_FILE);
        let junk = dir.file("junk.pem");
        fs::write(&junk, "not a PEM file\n").unwrap();
        let missing = dir.file("missing.pem");
        let encrypted = dir.file("encrypted.pem");
        fs::write(&encrypted, pem("ENCRYPTED PRIVATE KEY", b"opaque")).unwrap();
        let other_key = dir.file("other-key.pem");
        fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();

        let error =
            |cert: &Path, key: &Path| format!("{:#}", load_operator(cert, key).unwrap_err());
        let msg = error(&missing, &key);
        assert!(msg.contains("missing.pem"), "{msg}");
        let msg = error(&junk, &key);
        assert!(
            msg.contains("junk.pem") && msg.contains("no certificate"),
            "{msg}"
        );
        let msg = error(&cert, &missing);
        assert!(msg.contains("missing.pem"), "{msg}");
        let msg = error(&cert, &junk);
        assert!(
            msg.contains("junk.pem") && msg.contains("private key"),
            "{msg}"
        );
        let msg = error(&cert, &encrypted);
        assert!(
            msg.contains("encrypted.pem") && msg.contains("encrypted"),
            "{msg}"
        );
        let msg = error(&cert, &other_key);
        assert!(
            msg.contains("other-key.pem")
                && msg.contains("server.pem")
                && msg.contains("does not belong"),
            "{msg}"
        );
    }

    #[test]
    fn client_config_needs_a_certificate() {
        let dir = TempDir::new("client");
        let junk = dir.file("junk.pem");
        fs::write(&junk, "nothing here\n").unwrap();
        let msg = format!("{:#}", client_config_trusting(&junk).unwrap_err());
        assert!(msg.contains("junk.pem"), "{msg}");
        let msg = format!(
            "{:#}",
            client_config_trusting(&dir.file("none.pem")).unwrap_err()
        );
        assert!(msg.contains("none.pem"), "{msg}");
    }

    #[test]
    fn der_helpers() {
        assert_eq!(decode_oid(&[0x55, 0x04, 0x03]).unwrap(), [2, 5, 4, 3]);
        assert_eq!(
            decode_oid(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]).unwrap(),
            [1, 2, 840, 10045, 4, 3, 2]
        );
        let time = |tag, text: &str| {
            parse_time(Tlv {
                tag,
                value: text.as_bytes(),
                raw: &[],
            })
        };
        assert_eq!(time(tag::UTC_TIME, "700101000000Z").unwrap(), 0);
        assert_eq!(time(tag::UTC_TIME, "000229123456Z").unwrap(), 951_827_696);
        assert_eq!(time(tag::UTC_TIME, "491231235959Z").unwrap(), 2_524_607_999);
        assert_eq!(
            time(tag::GENERALIZED_TIME, "20500101000000Z").unwrap(),
            2_524_608_000
        );
        assert!(time(tag::UTC_TIME, "700101000000").is_err());
        assert!(time(tag::UTC_TIME, "20500101000000Z").is_err());
    }

    /// Accepts TLS connections on 127.0.0.1 and answers "ping" with "pong".
    async fn serve(material: &TlsMaterial) -> std::net::SocketAddr {
        let acceptor = TlsAcceptor::from(server_config(material).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 4];
                    if tls.read_exact(&mut buf).await.is_ok() && &buf == b"ping" {
                        let _ = tls.write_all(b"pong").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    /// Connects, exchanges ping/pong, and returns the negotiated version and ALPN.
    async fn ping(
        addr: std::net::SocketAddr,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<(rustls::ProtocolVersion, Option<Vec<u8>>)> {
        let run = async {
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from(server_name.to_owned())?;
            let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
            let (_, conn) = tls.get_ref();
            let version = conn.protocol_version().context("no version")?;
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            tls.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            ensure!(&buf == b"pong", "unexpected reply");
            Ok((version, alpn))
        };
        tokio::time::timeout(Duration::from_secs(10), run).await?
    }

    #[tokio::test]
    async fn tls_handshake_by_name_and_by_address() {
        let dir = TempDir::new("handshake");
        let material =
            ensure_self_signed(dir.path(), &names(&["localhost", "127.0.0.1", "::1"])).unwrap();
        let addr = serve(&material).await;
        let ca_path = material.ca_path.clone().unwrap();
        let client = client_config_trusting(&ca_path).unwrap();

        for name in ["localhost", "127.0.0.1", "::1"] {
            let (version, alpn) = ping(addr, client.clone(), name).await.unwrap();
            assert_eq!(version, rustls::ProtocolVersion::TLSv1_3, "{name}");
            assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]), "{name}");
        }

        // TLS 1.2 is offered too.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_file(&ca_path)).unwrap();
        let tls12 = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (version, _) = ping(addr, Arc::new(tls12), "localhost").await.unwrap();
        assert_eq!(version, rustls::ProtocolVersion::TLSv1_2);

        // A name the certificate does not carry is refused.
        let err = ping(addr, client.clone(), "cordon.invalid")
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("certificate"), "{err:#}");

        // So is a client trusting some other CA.
        let other = TempDir::new("handshake-other");
        let other_material = ensure_self_signed(other.path(), &names(&["localhost"])).unwrap();
        let stranger = client_config_trusting(&other_material.ca_path.unwrap()).unwrap();
        let err = ping(addr, stranger, "localhost").await.unwrap_err();
        assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    }
}
