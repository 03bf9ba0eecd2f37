//! The golden frames of tests/golden/mod.rs with 20 000 more table entries (none for these
//! frames' addresses): the table no longer fits in cache, so the net lcore receives two bursts
//! per poll and starts each one's lookups before processing it. Same outputs and counters.
//! EAL starts once per process: one `#[test]` here.

mod common;
mod golden;

#[test]
fn macnat_golden_with_a_table_beyond_the_cache() {
    golden::golden("golden-big", 20_000);
}
