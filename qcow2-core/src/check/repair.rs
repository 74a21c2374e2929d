//! The repair steps that follow an audit: table entries, refcounts in
//! place, COPIED flags and header bits.

use super::{Finding, Fix, Walk};
use crate::cache::Kind;
use crate::cache::SlotStorage;
use crate::check::CheckReport;
use crate::engine::geometry::ENTRY_BYTES;
use crate::engine::Engine;
use crate::format::{incompatible, L1Entry, L2Entry};
use crate::{BlockDevice, Error};

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// The `Repair::All` steps after the audit: entries, refcounts, COPIED
    /// flags, header bits.
    pub(super) async fn repair_all(
        &mut self,
        w: &mut Walk<'_>,
        mut report: CheckReport,
    ) -> Result<CheckReport, Error<D::Error>> {
        if report.corruptions > 0 || report.leaks > 0 {
            if w.tally.entries > 0 {
                self.fix_entries(w).await?;
            }
            if !w.rebuild {
                self.fix_refcounts_in_place(
                    w,
                    Fix {
                        leaks: true,
                        errors: true,
                    },
                )
                .await?;
            }
            if w.rebuild {
                (w.findings)(super::Finding::Rebuilding);
                self.rebuild_refcounts(w).await?;
                w.leaks_fixed = report.leaks;
                w.refcounts_fixed = w.tally.refcounts;
                if w.entries_deferred {
                    // The table they lay in has moved: fix them now.
                    self.fix_entries(w).await?;
                }
            }
            let copied_fixed = self.fix_copied_flags(&mut *w.findings, true).await?;
            report.leaks_fixed = w.leaks_fixed;
            report.corruptions_fixed = w.refcounts_fixed + w.entries_fixed + copied_fixed;
        }
        // The refcounts are consistent now: the dirty bit can go. The corrupt
        // bit goes only when nothing is left unrepaired.
        let mut clear = incompatible::DIRTY;
        if w.entries_fixed == w.tally.entries {
            clear |= incompatible::CORRUPT;
        }
        self.clear_incompatible(clear).await?;
        self.flush().await?;
        self.refcounts_stale = false;
        Ok(report)
    }

    /// Clears reserved bits and entries pointing nowhere valid (rule 8),
    /// unless some cluster is claimed twice.
    async fn fix_entries(&mut self, w: &mut Walk<'_>) -> Result<(), Error<D::Error>> {
        if self.mapping_shared(w).await? {
            return Ok(());
        }
        w.entries_deferred = false;
        w.fix_entries = true;
        w.reset(0);
        let walked = self.walk(w).await;
        w.fix_entries = false;
        walked?;
        self.flush().await
    }

    /// Whether some cluster is referenced twice by tables or data (the
    /// refcount structures left out: a repair moves them if they clash).
    /// With no snapshots that means two structures claim it, and a table
    /// that may also be someone's data is not rewritten.
    pub(super) async fn mapping_shared(
        &mut self,
        w: &mut Walk<'_>,
    ) -> Result<bool, Error<D::Error>> {
        w.skip_refcount_structures = true;
        let mut first = 0;
        let mut shared = false;
        while !shared {
            w.reset(first);
            self.walk(w).await?;
            let stop = (first + w.len).min(w.end);
            shared = (first..stop).any(|c| w.refs(c) > 1);
            first += w.len;
            if first >= w.end {
                break;
            }
        }
        w.skip_refcount_structures = false;
        Ok(shared)
    }

    /// Recounts and sets every refcount that differs (as `fix` allows) in
    /// place, through refcount blocks the audit found trustworthy.
    pub(super) async fn fix_refcounts_in_place(
        &mut self,
        w: &mut Walk<'_>,
        fix: Fix,
    ) -> Result<(), Error<D::Error>> {
        let saved = w.report;
        let mut start = 0;
        loop {
            w.reset(start);
            self.walk(w).await?;
            let end = w.end.max(self.dev_clusters);
            self.compare(w, end, fix).await?;
            start += w.len;
            if start >= end {
                break;
            }
        }
        w.report = saved;
        Ok(())
    }

    /// Sets COPIED on active L1/L2 entries exactly where the refcount is 1;
    /// returns how many entries changed. Entries pointing nowhere valid are
    /// left alone.
    ///
    /// Each one found is reported to `findings` (`repaired` when `write`;
    /// without it nothing is written: a report of the flags as they stand).
    pub(super) async fn fix_copied_flags(
        &mut self,
        findings: &mut dyn FnMut(Finding),
        write: bool,
    ) -> Result<u64, Error<D::Error>> {
        let cs = self.geo.cluster_size;
        let mut fixed = 0;
        for i in 0..self.geo.l1_entries {
            let at = self.geo.l1_entry_at(i);
            let raw = self.cache.read_u64(&mut self.dev, at, Kind::L1).await?;
            let l2 = L1Entry(raw).l2_offset();
            if l2 == 0 || !self.valid_clusters(l2, cs) {
                continue;
            }
            if let Some(refcount) = self.set_copied(at, Kind::L1, raw, l2, write).await? {
                fixed += 1;
                findings(Finding::CopiedL2Table {
                    l1_index: i,
                    l1_entry: raw,
                    refcount,
                    repaired: write,
                });
            }
            if self.refcount(self.geo.cluster_of(l2)).await? != 1 {
                // The table is also something else (data, perhaps): leave it.
                continue;
            }
            for j in 0..self.geo.l2_entries {
                let at = l2 + j * ENTRY_BYTES;
                let raw = self.cache.read_u64(&mut self.dev, at, Kind::L2).await?;
                let host = match self.decode_l2(raw) {
                    L2Entry::Data { offset, .. } => offset,
                    L2Entry::Zero { offset, .. } if offset != 0 => offset,
                    _ => continue,
                };
                if self.external_data() {
                    // Data file clusters have refcount 1 by definition.
                    let fixed_raw = raw | crate::format::entry::COPIED;
                    if self.geo.within_cluster(host) == 0 && fixed_raw != raw {
                        if write {
                            self.cache
                                .write_u64(&mut self.dev, at, Kind::L2, fixed_raw)
                                .await?;
                        }
                        fixed += 1;
                        findings(Finding::CopiedData {
                            l2_entry: raw,
                            refcount: 1,
                            repaired: write,
                        });
                    }
                } else if self.valid_clusters(host, cs) {
                    if let Some(refcount) = self.set_copied(at, Kind::L2, raw, host, write).await? {
                        fixed += 1;
                        findings(Finding::CopiedData {
                            l2_entry: raw,
                            refcount,
                            repaired: write,
                        });
                    }
                }
            }
        }
        Ok(fixed)
    }

    /// Rewrites the table entry `raw` at `at` (pointing at `host`) so that
    /// its COPIED flag says whether the refcount of `host` is exactly 1
    /// (only when `write`); returns that refcount when the flag is wrong.
    pub(super) async fn set_copied(
        &mut self,
        at: u64,
        kind: Kind,
        raw: u64,
        host: u64,
        write: bool,
    ) -> Result<Option<u64>, Error<D::Error>> {
        use crate::format::entry::COPIED;
        let refcount = self.refcount(host >> self.geo.cluster_bits).await?;
        let fixed = if refcount == 1 {
            raw | COPIED
        } else {
            raw & !COPIED
        };
        if fixed == raw {
            return Ok(None);
        }
        if write {
            self.cache.write_u64(&mut self.dev, at, kind, fixed).await?;
        }
        Ok(Some(refcount))
    }
}
