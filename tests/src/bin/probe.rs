//! `probe ATTEMPT...` / `probe --repeat N ATTEMPT`: a tiny network client for kernel tests.
//!
//! ATTEMPT is `tcp:ADDR:PORT` (TCP connect, 2 s timeout), `udp:ADDR:PORT` (unconnected
//! `sendto` of one byte: the sendmsg hooks) or `udpc:ADDR:PORT` (UDP connect then send: the
//! connect hooks). IPv6 as `tcp:[fd00::1]:80`. Each attempt prints one JSON line:
//! `{"attempt":"tcp:127.10.1.2:8000","outcome":"ok"|"eperm"|"error","errno":N}`;
//! with `--repeat N` only a summary `{"attempts":N,"ok":a,"eperm":b,"error":c}`.
//! `probe --whoami` prints `{"pid":N,"cgroup":"/v2/path"}` (the harness checks that it
//! placed the probe where it meant to).
//! Exit status is 0 whatever the outcomes (they are data); 2 on bad usage.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// `--repeat` is for bursts, not for load tests.
const MAX_REPEAT: u64 = 1_000_000;

#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    Udp,
    UdpConnected,
}

fn parse(attempt: &str) -> Result<(Kind, SocketAddr), String> {
    let (kind, addr) = attempt
        .split_once(':')
        .ok_or_else(|| format!("bad attempt {attempt:?}: want KIND:ADDR:PORT"))?;
    let kind = match kind {
        "tcp" => Kind::Tcp,
        "udp" => Kind::Udp,
        "udpc" => Kind::UdpConnected,
        other => return Err(format!("bad attempt kind {other:?}: want tcp, udp or udpc")),
    };
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("bad address in {attempt:?}: {e}"))?;
    Ok((kind, addr))
}

fn try_once(kind: Kind, addr: SocketAddr) -> std::io::Result<()> {
    match kind {
        Kind::Tcp => TcpStream::connect_timeout(&addr, TCP_CONNECT_TIMEOUT).map(drop),
        Kind::Udp | Kind::UdpConnected => {
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let sock = UdpSocket::bind(local)?;
            if let Kind::UdpConnected = kind {
                sock.connect(addr)?;
                sock.send(&[0]).map(drop)
            } else {
                sock.send_to(&[0], addr).map(drop)
            }
        }
    }
}

fn classify(r: &std::io::Result<()>) -> (&'static str, i32) {
    match r {
        Ok(()) => ("ok", 0),
        Err(e) => match e.raw_os_error() {
            Some(libc::EPERM) => ("eperm", libc::EPERM),
            Some(n) => ("error", n),
            // A timeout from connect_timeout has no errno of its own.
            None if e.kind() == std::io::ErrorKind::TimedOut => ("error", libc::ETIMEDOUT),
            None => ("error", 0),
        },
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: probe ATTEMPT... | probe --repeat N ATTEMPT";
    let out = std::io::stdout();
    let mut out = out.lock();
    if args.len() == 1 && args[0] == "--whoami" {
        // The cgroup v2 line of /proc/self/cgroup is `0::/path`.
        let cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            .unwrap_or_default();
        let line = serde_json::json!({"pid": std::process::id(), "cgroup": cgroup});
        let _ = writeln!(out, "{line}");
        return ExitCode::SUCCESS;
    }
    if args.first().map(String::as_str) == Some("--repeat") {
        let (Some(n), Some(attempt), None) = (args.get(1), args.get(2), args.get(3)) else {
            eprintln!("{usage}");
            return ExitCode::from(2);
        };
        let n: u64 = match n.parse() {
            Ok(n) if n <= MAX_REPEAT => n,
            _ => {
                eprintln!("--repeat wants a number up to {MAX_REPEAT}, got {n:?}");
                return ExitCode::from(2);
            }
        };
        let (kind, addr) = match parse(attempt) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        };
        let (mut ok, mut eperm, mut error) = (0u64, 0u64, 0u64);
        for _ in 0..n {
            match classify(&try_once(kind, addr)).0 {
                "ok" => ok += 1,
                "eperm" => eperm += 1,
                _ => error += 1,
            }
        }
        let line = serde_json::json!({"attempts": n, "ok": ok, "eperm": eperm, "error": error});
        let _ = writeln!(out, "{line}");
        return ExitCode::SUCCESS;
    }
    if args.is_empty() {
        eprintln!("{usage}");
        return ExitCode::from(2);
    }
    // Validate everything first: a typo must not leave half the attempts done.
    let parsed: Result<Vec<_>, String> = args.iter().map(|a| parse(a)).collect();
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    for (attempt, (kind, addr)) in args.iter().zip(parsed) {
        let (outcome, errno) = classify(&try_once(kind, addr));
        let line = serde_json::json!({"attempt": attempt, "outcome": outcome, "errno": errno});
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    ExitCode::SUCCESS
}
