//! Consistency check and repair with bounded memory.
//!
//! The check walks every metadata structure and counts the references to
//! each host cluster, then compares the counts with the stored refcounts.
//! The counts live in a caller-provided scratch buffer (4 bytes a cluster);
//! when the image has more clusters than the buffer holds, the walk is
//! repeated once per window of clusters. A bigger buffer means fewer passes.

mod count;
#[cfg(feature = "write")]
mod in_place;
#[cfg(feature = "write")]
mod rebuild;
#[cfg(feature = "write")]
mod repair;
mod walk;

use crate::cache::SlotStorage;
use crate::engine::Engine;
use crate::{BlockDevice, Error};

/// Findings of a check, in `qemu-img check` terms.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that can lose data: references outside the image,
    /// misaligned or reserved-bit entries, refcounts below the number of
    /// references, COPIED flags that disagree with the refcount.
    pub corruptions: u64,
    /// Clusters whose refcount is above the number of references.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Guest clusters with allocated data (including compressed ones).
    pub allocated_clusters: u64,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// One past the last byte of the highest referenced cluster.
    pub image_end_offset: u64,
    /// Passes the check made over the metadata.
    pub passes: u32,
}

impl CheckReport {
    /// Whether the image is consistent (leaks are not inconsistencies).
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0
    }
}

/// One inconsistency found by a check, in the terms of the line
/// `qemu-img check` prints for it. Reported as the check finds them: see
/// [`crate::Qcow2::check_with`].
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finding {
    /// A cluster's refcount is above its references: "Leaked cluster
    /// {cluster} refcount={refcount} reference={references}" ("Repairing
    /// cluster ..." when `repaired`).
    Leak {
        /// The host cluster (index).
        cluster: u64,
        /// Its stored refcount.
        refcount: u64,
        /// The references the check counted.
        references: u64,
        /// Reported by a repair's pass that sets it right in place (the
        /// audit before reported it unrepaired).
        repaired: bool,
    },
    /// A cluster's refcount is below its references (0 where no refcount
    /// block covers it): "ERROR cluster {cluster} refcount={refcount}
    /// reference={references}" ("Repairing cluster ..." when `repaired`).
    Refcount {
        /// The host cluster (index).
        cluster: u64,
        /// Its stored refcount.
        refcount: u64,
        /// The references the check counted.
        references: u64,
        /// Reported by a repair's pass that sets it right in place.
        repaired: bool,
    },
    /// An active L1 entry's COPIED flag disagrees with its L2 table's
    /// refcount: "ERROR OFLAG_COPIED L2 cluster: l1_index={l1_index}
    /// l1_entry={l1_entry:x} refcount={refcount}" ("Repairing" when
    /// `repaired`: reported by the repair once the refcounts are right).
    CopiedL2Table {
        /// Index of the L1 entry.
        l1_index: u64,
        /// The raw L1 entry.
        l1_entry: u64,
        /// The L2 table's stored refcount.
        refcount: u64,
        /// Found by a repair's last step, which fixes it.
        repaired: bool,
    },
    /// An active L2 entry's COPIED flag disagrees with its data cluster's
    /// refcount: "ERROR OFLAG_COPIED data cluster: l2_entry={l2_entry:x}
    /// refcount={refcount}" ("Repairing" when `repaired`).
    CopiedData {
        /// The raw L2 entry.
        l2_entry: u64,
        /// The data cluster's stored refcount.
        refcount: u64,
        /// Found by a repair's last step, which fixes it.
        repaired: bool,
    },
    /// A repair rebuilds the refcount structures: "Rebuilding refcount
    /// structure".
    Rebuilding,
}

/// What a repair may change.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Lower refcounts that are too high (leaked clusters), in place. Fails
    /// without writing anything when the refcount structures themselves
    /// are untrustworthy (a rebuild is needed), as `qemu-img check -r
    /// leaks` does.
    Leaks,
    /// Everything: leaks, refcounts below the references (in place, or by a
    /// rebuild of every refcount structure in free space when the old ones
    /// cannot be trusted), reserved bits in table entries (cleared, the
    /// mapping kept), entries pointing nowhere valid (cleared: reading them
    /// fails anyway), COPIED flags; then the corrupt and dirty bits.
    All,
}

/// Corruptions found by the audit, by what repairs them.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    /// Table entries with reserved bits set or pointing nowhere valid:
    /// fixed by rewriting the entry, when that is safe.
    entries: u64,
    /// Refcounts below the references, bad refcount table entries, refcount
    /// blocks that are also something else: fixed by the refcount repair.
    refcounts: u64,
    /// COPIED flags that disagree with the stored refcount: judged again
    /// after the refcounts are repaired.
    copied: u64,
}

/// Which refcount differences a comparison repairs in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fix {
    leaks: bool,
    errors: bool,
}

impl Fix {
    const NOTHING: Fix = Fix {
        leaks: false,
        errors: false,
    };
}

/// State of one walk over the metadata.
struct Walk<'a> {
    counters: &'a mut [u8],
    /// Where the audit reports what it finds.
    findings: &'a mut dyn FnMut(Finding),
    /// Report COPIED flags during the walk (a check; a repair judges them
    /// after the refcounts are right).
    report_copied: bool,
    /// First cluster of the window being counted.
    start: u64,
    /// Clusters in the window.
    len: u64,
    /// Count entry corruptions and statistics (first pass only).
    audit: bool,
    /// Clear reserved bits, and entries that point nowhere valid.
    fix_entries: bool,
    /// Leave the refcount table and blocks out of the counts (rebuild).
    skip_refcount_structures: bool,
    /// One past the highest referenced cluster.
    end: u64,
    /// One past the highest cluster with a nonzero stored refcount.
    refcounted_end: u64,
    report: CheckReport,
    tally: Tally,
    /// The refcount structures cannot be trusted: rebuild them elsewhere.
    rebuild: bool,
    entries_fixed: u64,
    /// An entry to fix lies in the refcount table: left for after a
    /// rebuild has moved the table away.
    entries_deferred: bool,
    leaks_fixed: u64,
    refcounts_fixed: u64,
    /// Clusters `[from, to)` past the end of the device that a rebuild
    /// wants to use (empty: none): the walk notes entries pointing there
    /// (invalid now, valid once the device grows).
    avoid: (u64, u64),
    /// One past the highest cluster of `avoid` an entry points at.
    avoid_hit: u64,
    /// log2 of the cluster size.
    cluster_bits: u8,
    /// Where the next data cluster of the L2 table being walked would be,
    /// were it contiguous with the previous one (0: none yet).
    next_contiguous: u64,
}

impl Walk<'_> {
    fn count(&mut self, cluster: u64) {
        self.end = self.end.max(cluster + 1);
        if cluster < self.start || cluster - self.start >= self.len {
            return;
        }
        let i = ((cluster - self.start) * 4) as usize;
        if let Some(c) = self.counters.get_mut(i..i + 4) {
            let mut b = [0u8; 4];
            b.copy_from_slice(c);
            c.copy_from_slice(&u32::from_ne_bytes(b).saturating_add(1).to_ne_bytes());
        }
    }

    fn refs(&self, cluster: u64) -> u64 {
        let i = ((cluster - self.start) * 4) as usize;
        let mut b = [0u8; 4];
        if let Some(c) = self.counters.get(i..i + 4) {
            b.copy_from_slice(c);
        }
        u64::from(u32::from_ne_bytes(b))
    }

    /// Notes an entry pointing at clusters `[from, to)`.
    fn note_target(&mut self, from: u64, to: u64) {
        let (a, b) = self.avoid;
        if from < b && to > a {
            self.avoid_hit = self.avoid_hit.max(to.min(b));
        }
    }

    fn in_window(&self, cluster: u64) -> bool {
        cluster >= self.start && cluster - self.start < self.len
    }

    fn reset(&mut self, start: u64) {
        self.start = start;
        self.counters.fill(0);
    }

    /// A faulty table entry (counted once, on the audit pass).
    fn entry_error(&mut self) {
        if self.audit {
            self.report.corruptions += 1;
            self.tally.entries += 1;
        }
    }

    /// A COPIED flag that disagrees with the stored refcount (reported now
    /// by a check; a repair judges it again once the refcounts are right).
    fn copied_error(&mut self, finding: Finding) {
        self.report.corruptions += 1;
        self.tally.copied += 1;
        if self.report_copied {
            (self.findings)(finding);
        }
    }

    /// A fault in the refcount structures that only a rebuild repairs.
    fn refcount_structure_error(&mut self) {
        self.report.corruptions += 1;
        self.tally.refcounts += 1;
        self.rebuild = true;
    }
}

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// See [`crate::Qcow2::check`].
    pub(crate) async fn check(
        &mut self,
        scratch: &mut [u8],
    ) -> Result<CheckReport, Error<D::Error>> {
        self.check_and_repair(scratch, None, &mut |_| {}).await
    }

    /// See [`crate::Qcow2::check_with`].
    pub(crate) async fn check_with(
        &mut self,
        scratch: &mut [u8],
        findings: &mut dyn FnMut(Finding),
    ) -> Result<CheckReport, Error<D::Error>> {
        self.check_and_repair(scratch, None, findings).await
    }

    /// See [`crate::Qcow2::repair`].
    pub(crate) async fn repair(
        &mut self,
        scratch: &mut [u8],
        mode: Repair,
    ) -> Result<CheckReport, Error<D::Error>> {
        self.repair_with(scratch, mode, &mut |_| {}).await
    }

    /// See [`crate::Qcow2::repair_with`].
    pub(crate) async fn repair_with(
        &mut self,
        scratch: &mut [u8],
        mode: Repair,
        findings: &mut dyn FnMut(Finding),
    ) -> Result<CheckReport, Error<D::Error>> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        // What the cache holds reaches the disk first: a cluster freed but
        // not yet durably unmapped must not look unreferenced to the repair.
        self.flush_metadata().await?;
        self.check_and_repair(scratch, Some(mode), findings).await
    }

    async fn check_and_repair(
        &mut self,
        scratch: &mut [u8],
        mode: Option<Repair>,
        findings: &mut dyn FnMut(Finding),
    ) -> Result<CheckReport, Error<D::Error>> {
        // Refcounts must count the releases the cache holds.
        self.settle_releases().await?;
        self.require_data_file_known().await?;
        let len = (scratch.len() / 4) as u64;
        if len == 0 {
            return Err(Error::InvalidArgument(
                "check needs at least 4 bytes of scratch",
            ));
        }
        let mut w = Walk {
            counters: scratch,
            findings,
            report_copied: mode.is_none(),
            start: 0,
            len,
            audit: true,
            fix_entries: false,
            skip_refcount_structures: false,
            end: 0,
            refcounted_end: 0,
            report: CheckReport {
                total_clusters: self.geo.clusters_for(self.geo.virtual_size()),
                ..CheckReport::default()
            },
            tally: Tally::default(),
            rebuild: false,
            entries_fixed: 0,
            entries_deferred: false,
            leaks_fixed: 0,
            refcounts_fixed: 0,
            avoid: (0, 0),
            avoid_hit: 0,
            cluster_bits: self.geo.cluster_bits as u8,
            next_contiguous: 0,
        };
        // A hostile image may claim one cluster as two kinds of table.
        self.cache.set_relaxed(true);
        let result = self.audit_and_repair(&mut w, mode).await;
        self.cache.set_relaxed(false);
        result
    }

    async fn audit_and_repair(
        &mut self,
        w: &mut Walk<'_>,
        mode: Option<Repair>,
    ) -> Result<CheckReport, Error<D::Error>> {
        self.audit(w).await?;
        let mut report = w.report;
        // As qemu-img: the end of the last cluster in use or with a refcount.
        report.image_end_offset = w.end.max(w.refcounted_end) * self.geo.cluster_size;
        match mode {
            None => Ok(report),
            #[cfg(not(feature = "write"))]
            Some(_) => Err(Error::ReadOnly),
            #[cfg(feature = "write")]
            Some(Repair::Leaks) => {
                if w.rebuild {
                    return Err(Error::corrupt(
                        crate::Corruption::RefcountsNeedRebuild,
                        self.geo.reftable_offset,
                    ));
                }
                if report.leaks > 0 || report.corruptions > 0 {
                    // (A pass over corruptions alone fixes nothing, but
                    // reports them again, as QEMU's does.)
                    self.fix_refcounts_in_place(
                        w,
                        Fix {
                            leaks: true,
                            errors: false,
                        },
                    )
                    .await?;
                }
                report.leaks_fixed = w.leaks_fixed;
                self.flush().await?;
                // COPIED flags as they stand now, reported, not fixed.
                self.fix_copied_flags(&mut *w.findings, false).await?;
                if report.corruptions == 0 {
                    // No refcount below its references and the leaks set
                    // right: the refcounts are consistent (as QEMU, which
                    // marks the image clean after `-r leaks` then).
                    self.clear_incompatible(crate::format::incompatible::DIRTY)
                        .await?;
                    self.refcounts_stale = false;
                }
                Ok(report)
            }
            #[cfg(feature = "write")]
            Some(Repair::All) => self.repair_all(w, report).await,
        }
    }

    /// Counts references window by window and compares them with the
    /// stored refcounts, writing nothing.
    async fn audit(&mut self, w: &mut Walk<'_>) -> Result<(), Error<D::Error>> {
        let mut start = 0;
        loop {
            w.reset(start);
            self.walk(w).await?;
            w.report.passes += 1;
            w.audit = false;
            self.check_refblocks_unshared(w).await?;
            let end = w.end.max(self.dev_clusters);
            self.compare(w, end, Fix::NOTHING).await?;
            start += w.len;
            if start >= end {
                return Ok(());
            }
        }
    }

    /// Compares counted references with stored refcounts over the window,
    /// fixing differences in place as `fix` allows.
    async fn compare(
        &mut self,
        w: &mut Walk<'_>,
        end: u64,
        fix: Fix,
    ) -> Result<(), Error<D::Error>> {
        let stop = end.min(w.start + w.len);
        for cluster in w.start..stop {
            let refs = w.refs(cluster);
            let stored = self.stored_refcount(cluster).await?.unwrap_or(0);
            if stored > 0 {
                w.refcounted_end = cluster + 1;
            }
            if refs == stored {
                continue;
            }
            // Each pass reports each cluster once: the audit unrepaired,
            // a fixing pass what it fixes.
            let (refcount, references) = (stored, refs);
            (w.findings)(if stored > refs {
                Finding::Leak {
                    cluster,
                    refcount,
                    references,
                    repaired: fix.leaks,
                }
            } else {
                Finding::Refcount {
                    cluster,
                    refcount,
                    references,
                    repaired: fix.errors && stored != 0,
                }
            });
            if stored == 0 {
                // No refcount block to fix it in: only a rebuild helps.
                w.refcount_structure_error();
            } else if stored > refs {
                w.report.leaks += 1;
                if fix.leaks {
                    self.set_refcount(cluster, refs).await?;
                    w.leaks_fixed += 1;
                }
            } else {
                w.report.corruptions += 1;
                w.tally.refcounts += 1;
                if fix.errors {
                    self.set_refcount(cluster, refs).await?;
                    w.refcounts_fixed += 1;
                }
            }
        }
        Ok(())
    }

    /// The refcount table and each refcount block must be referenced by
    /// themselves alone: one that is also data or another table holds no
    /// refcounts worth keeping (and must not be written), so the structures
    /// are rebuilt elsewhere.
    async fn check_refblocks_unshared(&mut self, w: &mut Walk<'_>) -> Result<(), Error<D::Error>> {
        let table = self.geo.cluster_of(self.geo.reftable_offset);
        let table_end = self
            .geo
            .clusters_for(self.geo.reftable_offset + self.geo.reftable_bytes());
        for c in table..table_end.min(self.dev_clusters) {
            if w.in_window(c) && w.refs(c) != 1 {
                w.refcount_structure_error();
            }
        }
        for i in 0..self.geo.reftable_entries {
            if let Some(block) = self.refblock_entry(i).await? {
                if w.in_window(self.geo.cluster_of(block))
                    && w.refs(self.geo.cluster_of(block)) != 1
                {
                    w.refcount_structure_error();
                }
            }
        }
        Ok(())
    }
}
