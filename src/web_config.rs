//! The listener's security file (`--web.config.file`, `web.config_file`) in the Prometheus
//! exporter-toolkit format: `tls_server_config` (certificate, key, optional client CA and
//! client-certificate policy), `basic_auth_users` (bcrypt hashes) and `http_server_config`
//! (`headers`). Parsed and validated once, at start-up, into [`WebSecurity`].
//!
//! Invariants: every error is one line that names the file and the offending key, never a
//! panic; a key of the format that tenant-audit does not implement is refused by name rather
//! than silently ignored (a policy that is not applied must not look applied); no password or
//! private key appears in an error or in `Debug` output. Relative paths are relative to the web
//! config file's directory, as in exporter-toolkit. [`WebSecurity::files`] lists what the
//! listener watches to load the file again after a rotation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::header::{HeaderName, HeaderValue};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// Why a web config file was refused. Always names the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("web config file {path}: {key}: {message}")]
pub struct WebConfigError {
    pub path: PathBuf,
    pub key: String,
    pub message: String,
}

/// What the web config file asks of the listener.
#[derive(Clone)]
pub struct WebSecurity {
    /// The file it came from, for logs.
    pub path: PathBuf,
    /// Serve HTTPS with this configuration; `None` serves plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// User name to bcrypt hash; empty means no basic authentication.
    pub users: BTreeMap<String, String>,
    /// Extra response headers (`http_server_config.headers`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Whether TLS clients must present a certificate signed by the client CA.
    pub client_auth: ClientAuth,
    /// The file itself and the files it names (certificate, key, client CA): when one of them
    /// changes, the listener loads the file again.
    pub files: Vec<PathBuf>,
}

impl std::fmt::Debug for WebSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSecurity")
            .field("path", &self.path)
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field("client_auth", &self.client_auth)
            .finish()
    }
}

/// The supported `client_auth_type` values (Go's `tls.ClientAuthType` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    NoClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

impl WebSecurity {
    /// Reads and validates the web config file at `path`.
    pub fn load(path: &Path) -> Result<WebSecurity, WebConfigError> {
        let error = |key: &str, message: String| WebConfigError { path: path.to_path_buf(), key: key.into(), message };
        let text = std::fs::read_to_string(path).map_err(|e| error("(file)", format!("cannot read: {e}")))?;
        // An empty file is a valid exporter-toolkit config: nothing required.
        let raw: RawWebConfig = if text.trim().is_empty() {
            RawWebConfig::default()
        } else {
            serde_yaml_ng::from_str(&text).map_err(|e| {
                let message = e.to_string().lines().next().unwrap_or("invalid YAML").to_string();
                error("(yaml)", message)
            })?
        };
        raw.validate(path)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebConfig {
    tls_server_config: Option<RawTls>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
    http_server_config: Option<RawHttpServer>,
    rate_limit: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_ca_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<serde_yaml_ng::Value>,
    curve_preferences: Option<serde_yaml_ng::Value>,
    prefer_server_cipher_suites: Option<serde_yaml_ng::Value>,
    client_allowed_sans: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpServer {
    http2: Option<bool>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// Headers exporter-toolkit lets `http_server_config.headers` set.
const ALLOWED_HEADERS: [&str; 5] = [
    "Content-Security-Policy",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "X-XSS-Protection",
    "Strict-Transport-Security",
];

impl RawWebConfig {
    fn validate(self, path: &Path) -> Result<WebSecurity, WebConfigError> {
        let error = |key: &str, message: &str| WebConfigError {
            path: path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        };
        if self.rate_limit.is_some() {
            return Err(error(
                "rate_limit",
                "not supported by tenant-audit (POST /scan has its own limit: web.scan_requests.min_interval)",
            ));
        }
        for (user, hash) in &self.basic_auth_users {
            let key = format!("basic_auth_users.{user}");
            if user.is_empty() || user.contains(':') {
                return Err(error(&key, "a user name must be non-empty and contain no ':'"));
            }
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(error(&key, "is not a bcrypt hash (make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')"));
            }
        }
        let mut headers = Vec::new();
        if let Some(http) = &self.http_server_config {
            if http.http2 == Some(true) {
                return Err(error(
                    "http_server_config.http2",
                    "tenant-audit serves HTTP/1.1 only; set false or leave out",
                ));
            }
            for (name, value) in &http.headers {
                let key = format!("http_server_config.headers.{name}");
                let Some(allowed) = ALLOWED_HEADERS.iter().find(|h| h.eq_ignore_ascii_case(name)) else {
                    return Err(error(&key, &format!("not one of {}", ALLOWED_HEADERS.join(", "))));
                };
                if value.is_empty() {
                    continue;
                }
                let value = HeaderValue::from_str(value).map_err(|_| error(&key, "is not a valid header value"))?;
                headers.push((HeaderName::from_static(static_lower(allowed)), value));
            }
        }
        let mut files = vec![path.to_path_buf()];
        let (tls, client_auth) = match self.tls_server_config {
            Some(tls) => {
                let dir = path.parent().unwrap_or(Path::new("."));
                files.extend(
                    [&tls.cert_file, &tls.key_file, &tls.client_ca_file].into_iter().flatten().map(|f| dir.join(f)),
                );
                let (config, client_auth) = tls.validate(path)?;
                (Some(Arc::new(config)), client_auth)
            }
            None => (None, ClientAuth::NoClientCert),
        };
        Ok(WebSecurity { path: path.to_path_buf(), tls, users: self.basic_auth_users, headers, client_auth, files })
    }
}

/// The lower-case spelling `HeaderName::from_static` requires, of one of [`ALLOWED_HEADERS`].
fn static_lower(name: &str) -> &'static str {
    match name {
        "Content-Security-Policy" => "content-security-policy",
        "X-Frame-Options" => "x-frame-options",
        "X-Content-Type-Options" => "x-content-type-options",
        "X-XSS-Protection" => "x-xss-protection",
        _ => "strict-transport-security",
    }
}

impl RawTls {
    fn validate(self, path: &Path) -> Result<(rustls::ServerConfig, ClientAuth), WebConfigError> {
        let error = |key: &str, message: String| WebConfigError { path: path.to_path_buf(), key: key.into(), message };
        let key = |k: &str| format!("tls_server_config.{k}");
        for (name, given) in [
            ("cipher_suites", self.cipher_suites.is_some()),
            ("curve_preferences", self.curve_preferences.is_some()),
            ("prefer_server_cipher_suites", self.prefer_server_cipher_suites.is_some()),
            ("client_allowed_sans", self.client_allowed_sans.is_some()),
        ] {
            if given {
                return Err(error(
                    &key(name),
                    "not supported by tenant-audit (rustls chooses safe cipher suites and curves itself)".into(),
                ));
            }
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let certs = pem_certs(dir, "cert", self.cert, self.cert_file, path)?
            .ok_or_else(|| error(&key("cert_file"), "missing: the server certificate is required".into()))?;
        let private_key = private_key(dir, self.key, self.key_file, path)?;
        let client_ca = pem_certs(dir, "client_ca", self.client_ca, self.client_ca_file, path)?;
        let client_auth = match self.client_auth_type.as_deref() {
            None | Some("") | Some("NoClientCert") => ClientAuth::NoClientCert,
            Some("VerifyClientCertIfGiven") => ClientAuth::VerifyClientCertIfGiven,
            Some("RequireAndVerifyClientCert") => ClientAuth::RequireAndVerifyClientCert,
            Some(other @ ("RequestClientCert" | "RequireAnyClientCert" | "RequireClientCert")) => {
                return Err(error(
                    &key("client_auth_type"),
                    format!("{other} accepts certificates nobody verified; use RequireAndVerifyClientCert"),
                ));
            }
            Some(other) => {
                return Err(error(
                    &key("client_auth_type"),
                    format!("unknown value {other:?}; use NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"),
                ));
            }
        };
        let versions = protocol_versions(self.min_version.as_deref(), self.max_version.as_deref())
            .map_err(|(k, m)| error(&key(k), m))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&versions)
            .map_err(|e| error(&key("min_version"), e.to_string()))?;
        let builder = match (client_auth, client_ca) {
            (ClientAuth::NoClientCert, None) => builder.with_no_client_auth(),
            (ClientAuth::NoClientCert, Some(_)) => {
                return Err(error(
                    &key("client_auth_type"),
                    "a client CA is configured without a client auth policy; set RequireAndVerifyClientCert".into(),
                ));
            }
            (_, None) => {
                return Err(error(
                    &key("client_ca_file"),
                    "missing: verifying client certificates needs the client CA".into(),
                ));
            }
            (policy, Some(cas)) => {
                let mut roots = rustls::RootCertStore::empty();
                for (i, ca) in cas.into_iter().enumerate() {
                    roots.add(ca).map_err(|e| error(&key("client_ca_file"), format!("certificate {}: {e}", i + 1)))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if policy == ClientAuth::VerifyClientCertIfGiven {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(
                    verifier.build().map_err(|e| error(&key("client_ca_file"), e.to_string()))?,
                )
            }
        };
        let mut config = builder
            .with_single_cert(certs, private_key)
            .map_err(|e| error(&key("key_file"), format!("does not fit the certificate: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok((config, client_auth))
    }
}

/// The protocol versions between `min` and `max` (`TLS12`, `TLS13`; TLS 1.0 and 1.1 are not
/// offered by rustls), or the failing key and why.
fn protocol_versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, (&'static str, String)> {
    let parse = |key: &'static str, value: Option<&str>, default: u8| match value {
        None | Some("") => Ok(default),
        Some("TLS12") => Ok(12),
        Some("TLS13") => Ok(13),
        Some(v @ ("TLS10" | "TLS11")) => Err((key, format!("{v} is not supported (insecure); use TLS12 or TLS13"))),
        Some(v) => Err((key, format!("unknown version {v:?}; use TLS12 or TLS13"))),
    };
    let (min, max) = (parse("min_version", min, 12)?, parse("max_version", max, 13)?);
    if min > max {
        return Err(("min_version", "is above max_version".into()));
    }
    Ok([(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
        .into_iter()
        .filter(|(v, _)| (min..=max).contains(v))
        .map(|(_, p)| p)
        .collect())
}

/// PEM certificates given inline (`{name}`) or as a file (`{name}_file`); `None` if neither.
fn pem_certs(
    dir: &Path,
    name: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
    config_path: &Path,
) -> Result<Option<Vec<CertificateDer<'static>>>, WebConfigError> {
    let (key, result) = match (inline, file) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(WebConfigError {
                path: config_path.to_path_buf(),
                key: format!("tls_server_config.{name}"),
                message: format!("set {name} or {name}_file, not both"),
            });
        }
        (Some(pem), None) => (
            name.to_string(),
            CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string()),
        ),
        (None, Some(file)) => {
            let file = dir.join(file);
            let certs = CertificateDer::pem_file_iter(&file).and_then(|it| it.collect::<Result<Vec<_>, _>>());
            (format!("{name}_file"), certs.map_err(|e| with_file(&file, e)))
        }
    };
    let error = |message: String| WebConfigError {
        path: config_path.to_path_buf(),
        key: format!("tls_server_config.{key}"),
        message,
    };
    let certs = result.map_err(error)?;
    if certs.is_empty() {
        return Err(error("holds no PEM certificate".into()));
    }
    Ok(Some(certs))
}

fn private_key(
    dir: &Path,
    inline: Option<String>,
    file: Option<PathBuf>,
    config_path: &Path,
) -> Result<PrivateKeyDer<'static>, WebConfigError> {
    let error = |key: &str, message: String| WebConfigError {
        path: config_path.to_path_buf(),
        key: format!("tls_server_config.{key}"),
        message,
    };
    match (inline, file) {
        (None, None) => Err(error("key_file", "missing: the certificate's private key is required".into())),
        (Some(_), Some(_)) => Err(error("key", "set key or key_file, not both".into())),
        // The parser's messages describe the PEM structure, never the key material.
        (Some(pem), None) => PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| error("key", e.to_string())),
        (None, Some(file)) => {
            let file = dir.join(file);
            PrivateKeyDer::from_pem_file(&file).map_err(|e| error("key_file", with_file(&file, e)))
        }
    }
}

/// A PEM error as one line that says which file it is about.
fn with_file(file: &Path, e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => format!("cannot read {}: {io}", file.display()),
        rustls::pki_types::pem::Error::NoItemsFound => format!("{} holds no PEM item", file.display()),
        other => format!("{}: {other}", file.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, yaml: &str) -> Result<WebSecurity, String> {
        let dir = std::env::temp_dir().join(format!("tenant-audit-webconfig-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("web.yml");
        std::fs::write(&path, yaml).unwrap();
        WebSecurity::load(&path).map_err(|e| e.to_string().replace(&dir.display().to_string(), "DIR"))
    }

    #[test]
    fn empty_file_requires_nothing() {
        let s = load("empty", "").unwrap();
        assert!(s.tls.is_none() && s.users.is_empty() && s.headers.is_empty());
    }

    #[test]
    fn basic_auth_users_need_bcrypt_hashes() {
        let hash = "$2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze";
        let s = load("users", &format!("basic_auth_users:\n  alice: {hash}\n")).unwrap();
        assert_eq!(s.users["alice"], hash);
        assert!(!format!("{s:?}").contains(hash), "Debug shows no hash");
        assert_eq!(
            load("plain", "basic_auth_users:\n  alice: secret\n").unwrap_err(),
            "web config file DIR/web.yml: basic_auth_users.alice: is not a bcrypt hash (make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')"
        );
    }

    #[test]
    fn bad_files_name_the_key() {
        for (name, yaml, expected) in [
            ("unknown", "tls_server_confg: {}\n", "web config file DIR/web.yml: (yaml): unknown field `tls_server_confg`"),
            ("nocert", "tls_server_config:\n  key_file: k.pem\n", "web config file DIR/web.yml: tls_server_config.cert_file: missing: the server certificate is required"),
            ("nofile", "tls_server_config:\n  cert_file: gone.pem\n  key_file: k.pem\n", "web config file DIR/web.yml: tls_server_config.cert_file: cannot read DIR/gone.pem: No such file or directory (os error 2)"),
            ("ciphers", "tls_server_config:\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "web config file DIR/web.yml: tls_server_config.cipher_suites: not supported by tenant-audit (rustls chooses safe cipher suites and curves itself)"),
            ("rate", "rate_limit:\n  interval: 1s\n", "web config file DIR/web.yml: rate_limit: not supported by tenant-audit (POST /scan has its own limit: web.scan_requests.min_interval)"),
            ("header", "http_server_config:\n  headers:\n    X-Powered-By: me\n", "web config file DIR/web.yml: http_server_config.headers.X-Powered-By: not one of Content-Security-Policy, X-Frame-Options, X-Content-Type-Options, X-XSS-Protection, Strict-Transport-Security"),
            ("h2", "http_server_config:\n  http2: true\n", "web config file DIR/web.yml: http_server_config.http2: tenant-audit serves HTTP/1.1 only; set false or leave out"),
            ("yaml", "basic_auth_users: [\n", "web config file DIR/web.yml: (yaml): "),
        ] {
            let err = load(name, yaml).unwrap_err();
            assert!(err.starts_with(expected) && !err.contains('\n'), "{name}: {err}");
        }
    }

    #[test]
    fn versions_are_bounded() {
        assert_eq!(protocol_versions(None, None).unwrap().len(), 2);
        assert_eq!(protocol_versions(Some("TLS13"), None).unwrap(), [&rustls::version::TLS13]);
        assert_eq!(protocol_versions(Some("TLS10"), None).unwrap_err().0, "min_version");
        assert_eq!(protocol_versions(Some("TLS13"), Some("TLS12")).unwrap_err().1, "is above max_version");
    }

    #[test]
    fn headers_are_taken() {
        let s =
            load("headers", "http_server_config:\n  headers:\n    X-Frame-Options: deny\n    X-XSS-Protection: ''\n")
                .unwrap();
        assert_eq!(s.headers, [(HeaderName::from_static("x-frame-options"), HeaderValue::from_static("deny"))]);
    }
}
