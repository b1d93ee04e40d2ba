"""pytest integration of the QEMU harness (vm-tests/vmlib).

Fixtures:
  guest_image     session: the cached Debian guest image (built on first use)
  golden          session: golden("bios-lvm") -> Golden, provisioned once per session
  make_machine    per test: make_machine("bios-lvm") -> Machine on overlays of that golden;
                  make_machine(None, name="x", ...) -> a bare Machine; all closed after the test
  make_standin    per test: make_standin("rescue", firmware="bios", udev=True, network=True)
                  -> StandIn (vmlib/standin.py): a rescue-system stand-in VM; closed after the test
  rescue_py       path of the rescue.py of the checkout under test
  rescue_pyz      session: dist/rescue.pyz (rescue + duplicity) built from the checkout by
                  build_zipapp.py into the session's tmp dir; $RESCUE_PYZ names a ready one
  drill_backup    session: drill_backup("bios-lvm") -> the recovery drills' cached backup

Tests marked `vm` are skipped, with the reason, only when qemu-system-x86_64 or debootstrap
is missing or the run is not root. Anything else that goes wrong is a failure: a broken image
build must never look like a skipped test.
"""

import os
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmlib import Golden, Machine, StandIn, get_golden, get_image, rescue_standin  # noqa: E402
from vmlib import drill, procs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def missing_prerequisite() -> Optional[str]:
    for tool in ("qemu-system-x86_64", "debootstrap"):
        if not procs.which(tool):
            return "%s is not installed (run vm-tests/ci-setup.sh)" % tool
    if os.geteuid() != 0:
        return "VM tests must run as root (debootstrap, chroot, mount namespaces)"
    return None


def pytest_collection_modifyitems(config, items) -> None:
    reason = missing_prerequisite()
    if reason:
        for item in items:
            if item.get_closest_marker("vm"):
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item) -> None:
    """RESCUE_START_SLOW_BEFORE (seconds since the epoch): no slow drill starts after it. CI
    sets it so that the slow stage uses what is left of its time budget and a noisy machine
    skips the rest (reported as skipped, with the reason) instead of running past the limit."""
    deadline = os.environ.get("RESCUE_START_SLOW_BEFORE")
    if deadline and item.get_closest_marker("slow") and time.time() > float(deadline):
        pytest.skip("the CI time budget for slow drills is used up (RESCUE_START_SLOW_BEFORE)")


def pytest_configure(config) -> None:
    _give_conftest_name_back(config)
    # pytest unwinds (fixture finalizers close every Machine) on KeyboardInterrupt only; make
    # SIGTERM/SIGHUP from a CI timeout behave the same. PDEATHSIG covers a SIGKILLed pytest.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _interrupt)


def _give_conftest_name_back(config) -> None:
    """pytest imports every conftest.py outside a package as the module "conftest", so the one
    loaded last (this one: testpaths = tests vm-tests) owns sys.modules["conftest"]. The unit
    tests import theirs by name (from conftest import run_rescue): hand the name back to it.
    Our fixtures and hooks are unaffected; pytest holds this module as a plugin."""
    theirs = REPO / "tests" / "conftest.py"
    for plugin in config.pluginmanager.get_plugins():
        path = getattr(plugin, "__file__", None)
        if path and Path(path).resolve() == theirs:
            sys.modules["conftest"] = plugin


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt("signal %d" % signum)


@pytest.fixture(scope="session", autouse=True)
def no_qemu_survives():
    """Fails the session if any QEMU started by it is still running at the end."""
    yield
    procs.kill_all_live()
    leftovers = procs.session_qemu_pids()
    if leftovers:
        procs.kill_pids(leftovers)
        pytest.fail("QEMU processes outlived the test session (now killed): %s" % leftovers)


@pytest.fixture(scope="session")
def guest_image():
    return get_image()


@pytest.fixture(scope="session")
def golden(guest_image):
    """golden(spec_name) -> Golden. A failed build is remembered: later tests fail fast."""
    built: Dict[str, object] = {}

    def get(spec_name: str) -> Golden:
        if spec_name not in built:
            try:
                built[spec_name] = get_golden(spec_name, guest_image)
            except Exception as e:  # noqa: BLE001 - re-raised for every test that needs it
                built[spec_name] = e
        if isinstance(built[spec_name], Exception):
            raise built[spec_name]
        return built[spec_name]

    return get


@pytest.fixture
def make_machine(request, tmp_path, golden, guest_image):
    machines: List[Machine] = []
    request.node.vm_machines = getattr(request.node, "vm_machines", [])

    def make(spec: Optional[str], name: Optional[str] = None, **options) -> Machine:
        name = name or spec
        workdir = tmp_path / name
        if spec:
            m = golden(spec).machine(name, workdir, **options)
        else:
            m = Machine(name, workdir, ssh_key=guest_image.ssh_key, **options)
        machines.append(m)
        request.node.vm_machines.append(m)
        return m

    yield make
    for m in machines:
        m.close()


@pytest.fixture
def make_standin(request, tmp_path, guest_image):
    standins: List[StandIn] = []
    request.node.vm_machines = getattr(request.node, "vm_machines", [])

    def make(name: str = "rescue", firmware: str = "bios", udev: bool = True, network: bool = True,
             **options) -> StandIn:
        s = rescue_standin(guest_image, name, tmp_path / name, firmware=firmware, udev=udev,
                           network=network, **options)
        standins.append(s)
        request.node.vm_machines.append(s)
        return s

    yield make
    for s in standins:
        s.close()


@pytest.fixture(scope="session")
def rescue_py() -> Path:
    path = REPO / "rescue.py"
    if not path.is_file():
        pytest.fail("%s does not exist: the VM tests run the checkout's rescue.py" % path)
    return path


@pytest.fixture(scope="session")
def rescue_pyz(tmp_path_factory) -> Path:
    if os.environ.get("RESCUE_PYZ"):
        path = Path(os.environ["RESCUE_PYZ"])
        if not path.is_file():
            pytest.fail("RESCUE_PYZ=%s does not exist" % path)
        return path
    out = tmp_path_factory.mktemp("pyz") / "rescue.pyz"
    procs.run([sys.executable, REPO / "build_zipapp.py", "-o", out], timeout=600, env=dict(os.environ),
              log_file=out.parent / "build.log")
    return out


@pytest.fixture(scope="session")
def drill_backup(golden, rescue_pyz):
    """drill_backup(spec_name, second=False) -> vmlib.drill.Backup: the drills' shared backup
    of that golden with the drill data (second: two backups, for point in time), cached."""
    made: Dict[tuple, object] = {}

    def get(spec_name: str, second: bool = False):
        if (spec_name, second) not in made:
            made[spec_name, second] = drill.get_backup(golden(spec_name), rescue_pyz, second)
        return made[spec_name, second]
    return get


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, show where each guest's logs are and the end of its serial console."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for m in getattr(item, "vm_machines", []):
            report.sections.append(("vm %s" % m.name, "logs: %s\n%s" % (m.workdir, m.console_tail(60))))
