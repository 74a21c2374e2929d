//! The read-only use of qcow2-core, for `cargo xtask size`'s `.text`
//! figure: loads `fw-create.qcow2` (made by the main example) from the
//! host's working directory onto the RAM disk, opens it read-only and
//! reads every sector of the virtual disk, checking the first written
//! range. Nothing here writes, checks or repairs, so what the linker keeps
//! of the core is what a read-only consumer (a bootloader) pays for.
#![no_std]
#![no_main]

use core::pin::pin;

use cortex_m_rt::entry;
use qcow2_core::{FirmwareCache, FirmwareQcow2, OpenOptions, Qcow2, Sector, Slot};
use qcow2_firmware::{holds_pattern, load, take_device, Device, StackMeter};
use semihosting::{eprintln, println};
use static_cell::ConstStaticCell;

static CACHE: ConstStaticCell<FirmwareCache> = ConstStaticCell::new([const { Slot::EMPTY }; 8]);
static IO: ConstStaticCell<[Sector; 8]> = ConstStaticCell::new([[0; 512]; 8]);

#[entry]
fn main() -> ! {
    let meter = StackMeter::start();
    let top = qcow2_firmware::sp();
    let code = match read_all(&meter) {
        Ok(sectors) => {
            println!("readonly: read {sectors} sectors of fw-create.qcow2");
            0
        }
        Err(e) => {
            eprintln!("readonly: {e}");
            1
        }
    };
    meter.end_run(top);
    semihosting::process::exit(code)
}

/// The disk's bytes (a function: the device is a `RamDisk` or a `&mut` of
/// one, depending on the build).
fn bytes_mut(disk: &mut Device) -> &mut [u8] {
    disk.bytes_mut()
}

#[inline(never)]
fn read_all(meter: &StackMeter) -> Result<u64, &'static str> {
    let (Some(mut disk), Some(cache), Some(io)) = (take_device(), CACHE.try_take(), IO.try_take())
    else {
        return Err("statics taken twice");
    };
    load(c"fw-create.qcow2", bytes_mut(&mut disk)).map_err(|_| "cannot load fw-create.qcow2")?;
    embassy_futures::block_on(async {
        let open = pin!(Qcow2::open(disk, cache, OpenOptions::read_only()));
        let mut image: FirmwareQcow2<'_, Device> = meter
            .call("open-ro", open)
            .await
            .map_err(|_| "open failed")?;
        let sectors = image.virtual_size() / 512;
        let mut at = 0;
        while at < sectors {
            let n = (sectors - at).min(io.len() as u64) as usize;
            let buf = io.get_mut(..n).ok_or("chunk")?;
            image.read(at, buf).await.map_err(|_| "read failed")?;
            // The main example writes its pattern (seed 0x5a) from sector 0.
            if at == 0 && !holds_pattern(0x5a, 0, buf) {
                return Err("sector 0 does not hold the pattern");
            }
            at += n as u64;
        }
        Ok(sectors)
    })
}
