//! Classes from quota: a table maps a disk's quota (bandwidth or IOPS) to a named class with a
//! weight. The weight is what the slice allocator shares contended device time by.

use super::limits::DiskLimits;
use serde::{Deserialize, Serialize};

/// Largest class weight (keeps the allocator's integer arithmetic far from overflow).
pub const MAX_WEIGHT: u32 = 1 << 20;

/// Which quota the class table looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaBasis {
    /// [`DiskLimits::quota_bytes_per_sec`].
    BytesPerSec,
    /// [`DiskLimits::quota_ios_per_sec`].
    IosPerSec,
}

/// One class: disks whose quota is at least `min_quota` (and below the next class's) belong
/// to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosClass {
    /// Name, e.g. "gold".
    pub name: String,
    /// Share weight, 1..=[`MAX_WEIGHT`].
    pub weight: u32,
    /// Lowest quota in this class (bytes/s or IOPS, per the table's basis).
    pub min_quota: u64,
}

/// Why a class table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassTableError {
    /// No classes.
    #[error("class table is empty")]
    Empty,
    /// A weight of 0 or above [`MAX_WEIGHT`].
    #[error("class {name:?}: weight {weight} not in 1..={MAX_WEIGHT}")]
    Weight {
        /// Class name.
        name: String,
        /// The weight given.
        weight: u32,
    },
    /// Two classes start at the same quota.
    #[error("classes {a:?} and {b:?} have the same min_quota {min_quota}")]
    DuplicateMin {
        /// One class.
        a: String,
        /// The other.
        b: String,
        /// The shared value.
        min_quota: u64,
    },
    /// Two classes with one name.
    #[error("duplicate class name {0:?}")]
    DuplicateName(String),
}

/// The serialised form of a [`ClassTable`] (validated on conversion).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassTableConfig {
    /// Which quota decides the class.
    pub basis: QuotaBasis,
    /// The classes, in any order.
    pub classes: Vec<QosClass>,
}

/// A validated class table, classes sorted by `min_quota`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ClassTableConfig", into = "ClassTableConfig")]
pub struct ClassTable {
    basis: QuotaBasis,
    classes: Vec<QosClass>,
}

impl TryFrom<ClassTableConfig> for ClassTable {
    type Error = ClassTableError;
    fn try_from(c: ClassTableConfig) -> Result<Self, Self::Error> {
        ClassTable::new(c.basis, c.classes)
    }
}

impl From<ClassTable> for ClassTableConfig {
    fn from(t: ClassTable) -> Self {
        ClassTableConfig {
            basis: t.basis,
            classes: t.classes,
        }
    }
}

impl ClassTable {
    /// Validates and sorts `classes`.
    pub fn new(basis: QuotaBasis, mut classes: Vec<QosClass>) -> Result<Self, ClassTableError> {
        if classes.is_empty() {
            return Err(ClassTableError::Empty);
        }
        if let Some(c) = classes
            .iter()
            .find(|c| c.weight == 0 || c.weight > MAX_WEIGHT)
        {
            return Err(ClassTableError::Weight {
                name: c.name.clone(),
                weight: c.weight,
            });
        }
        classes.sort_by_key(|c| c.min_quota);
        if let Some(w) = classes
            .windows(2)
            .find(|w| w[0].min_quota == w[1].min_quota)
        {
            return Err(ClassTableError::DuplicateMin {
                a: w[0].name.clone(),
                b: w[1].name.clone(),
                min_quota: w[0].min_quota,
            });
        }
        let mut names: Vec<&str> = classes.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ClassTableError::DuplicateName(w[0].to_owned()));
        }
        Ok(ClassTable { basis, classes })
    }

    /// The usual three tiers by bandwidth: bronze (weight 1) below 100 MiB/s, silver (2) below
    /// 400 MiB/s, gold (4) from 400 MiB/s and for unlimited disks.
    pub fn gold_silver_bronze() -> Self {
        let mib = super::limits::MIB;
        let class = |name: &str, weight, min_quota| QosClass {
            name: name.into(),
            weight,
            min_quota,
        };
        ClassTable {
            basis: QuotaBasis::BytesPerSec,
            classes: vec![
                class("bronze", 1, 0),
                class("silver", 2, 100 * mib),
                class("gold", 4, 400 * mib),
            ],
        }
    }

    /// The basis.
    pub fn basis(&self) -> QuotaBasis {
        self.basis
    }

    /// The classes, lowest quota first.
    pub fn classes(&self) -> &[QosClass] {
        &self.classes
    }

    /// The class of a disk with these limits: the one with the greatest `min_quota` not above
    /// its quota; an unlimited quota gets the top class, one below every `min_quota` the lowest.
    pub fn classify(&self, limits: &DiskLimits) -> &QosClass {
        let quota = match self.basis {
            QuotaBasis::BytesPerSec => limits.quota_bytes_per_sec(),
            QuotaBasis::IosPerSec => limits.quota_ios_per_sec(),
        }
        .unwrap_or(u64::MAX);
        let i = self.classes.partition_point(|c| c.min_quota <= quota);
        &self.classes[i.saturating_sub(1)]
    }
}

#[cfg(test)]
mod tests {
    use super::super::limits::{Limit, MIB};
    use super::*;

    fn bw(mib: u64) -> DiskLimits {
        DiskLimits {
            rw_bytes: Limit::rate(mib * MIB),
            ..DiskLimits::UNLIMITED
        }
    }

    #[test]
    fn classify_by_bandwidth_ranges() {
        let t = ClassTable::gold_silver_bronze();
        assert_eq!(t.classify(&bw(50)).name, "bronze");
        assert_eq!(t.classify(&bw(100)).name, "silver");
        assert_eq!(t.classify(&bw(399)).name, "silver");
        assert_eq!(t.classify(&bw(400)).name, "gold");
        assert_eq!(t.classify(&DiskLimits::UNLIMITED).name, "gold");
    }

    #[test]
    fn classify_by_iops_below_first_threshold_is_lowest() {
        let c = |n: &str, w, m| QosClass {
            name: n.into(),
            weight: w,
            min_quota: m,
        };
        let t = ClassTable::new(
            QuotaBasis::IosPerSec,
            vec![c("hi", 8, 10_000), c("lo", 1, 1000)],
        )
        .unwrap();
        let l = DiskLimits {
            rw_ios: Limit::rate(5),
            ..DiskLimits::UNLIMITED
        };
        assert_eq!(t.classify(&l).name, "lo");
        let l = DiskLimits {
            rw_ios: Limit::rate(10_000),
            ..DiskLimits::UNLIMITED
        };
        assert_eq!(t.classify(&l).name, "hi");
    }

    #[test]
    fn invalid_tables_are_refused() {
        let c = |n: &str, w, m| QosClass {
            name: n.into(),
            weight: w,
            min_quota: m,
        };
        assert_eq!(
            ClassTable::new(QuotaBasis::IosPerSec, vec![]),
            Err(ClassTableError::Empty)
        );
        assert!(matches!(
            ClassTable::new(QuotaBasis::IosPerSec, vec![c("a", 0, 0)]),
            Err(ClassTableError::Weight { .. })
        ));
        assert!(matches!(
            ClassTable::new(QuotaBasis::IosPerSec, vec![c("a", 1, 5), c("b", 1, 5)]),
            Err(ClassTableError::DuplicateMin { .. })
        ));
        assert!(matches!(
            ClassTable::new(QuotaBasis::IosPerSec, vec![c("a", 1, 5), c("a", 1, 6)]),
            Err(ClassTableError::DuplicateName(_))
        ));
    }

    #[test]
    fn serde_round_trip_validates() {
        let t = ClassTable::gold_silver_bronze();
        let s = serde_json::to_string(&t).unwrap();
        let back: ClassTable = serde_json::from_str(&s).unwrap();
        assert_eq!(back, t);
        let bad = r#"{"basis":"ios_per_sec","classes":[{"name":"x","weight":0,"min_quota":0}]}"#;
        assert!(serde_json::from_str::<ClassTable>(bad).is_err());
    }
}
