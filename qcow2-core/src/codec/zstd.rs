//! The zstd compression type (RFC 8878 frames) without a heap: [`Zstd`], a
//! [`Decoder`] on the `zstd-zero` crate, and [`ZstdWorkspace`], the
//! [`Workspace`] that lends it to an image. Cargo feature `zstd`.
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

use crate::codec::{Compression, DecodeError, Decoder, Parts, Step, Workspace};
use crate::Sector;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Running,
    /// The cluster is decoded, its last byte held back until its frame
    /// ends (more output, or input ending first, is an error).
    Held,
    Done,
    Failed(DecodeError),
}

/// A zstd [`Decoder`] on borrowed tables and buffers; see the module
/// documentation.
pub struct Zstd<'a> {
    dec: Option<zstd_zero::Decoder<'a>>,
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
            ring_end,
            cluster: 0,
            total: 0,
            at_ring_end: false,
            dirty: true,
            held: 0,
            phase: Phase::Idle,
        }
    }

    fn fail(&mut self, e: DecodeError) -> DecodeError {
        self.phase = Phase::Failed(e);
        self.dirty = true;
        e
    }
}

impl Decoder for Zstd<'_> {
    fn start(&mut self, format: Compression, cluster_size: usize) -> Result<(), DecodeError> {
        if format != Compression::Zstd {
            return Err(self.fail(DecodeError::Unsupported(
                "zlib compressed clusters (the decoder reads zstd only)",
            )));
        }
        let Some(dec) = self.dec.as_mut() else {
            return Err(self.fail(DecodeError::Unsupported("zstd decoder tables not usable")));
        };
        if self.dirty || dec.finish().is_err() {
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
            if !finished || dec.finish().is_err() {
                return Err(self.fail(DecodeError::Unsupported("zstd decoder cannot be reset")));
            }
        }
        self.dirty = true;
        self.cluster = cluster_size;
        self.total = 0;
        self.at_ring_end = false;
        self.phase = Phase::Running;
        Ok(())
    }

    fn step(&mut self, input: &[u8], last: bool) -> Result<Step<'_>, DecodeError> {
        match self.phase {
            Phase::Idle => return Err(DecodeError::Unsupported("zstd: step before start")),
            Phase::Failed(e) => return Err(e),
            Phase::Done => {
                return Ok(Step {
                    consumed: input.len(),
                    output: &[],
                })
            }
            Phase::Running | Phase::Held => {}
        }
        let Zstd {
            dec,
            ring_end,
            cluster,
            total,
            at_ring_end,
            dirty,
            held,
            phase,
        } = self;
        let Some(dec) = dec.as_mut() else {
            return Err(DecodeError::Unsupported("zstd decoder tables not usable"));
        };
        let fail = |phase: &mut Phase, e: DecodeError| {
            *phase = Phase::Failed(e);
            e
        };

        // Transitions that need no input (a frame's end right after its
        // last block) are taken first, unless the rest of a block that
        // wrapped around the ring may be waiting: zstd-zero hands that out
        // on the next call, and only one call's output can be returned.
        // (Having finished a frame since its reset, zstd-zero's `finish`
        // is Ok exactly when nothing is pending and no frame is open.)
        if !*at_ring_end || dec.finish().is_ok() {
            for _ in 0..4 {
                match dec.decode(&[]) {
                    Ok(DecodeStep::FrameFinished { .. }) => {
                        if *phase == Phase::Held {
                            *phase = Phase::Done;
                            *dirty = false;
                            return Ok(Step {
                                consumed: 0,
                                output: core::slice::from_ref(held),
                            });
                        }
                    }
                    Ok(DecodeStep::NeedInput { .. }) => break,
                    Ok(DecodeStep::FrameStarted { .. }) => {}
                    Ok(DecodeStep::Output { .. }) => {
                        // Only a block longer than its frame's content size.
                        return Err(fail(
                            phase,
                            DecodeError::Corrupt("zstd content size mismatch"),
                        ));
                    }
                    Err(e) => return Err(fail(phase, map_error(e))),
                }
            }
        }
        *at_ring_end = false;

        match dec.decode(input) {
            Err(e) => Err(fail(phase, map_error(e))),
            Ok(DecodeStep::NeedInput { consumed }) => {
                if *phase == Phase::Held && last && consumed >= input.len() {
                    return Err(fail(
                        phase,
                        DecodeError::Corrupt("zstd frame does not end with the cluster"),
                    ));
                }
                Ok(Step {
                    consumed,
                    output: &[],
                })
            }
            Ok(DecodeStep::FrameStarted { consumed, .. }) => Ok(Step {
                consumed,
                output: &[],
            }),
            Ok(DecodeStep::FrameFinished { consumed, .. }) => {
                if *phase == Phase::Held {
                    *phase = Phase::Done;
                    *dirty = false;
                    return Ok(Step {
                        consumed,
                        output: core::slice::from_ref(held),
                    });
                }
                Ok(Step {
                    consumed,
                    output: &[],
                })
            }
            Ok(DecodeStep::Output { consumed, bytes }) => {
                if *phase == Phase::Held || bytes.len() > *cluster - *total {
                    return Err(fail(
                        phase,
                        DecodeError::Corrupt("zstd frame longer than the cluster"),
                    ));
                }
                *total += bytes.len();
                *at_ring_end = bytes.as_ptr() as usize + bytes.len() == *ring_end;
                if *total < *cluster {
                    return Ok(Step {
                        consumed,
                        output: bytes,
                    });
                }
                let Some((&last_byte, rest)) = bytes.split_last() else {
                    return Err(fail(phase, DecodeError::Corrupt("invalid zstd stream")));
                };
                *held = last_byte;
                *phase = Phase::Held;
                Ok(Step {
                    consumed,
                    output: rest,
                })
            }
        }
    }
}

/// A [`Workspace`] with a [`Zstd`] decoder and borrowed bounce and input
/// buffers (either may be empty: see [`crate::codec`]).
pub struct ZstdWorkspace<'a> {
    bounce: &'a mut [Sector],
    input: &'a mut [Sector],
    decoder: Zstd<'a>,
}

impl<'a> ZstdWorkspace<'a> {
    /// Lends `decoder` with `bounce` (a cluster or more lets partial writes
    /// into compressed clusters go out in one device write) and `input`
    /// (compressed bytes are read that many sectors at a time).
    pub fn new(decoder: Zstd<'a>, bounce: &'a mut [Sector], input: &'a mut [Sector]) -> Self {
        ZstdWorkspace {
            bounce,
            input,
            decoder,
        }
    }
}

impl<'a> Workspace for ZstdWorkspace<'a> {
    type Decoder = Zstd<'a>;

    fn parts(&mut self) -> Parts<'_, Zstd<'a>> {
        Parts {
            bounce: self.bounce,
            input: self.input,
            decoder: &mut self.decoder,
        }
    }
}

#[cfg(test)]
mod tests;
