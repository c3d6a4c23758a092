//! A graceful stop drains: the streams in flight when the stop comes, and the requests still waiting
//! for a place in the batch, are answered in full; no new connection is taken; the server returns
//! once they are done.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::server;

/// Send a streaming completion on a fresh connection; the connection, to read from.
async fn start_stream(addr: std::net::SocketAddr, max_tokens: usize) -> TcpStream {
    let body = format!(
        r#"{{"model": "base", "prompt": "Once", "max_tokens": {max_tokens}, "temperature": 0, "stream": true, "stream_options": {{"include_usage": true}}}}"#
    );
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    s
}

/// Read until `needle` has arrived; everything read.
async fn read_until(s: &mut TcpStream, seen: &mut String, needle: &str) {
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before {needle:?}: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_answers_every_request_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (mut state, _registry) = server(dir.path());
    // One place in the batch, so the second stream is still queued when the stop comes.
    Arc::get_mut(&mut state).unwrap().max_batch = 1;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(pai_serve::serve(listener, state, async move {
        let _ = stopped.await;
    }));

    let mut first = start_stream(addr, 200).await;
    let mut seen_first = String::new();
    read_until(&mut first, &mut seen_first, "\"text\"").await;
    let mut second = start_stream(addr, 20).await;
    // Let the second request reach the queue before the stop.
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.send(()).unwrap();

    let mut seen_second = String::new();
    read_until(&mut first, &mut seen_first, "data: [DONE]").await;
    read_until(&mut second, &mut seen_second, "data: [DONE]").await;
    for (seen, max) in [(&seen_first, 200), (&seen_second, 20)] {
        assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
        let usage = seen
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .find_map(|v| v["usage"]["completion_tokens"].as_u64())
            .unwrap_or_else(|| panic!("no usage: {seen}"));
        assert!(usage > 0 && usage <= max, "{usage} tokens: {seen}");
        assert!(!seen.contains("\"error\""), "{seen}");
    }
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the server returns once drained")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no new connections after the stop"
    );
}
