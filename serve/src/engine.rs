//! Continuous batching. One engine thread owns the model's compute. Requests wait in a bounded queue
//! (a full queue answers 503 at once), one line per client: the engine admits them round-robin over
//! the clients that are waiting (so one client's backlog never starves another's request) while the
//! batch has room. Each step then advances every decoding sequence by one token in one batched forward
//! pass (`Model::decode_batch`), requests for different adapters in the same step, and runs one chunk
//! of the oldest admitted prompt still prefilling, so a long prompt arriving never stalls the streams
//! already running for more than a chunk's time. A sequence's text goes back to its request as soon as
//! it is final; one that finishes leaves the batch, and its place goes to the next waiting request at
//! the next step. A client that goes away (its stream closed, or its response future dropped) frees
//! its slot at the next step.
//!
//! The thread holds the server state only while it has work, so the state (and with it the engine)
//! can drop, and then the thread ends.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Instant;

use axum::http::StatusCode;
use pai_model::{AdapterStack, BatchRow, GenerateOptions, Generation, Sequence, TokenLogprob};

use crate::error::ApiError;
use crate::metrics::{AdapterLabel, Gauge};
use crate::state::{LoadedAdapter, ServeState};

/// Receives each piece of text as soon as it is final, with the log-probabilities of its tokens (when
/// asked for); `Break` cancels the generation.
pub type OnText = Box<dyn FnMut(&str, &[TokenLogprob]) -> ControlFlow<()> + Send>;

/// A generation the engine is asked for.
pub struct Request {
    /// Who asks: requests are admitted round-robin over the clients waiting.
    pub client: String,
    pub adapter: Option<Arc<LoadedAdapter>>,
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    pub on_text: OnText,
    pub done: tokio::sync::oneshot::Sender<Result<Generation, ApiError>>,
    pub arrived: Instant,
    pub label: AdapterLabel,
}

/// The requests waiting for a place in the batch: a line per client, the clients in turn.
#[derive(Default)]
struct Waiting {
    clients: VecDeque<(String, VecDeque<Request>)>,
    len: usize,
    /// The engine was dropped: the thread ends once nothing is waiting.
    closed: bool,
}

impl Waiting {
    fn push(&mut self, request: Request) {
        self.len += 1;
        match self.clients.iter_mut().find(|(c, _)| *c == request.client) {
            Some((_, line)) => line.push_back(request),
            None => self
                .clients
                .push_back((request.client.clone(), VecDeque::from([request]))),
        }
    }

    /// The first request of the client whose turn it is; that client goes to the back of the turn.
    fn pop(&mut self) -> Option<Request> {
        let (client, mut line) = self.clients.pop_front()?;
        let request = line.pop_front();
        if !line.is_empty() {
            self.clients.push_back((client, line));
        }
        self.len -= usize::from(request.is_some());
        request
    }
}

struct Queue {
    waiting: Mutex<Waiting>,
    arrived: Condvar,
    capacity: usize,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The queue into the engine thread.
pub struct Engine {
    queue: Arc<Queue>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.arrived.notify_all();
    }
}

impl Engine {
    /// Start the engine thread for `state` with room for `capacity` waiting requests.
    pub fn start(state: Weak<ServeState>, capacity: usize) -> std::io::Result<Self> {
        let queue = Arc::new(Queue {
            waiting: Mutex::new(Waiting::default()),
            arrived: Condvar::new(),
            capacity: capacity.max(1),
        });
        let for_thread = queue.clone();
        std::thread::Builder::new()
            .name("pai-engine".into())
            .spawn(move || serve(state, &for_thread))?;
        Ok(Self { queue })
    }

    /// Queue a request; a full queue is refused at once (503), never waited on.
    pub fn submit(&self, state: &ServeState, request: Request) -> Result<(), ApiError> {
        let mut waiting = self.queue.lock();
        if waiting.len >= self.queue.capacity {
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the server is busy: every queue slot is taken; retry".into(),
                kind: "server_error",
                param: None,
                code: "server_busy",
            });
        }
        waiting.push(request);
        state.metrics.queue_changed(1);
        drop(waiting);
        self.queue.arrived.notify_one();
        Ok(())
    }
}

/// The next request whose turn it is, or `None` when nothing waits.
fn next_waiting(s: &ServeState, queue: &Queue) -> Option<Request> {
    let request = queue.lock().pop()?;
    s.metrics.queue_changed(-1);
    Some(request)
}

/// One sequence admitted: prefilling its prompt, then decoding.
struct Active<'s> {
    seq: Sequence<'s>,
    /// The token the next decode step runs (meaningful once prefilled).
    next: u32,
    on_text: OnText,
    done: tokio::sync::oneshot::Sender<Result<Generation, ApiError>>,
    arrived: Instant,
    label: AdapterLabel,
    first_text: bool,
    /// The request stopped listening (its stream closed).
    cancelled: bool,
    _running: Gauge<'s>,
}

/// The engine thread: wait for work, then run batches until none is left.
fn serve(state: Weak<ServeState>, queue: &Queue) {
    loop {
        {
            let mut waiting = queue.lock();
            while waiting.len == 0 {
                if waiting.closed {
                    return;
                }
                waiting = queue
                    .arrived
                    .wait(waiting)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
        let Some(s) = state.upgrade() else {
            return;
        };
        run_batches(&s, queue);
    }
}

/// Admit, prefill a chunk, step, repeat, until the batch and the queue are empty.
fn run_batches(s: &ServeState, queue: &Queue) {
    // Sequences still prefilling, oldest first, and the decoding ones; each with its adapter, kept
    // apart so that a step can borrow the adapters beside the caches.
    let mut prefilling: VecDeque<(Active, Option<Arc<LoadedAdapter>>)> = VecDeque::new();
    let mut active: Vec<Active> = Vec::new();
    let mut adapters: Vec<Option<Arc<LoadedAdapter>>> = Vec::new();
    loop {
        // 1. Admit waiting requests, round-robin over clients, while the batch has room.
        while active.len() + prefilling.len() < s.max_batch.max(1) {
            let Some(request) = next_waiting(s, queue) else {
                break;
            };
            if let Some(admitted) = admit(s, request) {
                prefilling.push_back(admitted);
            }
        }
        if active.is_empty() && prefilling.is_empty() {
            return;
        }

        // 2. The oldest prompt runs one chunk (the whole prompt when nothing else is decoding, so
        //    a lone request waits for nothing); a finished prompt samples its first token and joins
        //    the decoding sequences.
        if let Some((a, adapter)) = prefilling.front_mut() {
            let stack: Vec<&pai_model::Adapter> = adapter.iter().map(|l| &l.adapter).collect();
            let stack = AdapterStack::new(&stack);
            let logits = if active.is_empty() {
                a.seq.prefill(&s.base.model, &stack).map(Some)
            } else {
                a.seq.prefill_chunk(&s.base.model, &stack, s.prefill_chunk)
            };
            let outcome = logits
                .map_err(ApiError::from)
                .and_then(|logits| match logits {
                    Some(logits) => advance(s, a, &logits).map(Some),
                    None => Ok(None),
                });
            match outcome {
                Ok(None) => {}
                Ok(Some(true)) => {
                    let (a, adapter) = prefilling.pop_front().expect("the front is there");
                    active.push(a);
                    adapters.push(adapter);
                }
                Ok(Some(false)) | Err(_) => {
                    let (a, _) = prefilling.pop_front().expect("the front is there");
                    finish(s, a, outcome.err());
                }
            }
        }
        // A client gone while its prompt waits to prefill frees its place now.
        prefilling.retain(|(a, _)| !a.done.is_closed());
        if active.is_empty() {
            continue;
        }

        // 3. One token for every decoding sequence, in one batched pass.
        let stacks: Vec<Vec<&pai_model::Adapter>> = adapters
            .iter()
            .map(|a| a.iter().map(|l| &l.adapter).collect())
            .collect();
        let mut rows: Vec<BatchRow> = active
            .iter_mut()
            .zip(&stacks)
            .map(|(a, stack)| BatchRow {
                token: a.next,
                cache: a.seq.cache_mut(),
                adapters: AdapterStack::new(stack),
            })
            .collect();
        let logits = s.base.model.decode_batch(&mut rows);
        let groups = rows
            .iter()
            .enumerate()
            .filter(|(i, r)| !rows[..*i].iter().any(|o| o.adapters.same_as(&r.adapters)))
            .count();
        s.metrics.decode_step(rows.len(), groups);
        drop(rows);
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "batched decode step failed");
                for a in active.drain(..) {
                    let message = format!("the batched decode step failed: {e}");
                    let _ = a.done.send(Err(ApiError::internal(message)));
                }
                adapters.clear();
                continue;
            }
        };

        // 4. Each sequence takes its token (row `r` of the logits); the finished and the abandoned
        //    leave the batch.
        let mut i = 0;
        for r in 0..active.len() {
            let outcome = match logits.get(r) {
                Ok(row) => advance(s, &mut active[i], &row),
                Err(e) => Err(ApiError::internal(format!("logits row {r}: {e}"))),
            };
            match outcome {
                Ok(true) => i += 1,
                Ok(false) | Err(_) => {
                    let a = active.remove(i);
                    adapters.remove(i);
                    finish(s, a, outcome.err());
                }
            }
        }
    }
}

/// Check a request and set up its sequence; `None` when it is already answered (its client gone,
/// or a prompt that does not fit).
fn admit(s: &ServeState, request: Request) -> Option<(Active<'_>, Option<Arc<LoadedAdapter>>)> {
    let Request {
        adapter,
        prompt,
        opts,
        on_text,
        done,
        arrived,
        label,
        client: _,
    } = request;
    if done.is_closed() {
        return None;
    }
    match Sequence::new(&s.base.model, &s.base.tokenizer, &prompt, opts) {
        Ok(seq) => Some((
            Active {
                seq,
                next: 0,
                on_text,
                done,
                arrived,
                label,
                first_text: true,
                cancelled: false,
                _running: s.metrics.running(),
            },
            adapter,
        )),
        Err(e) => {
            let _ = done.send(Err(ApiError::from(e)));
            None
        }
    }
}

/// Sample the sequence's next token from `logits` and hand on its text: `true` while it goes on.
fn advance(s: &ServeState, a: &mut Active, logits: &pai_model::Tensor) -> Result<bool, ApiError> {
    if a.done.is_closed() {
        return Ok(false);
    }
    let step = a.seq.accept(logits).map_err(ApiError::from)?;
    if !step.text.is_empty() {
        if std::mem::take(&mut a.first_text) {
            s.metrics.first_token(&a.label, a.arrived.elapsed());
        }
        if (a.on_text)(&step.text, &step.logprobs).is_break() {
            a.cancelled = true;
            return Ok(false);
        }
    }
    match step.next {
        Some(token) => {
            a.next = token;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// A sequence leaves the batch: its last text and its generation (or error) go to its request. It
/// stops counting as running before its request hears back.
fn finish(s: &ServeState, a: Active, error: Option<ApiError>) {
    let Active {
        seq,
        mut on_text,
        done,
        arrived,
        label,
        first_text,
        cancelled,
        _running,
        ..
    } = a;
    drop(_running);
    if let Some(e) = error {
        let _ = done.send(Err(e));
        return;
    }
    let generation = if cancelled || done.is_closed() {
        Ok(seq.cancel())
    } else {
        seq.finish().map(|(g, tail)| {
            if !tail.text.is_empty() {
                let _ = on_text(&tail.text, &tail.logprobs);
            }
            g
        })
    };
    match generation {
        Ok(g) => {
            if first_text && !g.tokens.is_empty() {
                // Nothing was released before the end (held back for a stop sequence, say): the
                // client's first text came with the last token.
                s.metrics.first_token(&label, arrived.elapsed());
            }
            s.metrics
                .generation(&label, g.prompt_tokens, g.tokens.len(), arrived.elapsed());
            let _ = done.send(Ok(g));
        }
        Err(e) => {
            let _ = done.send(Err(ApiError::from(e)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(client: &str, n: usize) -> Request {
        let (done, _) = tokio::sync::oneshot::channel();
        Request {
            client: client.into(),
            adapter: None,
            prompt: vec![n as u32],
            opts: GenerateOptions::default(),
            on_text: Box::new(|_, _| ControlFlow::Continue(())),
            done,
            arrived: Instant::now(),
            label: AdapterLabel::base(),
        }
    }

    #[test]
    fn waiting_clients_take_turns_and_each_keeps_its_order() {
        let mut w = Waiting::default();
        for (client, n) in [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1), ("b", 2)] {
            w.push(request(client, n));
        }
        assert_eq!(w.len, 6);
        let mut order = Vec::new();
        // A newcomer joins the back of the turn.
        order.push(w.pop().map(|r| format!("{}{}", r.client, r.prompt[0])));
        w.push(request("d", 1));
        while let Some(r) = w.pop() {
            order.push(Some(format!("{}{}", r.client, r.prompt[0])));
        }
        let order: Vec<String> = order.into_iter().flatten().collect();
        assert_eq!(order, ["a1", "b1", "c1", "a2", "d1", "b2", "a3"]);
        assert_eq!(w.len, 0);
        assert!(w.clients.is_empty());
    }
}
