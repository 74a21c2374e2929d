//! The bounded metadata cache.
//!
//! Every metadata access (L1, L2, refcount table, refcount blocks) goes
//! through fixed-size slices held in caller-provided [`Slot`]s. Lookup is a
//! hash index threaded through the slots themselves (no extra storage) and
//! replacement is CLOCK. Write-back order, the crash-safety rules of
//! `ORDERING.md`, lives in [`order`].

mod order;

use crate::{BlockDevice, Corruption, Error, Sector, SECTOR};

/// Ranges of freed host sectors held for discarding after the next flush;
/// a discard over scattered clusters flushes once per this many ranges.
const DISCARD_RANGES: usize = 4;

/// Releases held until the next flush ([`order::Held`]: ranges of clusters
/// freed in a row count as one); freeing scattered clusters costs a flush
/// cycle per this many.
#[cfg(feature = "write")]
const HELD_RELEASES: usize = 4;

/// No slice: the `recent` shortcut's empty value (slice tags are aligned).
const NO_TAG: u64 = u64::MAX;

/// A slot index in a hash chain, stored plus one so that zero bytes (an
/// empty slot, a static cache in `.bss`) mean "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link(u32);

impl Link {
    const NONE: Link = Link(0);

    /// A link to slot `i` (`i < u32::MAX`, bounded in [`Cache::new`]).
    const fn to(i: u32) -> Link {
        Link(i.wrapping_add(1))
    }

    const fn get(self) -> Option<u32> {
        self.0.checked_sub(1)
    }
}

/// What a cached slice holds; decides write-back order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Part of the L1 table (first: an empty slot's zero bytes).
    L1,
    /// Part of an L2 table.
    L2,
    /// Part of the refcount table.
    RefTable,
    /// Part of a refcount block.
    RefBlock,
}

impl Kind {
    const fn is_refcount(self) -> bool {
        matches!(self, Kind::RefTable | Kind::RefBlock)
    }

    const fn index(self) -> usize {
        match self {
            Kind::L1 => 0,
            Kind::L2 => 1,
            Kind::RefTable => 2,
            Kind::RefBlock => 3,
        }
    }
}

/// One cache entry: a metadata slice of up to `K` sectors plus its tag.
///
/// Callers only allocate these (`[const { Slot::EMPTY }; N]` or a boxed
/// slice); the image manages their contents. An empty slot is all zero
/// bytes, so a `static` cache costs no flash (it goes to `.bss`).
#[derive(Clone)]
pub struct Slot<const K: usize> {
    /// Host byte offset of the cached slice; meaningful when `used`.
    tag: u64,
    /// Next slot in this slot's hash chain.
    next: Link,
    /// First slot of the hash chain whose bucket is this slot's index.
    head: Link,
    used: bool,
    kind: Kind,
    dirty: bool,
    referenced: bool,
    data: [Sector; K],
}

impl<const K: usize> Slot<K> {
    /// An unused slot, for building cache arrays.
    pub const EMPTY: Self = Slot {
        tag: 0,
        next: Link::NONE,
        head: Link::NONE,
        used: false,
        kind: Kind::L1,
        dirty: false,
        referenced: false,
        data: [[0; SECTOR]; K],
    };
}

/// Internal invariant broken: reported rather than panicking.
const fn broken<E>() -> Error<E> {
    Error::Internal("metadata cache index out of range")
}

/// Storage for cache slots of `K` sectors each: an array, a slice, a
/// mutable reference to either; whatever lends out `[Slot<K>]`.
pub trait SlotStorage<const K: usize>: AsMut<[Slot<K>]> + AsRef<[Slot<K>]> {}

impl<const K: usize, T: AsMut<[Slot<K>]> + AsRef<[Slot<K>]>> SlotStorage<K> for T {}

/// The cache proper, over caller-owned slot storage `S`.
pub(crate) struct Cache<S, const K: usize> {
    slots: S,
    /// Bytes per slice: `K * 512`, or the cluster size when that is smaller.
    slice_bytes: u64,
    /// log2 of `slice_bytes`.
    slice_shift: u32,
    /// The slot last used for each kind: lookups of the same slice again
    /// (the common case) skip the hash. Checked against the slot's tag.
    recent: [(u64, u32); 4],
    hand: u32,
    dirty_refcount: u32,
    dirty_mapping: u32,
    /// Some device write since the last device flush.
    device_unflushed: bool,
    /// Host sectors of freed clusters to discard after the next flush.
    pending_discard: heapless::Vec<(u64, u64), DISCARD_RANGES>,
    /// Refcount decreases waiting for the entry changes that cause them to
    /// be durable (rules 2 and 6).
    #[cfg(feature = "write")]
    held: heapless::Vec<order::Held, HELD_RELEASES>,
    /// Lazy refcounts: L1/L2 slices need not wait for refcount slices.
    lazy_refcounts: bool,
    /// A clean slice may be read as another kind of table than it was
    /// loaded as (for `check`, which must read what a hostile image claims
    /// both ways); otherwise such a clash is an error.
    relaxed: bool,
}

impl<S: SlotStorage<K>, const K: usize> Cache<S, K> {
    /// Takes over `slots`, clearing them, for an image of `cluster_size`;
    /// gives them back with the error when they cannot serve as a cache.
    pub(crate) fn new<E>(
        mut slots: S,
        cluster_size: u64,
        lazy_refcounts: bool,
    ) -> Result<Self, (Error<E>, S)> {
        let n = slots.as_ref().len();
        if n == 0 || n >= u32::MAX as usize {
            return Err((
                Error::InvalidArgument("cache needs between 1 and 2^32-2 slots"),
                slots,
            ));
        }
        if K == 0 || !K.is_power_of_two() {
            return Err((
                Error::InvalidArgument("cache slice size must be a power of two sectors"),
                slots,
            ));
        }
        for slot in slots.as_mut() {
            slot.used = false;
            slot.next = Link::NONE;
            slot.head = Link::NONE;
            slot.dirty = false;
            slot.referenced = false;
        }
        let slice_bytes = ((K * SECTOR) as u64).min(cluster_size);
        Ok(Cache {
            slots,
            slice_bytes,
            slice_shift: slice_bytes.trailing_zeros(),
            recent: [(NO_TAG, 0); 4],
            hand: 0,
            dirty_refcount: 0,
            dirty_mapping: 0,
            device_unflushed: false,
            pending_discard: heapless::Vec::new(),
            #[cfg(feature = "write")]
            held: heapless::Vec::new(),
            lazy_refcounts,
            relaxed: false,
        })
    }

    /// Allows or forbids reading a clean slice as another kind of table.
    pub(crate) fn set_relaxed(&mut self, relaxed: bool) {
        self.relaxed = relaxed;
    }

    /// Gives the slot storage back.
    pub(crate) fn into_slots(self) -> S {
        self.slots
    }

    /// Bytes per slice.
    #[cfg(test)]
    pub(crate) const fn slice_bytes(&self) -> u64 {
        self.slice_bytes
    }

    /// log2 of [`Cache::slice_bytes`].
    pub(crate) const fn slice_shift(&self) -> u32 {
        self.slice_shift
    }

    fn len(&self) -> u32 {
        // Bounded in `new`.
        self.slots.as_ref().len() as u32
    }

    fn bucket(&self, tag: u64) -> u32 {
        let key = tag >> self.slice_shift;
        // Multiplicative hash, then a multiply-shift onto 0..len (no division).
        let h = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        ((h * u64::from(self.len())) >> 32) as u32
    }

    fn slot<E>(&self, i: u32) -> Result<&Slot<K>, Error<E>> {
        self.slots.as_ref().get(i as usize).ok_or(broken())
    }

    fn slot_mut<E>(&mut self, i: u32) -> Result<&mut Slot<K>, Error<E>> {
        self.slots.as_mut().get_mut(i as usize).ok_or(broken())
    }

    fn find(&self, tag: u64) -> Option<u32> {
        let slots = self.slots.as_ref();
        let mut link = slots.get(self.bucket(tag) as usize)?.head;
        // A chain never holds more than every slot once.
        for _ in 0..slots.len() {
            let i = link.get()?;
            let s = slots.get(i as usize)?;
            if s.tag == tag {
                return Some(i);
            }
            link = s.next;
        }
        None
    }

    fn link<E>(&mut self, i: u32, tag: u64, kind: Kind) -> Result<(), Error<E>> {
        let b = self.bucket(tag);
        let head = self.slot::<E>(b)?.head;
        let s = self.slot_mut(i)?;
        s.tag = tag;
        s.used = true;
        s.kind = kind;
        s.next = head;
        s.referenced = true;
        self.slot_mut(b)?.head = Link::to(i);
        Ok(())
    }

    /// Removes slot `i` from its chain and marks it empty (dropping dirt).
    fn unlink<E>(&mut self, i: u32) -> Result<(), Error<E>> {
        let s = self.slot::<E>(i)?;
        let (tag, next) = (s.tag, s.next);
        if !s.used {
            return Ok(());
        }
        if s.dirty {
            self.clear_dirty(i)?;
        }
        let b = self.bucket(tag);
        let me = Link::to(i);
        let mut cur = self.slot::<E>(b)?.head;
        if cur == me {
            self.slot_mut(b)?.head = next;
        } else {
            for _ in 0..self.len() {
                let Some(c) = cur.get() else { break };
                if self.slot::<E>(c)?.next == me {
                    self.slot_mut(c)?.next = next;
                    break;
                }
                cur = self.slot::<E>(c)?.next;
            }
        }
        let s = self.slot_mut(i)?;
        s.used = false;
        s.next = Link::NONE;
        Ok(())
    }

    fn clear_dirty<E>(&mut self, i: u32) -> Result<(), Error<E>> {
        let s = self.slot_mut::<E>(i)?;
        if s.dirty {
            s.dirty = false;
            if s.kind.is_refcount() {
                self.dirty_refcount -= 1;
            } else {
                self.dirty_mapping -= 1;
            }
        }
        Ok(())
    }

    fn mark_dirty<E>(&mut self, i: u32) -> Result<(), Error<E>> {
        let s = self.slot_mut::<E>(i)?;
        if !s.dirty {
            s.dirty = true;
            if s.kind.is_refcount() {
                self.dirty_refcount += 1;
            } else {
                self.dirty_mapping += 1;
            }
        }
        Ok(())
    }

    /// CLOCK: the first empty slot, or the first not recently referenced.
    fn victim<E>(&mut self) -> Result<u32, Error<E>> {
        let n = self.len();
        for _ in 0..=2 * n {
            let i = self.hand;
            // Wrap without a division (n > 0, bounded in `new`).
            self.hand = if self.hand + 1 >= n { 0 } else { self.hand + 1 };
            let s = self.slot_mut::<E>(i)?;
            if !s.used || !s.referenced {
                return Ok(i);
            }
            s.referenced = false;
        }
        Ok(self.hand)
    }

    fn sectors(&self) -> usize {
        (self.slice_bytes >> 9) as usize
    }

    /// Returns the slot holding the slice at `offset`, loading it on a miss.
    async fn load<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        offset: u64,
        kind: Kind,
    ) -> Result<u32, Error<D::Error>> {
        let tag = offset & !(self.slice_bytes - 1);
        if let Some(&(recent, i)) = self.recent.get(kind.index()) {
            if recent == tag {
                if let Some(s) = self.slots.as_mut().get_mut(i as usize) {
                    if s.used && s.tag == tag && s.kind == kind {
                        s.referenced = true;
                        return Ok(i);
                    }
                }
            }
        }
        let i = self.find_or_load(dev, tag, kind).await?;
        if let Some(r) = self.recent.get_mut(kind.index()) {
            *r = (tag, i);
        }
        Ok(i)
    }

    /// [`Cache::load`] without the recent-slot shortcut.
    async fn find_or_load<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        tag: u64,
        kind: Kind,
    ) -> Result<u32, Error<D::Error>> {
        if let Some(i) = self.find(tag) {
            let relaxed = self.relaxed;
            let s = self.slot_mut::<D::Error>(i)?;
            if s.kind != kind {
                if !relaxed || s.dirty {
                    // One cluster cannot be, say, an L2 table and a refcount block.
                    return Err(Error::corrupt(Corruption::TableKindConflict, tag));
                }
                // `check` reads a cluster claimed by two tables both ways.
                s.kind = kind;
            }
            s.referenced = true;
            return Ok(i);
        }
        let i = self.victim()?;
        self.clean_for_reuse(dev, i).await?;
        self.unlink(i)?;
        let sectors = self.sectors();
        let s = self.slot_mut(i)?;
        let data = s.data.get_mut(..sectors).ok_or(broken())?;
        dev.read(tag / SECTOR as u64, data)
            .await
            .map_err(Error::Io)?;
        self.link(i, tag, kind)?;
        Ok(i)
    }

    /// The bytes of the slice containing `offset`, for reading.
    pub(crate) async fn get<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        offset: u64,
        kind: Kind,
    ) -> Result<&[u8], Error<D::Error>> {
        let i = self.load(dev, offset, kind).await?;
        let sectors = self.sectors();
        let s = self.slot(i)?;
        Ok(s.data.get(..sectors).ok_or(broken())?.as_flattened())
    }

    /// The bytes of the slice containing `offset`, marked dirty.
    pub(crate) async fn get_mut<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        offset: u64,
        kind: Kind,
    ) -> Result<&mut [u8], Error<D::Error>> {
        let i = self.load(dev, offset, kind).await?;
        self.mark_dirty(i)?;
        let sectors = self.sectors();
        let s = self.slot_mut(i)?;
        Ok(s.data
            .get_mut(..sectors)
            .ok_or(broken())?
            .as_flattened_mut())
    }

    /// Reads the big-endian u64 at host byte `offset` (8-byte aligned).
    pub(crate) async fn read_u64<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        offset: u64,
        kind: Kind,
    ) -> Result<u64, Error<D::Error>> {
        let at = (offset & (self.slice_bytes - 1)) as usize;
        let bytes = self.get(dev, offset, kind).await?;
        let raw = bytes.get(at..at + 8).ok_or(broken())?;
        let mut be = [0u8; 8];
        be.copy_from_slice(raw);
        Ok(u64::from_be_bytes(be))
    }

    /// Writes the big-endian u64 at host byte `offset` (8-byte aligned).
    pub(crate) async fn write_u64<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        offset: u64,
        kind: Kind,
        value: u64,
    ) -> Result<(), Error<D::Error>> {
        let at = (offset & (self.slice_bytes - 1)) as usize;
        let bytes = self.get_mut(dev, offset, kind).await?;
        bytes
            .get_mut(at..at + 8)
            .ok_or(broken())?
            .copy_from_slice(&value.to_be_bytes());
        Ok(())
    }

    /// Whether any slice inside `[offset, offset + len)` is cached: a cluster
    /// about to be allocated must not be, or it is live metadata.
    pub(crate) fn holds_any(&self, offset: u64, len: u64) -> bool {
        let mut tag = offset & !(self.slice_bytes - 1);
        let end = offset.saturating_add(len);
        if (end - tag) >> self.slice_shift > u64::from(self.len()) {
            return self
                .slots
                .as_ref()
                .iter()
                .any(|s| s.used && s.tag >= tag && s.tag < end);
        }
        while tag < end {
            if self.find(tag).is_some() {
                return true;
            }
            tag += self.slice_bytes;
        }
        false
    }

    /// Forgets every cached refcount table and refcount block slice, dirty
    /// or not: used when a rebuild replaces them all.
    pub(crate) fn forget_refcounts<E>(&mut self) -> Result<(), Error<E>> {
        for i in 0..self.len() {
            let s = self.slot::<E>(i)?;
            if s.used && s.kind.is_refcount() {
                self.unlink(i)?;
            }
        }
        Ok(())
    }

    /// Forgets every cached slice inside `[offset, offset + len)`, dirty or
    /// not: used when that host range stops being metadata.
    pub(crate) fn forget_range<E>(&mut self, offset: u64, len: u64) -> Result<(), Error<E>> {
        let mut tag = offset & !(self.slice_bytes - 1);
        let end = offset.saturating_add(len);
        // Few slices per cluster, or a scan when the range is larger than the cache.
        if (end - tag) >> self.slice_shift > u64::from(self.len()) {
            for i in 0..self.len() {
                let s = self.slot::<E>(i)?;
                if s.used && s.tag >= tag && s.tag < end {
                    self.unlink(i)?;
                }
            }
            return Ok(());
        }
        while tag < end {
            if let Some(i) = self.find(tag) {
                self.unlink(i)?;
            }
            tag += self.slice_bytes;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
