//! An API-version adapter between testcontainers and an older Docker engine.
//!
//! testcontainers 0.27 (bollard 0.20) prefixes every request with Docker API version 1.52 and
//! does not negotiate. An engine refuses a version newer than its own: Debian 12's docker.io
//! (20.10) speaks 1.41 and answers "client version 1.52 is too new". When the engine is older
//! than the client, [`adapt`] listens on a Unix socket of its own and forwards every request to
//! the engine's socket with the version in its path replaced by the engine's. Bodies and
//! responses pass through unchanged: the calls testcontainers makes here (create, start, inspect,
//! logs, stop, remove) mean the same in both versions. With an engine at least as new as the
//! client, nothing is started and the engine is used directly.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The API version bollard 0.20 sends.
const CLIENT_API: (u32, u32) = (1, 52);

/// The engine's `DOCKER_HOST` as this process found it, before [`adapt`] pointed
/// testcontainers elsewhere.
static ENGINE_HOST: OnceLock<Option<String>> = OnceLock::new();
/// What [`adapt`] decided, once per process.
static ADAPTED: OnceLock<Result<Option<String>, String>> = OnceLock::new();

fn engine_host() -> Option<String> {
    ENGINE_HOST
        .get_or_init(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
        .clone()
}

/// The docker CLI, talking to the engine itself (never to the adapter, which ends with this
/// process: the reaper runs after it).
pub fn docker() -> Command {
    let mut cmd = Command::new("docker");
    to_engine(&mut cmd);
    cmd
}

/// Points `cmd`'s docker calls at the engine itself (see [`docker`]).
pub fn to_engine(cmd: &mut Command) -> &mut Command {
    match engine_host() {
        Some(host) => cmd.env("DOCKER_HOST", host),
        None => cmd.env_remove("DOCKER_HOST"),
    }
}

/// The `DOCKER_HOST` testcontainers should use: `None` to use the engine as it is, or a socket
/// of an adapter started here (served by background threads for the life of the process).
/// Decided once per process.
pub fn adapt() -> Result<Option<String>, String> {
    ADAPTED.get_or_init(start_adapter).clone()
}

fn start_adapter() -> Result<Option<String>, String> {
    let Some(server) = server_api_version() else {
        return Ok(None);
    };
    if server >= CLIENT_API {
        return Ok(None);
    }
    let engine = engine_socket()?;
    let dir = std::env::temp_dir().join(format!("tally-testkit-docker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let socket = dir.join("docker.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    let from = format!("/v{}.{}/", CLIENT_API.0, CLIENT_API.1);
    let to = format!("/v{}.{}/", server.0, server.1);
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let (engine, from, to) = (engine.clone(), from.clone(), to.clone());
            std::thread::spawn(move || {
                let _ = forward(client, &engine, &from, &to);
            });
        }
    });
    Ok(Some(format!("unix://{}", socket.display())))
}

/// The engine's highest API version, from `docker version`.
fn server_api_version() -> Option<(u32, u32)> {
    let out = docker()
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .output()
        .ok()?;
    parse_version(String::from_utf8_lossy(&out.stdout).trim())
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The engine's Unix socket: `DOCKER_HOST` if it names one, else the default.
fn engine_socket() -> Result<PathBuf, String> {
    match engine_host() {
        Some(host) => host
            .strip_prefix("unix://")
            .map(PathBuf::from)
            .ok_or_else(|| format!("DOCKER_HOST={host}: only a unix:// engine can be adapted")),
        None => Ok(PathBuf::from("/var/run/docker.sock")),
    }
}

/// One client connection: requests rewritten one by one (keep-alive), responses copied back.
fn forward(client: UnixStream, engine: &Path, from: &str, to: &str) -> std::io::Result<()> {
    let upstream = UnixStream::connect(engine)?;
    let mut back_from = upstream.try_clone()?;
    let mut back_to = client.try_clone()?;
    let responses = std::thread::spawn(move || {
        let _ = std::io::copy(&mut back_from, &mut back_to);
        let _ = back_to.shutdown(std::net::Shutdown::Write);
    });
    let mut requests = BufReader::new(client);
    let mut out = upstream.try_clone()?;
    while let Some(head) = read_head(&mut requests)? {
        let head = rewrite(&head, from, to);
        out.write_all(head.as_bytes())?;
        let upgrade = header(&head, "upgrade").is_some();
        if upgrade {
            // A hijacked stream (attach, exec): raw bytes from here on.
            std::io::copy(&mut requests, &mut out)?;
            break;
        }
        if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            copy_chunked(&mut requests, &mut out)?;
        } else if let Some(length) = header(&head, "content-length") {
            let length: u64 = length.trim().parse().unwrap_or(0);
            std::io::copy(&mut (&mut requests).take(length), &mut out)?;
        }
    }
    let _ = upstream.shutdown(std::net::Shutdown::Write);
    let _ = responses.join();
    Ok(())
}

/// A request's line and headers up to the blank line; `None` at the end of the connection.
fn read_head(input: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        head.push_str(&line);
        if line == "\r\n" || line == "\n" {
            return Ok(Some(head));
        }
    }
}

/// The request line's path with the client's API version replaced by the engine's.
fn rewrite(head: &str, from: &str, to: &str) -> String {
    let (line, rest) = head.split_once('\n').unwrap_or((head, ""));
    let mut parts = line.splitn(3, ' ');
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return head.to_owned();
    };
    let path = match path.strip_prefix(from) {
        Some(tail) => format!("{to}{tail}"),
        None => path.to_owned(),
    };
    format!("{method} {path} {version}\n{rest}")
}

/// The value of header `name` (lower case), if the head has it.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

/// A chunked body, chunk by chunk, through the last (empty) chunk and its trailer.
fn copy_chunked(input: &mut impl BufRead, out: &mut impl Write) -> std::io::Result<()> {
    loop {
        let mut size_line = String::new();
        if input.read_line(&mut size_line)? == 0 {
            return Ok(());
        }
        out.write_all(size_line.as_bytes())?;
        let size =
            u64::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        if size == 0 {
            // Trailer lines up to the blank one.
            loop {
                let mut line = String::new();
                if input.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                    out.write_all(line.as_bytes())?;
                    return Ok(());
                }
                out.write_all(line.as_bytes())?;
            }
        }
        // The chunk and its CRLF.
        std::io::copy(&mut input.take(size + 2), out)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_the_version_of_the_path_only() {
        let head = "POST /v1.52/containers/create?name=x HTTP/1.1\r\nHost: docker\r\n\r\n";
        assert_eq!(
            rewrite(head, "/v1.52/", "/v1.41/"),
            "POST /v1.41/containers/create?name=x HTTP/1.1\r\nHost: docker\r\n\r\n"
        );
        let ping = "GET /_ping HTTP/1.1\r\n\r\n";
        assert_eq!(rewrite(ping, "/v1.52/", "/v1.41/"), ping);
    }

    #[test]
    fn finds_headers_case_insensitively() {
        let head = "POST /x HTTP/1.1\r\nContent-Length: 12\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(header(head, "content-length"), Some("12"));
        assert_eq!(header(head, "transfer-encoding"), Some("chunked"));
        assert_eq!(header(head, "upgrade"), None);
    }

    #[test]
    fn copies_a_chunked_body_exactly() {
        let body = b"4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\nNEXT";
        let mut input = BufReader::new(&body[..]);
        let mut out = Vec::new();
        copy_chunked(&mut input, &mut out).unwrap();
        assert_eq!(out, &body[..body.len() - 4]);
        let mut rest = String::new();
        input.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "NEXT");
    }

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("1.41"), Some((1, 41)));
        assert_eq!(parse_version("x"), None);
        assert!((1, 41) < CLIENT_API);
    }
}
