"""Flood mode on a VLAN sub-interface, in a machine whose kernel can make one.

This machine's kernel (6.18, built without CONFIG_VLAN_8021Q) cannot create 802.1Q
devices, so the ``eth0.10`` case of test_flood.py cannot run here. This test boots
Debian 12's own kernel (``make vm-kernel`` puts it in build/vm/) in qemu, on this
machine's root filesystem shared read-only over 9p with a throwaway tmpfs layer on
top, and runs that case there: the same test, the same checkout and venv. The guest
has no network device at all; its namespaces are its own, so nothing it sends can
leave it.

qemu runs under software emulation (TCG): nested KVM on this machine's firecracker
host stalls while the kernel decompresses. Everything in the guest is several times
slower, so the guest's test uses the default timers and scales every bounded wait and
the outage bound by ``LBD_TEST_TIME_SCALE`` (testbed/nsutil.py).

Debian 12's kernel (6.1) also has no persistent nft tables, so the run exercises, on a
real old kernel, the owned twins of the cluster-MAC tables (netcfg/macmode.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VM_DIR = ROOT / "build" / "vm"
TIME_SCALE = 6
GUEST_TEST = "tests/netns/test_flood.py::test_flood_mode_on_a_learning_switch[eth0.10]"
GUEST_TIMEOUT_S = 1500
# What the initramfs loads before it can mount the host's root: virtio, 9p, overlay.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

# The initramfs's /init (busybox): mount the host's root read-only, a tmpfs layer over
# it, the result share read-write, and hand over to the guest script on the share.
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /mods/$m || echo "lbd-vm: insmod $m failed"; done
mkdir -p /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 host /lower
mount -t tmpfs tmpfs /upper && mkdir /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot
mkdir -p /newroot/vmout
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /newroot/vmout
exec switch_root /newroot /bin/sh /vmout/guest.sh
"""

# The guest's root is already writable (the tmpfs layer), so /tmp stays as it is: the
# checkout under test may live there. /run gets a fresh tmpfs (netns mounts, owners).
GUEST = """mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /lib/modules && ln -s {modules} /lib/modules/{version}
ip link set lo up
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
export PYTHONDONTWRITEBYTECODE=1 LBD_TEST_VLAN=1 LBD_TEST_TIME_SCALE={scale}
uname -r > /vmout/kernel
cd {root} && .venv/bin/python -m pytest -p no:cacheprovider -q -s --timeout={timeout} \\
    '{test}' > /vmout/pytest.log 2>&1
echo $? > /vmout/rc
sync
poweroff -f
"""


def guest_kernel() -> tuple[Path, str]:
    """build/vm's kernel image and its version; a clear failure if it is not there."""
    images = sorted((VM_DIR / "root" / "boot").glob("vmlinuz-*"))
    if not images or not (VM_DIR / ".ready").exists():
        pytest.fail(f"no guest kernel in {VM_DIR}: run 'make vm-kernel' (as root)")
    image = images[-1]
    return image, image.name.removeprefix("vmlinuz-")


def build_initramfs(work: Path, version: str) -> Path:
    """A newc cpio with static busybox, /init and the boot modules in load order."""
    tree = work / "initramfs"
    for sub in ("bin", "mods", "proc", "sys", "dev"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is not installed (make deps)"
    shutil.copy(busybox, tree / "bin" / "busybox")
    order: list[str] = []
    for module in BOOT_MODULES:
        shown = subprocess.run(
            ["modprobe", "-d", str(VM_DIR / "root"), "-S", version, "--show-depends", module],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in shown.splitlines():
            path = Path(line.split()[1])
            if path.name not in order:
                order.append(path.name)
                shutil.copy(path, tree / "mods" / path.name)
    (tree / "modules.order").write_text("\n".join(order) + "\n")
    (tree / "init").write_text(INIT)
    (tree / "init").chmod(0o755)
    image = work / "initramfs.cpio"
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    with image.open("wb") as out:
        subprocess.run(
            [busybox, "cpio", "-o", "-H", "newc"],
            input="\n".join(names) + "\n",
            text=True,
            cwd=tree,
            stdout=out,
            stderr=subprocess.DEVNULL,
            check=True,
        )
    return image


@pytest.mark.timeout(GUEST_TIMEOUT_S + 300)
def test_flood_mode_on_a_vlan_subinterface_in_a_vm(tmp_path: Path) -> None:
    assert shutil.which("qemu-system-x86_64"), "qemu-system-x86 is not installed (make deps)"
    kernel, version = guest_kernel()
    initramfs = build_initramfs(tmp_path, version)
    share = tmp_path / "out"
    share.mkdir()
    (share / "guest.sh").write_text(
        GUEST.format(
            modules=VM_DIR / "root" / "lib" / "modules" / version,
            version=version,
            scale=TIME_SCALE,
            root=ROOT,
            timeout=GUEST_TIMEOUT_S,
            test=GUEST_TEST,
        )
    )
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "3072",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initramfs),
        "-append",
        "console=ttyS0 panic=-1 quiet",
        "-virtfs",
        "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={share},mount_tag=out,security_model=passthrough",
    ]
    console = tmp_path / "console.log"
    with console.open("wb") as sink:
        try:
            qemu = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=GUEST_TIMEOUT_S + 120,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"the guest did not power off in time; console: {console}")
    log = (share / "pytest.log").read_text() if (share / "pytest.log").exists() else ""
    tail = console.read_text(errors="replace")[-3000:]
    assert qemu.returncode == 0, f"qemu exited {qemu.returncode}: {tail}"
    assert (share / "rc").exists(), f"the guest's test never finished: {tail}"
    guest_kernel_version = (share / "kernel").read_text().strip()
    assert guest_kernel_version == version, guest_kernel_version
    errors = "\n".join([ln[:300] for ln in log.splitlines() if ln.startswith("E ")][:30])
    assert (share / "rc").read_text().strip() == "0", f"{errors}\n...\n{log[-3000:]}"
    assert re.search(r"\b1 passed\b", log), log[-3000:]
    summary = re.search(r"flood mode \(eth0\.10\): .*", log)
    assert summary, log[-3000:]
    print(f"guest {guest_kernel_version}: {summary.group(0)}")
    for line in re.findall(r"failover figures: .*", log):
        print(f"guest {guest_kernel_version}: {line}")
