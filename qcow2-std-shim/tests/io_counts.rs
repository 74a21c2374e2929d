//! Exact device I/O counts of the engine's basic workloads, as the
//! `sequential-storage` crate pins its flash operations: a change in how
//! many reads, writes or flushes an operation costs shows up here as a
//! failing `assert_eq!`, to be explained (and the numbers updated) on
//! purpose.
//!
//! Only the public API of `qcow2_core` and `qcow2_std_shim` is used, so the
//! core's internals can move freely. Every workload starts from a freshly
//! created image that is closed and opened again with an empty cache, so
//! the cache state is the same on every run; the counters are reset right
//! before the measured operation, and the flush that follows it is
//! measured separately. Unless stated otherwise: 64 KiB clusters, 16-bit
//! refcounts, v3, a cache of 8 slots of one sector (`[Slot<1>; 8]`, the
//! firmware cache).
//!
//! `cargo test -p qcow2-std-shim --test io_counts -- --nocapture` prints
//! the table (`print_table`); `IO_TRACE=1` also prints every device call
//! of each measured operation.

use qcow2_core::{
    BlockDevice, Compression, CreateOptions, NoBacking, OpenOptions, Qcow2, Sector, Slot, SECTOR,
};
use qcow2_std_shim::codec::{compress_cluster, HostWorkspace};
use qcow2_std_shim::{block_on, RamDevice};
use std::cell::Cell;
use std::fmt;

// ---------------------------------------------------------------------
// The counting device
// ---------------------------------------------------------------------

/// What a measured operation cost on the device. Compared whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    /// `read` calls.
    reads: u64,
    /// Sectors read by them.
    sectors_read: u64,
    /// `write` calls.
    writes: u64,
    /// Sectors written by them.
    sectors_written: u64,
    /// `flush` calls.
    flushes: u64,
    /// `write_zeros` calls (forwarded whole to the RAM device, so they are
    /// not also counted as writes).
    write_zeros: u64,
    /// Sectors zeroed by them.
    sectors_zeroed: u64,
    /// `discard` calls.
    discards: u64,
    /// Sectors discarded by them.
    sectors_discarded: u64,
    /// `set_sector_count` calls (growing the image file).
    resizes: u64,
    /// `is_zeroed` calls.
    is_zeroed: u64,
}

/// One device call, for `IO_TRACE=1`.
#[derive(Debug, Clone, Copy)]
enum Op {
    Read(u64, u64),
    Write(u64, u64),
    Flush,
    WriteZeros(u64, u64),
    Discard(u64, u64),
    Resize(u64),
    IsZeroed(u64, u64),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Byte offsets, as the image's metadata names them.
        let b = |s: u64| s * SECTOR as u64;
        match *self {
            Op::Read(s, n) => write!(f, "read   {:#x} +{n}", b(s)),
            Op::Write(s, n) => write!(f, "write  {:#x} +{n}", b(s)),
            Op::Flush => write!(f, "flush"),
            Op::WriteZeros(s, n) => write!(f, "zeros  {:#x} +{n}", b(s)),
            Op::Discard(s, n) => write!(f, "discard {:#x} +{n}", b(s)),
            Op::Resize(n) => write!(f, "resize {n} sectors"),
            Op::IsZeroed(s, n) => write!(f, "is_zeroed {:#x} +{n}", b(s)),
        }
    }
}

/// A [`RamDevice`] that counts (and records) every call of the
/// [`BlockDevice`] trait and forwards it.
#[derive(Debug, Default)]
struct Counting {
    inner: RamDevice,
    counts: Counts,
    ops: Vec<Op>,
    /// `sector_count` queries: synchronous and free (no device I/O), so
    /// they are kept out of [`Counts`] and not pinned.
    size_queries: Cell<u64>,
}

impl Counting {
    /// What was counted since the last call, resetting the counters.
    fn take(&mut self) -> (Counts, Vec<Op>) {
        self.size_queries.set(0);
        (
            std::mem::take(&mut self.counts),
            std::mem::take(&mut self.ops),
        )
    }
}

impl BlockDevice for Counting {
    type Error = <RamDevice as BlockDevice>::Error;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), Self::Error> {
        self.counts.reads += 1;
        self.counts.sectors_read += buf.len() as u64;
        self.ops.push(Op::Read(first, buf.len() as u64));
        self.inner.read(first, buf).await
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), Self::Error> {
        self.counts.writes += 1;
        self.counts.sectors_written += buf.len() as u64;
        self.ops.push(Op::Write(first, buf.len() as u64));
        self.inner.write(first, buf).await
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        self.counts.flushes += 1;
        self.ops.push(Op::Flush);
        self.inner.flush().await
    }

    fn sector_count(&self) -> u64 {
        self.size_queries.set(self.size_queries.get() + 1);
        self.inner.sector_count()
    }

    async fn set_sector_count(&mut self, n: u64) -> Result<(), Self::Error> {
        self.counts.resizes += 1;
        self.ops.push(Op::Resize(n));
        self.inner.set_sector_count(n).await
    }

    async fn write_zeros(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        self.counts.write_zeros += 1;
        self.counts.sectors_zeroed += count;
        self.ops.push(Op::WriteZeros(first, count));
        self.inner.write_zeros(first, count).await
    }

    async fn discard(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        self.counts.discards += 1;
        self.counts.sectors_discarded += count;
        self.ops.push(Op::Discard(first, count));
        self.inner.discard(first, count).await
    }

    async fn is_zeroed(&mut self, first: u64, count: u64) -> Result<bool, Self::Error> {
        self.counts.is_zeroed += 1;
        self.ops.push(Op::IsZeroed(first, count));
        self.inner.is_zeroed(first, count).await
    }
}

// ---------------------------------------------------------------------
// Images and measurement
// ---------------------------------------------------------------------

const SLOTS: usize = 8;
type Cache = [Slot<1>; SLOTS];
type Img = Qcow2<Counting, Cache>;
type WsImg = Qcow2<Counting, Cache, 1, NoBacking<Counting>, HostWorkspace>;

fn cache() -> Cache {
    [const { Slot::<1>::EMPTY }; SLOTS]
}

/// 64 KiB clusters, 16-bit refcounts, v3 (`CreateOptions`' defaults).
fn options(size: u64) -> CreateOptions {
    CreateOptions::new(size)
}

const CLUSTER_SECTORS: u64 = 128; // 64 KiB

/// A fresh image made with `options`, `setup` run on it, then closed.
fn prepared(options: CreateOptions, setup: impl FnOnce(&mut Img)) -> Counting {
    let mut img = block_on(Img::create(Counting::default(), cache(), options)).unwrap();
    setup(&mut img);
    let (dev, _) = block_on(img.close()).unwrap();
    dev
}

/// `dev` opened read-write with an empty cache, counters reset.
fn open(dev: Counting) -> Img {
    let mut img = block_on(Img::open(dev, cache(), OpenOptions::read_write())).unwrap();
    img.device_mut().take();
    img
}

/// The rows of one workload's table: a label and what it cost.
type Rows = Vec<(String, Counts)>;

/// Takes what the device counted since the last reset, under `label`.
fn measure(dev: &mut Counting, label: &str, rows: &mut Rows) -> Counts {
    let (counts, ops) = dev.take();
    if std::env::var_os("IO_TRACE").is_some() {
        eprintln!("--- {label}");
        for op in &ops {
            eprintln!("    {op}");
        }
    }
    rows.push((label.to_string(), counts));
    counts
}

fn sectors(n: usize, fill: u8) -> Vec<Sector> {
    vec![[fill; SECTOR]; n]
}

/// 4 KiB.
const SMALL: usize = 8;

fn print_rows(rows: &Rows) {
    for (label, c) in rows {
        eprintln!(
            "| {label} | {} ({} sect) | {} ({} sect) | {} | zeros {}, discards {} ({} sect), resizes {} |",
            c.reads,
            c.sectors_read,
            c.writes,
            c.sectors_written,
            c.flushes,
            c.write_zeros,
            c.discards,
            c.sectors_discarded,
            c.resizes,
        );
    }
}

// ---------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------

/// Workload 1: 4 KiB into an unallocated cluster of a fresh image, then flush.
fn allocating_write() -> Rows {
    let mut rows = Rows::new();
    let mut img = open(prepared(options(64 << 20), |_| {}));
    block_on(img.write(0, &sectors(SMALL, 1))).unwrap();
    measure(img.device_mut(), "1 allocating write: write", &mut rows);
    block_on(img.flush()).unwrap();
    measure(img.device_mut(), "1 allocating write: flush", &mut rows);
    rows
}

/// Workload 2: the cluster written again (in place), then flush.
fn overwrite_in_place() -> Rows {
    let mut rows = Rows::new();
    let dev = prepared(options(64 << 20), |img| {
        block_on(img.write(0, &sectors(SMALL, 1))).unwrap();
    });
    let mut img = open(dev);
    block_on(img.write(0, &sectors(SMALL, 2))).unwrap();
    measure(img.device_mut(), "2 overwrite in place: write", &mut rows);
    block_on(img.flush()).unwrap();
    measure(img.device_mut(), "2 overwrite in place: flush", &mut rows);
    rows
}

/// Workload 3: a compressed cluster overwritten by a normal 4 KiB write (copy on
/// write: the compressed extent is read, decoded, merged and released),
/// then flush.
fn overwrite_compressed() -> Rows {
    let mut rows = Rows::new();
    let cluster = 64 << 10;
    // The compressed cluster is written through an image with a workspace.
    let dev = {
        let img = block_on(Img::create(Counting::default(), cache(), options(64 << 20))).unwrap();
        let mut img: WsImg = img.with_workspace(HostWorkspace::new(cluster as u64));
        let mut stream = Vec::new();
        let data: Vec<u8> = (0..cluster).map(|i| (i / 1000) as u8).collect();
        assert!(compress_cluster(Compression::Zlib, &data, &mut stream));
        block_on(img.write_compressed(0, &stream)).unwrap();
        let (dev, _) = block_on(img.close()).unwrap();
        dev
    };
    let mut img: WsImg = open(dev).with_workspace(HostWorkspace::new(cluster as u64));
    block_on(img.write(0, &sectors(SMALL, 3))).unwrap();
    measure(img.device_mut(), "3 overwrite compressed: write", &mut rows);
    block_on(img.flush()).unwrap();
    measure(img.device_mut(), "3 overwrite compressed: flush", &mut rows);
    rows
}

/// Workload 4: discard of an allocated cluster, then flush.
fn discard_cluster() -> Rows {
    let mut rows = Rows::new();
    let dev = prepared(options(64 << 20), |img| {
        block_on(img.write(0, &sectors(CLUSTER_SECTORS as usize, 1))).unwrap();
    });
    let mut img = open(dev);
    block_on(img.discard(0, CLUSTER_SECTORS)).unwrap();
    measure(img.device_mut(), "4 discard: discard", &mut rows);
    block_on(img.flush()).unwrap();
    measure(img.device_mut(), "4 discard: flush", &mut rows);
    rows
}

/// Workload 5: the one-cluster write that makes the refcount table grow, then
/// flush: 512-byte clusters, 16-bit refcounts (a refcount block covers 256
/// clusters, the first table's 64 entries 8 MiB of host space).
fn reftable_growth() -> Rows {
    let mut rows = Rows::new();
    let mut options = options(16 << 20);
    options.cluster_bits = 9;
    let mut img = open(prepared(options, |_| {}));
    let before = img.header().refcount_table_clusters;
    // Fast-forward in bulk to just before the growth, then one-cluster
    // writes, each flushed, until one makes the table grow (guest cluster
    // 16,059: host clusters 0..16384 hold the data, the L2 tables and the
    // metadata by then).
    const BULK: u64 = 15_000;
    for start in (0..BULK).step_by(500) {
        block_on(img.write(start, &sectors(500, 5))).unwrap();
    }
    block_on(img.flush()).unwrap();
    assert_eq!(img.header().refcount_table_clusters, before, "grew early");
    let mut guest = BULK;
    loop {
        img.device_mut().take();
        block_on(img.write(guest, &sectors(1, 5))).unwrap();
        if img.header().refcount_table_clusters != before {
            break;
        }
        block_on(img.flush()).unwrap();
        guest += 1;
    }
    assert_eq!((before, guest), (1, 16_059));
    assert_eq!(img.header().refcount_table_clusters, 2);
    measure(img.device_mut(), "5 reftable growth: write", &mut rows);
    block_on(img.flush()).unwrap();
    measure(img.device_mut(), "5 reftable growth: flush", &mut rows);
    rows
}

/// Workload 6: 1,000 random 4 KiB reads of a fully allocated 64 MiB image.
fn random_reads() -> Rows {
    let mut rows = Rows::new();
    let size: u64 = 64 << 20;
    let dev = prepared(options(size), |img| {
        let chunk = sectors(2048, 6); // 1 MiB
        for start in (0..size / SECTOR as u64).step_by(2048) {
            block_on(img.write(start, &chunk)).unwrap();
        }
    });
    let mut img = open(dev);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = sectors(SMALL, 0);
    let slots = size / (SMALL * SECTOR) as u64;
    for _ in 0..1000 {
        // xorshift64
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let at = (rng % slots) * SMALL as u64;
        block_on(img.read(at, &mut buf)).unwrap();
    }
    measure(img.device_mut(), "6 1000 random 4 KiB reads", &mut rows);
    rows
}

/// Workload 7: 16 operations alternating an allocating 4 KiB write and the discard
/// of another allocated cluster, then flush.
fn alternating() -> Rows {
    let mut rows = Rows::new();
    // Odd clusters 1, 3, .. 15 allocated first; even ones get written.
    let dev = prepared(options(64 << 20), |img| {
        for c in (1..16).step_by(2) {
            block_on(img.write(c * CLUSTER_SECTORS, &sectors(SMALL, 7))).unwrap();
        }
    });
    let mut img = open(dev);
    for c in 0..16 {
        if c % 2 == 0 {
            block_on(img.write(c * CLUSTER_SECTORS, &sectors(SMALL, 8))).unwrap();
        } else {
            block_on(img.discard(c * CLUSTER_SECTORS, CLUSTER_SECTORS)).unwrap();
        }
    }
    measure(
        img.device_mut(),
        "7 alternate alloc/free x16: ops",
        &mut rows,
    );
    block_on(img.flush()).unwrap();
    measure(
        img.device_mut(),
        "7 alternate alloc/free x16: flush",
        &mut rows,
    );
    rows
}

/// Workload 7b: the same 16 operations grouped by direction (the 8 allocating
/// writes, then the 8 discards), then flush: the same cost as 7, since
/// releases wait for the flush whatever comes between them.
fn grouped() -> Rows {
    let mut rows = Rows::new();
    let dev = prepared(options(64 << 20), |img| {
        for c in (1..16).step_by(2) {
            block_on(img.write(c * CLUSTER_SECTORS, &sectors(SMALL, 7))).unwrap();
        }
    });
    let mut img = open(dev);
    for c in (0..16).step_by(2) {
        block_on(img.write(c * CLUSTER_SECTORS, &sectors(SMALL, 8))).unwrap();
    }
    for c in (1..16).step_by(2) {
        block_on(img.discard(c * CLUSTER_SECTORS, CLUSTER_SECTORS)).unwrap();
    }
    measure(img.device_mut(), "7b same ops grouped: ops", &mut rows);
    block_on(img.flush()).unwrap();
    measure(img.device_mut(), "7b same ops grouped: flush", &mut rows);
    rows
}

/// Workload 8: one 1 MiB write spanning 16 new clusters, then flush.
fn span_16_clusters() -> Rows {
    let mut rows = Rows::new();
    let mut img = open(prepared(options(64 << 20), |_| {}));
    block_on(img.write(0, &sectors(2048, 9))).unwrap();
    measure(
        img.device_mut(),
        "8 1 MiB write, 16 new clusters: write",
        &mut rows,
    );
    block_on(img.flush()).unwrap();
    measure(
        img.device_mut(),
        "8 1 MiB write, 16 new clusters: flush",
        &mut rows,
    );
    rows
}

/// Workload 9: two compressed clusters packed into one host cluster
/// (refcount 2), both discarded in one call, then flush: the second
/// release must see the first one's held decrease to know it frees the
/// cluster (rule 9's checks, then the discard).
fn shared_compressed_released_twice() -> Rows {
    let mut rows = Rows::new();
    let cluster = 64 << 10;
    let dev = {
        let img = block_on(Img::create(Counting::default(), cache(), options(64 << 20))).unwrap();
        let mut img: WsImg = img.with_workspace(HostWorkspace::new(cluster as u64));
        for guest in 0..2u64 {
            let data: Vec<u8> = (0..cluster)
                .map(|i| (i / 1000) as u8 ^ guest as u8)
                .collect();
            let mut stream = Vec::new();
            assert!(compress_cluster(Compression::Zlib, &data, &mut stream));
            block_on(img.write_compressed(guest, &stream)).unwrap();
        }
        let (dev, _) = block_on(img.close()).unwrap();
        dev
    };
    let mut img: WsImg = open(dev).with_workspace(HostWorkspace::new(cluster as u64));
    block_on(img.discard(0, 2 * CLUSTER_SECTORS)).unwrap();
    measure(
        img.device_mut(),
        "9 shared compressed x2: discard",
        &mut rows,
    );
    block_on(img.flush()).unwrap();
    measure(img.device_mut(), "9 shared compressed x2: flush", &mut rows);
    let mut scratch = vec![0u8; 1 << 16];
    let report = block_on(img.check(&mut scratch)).unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0));
    rows
}

// ---------------------------------------------------------------------
// The pinned numbers
// ---------------------------------------------------------------------

const NONE: Counts = Counts {
    reads: 0,
    sectors_read: 0,
    writes: 0,
    sectors_written: 0,
    flushes: 0,
    write_zeros: 0,
    sectors_zeroed: 0,
    discards: 0,
    sectors_discarded: 0,
    resizes: 0,
    is_zeroed: 0,
};

/// Prints `rows` and returns their counts, for one `assert_eq!`.
fn counted(rows: &Rows) -> Vec<Counts> {
    print_rows(rows);
    rows.iter().map(|(_, c)| *c).collect()
}

#[test]
fn print_table() {
    eprintln!("| workload | reads (sectors) | writes (sectors) | flushes | other |");
    eprintln!("|---|---|---|---|---|");
    for rows in [
        allocating_write(),
        overwrite_in_place(),
        overwrite_compressed(),
        discard_cluster(),
        reftable_growth(),
        random_reads(),
        alternating(),
        grouped(),
        span_16_clusters(),
        shared_compressed_released_twice(),
    ] {
        print_rows(&rows);
    }
}

// Layout of a fresh 64 KiB-cluster image (`create`): header 0x0, refcount
// table 0x10000, refcount block 0x20000, L1 table 0x30000; the first L2
// table then goes to 0x40000 and the first data cluster to 0x50000. With
// 16-bit refcounts one 512-byte refcount slice covers 256 clusters (16 MiB)
// and one L2 slice 64 guest clusters (4 MiB), so every workload below
// touches a single slice of each.

#[test]
fn w1_allocating_write() {
    let write = Counts {
        // L1 slice, refcount table slice, refcount block slice (allocating
        // the L2 table), and the new L2 table's first slice, read back
        // right after it was zeroed.
        reads: 4,
        sectors_read: 4,
        // The 4 KiB of guest data; metadata stays in the cache.
        writes: 1,
        sectors_written: 8,
        // The new L2 table (128 sectors) and the data cluster's other
        // 120 sectors.
        write_zeros: 2,
        sectors_zeroed: 248,
        // The device grows one cluster at a time: L2 table, data cluster.
        resizes: 2,
        ..NONE
    };
    let flush = Counts {
        // Refcount block slice, then the L1 slice and the L2 slice.
        writes: 3,
        sectors_written: 3,
        // Rules 1 and 3: data, zeroed L2 table and refcounts durable
        // before the L1/L2 slices; then the flush asked for.
        flushes: 2,
        ..NONE
    };
    assert_eq!(counted(&allocating_write()), [write, flush]);
}

#[test]
fn w2_overwrite_in_place() {
    let write = Counts {
        // L1 slice, L2 slice, and the refcount table slice: the check that
        // the data cluster is not a refcount block (`check_not_metadata`).
        reads: 3,
        sectors_read: 3,
        // The data, in place.
        writes: 1,
        sectors_written: 8,
        ..NONE
    };
    let flush = Counts {
        // Only the data needs making durable: nothing in the cache changed.
        flushes: 1,
        ..NONE
    };
    assert_eq!(counted(&overwrite_in_place()), [write, flush]);
}

#[test]
fn w3_overwrite_compressed() {
    let write = Counts {
        // L1, L2, refcount table and refcount block slices (allocating the
        // new cluster), the compressed stream's sector to decode it for
        // the copy on write, and the same sector again when the release
        // checks that the stream decodes to a whole cluster (rule 9).
        reads: 6,
        sectors_read: 6,
        // The new cluster whole (128 sectors, decoded and merged). The
        // release of the compressed cluster is held for the flush (rule
        // 2), so nothing else is written and nothing flushed yet.
        writes: 1,
        sectors_written: 128,
        // The new cluster.
        resizes: 1,
        ..NONE
    };
    let flush = Counts {
        // The flush cycle: refcount block slice (the increase), flush, L2
        // slice (the new entry), flush; then the held release applied:
        // the refcount block slice again with the decrease, flush.
        writes: 3,
        sectors_written: 3,
        flushes: 3,
        // The freed compressed cluster, after that (rule 6).
        discards: 1,
        sectors_discarded: 128,
        ..NONE
    };
    assert_eq!(counted(&overwrite_compressed()), [write, flush]);
}

#[test]
fn w4_discard() {
    let discard = Counts {
        // L1 and L2 slices, then refcount table and block slices: the
        // release reads the refcount it will lower. The zero flag goes
        // into the cached L2 slice and the decrease is held for the flush
        // (rule 2): nothing is written.
        reads: 4,
        sectors_read: 4,
        ..NONE
    };
    let flush = Counts {
        // The L2 slice with the zero flag (no refcount slice dirty, no
        // data unflushed: no flush before it), flush; then the held
        // release applied: the refcount block slice with the decrease,
        // flush.
        writes: 2,
        sectors_written: 2,
        flushes: 2,
        // The freed cluster, once nothing durable points at it.
        discards: 1,
        sectors_discarded: 128,
        ..NONE
    };
    assert_eq!(counted(&discard_cluster()), [discard, flush]);
}

#[test]
fn w5_reftable_growth() {
    // 512-byte clusters: header 0x0, refcount table 0x200 (one cluster, 64
    // blocks of 256 clusters: host clusters 0..16384), refcount block 0
    // 0x400. The cache is warm (the writes before left the L1 and L2
    // slices of the measured guest cluster in it).
    let write = Counts {
        // The old table (1 sector) copied; the header sector
        // (read-modify-write); the new table's slice and refcount block 0
        // to free the old table (rule 4). The new block's entry is written
        // whole (engine/tables.rs), not zeroed, read back and patched.
        reads: 4,
        sectors_read: 4,
        // New refcount block 0x800000 (covering itself and the new
        // table), the old table's copy 0x800200, the new entry 0x800400,
        // the header, and the guest data, which lands in the old table's
        // cluster 0x200, free again.
        writes: 5,
        sectors_written: 5,
        // The new block before it is filled in (the new table has no
        // tail past the copy and the new entry's sector).
        write_zeros: 1,
        sectors_zeroed: 1,
        // Rule 4: after the new block and table; after the header.
        flushes: 2,
        // Host clusters 16384..16387 at once.
        resizes: 1,
        ..NONE
    };
    let flush = Counts {
        // Refcount block 0 (old table freed and its cluster reused: a net
        // no-op, written anyway), then the L2 slice.
        writes: 2,
        sectors_written: 2,
        // Rule 1 (refcounts, flush, L2), then the flush asked for.
        flushes: 2,
        ..NONE
    };
    assert_eq!(counted(&reftable_growth()), [write, flush]);
}

#[test]
fn w6_random_reads() {
    let reads = Counts {
        // 1,000 data reads; 4 loads of the L1 slice and 578 of the 16 L2
        // slices (1,024 entries): 17 hot slices compete for 8 slots, and
        // the CLOCK replacement evicts even the L1 slice every read uses.
        reads: 1000 + 4 + 578,
        sectors_read: 8000 + 4 + 578,
        ..NONE
    };
    assert_eq!(counted(&random_reads()), [reads]);
}

#[test]
fn w7_alternating_alloc_and_free() {
    assert_eq!(counted(&alternating()), alternating_counts());
}

/// What workload 7 (and 7b) costs: the operations, then the flush.
fn alternating_counts() -> [Counts; 2] {
    // Guest clusters 1, 3, .. 15 live at 0x50000..0xc0000. Their releases
    // are held until the flush (rule 2), so the clusters they free are not
    // free yet (rule 6): every write allocates at the end of the device
    // (0xd0000..0x150000), which grows by 8 clusters where reusing the
    // freed ones grew it by 1; the 7 extra clusters are free (and
    // discarded) after the flush.
    let ops = Counts {
        // L1, L2, refcount table and block slices, once.
        reads: 4,
        sectors_read: 4,
        // The 8 data writes (8 sectors each); metadata stays in the cache.
        writes: 8,
        sectors_written: 8 * 8,
        // The rest of each data cluster.
        write_zeros: 8,
        sectors_zeroed: 8 * 120,
        // One per new data cluster.
        resizes: 8,
        ..NONE
    };
    let flush = Counts {
        // One flush cycle for all 16 operations: refcount block slice (8
        // increases), flush, L2 slice (8 entries, 8 zero flags), flush;
        // the 8 held releases (adjacent clusters: one range) applied, the
        // refcount block slice again, flush.
        writes: 3,
        sectors_written: 3,
        flushes: 3,
        // The 8 freed clusters, adjacent: one range.
        discards: 1,
        sectors_discarded: 8 * 128,
        ..NONE
    };
    [ops, flush]
}

#[test]
fn w7b_grouped_alloc_then_free() {
    // The 8 writes all allocate at the end of the device (0xd0000..
    // 0x150000) and the discards' releases are held for the flush, as in
    // workload 7: grouping the operations changes nothing any more, so
    // they cost exactly workload 7's figures.
    assert_eq!(counted(&grouped()), alternating_counts());
}

#[test]
fn w8_span_16_clusters() {
    let write = Counts {
        // L1, refcount table, refcount block, and the new L2 table's first
        // slice read back after zeroing.
        reads: 4,
        sectors_read: 4,
        // The 16 data clusters are contiguous: one write.
        writes: 1,
        sectors_written: 2048,
        // The new L2 table; no partial cluster, so no tail zeros.
        write_zeros: 1,
        sectors_zeroed: 128,
        // One resize per allocated cluster: the L2 table and 16 data.
        resizes: 17,
        ..NONE
    };
    let flush = Counts {
        // Refcount block slice (all 17 increases in one sector), L1 slice,
        // L2 slice (16 entries in one sector).
        writes: 3,
        sectors_written: 3,
        // Rules 1 and 3 as in workload 1: the 16 clusters share them.
        flushes: 2,
        ..NONE
    };
    assert_eq!(counted(&span_16_clusters()), [write, flush]);
}

#[test]
fn w9_shared_compressed_released_twice() {
    // Both streams packed at 0x50000 (refcount 2), in the first L2 slice.
    let discard = Counts {
        // L1, L2, refcount table and block slices; the first release sees
        // refcount 2 (it frees nothing: no probe), the second sees 1, its
        // own count less the first one's held decrease, so it frees the
        // cluster and rule 9's probe decodes its stream: one sector.
        reads: 5,
        sectors_read: 5,
        ..NONE
    };
    let flush = Counts {
        // The L2 slice (two zero flags), flush; the two held releases (the
        // same cluster: one entry, twice) applied, refcount block slice
        // (2 -> 0), flush.
        writes: 2,
        sectors_written: 2,
        flushes: 2,
        // The freed cluster.
        discards: 1,
        sectors_discarded: 128,
        ..NONE
    };
    assert_eq!(
        counted(&shared_compressed_released_twice()),
        [discard, flush]
    );
}
