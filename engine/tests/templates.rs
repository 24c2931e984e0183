//! Templates: snapshot a running capsule, start many capsules from it, share its memory.
//! `templates_are_listed_validated_and_keep_their_resources` runs for the probe and for
//! Linux (`::probe`, `::linux`; see `common/kinds.rs`); the hundred clones are probe-only
//! (a hundred Linux guests do not fit the nested harness; `linux_lifecycle.rs` starts ten).

mod common;

use capsule::{CapsuleConfig, Error, Status};
use common::kinds::{for_both_kinds, Kind};
use common::{engine, probe};

for_both_kinds!(templates_are_listed_validated_and_keep_their_resources);

/// Resident, proportional and private-dirty KiB of this process's mappings of files under
/// `dir`, from /proc/self/smaps.
fn smaps_under(dir: &std::path::Path) -> (u64, u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let dir = dir.to_str().unwrap();
    let (mut rss, mut pss, mut private_dirty) = (0, 0, 0);
    let mut inside = false;
    let kib = |v: &str| -> u64 { v.trim().trim_end_matches("kB").trim().parse().unwrap() };
    for line in smaps.lines() {
        if line.contains('-') && line.split_whitespace().nth(1).is_some_and(|p| p.len() == 4) {
            inside = line.contains(dir);
        } else if inside {
            if let Some(v) = line.strip_prefix("Rss:") {
                rss += kib(v);
            } else if let Some(v) = line.strip_prefix("Pss:") {
                pss += kib(v);
            } else if let Some(v) = line.strip_prefix("Private_Dirty:") {
                private_dirty += kib(v);
            }
        }
    }
    (rss, pss, private_dirty)
}

#[test]
fn a_hundred_capsules_from_one_template_share_its_pages_and_diverge_privately() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let source = engine.create(probe()).unwrap();
    for _ in 0..5 {
        source.commands().run("count").unwrap();
    }
    let touched = source
        .commands()
        .run("touch 1024")
        .unwrap()
        .stdout_str()
        .into_owned(); // 4 MiB
    let info = source.snapshot("warm").unwrap();
    assert_eq!(
        (info.name.as_str(), info.vcpus, info.memory_mb),
        ("warm", 1, 32)
    );
    // The source keeps running, unaffected.
    assert_eq!(source.commands().run("count").unwrap().stdout_str(), "6\n");

    let clones: Vec<_> = (0..100)
        .map(|_| engine.create(CapsuleConfig::new("warm")).unwrap())
        .collect();
    for clone in &clones {
        assert_eq!(clone.info().template, "warm");
        assert_eq!(
            clone.commands().run("count").unwrap().stdout_str(),
            "6\n",
            "continues the template"
        );
        assert_eq!(
            clone.commands().run("sum").unwrap().stdout_str(),
            touched,
            "reads the template's pages"
        );
    }
    // Divergence stays private.
    let changed = clones[0]
        .commands()
        .run("touch 3")
        .unwrap()
        .stdout_str()
        .into_owned();
    assert_ne!(
        clones[0].commands().run("sum").unwrap().stdout_str(),
        touched
    );
    assert_eq!(
        clones[1].commands().run("sum").unwrap().stdout_str(),
        touched
    );
    assert_eq!(
        clones[1].commands().run("count").unwrap().stdout_str(),
        "7\n"
    );
    assert_eq!(
        clones[2].commands().run("count").unwrap().stdout_str(),
        "7\n"
    );
    assert_ne!(changed, touched);

    // Each clone read all 4 MiB of touched pages, yet they are shared: 100 clones map them
    // (Rss counts every mapping) but proportionally they cost about one copy, and what each
    // clone owns privately is only what it wrote.
    let (rss, pss, private_dirty) = smaps_under(&dir.path().join("templates").join("warm"));
    eprintln!("template mappings: rss {rss} KiB, pss {pss} KiB, private dirty {private_dirty} KiB");
    assert!(
        rss >= 100 * 4096,
        "every clone maps the template's pages: rss {rss} KiB"
    );
    assert!(
        pss < rss / 20,
        "pages are shared: pss {pss} KiB of rss {rss} KiB"
    );
    assert!(
        private_dirty < 100 * 256,
        "clones own only what they wrote: {private_dirty} KiB private"
    );

    // Deleting a template that running capsules map is refused; paused ones do not count.
    match engine.delete_template("warm") {
        Err(Error::TemplateInUse { name, capsules }) => {
            assert_eq!(name, "warm");
            assert_eq!(capsules, 100);
        }
        other => panic!("expected TemplateInUse, got {other:?}"),
    }
    clones[1].pause().unwrap();
    for clone in clones.iter().skip(2) {
        clone.destroy().unwrap();
    }
    clones[0].destroy().unwrap();
    engine.delete_template("warm").unwrap();
    assert!(engine.templates().unwrap().is_empty());
    // The paused clone does not depend on the deleted template.
    clones[1].resume().unwrap();
    assert_eq!(
        clones[1].commands().run("count").unwrap().stdout_str(),
        "8\n"
    );
    assert_eq!(
        clones[1].commands().run("sum").unwrap().stdout_str(),
        touched
    );
    assert!(matches!(
        engine.create(CapsuleConfig::new("warm")),
        Err(Error::InvalidConfig(_))
    ));
}

/// A template keeps the source's vCPUs and memory (probe: 2 and 16 MiB; Linux: 2 and
/// 256 MiB), refuses others, and its clones pause, resume and become templates in turn.
fn templates_are_listed_validated_and_keep_their_resources(kind: Kind) {
    let Some((engine, _dir)) = kind.engine() else {
        return;
    };
    let (memory_mb, other_memory_mb) = kind.pick((16, 64), (256, 512));
    let source = engine
        .create(kind.config().vcpus(2).memory_mb(memory_mb))
        .unwrap();
    kind.out(&source, kind.count());
    for bad in ["", "Bad", "probe", "minimal", "a/b", ".x"] {
        assert!(
            matches!(source.snapshot(bad), Err(Error::InvalidArgument(_))),
            "{bad}"
        );
    }
    source.snapshot("two-cpus").unwrap();
    assert!(matches!(
        source.snapshot("two-cpus"),
        Err(Error::InvalidArgument(_))
    ));
    let listed = engine.templates().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].vcpus, listed[0].memory_mb), (2, memory_mb));
    assert!(listed[0].disk_bytes > 0);

    let c = engine.create(CapsuleConfig::new("two-cpus")).unwrap();
    assert_eq!((c.info().vcpus, c.info().memory_mb), (2, memory_mb));
    assert!(matches!(
        engine.create(CapsuleConfig::builder("two-cpus").vcpus(1)),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        engine.create(CapsuleConfig::builder("two-cpus").memory_mb(other_memory_mb)),
        Err(Error::InvalidConfig(_))
    ));
    engine
        .create(
            CapsuleConfig::builder("two-cpus")
                .vcpus(2)
                .memory_mb(memory_mb),
        )
        .unwrap()
        .destroy()
        .unwrap();

    // A template clone pauses and resumes like any capsule.
    assert_eq!(kind.out(&c, kind.count()), "2\n");
    c.pause().unwrap();
    c.resume().unwrap();
    assert_eq!(kind.out(&c, kind.count()), "3\n");

    // A template of a template-spawned capsule.
    c.snapshot("second-gen").unwrap();
    let d = engine.create(CapsuleConfig::new("second-gen")).unwrap();
    assert_eq!(kind.out(&d, kind.count()), "4\n");

    assert!(matches!(
        engine.delete_template("nope"),
        Err(Error::TemplateNotFound(_))
    ));
    for builtin in ["probe", "minimal"] {
        assert!(
            matches!(
                engine.delete_template(builtin),
                Err(Error::InvalidArgument(_))
            ),
            "{builtin}"
        );
    }
    source.destroy().unwrap();
    assert_eq!(c.status(), Status::Running);
}
