//! Connection strings as libpq accepts them, for the replication connection.
//!
//! Accepted forms (libpq "Connection Strings", §34.1.1):
//! * URL: `postgresql://[user[:password]@][host[:port][,host[:port]…]][/dbname][?key=value&…]`
//!   (also `postgres://`), percent-decoded; a host starting with `/` (or `%2F`) is a Unix socket
//!   directory.
//! * key=value: `host=/var/run/postgresql port=5432 user=walvault sslmode=require`, values
//!   optionally single-quoted with `\'` and `\\` escapes.
//!
//! Keys: `host`, `hostaddr` (taken as host), `port`, `user`, `password`, `dbname`, `sslmode`,
//! `sslrootcert`, `target_session_attrs`, `application_name`, `connect_timeout`, `passfile`.
//! Missing keys fall back to libpq's environment variables (`PGHOST`, `PGPORT`, `PGUSER`,
//! `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGTARGETSESSIONATTRS`,
//! `PGAPPNAME`, `PGCONNECT_TIMEOUT`, `PGPASSFILE`), then to libpq's defaults (Unix socket in
//! `/var/run/postgresql` or `/tmp`, port 5432, user = OS user). A password not given anywhere
//! is looked up in the password file (`PGPASSFILE` or `~/.pgpass`, ignored unless mode 0600 or
//! stricter, as libpq does); replication connections match the database field `replication`.
//!
//! Several hosts (`host=a,b port=5432,5433` or `postgresql://a:5432,b:5433/`) are tried in
//! order; with `target_session_attrs=read-write` (or `primary`) a host that is in recovery is
//! skipped, so after a failover the agent finds the new primary.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A host to try: TCP name/address or Unix socket directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) => write!(f, "{h}"),
            Host::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => bail!("invalid sslmode {s:?}\nHINT: one of disable, allow, prefer, require, verify-ca, verify-full"),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    Any,
    /// `read-write` or `primary`: skip servers in recovery.
    ReadWrite,
}

/// A password that never reaches `Debug` or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Everything needed to open the replication connection.
#[derive(Clone, Debug)]
pub struct ConnParams {
    /// (host, port) pairs, in the order to try them.
    pub targets: Vec<(Host, u16)>,
    pub user: String,
    pub password: Option<Password>,
    pub dbname: Option<String>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub target_session_attrs: TargetSessionAttrs,
    pub application_name: String,
    pub connect_timeout: Option<Duration>,
    pub passfile: Option<PathBuf>,
}

impl ConnParams {
    /// A description for messages: `user@host:port[,host:port]`, never the password.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self.targets.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        format!("{}@{}", self.user, hosts.join(","))
    }

    /// Parse a connection string, filling gaps from `env` (libpq's variables) and defaults.
    pub fn parse(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let kv = if s.starts_with("postgresql://") || s.starts_with("postgres://") {
            parse_url(s)?
        } else {
            parse_keyword_value(s)?
        };
        Self::from_map(kv, env)
    }

    /// Parse using the process environment.
    pub fn parse_with_process_env(s: &str) -> Result<Self> {
        Self::parse(s, &|k| std::env::var(k).ok())
    }

    fn from_map(mut kv: HashMap<String, String>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        for k in kv.keys() {
            if !KNOWN_KEYS.contains(&k.as_str()) {
                bail!("unknown connection option {k:?}\nHINT: supported: {}", KNOWN_KEYS.join(", "));
            }
        }
        let hostaddr = kv.remove("hostaddr");
        let mut get = |key: &str, var: &str| kv.remove(key).or_else(|| env(var)).filter(|v| !v.is_empty());
        let hosts = get("host", "PGHOST").or(hostaddr);
        let ports = get("port", "PGPORT");
        let user = get("user", "PGUSER");
        let password = get("password", "PGPASSWORD").map(Password);
        let dbname = get("dbname", "PGDATABASE");
        let sslmode = SslMode::parse(&get("sslmode", "PGSSLMODE").unwrap_or_else(|| "prefer".into()))?;
        let sslrootcert = get("sslrootcert", "PGSSLROOTCERT").map(PathBuf::from);
        let tsa = match get("target_session_attrs", "PGTARGETSESSIONATTRS").as_deref() {
            None | Some("any") => TargetSessionAttrs::Any,
            Some("read-write") | Some("primary") => TargetSessionAttrs::ReadWrite,
            Some(o) => bail!("unsupported target_session_attrs {o:?}\nHINT: use any, read-write or primary"),
        };
        let application_name = get("application_name", "PGAPPNAME").unwrap_or_else(|| "walvault".into());
        let connect_timeout = match get("connect_timeout", "PGCONNECT_TIMEOUT") {
            Some(t) => {
                let secs: u64 = t.parse().with_context(|| format!("invalid connect_timeout {t:?}"))?;
                (secs > 0).then(|| Duration::from_secs(secs.max(2)))
            }
            None => None,
        };
        let passfile = get("passfile", "PGPASSFILE").map(PathBuf::from);

        let host_list: Vec<Host> = match &hosts {
            Some(h) => h.split(',').map(|h| parse_host(h.trim())).collect(),
            None => vec![default_host()],
        };
        let port_list: Vec<u16> = match &ports {
            Some(p) => p
                .split(',')
                .map(|p| {
                    let p = p.trim();
                    if p.is_empty() {
                        Ok(5432)
                    } else {
                        p.parse::<u16>().with_context(|| format!("invalid port {p:?}"))
                    }
                })
                .collect::<Result<_>>()?,
            None => vec![5432],
        };
        let targets = if port_list.len() == 1 {
            host_list.into_iter().map(|h| (h, port_list[0])).collect()
        } else if port_list.len() == host_list.len() {
            host_list.into_iter().zip(port_list).collect()
        } else {
            bail!("could not match {} port numbers to {} hosts", port_list.len(), host_list.len());
        };
        let user = match user {
            Some(u) => u,
            None => {
                os_user_name().context("no user given and the OS user name is unknown\nHINT: set user= or PGUSER")?
            }
        };
        Ok(ConnParams {
            targets,
            user,
            password,
            dbname,
            sslmode,
            sslrootcert,
            target_session_attrs: tsa,
            application_name,
            connect_timeout,
            passfile,
        })
    }

    /// The password for `host:port`, from the connection string or the password file.
    pub fn password_for(&self, host: &Host, port: u16) -> Option<Password> {
        if let Some(p) = &self.password {
            return Some(p.clone());
        }
        let file =
            self.passfile.clone().or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")))?;
        let host_name = match host {
            // libpq matches socket connections against "localhost".
            Host::Unix(_) => "localhost".to_string(),
            Host::Tcp(h) => h.clone(),
        };
        lookup_pgpass(&file, &host_name, port, "replication", &self.user).map(Password)
    }
}

const KNOWN_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "target_session_attrs",
    "application_name",
    "connect_timeout",
    "passfile",
    // Accepted and ignored: the agent always asks for a physical replication connection.
    "replication",
];

fn parse_host(h: &str) -> Host {
    if h.starts_with('/') {
        Host::Unix(h.into())
    } else {
        Host::Tcp(h.to_string())
    }
}

fn default_host() -> Host {
    for d in ["/var/run/postgresql", "/tmp"] {
        if Path::new(d).is_dir() {
            return Host::Unix(d.into());
        }
    }
    Host::Tcp("localhost".into())
}

fn os_user_name() -> Option<String> {
    // SAFETY: getpwuid returns static storage or null; we copy the name at once.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if pw.is_null() {
            return None;
        }
        Some(std::ffi::CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned())
    }
}

fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).context("truncated percent-escape in connection URL")?;
            out.push(u8::from_str_radix(hex, 16).with_context(|| format!("invalid percent-escape %{hex}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("connection URL is not UTF-8 after decoding")
}

fn parse_url(s: &str) -> Result<HashMap<String, String>> {
    let rest = s.split_once("://").map(|x| x.1).unwrap_or(s);
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (main, None),
    };
    let mut kv = HashMap::new();
    let hostspec = match authority.rsplit_once('@') {
        Some((userinfo, hs)) => {
            let (u, p) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !u.is_empty() {
                kv.insert("user".into(), percent_decode(u)?);
            }
            if let Some(p) = p {
                kv.insert("password".into(), percent_decode(p)?);
            }
            hs
        }
        None => authority,
    };
    if !hostspec.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for hp in hostspec.split(',') {
            // [v6addr]:port, host:port, host
            let (h, p) = if let Some(rest) = hp.strip_prefix('[') {
                let (h, after) = rest.split_once(']').context("unterminated [ in connection URL host")?;
                (h.to_string(), after.strip_prefix(':').map(str::to_string))
            } else {
                match hp.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p.to_string())),
                    None => (hp.to_string(), None),
                }
            };
            hosts.push(percent_decode(&h)?);
            ports.push(p.unwrap_or_default());
        }
        kv.insert("host".into(), hosts.join(","));
        if ports.iter().any(|p| !p.is_empty()) {
            kv.insert("port".into(), ports.join(","));
        }
    }
    if let Some(p) = path.filter(|p| !p.is_empty()) {
        kv.insert("dbname".into(), percent_decode(p)?);
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').with_context(|| format!("invalid URL parameter {pair:?}"))?;
            kv.insert(percent_decode(k)?, percent_decode(v)?);
        }
    }
    Ok(kv)
}

fn parse_keyword_value(s: &str) -> Result<HashMap<String, String>> {
    let mut kv = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            bail!(
                "missing \"=\" after {key:?} in connection string\nHINT: write key=value pairs, or a postgresql:// URL"
            );
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => bail!("unterminated quoted string in connection string"),
                    Some('\\') => val.push(chars.next().context("trailing backslash in connection string")?),
                    Some('\'') => break,
                    Some(c) => val.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    val.push(chars.next().context("trailing backslash in connection string")?);
                } else {
                    val.push(c);
                }
            }
        }
        kv.insert(key, val);
    }
    Ok(kv)
}

/// libpq's password file: `hostname:port:database:username:password`, `*` matches anything,
/// `\:` and `\\` escape. Ignored (with a warning) unless only the owner can read it.
fn lookup_pgpass(file: &Path, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(file).ok()?;
    if md.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access; ignoring it (permissions should be u=rw (0600) or less)",
            file.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut it = line.chars();
        while let Some(c) = it.next() {
            match c {
                '\\' => {
                    if let Some(n) = it.next() {
                        cur.push(n)
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let m = |pat: &str, v: &str| pat == "*" || pat == v;
        if m(&fields[0], host) && m(&fields[1], &port) && m(&fields[2], db) && m(&fields[3], user) {
            return Some(fields[4].clone());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn url_form() {
        let p = ConnParams::parse(
            "postgresql://rep%40x:s%3Acret@db1:5433,db2/postgres?sslmode=require&target_session_attrs=read-write",
            &no_env,
        )
        .unwrap();
        assert_eq!(p.user, "rep@x");
        assert_eq!(p.password, Some(Password("s:cret".into())));
        assert_eq!(p.targets, vec![(Host::Tcp("db1".into()), 5433), (Host::Tcp("db2".into()), 5432)]);
        assert_eq!(p.dbname.as_deref(), Some("postgres"));
        assert_eq!(p.sslmode, SslMode::Require);
        assert_eq!(p.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert!(!format!("{p:?}").contains("s:cret"), "password never in Debug");
        let p = ConnParams::parse("postgres://%2Fvar%2Frun%2Fpostgresql:5444/?user=u", &no_env).unwrap();
        assert_eq!(p.targets, vec![(Host::Unix("/var/run/postgresql".into()), 5444)]);
        let p = ConnParams::parse("postgresql://[::1]:6000/?user=u", &no_env).unwrap();
        assert_eq!(p.targets, vec![(Host::Tcp("::1".into()), 6000)]);
    }

    #[test]
    fn keyword_value_form_and_env() {
        let env = |k: &str| match k {
            "PGPORT" => Some("6543".to_string()),
            "PGUSER" => Some("envuser".to_string()),
            "PGPASSWORD" => Some("envpw".to_string()),
            _ => None,
        };
        let p = ConnParams::parse("host=/tmp/sock user = 'o\\'neil' application_name=x", &env).unwrap();
        assert_eq!(p.targets, vec![(Host::Unix("/tmp/sock".into()), 6543)]);
        assert_eq!(p.user, "o'neil");
        assert_eq!(p.password, Some(Password("envpw".into())));
        assert_eq!(p.application_name, "x");
        assert_eq!(p.sslmode, SslMode::Prefer);
        let p = ConnParams::parse("host=a,b,c port=1,2,3 user=u", &no_env).unwrap();
        assert_eq!(p.targets.len(), 3);
        assert_eq!(p.targets[2], (Host::Tcp("c".into()), 3));
        assert!(ConnParams::parse("host=a,b port=1,2,3 user=u", &no_env).is_err());
        assert!(ConnParams::parse("host=a bogus=1", &no_env)
            .unwrap_err()
            .to_string()
            .contains("unknown connection option"));
        assert!(ConnParams::parse("host", &no_env).is_err());
        assert!(ConnParams::parse("sslmode=sometimes user=u", &no_env).is_err());
    }

    #[test]
    fn pgpass_matching_and_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pgpass");
        std::fs::write(&f, "# comment\nother:*:*:*:no\ndb1:5433:replication:rep:pw\\:1\n*:*:*:rep:fallback\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(lookup_pgpass(&f, "db1", 5433, "replication", "rep").as_deref(), Some("pw:1"));
        assert_eq!(lookup_pgpass(&f, "db2", 5432, "replication", "rep").as_deref(), Some("fallback"));
        assert_eq!(lookup_pgpass(&f, "db2", 5432, "replication", "nobody"), None);
        let p = ConnParams::parse(&format!("host=db1 port=5433 user=rep passfile={}", f.display()), &no_env).unwrap();
        assert_eq!(p.password_for(&p.targets[0].0, 5433), Some(Password("pw:1".into())));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(lookup_pgpass(&f, "db1", 5433, "replication", "rep"), None, "world-readable file ignored");
    }
}
