//! Compressed clusters on a host: [`HostWorkspace`] (the image's working
//! memory: a cluster-sized bounce buffer, an input buffer for a whole
//! compressed extent, and [`HostDecoder`]), QEMU's compressors
//! ([`compress_cluster`], [`HostCompressor`]), and [`CoreDecoders`] (the
//! core's no-heap decoders with memory from the heap, to compare with).
//!
//! Both formats follow QEMU 10.0 (`block/qcow2-threads.c`) exactly:
//! - zlib reads: one inflate into a cluster-sized buffer (zlib-rs through
//!   flate2, 32 KiB window, so streams written with any window read); the
//!   cluster iff the buffer fills; output past it is cut, input after it
//!   ignored;
//! - zstd reads: `ZSTD_decompressStream` until the cluster is full
//!   (several frames allowed); an error, a step without progress, or a
//!   frame not finished when the cluster is full (more output than a
//!   cluster) fails;
//! - zlib writes: raw deflate at the default level with a 4 KiB window and
//!   memLevel 9 (zlib-rs, so the bytes can differ from C zlib's while
//!   reading back the same); zstd writes: one `ZSTD_compressStream2(e_end)`
//!   with default parameters (level 3, content size in the frame header, no
//!   checksum). Output is limited to `cluster_size - 1` bytes: a cluster
//!   that does not fit is stored plainly.
//!
//! Nothing here is shared between threads: each thread makes its own
//! [`HostDecoder`] / [`HostCompressor`], or calls [`decompress_cluster`] /
//! [`compress_cluster`], which make theirs.

use flate2::{Decompress, FlushDecompress, Status};
use qcow2_core::codec::inflate::{Inflate, InflateState, MIN_WINDOW};
use qcow2_core::codec::zstd::{scratch_bytes, Zstd, ZstdTables};
use qcow2_core::codec::{BothDecoder, Compression, DecodeError, Decoder, Parts, Step, Workspace};
use qcow2_core::{Sector, SECTOR};
use zlib_rs::{DeflateConfig, DeflateFlush, Method, Strategy};
use zstd::zstd_safe::{self, CCtx, DCtx, InBuffer, OutBuffer, ResetDirective};

/// A [`Workspace`] for host images: bounce buffer of one cluster, input
/// buffer of two clusters and a sector (the largest compressed extent,
/// wherever it starts in its sector), and a [`HostDecoder`].
pub struct HostWorkspace {
    bounce: Vec<Sector>,
    input: Vec<Sector>,
    decoder: HostDecoder,
}

impl HostWorkspace {
    /// The workspace for images of `cluster_size` bytes (a power of two,
    /// 512 B to 2 MiB).
    pub fn new(cluster_size: u64) -> Self {
        let sectors = (cluster_size as usize).div_ceil(SECTOR).max(1);
        HostWorkspace {
            bounce: vec![[0; SECTOR]; sectors],
            input: vec![[0; SECTOR]; 2 * sectors + 1],
            decoder: HostDecoder::new(),
        }
    }
}

impl Workspace for HostWorkspace {
    type Decoder = HostDecoder;

    fn parts(&mut self) -> Parts<'_, HostDecoder> {
        Parts {
            bounce: &mut self.bounce,
            input: &mut self.input,
            decoder: &mut self.decoder,
        }
    }
}

/// Memory for the core's no-heap decoders as the tests and fuzz harnesses
/// read images with them: inflate with QEMU's 4 KiB window
/// ([`MIN_WINDOW`]), zstd-zero with a cluster of history.
pub struct CoreDecoders {
    state: Box<InflateState>,
    window: Vec<u8>,
    tables: Box<ZstdTables>,
    history: Vec<u8>,
    block: Vec<u8>,
    literals: Vec<u8>,
}

impl CoreDecoders {
    /// The memory for images of `cluster_size` bytes.
    pub fn new(cluster_size: usize) -> Self {
        CoreDecoders {
            state: Box::default(),
            window: vec![0; MIN_WINDOW],
            tables: Box::default(),
            history: vec![0; cluster_size],
            block: vec![0; scratch_bytes(cluster_size)],
            literals: vec![0; scratch_bytes(cluster_size)],
        }
    }

    /// Both decoders as one, for images of either format (lend it with
    /// [`qcow2_core::codec::DecoderWorkspace`]).
    pub fn decoder(&mut self) -> BothDecoder<'_> {
        let zlib = Inflate::new(&mut self.state, &mut self.window);
        let zstd = Zstd::new(
            &mut self.tables,
            &mut self.history,
            &mut self.block,
            &mut self.literals,
        );
        BothDecoder::new(zlib, zstd)
    }
}

/// The state of one cluster in [`HostDecoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    /// Collecting the extent's bytes.
    Input,
    /// The cluster was handed out.
    Done,
    Failed(DecodeError),
}

/// Decodes compressed clusters of both formats with the reference
/// libraries, by QEMU's rules (see the module documentation). As a
/// [`Decoder`] it collects the compressed bytes until `last` and decodes
/// the cluster in one go; [`HostDecoder::decompress`] does the same on a
/// whole extent.
pub struct HostDecoder {
    zlib: Decompress,
    zstd: Option<DCtx<'static>>,
    format: Compression,
    cluster: usize,
    collected: Vec<u8>,
    out: Vec<u8>,
    phase: Phase,
}

impl Default for HostDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HostDecoder {
    /// A decoder; its buffers grow to the cluster size on first use.
    pub fn new() -> Self {
        HostDecoder {
            zlib: Decompress::new_with_window_bits(false, 15),
            zstd: None,
            format: Compression::Zlib,
            cluster: 0,
            collected: Vec::new(),
            out: Vec::new(),
            phase: Phase::Idle,
        }
    }

    /// Decodes the compressed extent `input` (its sector padding included)
    /// into `out`, which is one cluster long, by QEMU's rules.
    pub fn decompress(
        &mut self,
        format: Compression,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), DecodeError> {
        match format {
            Compression::Zlib => inflate(&mut self.zlib, input, out),
            Compression::Zstd => {
                let dctx = self.zstd.get_or_insert_with(DCtx::create);
                zstd_decompress(dctx, input, out)
            }
        }
    }
}

/// zlib as QEMU: `inflate(Z_FINISH)` once; success iff the output filled.
fn inflate(z: &mut Decompress, input: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    z.reset(false);
    match z.decompress(input, out, FlushDecompress::Finish) {
        Ok(Status::StreamEnd | Status::BufError | Status::Ok)
            if z.total_out() == out.len() as u64 =>
        {
            Ok(())
        }
        Ok(_) => Err(DecodeError::Corrupt(
            "deflate stream ends before a whole cluster",
        )),
        Err(_) => Err(DecodeError::Corrupt("invalid deflate stream")),
    }
}

/// zstd as QEMU: `ZSTD_decompressStream` until the output is full, each
/// call making progress; the last call must have finished its frame.
fn zstd_decompress(dctx: &mut DCtx<'_>, input: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    dctx.reset(ResetDirective::SessionOnly)
        .map_err(|_| DecodeError::Corrupt("zstd: cannot reset the context"))?;
    let size = out.len();
    let mut output = OutBuffer::around(out);
    let mut input = InBuffer::around(input);
    let mut ret = 0;
    while output.pos() < size {
        let (in_before, out_before) = (input.pos(), output.pos());
        ret = dctx
            .decompress_stream(&mut output, &mut input)
            .map_err(|_| DecodeError::Corrupt("invalid zstd stream"))?;
        if input.pos() <= in_before && output.pos() <= out_before {
            return Err(DecodeError::Corrupt(
                "zstd stream ends before a whole cluster",
            ));
        }
    }
    if ret > 0 {
        return Err(DecodeError::Corrupt("zstd frame longer than the cluster"));
    }
    Ok(())
}

impl Decoder for HostDecoder {
    fn start(&mut self, format: Compression, cluster_size: usize) -> Result<(), DecodeError> {
        self.format = format;
        self.cluster = cluster_size;
        self.collected.clear();
        self.phase = Phase::Input;
        Ok(())
    }

    fn step(&mut self, input: &[u8], last: bool) -> Result<Step<'_>, DecodeError> {
        match self.phase {
            Phase::Idle => return Err(DecodeError::Unsupported("decoder step before start")),
            Phase::Failed(e) => return Err(e),
            Phase::Done => {
                return Ok(Step {
                    consumed: input.len(),
                    output: &[],
                })
            }
            Phase::Input => {}
        }
        if !last {
            // Keep it: QEMU decodes the whole extent at once.
            self.collected.extend_from_slice(input);
            return Ok(Step {
                consumed: input.len(),
                output: &[],
            });
        }
        let mut out = std::mem::take(&mut self.out);
        out.resize(self.cluster, 0);
        let result = if self.collected.is_empty() {
            self.decompress(self.format, input, &mut out)
        } else {
            let mut all = std::mem::take(&mut self.collected);
            all.extend_from_slice(input);
            let r = self.decompress(self.format, &all, &mut out);
            self.collected = all;
            r
        };
        self.out = out;
        match result {
            Ok(()) => {
                self.phase = Phase::Done;
                Ok(Step {
                    consumed: input.len(),
                    output: &self.out,
                })
            }
            Err(e) => {
                self.phase = Phase::Failed(e);
                Err(e)
            }
        }
    }
}

/// [`HostDecoder::decompress`] with a decoder of its own.
pub fn decompress_cluster(
    format: Compression,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), DecodeError> {
    HostDecoder::new().decompress(format, input, out)
}

/// QEMU's zlib settings: `deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED,
/// -12, 9, Z_DEFAULT_STRATEGY)`.
const QEMU_DEFLATE: DeflateConfig = DeflateConfig {
    level: -1,
    method: Method::Deflated,
    window_bits: -12,
    mem_level: 9,
    strategy: Strategy::Default,
};

/// Compresses clusters as QEMU does, keeping its contexts from one
/// cluster to the next (one per thread). A zlib context whose stream did
/// not fit (a cluster stored plainly) is replaced by a new one: no state
/// outlives its cluster, however many clusters in a row do not compress.
pub struct HostCompressor {
    zlib: Option<zlib_rs::Deflate>,
    zstd: Option<CCtx<'static>>,
}

impl Default for HostCompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HostCompressor {
    /// A compressor; contexts are made on first use.
    pub fn new() -> Self {
        HostCompressor {
            zlib: None,
            zstd: None,
        }
    }

    /// Compresses the cluster `data` (a whole cluster: QEMU pads the last
    /// one of an image with zeros) into `out`: true when the result has
    /// at most `data.len() - 1` bytes, false when the cluster is to be
    /// stored plainly (`out` then holds nothing useful).
    pub fn compress(&mut self, format: Compression, data: &[u8], out: &mut Vec<u8>) -> bool {
        let limit = data.len().saturating_sub(1);
        out.clear();
        out.resize(limit, 0);
        let len = match format {
            Compression::Zlib => {
                let z = self
                    .zlib
                    .get_or_insert_with(|| zlib_rs::Deflate::new_with_config(QEMU_DEFLATE));
                z.reset();
                match z.compress(data, out, DeflateFlush::Finish) {
                    Ok(zlib_rs::Status::StreamEnd) => Some(z.total_out() as usize),
                    _ => {
                        // The stream was abandoned with output still pending.
                        // zlib-rs 0.6's `reset` then keeps the read position
                        // of its pending buffer, so every abandoned stream
                        // shrinks the buffer for the next until a stored
                        // block no longer fits and zlib-rs panics (after
                        // 128 KiB of clusters that do not compress). A
                        // finished stream leaves nothing pending; any other
                        // one gets a fresh state, as QEMU's per-cluster
                        // `deflateInit2` does.
                        self.zlib = None;
                        None
                    }
                }
            }
            Compression::Zstd => {
                let cctx = self.zstd.get_or_insert_with(CCtx::create);
                zstd_compress(cctx, data, out)
            }
        };
        match len {
            Some(n) if n <= limit => {
                out.truncate(n);
                true
            }
            _ => {
                out.clear();
                false
            }
        }
    }
}

/// One `ZSTD_compressStream2(e_end)`, as QEMU: finished in one call, or
/// the cluster does not compress.
fn zstd_compress(cctx: &mut CCtx<'_>, data: &[u8], out: &mut [u8]) -> Option<usize> {
    cctx.reset(zstd_safe::ResetDirective::SessionOnly).ok()?;
    let mut output = OutBuffer::around(out);
    let mut input = InBuffer::around(data);
    match cctx.compress_stream2(
        &mut output,
        &mut input,
        zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end,
    ) {
        Ok(0) => Some(output.pos()),
        _ => None,
    }
}

/// [`HostCompressor::compress`] with a compressor of its own: QEMU's
/// settings, `false` when the cluster does not shrink below
/// `data.len() - 1` bytes and is to be stored plainly.
pub fn compress_cluster(format: Compression, data: &[u8], out: &mut Vec<u8>) -> bool {
    HostCompressor::new().compress(format, data, out)
}

/// The cluster sizes an image may have, smallest first.
pub const CLUSTER_SIZES: [usize; 13] = [
    512,
    1 << 10,
    2 << 10,
    4 << 10,
    8 << 10,
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
];

/// Bytes of clusters one [`fuzz_compressors`] input may make: more than
/// the 128 KiB of clusters stored plainly in a row that it took zlib-rs to
/// fail when a compressor outlived its abandoned streams (257 clusters of
/// 512 B), and at least two of the largest.
const FUZZ_BUDGET: usize = 192 << 10;

/// Every this many clusters, a cluster is compared with a fresh
/// compressor's result (each comparison costs a compressor's set-up).
const FUZZ_FRESH_EVERY: usize = 8;

/// splitmix64: incompressible bytes from a seed, without a dependency.
fn fuzz_noise(seed: u64, out: &mut [u8]) {
    let mut x = seed;
    for chunk in out.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// Fills `cluster` with `bytes` repeated (zeros when there are none).
fn fuzz_repeat(bytes: &[u8], cluster: &mut [u8]) {
    if bytes.is_empty() {
        cluster.fill(0);
        return;
    }
    for (i, b) in cluster.iter_mut().enumerate() {
        *b = bytes[i % bytes.len()];
    }
}

/// Decodes one cluster from `stream` through `dec` as an image read feeds
/// it, `chunk` bytes a step (the last piece marked `last`), checking the
/// [`Decoder`] contract at each step (panics when it breaks: more consumed
/// than given, more than a cluster out, a stall with input left): the
/// cluster, or the decoder's error (`Corrupt("short")` when the stream
/// ends first).
pub fn decode_in_chunks(
    dec: &mut impl Decoder,
    format: Compression,
    stream: &[u8],
    cluster: usize,
    chunk: usize,
) -> Result<Vec<u8>, DecodeError> {
    dec.start(format, cluster)?;
    let mut out = Vec::with_capacity(cluster);
    let pieces: Vec<&[u8]> = if stream.is_empty() {
        vec![&[]]
    } else {
        stream.chunks(chunk.max(1)).collect()
    };
    for (i, mut bytes) in pieces.iter().copied().enumerate() {
        let last = i + 1 == pieces.len();
        while out.len() < cluster {
            let step = dec.step(bytes, last)?;
            assert!(step.consumed <= bytes.len(), "consumed more than given");
            out.extend_from_slice(step.output);
            assert!(out.len() <= cluster, "more than a cluster");
            if step.consumed == 0 && step.output.is_empty() {
                assert!(bytes.is_empty() || last, "stalled with input left");
                break;
            }
            bytes = &bytes[step.consumed..];
        }
        if out.len() == cluster {
            return Ok(out);
        }
    }
    Err(DecodeError::Corrupt("short"))
}

/// The core's no-heap inflate with QEMU's 4 KiB window over `stream`, fed
/// a sector at a time as an image read feeds it: the cluster, or `None`.
fn fuzz_core_inflate(state: &mut InflateState, stream: &[u8], cluster: usize) -> Option<Vec<u8>> {
    let mut window = [0u8; MIN_WINDOW];
    let mut dec = Inflate::new(state, &mut window);
    decode_in_chunks(&mut dec, Compression::Zlib, stream, cluster, SECTOR).ok()
}

/// The harness of the `codec` fuzz target (whose saved corpus `cargo test`
/// replays): many clusters of arbitrary, incompressible, mixed and
/// compressible data through one [`HostCompressor`] and one
/// [`HostDecoder`], switching formats at will. Panics when a promise
/// breaks: a cluster compresses differently than with a fresh compressor
/// (state outlived its cluster; compared for the first cluster that
/// compresses after some that did not, at every switch of format, and
/// every few clusters), a stream is not shorter than the cluster or does
/// not decode back to it (host decoder; for zlib also the core's inflate
/// with QEMU's 4 KiB window), a cluster of noise does not fall back to
/// being stored plainly (with an empty output), or zeros do not compress.
/// Nothing here may panic otherwise, whatever the input.
///
/// The first byte picks the cluster size (low 4 bits, modulo the 13 sizes
/// from 512 B to 2 MiB) and the first format (bit 4: zstd). Then each pair
/// of bytes `(op, arg)` makes clusters, `op`'s bit 7 switching the format
/// for them: noise (one cluster, or `arg + 1` in a row), zeros, `arg`
/// bytes of the input repeated, a cluster that is noise for its first
/// `arg / 256` and repetitive after, or the rest of the input as it is.
pub fn fuzz_compressors(input: &[u8]) {
    let Some((&first, mut script)) = input.split_first() else {
        return;
    };
    let cluster = CLUSTER_SIZES[usize::from(first & 15) % CLUSTER_SIZES.len()];
    let base = if first & 16 != 0 {
        Compression::Zstd
    } else {
        Compression::Zlib
    };
    let budget = FUZZ_BUDGET.max(2 * cluster);
    let mut compressor = HostCompressor::new();
    let mut decoder = HostDecoder::new();
    let mut data = vec![0u8; cluster];
    let mut stream = Vec::new();
    let mut fresh = Vec::new();
    let mut decoded = vec![0u8; cluster];
    let mut inflate = Box::new(InflateState::new());
    let mut made = 0usize;
    let mut seed = 0u64;
    // Whether the clusters just before did not compress.
    let mut suspect = false;
    let mut last_format = base;
    while let [op, arg, rest @ ..] = script {
        script = rest;
        let format = match (base, op & 0x80 != 0) {
            (f, false) => f,
            (Compression::Zlib, true) => Compression::Zstd,
            (Compression::Zstd, true) => Compression::Zlib,
        };
        let arg = usize::from(*arg);
        // How many clusters this op makes, and whether they must or must
        // not compress.
        let (count, expect) = match op % 6 {
            0 => (1, Some(false)),
            1 => (arg + 1, Some(false)),
            2 => (1, Some(true)),
            _ => (1, None),
        };
        for _ in 0..count {
            if made + cluster > budget {
                return;
            }
            made += cluster;
            seed += 1;
            match op % 6 {
                0 | 1 => fuzz_noise(seed, &mut data),
                2 => data.fill(0),
                3 => {
                    let take = arg.min(script.len());
                    fuzz_repeat(&script[..take], &mut data);
                    script = &script[take..];
                }
                4 => {
                    let split = cluster * arg / 256;
                    fuzz_noise(seed, &mut data[..split]);
                    fuzz_repeat(&input[..input.len().min(7)], &mut data[split..]);
                }
                _ => {
                    let take = cluster.min(script.len());
                    data[..take].copy_from_slice(&script[..take]);
                    data[take..].fill(0);
                    script = &script[take..];
                }
            }
            let compressed = compressor.compress(format, &data, &mut stream);
            let index = made / cluster;
            // After clusters that did not compress, the first that does.
            let after_failures = suspect && compressed;
            if after_failures || format != last_format || index.is_multiple_of(FUZZ_FRESH_EVERY) {
                let fresh_compressed = compress_cluster(format, &data, &mut fresh);
                assert_eq!(
                    (compressed, &stream),
                    (fresh_compressed, &fresh),
                    "{format:?}, {cluster} B: a reused compressor differs from a fresh one"
                );
            }
            suspect = !compressed;
            last_format = format;
            if let Some(expect) = expect {
                assert_eq!(compressed, expect, "{format:?}, {cluster} B, op {op}");
            }
            if !compressed {
                assert!(stream.is_empty(), "a cluster stored plainly has no stream");
                continue;
            }
            assert!(stream.len() < cluster, "{format:?}: stream not shorter");
            // In an image the stream is followed by its sector's padding.
            let padded = stream.len().div_ceil(SECTOR) * SECTOR;
            stream.resize(padded, 0);
            decoded.fill(0xa5);
            decoder
                .decompress(format, &stream, &mut decoded)
                .expect("a stream we wrote decodes");
            assert!(
                decoded == data,
                "{format:?}, {cluster} B: decodes differently"
            );
            if format == Compression::Zlib {
                let core = fuzz_core_inflate(&mut inflate, &stream, cluster);
                assert!(
                    core.as_deref() == Some(&data[..]),
                    "{cluster} B: the core's 4 KiB-window inflate differs"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_safe_types() {
        fn send<T: Send>() {}
        send::<HostDecoder>();
        send::<HostCompressor>();
        send::<HostWorkspace>();
    }
}
