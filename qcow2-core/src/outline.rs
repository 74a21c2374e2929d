//! Polling a future in a frame of its own, to bound stack depth.
//!
//! An `async fn` awaited inside another is normally inlined into the
//! caller's `poll`: its temporaries then share the caller's stack frame,
//! which is live for every later await too (an operation that first
//! formats a device and then opens it pays for both frames at once).
//! [`OutOfLine`] polls the inner future from a function that is never
//! inlined, so the inner frame is on the stack only while it is polled.

use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};

/// A pinned future polled through a never-inlined function. Make it with
/// `OutOfLine(core::pin::pin!(future))` and await it.
pub(crate) struct OutOfLine<'a, F>(pub Pin<&'a mut F>);

impl<F: Future> Future for OutOfLine<'_, F> {
    type Output = F::Output;

    #[inline(never)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.0.as_mut().poll(cx)
    }
}
