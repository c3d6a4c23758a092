//! `pai-serve serve`: a real socket, a real HTTP exchange, and a graceful stop on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use crate::{text, tiny_model, SERVE};

/// One HTTP/1.1 request on a fresh connection; the status line and the body.
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[test]
fn serve_answers_over_http_and_stops_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mut child = Command::new(SERVE)
        .args(["serve", "--port", "0", "--model", model.to_str().unwrap()])
        .env("PAI_HOME", dir.path().join("home"))
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    let addr = loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "exited early: {said}"
        );
        said.push_str(&line);
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    assert!(said.contains("adapters: none yet"), "{said}");
    assert!(
        addr.starts_with("127.0.0.1:"),
        "loopback by default: {addr}"
    );
    let (status, body) = http(&addr, "GET", "/v1/models", "");
    assert!(status.contains("200"), "{status} {body}");
    let models: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = models["data"][0]["id"].as_str().unwrap().to_string();
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/completions",
        &format!(r#"{{"model": "{id}", "prompt": "Once", "max_tokens": 4, "temperature": 0}}"#),
    );
    assert!(status.contains("200"), "{status} {body}");
    let done: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(done["usage"]["completion_tokens"], 4, "{done}");
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/completions",
        r#"{"model": "nobody", "prompt": "x"}"#,
    );
    assert!(
        status.contains("404") && body.contains("model_not_found"),
        "{status} {body}"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{rest}");
    assert!(rest.contains("shutting down"), "{}", text(rest.as_bytes()));
}
