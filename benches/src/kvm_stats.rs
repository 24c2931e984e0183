//! KVM's global event counters (`/sys/kernel/debug/kvm/<name>`, the sums over every VM on
//! the host), read before and after a restore to say what the guest's first moments cost:
//! exits, and page faults KVM fixed in the nested page tables (`pf_fixed`; each is a first
//! touch of a guest page after the restore, taken in the host's page tables as well).
//! Needs debugfs mounted (the nested harness's L1 mounts it); otherwise [`read`] is `None`.

use std::fmt::Write as _;

/// The counters read.
pub const NAMES: [&str; 5] = ["exits", "pf_fixed", "pf_taken", "halt_exits", "io_exits"];

/// One reading of [`NAMES`], in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmStats([u64; NAMES.len()]);

/// Reads the counters; `None` where debugfs or a counter is missing.
pub fn read() -> Option<KvmStats> {
    let mut values = [0u64; NAMES.len()];
    for (value, name) in values.iter_mut().zip(NAMES) {
        let text = std::fs::read_to_string(format!("/sys/kernel/debug/kvm/{name}")).ok()?;
        *value = text.trim().parse().ok()?;
    }
    Some(KvmStats(values))
}

impl KvmStats {
    /// `name=delta` words for the counts from `self` to `later`.
    pub fn delta_to(&self, later: &KvmStats) -> String {
        let mut out = String::new();
        for ((name, a), b) in NAMES.iter().zip(self.0).zip(later.0) {
            let _ = write!(
                out,
                "{}{name}={}",
                if out.is_empty() { "" } else { " " },
                b.saturating_sub(a)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_name_every_counter() {
        let a = KvmStats([1, 2, 3, 4, 5]);
        let b = KvmStats([11, 2, 5, 4, 9]);
        assert_eq!(
            a.delta_to(&b),
            "exits=10 pf_fixed=0 pf_taken=2 halt_exits=0 io_exits=4"
        );
    }
}
