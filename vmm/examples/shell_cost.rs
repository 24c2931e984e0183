use capsule_vmm::{memory, vm::VmOptions, Hypervisor, Vm};
use std::time::Instant;
fn main() {
    let hv = Hypervisor::open().unwrap();
    for mb in [32usize, 512] {
        let (mut a, mut b, mut c, mut d) = (vec![], vec![], vec![], vec![]);
        for _ in 0..50 {
            let t = Instant::now();
            let mem = memory::create_anonymous(mb << 20).unwrap();
            let t1 = t.elapsed();
            let vm = Vm::new(
                &hv,
                mem,
                VmOptions {
                    dirty_log: true,
                    irqchip: false,
                },
            )
            .unwrap();
            let t2 = t.elapsed();
            let vcpu = vm.create_vcpu(0).unwrap();
            let t3 = t.elapsed();
            drop(vcpu);
            drop(vm);
            let t4 = t.elapsed();
            a.push(t1.as_micros());
            b.push((t2 - t1).as_micros());
            c.push((t3 - t2).as_micros());
            d.push((t4 - t3).as_micros());
        }
        for v in [&mut a, &mut b, &mut c, &mut d] {
            v.sort();
        }
        println!(
            "{mb} MiB: mmap {} vm+slot {} vcpu {} drop {}",
            a[25], b[25], c[25], d[25]
        );
    }
    let kvm = hv.kvm();
    let mut v = vec![];
    for _ in 0..50 {
        let t = Instant::now();
        let vm = kvm.create_vm().unwrap();
        v.push(t.elapsed().as_micros());
        drop(vm);
    }
    v.sort();
    println!("bare create_vm {}", v[25]);
}
