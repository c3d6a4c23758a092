//! Continuous batching. One engine thread owns the model's compute. Requests wait in a bounded queue
//! (a full queue answers 503 at once); the engine admits them in arrival order while the batch has
//! room, prefills each, and then advances every sequence in the batch by one token per step in one
//! batched forward pass (`Model::decode_batch`), requests for different adapters in the same step. A
//! sequence's text goes back to its request as soon as it is final; one that finishes leaves the
//! batch, and its place goes to the next waiting request at the next step. A client that goes away
//! (its stream closed, or its response future dropped) frees its slot at the next step.
//!
//! The thread holds the server state only while it has work, so the state (and with it the queue's
//! sender) can drop, and then the thread ends.

use std::ops::ControlFlow;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Weak};
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
    pub adapter: Option<Arc<LoadedAdapter>>,
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    pub on_text: OnText,
    pub done: tokio::sync::oneshot::Sender<Result<Generation, ApiError>>,
    pub arrived: Instant,
    pub label: AdapterLabel,
}

/// The queue into the engine thread.
pub struct Engine {
    queue: SyncSender<Request>,
}

impl Engine {
    /// Start the engine thread for `state` with a queue of `capacity` waiting requests.
    pub fn start(state: Weak<ServeState>, capacity: usize) -> std::io::Result<Self> {
        let (queue, waiting) = std::sync::mpsc::sync_channel(capacity.max(1));
        std::thread::Builder::new()
            .name("pai-engine".into())
            .spawn(move || serve(state, waiting))?;
        Ok(Self { queue })
    }

    /// Queue a request; a full queue is refused at once (503), never waited on.
    pub fn submit(&self, state: &ServeState, request: Request) -> Result<(), ApiError> {
        state.metrics.queue_changed(1);
        match self.queue.try_send(request) {
            Ok(()) => Ok(()),
            Err(e) => {
                state.metrics.queue_changed(-1);
                let message = match e {
                    TrySendError::Full(_) => "the server is busy: every queue slot is taken; retry",
                    TrySendError::Disconnected(_) => "the engine has stopped",
                };
                Err(ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message: message.into(),
                    kind: "server_error",
                    param: None,
                    code: "server_busy",
                })
            }
        }
    }
}

/// One sequence in the batch.
struct Active<'s> {
    seq: Sequence<'s>,
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
fn serve(state: Weak<ServeState>, waiting: Receiver<Request>) {
    while let Ok(first) = waiting.recv() {
        let Some(s) = state.upgrade() else {
            return;
        };
        s.metrics.queue_changed(-1);
        run_batches(&s, first, &waiting);
    }
}

/// Admit, step, repeat, until the batch and the queue are empty.
fn run_batches(s: &ServeState, first: Request, waiting: &Receiver<Request>) {
    let mut active: Vec<Active> = Vec::new();
    // Adapters per active sequence, kept apart so that a step can borrow them beside the caches.
    let mut adapters: Vec<Option<Arc<LoadedAdapter>>> = Vec::new();
    let mut pending = Some(first);
    loop {
        // 1. Admit waiting requests while the batch has room.
        while active.len() < s.max_batch.max(1) {
            let request = match pending.take() {
                Some(r) => r,
                None => match waiting.try_recv() {
                    Ok(r) => {
                        s.metrics.queue_changed(-1);
                        r
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                },
            };
            if let Some((a, adapter)) = admit(s, request) {
                active.push(a);
                adapters.push(adapter);
            }
        }
        if active.is_empty() {
            return;
        }

        // 2. One token for every sequence, in one batched pass.
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

        // 3. Each sequence takes its token (row `r` of the logits); the finished and the abandoned
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

/// Prefill a request and take its first token; `None` when it is already done (answered).
fn admit<'s>(
    s: &'s ServeState,
    request: Request,
) -> Option<(Active<'s>, Option<Arc<LoadedAdapter>>)> {
    let Request {
        adapter,
        prompt,
        opts,
        on_text,
        done,
        arrived,
        label,
    } = request;
    if done.is_closed() {
        return None;
    }
    let stack: Vec<&pai_model::Adapter> = adapter.iter().map(|l| &l.adapter).collect();
    let prefilled =
        Sequence::new(&s.base.model, &s.base.tokenizer, &prompt, opts).and_then(|mut seq| {
            let logits = seq.prefill(&s.base.model, &AdapterStack::new(&stack))?;
            Ok((seq, logits))
        });
    let (seq, logits) = match prefilled {
        Ok(p) => p,
        Err(e) => {
            let _ = done.send(Err(ApiError::from(e)));
            return None;
        }
    };
    let mut a = Active {
        seq,
        next: 0,
        on_text,
        done,
        arrived,
        label,
        first_text: true,
        cancelled: false,
        _running: s.metrics.running(),
    };
    match advance(s, &mut a, &logits) {
        Ok(true) => Some((a, adapter)),
        outcome => {
            finish(s, a, outcome.err());
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
