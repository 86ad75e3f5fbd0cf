//! What the device and this process are using: read from `/proc`.

/// Resident memory of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessMemory {
    /// Resident set size now (VmRSS), bytes.
    pub resident_bytes: u64,
    /// The largest it has been (VmHWM), bytes.
    pub peak_resident_bytes: u64,
}

/// This process's memory, or `None` where `/proc` is not Linux's.
pub fn process_memory() -> Option<ProcessMemory> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(ProcessMemory {
        resident_bytes: status_kb(&status, "VmRSS:")? * 1024,
        peak_resident_bytes: status_kb(&status, "VmHWM:")? * 1024,
    })
}

fn status_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_grows_when_memory_is_touched() {
        let before = process_memory().expect("linux /proc");
        let block = vec![1u8; 64 << 20];
        let after = process_memory().expect("linux /proc");
        assert!(std::hint::black_box(&block).iter().all(|&b| b == 1));
        assert!(after.resident_bytes >= before.resident_bytes + (48 << 20));
        assert!(after.peak_resident_bytes >= after.resident_bytes);
    }
}
