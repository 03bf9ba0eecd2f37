"""Fake sysfs/procfs/dev trees for testing scripts/devbind and scripts/deploy without hardware.

The layout mirrors the kernel's where devbind looks (see docs/devbind.md, "Fake-root testing"):
  sys/bus/pci/devices/BDF/{class,vendor,device,numa_node,driver_override,driver->,iommu_group->}
  sys/bus/pci/drivers/NAME/{bind,unbind}       sys/bus/pci/drivers_probe
  sys/kernel/iommu_groups/N/devices/BDF->      sys/module/vfio/parameters/enable_unsafe_noiommu_mode
  sys/bus/pci/devices/BDF/net/IF/{operstate,flags}        sys/class/net/IF -> that dir
  sys/bus/pci/devices/BDF/nvme/nvmeX/nvmeXnY/[nvmeXnYpZ/partition, holders/]
  sys/block/nvmeXnY -> that dir               sys/block/dm-N/{dm/name,holders/}
  proc/net/{route,ipv6_route,if_inet6}  proc/{mounts,swaps}  proc/PID/{comm,fd/N->/dev/...}
  run/devbind/ip-addr.json  (IPv4 addresses, `ip -j addr` format)
"""

import hashlib
import ipaddress
import json
import os
import shutil
import socket
import struct
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
DEVBIND = os.path.join(REPO, "scripts", "devbind")
DEPLOY = os.path.join(REPO, "scripts", "deploy")
# Run the tool under Debian's interpreter when there is one: that is what the unit runs.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

WRITES_LOG = "devbind-writes.log"


def tree_digest(root, exclude=()):
    """Hash of every path, file content, mode and symlink target under root."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        h.update(("D %s %o\n" % (rel_dir, os.stat(dirpath).st_mode)).encode())
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            p = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in exclude:
                continue
            if os.path.islink(p):
                h.update(("L %s %s\n" % (rel, os.readlink(p))).encode())
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    h.update(("F %s %o " % (rel, os.stat(p).st_mode)).encode() + f.read() + b"\n")
    return h.hexdigest()


def tree_listing(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


class FakeHost:
    def __init__(self, root=None):
        self.root = root or tempfile.mkdtemp(prefix="fakesys-")
        for d in ("sys/bus/pci/devices", "sys/bus/pci/drivers", "sys/kernel/iommu_groups", "sys/block",
                  "sys/class/net", "proc/net", "dev", "run/devbind"):
            os.makedirs(self.p(d), exist_ok=True)
        self.put("sys/bus/pci/drivers_probe", "")
        self.put("proc/net/route",
                 "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n")
        self.put("proc/net/ipv6_route", "")
        self.put("proc/net/if_inet6", "")
        self.put("proc/mounts", "proc /proc proc rw 0 0\nsysfs /sys sysfs rw 0 0\n")
        self.put("proc/swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
        self.addrs = {}

    def cleanup(self):
        shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------

    def p(self, rel):
        return os.path.join(self.root, rel.lstrip("/"))

    def put(self, rel, content):
        os.makedirs(os.path.dirname(self.p(rel)), exist_ok=True)
        with open(self.p(rel), "w") as f:
            f.write(content)

    def append(self, rel, content):
        with open(self.p(rel), "a") as f:
            f.write(content)

    def read(self, rel):
        with open(self.p(rel)) as f:
            return f.read()

    def link(self, rel, target_rel):
        """Relative symlink rel -> target_rel (both relative to root), as sysfs has."""
        src = self.p(rel)
        os.makedirs(os.path.dirname(src), exist_ok=True)
        if os.path.lexists(src):
            os.unlink(src)
        os.symlink(os.path.relpath(self.p(target_rel), os.path.dirname(src)), src)

    def dev(self, bdf):
        return "sys/bus/pci/devices/" + bdf

    # -- PCI -----------------------------------------------------------------------------

    def driver(self, name):
        d = "sys/bus/pci/drivers/" + name
        for f in ("bind", "unbind", "new_id", "remove_id"):
            self.put(d + "/" + f, "")
        return d

    def pci(self, bdf, pci_class="0x020000", vendor="0x8086", device="0x10fb", driver=None,
            numa=0, iommu_group=None):
        d = self.dev(bdf)
        self.put(d + "/class", pci_class + "\n")
        self.put(d + "/vendor", vendor + "\n")
        self.put(d + "/device", device + "\n")
        self.put(d + "/numa_node", "%d\n" % numa)
        self.put(d + "/driver_override", "(null)\n")
        if driver:
            self.driver(driver)
            self.link(d + "/driver", "sys/bus/pci/drivers/" + driver)
        if iommu_group is not None:
            g = "sys/kernel/iommu_groups/%s" % iommu_group
            os.makedirs(self.p(g + "/devices"), exist_ok=True)
            self.link(g + "/devices/" + bdf, d)
            self.link(d + "/iommu_group", g)
        return d

    def current_driver(self, bdf):
        link = self.p(self.dev(bdf) + "/driver")
        return os.path.basename(os.readlink(link)) if os.path.lexists(link) else None

    def noiommu(self, on=True):
        self.put("sys/module/vfio/parameters/enable_unsafe_noiommu_mode", "Y\n" if on else "N\n")

    # -- network -------------------------------------------------------------------------

    def netif(self, bdf, ifname, up=True):
        d = self.dev(bdf) + "/net/" + ifname
        self.put(d + "/operstate", ("up" if up else "down") + "\n")
        self.put(d + "/flags", ("0x1003" if up else "0x1002") + "\n")
        self.link("sys/class/net/" + ifname, d)

    def ipv4(self, ifname, cidr):
        addr, plen = cidr.split("/")
        self.addrs.setdefault(ifname, []).append({"family": "inet", "local": addr, "prefixlen": int(plen)})
        self.put("run/devbind/ip-addr.json", json.dumps(
            [{"ifname": n, "addr_info": a} for n, a in sorted(self.addrs.items())]))

    def ipv6(self, ifname, cidr, scope=0):
        ip = ipaddress.IPv6Interface(cidr)
        self.append("proc/net/if_inet6", "%s %02x %02x %02x %02x %8s\n"
                    % (ip.ip.exploded.replace(":", ""), 2, ip.network.prefixlen, scope, 0x80, ifname))

    def route4(self, ifname, cidr, gateway="0.0.0.0"):
        net = ipaddress.IPv4Network(cidr)

        def le(a):
            return "%08X" % struct.unpack("<I", socket.inet_aton(str(a)))[0]

        self.append("proc/net/route", "%s\t%s\t%s\t%04X\t0\t0\t0\t%s\t0\t0\t0\n"
                    % (ifname, le(net.network_address), le(gateway), 0x3 if gateway != "0.0.0.0" else 0x1,
                       le(net.netmask)))

    def route6(self, ifname, cidr, gateway="::", flags=0x0001):
        net = ipaddress.IPv6Network(cidr)
        hx = lambda a: ipaddress.IPv6Address(a).exploded.replace(":", "")  # noqa: E731
        self.append("proc/net/ipv6_route", "%s %02x %s 00 %s 00000400 00000001 00000000 %08x %8s\n"
                    % (hx(net.network_address), net.prefixlen, "0" * 32, hx(gateway), flags, ifname))

    # -- storage -------------------------------------------------------------------------

    def nvme(self, bdf, ctrl="nvme0", namespaces=("nvme0n1",), partitions=(), driver="nvme", iommu_group=None):
        self.pci(bdf, pci_class="0x010802", vendor="0x144d", device="0xa808", driver=driver,
                 iommu_group=iommu_group)
        for ns in namespaces:
            nsd = "%s/nvme/%s/%s" % (self.dev(bdf), ctrl, ns)
            self.put(nsd + "/dev", "259:0\n")
            os.makedirs(self.p(nsd + "/holders"), exist_ok=True)
            self.link("sys/block/" + ns, nsd)
            self.put("dev/" + ns, "")
            for part in partitions:
                if part.startswith(ns):
                    self.put("%s/%s/partition" % (nsd, part), "1\n")
                    os.makedirs(self.p("%s/%s/holders" % (nsd, part)), exist_ok=True)
                    self.put("dev/" + part, "")

    def holder(self, block, holder, dm_name=None):
        """Make `holder` (dm-N/md-N) hold block device or partition `block`."""
        base = "sys/block/" + block
        if not os.path.exists(self.p(base)):
            disk = block.rsplit("p", 1)[0]
            base = "sys/block/%s/%s" % (disk, block)
        os.makedirs(self.p(base + "/holders"), exist_ok=True)
        hd = "sys/block/" + holder
        os.makedirs(self.p(hd + "/holders"), exist_ok=True)
        if dm_name:
            self.put(hd + "/dm/name", dm_name + "\n")
            self.link("dev/mapper/" + dm_name, "dev/" + holder)
        self.put("dev/" + holder, "")
        self.link(base + "/holders/" + holder, hd)

    def mount(self, source, mountpoint, fstype="ext4"):
        self.append("proc/mounts", "%s %s %s rw,relatime 0 0\n" % (source, mountpoint, fstype))

    def swap(self, source):
        self.append("proc/swaps", "%s\tpartition\t1048572\t0\t-2\n" % source)

    def open_fd(self, pid, comm, target, fd=3):
        self.put("proc/%d/comm" % pid, comm + "\n")
        os.makedirs(self.p("proc/%d/fd" % pid), exist_ok=True)
        os.symlink(target, self.p("proc/%d/fd/%d" % (pid, fd)))

    # -- devbind's record ----------------------------------------------------------------

    def writes(self):
        """[(path, value)] in the order devbind wrote them (fake-root mode log)."""
        if not os.path.exists(self.p(WRITES_LOG)):
            return []
        out = []
        for line in self.read(WRITES_LOG).splitlines():
            path, _, value = line.partition("\t")
            out.append((path, value))
        return out

    def state(self):
        p = self.p("var/lib/hostplane/devbind.json")
        if not os.path.exists(p):
            return None
        with open(p) as f:
            return json.load(f)
