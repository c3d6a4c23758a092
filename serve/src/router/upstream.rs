//! Talking to one cloud deployment: a request sent whole or streamed, what counts as a failure worth
//! a retry or a fallback (connection errors, timeouts, 429, 5xx, a stream that ends before its first
//! token), Retry-After, backoff with full jitter, and the circuit breaker that keeps a failing
//! deployment out for a cooldown and then lets one probe request through.

use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::config::TierConfig;

/// The rest of a streamed answer after what was read to see its first token.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

/// What a deployment answered.
pub enum Answer {
    Whole(Bytes),
    /// The events read up to and including the first token, and the rest of the stream.
    Stream {
        head: Vec<Bytes>,
        rest: ByteStream,
    },
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The connection failed (`sent`: false when it was never made, so nothing left) or broke.
    Connect {
        message: String,
        sent: bool,
    },
    Timeout,
    Status {
        code: u16,
        retry_after: Option<Duration>,
        body: String,
    },
    /// The stream ended or broke before its first token.
    Stream(String),
    /// A success status whose body is not a chat completion.
    BadAnswer(String),
}

impl Failure {
    /// Worth another attempt or the next deployment (a 4xx other than 429 is the request's fault,
    /// and goes back to the client as it came).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Status { code, .. } => *code == 429 || *code >= 500,
            _ => true,
        }
    }

    /// A short label for /metrics and the ledger.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Timeout => "timeout",
            Self::Status { code: 429, .. } => "429",
            Self::Status { code, .. } if *code >= 500 => "5xx",
            Self::Status { .. } => "4xx",
            Self::Stream(_) => "stream",
            Self::BadAnswer(_) => "bad_answer",
        }
    }

    /// Whether bytes may have reached the deployment (a refused connection sent nothing).
    pub fn sent(&self) -> bool {
        !matches!(self, Self::Connect { sent: false, .. })
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect { message, .. } => write!(f, "connection failed: {message}"),
            Self::Timeout => f.write_str("timed out"),
            Self::Status {
                code,
                retry_after,
                body,
            } => {
                write!(f, "HTTP {code}")?;
                if let Some(r) = retry_after {
                    write!(f, " (Retry-After {} s)", r.as_secs())?;
                }
                let body: String = body.chars().take(200).collect();
                if !body.is_empty() {
                    write!(f, ": {body}")?;
                }
                Ok(())
            }
            Self::Stream(m) => write!(f, "stream ended before its first token: {m}"),
            Self::BadAnswer(m) => write!(f, "answered 200 with no chat completion: {m}"),
        }
    }
}

/// The breaker's state for one deployment.
#[derive(Debug, Default)]
struct Breaker {
    failures_in_a_row: u32,
    /// Closed until then (None: closed).
    open_until: Option<Instant>,
    /// A probe request is out (after the cooldown, one at a time).
    probing: bool,
}

/// One deployment and its breaker.
pub struct Deployment {
    pub config: TierConfig,
    breaker: Mutex<Breaker>,
}

impl Deployment {
    pub fn new(config: TierConfig) -> Self {
        Self {
            config,
            breaker: Mutex::new(Breaker::default()),
        }
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        match self.breaker.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The breaker's state now: `closed`, `open` (with the seconds left), or `half-open` (the
    /// cooldown is over; the next request probes it).
    pub fn state(&self, now: Instant) -> (&'static str, f64) {
        let b = self.breaker();
        match b.open_until {
            None => ("closed", 0.0),
            Some(t) if now < t => ("open", (t - now).as_secs_f64()),
            Some(_) => ("half-open", 0.0),
        }
    }

    /// Take the deployment for a request: false while its breaker is open; after the cooldown one
    /// request (the probe) is let through at a time.
    pub fn admit(&self, now: Instant) -> bool {
        let mut b = self.breaker();
        match b.open_until {
            None => true,
            Some(t) if now < t => false,
            Some(_) if b.probing => false,
            Some(_) => {
                b.probing = true;
                true
            }
        }
    }

    pub fn succeeded(&self) {
        *self.breaker() = Breaker::default();
    }

    /// A failed request: the breaker opens after `threshold` in a row (at once for a failed probe),
    /// for `cooldown`, or until `until` when the deployment said when to come back.
    pub fn failed(&self, threshold: u32, cooldown: Duration, until: Option<Instant>) {
        let mut b = self.breaker();
        b.failures_in_a_row += 1;
        let now = Instant::now();
        if b.probing || b.failures_in_a_row >= threshold || until.is_some() {
            let open = until.unwrap_or(now + cooldown);
            b.open_until = Some(open);
            tracing::warn!(deployment = %self.config.name, cooldown_s = open.saturating_duration_since(now).as_secs_f64(), "circuit breaker open");
        }
        b.probing = false;
    }

    /// One attempt: POST `body` to `{base_url}/chat/completions`. A stream is read until its first
    /// token (or its end) within the timeout; the rest is handed back unread.
    pub async fn send(
        &self,
        client: &reqwest::Client,
        body: Bytes,
        stream: bool,
    ) -> Result<Answer, Failure> {
        let c = &self.config;
        let url = format!("{}/chat/completions", c.base_url.trim_end_matches('/'));
        let mut req = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = c.api_key_env.as_deref().and_then(|v| std::env::var(v).ok()) {
            req = req.bearer_auth(key);
        }
        let timeout = Duration::from_secs(c.timeout_s);
        let work = async move {
            let resp = req.send().await.map_err(request_failure)?;
            let status = resp.status();
            if !status.is_success() {
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let body = resp.text().await.unwrap_or_default();
                return Err(Failure::Status {
                    code: status.as_u16(),
                    retry_after,
                    body,
                });
            }
            if !stream {
                let bytes = resp.bytes().await.map_err(request_failure)?;
                let is_completion = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .is_ok_and(|v| v.get("choices").is_some_and(|c| c.is_array()));
                if !is_completion {
                    let start: String = String::from_utf8_lossy(&bytes).chars().take(120).collect();
                    return Err(Failure::BadAnswer(start));
                }
                return Ok(Answer::Whole(bytes));
            }
            let mut rest: ByteStream = Box::pin(resp.bytes_stream());
            let mut head = Vec::new();
            let mut seen = SseWatch::default();
            while !seen.first_token {
                match rest.next().await {
                    Some(Ok(chunk)) => {
                        seen.feed(&chunk);
                        head.push(chunk);
                    }
                    Some(Err(e)) => return Err(Failure::Stream(e.to_string())),
                    None => return Err(Failure::Stream("the connection closed".into())),
                }
            }
            Ok(Answer::Stream { head, rest })
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        }
    }
}

fn request_failure(e: reqwest::Error) -> Failure {
    if e.is_timeout() {
        return Failure::Timeout;
    }
    // The innermost cause says what happened (refused, reset, DNS).
    let mut cause: &dyn std::error::Error = &e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    Failure::Connect {
        message: cause.to_string(),
        sent: !e.is_connect(),
    }
}

/// How long to wait before retry `attempt` (1 for the first retry): the deployment's Retry-After when
/// it gave one, else exponential backoff with full jitter.
pub fn backoff(attempt: u32, base_ms: u64, max_ms: u64, retry_after: Option<Duration>) -> Duration {
    if let Some(r) = retry_after {
        return r;
    }
    let ceiling = base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
        .min(max_ms);
    let jittered = rand::random_range(0..=ceiling);
    Duration::from_millis(jittered.max(base_ms.min(ceiling) / 4))
}

/// Reads a chat completion stream's server-sent events as they pass: whether a token has come, the
/// text so far, the usage when the stream reports it, and whether it ended with `[DONE]`.
#[derive(Debug, Default)]
pub struct SseWatch {
    pending: String,
    pub first_token: bool,
    pub text: String,
    pub usage: Option<(u64, u64)>,
    pub done: bool,
}

impl SseWatch {
    pub fn feed(&mut self, chunk: &[u8]) {
        self.pending.push_str(&String::from_utf8_lossy(chunk));
        while let Some(end) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=end).collect();
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                self.done = true;
                self.first_token = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                self.usage = Some((
                    u["prompt_tokens"].as_u64().unwrap_or(0),
                    u["completion_tokens"].as_u64().unwrap_or(0),
                ));
            }
            let choice = &v["choices"][0];
            if let Some(t) = choice["delta"]["content"].as_str() {
                self.text.push_str(t);
                self.first_token |= !t.is_empty();
            }
            // An empty answer still ends: its finish reason counts as its first token.
            self.first_token |= choice["finish_reason"].is_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Deployment {
        Deployment::new(TierConfig {
            name: "d".into(),
            level: 2,
            base_url: "http://127.0.0.1:1/v1".into(),
            model: "m".into(),
            api_key_env: None,
            timeout_s: 1,
            price_input_per_m: 0.0,
            price_output_per_m: 0.0,
        })
    }

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_and_lets_one_probe_through() {
        let d = deployment();
        let cooldown = Duration::from_millis(50);
        d.failed(2, cooldown, None);
        assert!(d.admit(Instant::now()), "one failure: still closed");
        d.failed(2, cooldown, None);
        assert!(!d.admit(Instant::now()), "two in a row: open");
        std::thread::sleep(cooldown);
        assert!(d.admit(Instant::now()), "after the cooldown: a probe");
        assert!(!d.admit(Instant::now()), "one probe at a time");
        d.failed(2, cooldown, None);
        assert!(!d.admit(Instant::now()), "a failed probe opens it again");
        std::thread::sleep(cooldown);
        assert!(d.admit(Instant::now()));
        d.succeeded();
        assert!(d.admit(Instant::now()) && d.admit(Instant::now()), "closed");
    }

    #[test]
    fn backoff_grows_with_jitter_under_its_cap_and_retry_after_wins() {
        for attempt in 1..8 {
            let ceiling = (100u64 << (attempt - 1)).min(1000);
            let d = backoff(attempt, 100, 1000, None).as_millis() as u64;
            assert!(d <= ceiling, "{attempt}: {d} > {ceiling}");
        }
        assert_eq!(
            backoff(1, 100, 1000, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn the_watch_sees_the_first_token_across_chunk_boundaries() {
        let mut w = SseWatch::default();
        w.feed(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n");
        assert!(!w.first_token, "a role-only chunk is no token");
        w.feed(b"data: {\"choices\":[{\"delta\":{\"cont");
        assert!(!w.first_token);
        w.feed(b"ent\":\"Hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n");
        assert!(w.first_token && w.done);
        assert_eq!(w.text, "Hi");
        assert_eq!(w.usage, Some((7, 1)));
    }
}
