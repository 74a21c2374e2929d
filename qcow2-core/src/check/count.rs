//! Check's counting: the [`Visitor`] that counts each reference into the
//! window of clusters being counted and judges what the walk meets (entry
//! corruptions, COPIED flags, the statistics of `qemu-img check`, the
//! entries a repair rewrites).

use super::{Finding, Walk};
use crate::engine::visit::{Fault, Problem, Reference, Target, Tree, Visitor};

impl Visitor for Walk<'_> {
    fn refcount_structures(&self) -> bool {
        !self.skip_refcount_structures
    }

    fn reference(&mut self, r: &Reference) {
        match r.target {
            // As QEMU, contiguity is judged within one L2 table.
            Target::L2Table => self.next_contiguous = 0,
            Target::ExternalData => {
                self.guest_cluster(r);
                if r.copied() == Some(false) && self.audited(r) {
                    // A data file cluster's refcount is 1 by definition.
                    self.copied_error(Finding::CopiedData {
                        l2_entry: r.entry,
                        refcount: 1,
                        repaired: false,
                    });
                }
                // It holds no reference in the image file.
                return;
            }
            _ => self.guest_cluster(r),
        }
        let bits = u32::from(self.cluster_bits);
        let end = crate::format::shr_ceil(r.host.saturating_add(r.len), bits);
        for cluster in r.host >> bits..end {
            self.count(cluster);
        }
    }

    fn wants_refcount(&self, r: &Reference) -> bool {
        let has_refcount = matches!(r.target, Target::L2Table | Target::Data);
        has_refcount && self.audited(r)
    }

    fn refcount(&mut self, r: &Reference, stored: Option<u64>) {
        let Some(copied) = r.copied() else {
            return;
        };
        let Some(refcount) = stored.filter(|&n| (n == 1) != copied) else {
            return;
        };
        self.copied_error(match r.target {
            Target::L2Table => Finding::CopiedL2Table {
                l1_index: r.index,
                l1_entry: r.entry,
                refcount,
                repaired: false,
            },
            _ => Finding::CopiedData {
                l2_entry: r.entry,
                refcount,
                repaired: false,
            },
        });
    }

    fn fault(&mut self, fault: &Fault<'_>) -> bool {
        match fault.problem {
            Problem::RefcountStructure if self.audit => self.refcount_structure_error(),
            Problem::RefcountStructure => {}
            Problem::Outside => {
                if let Some(r) = fault.target {
                    self.guest_cluster(r);
                    self.note_reference(r);
                }
                self.entry_error();
            }
            _ => self.entry_error(),
        }
        self.fix_entries && fault.fix.is_some()
    }

    fn rewritten(&mut self, written: bool) {
        if written {
            self.entries_fixed += 1;
        } else {
            // An entry in the refcount table: fixed once a rebuild has
            // moved the table away.
            self.entries_deferred = true;
        }
    }
}

impl Walk<'_> {
    /// Whether `r` is in the active tree on the audit pass, where COPIED
    /// flags and statistics are judged.
    fn audited(&self, r: &Reference) -> bool {
        self.audit && r.tree == Tree::Active
    }

    /// The statistics of an allocated guest cluster of the active tree
    /// (valid or not, as QEMU counts them).
    fn guest_cluster(&mut self, r: &Reference) {
        let compressed = match r.target {
            Target::Compressed => true,
            Target::Data | Target::ExternalData => false,
            _ => return,
        };
        if !self.audited(r) {
            return;
        }
        self.report.allocated_clusters += 1;
        if compressed {
            self.report.compressed_clusters += 1;
            self.report.fragmented_clusters += 1;
            return;
        }
        if self.next_contiguous != 0 && r.host != self.next_contiguous {
            self.report.fragmented_clusters += 1;
        }
        self.next_contiguous = r.host + (1 << self.cluster_bits);
    }

    /// Notes the clusters an entry pointing nowhere valid points at (an L2
    /// table's first cluster alone).
    fn note_reference(&mut self, r: &Reference) {
        let bits = u32::from(self.cluster_bits);
        let from = r.host >> bits;
        let to = match r.target {
            Target::L2Table => from + 1,
            _ => crate::format::shr_ceil(r.host.saturating_add(r.len.max(1)), bits),
        };
        self.note_target(from, to);
    }
}
