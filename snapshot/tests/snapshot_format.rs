//! End-to-end tests of the snapshot format: pauses and templates saved with
//! the save policy and restored over several memory regions, corrupt files
//! rejected, faults injected.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use capsule_snapshot::atomic;
use capsule_snapshot::bitmap::PageBitmap;
use capsule_snapshot::chain::{remove_unreferenced_layers, MemoryChain};
use capsule_snapshot::mapping::{overlay_layers, MAX_OVERLAY_MAPPINGS};
use capsule_snapshot::memory::{write_layer, WriteOptions};
use capsule_snapshot::save::{save_full_image, save_memory, SavePolicy};
use capsule_snapshot::state_file::{
    decode_state_bytes, encode_state_bytes, read_state, write_state,
};
use capsule_snapshot::stored::StoredMemory;
use capsule_snapshot::{Error, PAGE_SIZE, STATE_FILE_NAME};
use serde::{Deserialize, Serialize};

/// splitmix64: a tiny deterministic PRNG for reproducible "random" tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct VmState {
    vcpus: Vec<Vec<u64>>,
    devices: Vec<(String, Vec<u8>)>,
    clock: u64,
}

fn vm_state() -> VmState {
    VmState {
        vcpus: (0..4)
            .map(|c| (0..32).map(|r| c * 1000 + r).collect())
            .collect(),
        devices: vec![
            ("serial".into(), vec![1, 2, 3]),
            ("virtio-blk".into(), vec![9; 64]),
        ],
        clock: 123_456_789,
    }
}

/// What an integrator's `state.bin` holds in these tests.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Snapshot {
    vm: VmState,
    memory: StoredMemory,
}

/// Simulated guest memory of one or more regions, tracking the pages written
/// since the last save like KVM's dirty log does.
struct Guest {
    mem: Vec<u8>,
    pages: u64,
    /// Pages of each region, in flat order.
    regions: Vec<u64>,
    dirty: PageBitmap,
}

impl Guest {
    fn new(regions: &[u64], rng: &mut Rng) -> Self {
        let pages = regions.iter().sum();
        let mut mem = vec![0u8; (pages * PAGE_SIZE) as usize];
        for (i, chunk) in mem.chunks_mut(8).enumerate() {
            if i % 3 != 0 {
                chunk.copy_from_slice(&rng.next().to_le_bytes());
            }
        }
        let dirty = all_pages(pages);
        Self {
            mem,
            pages,
            regions: regions.to_vec(),
            dirty,
        }
    }

    /// The memory as one slice per region.
    fn slices(&self) -> Vec<&[u8]> {
        let mut rest = self.mem.as_slice();
        self.regions
            .iter()
            .map(|&pages| {
                let (region, tail) = rest.split_at((pages * PAGE_SIZE) as usize);
                rest = tail;
                region
            })
            .collect()
    }

    /// Writes `count` pages starting at `first`.
    fn write(&mut self, first: u64, count: u64, fill: u8) {
        self.dirty.set_range(first, count).unwrap();
        let start = (first * PAGE_SIZE) as usize;
        let end = ((first + count) * PAGE_SIZE) as usize;
        self.mem[start..end]
            .iter_mut()
            .for_each(|b| *b = b.wrapping_add(fill) ^ 0x5A);
    }

    /// Writes about `count` random short runs of pages.
    fn scribble(&mut self, rng: &mut Rng, count: u64) {
        for _ in 0..count {
            let p = rng.below(self.pages);
            let run = 1 + rng.below(4).min(self.pages - p - 1);
            let fill = rng.next() as u8;
            self.write(p, run, fill);
        }
    }

    /// The dirty pages since the last call, as a save takes them.
    fn take_dirty(&mut self) -> PageBitmap {
        std::mem::replace(&mut self.dirty, PageBitmap::new(self.pages))
    }
}

fn all_pages(pages: u64) -> PageBitmap {
    let mut bm = PageBitmap::new(pages);
    bm.set_range(0, pages).unwrap();
    bm
}

/// A paused guest's directory: saves pauses the way an integrator does
/// (layers, then `state.bin` as the commit point, then orphan removal).
fn pause(
    dir: &Path,
    guest: &mut Guest,
    origin: Option<(&Path, &MemoryChain)>,
    policy: &SavePolicy,
) -> StoredMemory {
    fs::create_dir_all(dir).unwrap();
    let dirty = guest.take_dirty();
    let memory = save_memory(
        dir,
        &guest.slices(),
        &dirty,
        origin,
        policy,
        &WriteOptions::default(),
    )
    .unwrap();
    let snapshot = Snapshot {
        vm: vm_state(),
        memory,
    };
    write_state(&dir.join(STATE_FILE_NAME), &snapshot).unwrap();
    remove_unreferenced_layers(dir, &snapshot.memory.chain).unwrap();
    snapshot.memory
}

/// Reads `dir/state.bin` back and checks it.
fn load(dir: &Path) -> StoredMemory {
    let snapshot: Snapshot = read_state(&dir.join(STATE_FILE_NAME)).unwrap();
    assert_eq!(snapshot.vm, vm_state());
    let mem_size = snapshot.memory.chain.mem_size;
    snapshot.memory.validate(mem_size).unwrap();
    snapshot.memory
}

/// Restores `stored` (layers in `dir`) the way an integrator does, over
/// separate mappings of `regions` pages each: the base mapped privately per
/// region at its flat offset, newer layers overlaid, inline pages written.
fn restore(dir: &Path, stored: &StoredMemory, regions: &[u64]) -> Vec<u8> {
    let base = fs::File::open(dir.join(&stored.chain.layers[0].file_name)).unwrap();
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    for &pages in regions {
        let len = (pages * PAGE_SIZE) as usize;
        // SAFETY: a fresh private mapping of the base layer, which is as long as all
        // regions together; checked for failure and unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                base.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        ranges.push((addr.cast::<u8>(), len));
        offset += len as u64;
    }
    // SAFETY: the ranges are private mappings made above, used by nothing else.
    unsafe { overlay_layers(&ranges, dir, &stored.chain, MAX_OVERLAY_MAPPINGS) }.unwrap();
    let mut out = Vec::new();
    for &(addr, len) in &ranges {
        // SAFETY: a live mapping made above.
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(addr, len) });
        // SAFETY: unmapping it once; the slice above is no longer used.
        assert_eq!(unsafe { libc::munmap(addr.cast(), len) }, 0);
    }
    for patch in &stored.inline {
        let at = (patch.page * PAGE_SIZE) as usize;
        out[at..at + PAGE_SIZE as usize].copy_from_slice(&patch.data);
    }
    out
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn fresh_memory_saves_one_base_layer() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let mut guest = Guest::new(&[256], &mut rng);
    let stored = pause(dir.path(), &mut guest, None, &SavePolicy::default());
    assert_eq!(stored.chain.layers.len(), 1);
    assert_eq!(stored.chain.layers[0].pages.count_ones(), 256);
    assert!(stored.inline.is_empty());
    assert_eq!(load(dir.path()), stored);
    assert!(restore(dir.path(), &stored, &[256]) == guest.mem);
    let mut expected = vec![
        STATE_FILE_NAME.to_string(),
        stored.chain.layers[0].file_name.clone(),
    ];
    expected.sort();
    assert_eq!(file_names(dir.path()), expected);
}

#[test]
fn fresh_memory_writes_only_dirty_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(8);
    let mut guest = Guest::new(&[64], &mut rng);
    guest.take_dirty();
    guest.mem.fill(0);
    guest.write(5, 3, 0x11);
    let stored = pause(dir.path(), &mut guest, None, &SavePolicy::default());
    assert_eq!(stored.chain.layers.len(), 1);
    assert_eq!(
        stored.chain.layers[0].pages.runs().collect::<Vec<_>>(),
        vec![(5, 3)]
    );
    assert!(restore(dir.path(), &stored, &[64]) == guest.mem);
}

#[test]
fn few_dirty_pages_go_inline() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(9);
    let mut guest = Guest::new(&[128], &mut rng);
    let first = pause(dir.path(), &mut guest, None, &SavePolicy::default());

    guest.write(3, 10, 1);
    guest.write(100, 6, 2); // 16 pages: the most that go inline
    let second = pause(
        dir.path(),
        &mut guest,
        Some((dir.path(), &first.chain)),
        &SavePolicy::default(),
    );
    assert_eq!(second.chain, first.chain);
    let pages: Vec<u64> = second.inline.iter().map(|p| p.page).collect();
    let expected: Vec<u64> = (3..13).chain(100..106).collect();
    assert_eq!(pages, expected);
    assert!(restore(dir.path(), &load(dir.path()), &[128]) == guest.mem);

    // No dirty page at all: the chain alone.
    let third = pause(
        dir.path(),
        &mut guest,
        Some((dir.path(), &second.chain)),
        &SavePolicy::default(),
    );
    assert!(third.inline.is_empty());
    assert_eq!(third.chain, first.chain);
}

#[test]
fn more_dirty_pages_make_a_new_layer() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(10);
    let mut guest = Guest::new(&[128], &mut rng);
    let first = pause(dir.path(), &mut guest, None, &SavePolicy::default());

    guest.write(20, 17, 3);
    let second = pause(
        dir.path(),
        &mut guest,
        Some((dir.path(), &first.chain)),
        &SavePolicy::default(),
    );
    assert!(second.inline.is_empty());
    assert_eq!(second.chain.layers.len(), 2);
    assert_eq!(second.chain.layers[0], first.chain.layers[0]);
    assert_eq!(
        second.chain.layers[1].pages.runs().collect::<Vec<_>>(),
        vec![(20, 17)]
    );
    assert!(restore(dir.path(), &load(dir.path()), &[128]) == guest.mem);
}

#[test]
fn chain_at_max_layers_is_merged_into_one_base() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(42);
    let mut guest = Guest::new(&[512], &mut rng);
    guest.take_dirty();
    guest.mem.fill(0);
    // Pages 500.. stay zero and in no layer.
    guest.write(0, 20, 9);
    let policy = SavePolicy::default();
    let mut stored = pause(dir.path(), &mut guest, None, &policy);
    for generation in 2..=policy.max_layers {
        guest.write(generation as u64 * 30, 20, generation as u8);
        stored = pause(
            dir.path(),
            &mut guest,
            Some((dir.path(), &stored.chain)),
            &policy,
        );
        assert_eq!(stored.chain.layers.len(), generation);
    }
    let union = stored.chain.union().unwrap();
    assert!(restore(dir.path(), &stored, &[512]) == guest.mem);

    guest.write(490, 20, 77);
    let merged = pause(
        dir.path(),
        &mut guest,
        Some((dir.path(), &stored.chain)),
        &policy,
    );
    assert_eq!(merged.chain.layers.len(), 1);
    let mut expected = union;
    expected.set_range(490, 20).unwrap();
    assert_eq!(merged.chain.layers[0].pages, expected);
    assert!(restore(dir.path(), &load(dir.path()), &[512]) == guest.mem);
    // The old layers were removed after the commit.
    let mut names = vec![
        STATE_FILE_NAME.to_string(),
        merged.chain.layers[0].file_name.clone(),
    ];
    names.sort();
    assert_eq!(file_names(dir.path()), names);
}

#[test]
fn a_short_max_layers_merges_sooner() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(43);
    let mut guest = Guest::new(&[64], &mut rng);
    let policy = SavePolicy {
        inline_max_pages: 0,
        max_layers: 2,
        ..SavePolicy::default()
    };
    let mut stored = pause(dir.path(), &mut guest, None, &policy);
    let mut lens = Vec::new();
    for i in 0..5 {
        guest.write(i * 3, 2, i as u8);
        stored = pause(
            dir.path(),
            &mut guest,
            Some((dir.path(), &stored.chain)),
            &policy,
        );
        lens.push(stored.chain.layers.len());
        assert!(restore(dir.path(), &stored, &[64]) == guest.mem);
    }
    assert_eq!(lens, vec![2, 1, 2, 1, 2]);
}

#[test]
fn a_chain_in_another_directory_is_hard_linked() {
    let root = tempfile::tempdir().unwrap();
    let template = root.path().join("template");
    let capsule = root.path().join("capsule");
    let mut rng = Rng(12);
    let mut guest = Guest::new(&[96], &mut rng);
    let origin = pause(&template, &mut guest, None, &SavePolicy::default());

    // Few pages: inline, over the linked base.
    guest.write(7, 2, 5);
    let stored = pause(
        &capsule,
        &mut guest,
        Some((&template, &origin.chain)),
        &SavePolicy::default(),
    );
    assert_eq!(stored.chain, origin.chain);
    assert_eq!(stored.inline.len(), 2);
    let name = &origin.chain.layers[0].file_name;
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&capsule.join(name)), ino(&template.join(name)));

    // The capsule no longer depends on the template.
    fs::remove_dir_all(&template).unwrap();
    assert!(restore(&capsule, &load(&capsule), &[96]) == guest.mem);

    // Resumed, the inline pages count as written (as the crate docs ask); many
    // pages more, saved in yet another directory: links plus a new layer.
    let resumed = load(&capsule);
    for patch in &resumed.inline {
        guest.dirty.set(patch.page).unwrap();
    }
    let other = root.path().join("other");
    guest.write(30, 40, 6);
    let moved = pause(
        &other,
        &mut guest,
        Some((&capsule, &resumed.chain)),
        &SavePolicy::default(),
    );
    assert_eq!(moved.chain.layers.len(), 2);
    assert!(restore(&other, &load(&other), &[96]) == guest.mem);
}

#[test]
fn two_regions_round_trip_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(13);
    let regions = [48, 80];
    let mut guest = Guest::new(&regions, &mut rng);
    let stored = pause(dir.path(), &mut guest, None, &SavePolicy::default());
    assert!(restore(dir.path(), &stored, &regions) == guest.mem);

    // A layer whose runs cross the boundary at page 48, then one more.
    guest.write(40, 20, 1);
    guest.write(0, 1, 2);
    guest.write(127, 1, 3);
    let policy = SavePolicy {
        inline_max_pages: 0,
        ..SavePolicy::default()
    };
    let stored = pause(
        dir.path(),
        &mut guest,
        Some((dir.path(), &stored.chain)),
        &policy,
    );
    assert_eq!(stored.chain.layers.len(), 2);
    assert!(restore(dir.path(), &load(dir.path()), &regions) == guest.mem);
    guest.write(46, 4, 4);
    let stored = pause(
        dir.path(),
        &mut guest,
        Some((dir.path(), &stored.chain)),
        &policy,
    );
    assert_eq!(stored.chain.layers.len(), 3);
    assert!(restore(dir.path(), &stored, &regions) == guest.mem);

    // Inline pages on both sides of the boundary carry flat page numbers.
    guest.write(47, 2, 5);
    let stored = pause(
        dir.path(),
        &mut guest,
        Some((dir.path(), &stored.chain)),
        &SavePolicy::default(),
    );
    let pages: Vec<u64> = stored.inline.iter().map(|p| p.page).collect();
    assert_eq!(pages, vec![47, 48]);
    assert!(restore(dir.path(), &load(dir.path()), &regions) == guest.mem);
    // The same layer files restore over one region as well: the format is flat.
    assert!(restore(dir.path(), &stored, &[128]) == guest.mem);
}

#[test]
fn template_is_one_full_base_layer() {
    let root = tempfile::tempdir().unwrap();
    let capsule = root.path().join("capsule");
    let mut rng = Rng(14);
    let mut guest = Guest::new(&[32, 32], &mut rng);
    guest.take_dirty();
    guest.mem[(40 * PAGE_SIZE) as usize..].fill(0);
    let mut first = PageBitmap::new(64);
    first.set_range(0, 40).unwrap();
    guest.dirty = first;
    let policy = SavePolicy {
        inline_max_pages: 0,
        ..SavePolicy::default()
    };
    let stored = pause(&capsule, &mut guest, None, &policy);
    guest.write(30, 5, 1);
    let stored = pause(
        &capsule,
        &mut guest,
        Some((&capsule, &stored.chain)),
        &policy,
    );
    guest.write(50, 2, 2);
    assert_eq!(stored.chain.layers.len(), 2);

    let target = root.path().join("tpl");
    let dirty = guest.take_dirty();
    let image = atomic::publish_new_dir(&target, |tmp| {
        let memory = save_full_image(tmp, &guest.slices(), &dirty, Some(&stored.chain))?;
        let snapshot = Snapshot {
            vm: vm_state(),
            memory,
        };
        write_state(&tmp.join(STATE_FILE_NAME), &snapshot)?;
        Ok(snapshot.memory)
    })
    .unwrap();
    assert_eq!(image.chain.layers.len(), 1);
    assert!(image.inline.is_empty());
    let mut all = PageBitmap::new(64);
    all.set_range(0, 40).unwrap();
    all.set_range(50, 2).unwrap();
    assert_eq!(image.chain.layers[0].pages, all);
    assert_eq!(load(&target), image);
    assert!(restore(&target, &image, &[32, 32]) == guest.mem);

    // A template is never replaced.
    let err = atomic::publish_new_dir(&target, |_| Ok(())).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    let names = file_names(root.path());
    assert_eq!(names, vec!["capsule", "tpl"]);
}

#[test]
fn inputs_that_do_not_fit_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(15);
    let guest = Guest::new(&[16], &mut rng);
    let policy = SavePolicy::default();
    let opts = WriteOptions::default();
    let slices = guest.slices();

    let err = save_memory(
        dir.path(),
        &slices,
        &PageBitmap::new(17),
        None,
        &policy,
        &opts,
    )
    .unwrap_err();
    assert!(matches!(err, Error::BitmapMismatch { .. }), "{err:?}");

    let err = save_memory(dir.path(), &[], &PageBitmap::new(0), None, &policy, &opts).unwrap_err();
    assert!(matches!(err, Error::InvalidMemory { .. }), "{err:?}");

    let other = MemoryChain::new(32 * PAGE_SIZE);
    let err = save_memory(
        dir.path(),
        &slices,
        &guest.dirty,
        Some((dir.path(), &other)),
        &policy,
        &opts,
    )
    .unwrap_err();
    assert!(matches!(err, Error::MemorySizeMismatch { .. }), "{err:?}");

    let err = save_full_image(dir.path(), &slices, &guest.dirty, Some(&other)).unwrap_err();
    assert!(matches!(err, Error::BitmapMismatch { .. }), "{err:?}");
    assert!(file_names(dir.path()).is_empty());
}

#[test]
fn loaded_memory_for_another_guest_size_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(16);
    let mut guest = Guest::new(&[16], &mut rng);
    let stored = pause(dir.path(), &mut guest, None, &SavePolicy::default());
    let mut bad = stored.clone();
    bad.inline.push(capsule_snapshot::stored::PagePatch {
        page: 16,
        data: vec![0; PAGE_SIZE as usize],
    });
    let bytes = encode_state_bytes(&bad).unwrap();
    let decoded: StoredMemory = decode_state_bytes(&bytes).unwrap();
    assert!(matches!(
        decoded.validate(16 * PAGE_SIZE),
        Err(Error::BadInlinePage { page: 16, .. })
    ));
    assert!(matches!(
        stored.validate(32 * PAGE_SIZE),
        Err(Error::MemorySizeMismatch { .. })
    ));
}

#[test]
fn orphans_of_an_interrupted_save_are_collected() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(3);
    let mut guest = Guest::new(&[64], &mut rng);
    let stored = pause(dir.path(), &mut guest, None, &SavePolicy::default());
    // A layer that never made it into a state file, and a stray temp.
    fs::write(dir.path().join("00000000000000ff.layer"), b"orphan").unwrap();
    fs::write(dir.path().join(".base.layer.tmp-00000000000000aa"), b"tmp").unwrap();
    assert_eq!(
        remove_unreferenced_layers(dir.path(), &stored.chain).unwrap(),
        2
    );
    assert!(restore(dir.path(), &load(dir.path()), &[64]) == guest.mem);
}

#[test]
fn sparse_layer_allocates_few_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let pages = 16384; // 64 MiB
    let mem = vec![0xA5u8; (pages * PAGE_SIZE) as usize];
    let mut bm = PageBitmap::new(pages);
    for p in [0, 1, 5000, 16383] {
        bm.set(p).unwrap();
    }
    let p = dir.path().join("sparse.layer");
    write_layer(&p, &[&mem], &bm, &WriteOptions::default()).unwrap();
    let meta = fs::metadata(&p).unwrap();
    assert_eq!(meta.len(), pages * PAGE_SIZE);
    let allocated = meta.blocks() * 512;
    assert!(
        allocated * 100 < meta.len(),
        "{allocated} bytes allocated for 4 pages"
    );
}

#[test]
fn corrupt_state_files_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(STATE_FILE_NAME);
    let good = encode_state_bytes(&vm_state()).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("magic", {
            let mut b = good.clone();
            b[3] = b'X';
            b
        }),
        ("payload", {
            let mut b = good.clone();
            let n = b.len();
            b[n / 2 + 16] ^= 1;
            b
        }),
        ("truncated", good[..good.len() - 1].to_vec()),
        ("header-only", good[..20].to_vec()),
        ("future", {
            let mut b = good.clone();
            b[8..12].copy_from_slice(&2u32.to_le_bytes());
            b
        }),
    ];
    for (what, bytes) in cases {
        fs::write(&p, &bytes).unwrap();
        let err = read_state::<VmState>(&p).unwrap_err();
        let ok = match what {
            "magic" => matches!(err, Error::BadMagic),
            "payload" => matches!(err, Error::ChecksumMismatch { .. }),
            "truncated" | "header-only" => matches!(err, Error::Truncated { .. }),
            "future" => matches!(
                err,
                Error::UnsupportedVersion {
                    found: 2,
                    supported: 1
                }
            ),
            _ => false,
        };
        assert!(ok, "{what}: got {err:?}");
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0xC0FFEE);
    let good = encode_state_bytes(&vm_state()).unwrap();
    let mut guest = Guest::new(&[8], &mut rng);
    let dir = tempfile::tempdir().unwrap();
    let first = pause(dir.path(), &mut guest, None, &SavePolicy::default());
    guest.write(2, 1, 1);
    let stored = pause(
        dir.path(),
        &mut guest,
        Some((dir.path(), &first.chain)),
        &SavePolicy::default(),
    );
    let memory = encode_state_bytes(&stored).unwrap();
    for i in 0..20_000u32 {
        let bytes: Vec<u8> = match i % 3 {
            // Pure noise, sometimes behind a valid magic + version.
            0 => {
                let len = rng.below(200) as usize;
                let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if rng.below(2) == 0 && b.len() >= 12 {
                    b[..8].copy_from_slice(b"CAPSNAP\0");
                    b[8..12].copy_from_slice(&1u32.to_le_bytes());
                }
                b
            }
            // Mutations of valid files, with the CRC fixed up so the decoder itself is exercised.
            _ => {
                let mut b = if i % 3 == 1 {
                    good.clone()
                } else {
                    memory.clone()
                };
                for _ in 0..1 + rng.below(4) {
                    let at = 32 + rng.below((b.len() - 32) as u64) as usize;
                    b[at] = rng.next() as u8;
                }
                if rng.below(4) == 0 {
                    let cut = 32 + rng.below((b.len() - 32) as u64) as usize;
                    b.truncate(cut);
                    let len = (b.len() - 32) as u64;
                    b[16..24].copy_from_slice(&len.to_le_bytes());
                }
                let crc = capsule_snapshot::state_file::checksum(&b[32..]);
                b[24..32].copy_from_slice(&crc.to_le_bytes());
                b
            }
        };
        let _ = decode_state_bytes::<VmState>(&bytes);
        if let Ok(m) = decode_state_bytes::<StoredMemory>(&bytes) {
            let _ = m.validate(8 * PAGE_SIZE);
        }
        let _ = decode_state_bytes::<String>(&bytes);
    }
}

#[test]
fn fault_injection_keeps_previous_good_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    let mut guest = Guest::new(&[256], &mut rng);
    let first = pause(dir.path(), &mut guest, None, &SavePolicy::default());
    let good_mem = guest.mem.clone();

    // A pause whose new layer fails halfway: the previous state restores as before.
    guest.scribble(&mut rng, 50);
    let dirty = guest.take_dirty();
    for fail_after in [0, 4096 * 10 + 17, dirty.count_ones() * PAGE_SIZE - 1] {
        let err = save_memory(
            dir.path(),
            &guest.slices(),
            &dirty,
            Some((dir.path(), &first.chain)),
            &SavePolicy::default(),
            &WriteOptions::failing_after(fail_after),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        assert!(restore(dir.path(), &load(dir.path()), &[256]) == good_mem);
        // No temporaries linger.
        assert!(file_names(dir.path()).iter().all(|n| !n.starts_with('.')));
    }

    // The same for a state file whose replacement fails midway.
    let state_path = dir.path().join(STATE_FILE_NAME);
    let err = atomic::write_file_with(&state_path, |f, tmp| {
        use std::io::Write;
        f.write_all(b"CAPSNAP\0partial").map_err(|e| Error::Io {
            path: tmp.into(),
            source: e,
        })?;
        Err(Error::Io {
            path: tmp.into(),
            source: std::io::Error::other("disk full"),
        })
    })
    .unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(restore(dir.path(), &load(dir.path()), &[256]) == good_mem);
}

/// Throughput check for `write_layer` (run with `--ignored --nocapture`,
/// ideally in release mode): 256 MiB of dirty pages against a plain memcpy.
#[test]
#[ignore = "benchmark; run explicitly"]
fn write_layer_bandwidth() {
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let pages = 65536u64; // 256 MiB
    let mut mem = vec![0u8; (pages * PAGE_SIZE) as usize];
    let mut rng = Rng(1);
    mem.chunks_mut(8)
        .for_each(|c| c.copy_from_slice(&rng.next().to_le_bytes()));

    let mut dst = vec![0u8; mem.len()];
    dst.copy_from_slice(&mem); // fault in
    let t = Instant::now();
    dst.copy_from_slice(&mem);
    let memcpy = t.elapsed();
    std::hint::black_box(&dst);
    drop(dst);

    // Reference: one raw pwrite of everything into the page cache, no fsync.
    {
        use std::os::unix::fs::FileExt;
        let p = dir.path().join("raw");
        let f = fs::File::create(&p).unwrap();
        let t = Instant::now();
        f.write_all_at(&mem, 0).unwrap();
        let el = t.elapsed();
        println!(
            "raw pwrite 256 MiB, no fsync: {el:?} = {:.0} MiB/s",
            256.0 / el.as_secs_f64()
        );
        let t = Instant::now();
        f.sync_all().unwrap();
        println!("  fsync of it: {:?}", t.elapsed());
        fs::remove_file(&p).unwrap();
    }

    for (what, bm) in [
        ("all pages", all_pages(pages)),
        ("every other 16-page run", {
            let mut bm = PageBitmap::new(pages);
            for r in (0..pages).step_by(32) {
                bm.set_range(r, 16).unwrap();
            }
            bm
        }),
    ] {
        let p = dir.path().join("bench.layer");
        let t = Instant::now();
        let info = write_layer(&p, &[&mem], &bm, &WriteOptions::default()).unwrap();
        let el = t.elapsed();
        let bytes = info.pages_written * PAGE_SIZE;
        println!(
            "{what}: {} MiB in {el:?} = {:.0} MiB/s (incl. fsync); memcpy 256 MiB in {memcpy:?} = {:.0} MiB/s",
            bytes >> 20,
            bytes as f64 / 1048576.0 / el.as_secs_f64(),
            256.0 / memcpy.as_secs_f64()
        );
        fs::remove_file(&p).unwrap();
    }
}
