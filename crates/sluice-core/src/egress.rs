//! Which addresses a tenant may make this server connect to, checked where the
//! connection is made. `sluice server` gives every tenant's pipeline its policy
//! (`--allow-egress`); the clients a pipeline opens then resolve each name through it
//! and connect only to the addresses it checked, so a name that resolves somewhere
//! else between a check and the connection (DNS rebinding) cannot slip past it.
//! Refused unless allowed: loopback, private and shared ranges, link-local (cloud
//! metadata at 169.254.169.254 among them), unspecified and reserved addresses, and
//! Unix sockets. `sluice run` has no policy: its operator names its own hosts.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The ranges tenants may reach besides public addresses (default: none).
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

    /// `ip` (what `host` resolved to) if tenants may reach it; else one line saying
    /// which range it is in and how to allow it.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), String> {
        match self.refusal(ip) {
            None => Ok(()),
            Some(class) => Err(format!(
                "{host} is {}{class} address ({ip}), which this server does not let tenants reach: use a public address, or ask the operator to allow it (sluice server --allow-egress)",
                if class.starts_with(['a', 'e', 'i', 'o', 'u']) { "an " } else { "a " }
            )),
        }
    }

    /// A Unix socket path named as a host: tenants cannot reach one.
    pub fn check_not_socket(host: &str) -> Result<(), String> {
        if host.starts_with('/') || host.starts_with("unix:") {
            return Err(format!("{host} is a Unix socket, which tenants cannot reach: give a host name"));
        }
        Ok(())
    }

    /// The addresses of `host` (a name or an address literal) to connect to on `port`:
    /// all of them when every one is allowed, else the refusal. A name that resolves
    /// to no address is an error here: the caller is about to connect.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let host = host.trim();
        Self::check_not_socket(host)?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((bare, port)).await.map_err(|e| format!("{host}: cannot resolve the name ({e})"))?.collect(),
        };
        if addrs.is_empty() {
            return Err(format!("{host}: the name has no address"));
        }
        for a in &addrs {
            self.check_ip(host, a.ip())?;
        }
        Ok(addrs)
    }

    /// Checks the host of `url` now when it is an address literal, which no resolver
    /// sees; a name is checked by [`Resolver`] at each connection.
    pub fn check_url_literal(&self, url: &str) -> Result<(), String> {
        let Ok(u) = reqwest::Url::parse(url) else { return Ok(()) };
        let host = u.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) => self.check_ip(host, ip),
            Err(_) => Ok(()),
        }
    }
}

/// An HTTP client's resolver that hands out only addresses the policy allows: the
/// address checked is the address connected to.
struct Resolver(Arc<Egress>);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            // The port is the URL's: the client sets it on each address.
            let addrs = policy.resolve(&host, 0).await.map_err(|m| format!("egress refused: {m}"))?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// `builder` made to connect to `url` only through `policy` (none: as it is). A
/// guarded client ignores the system's proxy settings: the policy is about where this
/// server connects, and through a proxy it would check the proxy.
pub fn guard_http(builder: reqwest::ClientBuilder, url: &str, policy: Option<&Arc<Egress>>) -> Result<reqwest::ClientBuilder, String> {
    let Some(policy) = policy else { return Ok(builder) };
    policy.check_url_literal(url).map_err(|m| format!("egress refused: {m}"))?;
    Ok(builder.no_proxy().dns_resolver(Arc::new(Resolver(policy.clone()))))
}

/// The egress refusal among `e`'s causes, one line: a client built by [`guard_http`]
/// reports it only as the cause of a failed request, often several layers down.
pub fn refusal_in(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if let Some(at) = text.find("egress refused: ") {
            return Some(text[at..].lines().next().unwrap_or_default().to_string());
        }
        cause = c.source();
    }
    None
}

/// What a Kafka client's connect hook asks before each broker connection (the
/// patched rdkafka's `ClientContext::allow_connect`): librdkafka resolves the
/// bootstrap brokers and every broker the cluster advertises itself, so the check
/// belongs on the address it is about to connect to. Keeps the last refusal, which
/// says more than librdkafka's "Permission denied".
#[derive(Debug, Default)]
pub struct BrokerGuard {
    policy: Option<Arc<Egress>>,
    refused: std::sync::Mutex<Option<String>>,
}

impl BrokerGuard {
    /// No policy: every connection is allowed.
    pub fn new(policy: Option<Arc<Egress>>) -> Self {
        Self { policy, refused: Default::default() }
    }

    /// Whether a client may connect to `addr`, which librdkafka resolved for `broker`
    /// (`host:port`).
    pub fn allow(&self, addr: SocketAddr, broker: &str) -> bool {
        let Some(policy) = &self.policy else { return true };
        match policy.check_ip(broker, addr.ip()) {
            Ok(()) => true,
            Err(m) => {
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("egress refused: Kafka broker {m}"));
                false
            }
        }
    }

    /// The last connection refused, one line.
    pub fn refusal(&self) -> Option<String> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_resolve_only_to_allowed_addresses() {
        let none = Egress::default();
        let e = none.resolve("localhost", 5432).await.unwrap_err();
        assert!(e.starts_with("localhost is a loopback address (127.0.0.1)") && e.contains("--allow-egress"), "{e}");
        assert!(none.resolve("/var/run/postgresql", 5432).await.unwrap_err().contains("Unix socket"));
        assert_eq!(none.resolve("8.8.8.8", 53).await.unwrap(), vec!["8.8.8.8:53".parse().unwrap()]);
        let lo = Egress::parse("loopback").unwrap();
        assert!(lo.resolve("localhost", 5432).await.unwrap().iter().all(|a| a.ip().is_loopback() && a.port() == 5432));
        assert!(lo.resolve("no-such-host.invalid", 1).await.unwrap_err().contains("cannot resolve"));
        assert!(none.check_url_literal("http://127.0.0.1:9/x").unwrap_err().contains("loopback"));
        assert!(none.check_url_literal("https://[fd00::1]/").unwrap_err().contains("private"));
        assert!(none.check_url_literal("https://example.com/").is_ok());
    }

    /// An HTTP client reaches a host by name only where the policy lets the name's
    /// addresses be reached; the server here is real and answers every request.
    #[tokio::test]
    async fn http_clients_resolve_through_the_policy() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
            }
        });
        let url = format!("http://localhost:{port}/");
        let get = |policy: Option<Egress>| {
            let url = url.clone();
            async move {
                let client = guard_http(reqwest::Client::builder(), &url, policy.map(Arc::new).as_ref())?.build().unwrap();
                match client.get(&url).send().await {
                    Ok(r) => Ok(r.status().as_u16()),
                    Err(e) => {
                        let mut chain = e.to_string();
                        let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(&e);
                        while let Some(c) = cause {
                            chain.push_str(&format!(": {c}"));
                            cause = c.source();
                        }
                        Err(chain)
                    }
                }
            }
        };
        assert_eq!(get(None).await, Ok(200));
        assert_eq!(get(Some(Egress::parse("loopback").unwrap())).await, Ok(200));
        let e = get(Some(Egress::default())).await.unwrap_err();
        assert!(e.contains("egress refused: localhost is a loopback address (127.0.0.1)"), "{e}");
        // An address literal never reaches a resolver: it is refused when the client
        // is built for it.
        let e =
            guard_http(reqwest::Client::builder(), &format!("http://127.0.0.1:{port}/"), Some(&Arc::new(Egress::default()))).err().unwrap();
        assert!(e.starts_with("egress refused: 127.0.0.1 is a loopback address"), "{e}");
    }

    #[test]
    fn ranges_parse_and_match() {
        let net = Egress::parse("10.1.0.0/16, link-local").unwrap();
        assert!(net.check_ip("h", "10.1.9.9".parse().unwrap()).is_ok());
        assert!(net.check_ip("h", "10.2.0.1".parse().unwrap()).is_err());
        assert!(net.check_ip("h", "169.254.169.254".parse().unwrap()).is_ok());
        assert!(Egress::default().check_ip("h", "::ffff:127.0.0.1".parse().unwrap()).is_err());
        assert!(Egress::parse("everything").is_err());
        assert!(Egress::parse("10.0.0.0/33").is_err());
    }
}
