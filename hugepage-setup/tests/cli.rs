//! Drive the hugepage-setup binary against fake /sys + /proc trees (`--root`).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::{Command, Output};

use tempfile::TempDir;

const KB_2M: u64 = 2048;
const KB_1G: u64 = 1 << 20;

/// A fake root with 2M (default) and 1G pools, globally and on nodes 0 and 1, all empty, and
/// a /proc/mounts without hugetlbfs.
struct FakeTree {
    dir: TempDir,
}

impl FakeTree {
    fn new() -> Self {
        let tree = FakeTree {
            dir: TempDir::new().unwrap(),
        };
        tree.write(
            "proc/meminfo",
            "MemTotal:       24000000 kB\nHugepagesize:       2048 kB\n",
        );
        tree.write(
            "proc/mounts",
            "sysfs /sys sysfs rw,nosuid 0 0\nproc /proc proc rw 0 0\n",
        );
        for kb in [KB_2M, KB_1G] {
            for node in [None, Some(0), Some(1)] {
                tree.set_pool(kb, node, 0, 0, 0);
            }
        }
        tree
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn pool_rel(kb: u64, node: Option<u32>) -> String {
        match node {
            None => format!("sys/kernel/mm/hugepages/hugepages-{kb}kB"),
            Some(n) => format!("sys/devices/system/node/node{n}/hugepages/hugepages-{kb}kB"),
        }
    }

    fn set_pool(&self, kb: u64, node: Option<u32>, total: u64, free: u64, surplus: u64) {
        let dir = Self::pool_rel(kb, node);
        self.write(&format!("{dir}/nr_hugepages"), &format!("{total}\n"));
        self.write(&format!("{dir}/free_hugepages"), &format!("{free}\n"));
        self.write(&format!("{dir}/surplus_hugepages"), &format!("{surplus}\n"));
    }

    fn nr(&self, kb: u64, node: Option<u32>) -> u64 {
        let path = self.path(&format!("{}/nr_hugepages", Self::pool_rel(kb, node)));
        fs::read_to_string(path).unwrap().trim().parse().unwrap()
    }

    /// Do what the kernel does after a write to nr_hugepages and a fake file does not: report
    /// the new pages as free.
    fn settle(&self, kb: u64, node: Option<u32>) {
        let dir = Self::pool_rel(kb, node);
        self.write(
            &format!("{dir}/free_hugepages"),
            &format!("{}\n", self.nr(kb, node)),
        );
    }

    fn hugetlbfs_lines(&self) -> Vec<String> {
        fs::read_to_string(self.path("proc/mounts"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("hugetlbfs"))
            .map(str::to_owned)
            .collect()
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_hugepage-setup"))
            .arg("--root")
            .arg(self.dir.path())
            .args(args)
            .env_remove("HUGEPAGE_SETUP_ROOT")
            .output()
            .unwrap()
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        stdout(out),
        stderr(out)
    );
}

/// Failed with `code` and a message, not a panic.
#[track_caller]
fn assert_fails(out: &Output, code: i32) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {err}",
        stdout(out)
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn status_reads_two_sizes_two_nodes_mounts_and_holders() {
    let t = FakeTree::new();
    t.set_pool(KB_2M, None, 512, 384, 2);
    t.set_pool(KB_2M, Some(0), 256, 128, 2);
    t.set_pool(KB_2M, Some(1), 256, 256, 0);
    t.set_pool(KB_1G, None, 4, 4, 0);
    t.set_pool(KB_1G, Some(1), 4, 4, 0);
    t.write(
        "proc/mounts",
        "proc /proc proc rw 0 0\n\
         hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n\
         nodev /mnt/huge\\0401G hugetlbfs rw,relatime,pagesize=1024M 0 0\n",
    );
    // pid 100: two hugepage files mapped (one unlinked), one of them also open, plus a 1G file
    // open only; libc mapped too.
    t.write(
        "proc/100/maps",
        "7f0000000000-7f0000200000 rw-s 00000000 00:2f 11   /dev/hugepages/rtemap_0 (deleted)\n\
         7f0000200000-7f0000400000 rw-s 00000000 00:2f 12   /dev/hugepages/rtemap_1\n\
         7f1000000000-7f1000100000 r-xp 00000000 08:01 13   /usr/lib/libc.so.6\n",
    );
    t.write("proc/100/comm", "dpdk-testpmd\n");
    fs::create_dir_all(t.path("proc/100/fd")).unwrap();
    symlink("/dev/hugepages/rtemap_1", t.path("proc/100/fd/5")).unwrap();
    symlink("/mnt/huge 1G/map_0 (deleted)", t.path("proc/100/fd/6")).unwrap();
    symlink("/dev/null", t.path("proc/100/fd/0")).unwrap();
    // pid 200 holds nothing; pid 300 vanished mid-scan (no comm); pid 400 has unreadable maps
    // (a directory) but an open fd; "self" and "sys" are not pids.
    t.write(
        "proc/200/maps",
        "7f00-7f01 r-xp 00000000 08:01 13   /usr/bin/sleep\n",
    );
    t.write("proc/200/comm", "sleep\n");
    t.write(
        "proc/300/maps",
        "7f00-7f01 rw-s 00000000 00:2f 11   /dev/hugepages/x\n",
    );
    fs::create_dir_all(t.path("proc/400/maps")).unwrap();
    t.write("proc/400/comm", "hostplane\n");
    fs::create_dir_all(t.path("proc/400/fd")).unwrap();
    symlink("/dev/hugepages/hp_0", t.path("proc/400/fd/9")).unwrap();
    fs::create_dir_all(t.path("proc/self")).unwrap();

    let out = t.run(&["status", "--json"]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["default_page_size"], "2M");
    let sizes = v["sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 2);
    assert_eq!(sizes[0]["page_size"], "2M");
    assert_eq!(sizes[0]["global"]["total"], 512);
    assert_eq!(sizes[0]["global"]["free"], 384);
    assert_eq!(sizes[0]["global"]["in_use"], 128);
    assert_eq!(sizes[0]["global"]["surplus"], 2);
    assert_eq!(sizes[0]["nodes"][0]["node"], 0);
    assert_eq!(sizes[0]["nodes"][0]["in_use"], 128);
    assert_eq!(sizes[0]["nodes"][1]["node"], 1);
    assert_eq!(sizes[0]["nodes"][1]["in_use"], 0);
    assert_eq!(sizes[1]["page_size"], "1G");
    assert_eq!(sizes[1]["page_size_kb"], KB_1G);
    assert_eq!(sizes[1]["nodes"][1]["total"], 4);
    let mounts = v["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 2);
    assert_eq!(mounts[0]["path"], "/dev/hugepages");
    assert_eq!(mounts[0]["page_size"], "2M");
    assert_eq!(mounts[1]["path"], "/mnt/huge 1G");
    assert_eq!(mounts[1]["page_size"], "1G");
    let holders = v["holders"].as_array().unwrap();
    assert_eq!(holders.len(), 2, "{holders:?}");
    assert_eq!(holders[0]["pid"], 100);
    assert_eq!(holders[0]["comm"], "dpdk-testpmd");
    assert_eq!(holders[0]["files"], 3);
    assert_eq!(holders[1]["pid"], 400);
    assert_eq!(holders[1]["files"], 1);

    let out = t.run(&["status"]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("default hugepage size: 2M"), "{text}");
    assert!(text.contains("/mnt/huge 1G (pagesize 1G)"), "{text}");
    assert!(text.contains("pid 100 (dpdk-testpmd): 3 file(s)"), "{text}");
}

#[test]
fn status_of_an_empty_tree_succeeds() {
    let dir = TempDir::new().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hugepage-setup"))
        .args(["status"])
        .env("HUGEPAGE_SETUP_ROOT", dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(stdout(&out).contains("no hugepage pools"));
}

#[test]
fn status_on_the_real_machine_succeeds() {
    let out = Command::new(env!("CARGO_BIN_EXE_hugepage-setup"))
        .arg("status")
        .env_remove("HUGEPAGE_SETUP_ROOT")
        .output()
        .unwrap();
    assert_ok(&out);
}

#[test]
fn config_sets_pool_and_mounts_once() {
    let t = FakeTree::new();
    let out = t.run(&["config", "--size", "2M", "--pages", "64"]);
    assert_ok(&out);
    assert_eq!(t.nr(KB_2M, None), 64);
    assert_eq!(t.nr(KB_2M, Some(0)), 0, "global config leaves nodes alone");
    assert_eq!(
        t.hugetlbfs_lines(),
        ["hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0"]
    );
    assert!(stdout(&out).contains("0 -> 64"), "{}", stdout(&out));

    let out = t.run(&["config", "--pages", "128"]);
    assert_ok(&out);
    assert_eq!(t.nr(KB_2M, None), 128);
    assert_eq!(t.hugetlbfs_lines().len(), 1, "mounted twice");
    assert!(stdout(&out).contains("already mounted at /dev/hugepages"));
}

#[test]
fn config_non_default_size_mounts_with_pagesize() {
    let t = FakeTree::new();
    assert_ok(&t.run(&["config", "--size", "1G", "--pages", "2"]));
    assert_eq!(t.nr(KB_1G, None), 2);
    assert_eq!(
        t.hugetlbfs_lines(),
        ["hugetlbfs /dev/hugepages-1G hugetlbfs rw,relatime,pagesize=1G 0 0"]
    );
    // 2M goes to its own mount; --mount picks the directory.
    assert_ok(&t.run(&["config", "--pages", "8", "--mount", "/mnt/huge 2M/"]));
    assert_eq!(t.hugetlbfs_lines().len(), 2);
    assert!(t.hugetlbfs_lines()[1].starts_with("hugetlbfs /mnt/huge\\0402M hugetlbfs"));
}

#[test]
fn config_no_mount_and_taken_mount_point() {
    let t = FakeTree::new();
    assert_ok(&t.run(&["config", "--pages", "4", "--no-mount"]));
    assert!(t.hugetlbfs_lines().is_empty());
    let err = assert_fails(&t.run(&["config", "--pages", "4", "--mount", "/proc"]), 1);
    assert!(
        err.contains("/proc") && err.contains("already mounted"),
        "{err}"
    );
    let err = assert_fails(
        &t.run(&["config", "--pages", "4", "--mount", "relative"]),
        1,
    );
    assert!(err.contains("absolute"), "{err}");
}

#[test]
fn config_memory_converts_rounding_up() {
    let t = FakeTree::new();
    assert_ok(&t.run(&["config", "--memory", "2G"]));
    assert_eq!(t.nr(KB_2M, None), 1024);
    t.settle(KB_2M, None);
    assert_ok(&t.run(&["config", "--memory", "5M", "--no-mount"]));
    assert_eq!(t.nr(KB_2M, None), 3);
    assert_ok(&t.run(&["config", "--size", "1G", "--memory", "1536M"]));
    assert_eq!(t.nr(KB_1G, None), 2);
}

#[test]
fn config_refuses_to_shrink_below_in_use() {
    let t = FakeTree::new();
    t.set_pool(KB_2M, None, 64, 24, 0);
    let err = assert_fails(&t.run(&["config", "--pages", "10"]), 1);
    assert!(
        err.contains("to 10: 40 of 64 pages are in use (24 free)"),
        "{err}"
    );
    assert_eq!(t.nr(KB_2M, None), 64, "file must be unchanged");
    assert!(t.hugetlbfs_lines().is_empty(), "nothing mounted on refusal");
    assert_ok(&t.run(&["config", "--pages", "40"]));
    assert_eq!(t.nr(KB_2M, None), 40);
}

#[test]
fn config_per_node() {
    let t = FakeTree::new();
    assert_ok(&t.run(&["config", "--node", "1", "--pages", "32"]));
    assert_eq!(t.nr(KB_2M, Some(1)), 32);
    assert_eq!(t.nr(KB_2M, Some(0)), 0);
    assert_eq!(t.nr(KB_2M, None), 0);
    t.set_pool(KB_2M, Some(0), 16, 0, 0);
    let err = assert_fails(&t.run(&["config", "--node", "0", "--pages", "8"]), 1);
    assert!(err.contains("on NUMA node 0 to 8: 16 of 16"), "{err}");
    let err = assert_fails(&t.run(&["config", "--node", "7", "--pages", "8"]), 1);
    assert!(err.contains("NUMA node 7 does not exist"), "{err}");
    let err = assert_fails(&t.run(&["reset", "--node", "7"]), 1);
    assert!(err.contains("NUMA node 7 does not exist"), "{err}");
}

#[test]
fn reset_releases_refuses_in_use_and_unmounts() {
    let t = FakeTree::new();
    assert_ok(&t.run(&["config", "--pages", "64"]));
    assert_ok(&t.run(&["config", "--size", "1G", "--pages", "2"]));
    assert_eq!(t.hugetlbfs_lines().len(), 2);
    t.settle(KB_2M, None);

    t.set_pool(KB_1G, None, 2, 1, 0);
    let err = assert_fails(&t.run(&["reset"]), 1);
    assert!(
        err.contains("1G hugepages system-wide to 0: 1 of 2"),
        "{err}"
    );
    assert_eq!(
        t.nr(KB_2M, None),
        64,
        "nothing changes when any size is in use"
    );

    assert_ok(&t.run(&["reset", "--size", "2M", "--unmount"]));
    assert_eq!(t.nr(KB_2M, None), 0);
    assert_eq!(t.nr(KB_1G, None), 2);
    assert_eq!(
        t.hugetlbfs_lines(),
        ["hugetlbfs /dev/hugepages-1G hugetlbfs rw,relatime,pagesize=1G 0 0"]
    );

    t.set_pool(KB_1G, None, 2, 2, 0);
    assert_ok(&t.run(&["reset"]));
    assert_eq!(t.nr(KB_1G, None), 0);
    assert_eq!(t.hugetlbfs_lines().len(), 1, "no --unmount: mount stays");
}

#[test]
fn reset_per_node_keeps_mount_while_pages_remain() {
    let t = FakeTree::new();
    assert_ok(&t.run(&["config", "--node", "1", "--pages", "8"]));
    t.settle(KB_2M, Some(1));
    t.set_pool(KB_2M, None, 8, 8, 0);
    let out = t.run(&["reset", "--size", "2M", "--node", "1", "--unmount"]);
    assert_ok(&out);
    assert_eq!(t.nr(KB_2M, Some(1)), 0);
    assert!(
        stdout(&out).contains("8 pages still reserved"),
        "{}",
        stdout(&out)
    );
    assert_eq!(t.hugetlbfs_lines().len(), 1);
}

#[test]
fn bad_input_is_a_clear_error() {
    let t = FakeTree::new();
    let err = assert_fails(&t.run(&["config", "--size", "3M", "--pages", "1"]), 2);
    assert!(err.contains("invalid hugepage size \"3M\""), "{err}");
    let err = assert_fails(&t.run(&["config", "--pages", "1", "--memory", "2G"]), 2);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = assert_fails(&t.run(&["config"]), 2);
    assert!(err.contains("--pages") && err.contains("--memory"), "{err}");
    let err = assert_fails(&t.run(&["config", "--memory", "lots"]), 2);
    assert!(err.contains("invalid memory size \"lots\""), "{err}");
    let err = assert_fails(&t.run(&["config", "--pages", "-1"]), 2);
    assert!(err.contains("-1"), "{err}");

    fs::remove_dir_all(t.path(&FakeTree::pool_rel(KB_1G, None))).unwrap();
    let err = assert_fails(&t.run(&["config", "--size", "1G", "--pages", "1"]), 1);
    assert!(
        err.contains("hugepage size 1G is not supported") && err.contains("supported: 2M"),
        "{err}"
    );
    let err = assert_fails(&t.run(&["reset", "--size", "1G"]), 1);
    assert!(err.contains("not supported"), "{err}");

    t.write(
        &format!("{}/nr_hugepages", FakeTree::pool_rel(KB_2M, None)),
        "junk\n",
    );
    let err = assert_fails(&t.run(&["config", "--pages", "1"]), 1);
    assert!(err.contains("\"junk\" is not a number"), "{err}");
}

#[test]
fn config_without_size_needs_a_default() {
    let t = FakeTree::new();
    t.write("proc/meminfo", "MemTotal: 1 kB\n");
    let err = assert_fails(&t.run(&["config", "--pages", "1"]), 1);
    assert!(
        err.contains("no default hugepage size") && err.contains("--size"),
        "{err}"
    );
}
