//! Configuration values: a disk's limits (its quota), its reservation, the device capacity and
//! the device-time cost model, and the SPDK-compatible `bdev_set_qos_limit` parameters.

use super::clock::NS_PER_SEC;
use serde::{Deserialize, Serialize};

/// Bytes in one of SPDK's "megabytes" (`rw_mbytes_per_sec` etc. are MiB/s).
pub const MIB: u64 = 1024 * 1024;

/// Default burst window: a limit without an explicit burst may run ahead of its rate by this
/// much time's worth of credit (10 ms).
pub const DEFAULT_BURST_NS: u64 = 10_000_000;

/// One rate limit: `per_sec` units per second (0 = unlimited) with a burst of `burst` units
/// (0 = [`DEFAULT_BURST_NS`] worth of the rate, at least 1 unit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Units per second; 0 = unlimited.
    pub per_sec: u64,
    /// Bucket depth in units; 0 = the default burst window.
    #[serde(default)]
    pub burst: u64,
}

impl Limit {
    /// `per_sec` with the default burst.
    pub const fn rate(per_sec: u64) -> Self {
        Limit { per_sec, burst: 0 }
    }

    /// No limit.
    pub const UNLIMITED: Limit = Limit {
        per_sec: 0,
        burst: 0,
    };

    /// Whether this limits anything.
    pub fn is_limited(&self) -> bool {
        self.per_sec > 0
    }

    /// The bucket depth this limit uses.
    pub fn depth(&self) -> u64 {
        if self.burst > 0 {
            self.burst
        } else {
            let d =
                u128::from(self.per_sec) * u128::from(DEFAULT_BURST_NS) / u128::from(NS_PER_SEC);
            u64::try_from(d).unwrap_or(u64::MAX).max(1)
        }
    }
}

/// A disk's limits (its quota): the four `bdev_set_qos_limit` limits, in base units (IOs and
/// bytes, not SPDK's MiB) so any value can be expressed exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskLimits {
    /// Read + write (and other) IOs per second.
    #[serde(default)]
    pub rw_ios: Limit,
    /// Read + write bytes per second.
    #[serde(default)]
    pub rw_bytes: Limit,
    /// Read bytes per second.
    #[serde(default)]
    pub r_bytes: Limit,
    /// Write bytes per second.
    #[serde(default)]
    pub w_bytes: Limit,
}

impl DiskLimits {
    /// No limits at all.
    pub const UNLIMITED: DiskLimits = DiskLimits {
        rw_ios: Limit::UNLIMITED,
        rw_bytes: Limit::UNLIMITED,
        r_bytes: Limit::UNLIMITED,
        w_bytes: Limit::UNLIMITED,
    };

    /// The quota bandwidth in bytes/s: `rw_bytes`, else `r_bytes + w_bytes` when both are set;
    /// `None` when a direction is unlimited.
    pub fn quota_bytes_per_sec(&self) -> Option<u64> {
        if self.rw_bytes.is_limited() {
            Some(self.rw_bytes.per_sec)
        } else if self.r_bytes.is_limited() && self.w_bytes.is_limited() {
            Some(self.r_bytes.per_sec.saturating_add(self.w_bytes.per_sec))
        } else {
            None
        }
    }

    /// The quota IOPS; `None` when unlimited.
    pub fn quota_ios_per_sec(&self) -> Option<u64> {
        self.rw_ios.is_limited().then_some(self.rw_ios.per_sec)
    }
}

/// The parameters of SPDK's `bdev_set_qos_limit` RPC (minus `name`): each field left out keeps
/// its current value, 0 disables that limit. Unlike SPDK, IOPS are not rounded to multiples of
/// 1000 and there is no minimum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosLimitParams {
    /// IOs per second (read + write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rw_ios_per_sec: Option<u64>,
    /// MiB per second (read + write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rw_mbytes_per_sec: Option<u64>,
    /// Read MiB per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r_mbytes_per_sec: Option<u64>,
    /// Write MiB per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub w_mbytes_per_sec: Option<u64>,
}

impl QosLimitParams {
    /// `limits` with these parameters applied (bursts are kept).
    pub fn apply(&self, mut limits: DiskLimits) -> DiskLimits {
        if let Some(v) = self.rw_ios_per_sec {
            limits.rw_ios.per_sec = v;
        }
        let mib = |v: u64| v.saturating_mul(MIB);
        if let Some(v) = self.rw_mbytes_per_sec {
            limits.rw_bytes.per_sec = mib(v);
        }
        if let Some(v) = self.r_mbytes_per_sec {
            limits.r_bytes.per_sec = mib(v);
        }
        if let Some(v) = self.w_mbytes_per_sec {
            limits.w_bytes.per_sec = mib(v);
        }
        limits
    }

    /// The parameters describing `limits` (byte limits rounded down to whole MiB, as SPDK's
    /// `bdev_get_bdevs` reports them).
    pub fn from_limits(limits: &DiskLimits) -> Self {
        QosLimitParams {
            rw_ios_per_sec: Some(limits.rw_ios.per_sec),
            rw_mbytes_per_sec: Some(limits.rw_bytes.per_sec / MIB),
            r_mbytes_per_sec: Some(limits.r_bytes.per_sec / MIB),
            w_mbytes_per_sec: Some(limits.w_bytes.per_sec / MIB),
        }
    }
}

/// A disk's minimum: enough device time for this many IOPS and bytes/s (whichever needs more at
/// the disk's recent IO size), guaranteed when the disk wants it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    /// Reserved IOs per second.
    #[serde(default)]
    pub ios_per_sec: u64,
    /// Reserved bytes per second.
    #[serde(default)]
    pub bytes_per_sec: u64,
}

/// Device time is counted in picoseconds: one second of a fully busy device.
pub const DEVICE_PS_PER_SEC: u64 = 1_000_000_000_000;

/// What the physical device behind a set of disks can do; the allocator shares its time.
///
/// Cost model (linear, as Linux blk-iocost): an IO of `b` bytes takes `1/ios_per_sec +
/// b/bytes_per_sec` seconds of device time. So `ios_per_sec` is the rate for tiny IOs and
/// `bytes_per_sec` the bandwidth for large ones; a 0 drops that term. Both 0 = unlimited (no
/// allocation: only the disks' own limits apply).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceCapacity {
    /// IOs per second at (near) zero size; 0 = no per-IO cost.
    #[serde(default)]
    pub ios_per_sec: u64,
    /// Bytes per second for large IOs; 0 = no per-byte cost.
    #[serde(default)]
    pub bytes_per_sec: u64,
}

impl DeviceCapacity {
    /// No device constraint.
    pub const UNLIMITED: DeviceCapacity = DeviceCapacity {
        ios_per_sec: 0,
        bytes_per_sec: 0,
    };

    /// Whether the device is shared by allocation at all.
    pub fn is_unlimited(&self) -> bool {
        self.ios_per_sec == 0 && self.bytes_per_sec == 0
    }

    /// Device time, in picoseconds, of `ios` IOs moving `bytes` bytes in total (additive, so it
    /// works on sums and on rates alike). Saturates.
    #[inline]
    pub fn cost(&self, ios: u64, bytes: u64) -> u64 {
        let ps = u128::from(DEVICE_PS_PER_SEC);
        let mut c = 0u128;
        if self.ios_per_sec > 0 {
            c += u128::from(ios) * ps / u128::from(self.ios_per_sec);
        }
        if self.bytes_per_sec > 0 {
            c += u128::from(bytes) * ps / u128::from(self.bytes_per_sec);
        }
        u64::try_from(c).unwrap_or(u64::MAX)
    }

    /// [`DeviceCapacity::cost`] for fractional rates (estimates).
    pub fn cost_f(&self, ios: f64, bytes: f64) -> f64 {
        let ps = DEVICE_PS_PER_SEC as f64;
        let mut c = 0.0;
        if self.ios_per_sec > 0 {
            c += ios * ps / self.ios_per_sec as f64;
        }
        if self.bytes_per_sec > 0 {
            c += bytes * ps / self.bytes_per_sec as f64;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spdk_params_apply_in_mib_and_zero_disables() {
        let l = DiskLimits {
            rw_ios: Limit {
                per_sec: 500,
                burst: 7,
            },
            ..DiskLimits::UNLIMITED
        };
        let p: QosLimitParams =
            serde_json::from_str(r#"{"rw_ios_per_sec": 1234, "w_mbytes_per_sec": 50}"#).unwrap();
        let l = p.apply(l);
        assert_eq!(
            l.rw_ios,
            Limit {
                per_sec: 1234,
                burst: 7
            }
        );
        assert_eq!(l.w_bytes.per_sec, 50 * MIB);
        assert!(!l.r_bytes.is_limited());
        let l = QosLimitParams {
            rw_ios_per_sec: Some(0),
            ..Default::default()
        }
        .apply(l);
        assert!(!l.rw_ios.is_limited());
        assert_eq!(QosLimitParams::from_limits(&l).w_mbytes_per_sec, Some(50));
    }

    #[test]
    fn default_burst_is_ten_ms_of_rate_and_at_least_one() {
        assert_eq!(Limit::rate(1234).depth(), 12);
        assert_eq!(Limit::rate(10).depth(), 1);
        assert_eq!(
            Limit {
                per_sec: 10,
                burst: 99
            }
            .depth(),
            99
        );
    }

    #[test]
    fn cost_is_linear_in_ios_and_bytes() {
        let d = DeviceCapacity {
            ios_per_sec: 100_000,
            bytes_per_sec: 1_000_000_000,
        };
        assert_eq!(d.cost(1, 0), 10_000_000);
        assert_eq!(d.cost(1, 4096), 10_000_000 + 4_096_000);
        assert_eq!(d.cost(3, 3 * 4096), 3 * d.cost(1, 4096));
        assert_eq!(DeviceCapacity::UNLIMITED.cost(5, 5), 0);
    }

    #[test]
    fn quota_bandwidth() {
        let mut l = DiskLimits::UNLIMITED;
        assert_eq!(l.quota_bytes_per_sec(), None);
        l.r_bytes = Limit::rate(10);
        assert_eq!(l.quota_bytes_per_sec(), None);
        l.w_bytes = Limit::rate(5);
        assert_eq!(l.quota_bytes_per_sec(), Some(15));
        l.rw_bytes = Limit::rate(12);
        assert_eq!(l.quota_bytes_per_sec(), Some(12));
    }
}
