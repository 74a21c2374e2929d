//! cargo-fuzz target: see `qcow2_std_shim::codec::fuzz_compressors`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_std_shim::codec::fuzz_compressors(data));
