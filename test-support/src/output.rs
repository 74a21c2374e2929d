//! QEMU's output made comparable with ours: timings taken out, program
//! prefixes replaced.

/// `qemu-io` output lines without the timing-dependent statistics (the
/// `... ops; ...` lines that follow each request report).
pub fn io_without_timing(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.contains(" ops; "))
        .map(String::from)
        .collect()
}

/// `qemu-img bench` output lines with the run time replaced by `T`; panics
/// unless the time has the form QEMU prints (whole seconds, a point, three
/// decimals).
pub fn bench_without_time(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| match line.strip_prefix("Run completed in ") {
            Some(rest) => {
                let secs = rest.strip_suffix(" seconds.").expect("seconds");
                let (whole, frac) = secs.split_once('.').expect("decimal point");
                assert!(whole.bytes().all(|b| b.is_ascii_digit()), "{line}");
                assert_eq!(frac.len(), 3, "three decimals: {line}");
                "Run completed in T seconds.".to_string()
            }
            None => line.to_string(),
        })
        .collect()
}

/// QEMU's messages with their program prefix (`qemu-io: `, `qemu-img: `)
/// turned into the tool's (`qcow2-tool: `).
pub fn as_ours(text: &str) -> String {
    text.replace("qemu-io: ", "qcow2-tool: ")
        .replace("qemu-img: ", "qcow2-tool: ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_are_taken_out() {
        let io = "wrote 512/512 bytes at offset 0\n\
                  512 bytes, 1 ops; 00.00 sec (1.2 MiB/sec and 2400 ops/sec)\n";
        assert_eq!(io_without_timing(io), ["wrote 512/512 bytes at offset 0"]);
        let bench = "Sending 1 read requests\nRun completed in 0.012 seconds.\n";
        assert_eq!(
            bench_without_time(bench),
            ["Sending 1 read requests", "Run completed in T seconds."]
        );
        assert_eq!(
            as_ours("qemu-img: no\nqemu-io: nor"),
            "qcow2-tool: no\nqcow2-tool: nor"
        );
    }

    #[test]
    #[should_panic(expected = "three decimals")]
    fn a_bench_time_of_another_form_is_refused() {
        bench_without_time("Run completed in 1.5 seconds.");
    }
}
