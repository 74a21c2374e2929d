//! The write plan: pure decisions, no device. A guest write is prepared
//! (each cluster's current L2 entry turned into a [`Placement`], then host
//! clusters allocated for the batch at once), executed (the data I/O, in
//! the order a [`Schedule`] gives) and committed (new L2 entries, then the
//! release of what they replaced). Prepare and commit change metadata;
//! execution only writes guest data: the seam that requests in flight
//! will use (prepare and commit under the metadata lock, data I/O outside
//! it).

use crate::format::L2Entry;

/// A fresh cluster's guest contents before the write: what fills the parts
/// of the cluster the write does not cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Zeros: an unallocated cluster without backing data, a zero cluster.
    Zeros,
    /// The backing device, at the cluster's guest offset.
    Backing,
    /// A compressed cluster: `len` bytes at host byte `host`.
    Compressed { host: u64, len: u64 },
    /// A data cluster shared with another reference (refcount above 1,
    /// COPIED clear): copy-on-write from host byte `host`.
    Shared { host: u64 },
}

/// Where one guest cluster of a write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    /// Host byte offset of the cluster (for `alloc`, set at allocation).
    pub(crate) host: u64,
    /// Host byte offset of its L2 entry.
    pub(crate) entry_at: u64,
    /// What fills a fresh cluster around the data.
    pub(crate) source: Source,
    /// The subclusters the write touches (bit `i`: subcluster `i`).
    pub(crate) mask: u32,
    /// Written whole (filled from `source` around the data) and linked by a
    /// new L2 entry at commit; otherwise written in place.
    pub(crate) fresh: bool,
    /// Needs a newly allocated host cluster (fresh, and not a preallocated
    /// zero cluster this image owns).
    pub(crate) alloc: bool,
}

impl Placement {
    /// A placeholder for unused batch slots.
    pub(crate) const EMPTY: Self = Placement {
        host: 0,
        entry_at: 0,
        source: Source::Zeros,
        mask: 0,
        fresh: false,
        alloc: false,
    };

    /// The mapping the new entry replaces, which the commit releases after
    /// the entry (rule 2): the cluster a copy-on-write copied from.
    pub(crate) const fn replaces(&self) -> L2Entry {
        match self.source {
            Source::Compressed { host, len } => L2Entry::Compressed { offset: host, len },
            Source::Shared { host } => L2Entry::Data {
                offset: host,
                copied: false,
            },
            Source::Zeros | Source::Backing => L2Entry::Unallocated,
        }
    }
}

/// Where a write to a guest cluster whose L2 entry (at host byte
/// `entry_at`) is `entry` goes; `backing`: the backing has data there;
/// `mask`: the subclusters the write touches.
pub(crate) fn place(entry: L2Entry, entry_at: u64, backing: bool, mask: u32) -> Placement {
    let fresh = |host: u64, source: Source, alloc: bool| Placement {
        host,
        entry_at,
        source,
        mask,
        fresh: true,
        alloc,
    };
    match entry {
        // Owned alone: overwritten in place.
        L2Entry::Data {
            offset,
            copied: true,
        } => Placement {
            host: offset,
            fresh: false,
            ..fresh(0, Source::Zeros, false)
        },
        L2Entry::Data {
            offset,
            copied: false,
        } => fresh(0, Source::Shared { host: offset }, true),
        L2Entry::Compressed { offset, len } => {
            fresh(0, Source::Compressed { host: offset, len }, true)
        }
        // A preallocated zero cluster this image owns is reused.
        L2Entry::Zero {
            offset,
            copied: true,
        } if offset != 0 => fresh(offset, Source::Zeros, false),
        L2Entry::Zero { .. } => fresh(0, Source::Zeros, true),
        L2Entry::Unallocated if backing => fresh(0, Source::Backing, true),
        L2Entry::Unallocated => fresh(0, Source::Zeros, true),
    }
}

/// One device operation of a batch's data I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Guest data `data[from..to]` to host sectors from `host`: a run of
    /// physically contiguous clusters, one device write.
    Data { host: u64, from: usize, to: usize },
    /// Zeros to `count` host sectors from `host`: the parts of a fresh
    /// cluster whose old contents are zeros that the write does not cover.
    Zeros { host: u64, count: u64 },
    /// Placement `index` written whole: its old contents from its source,
    /// with `data[from..to]` over them from cluster sector `skip`.
    Copy {
        index: usize,
        skip: u64,
        from: usize,
        to: usize,
    },
}

/// The data I/O of one batch, a [`Step`] at a time: `len` sectors of data
/// starting `within` sectors into the first placement's cluster, clusters
/// of `cluster_sectors` sectors. Runs of contiguous clusters coalesce; a
/// run reaches the device before the zeros that follow it.
pub(crate) struct Schedule {
    next: usize,
    within: u64,
    len: usize,
    cluster_sectors: u64,
    /// The pending run: host sector where it starts, data range.
    run: (u64, usize, usize),
    /// Steps decided but not handed out yet (at most three per placement).
    queue: [Option<Step>; 3],
}

impl Schedule {
    /// The schedule of a batch (see [`Schedule`]).
    pub(crate) const fn new(within: u64, len: usize, cluster_sectors: u64) -> Self {
        Schedule {
            next: 0,
            within,
            len,
            cluster_sectors,
            run: (0, 0, 0),
            queue: [None; 3],
        }
    }

    /// The next step for `plan` (the same slice every call), `None` when
    /// the batch is done.
    pub(crate) fn next(&mut self, plan: &[Placement]) -> Option<Step> {
        loop {
            if let Some(step) = self.pop() {
                return Some(step);
            }
            match plan.get(self.next) {
                Some(p) => {
                    self.schedule(self.next, p, plan.len() - 1);
                    self.next += 1;
                }
                None => {
                    let run = self.take_run();
                    self.next = usize::MAX;
                    return run;
                }
            }
        }
    }

    fn pop(&mut self) -> Option<Step> {
        let first = self.queue.iter().position(Option::is_some)?;
        self.queue.get_mut(first).and_then(Option::take)
    }

    fn push(&mut self, step: Option<Step>) {
        if let Some(slot) = self.queue.iter_mut().find(|s| s.is_none()) {
            *slot = step;
        }
    }

    /// The pending run as a step (emptied), if it holds data.
    fn take_run(&mut self) -> Option<Step> {
        let (host, from, to) = self.run;
        self.run = (host, to, to);
        (to > from).then_some(Step::Data { host, from, to })
    }

    /// Queues the steps placement `i` (of `last + 1`) needs.
    fn schedule(&mut self, i: usize, p: &Placement, last: usize) {
        let cs = self.cluster_sectors;
        let mask = cs - 1;
        let tail = (cs - ((self.within + self.len as u64) & mask)) & mask;
        let skip = if i == 0 { self.within } else { 0 };
        let host = p.host / crate::SECTOR as u64;
        let from = (i as u64 * cs).saturating_sub(self.within) as usize;
        let to = (((i + 1) as u64 * cs - self.within) as usize).min(self.len);
        let partial = skip > 0 || (i == last && tail > 0);
        if p.fresh && partial && p.source != Source::Zeros {
            // Copy-on-write of the cluster's old contents, on its own.
            let run = self.take_run();
            self.push(run);
            self.run = (0, to, to);
            self.push(Some(Step::Copy {
                index: i,
                skip,
                from,
                to,
            }));
            return;
        }
        if p.fresh && skip > 0 {
            self.push(Some(Step::Zeros { host, count: skip }));
        }
        let (run_host, run_from, run_to) = self.run;
        if run_to > run_from && run_host + (run_to - run_from) as u64 == host + skip {
            self.run.2 = to;
        } else {
            let run = self.take_run();
            self.push(run);
            self.run = (host + skip, from, to);
        }
        if p.fresh && i == last && tail > 0 {
            let run = self.take_run();
            self.push(run);
            let end = host + skip + (to - from) as u64;
            self.push(Some(Step::Zeros {
                host: end,
                count: tail,
            }));
        }
    }
}

#[cfg(test)]
mod tests;
