//! What a walk over every metadata structure yields: each reference (what
//! it is, the host bytes it occupies, the entry that holds it) and each
//! faulty entry, handed to a [`Visitor`].
//!
//! The walk itself is `Engine::walk` (`check/walk.rs`): it reads the header's
//! pointers, the refcount table, every L1 and L2 table (the active one and
//! each snapshot's), the snapshot table and the bitmap directory, and calls
//! the visitor, synchronously, for what it finds. Check's counting is one
//! visitor; anything that needs to know which cluster is referenced from
//! where (compaction's reverse map, snapshots, resize) is another, with no
//! state of check's.

use crate::format::entry::COPIED;

/// What a reference points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The header's own cluster.
    Header,
    /// The active L1 table.
    L1Table,
    /// The refcount table.
    RefcountTable,
    /// A refcount block, from a refcount table entry.
    RefcountBlock,
    /// An L2 table, from an L1 entry.
    L2Table,
    /// A data cluster (or a preallocated zero cluster), from an L2 entry.
    Data,
    /// A compressed extent, from an L2 entry: `len` bytes, not a whole
    /// number of clusters.
    Compressed,
    /// A data cluster in the external data file, from an L2 entry: it
    /// occupies nothing in the image file.
    ExternalData,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table, from its snapshot table entry.
    SnapshotL1Table,
    /// The persistent bitmap directory, from the header extension.
    BitmapDirectory,
    /// A bitmap table, from its directory entry.
    BitmapTable,
    /// A bitmap data cluster, from a bitmap table entry.
    BitmapData,
}

/// Which tree of L1 and L2 tables a reference belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tree {
    /// None: the header, refcount structures, snapshot table, bitmaps.
    Image,
    /// The active L1 table and what it references.
    Active,
    /// A snapshot's L1 table and what it references.
    Snapshot,
}

/// One reference to host bytes of the image, and where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reference {
    /// What it points at.
    pub target: Target,
    /// The first host byte it occupies.
    pub host: u64,
    /// How many bytes it occupies (never 0: an empty table is no reference).
    pub len: u64,
    /// The host byte of the entry that holds it (0 for the header's own
    /// pointers: L1 table, refcount table, snapshot table).
    pub at: u64,
    /// The index of that entry in its table (0 for the header's pointers,
    /// the bitmap directory and a snapshot's L1 table).
    pub index: u64,
    /// The raw entry (as the walk reads it; 0 for the header's pointers).
    pub entry: u64,
    /// The tree it belongs to.
    pub tree: Tree,
}

impl Reference {
    /// A reference held by the header itself.
    pub const fn header(target: Target, host: u64, len: u64, tree: Tree) -> Self {
        Reference {
            target,
            host,
            len,
            at: 0,
            index: 0,
            entry: 0,
            tree,
        }
    }

    /// A reference held by the entry `entry`, index `index` of its table,
    /// at host byte `at`.
    pub const fn entry(
        target: Target,
        host: u64,
        len: u64,
        at: u64,
        index: u64,
        entry: u64,
        tree: Tree,
    ) -> Self {
        Reference {
            target,
            host,
            len,
            at,
            index,
            entry,
            tree,
        }
    }

    /// The entry's COPIED flag, for what has one: L2 tables and
    /// uncompressed data clusters.
    pub fn copied(&self) -> Option<bool> {
        match self.target {
            Target::L2Table | Target::Data | Target::ExternalData => Some(self.entry & COPIED != 0),
            _ => None,
        }
    }
}

/// What is wrong with an entry (or a structure) the walk met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Problem {
    /// Reserved bits set in an L1 or L2 entry (or COPIED on a compressed
    /// one); reads ignore them, the fix clears them.
    ReservedBits,
    /// An L1 or L2 entry pointing outside the device or at the header or
    /// the active L1 table; reading through it fails, the fix clears it.
    Outside,
    /// A table that cannot be read as its kind (the cache holds it, dirty,
    /// as another kind).
    Unreadable,
    /// An L2 entry an external data file cannot hold: compressed, or
    /// misaligned; the fix clears it.
    DataFile,
    /// A snapshot or bitmap structure that is invalid (its table outside
    /// the device, a directory too big or overrun), or snapshots in an
    /// image with a data file.
    Structure,
    /// The refcount table past the end of the device, or a refcount table
    /// entry that names no plausible block.
    RefcountStructure,
}

/// A faulty entry or structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fault<'a> {
    /// What is wrong.
    pub problem: Problem,
    /// The host byte of the faulty entry (0 for the header's pointers).
    pub at: u64,
    /// What a repair may write at `at` instead, if anything.
    pub fix: Option<u64>,
    /// Where the entry points, for [`Problem::Outside`].
    pub target: Option<&'a Reference>,
}

impl Fault<'_> {
    /// A fault with no fix and no target.
    pub const fn new(problem: Problem, at: u64) -> Self {
        Fault {
            problem,
            at,
            fix: None,
            target: None,
        }
    }

    /// A fault a repair may fix by writing `fix` at `at`.
    pub const fn fixable(problem: Problem, at: u64, fix: u64) -> Self {
        Fault {
            problem,
            at,
            fix: Some(fix),
            target: None,
        }
    }
}

/// What the walk calls for each reference and each fault, in the order it
/// meets them: the header's pointers, the refcount table's blocks, the
/// active L1 table (each L2 table, then its entries), the snapshots, the
/// bitmaps. Every method is synchronous: the walk does the I/O.
///
/// A reference reaches [`Visitor::reference`] when it is valid, and as
/// QEMU counts: one whose range ends a cluster or more past the end of the
/// device occupies nothing (the refcount table's is a fault). A data
/// cluster in an external data file is handed over too (as
/// [`Target::ExternalData`]: nothing in the image file), before the fault
/// of a misaligned one; an L2 data cluster or compressed extent pointing
/// nowhere valid comes as the target of a [`Problem::Outside`] fault.
pub(crate) trait Visitor {
    /// Whether the walk reads the refcount table and blocks (the rebuild
    /// counts without the old ones).
    fn refcount_structures(&self) -> bool {
        true
    }

    /// One valid reference.
    fn reference(&mut self, r: &Reference);

    /// Whether the visitor wants the stored refcount of the cluster `r`
    /// (just handed to [`Visitor::reference`]) starts at.
    fn wants_refcount(&self, _r: &Reference) -> bool {
        false
    }

    /// The stored refcount of the cluster `r` starts at (`None`: the
    /// refcount structures cannot say), when [`Visitor::wants_refcount`].
    fn refcount(&mut self, _r: &Reference, _stored: Option<u64>) {}

    /// One fault. Returns whether to rewrite its entry with its fix (the
    /// walk does, then calls [`Visitor::rewritten`]).
    fn fault(&mut self, _fault: &Fault<'_>) -> bool {
        false
    }

    /// A rewrite asked for by [`Visitor::fault`]: done, or (false) left
    /// alone because the entry lies in the refcount table, which stays as
    /// it is until a rebuild has moved it away (rule 4).
    fn rewritten(&mut self, _written: bool) {}
}

#[cfg(all(test, feature = "write"))]
mod tests {
    use super::*;
    use crate::testing::ram;
    use crate::{CreateOptions, Qcow2, Slot};
    use embassy_futures::block_on;

    /// A visitor with no state of check's: every reference, in order.
    struct Collect {
        refs: [Option<Reference>; 32],
        n: usize,
        faults: usize,
    }

    impl Visitor for Collect {
        fn reference(&mut self, r: &Reference) {
            if let Some(slot) = self.refs.get_mut(self.n) {
                *slot = Some(*r);
            }
            self.n += 1;
        }

        fn fault(&mut self, _: &Fault<'_>) -> bool {
            self.faults += 1;
            false
        }
    }

    /// An image made with create, plain writes and two compressed writes
    /// (packed into one host cluster): the walk yields each reference once,
    /// from the entry that holds it, and the references to each cluster
    /// are as many as its refcount.
    #[test]
    fn a_visitor_sees_every_reference_and_where_it_lives() {
        let mut cache = [const { Slot::<1>::EMPTY }; 8];
        let options = CreateOptions {
            cluster_bits: 9,
            ..CreateOptions::new(16 << 9)
        };
        let mut image = block_on(Qcow2::create(ram(), &mut cache, options)).unwrap();
        block_on(image.write(0, &[[7u8; 512]; 2])).unwrap();
        block_on(image.write_compressed(3, &[1u8; 100])).unwrap();
        block_on(image.write_compressed(4, &[2u8; 100])).unwrap();
        block_on(image.flush()).unwrap();
        let e = &mut image.engine;
        let mut v = Collect {
            refs: [None; 32],
            n: 0,
            faults: 0,
        };
        block_on(e.walk(&mut v)).unwrap();
        assert_eq!(v.faults, 0);
        assert!(v.n <= v.refs.len(), "{} references", v.n);
        let refs = || v.refs.iter().flatten();
        let of = |target| refs().filter(move |r| r.target == target);
        let one = |target| {
            let mut found = of(target);
            let r = *found.next().unwrap();
            assert!(found.next().is_none(), "{target:?} twice");
            r
        };

        // The header's own pointers live at 0.
        let geo = e.geo;
        for (target, host) in [
            (Target::Header, 0),
            (Target::L1Table, geo.l1_offset),
            (Target::RefcountTable, geo.reftable_offset),
        ] {
            let r = one(target);
            assert_eq!((r.host, r.at, r.entry), (host, 0, 0), "{target:?}");
        }
        // Refcount blocks from their refcount table entries.
        for r in of(Target::RefcountBlock) {
            assert_eq!(r.at, geo.reftable_entry_at(r.index));
            assert_eq!(r.entry, r.host);
        }
        // The L2 table from L1 entry 0, in the active tree.
        let l2 = one(Target::L2Table);
        assert_eq!(
            (l2.at, l2.index, l2.tree),
            (geo.l1_entry_at(0), 0, Tree::Active)
        );
        assert_eq!(l2.copied(), Some(true));
        // Each data cluster and compressed extent from its L2 entry.
        let guests = |target| of(target).map(|r: &Reference| (r.index, r.at));
        let expect = |g: u64| (g, geo.l2_entry_at(l2.host, g));
        assert!(guests(Target::Data).eq([0, 1].map(expect)));
        assert!(guests(Target::Compressed).eq([3, 4].map(expect)));
        for r in of(Target::Data) {
            assert_eq!((r.len, r.copied(), r.tree), (512, Some(true), Tree::Active));
        }
        for r in of(Target::Compressed) {
            assert_eq!((r.len >= 100, r.copied()), (true, None));
        }

        // A reverse map: references to each cluster, as many as its
        // refcount (two compressed clusters share one host cluster).
        let mut shared = 0;
        for cluster in 0..e.dev_clusters {
            let hits =
                |r: &&Reference| r.host >> 9 <= cluster && cluster < (r.host + r.len).div_ceil(512);
            let refs = refs().filter(hits).count() as u64;
            assert_eq!(
                refs,
                block_on(e.refcount(cluster)).unwrap(),
                "cluster {cluster}"
            );
            shared += u64::from(refs > 1);
        }
        assert_eq!(shared, 1);
    }
}
