//! Images with an external data file through the tool, against QEMU:
//! reads, writes qemu-io then reads back, and qemu-img's error when the
//! data file is missing.

mod common;

use common::{ok, qemu_img, qemu_io, stderr, tool, Scratch};

#[test]
fn data_file_images_read_and_write_as_in_qemu() {
    for extra in ["", ",data_file_raw=on,cluster_size=4k"] {
        let s = Scratch::new("tool-data-file");
        let img = s.path("d.qcow2");
        // An absolute name: QEMU 10 resolves a relative one against its
        // working directory, we against the image's directory.
        let opts = format!("data_file={}{extra}", s.path("d.raw"));
        let opts = opts.as_str();
        ok(
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &img, "1M"]),
            "create",
        );
        ok(
            qemu_io(&["-c", "write -P 7 0 64k", "-c", "write -P 8 300k 5k", &img]),
            "qemu-io",
        );
        let (ours, theirs) = (s.path("ours.raw"), s.path("theirs.raw"));
        ok(tool(&["convert", "-O", "raw", &img, &ours]), "our convert");
        ok(
            qemu_img(&["convert", "-O", "raw", &img, &theirs]),
            "qemu-img convert",
        );
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "{opts}"
        );
        // Our writes, read by qemu-io.
        ok(
            tool(&[
                "io",
                "-c",
                "write -P 9 4k 70k",
                "-c",
                "write -z 200k 10k",
                &img,
            ]),
            "our io",
        );
        ok(
            qemu_io(&["-c", "read -P 9 4k 70k", "-c", "read -P 0 200k 10k", &img]),
            "qemu-io read",
        );
        let check = ok(qemu_img(&["check", &img]), "qemu-img check");
        assert!(check.contains("No errors were found"), "{opts}: {check}");
        // A missing data file fails as in qemu-img.
        std::fs::rename(s.path("d.raw"), s.path("gone.raw")).unwrap();
        let ours = tool(&["convert", "-O", "raw", &img, &s.path("x.raw")]);
        let theirs = qemu_img(&["convert", "-O", "raw", &img, &s.path("x.raw")]);
        assert_eq!(ours.status.code(), theirs.status.code(), "{opts}");
        assert_eq!(
            stderr(&ours).replace("qcow2-tool:", "qemu-img:"),
            stderr(&theirs),
            "{opts}"
        );
    }
}
