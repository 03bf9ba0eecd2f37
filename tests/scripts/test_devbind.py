"""scripts/devbind against fake sysfs/procfs trees (and `status` on the real machine)."""

import json
import os
import subprocess
import unittest

from fakesys import DEVBIND, PYTHON, FakeHost, tree_digest

NIC = "0000:03:00.0"
NIC2 = "0000:03:00.1"
NVME = "0000:05:00.0"


def run(args, root=None, env=None):
    cmd = [PYTHON, DEVBIND] + (["--root", root] if root else []) + list(args)
    e = dict(os.environ)
    e.pop("DEVBIND_ROOT", None)
    e.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=60)


class DevbindCase(unittest.TestCase):
    def setUp(self):
        self.h = FakeHost()
        self.h.driver("vfio-pci")
        self.h.driver("uio_pci_generic")

    def tearDown(self):
        self.h.cleanup()

    def devbind(self, *args, **kw):
        return run(args, root=self.h.root, **kw)

    def assertClean(self, r):
        """No traceback, whatever happened."""
        self.assertNotIn("Traceback", r.stderr + r.stdout)

    def assertRefused(self, r):
        self.assertClean(r)
        self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
        self.assertIn("refusing", r.stderr)

    def nic(self, bdf=NIC, ifname="eth1", up=True, group="7"):
        self.h.pci(bdf, driver="ixgbe", iommu_group=group)
        self.h.netif(bdf, ifname, up=up)


class NicRefusal(DevbindCase):
    def test_up_interface_with_address_is_refused_and_nothing_written(self):
        self.nic()
        self.h.ipv4("eth1", "10.1.0.2/24")
        before = tree_digest(self.h.root)
        r = self.devbind("bind", "--driver", "vfio-pci", NIC)
        self.assertRefused(r)
        self.assertIn("eth1 is up", r.stderr)
        self.assertIn("10.1.0.2/24", r.stderr)
        self.assertEqual(tree_digest(self.h.root), before)
        self.assertEqual(self.h.current_driver(NIC), "ixgbe")

    def test_ipv6_global_address_is_refused(self):
        self.nic()
        self.h.ipv6("eth1", "2001:db8::5/64")
        r = self.devbind("bind", "--driver", "vfio-pci", NIC)
        self.assertRefused(r)
        self.assertIn("2001:db8::5/64", r.stderr)

    def test_link_local_only_interface_is_free(self):
        self.nic()
        self.h.ipv6("eth1", "fe80::1/64", scope=0x20)
        self.h.route6("eth1", "fe80::/64")
        r = self.devbind("bind", "--driver", "vfio-pci", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_down_interface_with_address_but_no_route_is_free(self):
        self.nic(up=False)
        self.h.ipv4("eth1", "10.1.0.2/24")
        r = self.devbind("bind", "--driver", "vfio-pci", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_routes_are_refused(self):
        self.nic()
        self.h.route4("eth1", "10.9.0.0/16")
        r = self.devbind("bind", "--driver", "vfio-pci", NIC)
        self.assertRefused(r)
        self.assertIn("routes 10.9.0.0/16", r.stderr)

    def test_force_takes_a_nic_in_use(self):
        self.nic()
        self.h.ipv4("eth1", "10.1.0.2/24")
        self.h.route4("eth1", "10.1.0.0/24")
        r = self.devbind("bind", "--force", "--driver", "vfio-pci", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("--force", r.stderr)
        self.assertEqual(self.h.current_driver(NIC), "vfio-pci")

    def test_default_route_is_refused_even_with_force(self):
        self.nic()
        self.h.ipv4("eth1", "10.1.0.2/24")
        self.h.route4("eth1", "0.0.0.0/0", gateway="10.1.0.1")
        before = tree_digest(self.h.root)
        r = self.devbind("bind", "--force", "--driver", "vfio-pci", NIC)
        self.assertRefused(r)
        self.assertIn("default route", r.stderr)
        self.assertIn("even with --force", r.stderr)
        self.assertEqual(tree_digest(self.h.root), before)

    def test_ipv6_default_route_is_refused_even_with_force(self):
        self.nic()
        self.h.route6("eth1", "::/0", gateway="fd00::1", flags=0x0003)
        r = self.devbind("bind", "--force", "--driver", "vfio-pci", NIC)
        self.assertRefused(r)
        self.assertIn("::/0", r.stderr)

    def test_one_refused_device_stops_the_whole_command(self):
        self.nic()
        self.nic(bdf=NIC2, ifname="eth2")
        self.h.ipv4("eth2", "10.2.0.2/24")
        r = self.devbind("bind", "--driver", "vfio-pci", NIC, NIC2)
        self.assertRefused(r)
        self.assertEqual(self.h.writes(), [])

    def test_bridge_member_is_refused(self):
        self.nic()
        os.makedirs(self.h.p("sys/class/net/br0"), exist_ok=True)
        self.h.link(self.h.dev(NIC) + "/net/eth1/master", "sys/class/net/br0")
        r = self.devbind("bind", "--driver", "vfio-pci", NIC)
        self.assertRefused(r)
        self.assertIn("enslaved to br0", r.stderr)


class NicBind(DevbindCase):
    def test_free_nic_binds_with_writes_in_order(self):
        self.nic()
        r = self.devbind("bind", "--driver", "vfio-pci", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertClean(r)
        self.assertEqual(self.h.writes(), [
            ("/sys/bus/pci/devices/%s/driver_override" % NIC, "vfio-pci"),
            ("/sys/bus/pci/drivers/ixgbe/unbind", NIC),
            ("/sys/bus/pci/drivers/vfio-pci/bind", NIC),
        ])
        self.assertEqual(self.h.read(self.h.dev(NIC) + "/driver_override"), "vfio-pci")
        self.assertEqual(self.h.read("sys/bus/pci/drivers/ixgbe/unbind"), NIC)
        self.assertEqual(self.h.read("sys/bus/pci/drivers/vfio-pci/bind"), NIC)
        self.assertEqual(self.h.current_driver(NIC), "vfio-pci")
        state = self.h.state()
        self.assertEqual(state["devices"][NIC]["original_driver"], "ixgbe")
        self.assertEqual(state["devices"][NIC]["driver"], "vfio-pci")

    def test_binding_twice_is_a_no_op(self):
        self.nic()
        self.assertEqual(self.devbind("bind", "-d", "vfio-pci", NIC).returncode, 0)
        r = self.devbind("bind", "-d", "vfio-pci", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("already bound", r.stdout)
        self.assertEqual(len(self.h.writes()), 3)

    def test_unbound_device_skips_unbind(self):
        self.h.pci(NIC, iommu_group="7")
        r = self.devbind("bind", "-d", "vfio-pci", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual([w[0] for w in self.h.writes()], [
            "/sys/bus/pci/devices/%s/driver_override" % NIC, "/sys/bus/pci/drivers/vfio-pci/bind"])

    def test_short_bdf_is_normalised(self):
        self.nic()
        r = self.devbind("bind", "--driver", "vfio-pci", "03:00.0")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.h.writes()[1], ("/sys/bus/pci/drivers/ixgbe/unbind", NIC))
        self.assertIn(NIC, self.h.state()["devices"])

    def test_upper_case_bdf_is_normalised(self):
        self.h.pci("0000:af:00.0", driver="ixgbe", iommu_group="9")
        r = self.devbind("bind", "--driver", "vfio-pci", "AF:00.0")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.h.current_driver("0000:af:00.0"), "vfio-pci")

    def test_dry_run_writes_nothing(self):
        self.nic()
        before = tree_digest(self.h.root)
        r = self.devbind("bind", "--dry-run", "--driver", "vfio-pci", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(tree_digest(self.h.root), before)
        lines = [l for l in r.stdout.splitlines() if l.startswith("would write")]
        self.assertEqual(len(lines), 3)
        self.assertIn("driver_override", lines[0])
        self.assertIn("ixgbe/unbind", lines[1])
        self.assertIn("vfio-pci/bind", lines[2])

    def test_reset_restores_the_original_driver(self):
        self.nic()
        self.assertEqual(self.devbind("bind", "-d", "vfio-pci", NIC).returncode, 0)
        r = self.devbind("reset", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.h.current_driver(NIC), "ixgbe")
        self.assertEqual(self.h.writes()[3:], [
            ("/sys/bus/pci/devices/%s/driver_override" % NIC, ""),
            ("/sys/bus/pci/drivers/vfio-pci/unbind", NIC),
            ("/sys/bus/pci/drivers/ixgbe/bind", NIC),
        ])
        self.assertEqual(self.h.read(self.h.dev(NIC) + "/driver_override").strip(), "")
        self.assertIsNone(self.h.state())  # no recorded bindings left: no state file

    def test_reset_all_and_rebinding_keeps_the_first_original(self):
        self.nic()
        self.h.nvme(NVME, iommu_group="8")
        self.assertEqual(self.devbind("bind", "-d", "vfio-pci", NIC, NVME).returncode, 0)
        # vfio-pci -> uio_pci_generic must still remember ixgbe as the kernel driver.
        self.assertEqual(self.devbind("bind", "-d", "uio_pci_generic", NIC).returncode, 0)
        self.assertEqual(self.h.state()["devices"][NIC]["original_driver"], "ixgbe")
        r = self.devbind("reset", "--all")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.h.current_driver(NIC), "ixgbe")
        self.assertEqual(self.h.current_driver(NVME), "nvme")

    def test_reset_of_unrecorded_device_leaves_it_alone(self):
        self.nic()
        r = self.devbind("reset", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("no binding recorded", r.stdout)
        self.assertEqual(self.h.writes(), [])

    def test_unbind_then_reset(self):
        self.nic()
        r = self.devbind("unbind", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIsNone(self.h.current_driver(NIC))
        self.assertEqual(self.devbind("reset", NIC).returncode, 0)
        self.assertEqual(self.h.current_driver(NIC), "ixgbe")

    def test_bind_back_to_a_kernel_driver(self):
        self.nic()
        self.assertEqual(self.devbind("bind", "-d", "vfio-pci", NIC).returncode, 0)
        r = self.devbind("bind", "-d", "ixgbe", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.h.current_driver(NIC), "ixgbe")

    def test_from_file(self):
        self.nic()
        self.h.nvme(NVME, iommu_group="8")
        conf = self.h.p("devbind.conf")
        with open(conf, "w") as f:
            f.write("# comment\n03:00.0 vfio-pci\n%s uio_pci_generic  # trailing\n" % NVME)
        r = self.devbind("bind", "--from-file", conf)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.h.current_driver(NIC), "vfio-pci")
        self.assertEqual(self.h.current_driver(NVME), "uio_pci_generic")
        self.assertEqual(self.devbind("reset", "--from-file", conf).returncode, 0)
        self.assertEqual(self.h.current_driver(NVME), "nvme")

    def test_devbind_root_env(self):
        self.nic()
        r = run(["bind", "-d", "vfio-pci", NIC], env={"DEVBIND_ROOT": self.h.root})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.h.current_driver(NIC), "vfio-pci")


class Iommu(DevbindCase):
    def test_vfio_without_iommu_group_is_an_error_with_hints(self):
        self.nic(group=None)
        r = self.devbind("bind", "-d", "vfio-pci", NIC)
        self.assertEqual(r.returncode, 3)
        self.assertClean(r)
        for hint in ("intel_iommu=on iommu=pt", "uio_pci_generic", "enable_unsafe_noiommu_mode"):
            self.assertIn(hint, r.stderr)
        self.assertEqual(self.h.writes(), [])

    def test_uio_needs_no_iommu_group(self):
        self.nic(group=None)
        r = self.devbind("bind", "-d", "uio_pci_generic", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_noiommu_mode_warns(self):
        self.nic(group=None)
        self.h.noiommu()
        r = self.devbind("bind", "-d", "vfio-pci", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("no-IOMMU", r.stderr)

    def test_group_member_on_another_driver_warns(self):
        self.nic()
        self.nic(bdf=NIC2, ifname="eth2")  # same group 7, stays on ixgbe
        r = self.devbind("bind", "-d", "vfio-pci", NIC)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("IOMMU group 7 also contains %s (ixgbe)" % NIC2, r.stderr)

    def test_group_bound_together_does_not_warn(self):
        self.nic()
        self.nic(bdf=NIC2, ifname="eth2")
        r = self.devbind("bind", "-d", "vfio-pci", NIC, NIC2)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("IOMMU group", r.stderr)

    def test_driver_not_loaded(self):
        self.nic()
        r = self.devbind("bind", "-d", "igb_uio", NIC)
        self.assertEqual(r.returncode, 1)
        self.assertIn("modprobe igb_uio", r.stderr)
        self.assertEqual(self.h.writes(), [])


class NvmeRefusal(DevbindCase):
    def setUp(self):
        super().setUp()
        self.h.nvme(NVME, partitions=("nvme0n1p1", "nvme0n1p2"), iommu_group="8")

    def test_free_nvme_binds(self):
        r = self.devbind("bind", "-d", "vfio-pci", NVME)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.h.writes()[1], ("/sys/bus/pci/drivers/nvme/unbind", NVME))

    def test_mounted_partition_is_refused(self):
        self.h.mount("/dev/nvme0n1p1", "/data")
        before = tree_digest(self.h.root)
        r = self.devbind("bind", "-d", "vfio-pci", NVME)
        self.assertRefused(r)
        self.assertIn("/dev/nvme0n1p1 is mounted on /data", r.stderr)
        self.assertEqual(tree_digest(self.h.root), before)

    def test_mounted_partition_by_uuid_link_is_refused(self):
        self.h.link("dev/disk/by-uuid/1234", "dev/nvme0n1p2")
        self.h.mount("/dev/disk/by-uuid/1234", "/srv")
        r = self.devbind("bind", "-d", "vfio-pci", NVME)
        self.assertRefused(r)
        self.assertIn("nvme0n1p2 is mounted on /srv", r.stderr)

    def test_force_takes_a_mounted_data_disk(self):
        self.h.mount("/dev/nvme0n1p1", "/data")
        r = self.devbind("bind", "--force", "-d", "vfio-pci", NVME)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_root_filesystem_is_refused_even_with_force(self):
        self.h.mount("/dev/nvme0n1p2", "/")
        r = self.devbind("bind", "--force", "-d", "vfio-pci", NVME)
        self.assertRefused(r)
        self.assertIn("root filesystem", r.stderr)

    def test_holders_are_refused(self):
        self.h.holder("nvme0n1p2", "dm-0", dm_name="vg-data")
        r = self.devbind("bind", "-d", "vfio-pci", NVME)
        self.assertRefused(r)
        self.assertIn("held by dm-0", r.stderr)

    def test_root_on_lvm_over_the_disk_is_refused_even_with_force(self):
        self.h.holder("nvme0n1p2", "dm-0", dm_name="vg-root")
        self.h.mount("/dev/mapper/vg-root", "/")
        r = self.devbind("bind", "--force", "-d", "vfio-pci", NVME)
        self.assertRefused(r)
        self.assertIn("/dev/dm-0 carries the root filesystem", r.stderr)

    def test_swap_is_refused(self):
        self.h.swap("/dev/nvme0n1p1")
        r = self.devbind("bind", "-d", "vfio-pci", NVME)
        self.assertRefused(r)
        self.assertIn("swap", r.stderr)

    def test_open_handle_is_refused(self):
        self.h.open_fd(4242, "qemu-system-x86", "/dev/nvme0n1")
        r = self.devbind("bind", "-d", "vfio-pci", NVME)
        self.assertRefused(r)
        self.assertIn("pid 4242 (qemu-system-x86)", r.stderr)

    def test_open_controller_char_device_is_refused(self):
        self.h.open_fd(77, "nvme", "/dev/nvme0")
        r = self.devbind("bind", "-d", "vfio-pci", NVME)
        self.assertRefused(r)

    def test_vfio_group_in_use_blocks_reset(self):
        self.assertEqual(self.devbind("bind", "-d", "vfio-pci", NVME).returncode, 0)
        self.h.open_fd(99, "hostplane", "/dev/vfio/8")
        r = self.devbind("reset", NVME)
        self.assertRefused(r)
        self.assertIn("hostplane", r.stderr)


class BadInput(DevbindCase):
    def test_bad_bdf(self):
        for bad in ("zz", "0000:03:00", "03:00.8", "03:20.0", "1:2:3:4", ""):
            r = self.devbind("bind", "-d", "vfio-pci", bad)
            self.assertEqual(r.returncode, 2, bad)
            self.assertClean(r)
            self.assertIn("invalid PCI address", r.stderr)

    def test_unknown_device(self):
        r = self.devbind("bind", "-d", "vfio-pci", "0000:42:00.0")
        self.assertEqual(r.returncode, 2)
        self.assertClean(r)
        self.assertIn("no PCI device 0000:42:00.0", r.stderr)

    def test_bad_driver_name(self):
        self.nic()
        r = self.devbind("bind", "-d", "../../evil", NIC)
        self.assertEqual(r.returncode, 2)
        self.assertClean(r)

    def test_usage_errors(self):
        for args in (["bind", NIC], ["frobnicate"], ["reset"], [], ["unbind"]):
            r = self.devbind(*args)
            self.assertEqual(r.returncode, 2, args)
            self.assertClean(r)

    def test_bad_conf_line(self):
        conf = self.h.p("bad.conf")
        with open(conf, "w") as f:
            f.write("03:00.0\n")
        r = self.devbind("bind", "--from-file", conf)
        self.assertEqual(r.returncode, 2)
        self.assertIn("bad.conf:1", r.stderr)

    def test_missing_conf(self):
        r = self.devbind("bind", "--from-file", "/nonexistent/devbind.conf")
        self.assertEqual(r.returncode, 2)
        self.assertClean(r)

    def test_corrupt_state_file(self):
        self.nic()
        self.h.put("var/lib/hostplane/devbind.json", "{not json")
        r = self.devbind("bind", "-d", "vfio-pci", NIC)
        self.assertEqual(r.returncode, 1)
        self.assertClean(r)
        self.assertIn("state file", r.stderr)

    def test_root_not_a_directory(self):
        r = run(["status"], root="/nonexistent/root")
        self.assertEqual(r.returncode, 2)
        self.assertClean(r)


class Status(DevbindCase):
    def test_empty_machine(self):
        r = self.devbind("status")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("no network/NVMe PCI devices found", r.stdout)

    def test_lists_devices_and_usage(self):
        self.nic()
        self.h.ipv4("eth1", "10.1.0.2/24")
        self.h.route4("eth1", "0.0.0.0/0", gateway="10.1.0.1")
        self.h.nvme(NVME, partitions=("nvme0n1p1",), iommu_group="8")
        self.h.mount("/dev/nvme0n1p1", "/data")
        self.h.pci("0000:00:1f.0", pci_class="0x060100", driver="lpc_ich")  # not listed
        r = self.devbind("status", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        data = json.loads(r.stdout)
        devs = {d["bdf"]: d for d in data["devices"]}
        self.assertEqual(sorted(devs), [NIC, NVME])
        nic = devs[NIC]
        self.assertEqual((nic["kind"], nic["driver"], nic["interfaces"], nic["numa_node"], nic["iommu_group"]),
                         ("network", "ixgbe", ["eth1"], 0, "7"))
        self.assertTrue(nic["in_use"])
        self.assertIn(False, [x["forceable"] for x in nic["in_use_reasons"]])
        nvme = devs[NVME]
        self.assertEqual(nvme["block_devices"], ["nvme0n1"])
        self.assertTrue(nvme["in_use"])
        text = self.devbind("status")
        self.assertEqual(text.returncode, 0, text.stderr)
        self.assertIn("Network devices", text.stdout)
        self.assertIn("NVMe devices", text.stdout)
        self.assertIn("never released", text.stdout)


class RealMachine(unittest.TestCase):
    def test_status_on_the_real_machine(self):
        r = run(["status"])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        self.assertTrue(r.stdout.strip())
        j = run(["status", "--json"])
        self.assertEqual(j.returncode, 0, j.stderr)
        data = json.loads(j.stdout)
        self.assertIn("devices", data)
        # Whatever carries the default route here must be reported as not releasable.
        for d in data["devices"]:
            for reason in d["in_use_reasons"]:
                if "default route" in reason["reason"]:
                    self.assertFalse(reason["forceable"])

    def test_dry_run_on_the_real_default_route_nic_is_refused(self):
        data = json.loads(run(["status", "--json"]).stdout)
        gw = [d["bdf"] for d in data["devices"]
              if any("default route" in x["reason"] for x in d["in_use_reasons"])]
        if not gw:
            self.skipTest("no PCI NIC carries the default route on this machine")
        r = run(["bind", "--dry-run", "--force", "-d", "vfio-pci", gw[0]])
        self.assertEqual(r.returncode, 3, r.stdout + r.stderr)


if __name__ == "__main__":
    unittest.main()
