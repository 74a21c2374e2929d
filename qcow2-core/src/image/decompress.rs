//! Reading a compressed cluster: its extent's sectors through the
//! workspace's decoder into wherever the caller wants the cluster.

#[cfg(feature = "write")]
use core::future::Future;

use crate::cache::SlotStorage;
use crate::codec::{Compression, DecodeError, Decoder, Parts, Step, Workspace};
use crate::engine::extent::CompressedExtent;
#[cfg(feature = "write")]
use crate::engine::release::StreamProbe;
use crate::engine::Engine;
use crate::image::fill::Target;
use crate::{BlockDevice, Corruption, Error, Feature, Sector, SECTOR};

/// Decompresses the compressed cluster of `len` bytes at host byte `host`
/// into `target`, applying QEMU's rules: the stream must yield a whole
/// cluster; what it holds after that is ignored. Reads only the extent's
/// sectors, and only those inside the device (the extent checked as
/// [`Engine::compressed_extent`] checks it).
pub(crate) async fn decompress<D, S, const K: usize, W>(
    engine: &mut Engine<D, S, K>,
    ws: &mut W,
    host: u64,
    len: u64,
    mut target: Target<'_>,
) -> Result<(), Error<D::Error>>
where
    D: BlockDevice,
    S: SlotStorage<K>,
    W: Workspace,
{
    let CompressedExtent {
        first_sector,
        sectors,
        skip,
        truncated,
    } = engine.compressed_extent(host, len)?;
    let cluster = engine.geo.cluster_size;
    let Parts {
        bounce,
        input,
        decoder,
    } = ws.parts();
    start(decoder, engine.header.compression_type, cluster, host)?;
    let input: &mut [Sector] = if input.is_empty() {
        core::slice::from_mut(&mut engine.scratch)
    } else {
        input
    };
    let bounce = bounce
        .get_mut(..engine.geo.cluster_sectors() as usize)
        .unwrap_or(&mut []);
    let mut acc: Sector = [0; SECTOR];
    let input_end = first_sector + sectors;
    let mut next = first_sector;
    let mut skip = skip;
    let mut produced: u64 = 0;
    while produced < cluster {
        if next >= input_end {
            return Err(ran_out(truncated, host));
        }
        let n = (input.len() as u64).min(input_end - next) as usize;
        let chunk = input
            .get_mut(..n)
            .ok_or(Error::Internal("input chunk past the buffer"))?;
        engine.dev.read(next, chunk).await.map_err(Error::Io)?;
        next += n as u64;
        let last = next == input_end;
        let mut bytes = chunk.as_flattened().get(skip..).unwrap_or(&[]);
        skip = 0;
        while produced < cluster {
            let step = decoder
                .step(bytes, last)
                .map_err(|e| decode_error(e, host))?;
            let consumed = step.consumed;
            let Some(data) = checked_output(step, bytes.is_empty() || last, cluster - produced)?
            else {
                break;
            };
            match &mut target {
                Target::Device { host: at, skip } => {
                    // Sector by sector through `acc`: no buffer to spare.
                    let (mut pos, mut rest) = (produced, data);
                    while let Some(sector) = fill_sector(&mut acc, &mut pos, &mut rest) {
                        if !(skip.0..skip.1).contains(&sector) {
                            engine
                                .dev
                                .data_write(*at + sector, core::slice::from_ref(&acc))
                                .await
                                .map_err(Error::Io)?;
                        }
                    }
                }
                other => place(other, bounce, produced, data)?,
            }
            produced += data.len() as u64;
            bytes = bytes.get(consumed..).unwrap_or(&[]);
        }
        if last && produced < cluster {
            return Err(Error::corrupt(Corruption::CompressedDataShort, host));
        }
    }
    if let Target::Device { .. } = target {
        engine.cache.note_device_write();
    }
    Ok(())
}

/// Starts `decoder` on a cluster of `cluster` bytes in the image's
/// compression type `type_byte` (stream at host byte `host`).
fn start<Z: Decoder, E>(
    decoder: &mut Z,
    type_byte: u8,
    cluster: u64,
    host: u64,
) -> Result<(), Error<E>> {
    let format =
        Compression::from_type(type_byte).ok_or(Error::Unsupported(Feature::CompressionType))?;
    decoder
        .start(format, cluster as usize)
        .map_err(|e| decode_error(e, host))
}

/// The error for a stream whose input ran out before a whole cluster:
/// the extent was cut at the device's end (`truncated`), or it is short.
fn ran_out<E>(truncated: bool, host: u64) -> Error<E> {
    let what = if truncated {
        Corruption::CompressedBeyondImage
    } else {
        Corruption::CompressedDataShort
    };
    Error::corrupt(what, host)
}

/// The output of one decoder step, checked against the decoder contract:
/// `None` when it needs more input (allowed only when `may_stall`: its
/// input is used up, or was the last), an error when it would pass the
/// `room` left in the cluster.
fn checked_output<E>(
    step: Step<'_>,
    may_stall: bool,
    room: u64,
) -> Result<Option<&[u8]>, Error<E>> {
    let data = step.output;
    if data.is_empty() && step.consumed == 0 {
        if !may_stall {
            // The contract: a decoder buffers partial input itself.
            return Err(Error::Internal("decoder stalled with input left"));
        }
        return Ok(None);
    }
    if data.len() as u64 > room {
        return Err(Error::Internal("decoder produced more than a cluster"));
    }
    Ok(Some(data))
}

/// Places decoded `data` (the cluster's bytes from byte `pos`) in a
/// memory target; `bounce` is the workspace's, cut to a cluster when it
/// holds one (else empty).
fn place<E>(
    target: &mut Target<'_>,
    bounce: &mut [Sector],
    pos: u64,
    data: &[u8],
) -> Result<(), Error<E>> {
    match target {
        Target::Caller { first, out } => {
            copy_overlap(out.as_flattened_mut(), *first * 512, pos, data)
        }
        Target::Bounce if !bounce.is_empty() => {
            copy_overlap(bounce.as_flattened_mut(), 0, pos, data)
        }
        Target::Bounce => return Err(Error::Internal("bounce buffer smaller than a cluster")),
        Target::Nowhere | Target::Device { .. } => {}
    }
    Ok(())
}

/// Copies the start of `rest` (decoded bytes from cluster byte `*pos`)
/// into `acc`, advancing both, until `acc` holds a whole sector or `rest`
/// runs out. Returns the cluster sector `acc` now holds whole, if any.
fn fill_sector(acc: &mut Sector, pos: &mut u64, rest: &mut &[u8]) -> Option<u64> {
    while !rest.is_empty() {
        let within = (*pos % SECTOR as u64) as usize;
        let take = (SECTOR - within).min(rest.len());
        let (now, later) = rest.split_at_checked(take)?;
        if let Some(dst) = acc.get_mut(within..within + take) {
            for (d, s) in dst.iter_mut().zip(now) {
                *d = *s;
            }
        }
        *pos += take as u64;
        *rest = later;
        if pos.is_multiple_of(SECTOR as u64) {
            return Some((*pos - 1) / SECTOR as u64);
        }
    }
    None
}

/// Copies the part of decompressed `data` (at byte `pos` of the cluster)
/// that falls in `dst`, which holds the cluster's bytes from `dst_start`.
fn copy_overlap(dst: &mut [u8], dst_start: u64, pos: u64, data: &[u8]) {
    let dst_end = dst_start + dst.len() as u64;
    let from = pos.max(dst_start);
    let to = (pos + data.len() as u64).min(dst_end);
    if from >= to {
        return;
    }
    let src = data.get((from - pos) as usize..(to - pos) as usize);
    let dst = dst.get_mut((from - dst_start) as usize..(to - dst_start) as usize);
    if let (Some(src), Some(dst)) = (src, dst) {
        // Equal lengths, but a zip proves it to the compiler (no panic site).
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s;
        }
    }
}

fn decode_error<E>(e: DecodeError, host: u64) -> Error<E> {
    match e {
        DecodeError::Corrupt(what) => Error::corrupt(Corruption::Stream(what), host),
        DecodeError::Unsupported(what) => Error::Unsupported(Feature::Decoder(what)),
    }
}

/// The workspace's decoder, asked by a release to decode a compressed
/// stream (rule 9).
#[cfg(feature = "write")]
pub(crate) struct DecodeProbe<'w, W>(pub(crate) &'w mut W);

#[cfg(feature = "write")]
impl<D, S, const K: usize, W> StreamProbe<D, S, K> for DecodeProbe<'_, W>
where
    D: BlockDevice,
    S: SlotStorage<K>,
    W: Workspace,
{
    fn decode<'a>(
        &'a mut self,
        engine: &'a mut Engine<D, S, K>,
        host: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), Error<D::Error>>> + 'a {
        decompress(engine, self.0, host, len, Target::Nowhere)
    }
}
