use capsule::{CapsuleConfig, Engine, EngineConfig};
use std::time::Instant;
fn main() {
    let _ = std::fs::remove_dir_all("/tmp/cap-timing");
    let pool: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(2);
    let mb: u64 = std::env::args()
        .nth(2)
        .map(|a| a.parse().unwrap())
        .unwrap_or(512);
    let engine = Engine::new(
        EngineConfig::default()
            .data_dir("/tmp/cap-timing")
            .shell_pool_size(pool),
    )
    .unwrap();
    let c = engine
        .create(CapsuleConfig::new("probe").memory_mb(mb))
        .unwrap();
    c.commands().run("touch 1024").unwrap();
    c.snapshot("t").unwrap();
    c.destroy().unwrap();
    let mut keep = vec![];
    let t = Instant::now();
    let mut lap = Instant::now();
    for i in 0..300 {
        keep.push(engine.create(CapsuleConfig::new("t")).unwrap());
        if i % 200 == 199 {
            println!("{} .. {}: {:?}", i - 199, i, lap.elapsed());
            lap = Instant::now();
        }
    }
    println!("pool {pool} {mb} MiB: total {:?}", t.elapsed());
    let t = Instant::now();
    for k in keep {
        k.destroy().unwrap();
    }
    println!("destroy all {:?}", t.elapsed());
}
