use super::*;
use crate::SECTOR;
use embassy_futures::block_on;

/// A RAM device of 32 sectors with a chosen map of holes, that records
/// which sectors were written and can fail reads at one sector.
struct Ram {
    data: [Sector; 32],
    len: u64,
    /// Sectors `seek_*` report unmapped.
    holes: [bool; 32],
    written: [bool; 32],
    reads: usize,
    flushes: usize,
    fail_read_at: Option<u64>,
    /// Answer every seek with its own argument (contradictory).
    liar: bool,
}

impl Ram {
    fn new(len: u64) -> Self {
        let mut data = [[0; SECTOR]; 32];
        for (i, s) in data.iter_mut().enumerate() {
            s[0] = i as u8;
            s[SECTOR - 1] = 0xa5;
        }
        Ram {
            data,
            len,
            holes: [false; 32],
            written: [false; 32],
            reads: 0,
            flushes: 0,
            fail_read_at: None,
            liar: false,
        }
    }

    /// Marks `[start, end)` as a hole and zeroes it.
    fn hole(mut self, start: usize, end: usize) -> Self {
        for i in start..end {
            self.holes[i] = true;
            self.data[i] = [0; SECTOR];
        }
        self
    }

    fn sector(&self, i: usize) -> Sector {
        self.data[i]
    }
}

impl BlockDevice for Ram {
    type Error = u64;
    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), u64> {
        let end = first + buf.len() as u64;
        if end > self.len {
            return Err(first);
        }
        if let Some(bad) = self.fail_read_at.filter(|&b| (first..end).contains(&b)) {
            return Err(bad);
        }
        self.reads += 1;
        buf.copy_from_slice(&self.data[first as usize..end as usize]);
        Ok(())
    }
    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), u64> {
        let end = first + buf.len() as u64;
        if end > self.len {
            return Err(first);
        }
        self.data[first as usize..end as usize].copy_from_slice(buf);
        self.written[first as usize..end as usize].fill(true);
        Ok(())
    }
    async fn flush(&mut self) -> Result<(), u64> {
        self.flushes += 1;
        Ok(())
    }
    fn sector_count(&self) -> u64 {
        self.len
    }
    async fn set_sector_count(&mut self, _: u64) -> Result<(), u64> {
        Err(u64::MAX)
    }
}

impl SeekableDevice for Ram {
    async fn seek_mapped(&mut self, from: u64) -> Result<u64, u64> {
        if self.liar {
            return Ok(from);
        }
        Ok((from..self.len)
            .find(|&i| !self.holes[i as usize])
            .unwrap_or(self.len))
    }
    async fn seek_unmapped(&mut self, from: u64) -> Result<u64, u64> {
        if self.liar {
            return Ok(from);
        }
        Ok((from..self.len)
            .find(|&i| self.holes[i as usize])
            .unwrap_or(self.len))
    }
}

fn blank(len: u64) -> Ram {
    let mut r = Ram::new(len);
    r.data = [[0; SECTOR]; 32];
    r
}

#[test]
fn compare_finds_the_first_difference_across_chunks() {
    block_on(async {
        let (mut a, mut b) = (Ram::new(20), Ram::new(20));
        let mut ba = [[0; SECTOR]; 3];
        let mut bb = [[0; SECTOR]; 7];
        assert_eq!(compare(&mut a, &mut b, &mut ba, &mut bb).await, Ok(None));
        // Chunks of 3: the difference sits in the middle of one.
        b.data[13][100] ^= 1;
        b.data[17][0] ^= 1;
        assert_eq!(
            compare(&mut a, &mut b, &mut ba, &mut bb).await,
            Ok(Some(13))
        );
        b.data[19] = [0; SECTOR];
        b.data[13] = a.sector(13);
        b.data[17] = a.sector(17);
        // The last, short chunk.
        assert_eq!(
            compare(&mut a, &mut b, &mut bb, &mut ba).await,
            Ok(Some(19))
        );
    });
}

#[test]
fn compare_refuses_different_sizes_and_empty_buffers() {
    block_on(async {
        let (mut a, mut b) = (Ram::new(20), Ram::new(21));
        let mut ba = [[0; SECTOR]; 3];
        let mut bb = [[0; SECTOR]; 3];
        assert_eq!(
            compare(&mut a, &mut b, &mut ba, &mut bb).await,
            Err(UtilError::DifferentSizes {
                source: 20,
                destination: 21
            })
        );
        assert_eq!(
            compare(&mut a, &mut b.clone_ram(), &mut [], &mut bb).await,
            Err(UtilError::EmptyBuffer)
        );
        assert_eq!(a.reads + b.reads, 0);
        // Read errors name the side.
        let mut c = Ram::new(20);
        c.fail_read_at = Some(4);
        assert_eq!(
            compare(&mut a, &mut c, &mut ba, &mut bb).await,
            Err(UtilError::Destination(4))
        );
        assert_eq!(
            compare(&mut c, &mut a, &mut ba, &mut bb).await,
            Err(UtilError::Source(4))
        );
    });
}

impl Ram {
    fn clone_ram(&self) -> Ram {
        let mut r = Ram::new(self.len);
        r.data = self.data;
        r.holes = self.holes;
        r
    }
}

#[test]
fn copy_copies_everything_and_flushes() {
    block_on(async {
        let mut src = Ram::new(23);
        let mut dst = blank(23);
        let mut buf = [[0; SECTOR]; 4];
        copy(&mut src, &mut dst, &mut buf).await.unwrap();
        assert!(dst.data[..dst.len as usize] == src.data[..src.len as usize]);
        assert!(dst.written[..23].iter().all(|&w| w));
        assert_eq!(dst.flushes, 1);
        // 23 sectors in chunks of 4: 6 reads.
        assert_eq!(src.reads, 6);
        assert_eq!(
            copy(&mut src, &mut blank(22), &mut buf).await,
            Err(UtilError::DifferentSizes {
                source: 23,
                destination: 22
            })
        );
        assert_eq!(
            copy(&mut src, &mut dst, &mut []).await,
            Err(UtilError::EmptyBuffer)
        );
        src.fail_read_at = Some(9);
        let mut dst = blank(23);
        assert_eq!(
            copy(&mut src, &mut dst, &mut buf).await,
            Err(UtilError::Source(9))
        );
        // The prefix before the failing chunk was copied.
        assert!(dst.written[..8].iter().all(|&w| w));
        assert!(!dst.written[8]);
    });
}

#[test]
fn sparse_copy_writes_only_what_is_mapped() {
    block_on(async {
        let mut src = Ram::new(30).hole(0, 4).hole(10, 21).hole(29, 30);
        let mut dst = blank(30);
        let mut buf = [[0; SECTOR]; 4];
        sparse_copy(&mut src, &mut dst, &mut buf).await.unwrap();
        assert!(dst.data[..dst.len as usize] == src.data[..src.len as usize]);
        for i in 0..30 {
            assert_eq!(dst.written[i], !src.holes[i], "sector {i}");
        }
        assert_eq!(dst.flushes, 1);
        // Through borrows, with an all-mapped wrapper: a full copy.
        let mut all = crate::seek::AllMapped(&mut src);
        let mut dst = blank(30);
        sparse_copy(&mut all, &mut dst, &mut buf).await.unwrap();
        assert!(dst.written[..30].iter().all(|&w| w));
        assert_eq!(
            sparse_copy(&mut src, &mut blank(31), &mut buf).await,
            Err(UtilError::DifferentSizes {
                source: 30,
                destination: 31
            })
        );
    });
}

#[test]
fn contradictory_seeks_still_terminate() {
    block_on(async {
        let mut src = Ram::new(10);
        src.liar = true;
        let mut dst = blank(10);
        let mut buf = [[0; SECTOR]; 3];
        sparse_copy(&mut src, &mut dst, &mut buf).await.unwrap();
        assert!(dst.data[..dst.len as usize] == src.data[..src.len as usize]);
        let regions = fold_unmapped(&mut src, 0, |n, _, _| Ok::<_, ()>(n + 1)).await;
        assert_eq!(regions, Ok(0));
        let seen = fold_mapped(&mut src, &mut buf, 0, |n, _, d| Ok::<_, ()>(n + d.len())).await;
        assert_eq!(seen, Ok(10));
    });
}

#[test]
fn fold_visits_every_chunk_in_order() {
    block_on(async {
        let mut dev = Ram::new(10);
        let mut buf = [[0; SECTOR]; 4];
        let visited = fold(
            &mut dev,
            &mut buf,
            (0u64, 0usize),
            |(next, n), sector, d| {
                assert_eq!(sector, next);
                for (i, s) in d.iter().enumerate() {
                    assert_eq!(u64::from(s[0]), sector + i as u64);
                }
                Ok::<_, ()>((sector + d.len() as u64, n + 1))
            },
        )
        .await;
        assert_eq!(visited, Ok((10, 3)));
        // A callback error stops the fold at once.
        let stopped = fold(&mut dev, &mut buf, 0, |n, sector, _| {
            if sector >= 4 {
                Err("enough")
            } else {
                Ok(n + 1)
            }
        })
        .await;
        assert_eq!(stopped, Err(UtilError::Callback("enough")));
        assert_eq!(
            fold(&mut dev, &mut [], 0, |n, _, _| Ok::<_, ()>(n)).await,
            Err(UtilError::EmptyBuffer)
        );
        dev.fail_read_at = Some(5);
        assert_eq!(
            fold(&mut dev, &mut buf, 0, |n, _, _| Ok::<_, ()>(n)).await,
            Err(UtilError::Source(5))
        );
    });
}

#[test]
fn folds_over_mapped_and_unmapped_regions() {
    block_on(async {
        let mut dev = Ram::new(30).hole(0, 4).hole(10, 21).hole(29, 30);
        let mut buf = [[0; SECTOR]; 4];
        let mut chunks = [(0u64, 0usize); 8];
        let n = fold_mapped(&mut dev, &mut buf, 0, |n: usize, sector, d| {
            for (i, s) in d.iter().enumerate() {
                assert_eq!(u64::from(s[0]), sector + i as u64);
            }
            chunks[n] = (sector, d.len());
            Ok::<_, ()>(n + 1)
        })
        .await
        .unwrap();
        // Mapped: 4..10 and 21..29, each in chunks of at most 4.
        assert_eq!(chunks[..n], [(4, 4), (8, 2), (21, 4), (25, 4)]);

        let mut holes = [(0u64, 0u64); 4];
        let n = fold_unmapped(&mut dev, 0, |n: usize, start, len| {
            holes[n] = (start, len);
            Ok::<_, ()>(n + 1)
        })
        .await
        .unwrap();
        assert_eq!(holes[..n], [(0, 4), (10, 11), (29, 1)]);

        // Nothing mapped at all, or nothing unmapped.
        let mut empty = Ram::new(8).hole(0, 8);
        let calls = fold_mapped(&mut empty, &mut buf, 0, |n, _, _| Ok::<_, ()>(n + 1)).await;
        assert_eq!(calls, Ok(0));
        assert_eq!(empty.reads, 0);
        let holes = fold_unmapped(&mut Ram::new(8), 0, |n, _, _| Ok::<_, ()>(n + 1)).await;
        assert_eq!(holes, Ok(0));
        let stopped = fold_unmapped(&mut dev, (), |_, _, _| Err(7)).await;
        assert_eq!(stopped, Err(UtilError::Callback(7)));
    });
}

#[test]
fn errors_display() {
    extern crate std;
    use std::string::ToString;
    let e: UtilError<u8, u8, u8> = UtilError::DifferentSizes {
        source: 1,
        destination: 2,
    };
    assert_eq!(e.to_string(), "devices differ in size: 1 and 2 sectors");
    let e: FoldError<u8, &str> = UtilError::Callback("no");
    assert_eq!(e.to_string(), "callback: \"no\"");
    let e: UtilError<u8> = UtilError::Source(3);
    assert_eq!(e.to_string(), "source device: 3");
}
