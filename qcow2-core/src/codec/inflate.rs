//! The zlib compression type (raw deflate, RFC 1951) without a heap:
//! [`Inflate`], a [`Decoder`] on miniz_oxide's inflate core, lent to an
//! image in a [`crate::codec::DecoderWorkspace`]. Cargo feature `zlib`.
//!
//! All memory is the caller's: the decompressor state ([`InflateState`],
//! [`STATE_BYTES`]) and an output window, both borrowed, so both can be
//! `static`s (firmware) or locals.
//!
//! QEMU inflates a compressed cluster in one call into a cluster-sized
//! buffer (`block/qcow2-threads.c`, `qcow2_zlib_decompress`): the stream must
//! fill the cluster; output past it is cut and input after it ignored. The
//! window decides how exactly this decoder follows:
//! - a window of at least the cluster size is used as that buffer, so every
//!   stream QEMU reads is read, whatever deflate window it was written with;
//! - a smaller window (at least [`MIN_WINDOW`] bytes; its largest power of
//!   two is used) is a ring. QEMU writes with a 4 KiB deflate window, so a
//!   4 KiB ring reads every image QEMU writes, and a ring of 32 KiB reads
//!   every deflate stream. A back-reference farther than a smaller ring is
//!   an error, never wrong data.
//!
//! Either way a back-reference before the start of the stream is an error
//! (zlib's "invalid distance too far back"), as are a stream that ends
//! before a whole cluster and, as with zlib, an invalid code decoded right
//! after the cluster's last byte.
//!
//! Two kinds of damaged stream read differently from zlib (found by
//! differential fuzzing against zlib-rs, together about once in 30,000
//! mutated streams): a dynamic block whose code lacks the end-of-block
//! symbol (zlib refuses the block; miniz_oxide decodes it, and the cluster
//! may fill before the block would have to end), and a back-reference right
//! after the cluster's last byte that reaches before the start of the
//! stream, or beyond a ring (zlib stops for want of room before checking
//! it; miniz_oxide checks it first: an error here).

use miniz_oxide::inflate::core::decompress_with_limit;
use miniz_oxide::inflate::core::inflate_flags::{
    TINFL_FLAG_HAS_MORE_INPUT, TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
};
use miniz_oxide::inflate::TINFLStatus;

use crate::codec::{Compression, DecodeError, Decoder, Phase, Step};

/// The decompressor state (miniz_oxide's `DecompressorOxide`): Huffman
/// tables and bit buffer, [`STATE_BYTES`] bytes. Make one with
/// `InflateState::new()` (or `Default`); it holds nothing between clusters.
///
/// miniz_oxide has no `const` constructor, so a `static` one is made at run
/// time (`static_cell::StaticCell::init_with(InflateState::new)`), and the
/// value passes through the stack once: about [`STATE_BYTES`] of stack in
/// the function that makes it (on thumbv7em, 10.6 KB). Firmware does that
/// early, outside its deepest call chains.
pub use miniz_oxide::inflate::core::DecompressorOxide as InflateState;

/// Size of [`InflateState`] (10,500 bytes on 32-bit targets).
pub const STATE_BYTES: usize = core::mem::size_of::<InflateState>();

/// The smallest window that decodes clusters larger than itself: QEMU
/// writes streams whose back-references reach at most 4 KiB.
pub const MIN_WINDOW: usize = 4096;

/// A window that reads every deflate stream whatever the cluster size (a
/// deflate back-reference reaches at most 32 KiB).
pub const FULL_WINDOW: usize = 32 * 1024;

/// The largest power of two not above `n` (1 for 0).
fn pow2_floor(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n | 1).leading_zeros())
}

/// A raw-deflate [`Decoder`] on borrowed state and window; see the
/// module documentation.
pub struct Inflate<'a> {
    state: &'a mut InflateState,
    window: &'a mut [u8],
    /// Cluster size of the current cluster.
    cluster: usize,
    /// Bytes decoded so far in this cluster (the held byte included).
    total: usize,
    /// Ring size, or 0 when the window holds the whole cluster.
    ring: usize,
    /// Where the next byte goes in the window.
    pos: usize,
    /// The cluster's last byte while held back (phase `Held`: until the
    /// stream shows, with what input remains, that it is not invalid right
    /// after it, as zlib would).
    held: u8,
    phase: Phase,
}

impl<'a> Inflate<'a> {
    /// A decoder on `state` and `window`: a window of at least the cluster
    /// size decodes exactly as QEMU does; a smaller one must hold at least
    /// [`MIN_WINDOW`] bytes (see the module documentation).
    pub fn new(state: &'a mut InflateState, window: &'a mut [u8]) -> Self {
        Inflate {
            state,
            window,
            cluster: 0,
            total: 0,
            ring: 0,
            pos: 0,
            held: 0,
            phase: Phase::Idle,
        }
    }

    /// Whether clusters of `cluster_size` bytes decode exactly as QEMU
    /// decodes them (the window holds a whole cluster or 32 KiB).
    pub fn is_exact_for(&self, cluster_size: usize) -> bool {
        self.window.len() >= cluster_size.min(FULL_WINDOW)
    }

    /// The part of the window the decoder writes and its flags: the whole
    /// cluster (non-wrapping), or the ring, non-wrapping until it has been
    /// filled once so that a reference before the start of the stream is
    /// refused, wrapping after.
    fn flags(&self) -> u32 {
        if self.ring == 0 || self.total < self.ring {
            TINFL_FLAG_HAS_MORE_INPUT | TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
        } else {
            TINFL_FLAG_HAS_MORE_INPUT
        }
    }

    fn fail(&mut self, e: DecodeError) -> DecodeError {
        self.phase = Phase::Failed(e);
        e
    }

    /// The error for a stream miniz_oxide rejected.
    fn invalid(&mut self, status: TINFLStatus) -> DecodeError {
        let e = match status {
            TINFLStatus::BadParam => DecodeError::Unsupported("inflate: window not usable"),
            _ if self.ring != 0 && self.ring < FULL_WINDOW && self.total > self.ring => {
                // A distance beyond the ring fails like any invalid code:
                // which it was cannot be told apart.
                DecodeError::Corrupt(
                    "invalid deflate stream, or one using a larger window than the decoder's buffer",
                )
            }
            _ => DecodeError::Corrupt("invalid deflate stream"),
        };
        self.fail(e)
    }
}

impl Decoder for Inflate<'_> {
    fn start(&mut self, format: Compression, cluster_size: usize) -> Result<(), DecodeError> {
        if format != Compression::Zlib {
            return Err(self.fail(DecodeError::Unsupported(
                "zstd compressed clusters (the decoder reads zlib only)",
            )));
        }
        if !cluster_size.is_power_of_two() {
            return Err(self.fail(DecodeError::Unsupported("cluster size not a power of two")));
        }
        self.ring = if self.window.len() >= cluster_size {
            0
        } else if self.window.len() >= MIN_WINDOW {
            pow2_floor(self.window.len())
        } else {
            return Err(self.fail(DecodeError::Unsupported(
                "inflate window smaller than both the cluster and 4 KiB",
            )));
        };
        self.state.init();
        self.cluster = cluster_size;
        self.total = 0;
        self.pos = 0;
        self.held = 0;
        self.phase = Phase::Running;
        Ok(())
    }

    fn step(&mut self, input: &[u8], last: bool) -> Result<Step<'_>, DecodeError> {
        if let Some(quiet) = self.phase.quiet_step(input, "inflate: step before start") {
            return quiet;
        }
        let held = self.phase == Phase::Held;
        let start = self.pos;
        // Nothing is written past the cluster: no room when held.
        let room = if held {
            0
        } else {
            (self.cluster - self.total).min(self.span() - start)
        };
        let (status, consumed, produced) = self.inflate(input, room)?;
        if held {
            return self.past_the_end(status, consumed == input.len(), last, consumed);
        }
        self.advance(produced);
        let shown = self.settle(status, produced, start)?;
        Ok(Step {
            consumed,
            output: self.window.get(start..start + shown).unwrap_or(&[]),
        })
    }
}

// The parts of `step`, inlined into it: the code and stack of one
// function, one call of miniz_oxide (see `cargo xtask size --codecs`).
impl Inflate<'_> {
    /// The part of the window in use: the cluster, or the ring.
    #[inline(always)]
    fn span(&self) -> usize {
        if self.ring == 0 {
            self.cluster
        } else {
            self.ring
        }
    }

    /// Decodes `input` into the window at `self.pos`, at most `room` bytes:
    /// miniz_oxide's status, the bytes consumed and those produced.
    #[inline(always)]
    fn inflate(
        &mut self,
        input: &[u8],
        room: usize,
    ) -> Result<(TINFLStatus, usize, usize), DecodeError> {
        let span = self.span();
        let flags = self.flags();
        let Some(out) = self.window.get_mut(..span) else {
            return Err(self.fail(DecodeError::Unsupported("inflate: window not usable")));
        };
        let (status, consumed, produced) =
            decompress_with_limit(self.state, input, out, self.pos, room, flags);
        Ok((status, consumed.min(input.len()), produced.min(room)))
    }

    /// Counts `produced` bytes written at `self.pos` (phase `Running`).
    #[inline(always)]
    fn advance(&mut self, produced: usize) {
        self.total += produced;
        self.pos += produced;
        if self.ring != 0 && self.pos == self.ring {
            self.pos = 0;
        }
    }

    /// What `status` means after `produced` bytes at `start`: the next
    /// phase, and how many of those bytes to hand out now.
    #[inline(always)]
    fn settle(
        &mut self,
        status: TINFLStatus,
        produced: usize,
        start: usize,
    ) -> Result<usize, DecodeError> {
        match status {
            TINFLStatus::Done if self.total < self.cluster => Err(self.fail(DecodeError::Corrupt(
                "deflate stream ends before a whole cluster",
            ))),
            TINFLStatus::Done => {
                self.phase = Phase::Done;
                Ok(produced)
            }
            TINFLStatus::NeedsMoreInput | TINFLStatus::HasMoreOutput
                if self.total == self.cluster =>
            {
                self.hold_last(produced, start)
            }
            TINFLStatus::NeedsMoreInput | TINFLStatus::HasMoreOutput => Ok(produced),
            other => Err(self.invalid(other)),
        }
    }

    /// The cluster is full but the stream goes on: holds its last byte
    /// back (phase `Held`) and hands out the `produced - 1` before it.
    #[inline(always)]
    fn hold_last(&mut self, produced: usize, start: usize) -> Result<usize, DecodeError> {
        if produced == 0 {
            // Cannot be: the cluster was incomplete before.
            return Err(self.fail(DecodeError::Corrupt("invalid deflate stream")));
        }
        let shown = produced - 1;
        self.phase = Phase::Held;
        self.held = self.window.get(start + shown).copied().unwrap_or(0);
        Ok(shown)
    }

    /// Phase `Held`: what `status` means after looking past the cluster's
    /// end with no room to write, having used `all` the input or not.
    /// zlib decodes on until it has a byte to write or the input ends;
    /// miniz_oxide says HasMoreOutput for both once the output is full; all
    /// input used up without `last` means it wants more.
    #[inline(always)]
    fn past_the_end(
        &mut self,
        status: TINFLStatus,
        all: bool,
        last: bool,
        consumed: usize,
    ) -> Result<Step<'_>, DecodeError> {
        match status {
            TINFLStatus::NeedsMoreInput | TINFLStatus::HasMoreOutput if !last && all => Ok(Step {
                consumed,
                output: &[],
            }),
            TINFLStatus::NeedsMoreInput | TINFLStatus::HasMoreOutput | TINFLStatus::Done => {
                self.phase = Phase::Done;
                Ok(Step {
                    consumed,
                    output: core::slice::from_ref(&self.held),
                })
            }
            other => Err(self.invalid(other)),
        }
    }
}

#[cfg(test)]
mod tests;
