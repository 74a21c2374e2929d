use qcow2_core::{CreateOptions, OpenOptions};
use qcow2_std_shim::{FileDevice, Image};
use test_support::{ok, path_str, qemu_img, Scratch};

#[test]
fn create_write_check() {
    let dir = Scratch::new("smoke");
    let path = dir.join("a.qcow2");
    let mut img = Image::create(
        FileDevice::create(&path).unwrap(),
        &CreateOptions::new(1 << 30),
    )
    .unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    img.write_at(12345, &data).unwrap();
    img.close().unwrap();
    ok(qemu_img(&["check", path_str(&path)]), "qemu-img check");
    let mut img = Image::open(
        FileDevice::open(&path, false).unwrap(),
        &OpenOptions::read_only(),
    )
    .unwrap();
    let mut back = vec![0u8; data.len()];
    img.read_at(12345, &mut back).unwrap();
    assert!(back == data);
}
