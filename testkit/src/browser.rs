//! A real browser for tests: Debian's `chromium`, headless, driven over the DevTools protocol
//! (a WebSocket to its page). Pages load, scripts run, and whatever the page reports as an
//! error (an exception, `console.error`, a failed request, a blocked resource) is collected.
//!
//! The binary is `$TALLY_CHROMIUM`, else `chromium` on the PATH (`scripts/services up`
//! installs it).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// A headless chromium with one page; killed when dropped.
pub struct Browser {
    child: Child,
    profile: PathBuf,
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// What the page reported as errors, one line each, since the last [`Browser::problems`].
    problems: Vec<String>,
}

impl Browser {
    /// Starts chromium with a fresh profile and attaches to its page.
    pub fn start() -> Result<Self, String> {
        let binary = std::env::var("TALLY_CHROMIUM").unwrap_or_else(|_| "chromium".to_owned());
        let profile = std::env::temp_dir().join(crate::unique("chromium-profile"));
        std::fs::create_dir_all(&profile).map_err(|e| e.to_string())?;
        let child = Command::new(&binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {binary} (scripts/services up installs it): {e}"))?;
        let port = wait_port(&profile.join("DevToolsActivePort"))?;
        let until = Instant::now() + Duration::from_secs(30);
        let page = loop {
            let list = devtools_json(port, "/json/list");
            let page = list.as_ref().and_then(|l| {
                l.as_array()?.iter().find(|t| t["type"] == "page")?["webSocketDebuggerUrl"]
                    .as_str()
                    .map(str::to_owned)
            });
            match page {
                Some(url) => break url,
                None if Instant::now() < until => std::thread::sleep(Duration::from_millis(100)),
                None => return Err(format!("no page target: {list:?}")),
            }
        };
        let (mut socket, _) = tungstenite::connect(page.as_str()).map_err(|e| e.to_string())?;
        if let MaybeTlsStream::Plain(stream) = socket.get_mut() {
            stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .map_err(|e| e.to_string())?;
        }
        let mut browser = Self {
            child,
            profile,
            socket,
            next_id: 0,
            problems: Vec::new(),
        };
        for domain in [
            "Page.enable",
            "Runtime.enable",
            "Log.enable",
            "Network.enable",
        ] {
            browser.call(domain, json!({}))?;
        }
        Ok(browser)
    }

    /// Sends a DevTools command and waits for its result (collecting events meanwhile).
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket
            .send(Message::text(message))
            .map_err(|e| e.to_string())?;
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            let Some(message) = self.receive()? else {
                continue;
            };
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    return Err(format!("{method}: {error}"));
                }
                return Ok(message["result"].clone());
            }
        }
        Err(format!("{method}: no answer within 60 s"))
    }

    /// One message, if one came within the socket's timeout; events are looked at here.
    fn receive(&mut self) -> Result<Option<Value>, String> {
        match self.socket.read() {
            Ok(Message::Text(text)) => {
                let message: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                self.note(&message);
                Ok(Some(message))
            }
            Ok(_) => Ok(None),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(format!("the browser's socket: {e}")),
        }
    }

    /// Keeps what a page reports as an error.
    fn note(&mut self, message: &Value) {
        let params = &message["params"];
        let problem = match message["method"].as_str() {
            Some("Runtime.exceptionThrown") => Some(format!(
                "exception: {}",
                params["exceptionDetails"]["exception"]["description"]
                    .as_str()
                    .or(params["exceptionDetails"]["text"].as_str())
                    .unwrap_or_default()
            )),
            Some("Runtime.consoleAPICalled") if params["type"] == "error" => Some(format!(
                "console.error: {}",
                params["args"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .map(|v| v["value"].to_string())
                        .collect::<Vec<_>>()
                        .join(" "))
                    .unwrap_or_default()
            )),
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => Some(format!(
                "log: {} {}",
                params["entry"]["text"].as_str().unwrap_or_default(),
                params["entry"]["url"].as_str().unwrap_or_default()
            )),
            Some("Network.loadingFailed") if params["canceled"] != true => Some(format!(
                "request failed: {}",
                params["errorText"].as_str().unwrap_or_default()
            )),
            _ => None,
        };
        self.problems.extend(problem);
    }

    /// Loads `url` in the page and waits until the new document has loaded.
    pub fn navigate(&mut self, url: &str) -> Result<(), String> {
        self.mark_document()?;
        let result = self.call("Page.navigate", json!({ "url": url }))?;
        if let Some(error) = result["errorText"].as_str().filter(|e| !e.is_empty()) {
            return Err(format!("{url}: {error}"));
        }
        self.wait_new_document()
    }

    /// Evaluates `expression`, which leaves the page (a form submitted, a link followed), and
    /// waits until the next document has loaded.
    pub fn leave_by(&mut self, expression: &str) -> Result<(), String> {
        self.mark_document()?;
        self.eval(expression)?;
        self.wait_new_document()
    }

    /// The current document carries a mark; the next one, once loaded, does not.
    fn mark_document(&mut self) -> Result<(), String> {
        self.eval("window.__tallyOld = true").map(drop)
    }

    fn wait_new_document(&mut self) -> Result<(), String> {
        self.wait_for(
            "!window.__tallyOld && document.readyState === 'complete'",
            &json!(true),
            Duration::from_secs(30),
        )
    }

    /// Evaluates `expression` in the page (awaiting a promise): its value.
    pub fn eval(&mut self, expression: &str) -> Result<Value, String> {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(details) = result.get("exceptionDetails") {
            return Err(format!("{expression}: {details}"));
        }
        Ok(result["result"]["value"].clone())
    }

    /// Evaluates `expression` until it equals `expected`, for at most `within`.
    pub fn wait_for(
        &mut self,
        expression: &str,
        expected: &Value,
        within: Duration,
    ) -> Result<(), String> {
        let until = Instant::now() + within;
        let mut last = Value::Null;
        while Instant::now() < until {
            if let Ok(value) = self.eval(expression) {
                if &value == expected {
                    return Ok(());
                }
                last = value;
            }
            // Let events in while waiting.
            let _ = self.receive()?;
        }
        Err(format!(
            "{expression} is {last}, not {expected}, after {within:?}"
        ))
    }

    /// Saves a PNG of the page as it shows now.
    pub fn screenshot(&mut self, path: &Path) -> Result<(), String> {
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        )?;
        let png = base64_decode(shot["data"].as_str().unwrap_or_default())
            .ok_or("the screenshot is not base64")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        std::fs::write(path, png).map_err(|e| e.to_string())
    }

    /// The errors the page reported since the last call.
    pub fn problems(&mut self) -> Vec<String> {
        while let Ok(Some(_)) = self.receive() {}
        std::mem::take(&mut self.problems)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// `GET path` from the DevTools HTTP server (which keeps the connection open: the body is
/// read by its length).
fn devtools_json(port: u16, path: &str) -> Option<Value> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .ok()?;
    let mut reader = BufReader::new(stream);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

/// The DevTools port chromium writes into its profile once it listens.
fn wait_port(file: &Path) -> Result<u16, String> {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if let Some(port) = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse().ok())
        {
            return Ok(port);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("chromium wrote no {} within 30 s", file.display()))
}

/// Standard base64 (with padding), as DevTools sends binary data.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for quad in bytes.chunks(4) {
        let digits: Vec<u32> = quad
            .iter()
            .take_while(|&&c| c != b'=')
            .map(|&c| value(c))
            .collect::<Option<_>>()?;
        let n = digits.iter().fold(0u32, |n, d| n << 6 | d) << (6 * (4 - digits.len()));
        let produced = digits.len().saturating_sub(1);
        out.extend_from_slice(&n.to_be_bytes()[1..1 + produced]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes() {
        assert_eq!(super::base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(super::base64_decode("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(super::base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(super::base64_decode("a").unwrap(), b"");
    }
}
