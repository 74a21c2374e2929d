//! Releases wait in the cache until the flush after their entry change;
//! their clusters are discarded after that. These tests fail the flush
//! cycle part-way and go on writing, as a caller retrying after a
//! transient device error would: a discard left queued must never punch a
//! cluster handed out again since.

use qcow2_core::{BlockDevice, CreateOptions, OpenOptions, Qcow2, Sector, Slot, SECTOR};
use qcow2_std_shim::{block_on, RamDevice};

/// A RAM device whose discards punch holes (the sectors read as zeros, as
/// a punched file does) and whose `fail_flush`-th flush from now fails.
#[derive(Default)]
struct Punching {
    inner: RamDevice,
    fail_flush: Option<u32>,
    discards: u32,
}

impl BlockDevice for Punching {
    type Error = <RamDevice as BlockDevice>::Error;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), Self::Error> {
        self.inner.read(first, buf).await
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), Self::Error> {
        self.inner.write(first, buf).await
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        match self.fail_flush {
            Some(0) => {
                self.fail_flush = None;
                // Any device error will do: a read past the end gives one.
                let end = self.inner.sector_count();
                self.inner.read(end, &mut [[0; SECTOR]]).await
            }
            Some(n) => {
                self.fail_flush = Some(n - 1);
                self.inner.flush().await
            }
            None => self.inner.flush().await,
        }
    }

    fn sector_count(&self) -> u64 {
        self.inner.sector_count()
    }

    async fn set_sector_count(&mut self, n: u64) -> Result<(), Self::Error> {
        self.inner.set_sector_count(n).await
    }

    async fn discard(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        self.discards += 1;
        self.inner.write_zeros(first, count).await
    }
}

type Img = Qcow2<Punching, Vec<Slot<1>>>;

const CLUSTER: u64 = 128; // sectors of a 64 KiB cluster

fn cluster_of(fill: u8) -> Vec<Sector> {
    vec![[fill; SECTOR]; CLUSTER as usize]
}

/// For each flush of the cycle after a discard, fail it, then write a new cluster (which may reuse the
/// discarded one's host cluster), flush successfully, and read everything
/// back, also after a reopen; `qemu-img`-style consistency is checked with
/// our own check (no corruption).
#[test]
fn a_failed_flush_never_lets_a_queued_discard_punch_reused_data() {
    // The cycle after a discard flushes twice: after the mapping, after
    // the applied releases (their discards then go out).
    for failing in 0..2 {
        let cache = vec![Slot::<1>::EMPTY; 16];
        let mut img = block_on(Img::create(
            Punching::default(),
            cache,
            CreateOptions::new(16 * CLUSTER * SECTOR as u64),
        ))
        .unwrap();
        block_on(img.write(0, &cluster_of(0xa1))).unwrap();
        block_on(img.write(CLUSTER, &cluster_of(0xb2))).unwrap();
        block_on(img.flush()).unwrap();
        block_on(img.discard(0, CLUSTER)).unwrap();
        img.device_mut().fail_flush = Some(failing);
        let first = block_on(img.flush());
        assert!(first.is_err(), "flush {failing} of the cycle did not fail");
        img.device_mut().fail_flush = None;
        // The host cluster freed by the discard is the lowest free one:
        // a new cluster takes it once its release has been applied.
        let wrote = block_on(img.write(2 * CLUSTER, &cluster_of(0xc3)));
        assert!(
            wrote.is_ok(),
            "failing flush {failing} (first flush: {first:?}): {wrote:?}"
        );
        block_on(img.flush()).unwrap();
        let mut back = cluster_of(0);
        for (sector, fill) in [(0, 0), (CLUSTER, 0xb2), (2 * CLUSTER, 0xc3)] {
            block_on(img.read(sector, &mut back)).unwrap();
            assert!(
                back.iter().all(|s| s.iter().all(|&b| b == fill)),
                "failing flush {failing} (first flush: {first:?}): guest sector {sector} is not {fill:#x}"
            );
        }
        let mut scratch = vec![0u8; 4096];
        let report = block_on(img.check(&mut scratch)).unwrap();
        assert_eq!(report.corruptions, 0, "failing flush {failing}: {report:?}");
        let (dev, cache) = block_on(img.close()).unwrap();
        let mut img = block_on(Img::open(dev, cache, OpenOptions::read_only())).unwrap();
        block_on(img.read(2 * CLUSTER, &mut back)).unwrap();
        assert!(back.iter().all(|s| s.iter().all(|&b| b == 0xc3)));
    }
}
