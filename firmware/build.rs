//! Puts memory.x where cortex-m-rt's link.x finds it and links with link.x.
//!
//! Also the build script of the codec probe (`xtask/codec-probe`, whose
//! manifest points here): each crate copies the memory.x beside its own
//! Cargo.toml (the current directory of a build script). No
//! `rerun-if-changed` for this file: cargo reruns a build script whose
//! source changed anyway, and the probe's path to it differs.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::copy("memory.x", out.join("memory.x")).expect("copy memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg=-Tlink.x");
    println!("cargo:rerun-if-changed=memory.x");
}
