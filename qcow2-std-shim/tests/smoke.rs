use qcow2_core::{CreateOptions, OpenOptions};
use qcow2_std_shim::{FileDevice, Image};
use std::process::Command;

#[test]
fn create_write_check() {
    let dir = std::env::temp_dir().join(format!("qcow2-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.qcow2");
    let mut img = Image::create(
        FileDevice::create(&path).unwrap(),
        &CreateOptions::new(1 << 30),
    )
    .unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    img.write_at(12345, &data).unwrap();
    img.close().unwrap();
    let out = Command::new("qemu-img")
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    println!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let mut img = Image::open(
        FileDevice::open(&path, false).unwrap(),
        &OpenOptions::read_only(),
    )
    .unwrap();
    let mut back = vec![0u8; data.len()];
    img.read_at(12345, &mut back).unwrap();
    assert!(back == data);
}
