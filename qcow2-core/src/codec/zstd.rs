//! The zstd compression type (RFC 8878 frames) without a heap: [`Zstd`], a
//! [`Decoder`] on the `zstd-zero` crate, lent to an image in a
//! [`crate::codec::DecoderWorkspace`]. Cargo feature `zstd`.
//!
//! All memory is the caller's, borrowed (so `static`s work):
//! - [`ZstdTables`], the entropy tables ([`TABLES_BYTES`]);
//! - a history buffer of at least the frame's window: QEMU writes one frame
//!   per cluster with its content size in the header, so its window is the
//!   cluster size, and a history of one cluster reads every image QEMU
//!   writes; a frame with a larger window is [`DecodeError::Unsupported`];
//! - block and literals buffers of [`scratch_bytes`] each (the cluster size,
//!   at most 128 KiB).
//!
//! QEMU's rules (`block/qcow2-threads.c`, `qcow2_zstd_decompress`), applied
//! here: frames are decoded until the cluster is full (several frames,
//! skippable frames, empty frames); the frame that fills the cluster must
//! end there (more output is an error, as is input that ends first); bytes
//! after it are ignored. zstd-zero checks content sizes and checksums as
//! libzstd does; it refuses some damaged streams that libzstd decodes
//! (a Huffman literal stream read past its end, or with bits left over
//! after its last literal; about 4% of mutated frames in a differential
//! run of 2.4 million), never the reverse: no stream decodes here to other
//! bytes than libzstd's, and none that libzstd refuses decodes here.

use zstd_zero::{DecodeStep, DecoderBuffers, FSE_ENTRIES, FSE_SCRATCH_LEN, HUFFMAN_ENTRIES};

use crate::codec::{Compression, DecodeError, Decoder, Phase, Step};

pub use zstd_zero::{FseEntry, HuffmanEntry, MAX_BLOCK_SIZE};

/// The entropy tables a [`Zstd`] decoder borrows: all zeros is not valid,
/// so make them with [`ZstdTables::new`] (a `const fn`, for `static`s).
pub struct ZstdTables {
    fse: [FseEntry; FSE_ENTRIES],
    huffman: [HuffmanEntry; HUFFMAN_ENTRIES],
    scratch: [i16; FSE_SCRATCH_LEN],
}

impl ZstdTables {
    /// Fresh tables.
    pub const fn new() -> Self {
        ZstdTables {
            fse: [const { FseEntry::new() }; FSE_ENTRIES],
            huffman: [const { HuffmanEntry::new() }; HUFFMAN_ENTRIES],
            scratch: [0; FSE_SCRATCH_LEN],
        }
    }
}

impl Default for ZstdTables {
    fn default() -> Self {
        Self::new()
    }
}

/// Size of [`ZstdTables`] (12,800 bytes).
pub const TABLES_BYTES: usize = core::mem::size_of::<ZstdTables>();

/// Bytes each of the block and literals buffers needs for clusters of
/// `cluster_size` bytes written by QEMU: the largest block, which is the
/// cluster size and at most 128 KiB.
pub const fn scratch_bytes(cluster_size: usize) -> usize {
    if cluster_size < MAX_BLOCK_SIZE {
        cluster_size
    } else {
        MAX_BLOCK_SIZE
    }
}

/// An empty frame (single segment, content size 0, one empty last raw
/// block): decoded after a reset so that the decoder has finished a frame
/// and [`zstd_zero::Decoder::finish`] tells a finished frame from one in
/// progress.
const EMPTY_FRAME: [u8; 9] = [0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x00, 0x01, 0x00, 0x00];

/// A zstd [`Decoder`] on borrowed tables and buffers; see the module
/// documentation.
pub struct Zstd<'a> {
    dec: Option<zstd_zero::Decoder<'a>>,
    /// Where the current cluster is (apart from `dec`, so that output
    /// borrowed from `dec` can be handed out while it changes).
    at: Progress,
}

/// The current cluster's progress through a [`Zstd`] decoder.
struct Progress {
    /// Address one past the history buffer: an output piece ending there
    /// may be followed by the rest of its block (the ring wrapped).
    ring_end: usize,
    cluster: usize,
    total: usize,
    /// The last output piece ended at the end of the history ring.
    at_ring_end: bool,
    /// Whether the decoder may hold state from a cluster that did not end
    /// cleanly.
    dirty: bool,
    /// The cluster's last byte while held back (phase `Held`: until its
    /// frame ends; more output, or input ending first, is an error).
    held: u8,
    phase: Phase,
}

/// What a zstd-zero error means here.
fn map_error(e: zstd_zero::DecodeError) -> DecodeError {
    use zstd_zero::DecodeError as Z;
    match e {
        Z::HistoryTooSmall { .. } | Z::WindowTooLarge => {
            DecodeError::Unsupported("zstd frame window larger than the decoder's history buffer")
        }
        Z::BlockScratchTooSmall { .. } | Z::LiteralScratchTooSmall { .. } => {
            DecodeError::Unsupported("zstd block larger than the decoder's scratch buffers")
        }
        Z::UnsupportedDictionary { .. } => DecodeError::Corrupt("zstd frame needs a dictionary"),
        Z::ChecksumMismatch { .. } => DecodeError::Corrupt("zstd checksum mismatch"),
        Z::ContentSizeMismatch { .. } => DecodeError::Corrupt("zstd content size mismatch"),
        _ => DecodeError::Corrupt("invalid zstd stream"),
    }
}

impl<'a> Zstd<'a> {
    /// A decoder on `tables`, a `history` of at least the cluster size (see
    /// the module documentation), and `block` and `literals` buffers of
    /// [`scratch_bytes`] each.
    pub fn new(
        tables: &'a mut ZstdTables,
        history: &'a mut [u8],
        block: &'a mut [u8],
        literals: &'a mut [u8],
    ) -> Self {
        let ring_end = history.as_ptr() as usize + history.len();
        let dec = zstd_zero::Decoder::new(DecoderBuffers {
            fse_scratch: &mut tables.scratch,
            fse: &mut tables.fse,
            huffman: &mut tables.huffman,
            history,
            block,
            literals,
        })
        .ok();
        Zstd {
            dec,
            at: Progress {
                ring_end,
                cluster: 0,
                total: 0,
                at_ring_end: false,
                dirty: true,
                held: 0,
                phase: Phase::Idle,
            },
        }
    }
}

impl Decoder for Zstd<'_> {
    fn start(&mut self, format: Compression, cluster_size: usize) -> Result<(), DecodeError> {
        if format != Compression::Zstd {
            return Err(self.at.fail(DecodeError::Unsupported(
                "zlib compressed clusters (the decoder reads zstd only)",
            )));
        }
        let Some(dec) = self.dec.as_mut() else {
            return Err(self
                .at
                .fail(DecodeError::Unsupported("zstd decoder tables not usable")));
        };
        if (self.at.dirty || dec.finish().is_err()) && !reset(dec) {
            return Err(self
                .at
                .fail(DecodeError::Unsupported("zstd decoder cannot be reset")));
        }
        let at = &mut self.at;
        at.dirty = true;
        at.cluster = cluster_size;
        at.total = 0;
        at.at_ring_end = false;
        at.phase = Phase::Running;
        Ok(())
    }

    fn step(&mut self, input: &[u8], last: bool) -> Result<Step<'_>, DecodeError> {
        if let Some(quiet) = self.at.phase.quiet_step(input, "zstd: step before start") {
            return quiet;
        }
        let Some(dec) = self.dec.as_mut() else {
            return Err(DecodeError::Unsupported("zstd decoder tables not usable"));
        };
        let at = &mut self.at;
        if at.settle(dec)? {
            return Ok(at.release(0));
        }
        at.at_ring_end = false;
        match dec.decode(input) {
            Err(e) => Err(at.fail(map_error(e))),
            Ok(step) => at.took(step, input.len(), last),
        }
    }
}

/// Resets `dec` and decodes [`EMPTY_FRAME`], so that it has finished a
/// frame: whether that worked.
#[inline(always)]
fn reset(dec: &mut zstd_zero::Decoder<'_>) -> bool {
    dec.reset();
    let mut input: &[u8] = &EMPTY_FRAME;
    let mut finished = false;
    for _ in 0..8 {
        match dec.decode(input) {
            Ok(DecodeStep::FrameFinished { .. }) => {
                finished = true;
                break;
            }
            Ok(step) => input = input.get(step.consumed()..).unwrap_or(&[]),
            Err(_) => break,
        }
    }
    finished && dec.finish().is_ok()
}

// The phases of `Zstd::step`, one helper each, inlined into it: the code
// and stack of one function (see `cargo xtask size --codecs`).
impl Progress {
    fn fail(&mut self, e: DecodeError) -> DecodeError {
        self.phase = Phase::Failed(e);
        self.dirty = true;
        e
    }

    /// The held byte's frame has ended: the cluster is done, handed out
    /// with the held byte, `consumed` input bytes taking it there.
    #[inline(always)]
    fn release(&mut self, consumed: usize) -> Step<'_> {
        self.phase = Phase::Done;
        self.dirty = false;
        Step {
            consumed,
            output: core::slice::from_ref(&self.held),
        }
    }

    /// Takes the transitions that need no input (a frame's end right after
    /// its last block) first, unless the rest of a block that wrapped
    /// around the ring may be waiting: zstd-zero hands that out on the next
    /// call, and only one call's output can be returned. (Having finished a
    /// frame since its reset, zstd-zero's `finish` is Ok exactly when
    /// nothing is pending and no frame is open.) True when the held byte's
    /// frame ended (see [`Progress::release`]).
    #[inline(always)]
    fn settle(&mut self, dec: &mut zstd_zero::Decoder<'_>) -> Result<bool, DecodeError> {
        if self.at_ring_end && dec.finish().is_err() {
            return Ok(false);
        }
        for _ in 0..4 {
            match dec.decode(&[]) {
                Ok(DecodeStep::FrameFinished { .. }) if self.phase == Phase::Held => {
                    return Ok(true)
                }
                Ok(DecodeStep::FrameFinished { .. } | DecodeStep::FrameStarted { .. }) => {}
                Ok(DecodeStep::NeedInput { .. }) => break,
                Ok(DecodeStep::Output { .. }) => {
                    // Only a block longer than its frame's content size.
                    return Err(self.fail(DecodeError::Corrupt("zstd content size mismatch")));
                }
                Err(e) => return Err(self.fail(map_error(e))),
            }
        }
        Ok(false)
    }

    /// What zstd-zero's `step` on `len` bytes of input (the last if `last`)
    /// means for the cluster.
    #[inline(always)]
    fn took<'s>(
        &'s mut self,
        step: DecodeStep<'s>,
        len: usize,
        last: bool,
    ) -> Result<Step<'s>, DecodeError> {
        let empty = |consumed| Step {
            consumed,
            output: &[],
        };
        match step {
            DecodeStep::NeedInput { consumed } => {
                if self.phase == Phase::Held && last && consumed >= len {
                    return Err(self.fail(DecodeError::Corrupt(
                        "zstd frame does not end with the cluster",
                    )));
                }
                Ok(empty(consumed))
            }
            DecodeStep::FrameStarted { consumed, .. } => Ok(empty(consumed)),
            DecodeStep::FrameFinished { consumed, .. } if self.phase == Phase::Held => {
                Ok(self.release(consumed))
            }
            DecodeStep::FrameFinished { consumed, .. } => Ok(empty(consumed)),
            DecodeStep::Output { consumed, bytes } => self.output(consumed, bytes),
        }
    }

    /// Output from the cluster's frames: handed out, but for the cluster's
    /// last byte, held back until its frame ends (more output is an error).
    #[inline(always)]
    fn output<'s>(&'s mut self, consumed: usize, bytes: &'s [u8]) -> Result<Step<'s>, DecodeError> {
        if self.phase == Phase::Held || bytes.len() > self.cluster - self.total {
            return Err(self.fail(DecodeError::Corrupt("zstd frame longer than the cluster")));
        }
        self.total += bytes.len();
        self.at_ring_end = bytes.as_ptr() as usize + bytes.len() == self.ring_end;
        if self.total < self.cluster {
            return Ok(Step {
                consumed,
                output: bytes,
            });
        }
        let Some((&last_byte, rest)) = bytes.split_last() else {
            return Err(self.fail(DecodeError::Corrupt("invalid zstd stream")));
        };
        self.held = last_byte;
        self.phase = Phase::Held;
        Ok(Step {
            consumed,
            output: rest,
        })
    }
}

#[cfg(test)]
mod tests;
