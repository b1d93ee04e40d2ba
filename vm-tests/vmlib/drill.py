"""Recovery drills: a source machine with known data is backed up by rescue, recovered onto blank
disks in the rescue stand-in, booted, and compared file by file with its source.

    backup = get_backup(golden("bios-lvm"), rescue_pyz)   # cached: source boot, data, mkbackuponly
    backup.manifest, backup.identity                       # what the recovered system must equal
    differences = compare_manifests(backup.manifest, recovered_manifest)

The backup (the source's backup disk, its manifest, its filesystem identities, timings) is a
cache entry keyed by the golden disks, the rescue.pyz bytes and the drill recipe (this
module's constants and the guest scripts it runs), so every drill of a session, and later
sessions with the same rescue.pyz, share one. Drills attach it as an overlay: the entry is
never written.

Manifests are complete; the comparison leaves out what a recovered system may legitimately
differ in (VOLATILE, each with its reason) and the mtime of a directory holding such a path.
Sockets are not compared (a live process's endpoint: no backup restores one), nor the mtime
of a mountpoint (the source shows the mounted filesystem's root there).
"""

import hashlib
import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from . import cache
from .image import GUEST_DIR
from .machine import MAC, GuestError, Machine, create_disk_image
from .provision import Golden

log = logging.getLogger("vmlib")

RECIPE_VERSION = 1
BACKUP_DISK = "drill-backup"        # the serial (and ext4 label) of the backup disk
BACKUP_DISK_SIZE = "3G"
BACKUP_MOUNT = "/backup"
RESCUE = "/usr/local/sbin/rescue"   # where rescue.pyz goes, in the source and in the stand-in
DRILL_DIR = "/run/drill"            # the harness's scripts in a guest (tmpfs: never backed up)
DATA_ROOTS = ("/srv/drill", "/boot/drill")
LATER_ROOT = "/srv/later"           # written after the first backup (point-in-time drill)
PASSPHRASE = "drill-CANARY-4f9c1e7a"   # must never show up in rescue's logs, layout or state
# The source's network configuration bound to its NIC's MAC (QEMU's default, MAC): a drill that
# recovers onto a machine with another NIC (NEW_MAC) must find it moved to that NIC, and the
# address it gives (NIC_ADDRESS, beside the golden's DHCP) on the recovered machine.
NEW_MAC = "52:54:00:12:34:57"
NIC_ADDRESS = "10.0.2.99/24"
NETWORK_FILE = "/etc/systemd/network/10-drill.network"
NETWORK_TEXT = ("# the drill's NIC, by its MAC (systemd-networkd takes the first .network file that matches)\n"
                "[Match]\nMACAddress=%s\n\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\nAddress=%s\n" % (MAC, NIC_ADDRESS))

# Paths whose contents a recovered system may have changed, with the reason. Left out of the
# comparison, and the mtime of the directory holding each is not compared.
VOLATILE = {
    "/var/log": "journald, wtmp/lastlog of every ssh login and rescue's own logs keep writing",
    "/var/lib/rescue": "rescue writes its state and statistics after duplicity has finished",
    "/var/lib/systemd": "random-seed, timer stamps, and other state systemd updates at every boot",
    "/var/tmp": "temporary files (duplicity's, systemd's PrivateTmp directories)",
    "/tmp": "temporary files; rescue recreates it empty (1777)",
    "/root/.cache": "duplicity's archive directory (its signature cache) lives here",
    "/root/.gnupg": "gpg, run by the backup, keeps its agent sockets, lock files and random_seed here",
    "/root/.shiv": "rescue.pyz unpacks itself here on first use",
    "/boot/grub": "grub-install and update-grub rewrite the boot loader during recovery",
    "/etc/lvm/archive": "LVM writes an archive of each metadata change (recreating the VG is one)",
    "/etc/lvm/backup": "LVM rewrites its metadata backup when the VG is recreated",
}
# Rebuilt for the recovered hardware by finalize (update-initramfs -u -k all).
VOLATILE_GLOBS = ("/boot/initrd.img-",)
# Paths whose files must come back with the same bytes, but may have a new mtime, with the reason.
NEW_MTIME = {
    "/boot/efi/EFI": "finalize runs grub-install --target=x86_64-efi (Debian): it writes the same loader anew",
}


@dataclass(frozen=True)
class Backup:
    path: Path

    @property
    def disk(self) -> Path:
        return self.path / "backup.qcow2"

    @property
    def info(self) -> Dict:
        return json.loads((self.path / "source.json").read_text())

    @property
    def manifest(self) -> Dict:
        return json.loads((self.path / "manifest.json").read_text())

    @property
    def conf(self) -> Path:
        return self.path / "local.conf"


def local_conf(extra: str = "") -> str:
    return ("BACKUP=DUPLICITY\n"
            "BACKUP_DUPLICITY_URL=file://%s\n"
            "BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE='%s'\n%s" % (BACKUP_MOUNT, PASSPHRASE, extra))


def manifest_command(roots: Sequence[str]) -> str:
    return "python3 %s/manifest.py %s > %s/manifest.json" % (DRILL_DIR, " ".join(roots), DRILL_DIR)


def recipe_key(golden: Golden, rescue_pyz: Path) -> str:
    scripts = [(GUEST_DIR / n).read_text() for n in ("drill-data.py", "manifest.py")]
    return cache.digest(RECIPE_VERSION, golden.path.name, hashlib.sha256(rescue_pyz.read_bytes()).hexdigest(),
                        scripts, local_conf(), DATA_ROOTS, LATER_ROOT, NETWORK_FILE, NETWORK_TEXT)


def get_backup(golden: Golden, rescue_pyz: Path, second: bool = False) -> Backup:
    """The cached backup of golden's machine with the drill data, made first if needed.

    second: then more data (LATER_ROOT) and a second `rescue mkbackuponly`; the manifest and
    info["restore_time"] are those of the first backup (a point-in-time recovery)."""
    kind = "backup2" if second else "backup"
    name = cache.entry_name(kind, recipe_key(golden, rescue_pyz), golden.spec.name)
    return Backup(cache.build_once(cache.cache_dir(), name, lambda out: _build(golden, rescue_pyz, out, second)))


class Timer:
    """Named step durations, in order; printed as the drill's table."""

    def __init__(self) -> None:
        self.steps: List[Tuple[str, float]] = []
        self.marks: Dict[str, float] = {}

    def step(self, name: str):
        timer = self

        class _Step:
            def __enter__(self):
                self.t0 = time.monotonic()
                timer.marks[name] = self.t0

            def __exit__(self, *exc):
                timer.steps.append((name, round(time.monotonic() - self.t0, 1)))
        return _Step()

    def as_dict(self) -> Dict[str, float]:
        return dict(self.steps)

    def table(self, title: str) -> str:
        width = max([len(n) for n, _ in self.steps] + [10])
        lines = ["%s" % title] + ["  %-*s %7.1f s" % (width, n, s) for n, s in self.steps]
        return "\n".join(lines)


def install_rescue(m: Machine, rescue_pyz: Path, conf: Path) -> None:
    m.put(rescue_pyz, RESCUE)
    m.run("chmod 755 %s && mkdir -p /etc/rescue" % RESCUE, check=True)
    m.put(conf, "/etc/rescue/local.conf")


def mount_backup_disk(m: Machine) -> None:
    """The backup disk (attached as BACKUP_DISK) mounted at BACKUP_MOUNT, where the backup was made."""
    m.run("mkdir -p {b} && mount /dev/disk/by-id/virtio-{d} {b}".format(b=BACKUP_MOUNT, d=BACKUP_DISK), check=True)


def put_drill_scripts(m: Machine) -> None:
    m.run("mkdir -p %s" % DRILL_DIR, check=True)
    for name in ("drill-data.py", "manifest.py"):
        m.put(GUEST_DIR / name, "%s/%s" % (DRILL_DIR, name))


def take_manifest(m: Machine, roots: Sequence[str], out: Path) -> Dict:
    m.run(manifest_command(roots), timeout=900, check=True)
    m.get(DRILL_DIR + "/manifest.json", out)
    return json.loads(out.read_text())


IDENTITY_COLUMNS = "NAME,TYPE,FSTYPE,UUID,LABEL,PARTUUID,PTUUID,PTTYPE,SIZE"


def storage_identity(m: Machine) -> List[Dict]:
    """Each block device's type, filesystem, UUID, label, partition and table ids (the backup
    disk left out), as lsblk sees them: what a recovery must keep."""
    out = m.run("lsblk -J -b -o " + IDENTITY_COLUMNS, check=True).stdout
    rows = []

    def flatten(devs):
        for d in devs:
            rows.append({k: d.get(k.lower()) for k in IDENTITY_COLUMNS.split(",")})
            flatten(d.get("children") or [])
    flatten(json.loads(out)["blockdevices"])
    return [r for r in rows if r["LABEL"] != BACKUP_DISK and r["TYPE"] not in ("rom", "loop")]


def storage_identity_sizes(lsblk_json: str) -> Dict[str, int]:
    """The biggest disk and the biggest partition of an `lsblk -J -b -o NAME,TYPE,SIZE`."""
    out: Dict[str, int] = {}

    def walk(devs):
        for d in devs:
            if d.get("type") in ("disk", "part"):
                out[d["type"]] = max(out.get(d["type"], 0), int(d["size"]))
            walk(d.get("children") or [])
    walk(json.loads(lsblk_json)["blockdevices"])
    return out


def identity_keys(rows: Sequence[Dict]) -> List[Tuple]:
    """The identities to compare: (type, fstype, UUID, label) of every device that has one, and
    the partition and table ids; device names and sizes may differ (another bus, a bigger disk)."""
    keys = set()
    for r in rows:
        if r["UUID"] or r["LABEL"]:
            keys.add(("fs", r["FSTYPE"], r["UUID"], r["LABEL"]))
        if r["PARTUUID"]:
            keys.add(("part", r["PARTUUID"]))
        if r["TYPE"] == "disk" and r["PTUUID"]:
            keys.add(("table", r["PTTYPE"], r["PTUUID"]))
    return sorted(keys)


def volatile(path: str) -> bool:
    return any(path == v or path.startswith(v + "/") for v in VOLATILE) or path.startswith(VOLATILE_GLOBS)


def new_mtime(path: str) -> bool:
    return any(path == v or path.startswith(v + "/") for v in NEW_MTIME)


def compare_manifests(source: Dict, recovered: Dict) -> List[str]:
    """Every difference, one line each; [] when the recovered files equal the source's."""
    a = {p: e for p, e in source["files"].items() if not volatile(p) and e["type"] != "socket"}
    b = {p: e for p, e in recovered["files"].items() if not volatile(p) and e["type"] != "socket"}
    parents = {p.rsplit("/", 1)[0] or "/" for p in list(VOLATILE) + list(VOLATILE_GLOBS)}
    out = []
    for path in sorted(set(a) - set(b)):
        out.append("missing: %s (%s)" % (path, a[path]["type"]))
    for path in sorted(set(b) - set(a)):
        out.append("extra: %s (%s)" % (path, b[path]["type"]))
    for path in sorted(set(a) & set(b)):
        x, y = a[path], b[path]
        mountpoint = x.get("mountpoint") or y.get("mountpoint")
        for key in sorted(set(x) | set(y)):
            if key == "mountpoint" or (key == "mtime" and (mountpoint or (path in parents and x["type"] == "dir")
                                                           or new_mtime(path))):
                continue
            if key == "xattrs":
                xa, ya = x.get(key) or {}, y.get(key) or {}
                for name in sorted(set(xa) | set(ya)):
                    if xa.get(name) != ya.get(name):
                        out.append("%s: xattr %s %s -> %s" % (path, name, _short(xa.get(name)), _short(ya.get(name))))
            elif x.get(key) != y.get(key):
                out.append("%s: %s %s -> %s" % (path, key, x.get(key), y.get(key)))
    la = [g for g in (sorted(p for p in grp if not volatile(p)) for grp in source["hardlinks"]) if len(g) > 1]
    lb = [g for g in (sorted(p for p in grp if not volatile(p)) for grp in recovered["hardlinks"]) if len(g) > 1]
    for group in sorted(map(tuple, la)):
        if list(group) not in lb:
            out.append("hard links lost: %s" % " = ".join(group))
    for group in sorted(map(tuple, lb)):
        if list(group) not in la:
            out.append("hard links new: %s" % " = ".join(group))
    return out


def _short(value):
    return value if value is None or len(value) <= 40 else value[:37] + "..."


def keep_guest_log(m: Machine, r, out: Path) -> None:
    """A failed rescue run: its whole log (duplicity's and gpg's output) is kept beside the
    harness's, then the failure raised."""
    if r.returncode != 0:
        m.get("/var/log/rescue", out / "guest-var-log-rescue")
    r.check()


def _build(golden: Golden, rescue_pyz: Path, out: Path, second: bool = False) -> None:
    timer = Timer()
    (out / "local.conf").write_text(local_conf())
    create_disk_image(out / "backup.qcow2", BACKUP_DISK_SIZE)
    m = golden.machine("source", out / "source")
    m.add_disk(out / "backup.qcow2", BACKUP_DISK)
    try:
        with timer.step("source: boot to multi-user"):
            m.start()
            state = m.wait_booted()
        if state != "running":
            raise GuestError("source: systemd is %s:\n%s" % (state, m.run("systemctl --failed").stdout))
        with timer.step("source: test data, rescue.pyz, backup disk"):
            put_drill_scripts(m)
            m.run("mkfs.ext4 -q -L {d} /dev/disk/by-id/virtio-{d}".format(d=BACKUP_DISK), check=True)
            mount_backup_disk(m)
            data = m.run("python3 %s/drill-data.py %s" % (DRILL_DIR, " ".join(DATA_ROOTS)), check=True).stdout
            m.run("printf %%s %s > %s" % (shlex.quote(NETWORK_TEXT), NETWORK_FILE), check=True)
            install_rescue(m, rescue_pyz, out / "local.conf")
        with timer.step("source: rescue mkbackuponly"):
            r = m.run(RESCUE + " mkbackuponly", timeout=1500)
        (out / "mkbackuponly.log").write_text("exit %d\n--- stdout\n%s--- stderr\n%s" % (r.returncode, r.stdout, r.stderr))
        keep_guest_log(m, r, out)
        roots = sorted(m.run("findmnt -n -l -o TARGET -t xfs,ext4,vfat,btrfs", check=True).stdout.split())
        roots = [p for p in roots if p != BACKUP_MOUNT]
        with timer.step("source: manifest"):
            take_manifest(m, roots, out / "manifest.json")
        restore_time = None
        if second:
            restore_time = m.run("sleep 2; date +%s; sleep 2", check=True).stdout.strip()
            m.run("python3 %s/drill-data.py %s" % (DRILL_DIR, LATER_ROOT), check=True)
            with timer.step("source: second rescue mkbackuponly"):
                r = m.run(RESCUE + " mkbackuponly", timeout=1500)
            (out / "mkbackuponly-2.log").write_text("exit %d\n--- stdout\n%s--- stderr\n%s"
                                                     % (r.returncode, r.stdout, r.stderr))
            keep_guest_log(m, r, out)
        identity = storage_identity(m)
        leaks = m.run("grep -rl -- %s /var/lib/rescue /var/log/rescue %s 2>/dev/null" % (PASSPHRASE, BACKUP_MOUNT)).stdout
        hostname = m.run("hostname", check=True).stdout.strip()
        machine_id = m.run("cat /etc/machine-id", check=True).stdout.strip()
        with timer.step("source: poweroff"):
            m.shutdown()
    finally:
        m.close()
    info = {"spec": golden.spec.name, "golden": golden.path.name, "hostname": hostname, "machine_id": machine_id,
            "roots": roots, "restore_time": restore_time, "identity": identity, "data": json.loads(data), "passphrase_leaks": leaks.split(),
            "rescue_pyz_sha256": hashlib.sha256(rescue_pyz.read_bytes()).hexdigest(),
            "timings": timer.as_dict(), "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / "source.json").write_text(json.dumps(info, indent=1) + "\n")
    log.info("%s", timer.table("backup of %s" % golden.spec.name))


def recover(standin: Machine, targets: Dict[str, str], timer: Timer, log_dir: Path,
            restore_time: str = "", options: str = "") -> str:
    """Run `rescue recover --yes --unmount` in the stand-in (rescue and local.conf installed,
    backup mounted); its output goes to log_dir/rescue-recover.log. targets: spec disk name ->
    /dev node of its new disk, in boot order; options: rescue's global options (e.g. -C FILE).
    Returns recover's own account of its time (its "Time:" line)."""
    args = recover_args(restore_time)
    with timer.step("recover: rescue recover"):
        r = standin.run("%s --non-interactive %s recover %s" % (RESCUE, options, args), timeout=2400)
    (log_dir / "rescue-recover.log").write_text(
        "$ rescue recover %s\nexit %d in %.1f s\n--- stdout\n%s--- stderr\n%s"
        % (args, r.returncode, r.seconds, r.stdout, r.stderr))
    r.check()
    return time_line(r.stdout + r.stderr)


def recover_args(restore_time: str) -> str:
    return "--yes --unmount" + (" --restore-time %s" % restore_time if restore_time else "")


def time_line(output: str) -> str:
    """recover's "Time: …" line (where its time went), or "" when it printed none."""
    lines = [line for line in output.splitlines() if "Time: " in line]
    return lines[-1][lines[-1].index("Time: "):] if lines else ""


# Where `rescue recover` is killed (SIGKILL) by recover_killed: a pattern of a line of rescue's
# log that starts the moment, how long after it, and what the next run must say.
KILL_POINTS = (
    # the first filesystem is being made
    ("recreate", r"running: (.* )?mke2fs ", 0, "Resuming the interrupted run at step"),
    # duplicity's argv for the main chain (the backup check before it runs duplicity too), and
    # it has written for a while
    ("restore", r"restore -v.* /mnt/local/\.rescue-restore-", 20, "The interrupted restore is started again"),
    # the initramfs is half built
    ("finalize", r"running: (.* )?chroot /mnt/local update-initramfs ", 15,
     "The restore into /mnt/local is done already"),
)

KILL_SCRIPT = r"""
mkdir -p {dir}
log=/var/log/rescue/rescue-$(hostname).log
# each run starts its log anew: the one of the run before must not answer for this one
if [ -f "$log" ]; then mv "$log" {dir}/rescue-before-{n}.log; fi
setsid sh -c 'echo $$ > {dir}/rescue.pid; exec {rescue} --non-interactive {options} recover {args}' \
    > {dir}/recover-{n}.out 2>&1 < /dev/null &
sleep 1
pid=$(cat {dir}/rescue.pid)
until grep -q -E '{pattern}' "$log" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || {{ echo "rescue ended before: {pattern}"; exit 3; }}
    sleep 0.5
done
sleep {delay}
kill -9 "$pid"
while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
echo killed
"""


def recover_killed(standin: Machine, targets: Dict[str, str], timer: Timer, log_dir: Path,
                   restore_time: str = "", options: str = "") -> str:
    """`rescue recover` SIGKILLed at each of KILL_POINTS in turn (each time run again), then run
    to its end: what the drill then boots and compares is what the resumed runs made. Each
    resumed run must say it resumes where the killed one stopped."""
    outputs = []                  # of each run: the killed ones, then the last
    for n, (point, pattern, delay, _) in enumerate(KILL_POINTS, 1):
        with timer.step("recover: killed during %s" % point):
            r = standin.run(KILL_SCRIPT.format(dir=DRILL_DIR, rescue=RESCUE, options=options, n=n, pattern=pattern,
                                               args=recover_args(restore_time), delay=delay), timeout=2400)
        out = standin.run("cat %s/recover-%d.out" % (DRILL_DIR, n)).stdout
        (log_dir / ("rescue-recover-%d-killed-during-%s.log" % (n, point))).write_text(out)
        if r.stdout.strip() != "killed":
            raise GuestError("recover was not killed during %s: %s\n%s" % (point, r.stdout, out[-3000:]))
        outputs.append(out)
    split = recover(standin, targets, timer, log_dir, restore_time, options)
    outputs.append((log_dir / "rescue-recover.log").read_text())
    for (point, _, _, said), text in zip(KILL_POINTS, outputs[1:]):
        if said not in text:
            raise GuestError("the run after the kill during %s did not say %r:\n%s" % (point, said, text[-3000:]))
    return split
