//! NBD URIs (the NetworkBlockDevice `doc/uri.md` standard), the way operators name a remote
//! export: `nbd://host[:port]/export` and `nbd+unix:///export?socket=/path`.
//!
//! The export name is the URI path without its leading `/` (so `nbd://h` and `nbd://h/` both
//! name the empty export, and `nbd://h//x` names `/x`), percent-decoded. The `nbds` schemes
//! (`nbds://host[:port]/export`, `nbds+unix:///export?socket=/path`) ask for TLS: the client
//! then sends NBD_OPT_STARTTLS first and never goes on in the clear. Credentials come from the
//! program's `--tls-creds`, not from the URI, so the `tls-*` parameters are refused with an error
//! that says so; any other parameter we do not understand is refused too, as the standard asks,
//! because ignoring it could connect somewhere the operator did not mean.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::addr::SocketAddr;

/// The port IANA assigned to NBD, used when a TCP URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// A parsed NBD URI: where to connect and which export to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub addr: SocketAddr,
    /// The export name (may be empty: the server's default export).
    pub export: String,
    /// TLS is required (the `nbds` schemes).
    pub tls: bool,
}

/// A URI that does not name an NBD export we can reach; `reason` says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NBD URI '{uri}': {reason}")]
pub struct UriError {
    /// The URI as given.
    pub uri: String,
    /// What is wrong with it.
    pub reason: String,
}

impl NbdUri {
    /// The URI of `export` at `addr`.
    pub fn new(addr: SocketAddr, export: impl Into<String>) -> Self {
        NbdUri {
            addr,
            export: export.into(),
            tls: false,
        }
    }

    /// The same export over TLS (`nbds://`, `nbds+unix://`).
    pub fn with_tls(mut self) -> Self {
        self.tls = true;
        self
    }
}

/// The transports a scheme can select.
enum Transport {
    Tcp,
    Unix,
}

impl FromStr for NbdUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map_err(|reason| UriError {
            uri: s.to_string(),
            reason,
        })
    }
}

/// Parses a URI; the error is the reason only (the caller adds the URI).
fn parse(s: &str) -> Result<NbdUri, String> {
    let (scheme, rest) = s
        .split_once("://")
        .ok_or("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")?;
    let (transport, tls) = transport(scheme)?;
    if rest.contains('#') {
        return Err("a fragment ('#...') has no meaning in an NBD URI".into());
    }
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let export = decode(path.strip_prefix('/').unwrap_or(path), "export name")?;
    if export.contains('\0') {
        return Err("the export name contains a NUL byte".into());
    }
    let socket = parse_query(query.unwrap_or(""))?;
    let addr = match transport {
        Transport::Tcp => tcp_addr(authority, socket)?,
        Transport::Unix => unix_addr(authority, socket)?,
    };
    Ok(NbdUri { addr, export, tls })
}

/// The transport a scheme selects and whether it asks for TLS.
fn transport(scheme: &str) -> Result<(Transport, bool), String> {
    match scheme.to_ascii_lowercase().as_str() {
        "nbd" => Ok((Transport::Tcp, false)),
        "nbd+unix" => Ok((Transport::Unix, false)),
        "nbds" => Ok((Transport::Tcp, true)),
        "nbds+unix" => Ok((Transport::Unix, true)),
        "nbd+vsock" | "nbds+vsock" => Err("vsock transport is not supported".into()),
        _ => Err(format!(
            "unknown scheme '{scheme}' (expected nbd, nbd+unix, nbds or nbds+unix)"
        )),
    }
}

/// Parses the query; `socket` is the only parameter we understand.
fn parse_query(query: &str) -> Result<Option<String>, String> {
    let mut socket = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("query parameter '{pair}' has no value"))?;
        match key {
            "socket" if socket.is_some() => return Err("'socket' is given twice".into()),
            "socket" => socket = Some(decode(value, "socket path")?),
            k if k.starts_with("tls-") => {
                return Err(format!(
                    "parameter '{k}' is not taken from the URI: TLS credentials come from \
                     --tls-creds DIR (use the nbds scheme to require TLS)"
                ));
            }
            k => return Err(format!("unsupported query parameter '{k}'")),
        }
    }
    Ok(socket)
}

fn tcp_addr(authority: &str, socket: Option<String>) -> Result<SocketAddr, String> {
    if socket.is_some() {
        return Err("'socket' is only valid with the nbd+unix scheme".into());
    }
    if authority.contains('@') {
        return Err("user information (TLS-PSK user names) is not supported".into());
    }
    let (host, port) = split_host_port(authority)?;
    let host = if host.is_empty() {
        "localhost".to_string()
    } else {
        decode(host, "host")?
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => parse_port(p)?,
    };
    Ok(SocketAddr::Tcp { host, port })
}

/// Splits `host[:port]` or `[v6]:port`; the host keeps no brackets.
fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address opened with '[' is not closed")?;
        return match after {
            "" => Ok((host, None)),
            _ => after
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or_else(|| format!("unexpected '{after}' after the IPv6 address")),
        };
    }
    Ok(match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    })
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) => Err("port 0 cannot be connected to".into()),
        Ok(port) if p.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(format!("port '{p}' is not a number from 1 to 65535")),
    }
}

fn unix_addr(authority: &str, socket: Option<String>) -> Result<SocketAddr, String> {
    if !authority.is_empty() {
        return Err(format!(
            "a unix-socket URI has no host ('{authority}'); write nbd+unix:///EXPORT?socket=PATH"
        ));
    }
    let socket = socket.ok_or("nbd+unix needs a 'socket' query parameter (?socket=PATH)")?;
    if socket.is_empty() {
        return Err("the socket path is empty".into());
    }
    if socket.starts_with('\0') {
        return Err("abstract unix sockets are not supported".into());
    }
    Ok(SocketAddr::Unix(PathBuf::from(socket)))
}

/// Percent-decodes `s` into UTF-8 text.
fn decode(s: &str, what: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
        out.push(byte.ok_or_else(|| format!("bad percent escape in the {what}"))?);
        i += 3;
    }
    String::from_utf8(out).map_err(|_| format!("the {what} is not UTF-8 after decoding"))
}

/// Percent-encodes everything but unreserved characters and the ones in `keep`.
fn encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = encode(&self.export, b"/:@!$&'()*+,;=");
        let s = if self.tls { "s" } else { "" };
        // The host is percent-decoded when parsed, so it is encoded here (found by the nbd_uri
        // fuzz target: "a%2Fb" displayed as a URI naming host "a").
        match &self.addr {
            SocketAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd{s}://[{}]:{port}/{export}", encode(host, b":"))
            }
            SocketAddr::Tcp { host, port } => {
                write!(
                    f,
                    "nbd{s}://{}:{port}/{export}",
                    encode(host, b"!$&'()*+,;=")
                )
            }
            SocketAddr::Unix(path) => {
                let socket = encode(&path.to_string_lossy(), b"/:@!$'()*+,;");
                write!(f, "nbd{s}+unix:///{export}?socket={socket}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_need_escaping_display_as_uris_that_parse_back() {
        for uri in ["nbd://[fe80::1%25eth0]/", "nbd://a%2Fb/x", "nbd://%2F"] {
            let u: NbdUri = uri.parse().unwrap();
            let again: NbdUri = u.to_string().parse().unwrap();
            assert_eq!(again, u, "{uri} -> {u}");
        }
    }

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri::new(
            SocketAddr::Tcp {
                host: host.into(),
                port,
            },
            export,
        )
    }

    fn unix(path: &str, export: &str) -> NbdUri {
        NbdUri::new(SocketAddr::Unix(path.into()), export)
    }

    #[test]
    fn tcp_uris_follow_the_standard_examples() {
        let cases = [
            ("nbd://example.com/disk", tcp("example.com", 10809, "disk")),
            ("nbd://example.com/", tcp("example.com", 10809, "")),
            ("nbd://example.com", tcp("example.com", 10809, "")),
            (
                "nbd://example.com//disk",
                tcp("example.com", 10809, "/disk"),
            ),
            (
                "nbd://example.com/hello%20world",
                tcp("example.com", 10809, "hello world"),
            ),
            ("nbd://10.0.0.1:1234/x", tcp("10.0.0.1", 1234, "x")),
            ("nbd://[::1]:99/x", tcp("::1", 99, "x")),
            ("nbd://[::1]/", tcp("::1", 10809, "")),
            ("NBD://h:/e", tcp("h", 10809, "e")),
            ("nbd:///e", tcp("localhost", 10809, "e")),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<NbdUri>().as_ref(), Ok(&want), "{s}");
        }
    }

    #[test]
    fn unix_uris_take_the_socket_parameter() {
        let cases = [
            (
                "nbd+unix:///disk?socket=/tmp/s.sock",
                unix("/tmp/s.sock", "disk"),
            ),
            ("nbd+unix:///?socket=/tmp/s", unix("/tmp/s", "")),
            ("nbd+unix://?socket=rel.sock", unix("rel.sock", "")),
            (
                "nbd+unix:///a%2Fb?socket=/tmp/with%20space",
                unix("/tmp/with space", "a/b"),
            ),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<NbdUri>().as_ref(), Ok(&want), "{s}");
        }
    }

    #[test]
    fn bad_uris_are_refused_with_a_reason() {
        let cases = [
            ("/tmp/sock", "expected nbd://"),
            ("http://h/e", "unknown scheme 'http'"),
            ("nbd+vsock://1/e", "vsock"),
            ("nbd://h:99999/e", "port '99999'"),
            ("nbd://h:0/e", "port 0"),
            ("nbd://h:+80/e", "port '+80'"),
            ("nbd://[::1/e", "not closed"),
            ("nbd://user@h/e", "user information"),
            ("nbd://h/e?socket=/s", "only valid with the nbd+unix"),
            ("nbd://h/e?tls-type=x509", "--tls-creds"),
            ("nbds+vsock://1/e", "vsock"),
            ("nbd://h/e?frob=1", "unsupported query parameter 'frob'"),
            ("nbd://h/e#frag", "fragment"),
            ("nbd://h/%zz", "bad percent escape"),
            ("nbd://h/%ff", "not UTF-8"),
            ("nbd://h/a%00b", "NUL"),
            ("nbd+unix:///e", "needs a 'socket'"),
            ("nbd+unix:///e?socket=", "empty"),
            ("nbd+unix://host/e?socket=/s", "has no host"),
            ("nbd+unix:///e?socket=/a&socket=/b", "twice"),
            ("nbd+unix:///e?socket", "has no value"),
            ("nbd+unix:///e?socket=%00abs", "abstract"),
        ];
        for (s, why) in cases {
            let err = s.parse::<NbdUri>().expect_err(s);
            assert!(err.reason.contains(why), "{s}: {err}");
            assert!(err.to_string().contains(s), "{s}: {err}");
        }
    }

    #[test]
    fn nbds_schemes_ask_for_tls() {
        assert_eq!(
            "nbds://h:7/e".parse::<NbdUri>(),
            Ok(tcp("h", 7, "e").with_tls())
        );
        assert_eq!(
            "nbds+unix:///e?socket=/s".parse::<NbdUri>(),
            Ok(unix("/s", "e").with_tls())
        );
        assert_eq!(
            unix("/s", "e").with_tls().to_string(),
            "nbds+unix:///e?socket=/s"
        );
    }

    #[test]
    fn display_round_trips() {
        for uri in [
            tcp("example.com", 10809, "disk"),
            tcp("::1", 7, "with space/and%percent"),
            unix("/tmp/a b?c", "x&y"),
            unix("/s", ""),
            tcp("h", 7, "e").with_tls(),
            unix("/s", "e").with_tls(),
        ] {
            assert_eq!(uri.to_string().parse::<NbdUri>(), Ok(uri.clone()), "{uri}");
        }
    }
}
