#!/usr/bin/env python3
"""Build dist/rescue.pyz: rescue.py, conf/ and duplicity for CPython 3.9-3.13 in one shiv zipapp.

    python3 build_zipapp.py [--source DIR] [-o dist/rescue.pyz]

1. fetch   the pinned wheels (WHEELS below) into build/wheels/ with pip, checking their sha256;
           later builds find them there and need no network.
2. stage   a site-packages tree: rescue.py and conf/ side by side (rescue.py reads
           conf/default.conf next to itself), duplicity's pure-Python package once plus the
           _librsync extension of every CPython version, and duplicity's runtime dependencies.
3. pack    it with the pinned shiv, then swap shiv's __main__.py for one that first picks a
           writable unpack directory (shiv's ~/.shiv does not exist in an initramfs).

Why these wheels: duplicity 3.0.7 is the newest 3.0.x and has manylinux x86_64 wheels for cp39 to
cp313. Its metadata lists every cloud SDK as a hard requirement, so its dependencies are pinned
here by hand: the core (util.py) imports fasteners and pexpect at module level, pexpect needs
ptyprocess; all three are pure Python. That covers file://, rsync:// (system rsync, also over
ssh), pexpect+sftp:// and pexpect+scp:// (system ssh) and gpg (system gpg). Plain sftp:// means
paramiko (C extensions through cryptography/bcrypt/pynacl): not bundled. python-gettext and
setuptools in duplicity's metadata are build-time tools; nothing imports them at run time.
"""

import argparse
import hashlib
import importlib.metadata
import inspect
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent
SHEBANG = "/usr/bin/env python3"
ENTRY_POINT = "rescue:main"

DUPLICITY = "duplicity-3.0.7"
CPYTHONS = ("39", "310", "311", "312", "313")
MANYLINUX = "manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64"

# The lock: every wheel that goes into the pyz, with the sha256 PyPI publishes for it.
WHEELS = {
    f"{DUPLICITY}-cp39-cp39-{MANYLINUX}.whl":
        "71c00bfed3667ba3ad81d0fcdecbb8d78d0907ca1164d47189ee2c0bb294b366",
    f"{DUPLICITY}-cp310-cp310-{MANYLINUX}.whl":
        "5696ca46350332433e1e60939287b2b245d7a4be9dd2400999e0f711d128cc21",
    f"{DUPLICITY}-cp311-cp311-{MANYLINUX}.whl":
        "3123eaf4c1072bde034b3aa00512d9ed8b858cd0cd3f08373eb4ccb0db2c16ef",
    f"{DUPLICITY}-cp312-cp312-{MANYLINUX}.whl":
        "c2d71b879ab270edbdbeef899d4da31efa130e878027313b604002c611450c79",
    f"{DUPLICITY}-cp313-cp313-{MANYLINUX}.whl":
        "bbd040310fc2173f4e8b0dab631b0baa903d1a1d3df6cfd4f3305fe58e132c58",
    "fasteners-0.20-py3-none-any.whl":
        "9422c40d1e350e4259f509fb2e608d6bc43c0136f79a00db1b49046029d0b3b7",
    "pexpect-4.9.0-py2.py3-none-any.whl":
        "7236d1e080e4936be2dc3e326cec0af72acf9212a7e1d060210e70a47e253523",
    "ptyprocess-0.7.0-py2.py3-none-any.whl":
        "4b41f3967fce3af57cc7e94b888626c18bf37a083e3651ca8feeb66d492fef35",
}

# The only files in which the per-version duplicity wheels may differ: the extension module,
# auditwheel's vendored libraries, and the dist-info that records tags, hashes and provenance.
EXTENSION = re.compile(r"duplicity/_librsync\.cpython-3\d+-x86_64-linux-gnu\.so")
VENDORED_LIBS = "duplicity.libs/"
PER_WHEEL_METADATA = {f"{DUPLICITY}.dist-info/{name}"
                      for name in ("RECORD", "WHEEL", "sboms/auditwheel.cdx.json")}


class BuildError(Exception):
    """A build failure with a message for the user (no traceback)."""


# ---------------------------------------------------------------------------------------------
# fetch

def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip_download_argv(filename: str, requirements: Path, dest: Path) -> List[str]:
    """pip arguments that fetch exactly FILENAME, whatever Python runs this script."""
    name, version, python_tag, abi_tag, platforms = filename[:-len(".whl")].split("-")
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--dest", str(dest), "--requirement", str(requirements)]
    if abi_tag != "none":
        argv += ["--implementation", "cp", "--abi", abi_tag,
                 "--python-version", f"{python_tag[2]}.{python_tag[3:]}"]
        for platform in platforms.split("."):
            argv += ["--platform", platform]
    return argv


def download(filename: str, sha256: str, cache: Path) -> None:
    """Fetch one wheel into CACHE. pip checks the hash (a --hash in the requirements file turns
    on its hash-checking mode); the download lands in a private directory first so a concurrent
    build never sees half a file."""
    name, version = filename.split("-")[:2]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        requirements = Path(tmp, "requirements.txt")
        requirements.write_text(f"{name}=={version} --hash=sha256:{sha256}\n")
        result = subprocess.run(pip_download_argv(filename, requirements, Path(tmp)))
        fetched = Path(tmp, filename)
        if result.returncode != 0 or not fetched.is_file():
            raise BuildError(f"pip could not download {filename} (exit {result.returncode}); "
                             "the first build needs PyPI, later ones use build/wheels/")
        if sha256_of(fetched) != sha256:
            raise BuildError(f"{filename} from PyPI does not have the pinned sha256 {sha256}")
        os.replace(fetched, cache / filename)


def fetch_wheels(cache: Path) -> Dict[str, Path]:
    """Every pinned wheel, from CACHE when its hash is right, else downloaded."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for filename, sha256 in WHEELS.items():
        path = cache / filename
        if not (path.is_file() and sha256_of(path) == sha256):
            print(f"downloading {filename}")
            download(filename, sha256, cache)
        paths[filename] = path
    return paths


# ---------------------------------------------------------------------------------------------
# stage

def wheel_tree(path: Path) -> Dict[str, bytes]:
    """What a wheel installs into site-packages: name -> contents. The *.data/ directory is left
    out: duplicity's holds docs, man pages and translations that an install would put under
    sys.prefix/share, outside site-packages, where the bundled copy could not find them anyway."""
    with zipfile.ZipFile(path) as wheel:
        return {info.filename: wheel.read(info) for info in wheel.infolist()
                if not info.is_dir() and not info.filename.split("/")[0].endswith(".data")}


def merge_duplicity(trees: Dict[str, Dict[str, bytes]]) -> Dict[str, bytes]:
    """One tree from the per-version duplicity wheels: the first wheel, plus every other wheel's
    extension module and vendored libraries. Fails if the wheels differ anywhere else, or if two
    wheels vendor different libraries under one name (both could not sit in duplicity.libs/)."""
    base_tag, base = next(iter(trees.items()))
    merged = dict(base)
    for tag, tree in trees.items():
        differing = sorted(name for name in set(base) | set(tree) if base.get(name) != tree.get(name))
        for name in differing:
            per_version = EXTENSION.fullmatch(name) or name.startswith(VENDORED_LIBS)
            if per_version and name in tree:
                if merged.setdefault(name, tree[name]) != tree[name]:
                    raise BuildError(f"duplicity cp{tag} vendors a different {name} than another wheel")
            elif not per_version and name not in PER_WHEEL_METADATA:
                raise BuildError(f"duplicity wheels cp{base_tag} and cp{tag} differ in {name}")
        if tag != base_tag:
            print(f"duplicity cp{tag} differs from cp{base_tag} only in: {', '.join(differing)}")
    # A RECORD lists one wheel's files and hashes; with five extensions it would be wrong.
    merged.pop(f"{DUPLICITY}.dist-info/RECORD", None)
    extensions = sorted(name for name in merged if EXTENSION.fullmatch(name))
    if len(extensions) != len(CPYTHONS):
        raise BuildError(f"expected {len(CPYTHONS)} _librsync extensions, got {extensions}")
    return merged


def rescue_tree(source: Path) -> Dict[str, bytes]:
    """rescue.py and conf/ from SOURCE, as rescue.py expects them: side by side."""
    for required in (source / "rescue.py", source / "conf" / "default.conf"):
        if not required.is_file():
            raise BuildError(f"{required} is missing; the pyz needs rescue.py and conf/default.conf")
    tree = {"rescue.py": (source / "rescue.py").read_bytes()}
    for path in sorted((source / "conf").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            tree[path.relative_to(source).as_posix()] = path.read_bytes()
    return tree


def write_tree(staging: Path, tree: Dict[str, bytes]) -> None:
    """Write files with fixed modes, so the pyz does not depend on the builder's umask."""
    for name, data in sorted(tree.items()):
        path = staging / name
        if path.exists():
            raise BuildError(f"two sources provide {name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755 if ".so" in path.suffixes else 0o644)


def stage(source: Path, wheels: Dict[str, Path], staging: Path) -> None:
    duplicity = {tag: wheel_tree(wheels[f"{DUPLICITY}-cp{tag}-cp{tag}-{MANYLINUX}.whl"])
                 for tag in CPYTHONS}
    write_tree(staging, rescue_tree(source))
    write_tree(staging, merge_duplicity(duplicity))
    for filename, path in wheels.items():
        if not filename.startswith(DUPLICITY + "-"):
            write_tree(staging, wheel_tree(path))


# ---------------------------------------------------------------------------------------------
# boot: these functions are copied verbatim into the pyz's __main__.py (see main_py). They run
# before anything is unpacked, so they are stdlib-only, and they avoid f-strings and newer syntax
# so that any python3 gets to the version check instead of a SyntaxError.

BOOT_HEADER = """\
# -*- coding: utf-8 -*-
# Written by build_zipapp.py: pick where shiv unpacks, then run shiv's own bootstrap.
import os
import stat
import sys
"""


def unpack_root_candidates():
    """Where shiv may unpack, best first: ~/.shiv (shiv's default, survives reboots), then
    per-user directories for initramfs and `env -i` runs, where HOME is unset, missing or
    read-only. A home of / (init's, or an empty HOME) is no home: /.shiv would litter /."""
    candidates = []
    home = os.path.expanduser("~")
    if os.path.isabs(home) and home.rstrip("/"):
        candidates.append(os.path.join(home, ".shiv"))
    for base in ("/run", "/tmp", "/var/tmp"):
        candidates.append("%s/rescue-shiv-%d" % (base, os.geteuid()))
    return candidates


def usable_unpack_root(path):
    """True if PATH is now a private directory to unpack code into: a real directory (not a
    symlink planted in /tmp) owned by us, mode 0700, on a mount that is writable and allows
    executing (the C extensions are mapped executable; hardened systems mount /tmp noexec).
    mkdir-or-accept makes two concurrent first runs agree; shiv locks the extraction itself."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            return False
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(path, 0o700)
        flags = os.statvfs(path).f_flag
    except OSError:
        return False
    return not flags & (os.ST_RDONLY | os.ST_NOEXEC) and os.access(path, os.W_OK | os.X_OK)


def pick_unpack_root(candidates):
    for path in candidates:
        if usable_unpack_root(path):
            return path
    return None


def boot():
    """The pyz's entry: check the interpreter, choose SHIV_ROOT unless the user did, and hand
    over to shiv's bootstrap, which unpacks under a lock and calls rescue:main."""
    if sys.version_info < (3, 9):
        sys.exit("rescue: error: Python %d.%d (%s) is too old; rescue needs Python 3.9 or newer"
                 % (sys.version_info[0], sys.version_info[1], sys.executable))
    if not os.environ.get("SHIV_ROOT"):
        root = pick_unpack_root(unpack_root_candidates())
        if root is None:
            sys.exit("rescue: error: no private writable directory to unpack into (tried %s)\n"
                     "hint: set SHIV_ROOT to one" % ", ".join(unpack_root_candidates()))
        os.environ["SHIV_ROOT"] = root
    import _bootstrap
    _bootstrap.bootstrap()


def main_py() -> str:
    functions = (unpack_root_candidates, usable_unpack_root, pick_unpack_root, boot)
    return "\n\n".join([BOOT_HEADER] + [inspect.getsource(f) for f in functions] + ["boot()\n"])


# ---------------------------------------------------------------------------------------------
# pack

def check_shiv_pin() -> None:
    """The pyz embeds shiv's bootstrap code, so the build must use the pinned shiv."""
    pins = re.findall(r"^shiv==(\S+)", (ROOT / "requirements-dev.txt").read_text(), re.M)
    try:
        installed = importlib.metadata.version("shiv")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if not pins or installed != pins[0]:
        raise BuildError(f"shiv {installed} is installed for {sys.executable}, requirements-dev.txt "
                         f"pins {pins}; run: {sys.executable} -m pip install -r requirements-dev.txt")


def replace_main(shiv_pyz: Path, target: Path) -> None:
    """Copy SHIV_PYZ to TARGET with our __main__.py; entries keep shiv's order and metadata."""
    with shiv_pyz.open("rb") as pyz:
        shebang = pyz.readline()
    our_main = main_py().encode()
    with zipfile.ZipFile(shiv_pyz) as source, target.open("wb") as out:
        if "__main__.py" not in source.namelist():
            raise BuildError(f"shiv wrote no __main__.py into {shiv_pyz}; is it shiv 1.0.x?")
        out.write(shebang)
        with zipfile.ZipFile(out, "w") as zipped:
            for info in source.infolist():
                zipped.writestr(info, our_main if info.filename == "__main__.py" else source.read(info))
    target.chmod(0o755)


def pack(staging: Path, output: Path) -> None:
    """shiv --reproducible: fixed timestamps, and the build id (the name of the unpack
    directory) is a hash of the contents, so an unchanged build reuses an earlier unpack."""
    check_shiv_pin()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        shiv_pyz, final = Path(tmp, "shiv.pyz"), Path(tmp, output.name)
        subprocess.run([sys.executable, "-m", "shiv", "--site-packages", str(staging),
                        "--entry-point", ENTRY_POINT, "--python", SHEBANG, "--reproducible",
                        "--output-file", str(shiv_pyz)], check=True)
        replace_main(shiv_pyz, final)
        os.replace(final, output)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT,
                        help="directory holding rescue.py and conf/ (default: this repository)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "dist" / "rescue.pyz")
    args = parser.parse_args(argv)
    try:
        wheels = fetch_wheels(ROOT / "build" / "wheels")
        with tempfile.TemporaryDirectory(dir=ROOT / "build") as staging:
            stage(args.source.resolve(), wheels, Path(staging))
            pack(Path(staging), args.output)
    except (BuildError, subprocess.CalledProcessError) as error:
        print(f"build_zipapp: error: {error}", file=sys.stderr)
        return 1
    print(f"built {args.output} ({args.output.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
