//! Change streams as connections of the api's server: a stream is a request in flight for as
//! long as it lasts, so a short idle timeout does not end a quiet one and a full server does
//! not close it for room; streams take at most half the connections.

use std::time::{Duration, Instant};

use tally_testkit::pipeline::sse::{Next, Sse};

use super::changes::{event, next, open, totals, write};
use super::{http_get_with, start_api_with, Pipeline};

/// A quiet stream outlives a server idle timeout shorter than its keep-alive: a stream is a
/// request in flight while it lasts, not an idle connection; a change after the quiet arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_stream_outlives_a_short_idle_timeout() {
    let mut p = Pipeline::new("changes-quiet").await;
    let (_api, port) = start_api_with(&mut p, &["--idle-timeout-ms", "1500"]).await;
    let mut sse = open(port, None, "").await;
    assert_eq!(sse.status, 200);
    stays_quiet(&mut sse, Duration::from_secs(6)).await;
    write(&p.pool, &[(5, 6)], Duration::ZERO, true).await;
    let sent = event(next(&mut sse, Duration::from_secs(10)).await);
    assert_eq!(totals(&sent), vec![(5, 6)]);
}

/// At the connection limit a new connection closes an idle one, never a stream: a stream is a
/// request in flight while it lasts, however long it has been quiet. Streams take at most
/// half the connections, so that they cannot take them all.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_server_closes_idle_connections_not_streams() {
    use std::io::{Read, Write};
    let mut p = Pipeline::new("changes-evict").await;
    let (_api, port) = start_api_with(&mut p, &["--max-connections", "3"]).await;
    // Let the readiness check's connection go before the stream takes its slot.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sse = open(port, None, "").await;
    assert_eq!(sse.status, 200);
    // Streams take at most half the connections (here one): a second is refused.
    assert_eq!(open(port, None, "").await.status, 503);
    // Two keep-alive connections that completed a request: the server is full.
    let keep_alive = |_| {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(c, "GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut head = [0u8; 256];
        let n = c.read(&mut head).unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 200"));
        c
    };
    let _idle: Vec<_> = (0..2).map(keep_alive).collect();
    // More connections, each answered, each closing an idle one.
    for _ in 0..3 {
        let answered = tokio::task::spawn_blocking(move || http_get_with(port, "/livez", &[]))
            .await
            .unwrap();
        assert_eq!(answered.map(|(status, _)| status), Some(200));
    }
    // A closed connection's response may finish for 10 s: the stream must outlast that.
    stays_quiet(&mut sse, Duration::from_secs(11)).await;
    write(&p.pool, &[(8, 9)], Duration::ZERO, true).await;
    let sent = event(next(&mut sse, Duration::from_secs(10)).await);
    assert_eq!(totals(&sent), vec![(8, 9)]);
}

/// The stream stays open and sends nothing for `time`.
async fn stays_quiet(sse: &mut Sse, time: Duration) {
    let until = Instant::now() + time;
    while Instant::now() < until {
        match next(sse, Duration::from_millis(500)).await {
            Next::Quiet => {}
            other => panic!("a quiet stream gave {other:?}"),
        }
    }
}
