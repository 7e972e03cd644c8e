//! Which hosts a tenant may make this server connect to. Every host a tenant names
//! (a source, a sink's database, brokers, search and webhook URLs, enrichers' lookups
//! and endpoints, mirrors' clusters and registries) is resolved when the resource is
//! created or changed; an address in a range the operator has not allowed is refused
//! before anything connects. Refused by default: loopback, private and shared ranges,
//! link-local (cloud metadata at 169.254.169.254 among them), unspecified addresses
//! and Unix sockets. The operator allows ranges with `sluice server --allow-egress`.
//!
//! A name that does not resolve passes: nothing can be reached through it today, and
//! the pipeline's own connection fails with its own message. Every start checks again
//! (a pipeline or mirror claimed by the supervisor, each provisioning step): a name
//! that resolves elsewhere since (DNS rebinding), or a policy the operator narrowed,
//! leaves the resource failed with the refusal in its status, before it connects.
//! Between that check and the connection the name is resolved once more by the
//! client library; pinning the checked address is not done.

use std::net::IpAddr;

use serde_json::Value;

use crate::model::Invalid;

/// The ranges a server lets tenants reach besides public addresses.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    allow: Vec<Allowed>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Allowed {
    Loopback,
    Private,
    LinkLocal,
    Net(IpAddr, u8),
}

impl Egress {
    /// `loopback`, `private`, `link-local` and CIDRs (`10.1.0.0/16`), comma-separated;
    /// empty: public addresses only.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut allow = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            allow.push(match item {
                "loopback" => Allowed::Loopback,
                "private" => Allowed::Private,
                "link-local" => Allowed::LinkLocal,
                net => {
                    let (ip, bits) = net.split_once('/').unwrap_or((net, ""));
                    let ip: IpAddr = ip.parse().map_err(|_| {
                        format!("--allow-egress: {item:?} is neither loopback, private, link-local nor an address range like 10.1.0.0/16")
                    })?;
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    let bits = if bits.is_empty() {
                        max
                    } else {
                        bits.parse().map_err(|_| format!("--allow-egress: bad prefix length in {item:?}"))?
                    };
                    if bits > max {
                        return Err(format!("--allow-egress: prefix length {bits} is longer than {max} in {item:?}"));
                    }
                    Allowed::Net(ip, bits)
                }
            });
        }
        Ok(Self { allow })
    }

    /// Why `ip` may not be reached, if it may not.
    fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (class, allowed_by) = classify(ip)?;
        let allowed = self.allow.iter().any(|a| match a {
            Allowed::Net(net, bits) => contains(*net, *bits, ip),
            class => Some(*class) == allowed_by,
        });
        (!allowed).then_some(class)
    }

    /// Checks every host named in a resource's settings; `at` names the settings in
    /// the error (`sink.postgres`, say).
    pub async fn check_settings(&self, at: &str, settings: &Value) -> Result<(), Invalid> {
        let mut hosts = Vec::new();
        collect_hosts(settings, at, &mut hosts);
        for (field, host) in hosts {
            self.check_host(&field, &host).await?;
        }
        Ok(())
    }

    pub async fn check_host(&self, field: &str, host: &str) -> Result<(), Invalid> {
        let host = host.trim();
        if host.starts_with('/') || host.starts_with("unix:") {
            return Err(Invalid::new(field, format!("{host} is a Unix socket, which tenants cannot reach: give a host name")));
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<IpAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match tokio::net::lookup_host((bare, 0)).await {
                Ok(found) => found.map(|a| a.ip()).collect(),
                Err(_) => return Ok(()),
            },
        };
        for ip in addrs {
            if let Some(class) = self.refusal(ip) {
                return Err(Invalid::new(
                    field,
                    format!(
                        "{host} is {}{class} address ({ip}), which this server does not let tenants reach: use a public address, or ask the operator to allow it (sluice server --allow-egress)",
                        if class.starts_with(['a', 'e', 'i', 'o', 'u']) { "an " } else { "a " }
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The range `ip` falls in, and which `--allow-egress` word allows it (none: only an
/// explicit range does); `None` for a public address.
fn classify(ip: IpAddr) -> Option<(&'static str, Option<Allowed>)> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some(("loopback", Some(Allowed::Loopback)))
            } else if v4.is_unspecified() || o[0] == 0 {
                Some(("unspecified", Some(Allowed::Loopback)))
            } else if v4.is_link_local() {
                Some(("link-local", Some(Allowed::LinkLocal)))
            } else if v4.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) || (o[0] == 198 && (o[1] & 0xfe) == 18) {
                Some(("private", Some(Allowed::Private)))
            } else if v4.is_broadcast() || v4.is_multicast() || o[0] >= 240 {
                Some(("reserved", None))
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_loopback() {
                Some(("loopback", Some(Allowed::Loopback)))
            } else if v6.is_unspecified() {
                Some(("unspecified", Some(Allowed::Loopback)))
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some(("link-local", Some(Allowed::LinkLocal)))
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some(("private", Some(Allowed::Private)))
            } else if v6.is_multicast() {
                Some(("reserved", None))
            } else {
                None
            }
        }
    }
}

fn contains(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - u32::from(bits)) };
            (u32::from(n) & mask) == (u32::from(i) & mask)
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - u32::from(bits)) };
            (u128::from(n) & mask) == (u128::from(i) & mask)
        }
        _ => false,
    }
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
            assert!(none.check_host("f", host).await.is_err(), "{host}");
        }
        assert!(none.check_host("f", "/var/run/postgresql").await.is_err());
        assert!(none.check_host("f", "8.8.8.8").await.is_ok());
        let e = none.check_host("sink.postgres.host", "127.0.0.1").await.unwrap_err();
        assert!(
            e.message.contains("sink.postgres.host: 127.0.0.1 is a loopback address") && e.message.contains("--allow-egress"),
            "{}",
            e.message
        );
        let lo = Egress::parse("loopback").unwrap();
        assert!(lo.check_host("f", "127.0.0.1").await.is_ok());
        assert!(lo.check_host("f", "10.0.0.1").await.is_err());
        let net = Egress::parse("10.1.0.0/16, link-local").unwrap();
        assert!(net.check_host("f", "10.1.9.9").await.is_ok());
        assert!(net.check_host("f", "10.2.0.1").await.is_err());
        assert!(net.check_host("f", "169.254.169.254").await.is_ok());
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
        let e = Egress::default().check_settings("sink", &v).await.unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sink.kafka.brokers"));
    }
}
