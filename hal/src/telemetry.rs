//! What the device and this process are using: read from `/proc` and `/sys`.

use std::path::{Path, PathBuf};

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

/// What the board reports about itself.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DeviceTelemetry {
    /// Memory available for new work (MemAvailable), bytes.
    pub available_memory_bytes: Option<u64>,
    /// The hottest thermal zone, degrees Celsius.
    pub temperature_c: Option<f32>,
    /// The firmware reports throttling now (Raspberry Pi); `None` where the
    /// board has no such report.
    pub throttled: Option<bool>,
}

/// Reads device telemetry under a filesystem root: `/` on a device, a
/// directory of fixture files in tests.
#[derive(Debug, Clone)]
pub struct Telemetry {
    root: PathBuf,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::with_root("/")
    }
}

impl Telemetry {
    /// Telemetry of the files under `root` (`proc/meminfo`, `sys/class/thermal/…`).
    pub fn with_root(root: impl AsRef<Path>) -> Telemetry {
        Telemetry {
            root: root.as_ref().to_path_buf(),
        }
    }

    /// Reads everything available now; what the board does not report is `None`.
    pub fn read(&self) -> DeviceTelemetry {
        DeviceTelemetry {
            available_memory_bytes: self.available_memory(),
            temperature_c: self.temperature(),
            throttled: self.throttled(),
        }
    }

    fn available_memory(&self) -> Option<u64> {
        let info = std::fs::read_to_string(self.root.join("proc/meminfo")).ok()?;
        status_kb(&info, "MemAvailable:").map(|kb| kb * 1024)
    }

    /// The maximum over `sys/class/thermal/thermal_zone*/temp` (milli-degrees).
    fn temperature(&self) -> Option<f32> {
        let zones = std::fs::read_dir(self.root.join("sys/class/thermal")).ok()?;
        zones
            .flatten()
            .filter(|z| z.file_name().to_string_lossy().starts_with("thermal_zone"))
            .filter_map(|z| std::fs::read_to_string(z.path().join("temp")).ok())
            .filter_map(|t| t.trim().parse::<i64>().ok())
            .map(|milli| milli as f32 / 1000.0)
            .reduce(f32::max)
    }

    /// Raspberry Pi firmware's `get_throttled` bits: 0x4 throttled now,
    /// 0x2 frequency capped now.
    fn throttled(&self) -> Option<bool> {
        let path = self
            .root
            .join("sys/devices/platform/soc/soc:firmware/get_throttled");
        let text = std::fs::read_to_string(path).ok()?;
        let text = text.trim();
        let bits = u64::from_str_radix(text.trim_start_matches("0x"), 16).ok()?;
        Some(bits & 0x6 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn a_pi_reports_memory_the_hottest_zone_and_throttling() {
        let root = tempfile::tempdir().unwrap();
        write(
            root.path(),
            "proc/meminfo",
            "MemTotal: 8000000 kB\nMemAvailable:    2048 kB\n",
        );
        write(
            root.path(),
            "sys/class/thermal/thermal_zone0/temp",
            "51234\n",
        );
        write(
            root.path(),
            "sys/class/thermal/thermal_zone1/temp",
            "48000\n",
        );
        write(
            root.path(),
            "sys/class/thermal/cooling_device0/temp",
            "99000\n",
        );
        write(
            root.path(),
            "sys/devices/platform/soc/soc:firmware/get_throttled",
            "0x50005\n",
        );
        let t = Telemetry::with_root(root.path()).read();
        assert_eq!(t.available_memory_bytes, Some(2048 * 1024));
        assert_eq!(t.temperature_c, Some(51.234));
        assert_eq!(t.throttled, Some(true));
        write(
            root.path(),
            "sys/devices/platform/soc/soc:firmware/get_throttled",
            "0x50000\n",
        );
        assert_eq!(
            Telemetry::with_root(root.path()).read().throttled,
            Some(false)
        );
    }

    #[test]
    fn a_board_without_sensors_reports_none() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(
            Telemetry::with_root(root.path()).read(),
            DeviceTelemetry::default()
        );
        // This machine has /proc/meminfo.
        assert!(
            Telemetry::default()
                .read()
                .available_memory_bytes
                .unwrap_or(0)
                > 0
        );
    }

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
