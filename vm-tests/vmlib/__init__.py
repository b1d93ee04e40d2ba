"""vmlib: the QEMU harness of rescue's VM tests (see vm-tests/README.md).

Map (each module's docstring says more):
  procs      the only code that starts host processes; QEMU cleanup guarantees
  cache      content-keyed, atomically created, lock-protected cache entries
  image      the Debian guest image (debootstrap + guest/customize.sh), cached by recipe hash
  spec       layout specs (specs/*.json): parse and validate
  install    pure: stable UUIDs, fstab/crypttab/mdadm.conf, the provisioning job script
  provision  golden disk sets built by the helper VM, cached by spec + image hash
  machine    one QEMU guest: disks, firmware, console log, ssh commands, file copies
  cpio       a tiny newc writer for the helper initramfs
  standin    the rescue stand-in VM (image kernel + harness initramfs + tools disk as root)
"""

from .image import GuestImage, get_image
from .machine import Disk, GuestError, GuestResult, Machine, create_disk_image
from .procs import HarnessError
from .provision import Golden, get_golden, run_helper
from .spec import Spec, available_specs, load_spec
from .standin import StandIn, rescue_standin

__all__ = ["Disk", "Golden", "GuestError", "GuestImage", "GuestResult", "HarnessError", "Machine",
           "Spec", "StandIn", "available_specs", "create_disk_image", "get_golden", "get_image", "load_spec",
           "rescue_standin", "run_helper"]
