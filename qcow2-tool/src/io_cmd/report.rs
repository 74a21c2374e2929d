//! qemu-io's result lines: transfer reports and hex dumps.

use std::time::Duration;

/// Renders a byte count or rate like qemu-io's `cvtstr`: three decimals
/// and a binary unit, or plain bytes below 1 KiB; `.000` is dropped.
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(u32, &str); 6] = [
        (60, " EiB"),
        (50, " PiB"),
        (40, " TiB"),
        (30, " GiB"),
        (20, " MiB"),
        (10, " KiB"),
    ];
    let (mut text, suffix) = UNITS
        .iter()
        .find(|(shift, _)| value >= (1u64 << shift) as f64)
        .map_or_else(
            || (format!("{value:.6}"), " bytes"),
            |(shift, suffix)| (format!("{:.3}", value / (1u64 << shift) as f64), *suffix),
        );
    match text.find(".000") {
        Some(at) => text.replace_range(at.., suffix),
        None => text.push_str(suffix),
    }
    text
}

/// Renders an elapsed time like qemu-io's `timestr`: `00.00 sec` below a
/// second, `H:MM:SS.ss` from there or when `fixed` (the `-C` format).
pub fn timestr(t: Duration, fixed: bool) -> String {
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if fixed || secs > 0 {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs / 60) % 60,
            (secs % 60) as f64 + frac
        )
    } else {
        format!("{frac:05.2} sec")
    }
}

/// The report qemu-io prints after a successful read or write: `op` is
/// `read` or `wrote`; `parsable` selects the `-C` format.
pub fn report(op: &str, t: Duration, offset: u64, count: u64, parsable: bool) -> String {
    let secs = t.as_secs_f64();
    let total = count as f64;
    let ops = 1.0;
    if parsable {
        format!(
            "{count},1,{},{:.3},{:.3}",
            timestr(t, true),
            total / secs,
            ops / secs
        )
    } else {
        format!(
            "{op} {count}/{count} bytes at offset {offset}\n{}, 1 ops; {} ({}/sec and {:.4} ops/sec)",
            cvtstr(total),
            timestr(t, false),
            cvtstr(total / secs),
            ops / secs
        )
    }
}

/// A hex dump like qemu-io's `read -v`: 16 bytes a line, offsets in hex,
/// letters and digits shown, everything else as `.`.
pub fn dump(buf: &[u8], offset: u64) -> String {
    let mut out = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        out += &format!("{:08x}:  ", offset + 16 * i as u64);
        for b in line {
            out += &format!("{b:02x} ");
        }
        out.push(' ');
        out.extend(line.iter().map(|&b| {
            if b.is_ascii_alphanumeric() {
                char::from(b)
            } else {
                '.'
            }
        }));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvtstr_like_qemu() {
        assert_eq!(cvtstr(4096.0), "4 KiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(64.0), "64 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(1000.0), "1000 bytes");
        assert_eq!(cvtstr(4000.0), "3.906 KiB");
        assert_eq!(cvtstr(972.5), "972.500000 bytes");
        assert_eq!(cvtstr(1_737_000.0), "1.657 MiB");
    }

    #[test]
    fn timestr_like_qemu() {
        assert_eq!(timestr(Duration::from_micros(2400), false), "00.00 sec");
        assert_eq!(timestr(Duration::from_millis(1500), false), "0:00:01.50");
        assert_eq!(timestr(Duration::from_millis(10), true), "0:00:00.01");
    }

    #[test]
    fn report_lines() {
        let r = report("wrote", Duration::from_millis(1), 0, 4096, false);
        let mut lines = r.lines();
        assert_eq!(lines.next(), Some("wrote 4096/4096 bytes at offset 0"));
        assert_eq!(
            lines.next(),
            Some("4 KiB, 1 ops; 00.00 sec (3.906 MiB/sec and 1000.0000 ops/sec)")
        );
    }

    #[test]
    fn dump_like_qemu() {
        let mut data = vec![0u8; 20];
        data[10..16].copy_from_slice(b"AAAAAA");
        assert_eq!(
            dump(&data, 0x5a),
            "0000005a:  00 00 00 00 00 00 00 00 00 00 41 41 41 41 41 41  ..........AAAAAA\n\
             0000006a:  00 00 00 00  ....\n"
        );
    }
}
