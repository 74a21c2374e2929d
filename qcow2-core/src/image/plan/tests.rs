extern crate std;
use std::vec;
use std::vec::Vec;

use super::*;
use crate::SECTOR;

const CS: u64 = 8; // sectors per cluster in these tests (4 KiB clusters)
const CLUSTER: u64 = CS * SECTOR as u64;

fn in_place(cluster: u64) -> Placement {
    place(
        L2Entry::Data {
            offset: cluster * CLUSTER,
            copied: true,
        },
        0,
        false,
        1,
    )
}

fn fresh(cluster: u64, source: Source) -> Placement {
    Placement {
        host: cluster * CLUSTER,
        source,
        ..place(L2Entry::Unallocated, 0, false, 1)
    }
}

fn steps(plan: &[Placement], within: u64, len: usize) -> Vec<Step> {
    let mut schedule = Schedule::new(within, len, CS);
    let mut out = Vec::new();
    while let Some(step) = schedule.next(plan) {
        out.push(step);
        assert!(out.len() < 1000, "schedule does not end");
    }
    out
}

#[test]
fn every_entry_kind_is_placed_as_qemu_writes_it() {
    let at = 0x1230;
    let data = place(
        L2Entry::Data {
            offset: 0x5000,
            copied: true,
        },
        at,
        true,
        1,
    );
    assert_eq!((data.host, data.fresh, data.alloc), (0x5000, false, false));
    assert_eq!(data.replaces(), L2Entry::Unallocated);

    let shared = place(
        L2Entry::Data {
            offset: 0x5000,
            copied: false,
        },
        at,
        false,
        1,
    );
    assert_eq!(shared.source, Source::Shared { host: 0x5000 });
    assert!(shared.fresh && shared.alloc);
    assert_eq!(
        shared.replaces(),
        L2Entry::Data {
            offset: 0x5000,
            copied: false
        }
    );

    let compressed = place(
        L2Entry::Compressed {
            offset: 0x7010,
            len: 700,
        },
        at,
        false,
        1,
    );
    assert_eq!(
        compressed.source,
        Source::Compressed {
            host: 0x7010,
            len: 700
        }
    );
    assert_eq!(
        compressed.replaces(),
        L2Entry::Compressed {
            offset: 0x7010,
            len: 700
        }
    );

    let owned_zero = place(
        L2Entry::Zero {
            offset: 0x9000,
            copied: true,
        },
        at,
        true,
        1,
    );
    assert_eq!(
        (owned_zero.host, owned_zero.fresh, owned_zero.alloc),
        (0x9000, true, false)
    );
    assert_eq!(owned_zero.source, Source::Zeros);

    for zero in [
        L2Entry::Zero {
            offset: 0,
            copied: false,
        },
        L2Entry::Zero {
            offset: 0x9000,
            copied: false,
        },
    ] {
        let p = place(zero, at, true, 1);
        assert!(p.fresh && p.alloc, "{zero:?}");
        // A zero cluster reads zeros, not the backing.
        assert_eq!(p.source, Source::Zeros);
        assert_eq!(p.replaces(), L2Entry::Unallocated);
    }

    let over_backing = place(L2Entry::Unallocated, at, true, 3);
    assert_eq!(
        (over_backing.source, over_backing.mask),
        (Source::Backing, 3)
    );
    assert_eq!(
        place(L2Entry::Unallocated, at, false, 1).source,
        Source::Zeros
    );
    assert!([data, shared, compressed, owned_zero, over_backing]
        .iter()
        .all(|p| p.entry_at == at));
}

#[test]
fn contiguous_clusters_coalesce_into_one_write() {
    let plan = [in_place(4), in_place(5), in_place(6)];
    assert_eq!(
        steps(&plan, 0, 24),
        [Step::Data {
            host: 4 * CS,
            from: 0,
            to: 24
        }]
    );
    // A gap splits the run.
    let plan = [in_place(4), in_place(9)];
    assert_eq!(
        steps(&plan, 2, 10),
        [
            Step::Data {
                host: 4 * CS + 2,
                from: 0,
                to: 6
            },
            Step::Data {
                host: 9 * CS,
                from: 6,
                to: 10
            }
        ]
    );
}

#[test]
fn fresh_clusters_are_zero_filled_around_the_data() {
    // One cluster, data in its middle: zeros, data, zeros.
    assert_eq!(
        steps(&[fresh(3, Source::Zeros)], 2, 3),
        [
            Step::Zeros {
                host: 3 * CS,
                count: 2
            },
            Step::Data {
                host: 3 * CS + 2,
                from: 0,
                to: 3
            },
            Step::Zeros {
                host: 3 * CS + 5,
                count: 3
            },
        ]
    );
    // In place: no zeros.
    assert_eq!(
        steps(&[in_place(3)], 2, 3),
        [Step::Data {
            host: 3 * CS + 2,
            from: 0,
            to: 3
        }]
    );
}

#[test]
fn clusters_with_old_contents_are_copied_on_their_own() {
    let plan = [
        fresh(3, Source::Backing),
        fresh(4, Source::Zeros),
        fresh(5, Source::Compressed { host: 0, len: 1 }),
    ];
    assert_eq!(
        steps(&plan, 6, 12),
        [
            Step::Copy {
                index: 0,
                skip: 6,
                from: 0,
                to: 2
            },
            Step::Data {
                host: 4 * CS,
                from: 2,
                to: 10
            },
            Step::Copy {
                index: 2,
                skip: 0,
                from: 10,
                to: 12
            },
        ]
    );
    // Whole clusters need no copy, whatever their old contents.
    let plan = [
        fresh(3, Source::Backing),
        fresh(4, Source::Shared { host: 0 }),
    ];
    assert_eq!(
        steps(&plan, 0, 16),
        [Step::Data {
            host: 3 * CS,
            from: 0,
            to: 16
        }]
    );
}

/// Over many random batches: data steps and copies cover every sector of
/// the request once, at the host sector its placement says; zeros go only
/// to fresh zero-sourced clusters, outside the data.
#[test]
#[allow(clippy::needless_range_loop)] // `d` indexes data and hosts alike
fn every_sector_is_written_once_where_the_plan_puts_it() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _ in 0..2000 {
        let clusters = 1 + rand(16) as usize;
        let within = rand(CS);
        let max = clusters as u64 * CS - within;
        let len = (max - rand(CS.min(max))).max(1) as usize;
        let clusters = ((within + len as u64).div_ceil(CS)) as usize;
        let mut next_host = 10 + rand(4);
        let plan: Vec<Placement> = (0..clusters)
            .map(|_| {
                // Mostly contiguous hosts, sometimes a jump.
                next_host += if rand(4) == 0 { 2 + rand(3) } else { 1 };
                let source = match rand(4) {
                    0 => Source::Backing,
                    1 => Source::Compressed { host: 0, len: 1 },
                    _ => Source::Zeros,
                };
                if rand(3) == 0 {
                    in_place(next_host)
                } else {
                    fresh(next_host, source)
                }
            })
            .collect();
        let mut written = vec![0u32; len];
        let mut zeroed = vec![0u32; clusters * CS as usize];
        let host_of = |d: usize| {
            let g = within + d as u64;
            plan[(g / CS) as usize].host / SECTOR as u64 + g % CS
        };
        for step in steps(&plan, within, len) {
            match step {
                Step::Data { host, from, to } => {
                    assert!(from < to && to <= len);
                    for d in from..to {
                        assert_eq!(host + (d - from) as u64, host_of(d));
                        written[d] += 1;
                    }
                }
                Step::Copy {
                    index,
                    skip,
                    from,
                    to,
                } => {
                    assert!(plan[index].fresh && plan[index].source != Source::Zeros);
                    for d in from..to {
                        assert_eq!(((within + d as u64) / CS) as usize, index);
                        assert_eq!((within + d as u64) % CS, skip + (d - from) as u64);
                        written[d] += 1;
                    }
                }
                Step::Zeros { host, count } => {
                    for s in host..host + count {
                        let i = plan
                            .iter()
                            .position(|p| p.host / SECTOR as u64 == s - s % CS)
                            .unwrap();
                        assert!(plan[i].fresh && plan[i].source == Source::Zeros);
                        zeroed[i * CS as usize + (s % CS) as usize] += 1;
                    }
                }
            }
        }
        assert!(written.iter().all(|&n| n == 1), "{plan:?} {within} {len}");
        // Every sector of a fresh zero-sourced cluster is data or zeros, once.
        for (i, p) in plan.iter().enumerate() {
            for s in 0..CS as usize {
                let g = i as u64 * CS + s as u64;
                let data = g >= within && g < within + len as u64;
                let z = zeroed[i * CS as usize + s];
                if p.fresh && p.source == Source::Zeros {
                    assert_eq!(z + u32::from(data), 1, "cluster {i} sector {s}");
                } else {
                    assert_eq!(z, 0);
                }
            }
        }
    }
}
