"""Recovery drills (issue 14, "Proof: drills in vm-tests"): a machine with known test data is
backed up by `rescue mkbackuponly` onto a file:// backup disk, recovered by rescue in the
rescue stand-in onto fresh blank disks, booted, and compared with its source: every file of
the backed-up filesystems (vmlib/drill.py says which paths may differ and why), the
filesystem UUIDs and labels, and `rescue checklayout` in the recovered system. The quick drill
recovers onto a machine whose NIC has another MAC: the source's network file bound to its MAC
must move to the new NIC and give it its address.

Each drill prints its step timings and the RTO (from "recover started", the moment the
stand-in is ready and rescue is called, to "recovered system booted") with `pytest -s`, and
writes them to drill-timings.json in the test's tmp directory. The backup is shared: one per
golden and rescue.pyz (vmlib.drill.get_backup, cached).
"""

import json
import os
import time

import pytest

from vmlib import create_disk_image
from vmlib import drill
from vmlib.drill import Timer
from vmlib.machine import MAC


def run_drill(spec_name, golden, drill_backup, rescue_pyz, make_standin, make_machine, tmp_path,
              bus=None, size_factor=1, same_serials=True, check_layout=True, point_in_time=False,
              in_recovered=None, recover=drill.recover, mac=MAC):
    """The whole drill; in_recovered(machine, source_info) adds checks in the booted recovered
    system; mac: the NIC of the stand-in and the recovered machine (another than the source's:
    its network configuration must move to that NIC). Returns the report (also in
    drill-timings.json) and the recovered disks."""
    g = golden(spec_name)
    backup = drill_backup(spec_name, point_in_time)
    source = backup.info
    assert not source["passphrase_leaks"], "the GPG passphrase is in %s" % source["passphrase_leaks"]
    timer = Timer()
    s = make_standin("standin", firmware=g.spec.firmware, hostname=source["hostname"], mac=mac)
    disks = []
    for d in g.spec.disks:
        size = "%dM" % (d.size_mib * size_factor)
        name = d.name if same_serials else "new-" + d.name
        path = create_disk_image(tmp_path / (name + ".qcow2"), size)
        disks.append(s.add_disk(path, name, bus=bus or d.bus, bootindex=None))
    s.add_overlay(backup.disk, drill.BACKUP_DISK)
    with timer.step("stand-in: start to ready"):
        s.start()
        s.wait_ready()
    with timer.step("stand-in: mount backup, install rescue"):
        drill.mount_backup_disk(s)
        drill.install_rescue(s, rescue_pyz, backup.conf)
        targets = {d.name: s.disk_path(d) for d in disks}
        options = ""
        if g.spec.luks:
            # the recreated LUKS devices get the golden's key: the restored initramfs unlocks
            # the root with its embedded copy of it (/etc/cryptsetup-keys.d)
            s.run("mkdir -p %s" % drill.DRILL_DIR, check=True)
            s.put(g.luks_keyfile(g.spec.luks[0].name), drill.DRILL_DIR + "/luks.key")
            s.run("echo LUKS_KEY_FILE=%s/luks.key > %s/luks.conf" % (drill.DRILL_DIR, drill.DRILL_DIR), check=True)
            options = "-C %s/luks.conf" % drill.DRILL_DIR
    recover_started = time.monotonic()
    split = recover(s, targets, timer, tmp_path,
                    restore_time=source["restore_time"] if point_in_time else "", options=options)
    leaks = s.run("grep -rl -- %s /var/lib/rescue /var/log/rescue /tmp 2>/dev/null" % drill.PASSPHRASE).stdout
    s.get("/var/log/rescue", tmp_path / "standin-var-log-rescue")   # rescue's own log, per step
    with timer.step("stand-in: poweroff"):
        s.shutdown()

    m = make_machine(None, name="recovered", firmware=g.spec.firmware, ovmf_vars=s._vars, mac=mac)
    for index, d in enumerate(disks):
        m.add_disk(d.path, d.name, bus=d.bus, bootindex=index if g.spec.disks[index].boot else None)
    with timer.step("recovered: boot to multi-user"):
        m.start()
        state = m.wait_booted()
    rto = round(time.monotonic() - recover_started, 1)
    failed = m.run("systemctl --failed --no-legend").stdout
    with timer.step("recovered: manifest"):
        drill.put_drill_scripts(m)
        recovered = drill.take_manifest(m, source["roots"], tmp_path / "recovered-manifest.json")
    identity = drill.storage_identity(m)
    machine_id = m.run("cat /etc/machine-id", check=True).stdout.strip()
    with timer.step("recovered: rescue checklayout"):
        checklayout = m.run(drill.RESCUE + " checklayout", timeout=300)
    extra = in_recovered(m, source) if in_recovered else None
    network_file = m.run("cat " + drill.NETWORK_FILE, check=True).stdout
    addresses = m.run("ip -4 -o addr show", check=True).stdout
    with timer.step("recovered: poweroff"):
        m.shutdown()

    report = {"spec": spec_name, "rto_s": rto, "recover_time_split": split, "steps": timer.as_dict(),
              "backup_steps": source["timings"], "standin_ready_s": s.timings.get("ready_s"),
              "recovered_ssh_s": m.timings.get("ssh_s"), "recovered_booted_s": m.timings.get("booted_s")}
    (tmp_path / "drill-timings.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + timer.table("drill %s, per step:" % spec_name))
    print("  backup (cached per golden + rescue.pyz): " +
          ", ".join("%s %.1f s" % kv for kv in source["timings"].items()))
    print("  RTO (recover started -> recovered system booted): %.1f s" % rto)
    print("  rescue recover's own account: " + split)

    differences = drill.compare_manifests(backup.manifest, recovered)
    if mac != MAC:      # the file finalize moved to the new NIC (and its directory's mtime)
        moved = (drill.NETWORK_FILE + ":", os.path.dirname(drill.NETWORK_FILE) + ": mtime")
        differences = [d for d in differences if not d.startswith(moved)]
    (tmp_path / "differences.txt").write_text("\n".join(differences) + "\n")
    assert state == "running", "recovered system is %s; failed units:\n%s" % (state, failed)
    assert not differences, "%d differences (all in %s), first ones:\n%s" % (
        len(differences), tmp_path / "differences.txt", "\n".join(differences[:40]))
    assert machine_id == source["machine_id"]
    assert network_file == drill.NETWORK_TEXT.replace(MAC, mac), "the network configuration did not move to the NIC here"
    assert " %s " % drill.NIC_ADDRESS in addresses, "the recovered machine's NIC lacks %s:\n%s" % (drill.NIC_ADDRESS, addresses)
    assert drill.identity_keys(identity) == drill.identity_keys(source["identity"])
    assert not leaks.split(), "the GPG passphrase is in %s" % leaks.split()
    if check_layout:
        assert checklayout.returncode == 0, "checklayout: exit %d\n%s\n%s" % (
            checklayout.returncode, checklayout.stdout[-3000:], checklayout.stderr[-3000:])
    report["extra"] = extra
    return report, disks


@pytest.mark.vm
def test_recover_bios_lvm(golden, drill_backup, rescue_pyz, make_standin, make_machine, tmp_path):
    """The quick drill (CI's quick stage): bios-lvm onto a blank disk like the old one."""
    run_drill("bios-lvm", golden, drill_backup, rescue_pyz, make_standin, make_machine, tmp_path, mac=drill.NEW_MAC)


@pytest.mark.vm
@pytest.mark.slow
def test_recover_uefi_gpt_boots_through_the_new_nvram_entry(golden, drill_backup, rescue_pyz, make_standin,
                                                           make_machine, tmp_path):
    def boot_entry(m, source):
        out = m.run("efibootmgr -v", check=True).stdout
        current = next(line.split()[1] for line in out.splitlines() if line.startswith("BootCurrent:"))
        entry = next(line for line in out.splitlines() if line.startswith("Boot%s" % current))
        return entry
    report, _ = run_drill("uefi-gpt", golden, drill_backup, rescue_pyz, make_standin, make_machine, tmp_path,
                          in_recovered=boot_entry)
    entry = report["extra"]
    # the firmware started the recovered system through an NVRAM entry of the installed loader,
    # not the removable-media fallback \EFI\BOOT\BOOTX64.EFI nor a firmware default
    assert "\\EFI\\BOOT\\" not in entry.upper() and ".efi" in entry.lower(), entry


@pytest.mark.vm
@pytest.mark.slow
def test_recover_raid1_luks_each_disk_boots_alone(golden, drill_backup, rescue_pyz, make_standin, make_machine,
                                                 tmp_path):
    _, disks = run_drill("raid1-luks", golden, drill_backup, rescue_pyz, make_standin, make_machine, tmp_path)
    for alone in disks:
        m = make_machine(None, name="alone-" + alone.name)
        m.add_disk(alone.path, alone.name, bootindex=0, snapshot=True)
        m.start()
        state = m.wait_booted()
        degraded = m.run("cat /proc/mdstat", check=True).stdout
        m.shutdown()
        assert state in ("running", "degraded"), state
        assert "_" in degraded, "the arrays should run degraded with one disk:\n" + degraded


@pytest.mark.vm
@pytest.mark.slow
def test_recover_bios_lvm_onto_a_twice_as_big_nvme_disk(golden, drill_backup, rescue_pyz, make_standin,
                                                        make_machine, tmp_path):
    def sizes(m, source):
        return m.run("lsblk -J -b -o NAME,TYPE,SIZE", check=True).stdout
    report, disks = run_drill("bios-lvm", golden, drill_backup, rescue_pyz, make_standin, make_machine, tmp_path,
                              bus="nvme", size_factor=2, same_serials=False, check_layout=False,
                              in_recovered=sizes)
    source = drill_backup("bios-lvm").info["identity"]
    grown = drill.storage_identity_sizes(report["extra"])
    old_disk = max(int(r["SIZE"]) for r in source if r["TYPE"] == "disk")
    assert grown["disk"] == 2 * old_disk
    old_part = max(int(r["SIZE"]) for r in source if r["TYPE"] == "part")
    assert grown["part"] > old_part + old_disk // 2, "the last partition was not grown: %s" % grown


@pytest.mark.vm
@pytest.mark.slow
def test_recover_point_in_time_restores_the_first_of_two_backups(golden, drill_backup, rescue_pyz, make_standin,
                                                                 make_machine, tmp_path):
    def later(m, source):
        return m.run("test -e %s" % drill.LATER_ROOT).returncode
    report, _ = run_drill("bios-lvm", golden, drill_backup, rescue_pyz, make_standin, make_machine, tmp_path,
                          point_in_time=True, in_recovered=later)
    assert report["extra"] == 1, "%s of the second backup is in the recovered system" % drill.LATER_ROOT


@pytest.mark.vm
@pytest.mark.slow
def test_recover_killed_during_recreate_restore_and_finalize_resumes_to_a_booting_machine(
        golden, drill_backup, rescue_pyz, make_standin, make_machine, tmp_path):
    """SIGKILL `rescue recover` while it makes the first filesystem, while duplicity restores,
    and while the initramfs is rebuilt; each time run it again: the machine that boots is the
    one the backup holds (the whole comparison of run_drill)."""
    run_drill("bios-lvm", golden, drill_backup, rescue_pyz, make_standin, make_machine, tmp_path,
              recover=drill.recover_killed)
