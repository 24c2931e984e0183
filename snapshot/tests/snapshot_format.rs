//! End-to-end tests of the snapshot format: a snapshot directory written and
//! read back, chains merged, corrupt files rejected, faults injected.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use capsule_snapshot::atomic;
use capsule_snapshot::bitmap::PageBitmap;
use capsule_snapshot::chain::{
    load_manifest, merge, remove_unreferenced_layers, restore_into, restore_plan, save_manifest,
    LayerDesc, MemoryChain, MergeOutcome, DEFAULT_MAX_LAYERS,
};
use capsule_snapshot::mapping::PrivateMapping;
use capsule_snapshot::memory::{write_layer, WriteOptions};
use capsule_snapshot::state_file::{
    decode_state_bytes, encode_state_bytes, read_state, write_state,
};
use capsule_snapshot::{Error, MANIFEST_FILE_NAME, PAGE_SIZE, STATE_FILE_NAME};
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

/// Simulated guest memory that changes between snapshots.
struct Guest {
    mem: Vec<u8>,
    pages: u64,
}

impl Guest {
    fn new(pages: u64, rng: &mut Rng) -> Self {
        let mut mem = vec![0u8; (pages * PAGE_SIZE) as usize];
        for (i, chunk) in mem.chunks_mut(8).enumerate() {
            if i % 3 != 0 {
                chunk.copy_from_slice(&rng.next().to_le_bytes());
            }
        }
        Self { mem, pages }
    }

    /// Dirties some random pages and returns them as a bitmap.
    fn dirty(&mut self, rng: &mut Rng, count: u64) -> PageBitmap {
        let mut bm = PageBitmap::new(self.pages);
        for _ in 0..count {
            let p = rng.below(self.pages);
            let run = 1 + rng.below(4).min(self.pages - p - 1);
            bm.set_range(p, run).unwrap();
            let start = (p * PAGE_SIZE) as usize;
            let end = ((p + run) * PAGE_SIZE) as usize;
            let fill = rng.next() as u8;
            self.mem[start..end]
                .iter_mut()
                .for_each(|b| *b = b.wrapping_add(fill) ^ 0x5A);
        }
        bm
    }
}

fn all_pages(pages: u64) -> PageBitmap {
    let mut bm = PageBitmap::new(pages);
    bm.set_range(0, pages).unwrap();
    bm
}

/// Writes a base + `diffs` diff layers into `dir`, returning the chain.
fn build_chain(dir: &Path, guest: &mut Guest, rng: &mut Rng, diffs: usize) -> MemoryChain {
    let mut chain = MemoryChain::new(guest.pages * PAGE_SIZE);
    let base = all_pages(guest.pages);
    write_layer(
        &dir.join("base.layer"),
        &[&guest.mem],
        &base,
        &WriteOptions::default(),
    )
    .unwrap();
    chain
        .push_layer(LayerDesc {
            file_name: "base.layer".into(),
            pages: base,
        })
        .unwrap();
    for i in 1..=diffs {
        let dirty = guest.dirty(rng, 6);
        let name = format!("diff-{i}.layer");
        write_layer(
            &dir.join(&name),
            &[&guest.mem],
            &dirty,
            &WriteOptions::default(),
        )
        .unwrap();
        chain
            .push_layer(LayerDesc {
                file_name: name,
                pages: dirty,
            })
            .unwrap();
    }
    save_manifest(dir, &chain).unwrap();
    chain
}

fn restored(dir: &Path, chain: &MemoryChain) -> Vec<u8> {
    let mut out = vec![0xFFu8; chain.mem_size as usize];
    restore_into(dir, chain, &mut out).unwrap();
    out
}

#[test]
fn snapshot_directory_round_trip() {
    let root = tempfile::tempdir().unwrap();
    let target = root.path().join("snap-1");
    let mut rng = Rng(7);
    let mut guest = Guest::new(256, &mut rng);
    let chain = atomic::publish_new_dir(&target, |dir| {
        write_state(&dir.join(STATE_FILE_NAME), &vm_state())?;
        Ok(build_chain(dir, &mut guest, &mut rng, 3))
    })
    .unwrap();

    assert_eq!(
        read_state::<VmState>(&target.join(STATE_FILE_NAME)).unwrap(),
        vm_state()
    );
    let loaded = load_manifest(&target).unwrap();
    assert_eq!(loaded, chain);
    assert!(restored(&target, &loaded) == guest.mem);
    let m = PrivateMapping::map_chain(&target, &loaded).unwrap();
    assert!(m.as_slice() == guest.mem.as_slice());

    // A published directory is never replaced.
    let err = atomic::publish_new_dir(&target, |_| Ok(())).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
}

#[test]
fn ten_diff_layers_merge_into_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(42);
    let mut guest = Guest::new(512, &mut rng);
    let chain = build_chain(dir.path(), &mut guest, &mut rng, 10);
    assert_eq!(chain.layers.len(), 11);
    assert!(restored(dir.path(), &chain) == guest.mem);

    let merged = match merge(&chain, dir.path(), DEFAULT_MAX_LAYERS).unwrap() {
        MergeOutcome::Merged(c) => c,
        other => panic!("expected a merge, got {other:?}"),
    };
    assert_eq!(merged.layers.len(), 1);
    assert_eq!(load_manifest(dir.path()).unwrap(), merged);
    assert!(restored(dir.path(), &merged) == guest.mem);
    let m = PrivateMapping::map_chain(dir.path(), &merged).unwrap();
    assert!(m.as_slice() == guest.mem.as_slice());

    // Only the manifest and the new base remain.
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            MANIFEST_FILE_NAME.to_string(),
            merged.layers[0].file_name.clone()
        ]
    );

    // Within the limit nothing happens.
    assert_eq!(
        merge(&merged, dir.path(), DEFAULT_MAX_LAYERS).unwrap(),
        MergeOutcome::Unchanged
    );
}

#[test]
fn merge_keeps_pages_in_no_layer_zero() {
    let dir = tempfile::tempdir().unwrap();
    let pages = 128;
    let mem: Vec<u8> = (0..pages * PAGE_SIZE)
        .map(|i| (i % 251) as u8 + 1)
        .collect();
    let mut chain = MemoryChain::new(pages * PAGE_SIZE);
    let mut expected = vec![0u8; mem.len()];
    for i in 0..4u64 {
        let mut bm = PageBitmap::new(pages);
        bm.set_range(i * 20, 5).unwrap();
        let r = (i * 20 * PAGE_SIZE) as usize..((i * 20 + 5) * PAGE_SIZE) as usize;
        expected[r.clone()].copy_from_slice(&mem[r]);
        let name = format!("l{i}.layer");
        write_layer(
            &dir.path().join(&name),
            &[&mem],
            &bm,
            &WriteOptions::default(),
        )
        .unwrap();
        chain
            .push_layer(LayerDesc {
                file_name: name,
                pages: bm,
            })
            .unwrap();
    }
    let MergeOutcome::Merged(merged) = merge(&chain, dir.path(), 2).unwrap() else {
        panic!("expected merge");
    };
    assert_eq!(merged.layers[0].pages.count_ones(), 20);
    assert!(restored(dir.path(), &merged) == expected);
    assert_eq!(restore_plan(&merged).unwrap().len(), 4);
}

#[test]
fn orphans_of_an_interrupted_merge_are_collected() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(3);
    let mut guest = Guest::new(64, &mut rng);
    let chain = build_chain(dir.path(), &mut guest, &mut rng, 2);
    // A merged base that never made it into the manifest, and a stray temp.
    fs::write(dir.path().join("merged-00000000000000ff.layer"), b"orphan").unwrap();
    fs::write(dir.path().join(".base.layer.tmp-00000000000000aa"), b"tmp").unwrap();
    assert_eq!(remove_unreferenced_layers(dir.path(), &chain).unwrap(), 2);
    assert!(restored(dir.path(), &load_manifest(dir.path()).unwrap()) == guest.mem);
}

#[test]
fn mapping_writes_never_reach_layer_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(11);
    let mut guest = Guest::new(128, &mut rng);
    let chain = build_chain(dir.path(), &mut guest, &mut rng, 4);
    let files_before: Vec<Vec<u8>> = chain
        .layers
        .iter()
        .map(|l| fs::read(dir.path().join(&l.file_name)).unwrap())
        .collect();
    {
        let mut m = PrivateMapping::map_chain(dir.path(), &chain).unwrap();
        assert!(m.as_slice() == guest.mem.as_slice());
        for b in m.as_mut_slice().iter_mut().step_by(97) {
            *b = !*b;
        }
        // A second mapping of the same chain sees the pristine contents.
        let m2 = PrivateMapping::map_chain(dir.path(), &chain).unwrap();
        assert!(m2.as_slice() == guest.mem.as_slice());
    }
    for (l, before) in chain.layers.iter().zip(&files_before) {
        assert!(&fs::read(dir.path().join(&l.file_name)).unwrap() == before);
    }
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
    let manifest = encode_state_bytes(&MemoryChain::new(1 << 20)).unwrap();
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
                    manifest.clone()
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
        let _ = decode_state_bytes::<MemoryChain>(&bytes);
        let _ = decode_state_bytes::<String>(&bytes);
    }
}

#[test]
fn fault_injection_keeps_previous_good_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    let mut guest = Guest::new(256, &mut rng);
    build_chain(dir.path(), &mut guest, &mut rng, 1);
    let good_mem = guest.mem.clone();

    // Overwrite the base layer with new contents, failing halfway.
    guest.dirty(&mut rng, 50);
    let all = all_pages(guest.pages);
    for fail_after in [0, 4096 * 10 + 17, guest.mem.len() as u64 - 1] {
        let err = write_layer(
            &dir.path().join("base.layer"),
            &[&guest.mem],
            &all,
            &WriteOptions::failing_after(fail_after),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        // The previous chain restores exactly as before.
        let loaded = load_manifest(dir.path()).unwrap();
        assert!(restored(dir.path(), &loaded) == good_mem);
        // No temporaries linger.
        assert!(fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')));
    }

    // The same for a state file whose replacement fails midway.
    let state_path = dir.path().join(STATE_FILE_NAME);
    write_state(&state_path, &vm_state()).unwrap();
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
    assert_eq!(read_state::<VmState>(&state_path).unwrap(), vm_state());
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
