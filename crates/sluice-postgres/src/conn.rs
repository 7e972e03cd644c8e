use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_postgres::{Client, NoTls};

use crate::error::{PgError, Result};

/// Session settings pinned on every connection, so values are printed in the one
/// text form the decoder and the sink expect (and floats without rounding).
pub(crate) const SESSION_OPTIONS: &str = "-c datestyle=ISO,YMD -c intervalstyle=iso_8601 -c timezone=UTC \
     -c extra_float_digits=3 -c bytea_output=hex -c client_encoding=UTF8";

pub use sluice_core::PgConnConfig;

/// The replication connection's settings for `cfg`.
pub(crate) fn replication_config(cfg: &PgConnConfig, slot: &str, publication: &str) -> pgwire_replication::ReplicationConfig {
    pgwire_replication::ReplicationConfig::new(
        cfg.host.clone(),
        cfg.user.clone(),
        cfg.password.expose_secret().to_string(),
        cfg.database.clone(),
        slot.to_string(),
        publication.to_string(),
    )
    .with_port(cfg.port)
    .with_tls(pgwire_replication::TlsConfig::disabled())
    .with_options(SESSION_OPTIONS)
    .with_application_name(format!("sluice:{slot}"))
    .with_status_interval(Duration::from_millis(200))
    .with_wakeup_interval(Duration::from_secs(1))
    .with_buffer_size(4096)
}

/// Opens a regular (non-replication) connection; `what` names it in errors.
/// [`connect`], listening on `channel`: the payloads of its notifications arrive on
/// the receiver (which ends with the connection).
pub async fn connect_listening(
    cfg: &PgConnConfig,
    what: &str,
    channel: &str,
) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<String>)> {
    let (client, mut connection) =
        pg_config(cfg).connect(NoTls).await.map_err(|e| PgError::from_pg(&format!("cannot connect to {what} {}", cfg.describe()), e))?;
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
        .connect_timeout(Duration::from_secs(10));
    pg
}

pub async fn connect(cfg: &PgConnConfig, what: &str) -> Result<Client> {
    let (client, connection) =
        pg_config(cfg).connect(NoTls).await.map_err(|e| PgError::from_pg(&format!("cannot connect to {what} {}", cfg.describe()), e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
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
