//! The executor hyper's HTTP/2 server spawns each stream's task with (TLS connections), so
//! that one stream can be reset alone.
//!
//! A client that stops taking one response (it sends no `WINDOW_UPDATE` for that stream)
//! stops it by flow control: hyper waits for window and does not ask the body for more, so
//! nothing the body does can end it. Its task can be ended from outside, though: dropping it
//! drops the stream's handles, and h2 then resets the stream (`RST_STREAM` with `CANCEL`)
//! and drops what was queued for it, while the connection's other streams go on. The body
//! times that wait ([`crate::forward::Stalls`]) and, past `send_timeout`, cuts its task.
//!
//! How a body finds its task: a body is polled only inside its stream's task, so when it
//! first waits on its client it leaves a [`Cut`] in a thread-local ([`cut_here`]), which the
//! task takes as soon as that poll returns. A stream whose body never waits on its client
//! costs nothing more than two thread-local writes per poll.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Wake, Waker};
use std::time::Duration;

thread_local! {
    /// The cut a body left for the stream task being polled (see the module doc).
    static LEFT: Cell<Option<Arc<Cut>>> = const { Cell::new(None) };
}

/// A request to end one stream's task: set, then its task woken.
pub(crate) struct Cut {
    cut: AtomicBool,
    task: Waker,
}

impl Wake for Cut {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.cut.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

/// For a body being polled in a stream's task with `task` (its context's waker): a waker
/// that, once woken, ends that task, which resets the stream. Outside a stream's task (an
/// HTTP/1.1 response) it ends nothing.
pub(crate) fn cut_here(task: &Waker) -> Waker {
    let cut = Arc::new(Cut {
        cut: AtomicBool::new(false),
        task: task.clone(),
    });
    LEFT.set(Some(cut.clone()));
    Waker::from(cut)
}

/// hyper's executor for a TLS client connection's HTTP/2 streams: tokio's, with each task
/// able to be cut (see the module doc). A cut is logged with the client's address.
#[derive(Clone)]
pub(crate) struct StreamExec {
    pub(crate) peer: SocketAddr,
    pub(crate) send_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let Self { peer, send_timeout } = *self;
        tokio::spawn(async move {
            let cut_off = {
                let mut fut = std::pin::pin!(fut);
                let mut cut: Option<Arc<Cut>> = None;
                std::future::poll_fn(|cx| {
                    if cut.as_ref().is_some_and(|c| c.cut.load(Ordering::Acquire)) {
                        return Poll::Ready(true);
                    }
                    LEFT.set(None);
                    let polled = fut.as_mut().poll(cx);
                    if let Some(left) = LEFT.take() {
                        cut = Some(left);
                    }
                    polled.map(|()| false)
                })
                .await
                // The stream's task is dropped here: h2 resets the stream.
            };
            if cut_off {
                crate::log::line(format_args!(
                    "client {peer}: an HTTP/2 response waited {} ms for the client to take it: stream reset",
                    send_timeout.as_millis()
                ));
            }
        });
    }
}
