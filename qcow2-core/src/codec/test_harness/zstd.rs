//! zstd on the host (libzstd through the `zstd` crate): the encoder that
//! makes test frames and QEMU's read as the reference.

extern crate std;

use std::vec;
use std::vec::Vec;

use ::zstd::zstd_safe::{self, CCtx, CParameter, DCtx, InBuffer, OutBuffer};

use crate::codec::zstd::{Zstd, ZstdTables};

/// Memory for one [`Zstd`] decoder.
pub struct Mem {
    tables: std::boxed::Box<ZstdTables>,
    history: Vec<u8>,
    block: Vec<u8>,
    literals: Vec<u8>,
}

impl Mem {
    /// Tables, `history` bytes of history, and block and literals buffers
    /// of `scratch` bytes each.
    pub fn new(history: usize, scratch: usize) -> Self {
        Mem {
            tables: std::boxed::Box::new(ZstdTables::new()),
            history: vec![0; history],
            block: vec![0; scratch],
            literals: vec![0; scratch],
        }
    }

    pub fn decoder(&mut self) -> Zstd<'_> {
        Zstd::new(
            &mut self.tables,
            &mut self.history,
            &mut self.block,
            &mut self.literals,
        )
    }
}

/// A frame as QEMU writes it: one `ZSTD_compressStream2(e_end)` (content
/// size in the header, single segment), at `level`, with or without a
/// checksum.
pub fn frame(data: &[u8], level: i32, checksum: bool) -> Vec<u8> {
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .expect("level");
    cctx.set_parameter(CParameter::ChecksumFlag(checksum))
        .expect("checksum");
    let mut out = vec![0u8; data.len() + data.len() / 8 + 1024];
    let mut output = OutBuffer::around(&mut out[..]);
    let mut input = InBuffer::around(data);
    let left = cctx
        .compress_stream2(
            &mut output,
            &mut input,
            zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end,
        )
        .expect("compress");
    assert_eq!(left, 0);
    let n = output.pos();
    out.truncate(n);
    out
}

/// QEMU's read (`qcow2_zstd_decompress`) with libzstd.
pub fn reference(stream: &[u8], cluster: usize) -> Option<Vec<u8>> {
    let mut dctx = DCtx::create();
    let mut out = vec![0u8; cluster];
    let mut output = OutBuffer::around(&mut out[..]);
    let mut input = InBuffer::around(stream);
    let mut ret = 0;
    while output.pos() < cluster {
        let (i, o) = (input.pos(), output.pos());
        ret = dctx.decompress_stream(&mut output, &mut input).ok()?;
        if input.pos() <= i && output.pos() <= o {
            return None;
        }
    }
    (ret == 0).then_some(out)
}
