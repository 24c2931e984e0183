//! Measurement helpers shared by the `report` binary and the criterion benches.
#![deny(missing_docs)]

use std::time::Duration;

/// Percentiles of a set of samples, in the unit they were given in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Number of samples.
    pub n: usize,
}

/// Summarises `samples` (any order). Empty input gives zeros.
pub fn summarize(samples: &[f64]) -> Summary {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rank = |q: f64| -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[i]
    };
    Summary {
        p50: rank(0.5),
        p99: rank(0.99),
        n: sorted.len(),
    }
}

/// One line of the report: `{"metric": NAME, "unit": UNIT, "p50": X, "p99": Y, "n": N}`.
pub fn json_line(metric: &str, unit: &str, summary: Summary) -> String {
    format!(
        "{{\"metric\": \"{metric}\", \"unit\": \"{unit}\", \"p50\": {:.1}, \"p99\": {:.1}, \"n\": {}}}",
        summary.p50, summary.p99, summary.n
    )
}

/// Microseconds in a duration, as a float.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// This process's resident set size in KiB (from /proc/self/statm).
pub fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4
}

/// Resident KiB summed over this process's mappings that are exactly `size_kib` large
/// (used to count guest memory, whose mappings have the guest's size, apart from the rest).
pub fn rss_of_mappings_sized_kib(size_kib: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut total = 0;
    let mut in_match = false;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            in_match = parse_kib(v) == size_kib;
        } else if let Some(v) = line.strip_prefix("Rss:") {
            if in_match {
                total += parse_kib(v);
            }
        }
    }
    total
}

/// Resident KiB summed over this process's mappings of files under `dir` (template layers).
pub fn rss_of_mappings_under_kib(dir: &std::path::Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let dir = dir.to_string_lossy();
    let mut total = 0;
    let mut in_match = false;
    for line in smaps.lines() {
        let is_header = line
            .split_whitespace()
            .next()
            .is_some_and(|range| range.contains('-') && !range.ends_with(':'));
        if is_header {
            in_match = line.contains(dir.as_ref());
        } else if let Some(v) = line.strip_prefix("Rss:") {
            if in_match {
                total += parse_kib(v);
            }
        }
    }
    total
}

fn parse_kib(v: &str) -> u64 {
    v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(&samples);
        assert_eq!((s.p50, s.p99, s.n), (50.0, 99.0, 100));
        assert_eq!(summarize(&[]).n, 0);
        assert_eq!(summarize(&[3.0]).p99, 3.0);
    }

    #[test]
    fn json_line_has_the_documented_shape() {
        let line = json_line(
            "x",
            "us",
            Summary {
                p50: 1.25,
                p99: 2.0,
                n: 3,
            },
        );
        assert_eq!(
            line,
            "{\"metric\": \"x\", \"unit\": \"us\", \"p50\": 1.2, \"p99\": 2.0, \"n\": 3}"
        );
    }

    #[test]
    fn rss_is_readable() {
        assert!(rss_kib() > 0);
    }
}
