"""dist/rescue.pyz: built by build_zipapp.py, runs on CPython 3.9-3.13, carries a working duplicity.

The session fixture rebuilds the pyz when an input is newer (the first build downloads the pinned
wheels from PyPI into build/wheels/; later builds are offline). Each test unpacks under a private
SHIV_ROOT, except the HOME tests, which exercise the pyz's own choice of unpack directory.
"""

import json
import os
import pwd
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYZ = REPO / "dist" / "rescue.pyz"
SUPPORTED = ("3.9", "3.10", "3.11", "3.12", "3.13")
DUPLICITY_VERSION = "duplicity 3.0.7 "  # then its release date

sys.path.insert(0, str(REPO))
import build_zipapp  # noqa: E402  (the unpack-root functions the pyz runs, tested directly)


def run(argv, **kwargs):
    kwargs.setdefault("env", os.environ)
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs)


def interpreter(version):
    """pythonX.Y from pyenv (its shims only run the selected versions), else from PATH."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"), "versions")
    found = sorted(pyenv.glob(f"{version}.*/bin/python{version}")) or [shutil.which(f"python{version}")]
    if found[-1] is None:
        pytest.skip(f"python{version} is not installed")
    return Path(found[-1])


def newest_input_mtime():
    inputs = [REPO / "build_zipapp.py", REPO / "rescue.py", REPO / "requirements-dev.txt"]
    inputs += [p for p in (REPO / "conf").rglob("*") if p.is_file()]
    return max(p.stat().st_mtime for p in inputs if p.exists())


@pytest.fixture(scope="session")
def pyz():
    if not PYZ.exists() or PYZ.stat().st_mtime < newest_input_mtime():
        result = run([sys.executable, REPO / "build_zipapp.py"], cwd=REPO)
        assert result.returncode == 0, result.stdout + result.stderr
    return PYZ


@pytest.fixture(scope="session")
def shiv_env(tmp_path_factory):
    """The environment for running the pyz with a private unpack root."""
    return dict(os.environ, SHIV_ROOT=str(tmp_path_factory.mktemp("shiv-root")))


@pytest.fixture(scope="session")
def site_packages(pyz, shiv_env):
    """The pyz's unpacked site-packages: what rescue.py puts on PYTHONPATH for duplicity."""
    result = run([pyz, "--version"], env=shiv_env)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(pyz) as archive:
        build_id = json.loads(archive.read("environment.json"))["build_id"]
    path = Path(shiv_env["SHIV_ROOT"], f"{pyz.name}_{build_id}", "site-packages")
    assert (path / "duplicity" / "__main__.py").is_file()
    return path


@pytest.fixture(scope="session")
def rescue_version():
    result = run([sys.executable, REPO / "rescue.py", "--version"])
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- the file -------------------------------------------------------------------------------

def test_pyz_is_an_executable_zip_with_env_python3_shebang(pyz):
    assert pyz.read_bytes().split(b"\n", 1)[0] == b"#!/usr/bin/env python3"
    assert os.access(pyz, os.X_OK)
    with zipfile.ZipFile(pyz) as archive:
        assert archive.testzip() is None


def test_pyz_holds_librsync_for_each_cpython_and_conf_beside_rescue(pyz):
    names = set(zipfile.ZipFile(pyz).namelist())
    for version in SUPPORTED:
        tag = version.replace(".", "")
        assert f"site-packages/duplicity/_librsync.cpython-{tag}-x86_64-linux-gnu.so" in names
    assert any(n.startswith("site-packages/duplicity.libs/librsync-") for n in names)
    assert {"site-packages/rescue.py", "site-packages/conf/default.conf"} <= names


def test_build_is_reproducible(pyz, tmp_path):
    result = run([sys.executable, REPO / "build_zipapp.py", "-o", tmp_path / "rescue.pyz"], cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rescue.pyz").read_bytes() == pyz.read_bytes()


def test_build_refuses_a_source_without_default_conf(pyz, tmp_path):
    # Asks for pyz only so that the wheels are cached and the build gets as far as staging.
    shutil.copy(REPO / "rescue.py", tmp_path)
    result = run([sys.executable, REPO / "build_zipapp.py", "--source", tmp_path,
                  "-o", tmp_path / "rescue.pyz"])
    assert result.returncode == 1
    assert "conf/default.conf is missing" in result.stderr
    assert not (tmp_path / "rescue.pyz").exists()


def fake_duplicity_wheels(**changes):
    """Per-version trees shaped like the duplicity wheels; CHANGES maps a tag to extra files."""
    trees = {}
    for tag in build_zipapp.CPYTHONS:
        trees[tag] = {"duplicity/__init__.py": b"",
                      f"duplicity/_librsync.cpython-{tag}-x86_64-linux-gnu.so": tag.encode(),
                      "duplicity.libs/librsync-aaaa.so.2": b"lib",
                      f"{build_zipapp.DUPLICITY}.dist-info/WHEEL": tag.encode()}
        trees[tag].update(changes.get(f"cp{tag}", {}))
    return trees


def test_merge_keeps_every_extension_and_differently_named_vendored_library():
    trees = fake_duplicity_wheels(cp313={"duplicity.libs/librsync-bbbb.so.2": b"other"})
    del trees["313"]["duplicity.libs/librsync-aaaa.so.2"]
    merged = build_zipapp.merge_duplicity(trees)
    assert {"duplicity.libs/librsync-aaaa.so.2", "duplicity.libs/librsync-bbbb.so.2"} <= set(merged)
    assert sum(".cpython-3" in name for name in merged) == len(build_zipapp.CPYTHONS)


@pytest.mark.parametrize("change", [{"duplicity.libs/librsync-aaaa.so.2": b"rebuilt"},
                                    {"duplicity/__init__.py": b"# patched"}],
                         ids=["vendored-library-clash", "python-source"])
def test_merge_refuses_wheels_that_differ_elsewhere(change):
    with pytest.raises(build_zipapp.BuildError):
        build_zipapp.merge_duplicity(fake_duplicity_wheels(cp312=change))


# --- running it -----------------------------------------------------------------------------

def test_pyz_version_matches_rescue_py(pyz, shiv_env, rescue_version):
    result = run([pyz, "--version"], env=shiv_env)
    assert (result.returncode, result.stdout) == (0, rescue_version), result.stderr


@pytest.mark.parametrize("version", SUPPORTED)
def test_pyz_runs_on_each_supported_python(pyz, shiv_env, rescue_version, version):
    result = run([interpreter(version), pyz, "--version"], env=shiv_env)
    assert (result.returncode, result.stdout) == (0, rescue_version), result.stderr


def test_too_old_python_gets_one_clear_line(pyz, shiv_env):
    result = run([interpreter("3.8"), pyz, "--version"], env=shiv_env)
    assert result.returncode == 1
    assert result.stderr.startswith("rescue: error: Python 3.8 ")
    assert "rescue needs Python 3.9 or newer" in result.stderr and "Traceback" not in result.stderr


def test_concurrent_first_runs_share_one_unpack(pyz, tmp_path, rescue_version):
    env = dict(os.environ, SHIV_ROOT=str(tmp_path / "root"))
    runs = [subprocess.Popen([str(pyz), "--version"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in runs]
    assert all(r[:2] == (0, rescue_version) for r in results), results
    assert len(list((tmp_path / "root").glob("*/site-packages"))) == 1


# --- where it unpacks without a usable HOME -------------------------------------------------

def unpacked_by(name):
    """Everything the pyz copied to NAME left in the places it may choose: its unpack
    directory and shiv's lock file."""
    roots = [Path(pwd.getpwuid(os.geteuid()).pw_dir, ".shiv")]
    roots += [Path(base, f"rescue-shiv-{os.geteuid()}") for base in ("/run", "/tmp", "/var/tmp")]
    return [path for root in roots for path in root.glob(f"*{name}_*")]


@pytest.mark.parametrize("home", [None, "missing", "/proc"], ids=["unset", "missing", "read-only"])
def test_pyz_unpacks_somewhere_private_without_usable_home(pyz, tmp_path, rescue_version, home):
    # A uniquely named copy unpacks into its own directory, which the test can find and remove.
    copy = tmp_path / f"rescue-test-{os.getpid()}-{tmp_path.name}.pyz"
    shutil.copy(pyz, copy)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    if home is not None:
        env["HOME"] = str(tmp_path / home) if home == "missing" else home
    try:
        result = run([copy, "--version"], env=env)
        assert (result.returncode, result.stdout) == (0, rescue_version), result.stderr
        unpacked = [p for p in unpacked_by(copy.name) if p.is_dir()]
        assert len(unpacked) == 1, unpacked
        if home is not None:
            assert not str(unpacked[0]).startswith(env["HOME"])
        root = unpacked[0].parent.stat()
        assert (root.st_uid, root.st_mode & 0o777) == (os.geteuid(), 0o700)
    finally:
        for path in unpacked_by(copy.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_unpack_root_is_created_private(tmp_path):
    root = tmp_path / "root"
    assert build_zipapp.usable_unpack_root(str(root))
    assert root.stat().st_mode & 0o777 == 0o700


def test_unpack_root_of_ours_is_made_private(tmp_path):
    root = tmp_path / "root"
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    assert build_zipapp.usable_unpack_root(str(root))
    assert root.stat().st_mode & 0o777 == 0o700


def test_unpack_root_refuses_symlink_and_skips_to_next(tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "planted").symlink_to(tmp_path / "elsewhere")
    candidates = [str(tmp_path / "planted"), str(tmp_path / "no" / "parent"), str(tmp_path / "next")]
    assert build_zipapp.pick_unpack_root(candidates) == str(tmp_path / "next")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_unpack_root_refuses_a_directory_owned_by_someone_else(tmp_path):
    squatted = tmp_path / "squatted"
    squatted.mkdir(mode=0o700)
    os.chown(squatted, 65534, 65534)
    assert not build_zipapp.usable_unpack_root(str(squatted))


# --- the bundled duplicity --------------------------------------------------------------------

@pytest.mark.parametrize("version", SUPPORTED)
def test_bundled_duplicity_runs_on_each_supported_python(site_packages, version):
    # -S keeps the interpreter's own site-packages out, so a dependency missing from the pyz shows.
    env = dict(os.environ, PYTHONPATH=str(site_packages))
    result = run([interpreter(version), "-S", "-m", "duplicity", "--version"], env=env)
    assert result.returncode == 0 and result.stdout.startswith(DUPLICITY_VERSION), result.stderr


@pytest.mark.skipif(not shutil.which("gpg"), reason="gpg is not installed")
def test_bundled_duplicity_backs_up_and_restores_with_gpg(site_packages, tmp_path):
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("hello\n")
    (source / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    (source / "link").symlink_to("a.txt")
    gnupg = tmp_path / "gnupg"
    gnupg.mkdir(mode=0o700)
    env = dict(os.environ, PYTHONPATH=str(site_packages), PASSPHRASE="test passphrase",
               GNUPGHOME=str(gnupg))
    target = f"file://{tmp_path / 'backup'}"

    def duplicity(*args):
        argv = [sys.executable, "-S", "-m", "duplicity", *args, "--archive-dir", tmp_path / "cache"]
        result = run(argv, env=env)
        assert result.returncode == 0, result.stderr

    try:
        duplicity("full", source, target)
        with (source / "sub" / "b.bin").open("ab") as grown:
            grown.write(os.urandom(1000))  # the incremental stores a librsync delta of it
        duplicity("incremental", source, target)
        duplicity("restore", target, tmp_path / "restored")
    finally:
        run(["gpgconf", "--homedir", gnupg, "--kill", "gpg-agent"])
    assert run(["diff", "-r", "--no-dereference", source, tmp_path / "restored"]).returncode == 0
    assert any(p.name.startswith("duplicity-inc.") for p in (tmp_path / "backup").iterdir())


def test_rescue_duplicity_runs_the_bundled_duplicity(pyz, shiv_env):
    result = run([pyz, "duplicity", "--version"], env=shiv_env)
    assert result.returncode == 0 and result.stdout.startswith(DUPLICITY_VERSION), result.stderr
