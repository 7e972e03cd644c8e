//! Which hosts a tenant may make this server connect to. Every host a tenant names
//! (a source, a sink's database, brokers, search and webhook URLs, enrichers' lookups
//! and endpoints, mirrors' clusters and registries) is resolved when the resource is
//! created or changed; an address in a range the operator has not allowed is refused
//! before anything connects. Refused by default: loopback, private and shared ranges,
//! link-local (cloud metadata at 169.254.169.254 among them), unspecified addresses
//! and Unix sockets. The operator allows ranges with `sluice server --allow-egress`.
//!
//! A name that does not resolve passes here: nothing can be reached through it today.
//! Every start checks again (a pipeline or mirror claimed by the supervisor, each
//! provisioning step), so a policy the operator narrowed leaves the resource failed
//! with the refusal in its status. A pipeline's own connections then go through the
//! same policy (`sluice_core::egress`): Postgres and HTTP clients connect only to
//! the addresses they checked, so a name that resolves elsewhere after these checks
//! (DNS rebinding) is refused too. Kafka clients resolve broker names themselves and
//! connect to the brokers each cluster advertises: each of their connections is
//! checked on the address librdkafka resolved, just before it is made (the connect
//! hook of `sluice_kafka::probe::Guarded`). The advertised brokers are also checked
//! by name at start (by the Kafka sink, and by [`check_mirror_brokers`] for a
//! mirror), so a refusal is one clear line before anything is produced.

use std::net::IpAddr;

use serde_json::Value;

pub use sluice_core::egress::Egress;

use crate::model::Invalid;

/// Checks every host named in a resource's settings; `at` names the settings in the
/// error (`sink.postgres`, say).
pub async fn check_settings(policy: &Egress, at: &str, settings: &Value) -> Result<(), Invalid> {
    let mut hosts = Vec::new();
    collect_hosts(settings, at, &mut hosts);
    for (field, host) in hosts {
        check_host(policy, &field, &host).await?;
    }
    Ok(())
}

/// Checks `host` as named in `field`. A name that does not resolve passes: nothing
/// can be reached through it now, and a connection through it is checked again.
pub async fn check_host(policy: &Egress, field: &str, host: &str) -> Result<(), Invalid> {
    let host = host.trim();
    Egress::check_not_socket(host).map_err(|m| Invalid::new(field, m))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<IpAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => match tokio::net::lookup_host((bare, 0)).await {
            Ok(found) => found.map(|a| a.ip()).collect(),
            Err(_) => return Ok(()),
        },
    };
    for ip in addrs {
        policy.check_ip(host, ip).map_err(|m| Invalid::new(field, m))?;
    }
    Ok(())
}

/// Checks the brokers a mirror's clusters advertise (they are what librdkafka connects
/// to after the bootstrap brokers, which were checked by name). A cluster that does
/// not answer passes here: the mirror's own connection fails with its own message.
/// A connection the policy refused does not.
pub async fn check_mirror_brokers(policy: &Egress, cfg: &sluice_mirror::MirrorConfig) -> Result<(), String> {
    let mut cfg = cfg.clone();
    // The probe's own connections go through the policy too.
    cfg.egress = Some(std::sync::Arc::new(policy.clone()));
    let brokers = match tokio::task::spawn_blocking(move || sluice_mirror::advertised_brokers(&cfg)).await {
        Ok(Ok(brokers)) => brokers,
        // Refused at the connection (the bootstrap name resolves elsewhere now); any
        // other failure is the mirror's own to report, not an egress refusal.
        Ok(Err(e)) if sluice_core::egress::refusal_in(&e).is_some() => return Err(e.to_string()),
        _ => return Ok(()),
    };
    for (side, host, port) in brokers {
        policy
            .resolve(&host, port)
            .await
            .map_err(|m| format!("{side}.brokers: the cluster advertises broker {host}:{port}, where egress is refused: {m}"))?;
    }
    Ok(())
}

/// The hosts named in `v` at any depth: `host` keys, broker lists (`brokers`,
/// `bootstrap.servers`) and URLs.
fn collect_hosts(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let field = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                match (k.as_str(), v) {
                    ("host", Value::String(h)) => out.push((field, h.clone())),
                    ("brokers" | "bootstrap.servers", Value::String(list)) => {
                        for b in list.split(',').map(str::trim).filter(|b| !b.is_empty()) {
                            out.push((field.clone(), host_of_authority(b)));
                        }
                    }
                    (_, Value::String(s)) if s.contains("://") => {
                        if let Some(h) = host_of_url(s) {
                            out.push((field, h));
                        }
                    }
                    _ => collect_hosts(v, &field, out),
                }
            }
        }
        Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| collect_hosts(v, &format!("{at}[{i}]"), out)),
        _ => {}
    }
}

/// `host` of `host:port`, `[v6]:port` or `host`.
fn host_of_authority(a: &str) -> String {
    let a = a.rsplit_once('@').map_or(a, |(_, h)| h);
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    match a.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
        _ => a.to_string(),
    }
}

fn host_of_url(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    (!authority.is_empty()).then(|| host_of_authority(authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn private_ranges_are_refused_unless_allowed() {
        let none = Egress::default();
        for host in
            ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.9", "169.254.169.254", "[::1]", "0.0.0.0", "::ffff:127.0.0.1", "fd00::1"]
        {
            assert!(check_host(&none, "f", host).await.is_err(), "{host}");
        }
        assert!(check_host(&none, "f", "/var/run/postgresql").await.is_err());
        assert!(check_host(&none, "f", "8.8.8.8").await.is_ok());
        let e = check_host(&none, "sink.postgres.host", "127.0.0.1").await.unwrap_err();
        assert!(
            e.message.contains("sink.postgres.host: 127.0.0.1 is a loopback address") && e.message.contains("--allow-egress"),
            "{}",
            e.message
        );
        let lo = Egress::parse("loopback").unwrap();
        assert!(check_host(&lo, "f", "127.0.0.1").await.is_ok());
        assert!(check_host(&lo, "f", "10.0.0.1").await.is_err());
        let net = Egress::parse("10.1.0.0/16, link-local").unwrap();
        assert!(check_host(&net, "f", "10.1.9.9").await.is_ok());
        assert!(check_host(&net, "f", "10.2.0.1").await.is_err());
        assert!(check_host(&net, "f", "169.254.169.254").await.is_ok());
        assert!(Egress::parse("everything").is_err());
        assert!(Egress::parse("10.0.0.0/33").is_err());
    }

    #[tokio::test]
    async fn every_host_in_settings_is_found() {
        let v = serde_json::json!({
            "kafka": {"brokers": "8.8.8.8:9092, 127.0.0.1:9093", "properties": {"bootstrap.servers": "10.0.0.1:9092"},
                      "registry_url": "https://u:p@[::1]:8081/x", "state": {"host": "db.example.com"}},
        });
        let mut hosts = Vec::new();
        collect_hosts(&v, "sink", &mut hosts);
        let hosts: Vec<&str> = hosts.iter().map(|(_, h)| h.as_str()).collect();
        assert_eq!(hosts, ["8.8.8.8", "127.0.0.1", "10.0.0.1", "::1", "db.example.com"]);
        let e = check_settings(&Egress::default(), "sink", &v).await.unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sink.kafka.brokers"));
    }
}
