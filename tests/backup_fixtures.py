"""Real things for the backup tests: GnuPG keys made here, an sshd of our own on 127.0.0.1,
a tree of every kind of file, and a comparison of every attribute.

The sshd needs only openssh-server installed: it runs from its own config with its own host key
on an unprivileged port, accepts one generated client key, and is stopped after the session.
Nothing in /root/.ssh or /etc/ssh is read or changed (the client uses ssh -F OUR_CONFIG).
"""

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
# gpg's agent must not remember a passphrase: the wrong-passphrase tests depend on it.
AGENT_CONF = "default-cache-ttl 0\nmax-cache-ttl 0\nallow-loopback-pinentry\n"
# A valid security.capability value (cap_net_raw+ep, VFS_CAP_REVISION_2).
CAPABILITY = bytes.fromhex("0100000220000000000000000000000000000000")


@dataclass
class Keys:
    home: Path
    enc: str            # fingerprint of the encryption key, passphrase ENC_PASSPHRASE
    nopass: str         # an encryption key without passphrase
    sign: str           # a signing key, passphrase SIGN_PASSPHRASE
    public_only: Path   # another GNUPGHOME that has only the public enc key, not trusted


ENC_PASSPHRASE = "enc-passphrase-4711"
SIGN_PASSPHRASE = "sign-passphrase-0815"


def gpg(home, *args, input=None):
    env = dict(os.environ, GNUPGHOME=str(home))
    return subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", *args], env=env,
                          input=input, capture_output=True, check=True)


def new_key(home, uid, passphrase):
    gpg(home, "--passphrase", passphrase, "--quick-gen-key", uid, "future-default", "default", "never")
    listing = gpg(home, "--with-colons", "--list-keys", uid).stdout.decode()
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


def gnupg_home(path):
    path.mkdir(mode=0o700)
    (path / "gpg-agent.conf").write_text(AGENT_CONF)
    return path


@pytest.fixture(scope="session")
def gnupg_keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpg")
    home = gnupg_home(base / "home")
    keys = Keys(home, new_key(home, "rescue enc <enc@test>", ENC_PASSPHRASE),
                new_key(home, "rescue nopass <nopass@test>", ""),
                new_key(home, "rescue sign <sign@test>", SIGN_PASSPHRASE),
                gnupg_home(base / "public-only"))
    exported = gpg(home, "--export", keys.enc).stdout
    gpg(keys.public_only, "--import", input=exported)
    yield keys
    for directory in (home, keys.public_only):
        subprocess.run(["gpgconf", "--kill", "all"], env=dict(os.environ, GNUPGHOME=str(directory)))


@dataclass
class Sshd:
    port: int
    ssh_options: str
    root: Path

    def url(self, path):
        return f"rsync://root@127.0.0.1:{self.port}/{path}"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sshd_config(directory, port):
    """SetEnv SHLVL=1: bash then does not read ~/.bashrc for each ssh command (Debian's bash
    does at level 1). The tests and the benchmark log in as root, whose ~/.bashrc on a
    developer's machine may be heavy (here pyenv init: 0.12 s of CPU per rsync call, on
    the same cores as the backup) — what a backup server's account does not do."""
    return "\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {directory}/host_key",
        f"PidFile {directory}/sshd.pid", f"AuthorizedKeysFile {directory}/authorized_keys",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no", "UseDNS no",
        "Subsystem sftp internal-sftp", "LogLevel ERROR", "SetEnv SHLVL=1", ""])


def client_config(directory, port):
    return "\n".join([
        "Host 127.0.0.1", f"  IdentityFile {directory}/client_key", "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {directory}/known_hosts", "  StrictHostKeyChecking yes",
        "  BatchMode yes", "  LogLevel ERROR", ""])


def wait_for_port(port, proc, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {proc.stderr.read().decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("sshd did not start listening")


def start_sshd(directory):
    """An sshd of our own on 127.0.0.1 (fresh host and client keys in `directory`), listening.
    Returns (process, port, ssh options that reach it: "-F DIR/ssh_config")."""
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)], check=True)
    shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
    port = free_port()
    host_key = (directory / "host_key.pub").read_text().split()
    (directory / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (directory / "sshd_config").write_text(sshd_config(directory, port))
    (directory / "ssh_config").write_text(client_config(directory, port))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)     # sshd's privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(directory / "sshd_config")],
                            stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc)
    except BaseException:
        proc.terminate()
        raise
    return proc, port, f"-F {directory}/ssh_config"


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sshd")
    proc, port, options = start_sshd(directory)
    try:
        yield Sshd(port, options, directory)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- a tree of every kind of file, and its comparison -------------------------------------------

def make_tree(root):
    """Regular, hard-linked, sparse, xattr/ACL/capability-carrying, symlinked, device, FIFO,
    long- and non-UTF-8-named files with owners, modes and mtimes of their own."""
    root = Path(root)
    (root / "dir/deep/er").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "dir/text.txt").write_text("hello world\n" * 100)
    (root / "dir/random.bin").write_bytes(os.urandom(300_000))
    os.link(root / "dir/text.txt", root / "dir/deep/hardlink.txt")
    os.link(root / "dir/text.txt", root / "hardlink-at-top")
    with open(root / "sparse.img", "wb") as f:
        f.truncate(20 * 1024 * 1024)
        f.seek(5 * 1024 * 1024)
        f.write(b"data in the middle")
    os.symlink("dir/text.txt", root / "symlink")
    os.symlink("/nonexistent/target", root / "dangling")
    os.mknod(root / "null-device", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "block-device", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    os.mkfifo(root / "fifo")
    (root / ("L" * 255)).write_text("long name")
    with open(os.path.join(os.fsencode(root), b"non-utf8-\xff\xfe.txt"), "wb") as f:
        f.write(b"latin-1 name")
    (root / "spaces and 'quotes' $HOME *").write_text("shell characters")
    os.setxattr(root / "dir/text.txt", "user.comment", b"an extended attribute")
    os.setxattr(root / "dir/random.bin", "user.binary", bytes(range(256)))
    subprocess.run(["setfacl", "-m", "u:nobody:rw,g:daemon:r", str(root / "dir/random.bin")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:nobody:rwx", str(root / "dir/deep")], check=True)
    (root / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "tool", 0o755)
    os.setxattr(root / "tool", "security.capability", CAPABILITY)
    (root / "setuid").write_bytes(b"x")
    os.chmod(root / "setuid", 0o4755)
    os.chmod(root / "empty", 0o1777)
    (root / "owned").write_text("someone else's")
    os.chown(root / "owned", 1234, 5678)
    os.chown(root / "dir/deep", 4321, 8765)
    for path, _, files in os.walk(root, topdown=False):
        for name in files + [""]:
            os.utime(os.path.join(path, name), (1_600_000_000, 1_500_000_000), follow_symlinks=False)
    return root


def xattrs(path):
    try:
        return {name: os.getxattr(path, name, follow_symlinks=False)
                for name in sorted(os.listxattr(path, follow_symlinks=False))}
    except OSError:
        return {}


def describe(path, st):
    """Everything a restore must bring back, for one file."""
    info = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "xattrs": xattrs(path)}
    if not stat.S_ISDIR(st.st_mode):
        info["mtime"] = int(st.st_mtime)
    if stat.S_ISREG(st.st_mode):
        info["size"] = st.st_size
        with open(path, "rb") as f:
            info["sha256"] = hashlib.sha256(f.read()).hexdigest()
        info["sparse"] = st.st_blocks * 512 < st.st_size
    elif stat.S_ISLNK(st.st_mode):
        info["target"] = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info["rdev"] = st.st_rdev
    return info


def snapshot(root):
    """{relative path (bytes): attributes} plus the hard-link groups, for comparison."""
    root = os.fsencode(root)
    files, inodes = {}, {}
    for path, dirs, names in os.walk(root):
        for name in dirs + names:
            full = os.path.join(path, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            files[rel] = describe(full, st)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(rel)
    files[b"."] = describe(root, os.lstat(root))
    files[b"."].pop("mtime", None)
    return files, sorted(sorted(group) for group in inodes.values())


def assert_same_tree(original, restored):
    expected, expected_links = snapshot(original)
    actual, actual_links = snapshot(restored)
    assert sorted(actual) == sorted(expected)
    for rel, info in expected.items():
        assert actual[rel] == info, rel
    assert actual_links == expected_links
