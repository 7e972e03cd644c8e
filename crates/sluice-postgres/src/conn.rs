use std::time::Duration;

use pgwire_replication::tls::rustls::{MaybeTlsStream, maybe_upgrade_to_tls};
use secrecy::ExposeSecret;
use tokio_postgres::{Client, NoTls};

use crate::error::{PgError, Result};

/// Session settings pinned on every connection, so values are printed in the one
/// text form the decoder and the sink expect (and floats without rounding), and a
/// quoted literal means what the quoting code assumes (backslashes are not escapes).
pub(crate) const SESSION_OPTIONS: &str = "-c datestyle=ISO,YMD -c intervalstyle=iso_8601 -c timezone=UTC \
     -c extra_float_digits=3 -c bytea_output=hex -c client_encoding=UTF8 -c standard_conforming_strings=on";

pub use sluice_core::PgConnConfig;
use sluice_core::SslMode;

/// The replication library's TLS settings for `cfg`: one TLS implementation (the
/// replication library's, on rustls) serves both kinds of connection, so `sslmode`
/// means the same on the replication stream as on queries.
fn wire_tls(cfg: &PgConnConfig) -> pgwire_replication::TlsConfig {
    use pgwire_replication::SslMode as W;
    let mode = match cfg.sslmode {
        SslMode::Disable => W::Disable,
        SslMode::Prefer => W::Prefer,
        SslMode::Require => W::Require,
        SslMode::VerifyCa => W::VerifyCa,
        SslMode::VerifyFull => W::VerifyFull,
    };
    let mut tls = pgwire_replication::TlsConfig::disabled();
    tls.mode = mode;
    tls.ca_pem_path = cfg.sslrootcert.clone();
    tls.ca_pem = cfg.sslrootcert_pem.as_ref().map(|p| p.as_bytes().to_vec());
    tls.client_cert_pem_path = cfg.sslcert.clone();
    tls.client_key_pem_path = cfg.sslkey.clone();
    tls
}

/// One line saying why TLS to `cfg` failed and what to change, from the TLS layer's
/// message (rustls names the cause in it).
pub(crate) fn tls_failure(cfg: &PgConnConfig, detail: &str) -> String {
    format!("TLS to {}:{} failed: {}", cfg.host, cfg.port, tls_reason(cfg, detail))
}

pub(crate) fn tls_reason(cfg: &PgConnConfig, detail: &str) -> String {
    let host = &cfg.host;
    if detail.contains("SSLRequest rejected") {
        format!("the server does not support SSL (sslmode {}): enable ssl on the server, or set sslmode to prefer", cfg.sslmode.as_str())
    } else if detail.contains("NotValidForName") || detail.contains("not valid for name") {
        format!(
            "the server's certificate is not issued for {host} (hostname mismatch): connect by a name in the certificate, or use sslmode verify-ca"
        )
    } else if detail.contains("CertificateRequired") || detail.contains("certificate required") {
        "the server requires a client certificate: set sslcert and sslkey".into()
    } else if let Some(why) = sluice_core::https::certificate_problem(detail, "sslrootcert") {
        why // an unknown CA, an expired certificate: said as for every TLS peer
    } else if detail.contains("TLS config error") {
        detail.trim_start_matches("TLS error: ").trim_start_matches("TLS config error: ").to_string()
    } else {
        detail.to_string()
    }
}

/// An error opening a replication connection to `cfg`: a TLS failure said as for any
/// other connection, the rest classified as the replication library's.
pub(crate) fn wire_connect_error(cfg: &PgConnConfig, context: &str, e: pgwire_replication::PgWireError) -> PgError {
    match e {
        pgwire_replication::PgWireError::Tls(m) => PgError::permanent(format!("{context}: {}", tls_failure(cfg, &m))),
        other => PgError::from_wire(context, other),
    }
}

/// A TCP connection to `cfg`, upgraded to TLS as its `sslmode` says.
async fn open_stream(cfg: &PgConnConfig, what: &str) -> Result<MaybeTlsStream> {
    let place = format!("cannot connect to {what} {}", cfg.describe());
    if let Err(e) = cfg.check_tls() {
        return Err(PgError::permanent(format!("{place}: {e}")));
    }
    let tcp = tokio::time::timeout(Duration::from_secs(10), async {
        match &cfg.egress {
            // The addresses checked are the addresses connected to.
            Some(policy) => {
                let addrs = policy.resolve(&cfg.host, cfg.port).await.map_err(egress_refused)?;
                tokio::net::TcpStream::connect(&addrs[..]).await
            }
            None => tokio::net::TcpStream::connect((cfg.host.as_str(), cfg.port)).await,
        }
    })
    .await
    .map_err(|_| PgError::transient(format!("{place}: timed out after 10s")))?
    .map_err(|e| {
        // A refusal stays a refusal until the settings or the policy change.
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            PgError::permanent(format!("{place}: {e}"))
        } else {
            PgError::transient(format!("{place}: {e}"))
        }
    })?;
    let _ = tcp.set_nodelay(true);
    maybe_upgrade_to_tls(tcp, &wire_tls(cfg), &cfg.host).await.map_err(|e| match e {
        pgwire_replication::PgWireError::Io(io) => PgError::transient(format!("{place}: {io}")),
        other => PgError::permanent(format!("{place}: {}", tls_failure(cfg, &other.to_string()))),
    })
}

/// Opens the connection; TLS has been negotiated on the stream already, so the
/// driver speaks plain protocol over it.
async fn open(
    cfg: &PgConnConfig,
    what: &str,
    pg: tokio_postgres::Config,
) -> Result<(Client, tokio_postgres::Connection<MaybeTlsStream, tokio_postgres::tls::NoTlsStream>)> {
    let stream = open_stream(cfg, what).await?;
    pg.connect_raw(stream, NoTls).await.map_err(|e| PgError::from_pg(&format!("cannot connect to {what} {}", cfg.describe()), e))
}

/// A refusal by the egress policy, carried through the I/O error of a connection.
fn egress_refused(m: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("egress refused: {m}"))
}

/// The replication connection's settings for `cfg`. Under an egress policy the host
/// is resolved and checked here, and the connection goes to the address checked (the
/// name still serves TLS).
pub(crate) async fn replication_config(cfg: &PgConnConfig, slot: &str, publication: &str) -> Result<pgwire_replication::ReplicationConfig> {
    let addr = match &cfg.egress {
        Some(policy) => Some(
            policy
                .resolve(&cfg.host, cfg.port)
                .await
                .map_err(|m| PgError::permanent(format!("cannot connect to source {}: egress refused: {m}", cfg.describe())))?[0],
        ),
        None => None,
    };
    let rc = pgwire_replication::ReplicationConfig::new(
        cfg.host.clone(),
        cfg.user.clone(),
        cfg.password.expose_secret().to_string(),
        cfg.database.clone(),
        slot.to_string(),
        publication.to_string(),
    )
    .with_port(cfg.port)
    .with_tls(wire_tls(cfg))
    .with_options(SESSION_OPTIONS)
    .with_application_name(format!("sluice:{slot}"))
    .with_status_interval(Duration::from_millis(200))
    .with_wakeup_interval(Duration::from_secs(1))
    .with_buffer_size(4096)
    // A source on the same host: the walsender's sends gather into large segments
    // while the reader pauses (BENCHMARKS.md, 2026-12-04, "a small window on
    // loopback"); the kernel doubles this. Over a network autotuning keeps its window.
    .with_loopback_recv_buffer(32 * 1024);
    Ok(match addr {
        Some(a) => rc.with_hostaddr(a.ip()),
        None => rc,
    })
}

/// Opens a regular (non-replication) connection; `what` names it in errors.
/// [`connect`], listening on `channel`: the payloads of its notifications arrive on
/// the receiver (which ends with the connection).
pub async fn connect_listening(
    cfg: &PgConnConfig,
    what: &str,
    channel: &str,
) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<String>)> {
    let (client, mut connection) = open(cfg, what, pg_config(cfg)).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    let _ = tx.send(n.payload().to_string());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "postgres connection ended");
                    break;
                }
                None => break,
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {}", sluice_core::quote_ident(channel)))
        .await
        .map_err(|e| PgError::from_pg(&format!("listening on {channel} in {what}"), e))?;
    Ok((client, rx))
}

fn pg_config(cfg: &PgConnConfig) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .user(&cfg.user)
        .password(cfg.password.expose_secret())
        .dbname(&cfg.database)
        .options(SESSION_OPTIONS)
        .application_name("sluice")
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    pg
}

pub async fn connect(cfg: &PgConnConfig, what: &str) -> Result<Client> {
    Ok(driven(open(cfg, what, pg_config(cfg)).await?))
}

/// The client, its connection driven by a task of its own until it ends.
fn driven((client, connection): (Client, tokio_postgres::Connection<MaybeTlsStream, tokio_postgres::tls::NoTlsStream>)) -> Client {
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    client
}

/// Runs `body` (statements on `c`) between BEGIN and COMMIT, rolling back when any of
/// it fails. The clients here are shared (`&Client`), which `Client::transaction`
/// (it wants `&mut`) cannot serve.
pub async fn in_transaction<T>(
    c: &Client,
    body: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    c.batch_execute("BEGIN").await?;
    let done = match body.await {
        Ok(v) => c.batch_execute("COMMIT").await.map(|()| v),
        Err(e) => Err(e),
    };
    if done.is_err() {
        let _ = c.batch_execute("ROLLBACK").await;
    }
    done
}

/// A libpq connection string (`host=... sslmode=verify-full` or
/// `postgres://user:pw@host/db?sslmode=...`) as a [`PgConnConfig`]. The TLS keys are
/// read here (the driver's own parser knows only disable/prefer/require); the rest
/// by the driver's parser.
pub fn parse_dsn(dsn: &str) -> std::result::Result<PgConnConfig, String> {
    let mut tls = sluice_core::PgTls::default();
    let mut take = |k: &str, v: &str| -> std::result::Result<bool, String> {
        match k {
            "sslmode" => {
                tls.sslmode = serde_json::from_value(serde_json::Value::String(v.into()))
                    .map_err(|_| format!("sslmode {v:?}: use disable, prefer, require, verify-ca or verify-full"))?;
            }
            "sslrootcert" => tls.sslrootcert = Some(v.into()),
            "sslcert" => tls.sslcert = Some(v.into()),
            "sslkey" => tls.sslkey = Some(v.into()),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        match dsn.split_once('?') {
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(k, v)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) }
            }
            None => dsn.to_string(),
        }
    } else {
        let mut kept = Vec::new();
        for word in dsn_words(dsn) {
            match word.split_once('=') {
                Some((k, v)) if take(k.trim(), v.trim_matches('\'')).map_err(|e| e.to_string())? => {}
                _ => kept.push(word),
            }
        }
        kept.join(" ")
    };
    let pg: tokio_postgres::Config = rest.parse().map_err(|e| format!("not a Postgres connection string ({e})"))?;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => return Err("give host= (a TCP host; Unix sockets are not supported)".into()),
    };
    let password = pg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let database = pg.get_dbname().map_or_else(|| user.clone(), str::to_string);
    let cfg = PgConnConfig::with_tls(host, pg.get_ports().first().copied().unwrap_or(5432), user, password.into(), database, tls);
    cfg.check_tls()?;
    Ok(cfg)
}

/// The `key=value` words of a connection string, a quoted value kept whole.
fn dsn_words(dsn: &str) -> Vec<String> {
    let (mut words, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for c in dsn.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// [`connect`] with the caller's own session options and application name (the
/// control plane's search path, say) instead of the pipelines'.
pub async fn connect_as(cfg: &PgConnConfig, what: &str, options: &str, application: &str) -> Result<Client> {
    let mut pg = pg_config(cfg);
    pg.options(options).application_name(application);
    Ok(driven(open(cfg, what, pg).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_tls_keys_are_read_in_both_forms() {
        let c = parse_dsn("host=db.example.com port=6543 user=u password='p w' dbname=d sslmode=verify-full sslrootcert=/ca.pem").unwrap();
        assert_eq!((c.host.as_str(), c.port, c.database.as_str()), ("db.example.com", 6543, "d"));
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert_eq!(c.password.expose_secret(), "p w");
        let c = parse_dsn("postgres://u:pw@db.example.com/d?sslmode=verify-ca&application_name=x").unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyCa);
        assert_eq!(c.user, "u");
        assert_eq!(parse_dsn("host=h user=u").unwrap().sslmode, SslMode::Prefer);
        let e = parse_dsn("host=h user=u sslmode=verify").unwrap_err();
        assert!(e.contains("sslmode \"verify\""), "{e}");
        let e = parse_dsn("host=127.0.0.1 user=u sslmode=verify-full").unwrap_err();
        assert!(e.contains("IP address"), "{e}");
        let e = parse_dsn("host=h user=u sslcert=/c.pem").unwrap_err();
        assert!(e.contains("sslcert and sslkey go together"), "{e}");
    }
}
