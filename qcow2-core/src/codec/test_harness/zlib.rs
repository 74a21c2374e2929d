//! zlib on the host (zlib-rs through flate2): the encoder that makes test
//! streams and QEMU's read as the reference.

extern crate std;

use std::vec;
use std::vec::Vec;

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

use crate::codec::inflate::{Inflate, InflateState};

/// Memory for one [`Inflate`] decoder.
pub struct Mem {
    state: std::boxed::Box<InflateState>,
    window: Vec<u8>,
}

impl Mem {
    /// State and a window of `window` bytes.
    pub fn new(window: usize) -> Self {
        Mem {
            state: std::boxed::Box::default(),
            window: vec![0; window],
        }
    }

    pub fn decoder(&mut self) -> Inflate<'_> {
        Inflate::new(&mut self.state, &mut self.window)
    }
}

/// Raw deflate of `data` with a `bits`-bit window at `level`.
pub fn deflate(data: &[u8], bits: u8, level: u32) -> Vec<u8> {
    let mut c = Compress::new_with_window_bits(flate2::Compression::new(level), false, bits);
    let mut out = vec![0u8; data.len() + data.len() / 8 + 1024];
    let status = c
        .compress(data, &mut out, FlushCompress::Finish)
        .expect("deflate");
    assert_eq!(status, Status::StreamEnd);
    out.truncate(c.total_out() as usize);
    out
}

/// QEMU's read of a zlib compressed cluster: one inflate(Z_FINISH) into a
/// cluster buffer; the cluster iff the buffer was filled.
pub fn reference(stream: &[u8], cluster: usize) -> Option<Vec<u8>> {
    reference_why(stream, cluster).ok()
}

/// [`reference`], with zlib's message when it fails.
pub fn reference_why(stream: &[u8], cluster: usize) -> Result<Vec<u8>, std::string::String> {
    let mut d = Decompress::new_with_window_bits(false, 15);
    let mut out = vec![0u8; cluster];
    match d.decompress(stream, &mut out, FlushDecompress::Finish) {
        Ok(Status::StreamEnd | Status::BufError | Status::Ok)
            if d.total_out() as usize == cluster =>
        {
            Ok(out)
        }
        Ok(_) => Err("short".into()),
        Err(e) => Err(std::format!("{e}")),
    }
}
