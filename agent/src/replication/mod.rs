//! Our physical replication client, on `postgres-protocol` over tokio sockets.
//!
//! Upstream tokio-postgres cannot open a replication connection (no `replication=true`
//! startup, no CopyBoth), so this module speaks the protocol itself (PostgreSQL docs,
//! "Streaming Replication Protocol"):
//!
//! * startup with `replication=true`, TLS per `sslmode` ([`tls`]), authentication by trust,
//!   cleartext password, MD5 or SCRAM-SHA-256; server errors keep their SQLSTATE and message
//!   ([`PgError`]);
//! * simple queries for the replication commands: `IDENTIFY_SYSTEM`, `SHOW`,
//!   `TIMELINE_HISTORY`, `CREATE_REPLICATION_SLOT … PHYSICAL RESERVE_WAL`,
//!   `READ_REPLICATION_SLOT` (PostgreSQL 15+), `START_REPLICATION SLOT … PHYSICAL`;
//! * the CopyBoth stream: XLogData (`w`) and primary keepalive (`k`) in, standby status update
//!   (`r`) out, and the end of a timeline (CopyDone, then a result naming the next timeline).
//!
//! `postgres_protocol::message::backend::Message::parse` does not know the CopyBothResponse
//! tag (`W`), so [`Connection::read_message`] peeks at the tag and handles `W` itself.
//! Timestamps on the wire are microseconds since 2000-01-01 00:00 UTC.

pub mod conninfo;
pub mod tls;

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl;
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use walvault_shared::lsn::{Lsn, TimelineId};

use conninfo::{ConnParams, Host, TargetSessionAttrs};

/// An error the server sent, with its SQLSTATE.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{severity}: {message} (SQLSTATE {code}){}", detail.as_ref().map(|d| format!("\nDETAIL: {d}")).unwrap_or_default())]
pub struct PgError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
}

impl PgError {
    fn from_fields(mut fields: backend::ErrorFields<'_>) -> Self {
        let mut e = PgError { severity: "ERROR".into(), code: String::new(), message: String::new(), detail: None };
        while let Ok(Some(f)) = fields.next() {
            let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'S' => e.severity = v,
                b'C' => e.code = v,
                b'M' => e.message = v,
                b'D' => e.detail = Some(v),
                _ => {}
            }
        }
        e
    }
    /// 28P01 invalid_password, 28000 invalid_authorization_specification: retrying with the
    /// same settings cannot help.
    pub fn is_auth_failure(&self) -> bool {
        self.code.starts_with("28")
    }
}

/// What the stream carries, decoded.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// WAL bytes starting at `start`; `wal_end` is the server's current end of WAL.
    XLogData { start: Lsn, wal_end: Lsn, data: Bytes },
    /// Primary keepalive; answer at once when `reply_requested`.
    Keepalive { wal_end: Lsn, reply_requested: bool },
    /// The timeline being streamed ended; the next one starts at `next_start`.
    EndOfTimeline { next_timeline: TimelineId, next_start: Lsn },
}

/// Result of `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    pub system_identifier: u64,
    pub timeline: TimelineId,
    pub xlogpos: Lsn,
}

/// A slot's state from `READ_REPLICATION_SLOT`.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub restart_lsn: Option<Lsn>,
    pub restart_timeline: Option<TimelineId>,
}

/// One row of a simple-query result, as text (or raw bytes); `None` is SQL NULL.
pub type Row = Vec<Option<Bytes>>;

trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// An authenticated physical replication connection.
pub struct Connection {
    stream: Box<dyn AsyncStream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// ParameterStatus values from the server (server_version, in_hot_standby, …).
    pub parameters: std::collections::HashMap<String, String>,
    pub host: Host,
    pub port: u16,
    in_copy: bool,
    /// Set while streaming WAL: when the previous socket read was small, the next one waits
    /// until [`READ_COALESCE`] after it, so that the many small messages of an OLTP load are
    /// read several at a time instead of one wake-up and one recv each. Never delays a read
    /// after a large one, so bulk throughput is not capped; adds at most READ_COALESCE to the
    /// time a message waits in the socket, against chunk intervals of 100 ms and more.
    coalesce_reads: bool,
    /// Never coalesce reads (synchronous mode: every microsecond a message waits is a
    /// commit's latency).
    pub low_latency: bool,
    /// When the last read returned, and whether it was small.
    last_read: Option<(tokio::time::Instant, bool)>,
    /// The TCP socket under the stream (TLS or not), for `SO_RCVLOWAT`; `None` for a Unix
    /// socket (whose readiness ignores the low-water mark).
    tcp_fd: Option<std::os::fd::RawFd>,
    /// `SO_RCVLOWAT` is at [`COALESCE_LOWAT`]: lowered back to 1 before any read.
    lowat_raised: bool,
}

/// See [`Connection::coalesce_reads`]: measured on 2 cores under pgbench OLTP, the agent's CPU
/// per GiB of WAL was dominated by per-message wake-ups before this (perf: scheduler, epoll and
/// timer work, not compression), and still by the wake-ups at a 2 ms window; 20 ms adds at most
/// 20 ms to the archive lag against chunk intervals of 1 s (synchronous mode never coalesces).
///
/// While a read waits out the window, the TCP socket's low-water mark (`SO_RCVLOWAT`) is
/// raised to [`COALESCE_LOWAT`], so the packets that trickle in meanwhile do not signal the
/// socket readable: otherwise every one of them wakes the runtime's `epoll_wait` although
/// nothing reads until the window ends (strace under pgbench OLTP at 1400 TPS: 1170
/// `epoll_wait` a second against 88 `recvfrom`). Before the read the mark goes back to 1, and
/// Linux then signals at once if anything is queued (`tcp_set_rcvlowat` calls
/// `tcp_data_ready`); a read never starts with the mark raised, so it cannot wait on it.
const READ_COALESCE: Duration = Duration::from_millis(20);
/// See [`READ_COALESCE`]: bytes that must be queued before a coalescing read is woken early
/// (a burst that large ends the wait, so a bulk load is not held back by it).
const COALESCE_LOWAT: i32 = 256 << 10;
/// A read below this many bytes is "small" (a TLS record holds up to 16 KiB).
const SMALL_READ: usize = 8 << 10;

/// Microseconds since 2000-01-01 00:00:00 UTC, PostgreSQL's epoch.
pub fn pg_now_micros() -> i64 {
    walvault_shared::time::to_pg(chrono::Utc::now())
}

impl Connection {
    /// Connect to the first host that accepts us (and, with `target_session_attrs=read-write`,
    /// is not in recovery).
    pub async fn connect(params: &ConnParams) -> Result<Self> {
        let mut errors = Vec::new();
        for (host, port) in &params.targets {
            match Self::connect_one(params, host, *port).await {
                Ok(c) => {
                    if params.target_session_attrs == TargetSessionAttrs::ReadWrite && c.is_in_recovery() {
                        errors.push(format!("{host}:{port}: server is in recovery (target_session_attrs=read-write)"));
                        continue;
                    }
                    return Ok(c);
                }
                Err(e) => {
                    // A wrong password is final: say so instead of trying the next host.
                    if e.downcast_ref::<PgError>().is_some_and(PgError::is_auth_failure) {
                        return Err(e.context(format!("authenticate to {host}:{port} as {}", params.user)));
                    }
                    errors.push(format!("{host}:{port}: {e:#}"));
                }
            }
        }
        bail!(
            "could not open a replication connection to {}:\n  {}\nHINT: check that PostgreSQL is running, that pg_hba.conf allows \
             \"replication\" connections for this user, and that the user has the REPLICATION attribute",
            params.describe(),
            errors.join("\n  ")
        )
    }

    /// Whether the server says it is a standby (`in_hot_standby`, PostgreSQL 14+).
    pub fn is_in_recovery(&self) -> bool {
        self.parameters.get("in_hot_standby").map(|v| v == "on").unwrap_or(false)
    }

    async fn connect_one(params: &ConnParams, host: &Host, port: u16) -> Result<Self> {
        let timeout = params.connect_timeout.unwrap_or(Duration::from_secs(30));
        let mut tcp_fd = None;
        let stream: Box<dyn AsyncStream> = match host {
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&path))
                    .await
                    .map_err(|_| anyhow!("timed out connecting to {}", path.display()))?
                    .with_context(|| format!("connect to {}", path.display()))?;
                Box::new(s)
            }
            Host::Tcp(name) => {
                let s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((name.as_str(), port)))
                    .await
                    .map_err(|_| anyhow!("timed out connecting to {name}:{port}"))?
                    .with_context(|| format!("connect to {name}:{port}"))?;
                s.set_nodelay(true)?;
                tcp_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&s));
                tls::negotiate(s, name, params).await?
            }
        };
        let mut c = Connection {
            stream,
            rbuf: BytesMut::with_capacity(64 << 10),
            wbuf: BytesMut::new(),
            parameters: Default::default(),
            host: host.clone(),
            port,
            in_copy: false,
            coalesce_reads: false,
            low_latency: false,
            last_read: None,
            tcp_fd,
            lowat_raised: false,
        };
        tokio::time::timeout(timeout, c.startup(params, host, port))
            .await
            .map_err(|_| anyhow!("timed out during startup with {host}:{port}"))??;
        Ok(c)
    }

    async fn startup(&mut self, params: &ConnParams, host: &Host, port: u16) -> Result<()> {
        let mut startup: Vec<(&str, &str)> =
            vec![("user", &params.user), ("replication", "true"), ("application_name", &params.application_name)];
        if let Some(db) = &params.dbname {
            startup.push(("database", db));
        }
        frontend::startup_message(startup.iter().copied(), &mut self.wbuf)?;
        self.flush().await?;
        let password = || {
            params.password_for(host, port).ok_or_else(|| {
                anyhow!(
                    "the server asks for a password for user {:?} and none was given\nHINT: put it in the connection URL, \
                     PGPASSWORD, or ~/.pgpass",
                    params.user
                )
            })
        };
        loop {
            match self.read_message().await? {
                Msg::Backend(backend::Message::AuthenticationOk) => {}
                Msg::Backend(backend::Message::AuthenticationCleartextPassword) => {
                    frontend::password_message(password()?.0.as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Msg::Backend(backend::Message::AuthenticationMd5Password(body)) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        params.user.as_bytes(),
                        password()?.0.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Msg::Backend(backend::Message::AuthenticationSasl(body)) => {
                    let mut mechs = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechs.next()? {
                        has_scram |= m == sasl::SCRAM_SHA_256;
                    }
                    if !has_scram {
                        bail!("the server offers no SASL mechanism we support (SCRAM-SHA-256)");
                    }
                    self.scram(password()?.0.as_bytes()).await?;
                }
                Msg::Backend(backend::Message::BackendKeyData(_)) => {}
                Msg::Backend(backend::Message::ParameterStatus(p)) => {
                    self.parameters.insert(p.name()?.to_string(), p.value()?.to_string());
                }
                Msg::Backend(backend::Message::ReadyForQuery(_)) => return Ok(()),
                Msg::Backend(backend::Message::NoticeResponse(_)) => {}
                Msg::Backend(backend::Message::ErrorResponse(e)) => return Err(PgError::from_fields(e.fields()).into()),
                Msg::Backend(backend::Message::AuthenticationGss)
                | Msg::Backend(backend::Message::AuthenticationSspi)
                | Msg::Backend(backend::Message::AuthenticationKerberosV5) => {
                    bail!("the server asks for GSSAPI/SSPI/Kerberos authentication, which walvault does not support\nHINT: use scram-sha-256 for the replication user in pg_hba.conf")
                }
                _ => bail!("unexpected message during startup"),
            }
        }
    }

    async fn scram(&mut self, password: &[u8]) -> Result<()> {
        let mut scram = sasl::ScramSha256::new(password, sasl::ChannelBinding::unsupported());
        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, scram.message(), &mut self.wbuf)?;
        self.flush().await?;
        match self.read_message().await? {
            Msg::Backend(backend::Message::AuthenticationSaslContinue(b)) => scram.update(b.data())?,
            Msg::Backend(backend::Message::ErrorResponse(e)) => return Err(PgError::from_fields(e.fields()).into()),
            _ => bail!("unexpected message during SCRAM authentication"),
        }
        frontend::sasl_response(scram.message(), &mut self.wbuf)?;
        self.flush().await?;
        match self.read_message().await? {
            Msg::Backend(backend::Message::AuthenticationSaslFinal(b)) => scram.finish(b.data())?,
            Msg::Backend(backend::Message::ErrorResponse(e)) => return Err(PgError::from_fields(e.fields()).into()),
            _ => bail!("unexpected message during SCRAM authentication"),
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.stream.write_all(&self.wbuf).await.context("write to PostgreSQL")?;
        self.stream.flush().await.context("write to PostgreSQL")?;
        self.wbuf.clear();
        Ok(())
    }

    /// Read one message. Cancel-safe: bytes already read stay buffered.
    async fn read_message(&mut self) -> Result<Msg> {
        loop {
            if self.rbuf.len() >= 5 && self.rbuf[0] == b'W' {
                let len = i32::from_be_bytes(self.rbuf[1..5].try_into().expect("4 bytes"));
                if len < 4 {
                    bail!("invalid CopyBothResponse length from server");
                }
                let total = 1 + len as usize;
                if self.rbuf.len() >= total {
                    self.rbuf.advance(total);
                    return Ok(Msg::CopyBoth);
                }
            } else if let Some(m) = backend::Message::parse(&mut self.rbuf).context("malformed message from server")? {
                return Ok(Msg::Backend(m));
            }
            if self.coalesce_reads {
                if let Some((at, true)) = self.last_read {
                    // Cancel-safe: nothing has been read yet.
                    tokio::time::sleep_until(at + READ_COALESCE).await;
                }
                self.rbuf.reserve(256 << 10);
            }
            if self.lowat_raised {
                self.set_rcvlowat(1).context("reset SO_RCVLOWAT on the replication socket")?;
                self.lowat_raised = false;
            }
            let n = self.stream.read_buf(&mut self.rbuf).await.context("read from PostgreSQL")?;
            if n == 0 {
                bail!("PostgreSQL closed the connection");
            }
            let small = n < SMALL_READ;
            self.last_read = Some((tokio::time::Instant::now(), small));
            if small && self.coalesce_reads && self.tcp_fd.is_some() {
                // Best effort: without it, the window still coalesces reads, only not wake-ups.
                self.lowat_raised = self.set_rcvlowat(COALESCE_LOWAT).is_ok();
            }
        }
    }

    /// `SO_RCVLOWAT` of the TCP socket (see [`READ_COALESCE`]).
    fn set_rcvlowat(&self, bytes: i32) -> std::io::Result<()> {
        let Some(fd) = self.tcp_fd else { return Ok(()) };
        // SAFETY: setsockopt(2) on the socket `self.stream` owns (open while self lives), with
        // a pointer to an i32 and its size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Run a command with the simple query protocol; rows as raw text columns.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error: Option<PgError> = None;
        loop {
            match self.read_message().await? {
                Msg::Backend(backend::Message::DataRow(r)) => {
                    let row = data_row(&r)?;
                    rows.push(row);
                }
                Msg::Backend(backend::Message::ErrorResponse(e)) => error = Some(PgError::from_fields(e.fields())),
                Msg::Backend(backend::Message::ReadyForQuery(_)) => break,
                Msg::Backend(backend::Message::ParameterStatus(p)) => {
                    self.parameters.insert(p.name()?.to_string(), p.value()?.to_string());
                }
                Msg::CopyBoth => bail!("unexpected CopyBothResponse to {sql:?}"),
                _ => {}
            }
        }
        match error {
            Some(e) => Err(anyhow::Error::new(e).context(format!("run {sql:?}"))),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows.first().context("IDENTIFY_SYSTEM returned no row")?;
        Ok(SystemInfo {
            system_identifier: text(row, 0)?.parse().context("IDENTIFY_SYSTEM systemid")?,
            timeline: TimelineId(text(row, 1)?.parse().context("IDENTIFY_SYSTEM timeline")?),
            xlogpos: text(row, 2)?.parse().context("IDENTIFY_SYSTEM xlogpos")?,
        })
    }

    /// `SHOW name`, as text.
    pub async fn show(&mut self, name: &str) -> Result<String> {
        let rows = self.simple_query(&format!("SHOW {name}")).await?;
        Ok(text(rows.first().context("SHOW returned no row")?, 0)?.to_string())
    }

    /// `wal_segment_size` in bytes.
    pub async fn wal_segment_size(&mut self) -> Result<u64> {
        parse_size(&self.show("wal_segment_size").await?)
    }

    /// `server_version_num`, e.g. 150018.
    pub async fn server_version_num(&mut self) -> Result<u32> {
        self.show("server_version_num").await?.parse().context("parse server_version_num")
    }

    /// `TIMELINE_HISTORY tli`: (file name, content).
    pub async fn timeline_history(&mut self, tli: TimelineId) -> Result<(String, Bytes)> {
        let rows = self.simple_query(&format!("TIMELINE_HISTORY {}", tli.0)).await?;
        let row = rows.first().context("TIMELINE_HISTORY returned no row")?;
        let name = text(row, 0)?.to_string();
        let content = row.get(1).cloned().flatten().context("TIMELINE_HISTORY returned no content")?;
        Ok((name, content))
    }

    /// `CREATE_REPLICATION_SLOT name PHYSICAL RESERVE_WAL`. `Ok(false)` if it already exists.
    pub async fn create_physical_slot(&mut self, name: &str) -> Result<bool> {
        match self.simple_query(&format!("CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL", quote_ident(name))).await {
            Ok(_) => Ok(true),
            Err(e) if e.downcast_ref::<PgError>().is_some_and(|p| p.code == "42710") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `DROP_REPLICATION_SLOT name` (the slot must not be in use).
    pub async fn drop_slot(&mut self, name: &str) -> Result<()> {
        self.simple_query(&format!("DROP_REPLICATION_SLOT {}", quote_ident(name))).await.map(|_| ())
    }

    /// `READ_REPLICATION_SLOT name` (PostgreSQL 15+). `None` if there is no such slot.
    pub async fn read_slot(&mut self, name: &str) -> Result<Option<SlotInfo>> {
        let rows = self.simple_query(&format!("READ_REPLICATION_SLOT {}", quote_ident(name))).await?;
        let Some(row) = rows.first() else { return Ok(None) };
        if row.first().cloned().flatten().is_none() {
            return Ok(None);
        }
        let restart_lsn = opt_text(row, 1)?.map(|s| s.parse::<Lsn>()).transpose()?;
        let restart_timeline = opt_text(row, 2)?.map(|s| s.parse::<u32>().map(TimelineId)).transpose()?;
        Ok(Some(SlotInfo { restart_lsn, restart_timeline }))
    }

    /// `START_REPLICATION SLOT slot PHYSICAL lsn TIMELINE tli`; afterwards call
    /// [`Connection::next_message`] and [`Connection::send_status`].
    pub async fn start_replication(&mut self, slot: &str, start: Lsn, tli: TimelineId) -> Result<()> {
        let sql = format!("START_REPLICATION SLOT {} PHYSICAL {start} TIMELINE {}", quote_ident(slot), tli.0);
        frontend::query(&sql, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            match self.read_message().await? {
                Msg::CopyBoth => {
                    self.in_copy = true;
                    self.coalesce_reads = !self.low_latency;
                    return Ok(());
                }
                Msg::Backend(backend::Message::ErrorResponse(e)) => {
                    let err = PgError::from_fields(e.fields());
                    // Drain to ReadyForQuery so the connection stays usable.
                    loop {
                        if let Msg::Backend(backend::Message::ReadyForQuery(_)) = self.read_message().await? {
                            break;
                        }
                    }
                    return Err(anyhow::Error::new(err).context(format!("run {sql:?}")));
                }
                Msg::Backend(backend::Message::NoticeResponse(_))
                | Msg::Backend(backend::Message::ParameterStatus(_)) => {}
                // The requested timeline ended exactly at the start point: the server answers
                // with the next timeline straight away.
                Msg::Backend(backend::Message::RowDescription(_)) => {}
                _ => bail!("unexpected reply to START_REPLICATION"),
            }
        }
    }

    /// Whether a whole message is already buffered (the next [`Connection::next_message`] will
    /// not wait for the network).
    pub fn has_buffered_message(&self) -> bool {
        self.rbuf.len() >= 5 && {
            let len = i32::from_be_bytes(self.rbuf[1..5].try_into().expect("4 bytes"));
            len >= 4 && self.rbuf.len() > len as usize
        }
    }

    /// The next message of the replication stream. Cancel-safe.
    pub async fn next_message(&mut self) -> Result<ReplicationMessage> {
        loop {
            match self.read_message().await? {
                Msg::Backend(backend::Message::CopyData(body)) => {
                    let mut data = body.into_bytes();
                    if data.is_empty() {
                        bail!("empty CopyData from server");
                    }
                    match data[0] {
                        b'w' if data.len() >= 25 => {
                            data.advance(1);
                            let start = Lsn(data.get_u64());
                            let wal_end = Lsn(data.get_u64());
                            let _send_time = data.get_i64();
                            return Ok(ReplicationMessage::XLogData { start, wal_end, data });
                        }
                        b'k' if data.len() >= 18 => {
                            data.advance(1);
                            let wal_end = Lsn(data.get_u64());
                            let _send_time = data.get_i64();
                            let reply_requested = data.get_u8() != 0;
                            return Ok(ReplicationMessage::Keepalive { wal_end, reply_requested });
                        }
                        t => bail!("unexpected replication message type {:?} ({} bytes)", t as char, data.len()),
                    }
                }
                Msg::Backend(backend::Message::CopyDone) => {
                    // End of timeline: answer CopyDone, then read the next timeline's start.
                    frontend::copy_done(&mut self.wbuf);
                    self.flush().await?;
                    self.in_copy = false;
                    self.coalesce_reads = false;
                    let mut next = None;
                    loop {
                        match self.read_message().await? {
                            Msg::Backend(backend::Message::DataRow(r)) => {
                                let row = data_row(&r)?;
                                let tli: u32 = text(&row, 0)?.parse().context("next timeline")?;
                                let lsn: Lsn = text(&row, 1)?.parse().context("next timeline start")?;
                                next = Some((TimelineId(tli), lsn));
                            }
                            Msg::Backend(backend::Message::ErrorResponse(e)) => {
                                return Err(PgError::from_fields(e.fields()).into())
                            }
                            Msg::Backend(backend::Message::ReadyForQuery(_)) => break,
                            _ => {}
                        }
                    }
                    let (next_timeline, next_start) =
                        next.context("the server ended streaming without naming the next timeline")?;
                    return Ok(ReplicationMessage::EndOfTimeline { next_timeline, next_start });
                }
                Msg::Backend(backend::Message::ErrorResponse(e)) => return Err(PgError::from_fields(e.fields()).into()),
                Msg::Backend(backend::Message::NoticeResponse(_))
                | Msg::Backend(backend::Message::ParameterStatus(_)) => {}
                Msg::Backend(backend::Message::CommandComplete(c)) => {
                    bail!(
                        "the server ended the replication stream ({}); it is probably shutting down",
                        c.tag().unwrap_or("?")
                    )
                }
                Msg::Backend(other) => bail!("unexpected message in the replication stream: {}", describe(&other)),
                Msg::CopyBoth => bail!("unexpected CopyBothResponse in the replication stream"),
            }
        }
    }

    /// Standby status update: `write` received, `flush` and `apply` durable.
    pub async fn send_status(&mut self, write: Lsn, flush: Lsn, apply: Lsn, reply_requested: bool) -> Result<()> {
        if !self.in_copy {
            return Ok(());
        }
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(write.0);
        msg.put_u64(flush.0);
        msg.put_u64(apply.0);
        msg.put_i64(pg_now_micros());
        msg.put_u8(reply_requested as u8);
        frontend::CopyData::new(msg.freeze())?.write(&mut self.wbuf);
        self.flush().await
    }

    /// Leave the stream politely (CopyDone) and terminate the connection.
    pub async fn close(mut self) {
        if self.in_copy {
            frontend::copy_done(&mut self.wbuf);
        }
        frontend::terminate(&mut self.wbuf);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.flush()).await;
    }
}

fn describe(m: &backend::Message) -> &'static str {
    match m {
        backend::Message::ReadyForQuery(_) => "ReadyForQuery",
        backend::Message::RowDescription(_) => "RowDescription",
        backend::Message::DataRow(_) => "DataRow",
        backend::Message::CopyOutResponse(_) => "CopyOutResponse",
        backend::Message::CopyInResponse(_) => "CopyInResponse",
        backend::Message::EmptyQueryResponse => "EmptyQueryResponse",
        _ => "other",
    }
}

/// A tablespace a base backup covers (`None` location: the main data directory).
#[derive(Debug, Clone)]
pub struct TablespaceInfo {
    pub oid: Option<u32>,
    pub location: Option<String>,
    /// Estimated size in bytes, when PROGRESS was requested.
    pub size: Option<u64>,
}

/// One event of a `BASE_BACKUP` stream (PostgreSQL 15+ "client" target: one COPY stream
/// whose CopyData messages start with a type byte).
#[derive(Debug)]
pub enum BackupEvent {
    /// `n`: a new tar archive begins (`base.tar`, or `OID.tar` for a tablespace).
    Archive { name: String, location: String },
    /// `d`: content of the current archive, or of the manifest after [`BackupEvent::Manifest`].
    Data(Bytes),
    /// `p`: bytes the server has sent so far.
    Progress(u64),
    /// `m`: the backup manifest follows.
    Manifest,
    /// CopyDone and the end-position result: the backup is complete.
    End { lsn: Lsn, timeline: TimelineId },
}

impl Connection {
    /// `UPLOAD_MANIFEST` (PostgreSQL 17+): give the server the previous backup's
    /// `backup_manifest`, byte for byte, for an incremental `BASE_BACKUP` on this connection.
    /// Wire: Query, CopyInResponse, CopyData…, CopyDone, CommandComplete, ReadyForQuery. The
    /// server may reject the manifest (another cluster, bad checksum) before it has read all of
    /// it: its ErrorResponse is returned, and the copy messages it did not read are ignored.
    pub async fn upload_manifest(&mut self, manifest: &[u8]) -> Result<()> {
        frontend::query("UPLOAD_MANIFEST", &mut self.wbuf)?;
        self.flush().await?;
        loop {
            match self.read_message().await? {
                Msg::Backend(backend::Message::CopyInResponse(_)) => break,
                Msg::Backend(backend::Message::ErrorResponse(e)) => {
                    let err = PgError::from_fields(e.fields());
                    self.until_ready().await?;
                    return Err(anyhow::Error::new(err).context("UPLOAD_MANIFEST"));
                }
                Msg::Backend(backend::Message::NoticeResponse(_))
                | Msg::Backend(backend::Message::ParameterStatus(_)) => {}
                Msg::Backend(other) => bail!("unexpected reply to UPLOAD_MANIFEST: {}", describe(&other)),
                Msg::CopyBoth => bail!("unexpected CopyBothResponse to UPLOAD_MANIFEST"),
            }
        }
        for piece in manifest.chunks(64 << 10) {
            frontend::CopyData::new(piece)?.write(&mut self.wbuf);
            if self.wbuf.len() >= 1 << 20 {
                self.flush().await?;
            }
        }
        frontend::copy_done(&mut self.wbuf);
        self.flush().await?;
        let mut error = None;
        loop {
            match self.read_message().await? {
                Msg::Backend(backend::Message::ErrorResponse(e)) => error = Some(PgError::from_fields(e.fields())),
                Msg::Backend(backend::Message::ReadyForQuery(_)) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(anyhow::Error::new(e).context("UPLOAD_MANIFEST")),
            None => Ok(()),
        }
    }

    async fn until_ready(&mut self) -> Result<()> {
        loop {
            if let Msg::Backend(backend::Message::ReadyForQuery(_)) = self.read_message().await? {
                return Ok(());
            }
        }
    }

    /// Start `BASE_BACKUP` (no WAL, manifest with CRC32C checksums, progress; `INCREMENTAL`
    /// after [`Connection::upload_manifest`]). Returns the start position and timeline and the
    /// tablespace list; then read [`Connection::base_backup_next`] until [`BackupEvent::End`].
    pub async fn base_backup_start(
        &mut self,
        label: &str,
        fast: bool,
        incremental: bool,
    ) -> Result<(Lsn, TimelineId, Vec<TablespaceInfo>)> {
        let sql = format!(
            "BASE_BACKUP ({}LABEL '{}', PROGRESS, CHECKPOINT '{}', MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C', TARGET 'client')",
            if incremental { "INCREMENTAL, " } else { "" },
            label.replace('\'', "''"),
            if fast { "fast" } else { "spread" }
        );
        frontend::query(&sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut results: Vec<Vec<Row>> = Vec::new();
        let mut current: Vec<Row> = Vec::new();
        loop {
            match self.read_message().await? {
                Msg::Backend(backend::Message::DataRow(r)) => {
                    let row = data_row(&r)?;
                    current.push(row);
                }
                Msg::Backend(backend::Message::CommandComplete(_)) => results.push(std::mem::take(&mut current)),
                Msg::Backend(backend::Message::CopyOutResponse(_)) => break,
                Msg::Backend(backend::Message::ErrorResponse(e)) => {
                    let err = PgError::from_fields(e.fields());
                    loop {
                        if let Msg::Backend(backend::Message::ReadyForQuery(_)) = self.read_message().await? {
                            break;
                        }
                    }
                    return Err(anyhow::Error::new(err).context("run BASE_BACKUP"));
                }
                _ => {}
            }
        }
        let start_row = results.first().and_then(|r| r.first()).context("BASE_BACKUP sent no start position")?;
        let lsn: Lsn = text(start_row, 0)?.parse().context("BASE_BACKUP start position")?;
        let tli = TimelineId(text(start_row, 1)?.parse().context("BASE_BACKUP start timeline")?);
        let mut tablespaces = Vec::new();
        for row in results.get(1).map(Vec::as_slice).unwrap_or(&[]) {
            tablespaces.push(TablespaceInfo {
                oid: opt_text(row, 0)?.map(str::parse).transpose()?,
                location: opt_text(row, 1)?.map(str::to_string),
                size: opt_text(row, 2)?.map(|s| s.parse::<u64>().map(|kb| kb * 1024)).transpose()?,
            });
        }
        Ok((lsn, tli, tablespaces))
    }

    /// The next event of a running `BASE_BACKUP`.
    pub async fn base_backup_next(&mut self) -> Result<BackupEvent> {
        loop {
            match self.read_message().await? {
                Msg::Backend(backend::Message::CopyData(body)) => {
                    let mut data = body.into_bytes();
                    if data.is_empty() {
                        bail!("empty CopyData in BASE_BACKUP stream");
                    }
                    let kind = data[0];
                    data.advance(1);
                    return Ok(match kind {
                        b'd' => BackupEvent::Data(data),
                        b'p' if data.len() >= 8 => BackupEvent::Progress(data.get_u64()),
                        b'm' => BackupEvent::Manifest,
                        b'n' => {
                            let mut parts = data.split(|b| *b == 0);
                            let name = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                            let location = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                            BackupEvent::Archive { name, location }
                        }
                        t => bail!("unexpected BASE_BACKUP message type {:?}", t as char),
                    });
                }
                Msg::Backend(backend::Message::CopyDone) => {
                    let mut end: Option<(Lsn, TimelineId)> = None;
                    loop {
                        match self.read_message().await? {
                            Msg::Backend(backend::Message::DataRow(r)) => {
                                let row = data_row(&r)?;
                                end = Some((text(&row, 0)?.parse()?, TimelineId(text(&row, 1)?.parse()?)));
                            }
                            Msg::Backend(backend::Message::ErrorResponse(e)) => {
                                return Err(
                                    anyhow::Error::new(PgError::from_fields(e.fields())).context("finish BASE_BACKUP")
                                )
                            }
                            Msg::Backend(backend::Message::ReadyForQuery(_)) => break,
                            _ => {}
                        }
                    }
                    let (lsn, timeline) = end.context("BASE_BACKUP sent no end position")?;
                    return Ok(BackupEvent::End { lsn, timeline });
                }
                Msg::Backend(backend::Message::ErrorResponse(e)) => {
                    return Err(anyhow::Error::new(PgError::from_fields(e.fields())).context("BASE_BACKUP"))
                }
                Msg::Backend(backend::Message::NoticeResponse(_))
                | Msg::Backend(backend::Message::ParameterStatus(_)) => {}
                Msg::Backend(other) => bail!("unexpected message in the BASE_BACKUP stream: {}", describe(&other)),
                Msg::CopyBoth => bail!("unexpected CopyBothResponse in the BASE_BACKUP stream"),
            }
        }
    }
}

enum Msg {
    Backend(backend::Message),
    CopyBoth,
}

/// A DataRow's columns as slices of its buffer (`None`: SQL NULL).
fn data_row(r: &backend::DataRowBody) -> Result<Row> {
    let buf = r.buffer_bytes().clone();
    let mut ranges = r.ranges();
    let mut row = Vec::new();
    while let Some(range) = ranges.next()? {
        row.push(range.map(|rg| buf.slice(rg)));
    }
    Ok(row)
}

fn opt_text(row: &Row, i: usize) -> Result<Option<&str>> {
    match row.get(i).context("missing column")? {
        None => Ok(None),
        Some(b) => Ok(Some(std::str::from_utf8(b).context("column is not UTF-8")?)),
    }
}

fn text(row: &Row, i: usize) -> Result<&str> {
    opt_text(row, i)?.with_context(|| format!("column {i} is NULL"))
}

/// Quote a slot name for a replication command.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Parse a size as `SHOW` prints it (`16MB`, `1GB`, `512kB`, `8192` bytes), also accepting
/// `KiB`/`MiB`/`GiB` and `k`/`M`/`G` (all binary multiples, as PostgreSQL's units are).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().with_context(|| format!("invalid size {s:?}"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" | "KiB" | "k" => 1 << 10,
        "MB" | "MiB" | "M" => 1 << 20,
        "GB" | "GiB" | "G" => 1 << 30,
        "TB" | "TiB" => 1 << 40,
        u => bail!("invalid size unit {u:?} in {s:?}"),
    };
    Ok(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MB").unwrap(), 16 << 20);
        assert_eq!(parse_size("1GB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512kB").unwrap(), 512 << 10);
        assert_eq!(parse_size("8192").unwrap(), 8192);
        assert!(parse_size("MB").is_err());
        assert!(parse_size("16XB").is_err());
    }

    #[test]
    fn idents() {
        assert_eq!(quote_ident("walvault"), "\"walvault\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
