"""scripts/deploy into temporary roots, and `systemd-analyze verify` on the units."""

import os
import shutil
import stat
import subprocess
import tempfile
import unittest

from fakesys import DEPLOY, REPO, FakeHost, tree_digest, tree_listing

UNITS = os.path.join(REPO, "scripts", "systemd")
REAL_HUGEPAGES_UNIT = os.path.join(REPO, "hugepage-setup", "hostplane-hugepages.service")

CONFIG = """\
# test config: the lcore keys are what deploy turns into CPUAffinity=
[eal]
lcores = "2-4,6"
main_lcore = 1

[net]
ports = ["0000:03:00.0"]
"""

STUB_HUGEPAGES_UNIT = """\
[Unit]
Description=stub hugepage setup for tests
[Service]
Type=oneshot
RemainAfterExit=yes
Environment=HOSTPLANE_HUGEPAGES=1024
EnvironmentFile=-/etc/default/hostplane-hugepages
ExecStart=/usr/local/bin/hugepage-setup config --size 2M --pages ${HOSTPLANE_HUGEPAGES}
ExecStop=/usr/local/bin/hugepage-setup reset --size 2M
[Install]
WantedBy=multi-user.target
"""

INSTALLED = [
    "etc/default/hostplane-hugepages",
    "etc/hostplane/devbind.conf",
    "etc/hostplane/hostplane.toml",
    "etc/systemd/system/hostplane-devbind.service",
    "etc/systemd/system/hostplane-hugepages.service",
    "etc/systemd/system/hostplane.service",
    "etc/systemd/system/hostplane.service.d/cpuaffinity.conf",
    "usr/local/bin/devbind",
    "usr/local/bin/hostplane",
    "usr/local/bin/hugepage-setup",
    "var/lib/hostplane/deploy.manifest",
]


def stub(path, text="#!/bin/sh\necho \"$0 $*\"\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)


class DeployCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="deploy-test-")
        self.root = os.path.join(self.tmp, "root")
        os.makedirs(os.path.join(self.root, "etc"))
        with open(os.path.join(self.root, "etc", "hostname"), "w") as f:
            f.write("testhost\n")
        self.bin = os.path.join(self.tmp, "bin")
        stub(os.path.join(self.bin, "hostplane"))
        stub(os.path.join(self.bin, "hugepage-setup"))
        self.config = os.path.join(self.tmp, "hostplane.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG)
        self.hp_unit = os.path.join(self.tmp, "hostplane-hugepages.service")
        with open(self.hp_unit, "w") as f:
            f.write(STUB_HUGEPAGES_UNIT)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def deploy(self, *extra, root=None, full=True):
        args = [DEPLOY, "--root", root or self.root]
        if full:
            args += ["--binary", os.path.join(self.bin, "hostplane"),
                     "--hugepage-setup", os.path.join(self.bin, "hugepage-setup"),
                     "--hugepages-unit", self.hp_unit,
                     "--config", self.config, "--hugepages", "8",
                     "--bind", "03:00.0,0000:03:00.1:vfio-pci"]
        return subprocess.run(args + list(extra), capture_output=True, text=True, timeout=120)

    def installed(self):
        """Installed files, ignoring the docs (present only once docs/ has them)."""
        return [p for p in tree_listing(self.root)
                if os.path.isfile(os.path.join(self.root, p)) and not p.startswith("usr/local/share/doc")
                and p != "etc/hostname"]

    def read(self, rel):
        with open(os.path.join(self.root, rel)) as f:
            return f.read()


class Deploy(DeployCase):
    def test_dry_run_writes_nothing(self):
        before = tree_digest(self.root)
        r = self.deploy("--dry-run")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("would install /usr/local/bin/hostplane", r.stdout)
        self.assertEqual(tree_digest(self.root), before)

    def test_install_produces_the_expected_tree(self):
        r = self.deploy()
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(self.installed(), INSTALLED)
        mode = lambda rel: stat.S_IMODE(os.stat(os.path.join(self.root, rel)).st_mode)  # noqa: E731
        self.assertEqual(mode("usr/local/bin/hostplane"), 0o755)
        self.assertEqual(mode("usr/local/bin/devbind"), 0o755)
        self.assertEqual(mode("etc/systemd/system/hostplane.service"), 0o644)
        self.assertEqual(self.read("etc/hostplane/hostplane.toml"), CONFIG)
        self.assertIn("CPUAffinity=1-4,6\n", self.read("etc/systemd/system/hostplane.service.d/cpuaffinity.conf"))
        self.assertIn("HOSTPLANE_HUGEPAGES=8\n", self.read("etc/default/hostplane-hugepages"))
        self.assertIn("03:00.0,0000:03:00.1 vfio-pci\n", self.read("etc/hostplane/devbind.conf"))
        with open(os.path.join(UNITS, "hostplane.service")) as f:
            self.assertEqual(self.read("etc/systemd/system/hostplane.service"), f.read())
        manifest = self.read("var/lib/hostplane/deploy.manifest")
        self.assertIn("file /usr/local/bin/hostplane\n", manifest)
        self.assertIn("dir /var/lib/hostplane\n", manifest)
        self.assertNotIn("dir /etc\n", manifest)  # it was there before
        # Not the running system: nothing activated, and it says so.
        self.assertIn("skipped systemctl", r.stdout)
        self.assertIn("skipped hugepage setup", r.stdout)

    def test_second_run_is_unchanged(self):
        self.assertEqual(self.deploy().returncode, 0)
        before = tree_digest(self.root)
        r = self.deploy()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("unchanged:", r.stdout)
        self.assertNotIn("installed ", r.stdout)
        self.assertEqual(tree_digest(self.root), before)

    def test_changed_binary_is_updated(self):
        self.assertEqual(self.deploy().returncode, 0)
        stub(os.path.join(self.bin, "hostplane"), "#!/bin/sh\necho v2\n")
        r = self.deploy()
        self.assertIn("updated  /usr/local/bin/hostplane", r.stdout)
        self.assertIn("1 changed", r.stdout)

    def test_uninstall_restores_the_tree(self):
        before_list = tree_listing(self.root)
        before = tree_digest(self.root)
        self.assertEqual(self.deploy().returncode, 0)
        self.assertEqual(self.deploy().returncode, 0)
        r = self.deploy("--uninstall", full=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(tree_listing(self.root), before_list)
        self.assertEqual(tree_digest(self.root), before)

    def test_uninstall_dry_run_removes_nothing(self):
        self.assertEqual(self.deploy().returncode, 0)
        before = tree_digest(self.root)
        r = self.deploy("--uninstall", "--dry-run", full=False)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("would remove /usr/local/bin/hostplane", r.stdout)
        self.assertEqual(tree_digest(self.root), before)

    def test_uninstall_restores_an_existing_config(self):
        os.makedirs(os.path.join(self.root, "etc", "hostplane"))
        with open(os.path.join(self.root, "etc", "hostplane", "hostplane.toml"), "w") as f:
            f.write("# the operator's own config\n")
        before = tree_digest(self.root)
        self.assertEqual(self.deploy().returncode, 0)
        self.assertEqual(self.read("etc/hostplane/hostplane.toml"), CONFIG)
        self.assertEqual(self.deploy("--uninstall", full=False).returncode, 0)
        self.assertEqual(tree_digest(self.root), before)

    def test_uninstall_without_install(self):
        r = self.deploy("--uninstall", full=False)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("nothing to uninstall", r.stdout)

    def test_bad_arguments(self):
        for extra in (["--bind", "nonsense"], ["--bind", "3:0.0:vfio-pci"], ["--hugepages", "many"],
                      ["--frobnicate"]):
            r = self.deploy(*extra)
            self.assertEqual(r.returncode, 2, (extra, r.stdout, r.stderr))
            self.assertEqual(self.installed(), [])

    def test_missing_binary(self):
        r = self.deploy("--binary", os.path.join(self.tmp, "nope"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("cargo build --release", r.stderr)
        self.assertEqual(self.installed(), [])

    def test_binds_and_resets_through_a_fake_sysfs(self):
        """With a fake sysfs under --root, deploy passes --root down to devbind."""
        h = FakeHost(self.root)
        h.driver("vfio-pci")
        for bdf, ifname in (("0000:03:00.0", "eth1"), ("0000:03:00.1", "eth2")):
            h.pci(bdf, driver="ixgbe", iommu_group="7")
            h.netif(bdf, ifname, up=False)
        before = tree_digest(self.root)
        r = self.deploy()
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(h.current_driver("0000:03:00.0"), "vfio-pci")
        self.assertEqual(h.current_driver("0000:03:00.1"), "vfio-pci")
        r = self.deploy("--uninstall", full=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(h.current_driver("0000:03:00.0"), "ixgbe")
        # The fake tree's own record of writes and override files differ; the rest is as before.
        os.unlink(h.p("devbind-writes.log"))
        for bdf in ("0000:03:00.0", "0000:03:00.1"):
            h.put(h.dev(bdf) + "/driver_override", "(null)\n")
        for f in ("bind", "unbind"):
            h.put("sys/bus/pci/drivers/vfio-pci/" + f, "")
            h.put("sys/bus/pci/drivers/ixgbe/" + f, "")
        self.assertEqual(tree_digest(self.root), before)

    def test_runs_hugepage_setup_on_a_fake_sysfs(self):
        """With a hugepage sysfs under --root, the unit's commands run with HUGEPAGE_SETUP_ROOT."""
        log = os.path.join(self.tmp, "hugepage-setup.log")
        stub(os.path.join(self.bin, "hugepage-setup"),
             '#!/bin/sh\necho "$HUGEPAGE_SETUP_ROOT $*" >> %s\n' % log)
        os.makedirs(os.path.join(self.root, "sys/kernel/mm/hugepages/hugepages-2048kB"))
        r = self.deploy()
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        r = self.deploy("--uninstall", full=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        with open(log) as f:
            self.assertEqual(f.read().splitlines(), [
                "%s config --size 2M --pages 8" % self.root,
                "%s reset --size 2M" % self.root,
            ])

    def test_no_start_skips_binding(self):
        h = FakeHost(self.root)
        h.driver("vfio-pci")
        h.pci("0000:03:00.0", driver="ixgbe", iommu_group="7")
        h.pci("0000:03:00.1", driver="ixgbe", iommu_group="7")
        r = self.deploy("--no-start")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("--no-start", r.stdout)
        self.assertEqual(h.current_driver("0000:03:00.0"), "ixgbe")


@unittest.skipUnless(shutil.which("systemd-analyze"), "systemd-analyze is not installed (apt-get install systemd)")
class SystemdUnits(unittest.TestCase):
    def test_units_verify(self):
        """`systemd-analyze verify --root` on an installed tree with stub binaries at the ExecStart paths."""
        with tempfile.TemporaryDirectory(prefix="unit-verify-") as tmp:
            root = os.path.join(tmp, "root")
            # verify needs the stock units (sysinit.target, ...) under the root as well.
            shutil.copytree("/usr/lib/systemd/system", os.path.join(root, "usr/lib/systemd/system"), symlinks=True)
            bins = os.path.join(tmp, "bin")
            stub(os.path.join(bins, "hostplane"))
            stub(os.path.join(bins, "hugepage-setup"))
            hp_unit = REAL_HUGEPAGES_UNIT
            if not os.path.exists(hp_unit):
                hp_unit = os.path.join(tmp, "hostplane-hugepages.service")
                with open(hp_unit, "w") as f:
                    f.write(STUB_HUGEPAGES_UNIT)
            config = os.path.join(tmp, "hostplane.toml")
            with open(config, "w") as f:
                f.write(CONFIG)
            r = subprocess.run([DEPLOY, "--root", root, "--no-start", "--config", config,
                                "--binary", os.path.join(bins, "hostplane"),
                                "--hugepage-setup", os.path.join(bins, "hugepage-setup"),
                                "--hugepages-unit", hp_unit, "--hugepages", "4",
                                "--bind", "03:00.0:vfio-pci"], capture_output=True, text=True, timeout=120)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            units = ["/etc/systemd/system/" + u for u in
                     ("hostplane.service", "hostplane-devbind.service", "hostplane-hugepages.service")]
            v = subprocess.run(["systemd-analyze", "verify", "--man=no", "--root=" + root] + units,
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(v.returncode, 0, v.stdout + v.stderr)
            self.assertEqual(v.stderr.strip(), "", v.stderr)


if __name__ == "__main__":
    unittest.main()
