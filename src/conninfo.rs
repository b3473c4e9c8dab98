//! libpq connection strings, with libpq's meaning: the URL form (`postgresql://...`) and the
//! `key=value` form, parsed into a [`ConnInfo`].
//!
//! Invariants: pure parsing and validation (no file, no environment: `config` hands in the
//! `PG*` defaults it read, see [`ENV_DEFAULTS`]); an error names the offending parameter and
//! never contains a value that could be a secret; a parameter libpq knows and tenant-audit does
//! not implement is refused by name rather than silently ignored.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// libpq's environment variables and the parameter each one supplies when the connection string
/// is silent about it (`PGSSLMODE` -> `sslmode`, ...).
pub const ENV_DEFAULTS: &[(&str, &str)] = &[
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGDATABASE", "dbname"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGOPTIONS", "options"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ("PGTCPUSERTIMEOUT", "tcp_user_timeout"),
];

/// A parsed connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Tried in order (libpq's several hosts); never empty.
    pub hosts: Vec<HostSpec>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub dbname: Option<String>,
    /// Passed on as the `options` startup parameter (poolers such as PgBouncer refuse it).
    pub options: Option<String>,
    /// Per host, for TCP + TLS + authentication (libpq's `connect_timeout`, at least 2 s).
    pub connect_timeout: Option<Duration>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<RootCert>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub target_session_attrs: TargetSessionAttrs,
    pub keepalives: bool,
    pub keepalives_idle: Option<Duration>,
    pub keepalives_interval: Option<Duration>,
    pub keepalives_count: Option<u32>,
    pub tcp_user_timeout: Option<Duration>,
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnInfo")
            .field("hosts", &self.hosts)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("target_session_attrs", &self.target_session_attrs)
            .finish_non_exhaustive()
    }
}

/// One host to try: a name (or a Unix socket directory, starting with `/`), optionally the
/// address to dial instead of resolving the name (`hostaddr`), and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub host: String,
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
}

impl HostSpec {
    /// `host:port`, for messages.
    pub fn display(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plain first; TLS if the plain attempt fails.
    Allow,
    /// TLS first; plain if the server has no TLS or the TLS attempt fails. libpq's default.
    Prefer,
    /// TLS only. The certificate is verified like `VerifyCa` when a root certificate is given,
    /// otherwise not at all (encryption without authentication of the server).
    Require,
    /// TLS, the certificate chain verified against the root certificate; any host name.
    VerifyCa,
    /// TLS, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the certificate authorities for verification come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// `sslrootcert=system`: the operating system's trust store.
    System,
    /// A PEM file of one or more certificates.
    File(PathBuf),
}

/// libpq's `target_session_attrs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    Any,
    ReadWrite,
    ReadOnly,
    Primary,
    Standby,
    /// A standby if any host is one, else any.
    PreferStandby,
}

/// Why a connection string was refused. Messages name the parameter, never its value when the
/// value could be a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnInfoError {
    #[error("invalid connection string: parameter {param}: {message}")]
    Param { param: String, message: String },
    #[error("invalid connection string: {0}")]
    Syntax(String),
}

fn param_error(param: &str, message: impl Into<String>) -> ConnInfoError {
    ConnInfoError::Param { param: param.to_string(), message: message.into() }
}

/// Parameters libpq knows that tenant-audit does not implement: refused by name.
const UNSUPPORTED: &[&str] = &[
    "passfile",
    "service",
    "channel_binding",
    "client_encoding",
    "gssencmode",
    "gssdelegation",
    "krbsrvname",
    "gsslib",
    "require_auth",
    "requirepeer",
    "replication",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "sslkeylogfile",
    "sslnegotiation",
    "sslpassword",
    "sslsni",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "load_balance_hosts",
    "min_protocol_version",
    "max_protocol_version",
];

/// Parameters accepted and ignored: sessions always report `application_name = 'tenant-audit'`.
const IGNORED: &[&str] = &["application_name", "fallback_application_name"];

/// Parses `text` (URL or `key=value` form). `defaults` supplies parameters the string does not
/// set (libpq's environment variables, mapped by [`ENV_DEFAULTS`]).
pub fn parse(text: &str, defaults: &BTreeMap<String, String>) -> Result<ConnInfo, ConnInfoError> {
    let text = text.trim();
    let mut params = if text.starts_with("postgresql://") || text.starts_with("postgres://") {
        parse_url(text)?
    } else {
        parse_key_values(text)?
    };
    for (key, value) in defaults {
        params.entry(key.clone()).or_insert_with(|| value.clone());
    }
    build(params)
}

/// `key = value` pairs separated by whitespace; values may be single-quoted, with `\'` and
/// `\\` escapes (in and out of quotes).
fn parse_key_values(text: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let mut params = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(params);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(ConnInfoError::Syntax(format!("missing \"=\" after {key:?} in connection info string")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(ConnInfoError::Syntax(format!("unterminated quoted string for parameter {key}")))
                    }
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        params.insert(key, value);
    }
}

/// `postgresql://[user[:password]@][host[:port][,...]][/dbname][?param=value&...]`.
fn parse_url(text: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let rest = text.split_once("://").map_or(text, |(_, r)| r);
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (userinfo, netloc) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let mut params = BTreeMap::new();
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        if !user.is_empty() {
            params.insert("user".to_string(), decode("user", user)?);
        }
        if let Some(p) = password {
            params.insert("password".to_string(), decode("password", p)?);
        }
    }
    if !netloc.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for part in netloc.split(',') {
            let (host, port) = split_host_port(part)?;
            hosts.push(decode("host", host)?);
            ports.push(port.to_string());
        }
        params.insert("host".to_string(), hosts.join(","));
        if ports.iter().any(|p| !p.is_empty()) {
            params.insert("port".to_string(), ports.join(","));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        params.insert("dbname".to_string(), decode("dbname", db)?);
    }
    for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(ConnInfoError::Syntax(format!("missing \"=\" in URI query parameter {pair:?}")));
        };
        let key = decode("query", key)?;
        let value = decode(&key, value)?;
        params.insert(key, value);
    }
    Ok(params)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(part: &str) -> Result<(&str, &str), ConnInfoError> {
    if let Some(inner) = part.strip_prefix('[') {
        let Some((host, after)) = inner.split_once(']') else {
            return Err(param_error("host", "unterminated [ in an IPv6 host address"));
        };
        return match after.strip_prefix(':') {
            Some(port) => Ok((host, port)),
            None if after.is_empty() => Ok((host, "")),
            None => Err(param_error("host", "unexpected text after an IPv6 host address")),
        };
    }
    Ok(part.split_once(':').unwrap_or((part, "")))
}

/// Percent-decoding of one URL component.
fn decode(param: &str, text: &str) -> Result<String, ConnInfoError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                return Err(param_error(param, "invalid percent-encoded token"));
            };
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| param_error(param, "percent-encoding is not valid UTF-8"))
}

fn build(mut params: BTreeMap<String, String>) -> Result<ConnInfo, ConnInfoError> {
    const KNOWN: &[&str] = &[
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "options",
        "connect_timeout",
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "target_session_attrs",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
    ];
    for key in params.keys() {
        if UNSUPPORTED.contains(&key.as_str()) {
            return Err(param_error(key, "is not supported by tenant-audit"));
        }
        if !KNOWN.contains(&key.as_str()) && !IGNORED.contains(&key.as_str()) {
            return Err(param_error(key, "is not a libpq connection parameter"));
        }
    }
    let mut take = |key: &str| params.remove(key).filter(|v| !v.is_empty());
    let hosts = hosts(take("host"), take("hostaddr"), take("port"))?;
    let sslmode = match take("sslmode").as_deref() {
        None | Some("prefer") => SslMode::Prefer,
        Some("disable") => SslMode::Disable,
        Some("allow") => SslMode::Allow,
        Some("require") => SslMode::Require,
        Some("verify-ca") => SslMode::VerifyCa,
        Some("verify-full") => SslMode::VerifyFull,
        Some(other) => {
            return Err(param_error(
                "sslmode",
                format!("invalid value {other:?} (expected disable, allow, prefer, require, verify-ca or verify-full)"),
            ))
        }
    };
    let sslrootcert =
        take("sslrootcert").map(|v| if v == "system" { RootCert::System } else { RootCert::File(v.into()) });
    if sslrootcert == Some(RootCert::System) && sslmode != SslMode::VerifyFull {
        // libpq refuses this too: the system's authorities vouch for names, not for a chain.
        return Err(param_error(
            "sslmode",
            format!("weak sslmode {:?} may not be used with sslrootcert=system (use verify-full)", sslmode.name()),
        ));
    }
    if matches!(sslmode, SslMode::VerifyCa | SslMode::VerifyFull) && sslrootcert.is_none() {
        return Err(param_error(
            "sslrootcert",
            format!("sslmode {} needs a root certificate: set sslrootcert to a PEM file or to system", sslmode.name()),
        ));
    }
    let sslcert = take("sslcert").map(PathBuf::from);
    let sslkey = take("sslkey").map(PathBuf::from);
    if sslcert.is_some() != sslkey.is_some() {
        let missing = if sslcert.is_some() { "sslkey" } else { "sslcert" };
        return Err(param_error(missing, "sslcert and sslkey must be given together"));
    }
    let target_session_attrs = match take("target_session_attrs").as_deref() {
        None | Some("any") => TargetSessionAttrs::Any,
        Some("read-write") => TargetSessionAttrs::ReadWrite,
        Some("read-only") => TargetSessionAttrs::ReadOnly,
        Some("primary") => TargetSessionAttrs::Primary,
        Some("standby") => TargetSessionAttrs::Standby,
        Some("prefer-standby") => TargetSessionAttrs::PreferStandby,
        Some(other) => {
            return Err(param_error(
                "target_session_attrs",
                format!(
                    "invalid value {other:?} (expected any, read-write, read-only, primary, standby or prefer-standby)"
                ),
            ))
        }
    };
    // libpq: 0 (or nothing) waits forever, and anything below 2 s means 2 s.
    let connect_timeout =
        number("connect_timeout", take("connect_timeout"))?.filter(|s| *s > 0).map(|s| Duration::from_secs(s.max(2)));
    let keepalives = match take("keepalives").as_deref() {
        None | Some("1") => true,
        Some("0") => false,
        Some(other) => return Err(param_error("keepalives", format!("invalid value {other:?} (expected 0 or 1)"))),
    };
    let seconds = |key: &str, v| number(key, v).map(|n| n.filter(|n| *n > 0).map(Duration::from_secs));
    let keepalives_idle = seconds("keepalives_idle", take("keepalives_idle"))?;
    let keepalives_interval = seconds("keepalives_interval", take("keepalives_interval"))?;
    let keepalives_count = number("keepalives_count", take("keepalives_count"))?
        .filter(|n| *n > 0)
        .map(|n| u32::try_from(n).map_err(|_| param_error("keepalives_count", "too large")))
        .transpose()?;
    let tcp_user_timeout =
        number("tcp_user_timeout", take("tcp_user_timeout"))?.filter(|n| *n > 0).map(Duration::from_millis);
    Ok(ConnInfo {
        hosts,
        user: take("user"),
        password: take("password"),
        dbname: take("dbname"),
        options: take("options"),
        connect_timeout,
        sslmode,
        sslrootcert,
        sslcert,
        sslkey,
        target_session_attrs,
        keepalives,
        keepalives_idle,
        keepalives_interval,
        keepalives_count,
        tcp_user_timeout,
    })
}

/// A non-negative integer parameter; libpq's are C `int`s, so at most `i32::MAX`.
fn number(key: &str, value: Option<String>) -> Result<Option<u64>, ConnInfoError> {
    value
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= i32::MAX as u64)
                .ok_or_else(|| param_error(key, format!("invalid integer value {v:?}")))
        })
        .transpose()
}

/// The host list: `host`, `hostaddr` and `port` are comma-separated lists of the same length
/// (a single port applies to every host).
fn hosts(host: Option<String>, hostaddr: Option<String>, port: Option<String>) -> Result<Vec<HostSpec>, ConnInfoError> {
    let addrs: Vec<Option<IpAddr>> = match &hostaddr {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|a| {
                let a = a.trim();
                if a.is_empty() {
                    return Ok(None);
                }
                a.parse().map(Some).map_err(|_| param_error("hostaddr", format!("invalid IP address {a:?}")))
            })
            .collect::<Result<_, _>>()?,
    };
    let names: Vec<String> = match &host {
        Some(list) => list.split(',').map(|h| h.trim().to_string()).collect(),
        // libpq dials hostaddr without a name; the name then is the address.
        None => addrs.iter().map(|a| a.map(|a| a.to_string()).unwrap_or_default()).collect(),
    };
    if names.is_empty() || names.iter().all(String::is_empty) {
        return Err(param_error(
            "host",
            "not set: name the server (host=..., the URL's host, or PGHOST); a Unix socket is a directory starting with /",
        ));
    }
    if !addrs.is_empty() && addrs.len() != names.len() {
        return Err(param_error("hostaddr", format!("{} addresses for {} hosts", addrs.len(), names.len())));
    }
    let ports: Vec<u16> = match &port {
        None => vec![5432],
        Some(list) => list
            .split(',')
            .map(|p| {
                let p = p.trim();
                if p.is_empty() {
                    return Ok(5432);
                }
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| param_error("port", format!("invalid port number {p:?}")))
            })
            .collect::<Result<_, _>>()?,
    };
    if ports.len() != 1 && ports.len() != names.len() {
        return Err(param_error("port", format!("{} ports for {} hosts", ports.len(), names.len())));
    }
    Ok(names
        .into_iter()
        .enumerate()
        .map(|(i, host)| HostSpec {
            host: if host.is_empty() { "localhost".to_string() } else { host },
            hostaddr: addrs.get(i).copied().flatten(),
            port: if ports.len() == 1 { ports[0] } else { ports[i] },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<ConnInfo, ConnInfoError> {
        parse(text, &BTreeMap::new())
    }

    #[test]
    fn url_and_key_value_forms_agree() {
        let url = p(
            "postgresql://al%40ice:p%3Ass@db1:5433,[::1]:6432,db3/app?sslmode=require&target_session_attrs=read-write",
        )
        .unwrap();
        let kv = p("host=db1,::1,db3 port=5433,6432,5432 user='al@ice' password='p:ss' dbname=app sslmode=require \
                    target_session_attrs=read-write")
        .unwrap();
        assert_eq!(url, kv);
        assert_eq!(url.hosts.iter().map(HostSpec::display).collect::<Vec<_>>(), ["db1:5433", "::1:6432", "db3:5432"]);
        assert_eq!((url.user.as_deref(), url.password.as_deref()), (Some("al@ice"), Some("p:ss")));
        assert_eq!(url.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert!(!format!("{url:?}").contains("p:ss"), "no password in Debug");
    }

    #[test]
    fn quoting_and_escapes_in_key_value_form() {
        let c = p(r"host = h  password = 'it\'s a \\ secret' dbname=a\ b").unwrap();
        assert_eq!(c.password.as_deref(), Some(r"it's a \ secret"));
        assert_eq!(c.dbname.as_deref(), Some("a b"));
        assert_eq!(
            p("host='h").unwrap_err().to_string(),
            "invalid connection string: unterminated quoted string for parameter host"
        );
    }

    #[test]
    fn sslmode_values_and_their_rules() {
        assert_eq!(p("host=h").unwrap().sslmode, SslMode::Prefer, "libpq's default");
        assert_eq!(p("postgres://h/d?sslmode=allow").unwrap().sslmode, SslMode::Allow);
        let err = p("postgres://h/d?sslmode=verify-fulll").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid connection string: parameter sslmode: invalid value \"verify-fulll\" (expected disable, allow, prefer, require, verify-ca or verify-full)"
        );
        let err = p("postgres://h/d?sslmode=verify-full").unwrap_err().to_string();
        assert!(
            err.starts_with("invalid connection string: parameter sslrootcert: sslmode verify-full needs a root"),
            "{err}"
        );
        let err = p("postgres://h/d?sslmode=require&sslrootcert=system").unwrap_err().to_string();
        assert!(err.starts_with("invalid connection string: parameter sslmode: weak sslmode \"require\""), "{err}");
        let c = p("postgres://h/d?sslmode=verify-full&sslrootcert=system").unwrap();
        assert_eq!(c.sslrootcert, Some(RootCert::System));
        let err = p("postgres://h/d?sslcert=/c.pem").unwrap_err().to_string();
        assert!(err.starts_with("invalid connection string: parameter sslkey:"), "{err}");
    }

    #[test]
    fn environment_defaults_fill_only_what_the_string_leaves_out() {
        let env = BTreeMap::from([
            ("sslmode".to_string(), "require".to_string()),
            ("user".to_string(), "envuser".to_string()),
            ("port".to_string(), "7000".to_string()),
        ]);
        let c = parse("postgres://u@h/d", &env).unwrap();
        assert_eq!((c.sslmode, c.user.as_deref(), c.hosts[0].port), (SslMode::Require, Some("u"), 7000));
        let c = parse("postgres://u@h/d?sslmode=disable", &env).unwrap();
        assert_eq!(c.sslmode, SslMode::Disable);
    }

    #[test]
    fn invalid_strings_name_the_parameter() {
        let cases = [
            ("postgres://h/d?conect_timeout=3", "parameter conect_timeout: is not a libpq connection parameter"),
            ("postgres://h/d?passfile=/x", "parameter passfile: is not supported by tenant-audit"),
            ("postgres://h:99999/d", "parameter port: invalid port number \"99999\""),
            ("host=h connect_timeout=soon", "parameter connect_timeout: invalid integer value \"soon\""),
            ("host=h keepalives_idle=99999999999", "parameter keepalives_idle: invalid integer value \"99999999999\""),
            ("host=h,i port=1,2,3", "parameter port: 3 ports for 2 hosts"),
            ("host=h hostaddr=nope", "parameter hostaddr: invalid IP address \"nope\""),
            ("postgres://h/d?target_session_attrs=rw", "parameter target_session_attrs: invalid value \"rw\""),
            ("postgres:///d", "parameter host: not set"),
            ("postgres://u:%zz@h/d", "parameter password: invalid percent-encoded token"),
            ("host", "missing \"=\" after \"host\""),
        ];
        for (text, expected) in cases {
            let err = p(text).unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid connection string: {expected}")), "{text}: {err}");
        }
    }

    #[test]
    fn libpq_numbers_keep_their_meaning() {
        let c = p("host=h connect_timeout=1 keepalives_idle=5 keepalives_count=2 tcp_user_timeout=1500 keepalives=0")
            .unwrap();
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(2)), "below 2 s means 2 s");
        assert_eq!((c.keepalives_idle, c.keepalives_count), (Some(Duration::from_secs(5)), Some(2)));
        assert_eq!(c.tcp_user_timeout, Some(Duration::from_millis(1500)));
        assert!(!c.keepalives);
        assert_eq!(p("host=h connect_timeout=0").unwrap().connect_timeout, None, "0 waits forever in libpq");
        let c = p("hostaddr=127.0.0.1 port=6000").unwrap();
        assert_eq!(c.hosts, [HostSpec { host: "127.0.0.1".into(), hostaddr: Some([127, 0, 0, 1].into()), port: 6000 }]);
    }
}
