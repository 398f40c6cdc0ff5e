//! Guest memory: one anonymous private mapping, aligned to 2 MiB and advised for transparent
//! huge pages.
//!
//! KVM maps guest memory with 2 MiB pages only where the host backs it with huge pages *and*
//! the host address is as aligned as the guest address (a memslot whose host and guest
//! addresses differ modulo 2 MiB gets 4 KiB mappings only). A plain `mmap` of the guest's
//! size lands anywhere, so every 4 KiB page the guest touches first costs an exit (a nested
//! page fault); aligned and backed by huge pages, one exit maps 2 MiB. Where the host has no
//! transparent huge pages the advice is ignored and the memory is as before.
//!
//! vm-memory maps its own regions at an address of the kernel's choosing; this mapping is
//! made here and handed to it as a raw region. [`Mapping`], in the region's bitmap slot (the
//! one thing a region owns and drops with it), unmaps it when the last clone of the guest
//! memory goes: no thread can still be using it then. It tracks no dirty pages.

use vm_memory::bitmap::{Bitmap, NewBitmap, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Guest memory as every part of the VMM sees it.
pub type Memory = GuestMemoryMmap<Mapping>;

/// The huge page size the mapping is aligned to.
pub const HUGE_PAGE: usize = 2 << 20;

/// Owns an aligned mapping made by [`anonymous`] (address, length) and unmaps it on drop;
/// `None` for regions vm-memory maps (and unmaps) itself.
#[derive(Debug, Default)]
pub struct Mapping(Option<(usize, usize)>);

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Some((addr, len)) = self.0 {
            // SAFETY: (addr, len) is the mapping `anonymous` made for this region alone; the
            // region, and so every clone of the guest memory, is being dropped.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

impl WithBitmapSlice<'_> for Mapping {
    type S = ();
}

impl Bitmap for Mapping {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, _offset: usize) {}
}

impl NewBitmap for Mapping {
    fn with_len(_len: usize) -> Self {
        Mapping(None)
    }
}

/// `size` bytes of zeroed guest memory at guest address 0, mapped at a 2 MiB-aligned host
/// address and advised for huge pages.
pub fn anonymous(size: usize) -> std::io::Result<Memory> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let os = std::io::Error::last_os_error;
    // Over-map by one huge page, then trim the head and tail so the rest starts aligned.
    let over = size + HUGE_PAGE;
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing; nothing else
    // is touched.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), over, prot, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(os());
    }
    let (raw, start) = (raw as usize, (raw as usize).next_multiple_of(HUGE_PAGE));
    let (head, tail) = (start - raw, raw + over - (start + size));
    // SAFETY: both ranges lie inside the mapping just made and hold nothing yet.
    unsafe {
        if head > 0 {
            libc::munmap(raw as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
    }
    let owner = Mapping(Some((start, size)));
    // SAFETY: advice on the mapping just made; it changes how it is backed, not its content.
    // (On a host without transparent huge pages it fails: 4 KiB pages, as any mapping.)
    unsafe { libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE) };
    // SAFETY: [start, start + size) is a live mapping owned by `owner`, which the region keeps
    // and which unmaps it only when the region goes.
    let region = unsafe {
        MmapRegionBuilder::new_with_bitmap(size, owner)
            .with_raw_mmap_pointer(start as *mut u8)
            .with_mmap_prot(prot)
            .with_mmap_flags(flags)
            .build()
    }
    .map_err(std::io::Error::other)?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| std::io::Error::other("the guest memory region overflows"))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn guest_memory_is_aligned_zeroed_usable_and_unmapped_with_its_last_clone() {
        let mem = anonymous(8 << 20).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert_eq!(host % HUGE_PAGE, 0, "{host:#x}");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x7f_fff8)).unwrap(), 0);
        mem.write_obj(0x1234_5678u32, GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x20_0000)).unwrap(),
            0x1234_5678
        );
        assert!(mem.read_obj::<u8>(GuestAddress(8 << 20)).is_err());
        let maps = || std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = format!("{host:x}-{:x} ", host + (8 << 20));
        let clone = mem.clone();
        drop(mem);
        assert!(maps().contains(&line), "a clone keeps it mapped");
        drop(clone);
        assert!(!maps().contains(&line), "the last clone unmaps it");
    }
}
