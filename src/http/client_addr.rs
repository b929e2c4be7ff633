//! The client's address behind reverse proxies (`[server] trusted_proxies`).
//!
//! The key-guessing throttle counts failures per client address. Behind a TLS proxy every
//! request comes from the proxy's address, so one guesser would lock every game out. The
//! address is therefore taken from `Forwarded` (RFC 7239) or `X-Forwarded-For` — but only
//! when the connection comes from a trusted proxy, and only from the hops those proxies
//! appended: walking the list from the right, the first address that is not a trusted proxy
//! is the client. Anything a client writes to the left of that is ignored, so a client
//! cannot choose its own address; with no trusted proxies the headers are never read.

use std::net::IpAddr;

use actix_web::HttpRequest;

/// Most hops read from one header: a longer chain is treated as the proxy's own address.
const MAX_HOPS: usize = 32;

/// Proxies whose forwarding headers are believed: addresses or CIDR ranges.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Parses `["10.0.0.0/8", "127.0.0.1", "::1"]`; an entry that is neither an address nor a
    /// range is an error naming it.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let parse_one = |entry: &String| {
            let bad = || format!("server.trusted_proxies: `{entry}` is not an IP address or a CIDR range");
            let (ip, len) = match entry.trim().split_once('/') {
                Some((ip, len)) => (ip, Some(len)),
                None => (entry.trim(), None),
            };
            let ip: IpAddr = ip.parse().map_err(|_| bad())?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = match len {
                Some(len) => len.parse::<u8>().ok().filter(|&l| l <= max).ok_or_else(bad)?,
                None => max,
            };
            Ok((ip, len))
        };
        entries.iter().map(parse_one).collect::<Result<_, _>>().map(Self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|&(net, len)| in_range(ip, canonical(net), len))
    }

    /// The client's address: the connection's peer, or, when the peer is a trusted proxy,
    /// the nearest untrusted hop its forwarding headers name.
    pub fn client_ip(&self, req: &HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr().map(|a| a.ip())?;
        if !self.trusts(peer) {
            return Some(peer);
        }
        let headers = req.headers();
        let hops: Vec<IpAddr> = if let Some(forwarded) = headers.get("forwarded").and_then(|v| v.to_str().ok()) {
            forwarded_for(forwarded)
        } else if let Some(xff) = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            xff.split(',').map(|s| parse_hop(s.trim())).collect::<Option<_>>().unwrap_or_default()
        } else {
            Vec::new()
        };
        if hops.is_empty() || hops.len() > MAX_HOPS {
            return Some(peer);
        }
        // From the right: the proxies' own entries, then the client the last one saw.
        Some(hops.iter().rev().copied().find(|&ip| !self.trusts(ip)).unwrap_or(hops[0]))
    }
}

/// The `for=` addresses of a `Forwarded` header, in order; empty when one is unreadable.
fn forwarded_for(value: &str) -> Vec<IpAddr> {
    let mut hops = Vec::new();
    for element in value.split(',') {
        let Some(node) = element
            .split(';')
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
            .map(|(_, v)| v.trim().trim_matches('"'))
        else {
            continue;
        };
        match parse_hop(node) {
            Some(ip) => hops.push(ip),
            None => return Vec::new(),
        }
    }
    hops
}

/// One hop: `1.2.3.4`, `1.2.3.4:5678`, `[2001:db8::1]` or `[2001:db8::1]:5678`, `2001:db8::1`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    hop.rsplit_once(':')?.0.parse().ok()
}

/// An IPv4-mapped IPv6 address as IPv4, so `::ffff:10.0.0.1` matches `10.0.0.0/8`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn in_range(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => prefix_eq(&a.octets(), &b.octets(), len),
        (IpAddr::V6(a), IpAddr::V6(b)) => prefix_eq(&a.octets(), &b.octets(), len),
        _ => false,
    }
}

fn prefix_eq(a: &[u8], b: &[u8], len: u8) -> bool {
    let (whole, bits) = ((len / 8) as usize, len % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    bits == 0 || (a[whole] ^ b[whole]) >> (8 - bits) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn request(peer: &str, headers: &[(&str, &str)]) -> HttpRequest {
        let mut r = TestRequest::default().peer_addr(format!("{peer}:40000").parse().unwrap());
        for &(k, v) in headers {
            r = r.insert_header((k, v));
        }
        r.to_http_request()
    }

    #[test]
    fn entries_are_addresses_or_ranges_and_anything_else_is_named() {
        let p = proxies(&["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"]);
        assert!(p.trusts(ip("10.200.3.4")) && p.trusts(ip("192.168.1.7")) && p.trusts(ip("2001:db8:1::9")));
        assert!(!p.trusts(ip("11.0.0.1")) && !p.trusts(ip("192.168.1.8")) && !p.trusts(ip("2001:db9::1")));
        assert!(p.trusts(ip("::ffff:10.1.2.3")), "an IPv4-mapped peer matches its IPv4 range");
        assert!(proxies(&["172.16.0.0/12"]).trusts(ip("172.31.255.255")));
        assert!(!proxies(&["172.16.0.0/12"]).trusts(ip("172.32.0.0")));
        for bad in ["proxy.example", "10.0.0.0/33", "10.0.0.0/x", ""] {
            let e = TrustedProxies::parse(&[bad.to_string()]).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
    }

    #[test]
    fn headers_count_only_from_a_trusted_peer_and_only_the_hops_proxies_added() {
        let p = proxies(&["127.0.0.1", "10.0.0.0/8"]);
        let xff = |peer, value| p.client_ip(&request(peer, &[("x-forwarded-for", value)])).unwrap();
        // Not from a proxy: the header is the client's own word, ignored.
        assert_eq!(xff("198.51.100.1", "203.0.113.9"), ip("198.51.100.1"));
        // From the proxy: the client it saw.
        assert_eq!(xff("127.0.0.1", "203.0.113.9"), ip("203.0.113.9"));
        // A client's forged entries sit to the left of what the proxies appended.
        assert_eq!(xff("127.0.0.1", "1.1.1.1, 203.0.113.9, 10.0.0.5"), ip("203.0.113.9"));
        // Garbage from a trusted peer: the peer's own address.
        assert_eq!(xff("127.0.0.1", "not-an-ip"), ip("127.0.0.1"));
        let forwarded = |value| p.client_ip(&request("127.0.0.1", &[("forwarded", value)])).unwrap();
        assert_eq!(forwarded("for=192.0.2.60;proto=https;by=10.0.0.1"), ip("192.0.2.60"));
        assert_eq!(forwarded(r#"for="[2001:db8:cafe::17]:4711", for=10.0.0.3"#), ip("2001:db8:cafe::17"));
        // With no trusted proxy, nothing is read.
        let none = TrustedProxies::default();
        assert_eq!(none.client_ip(&request("127.0.0.1", &[("x-forwarded-for", "203.0.113.9")])), Some(ip("127.0.0.1")));
    }
}
