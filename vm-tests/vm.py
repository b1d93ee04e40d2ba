#!/usr/bin/env python3
"""Manual entry point to the vm-tests harness (the tests use vmlib directly).

    vm-tests/vm.py image                      build (or show) the cached guest image
    vm-tests/vm.py golden bios-lvm ...        provision golden disks for specs
    vm-tests/vm.py boot bios-lvm [CMD ...]    boot an overlay, run commands, print timings
    vm-tests/vm.py ssh bios-lvm               boot and open an interactive root shell
The cache is RESCUE_VM_CACHE or /var/cache/rescue-vm-tests; logs go to a temp dir (printed).
"""

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmlib import get_golden, get_image  # noqa: E402
from vmlib.procs import HarnessError  # noqa: E402


def cmd_image(args) -> None:
    image = get_image()
    print(image.path)
    print(json.dumps(image.recipe["timings"]))


def cmd_golden(args) -> None:
    for name in args.specs:
        golden = get_golden(name)
        print(golden.path, json.dumps(golden.info["timings"]))


def cmd_boot(args) -> None:
    golden = get_golden(args.spec)
    workdir = Path(tempfile.mkdtemp(prefix="vm-%s-" % args.spec))
    with golden.machine(args.spec, workdir) as m:
        m.start()
        print("systemd:", m.wait_booted(), m.timings)
        if args.interactive:
            subprocess.call(["ssh", "-p", str(m.ssh_port)] + m._ssh_options()
                            + ["-o", "BatchMode=no", "-t", "root@127.0.0.1"])
        for command in args.commands:
            r = m.run(command)
            print("$ %s  -> exit %d in %.2f s\n%s%s" % (command, r.returncode, r.seconds, r.stdout, r.stderr))
        m.shutdown()
        print("timings:", m.timings)
    print("logs:", workdir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("image").set_defaults(func=cmd_image)
    p = sub.add_parser("golden")
    p.add_argument("specs", nargs="+")
    p.set_defaults(func=cmd_golden)
    for name, interactive in (("boot", False), ("ssh", True)):
        p = sub.add_parser(name)
        p.add_argument("spec")
        p.add_argument("commands", nargs="*")
        p.set_defaults(func=cmd_boot, interactive=interactive)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(message)s")
    try:
        args.func(args)
    except HarnessError as e:
        print("vm.py: error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
