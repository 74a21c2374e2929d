//! Opening arbitrary bytes as an image and reading every mapped run never
//! panics and always terminates.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qcow2_core::{OpenOptions, Qcow2, Slot};
use qcow2_std_shim::{block_on, RamDevice};

fuzz_target!(|data: &[u8]| {
    let dev = RamDevice::from_bytes(data);
    let cache = [const { Slot::<1>::EMPTY }; 4];
    let Ok(mut img) = block_on(Qcow2::open(dev, cache, &OpenOptions::read_only())) else {
        return;
    };
    let size = img.virtual_size();
    let mut offset = 0;
    let mut sector = [[0u8; 512]; 1];
    for _ in 0..256 {
        if offset >= size {
            break;
        }
        match block_on(img.map(offset)) {
            Ok((_, len)) => {
                let _ = block_on(img.read(offset / 512, &mut sector));
                offset += len.max(1);
            }
            Err(_) => break,
        }
    }
});
