//! A Server-Sent Events client for tests: `GET` a stream from `127.0.0.1:port` and take its
//! events one by one, each within a deadline. A thread of its own reads the socket (and
//! decodes a chunked body), so a deadline never cuts an event in half.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::Duration;

/// One event: its `id:` (if any), `event:` (default `message`) and `data:` lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event id.
    pub id: Option<String>,
    /// The event type.
    pub event: String,
    /// The data.
    pub data: String,
}

/// An open stream; closed when dropped.
pub struct Sse {
    /// The response status.
    pub status: u16,
    events: mpsc::Receiver<SseEvent>,
    socket: TcpStream,
}

/// What [`Sse::next`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// An event.
    Event(SseEvent),
    /// Nothing within the deadline.
    Quiet,
    /// The stream ended.
    Ended,
}

impl Sse {
    /// Opens `GET path` with extra `headers`. With a status other than 200 there are no
    /// events (only the status is kept).
    pub fn open(port: u16, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Self> {
        let mut socket = TcpStream::connect(("127.0.0.1", port))?;
        let extra: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        write!(
            socket,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n{extra}\r\n"
        )?;
        let mut reader = BufReader::new(socket.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut chunked = false;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
            chunked |=
                line.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked\r\n";
        }
        let (sender, events) = mpsc::channel();
        if status == 200 {
            std::thread::spawn(move || read_events(reader, chunked, &sender));
        }
        Ok(Self {
            status,
            events,
            socket,
        })
    }

    /// The next event, waiting at most `within`.
    pub fn next(&mut self, within: Duration) -> Next {
        match self.events.recv_timeout(within) {
            Ok(event) => Next::Event(event),
            Err(mpsc::RecvTimeoutError::Timeout) => Next::Quiet,
            Err(mpsc::RecvTimeoutError::Disconnected) => Next::Ended,
        }
    }
}

impl Drop for Sse {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// Reads the body, decoding chunks, and sends each complete event.
fn read_events(mut reader: BufReader<TcpStream>, chunked: bool, out: &mpsc::Sender<SseEvent>) {
    let mut text = String::new();
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        if chunked {
            let mut size = String::new();
            if reader.read_line(&mut size).unwrap_or(0) == 0 {
                return;
            }
            let Ok(size) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            else {
                return;
            };
            if size == 0 {
                return;
            }
            bytes.resize(size + 2, 0);
            if reader.read_exact(&mut bytes).is_err() {
                return;
            }
            bytes.truncate(size);
        } else {
            bytes.resize(64 * 1024, 0);
            match reader.read(&mut bytes) {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.truncate(n),
            }
        }
        text.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            if let Some(event) = parse(&block) {
                if out.send(event).is_err() {
                    return;
                }
            }
        }
    }
}

/// An event block; `None` for comments and `retry:` alone.
fn parse(block: &str) -> Option<SseEvent> {
    let (mut id, mut event, mut data) = (None, None, Vec::new());
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_owned()),
            "event" => event = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() && event.is_none() {
        return None;
    }
    Some(SseEvent {
        id,
        event: event.unwrap_or_else(|| "message".to_owned()),
        data: data.join("\n"),
    })
}
