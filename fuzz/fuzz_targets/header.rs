//! Header decoding and validation never panic, whatever the bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qcow2_core::format::Header;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::decode::<()>(data) {
        let _ = h.validate::<()>();
        let mut out = [0u8; 512];
        h.encode(&mut out);
    }
});
