#!/usr/bin/env python3
"""rescue - bare-metal disaster recovery for Linux with duplicity.

A Python reimplementation of what Relax-and-Recover (ReaR) does with BACKUP=DUPLICITY, in one
stdlib-only module (Python 3.9+). It reads ReaR-compatible configuration (/etc/rescue or /etc/rear),
and shells out to the system's storage tools, gpg and duplicity through one runner.

Map of this file (sections in the order data flows; each uses only the sections above it):
  1. errors and log   RescueError, the Log that redacts every secret value, once
  2. config           a parser for the safe subset of bash that ReaR configs use -> Config;
                      the few $(…) they use (hostname, date, cat, uname, id) evaluated natively
  3. settings         every setting, typed and checked when the configuration is loaded
  4. tools            every external program, named once, with the package that provides it
  5. runner           the only code that starts processes
  6. run state        the Context a workflow gets, rescue's directories and files, the lock,
                      questions to the user, shared ssh connections
  7. layout model     dataclasses for disks, partitions, RAID, LUKS, LVM, filesystems, mounts,
                      boot, one table of facts per kind; versioned, deterministic layout.json
  8. capture          pure parsers of tool output -> the model; a Probe that runs the tools,
                      records their outputs or replays a recording
  9. recreate: the disks here and the mapping
                      which disk here takes the place of each disk of the layout (pure)
 10. recreate: the plan
                      layout + disks + mapping -> ordered Steps with exact commands (pure)
 11. duplicity and the backup target
                      where duplicity comes from; the target URLs; reaching the server
 12. backup: command lines
                      pure argv builders (selection, encryption, retention, backup, restore)
                      and readers of duplicity's output
 13. backup: chains and runs
                      rescue's own metadata record, parallel chains, the backup run
 14. restore          a tree of mountpoints restored from the chains
 15. status and verify
 16. finalize         make the restored system boot here: names rewritten, the LVM devices
                      file, SELinux labels, an initramfs per kernel, GRUB or the NVRAM entries
                      (TreeProbe reads the restored tree; the plan is pure)
 17. recreate: execute
                      the layout to start from, confirmation, passphrases, the journaled loop
                      over a plan's steps that resumes after a failure
 18. recover          the backup checked, recreate, restore, finalize, the report; resumes
 19. rescue media: manifest
                      what the rescue system holds and why: tools and their libraries, python3
                      and the stdlib rescue imports, kernel modules and firmware, rescue, the
                      layout, the configuration without secrets (pure data, printable)
 20. rescue media: packers
                      the staged tree and its self-test, the cpio newc writer, compression, the ISO
 21. cli              argparse; each workflow is a short function composing the above

Usage: rescue [-c CONFIG_DIR] [-C EXTRA_CONF]... [-v] [-d] [--non-interactive]
              [--expose-secrets] WORKFLOW [args]
"""

import argparse
import ast
import base64
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import difflib
import fcntl
import functools
import glob
import grp
import gzip
import hashlib
import heapq
import importlib.machinery
import importlib.util
import io
import json
import os
import pwd
import posixpath
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import typing
import urllib.parse
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Dict, FrozenSet, Iterator, List, NoReturn, Optional, Sequence, Set, TextIO, Tuple, Union

__version__ = "0.1.0"

HERE = Path(__file__).resolve().parent
DEFAULT_CONF = HERE / "conf" / "default.conf"


# =============================================================================================
# 1. errors and log
# =============================================================================================

class RescueError(Exception):
    """An expected failure: printed as `rescue: error: <message>` plus a hint, no traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(RescueError):
    """Bad configuration: nothing was done. Exit code 2, like a usage error."""

    exit_code = 2


class Terminated(BaseException):
    """SIGTERM (a service stop, `timeout`, shutdown): unwinds like Ctrl-C (no `except
    Exception` stops it), so that running commands are stopped and temporary files, keyring
    copies and ssh connections go."""


REDACTED = "***"


class Log:
    """Console messages and the log file. Every line passes through redact() first.

    Secrets are registered as soon as they are known (config values, secret environment
    variables given to the runner), so no later message can carry one.
    """

    def __init__(self, verbose: bool = False, debug: bool = False) -> None:
        self.verbose = verbose
        self.debug_enabled = debug
        self.secrets: Dict[str, str] = {}     # secret value -> what replaces it
        self.path: Optional[Path] = None
        self._file = None
        self._lock = threading.Lock()         # parallel duplicity runs log from several threads
        self._status = False                  # an updating progress line is on the terminal

    def add_secret(self, value: str, label: str = REDACTED) -> None:
        """Hide value in every message from now on; label replaces it (e.g. <GPG_KEY>)."""
        if value:
            self.secrets[value] = label

    def redact(self, text: str) -> str:
        # Longest first, so a secret that contains another is replaced whole.
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, self.secrets[secret])
        return text

    def open_file(self, path: Path) -> None:
        """Start a new log file (mode 0600), keeping the previous one as <path>.old."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            os.replace(path, str(path) + ".old")
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
        self.path = path

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None

    def _write(self, level: str, message: str) -> None:
        with self._lock:
            if self._file:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                for line in message.splitlines() or [""]:
                    self._file.write(f"{stamp} {level:5} {line}\n")
                self._file.flush()

    def status(self, text: str) -> None:
        """Replace the updating progress line on the terminal with text (not logged)."""
        with self._lock:
            sys.stdout.write("\r\033[K" + text)
            sys.stdout.flush()
            self._status = True

    def end_status(self) -> None:
        """Remove the progress line, so that the next message starts on a clean line."""
        with self._lock:
            if self._status:
                sys.stdout.write("\r\033[K")
                sys.stdout.flush()
                self._status = False

    def console(self, text: str, stream: Optional[TextIO] = None) -> None:
        """Print text (not logged; stdout unless stream), after removing the progress line."""
        self.end_status()
        print(text, file=stream or sys.stdout, flush=True)

    def say(self, message: str) -> None:
        """A message the user always sees (progress of a workflow)."""
        message = self.redact(message)
        self.console(message)
        self._write("INFO", message)

    def info(self, message: str) -> None:
        """Detail for the log; on the console only with -v."""
        message = self.redact(message)
        if self.verbose:
            self.console(message)
        self._write("INFO", message)

    def debug(self, message: str) -> None:
        message = self.redact(message)
        if self.debug_enabled:
            self.console(message, sys.stderr)
        self._write("DEBUG", message)

    def warn(self, message: str) -> None:
        message = self.redact(message)
        self.console(f"rescue: warning: {message}", sys.stderr)
        self._write("WARN", message)

    def error(self, message: str, hint: str = "") -> None:
        message, hint = self.redact(message), self.redact(hint)
        self.console(f"rescue: error: {message}", sys.stderr)
        if hint:
            self.console(f"rescue: hint: {hint}", sys.stderr)
        self._write("ERROR", message + (f"\nhint: {hint}" if hint else ""))


def human_size(size: Optional[float]) -> str:
    """Bytes for people, in binary units: 512 B, 1.5 KiB, 8 GiB, -3.2 MiB."""
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            break
        value /= 1024
    else:
        unit = "TiB"
    return f"{value:.0f} {unit}" if unit == "B" or value == int(value) else f"{value:.1f} {unit}"


# =============================================================================================
# 2. config
#
# ReaR's configuration files are bash. We parse the subset that assigns variables and refuse
# everything else with FILE:LINE, so nothing in a configuration is ever executed, and a value is
# never different from what bash would give: where we cannot be sure, we refuse. The few command
# substitutions real configurations use ($(hostname -s), $(date +%F), $(cat FILE), $(uname -r),
# $(id -u)) and ~ are evaluated here in Python, with bash's results; no command is ever run.
# =============================================================================================

Value = Union[str, List[str]]
SECRET_NAME_PARTS = ("PASSPHRASE", "PASSWORD", "SECRET")
# Names that contain a secret-looking word but hold a flag, a device name or (ReaR's
# SECRET_VARIABLES) the names of secrets, not a secret:
# redacting "true" or "null" everywhere would garble every log line.
NOT_SECRET_NAMES = frozenset({"BACKUP_DUPLICITY_ASK_PASSPHRASE", "SECRET_OUTPUT_DEV", "SECRET_VARIABLES",
                              "RESCUE_GPG_PASSPHRASE"})

# bash maintains these itself (or refuses to assign them); we cannot reproduce their values.
BASH_INTERNAL = frozenset({
    "BASH", "BASHOPTS", "BASHPID", "BASH_ARGC", "BASH_ARGV", "BASH_COMMAND", "BASH_LINENO",
    "BASH_SOURCE", "BASH_SUBSHELL", "BASH_VERSINFO", "BASH_VERSION", "COLUMNS", "DIRSTACK",
    "FUNCNAME", "GROUPS", "HISTCMD", "HOSTTYPE", "IFS", "LINENO", "LINES", "MACHTYPE", "OLDPWD",
    "OPTARG", "OPTIND", "OSTYPE", "PIPESTATUS", "PPID", "RANDOM", "SECONDS", "SHELLOPTS", "SHLVL",
    "SRANDOM", "EPOCHSECONDS", "EPOCHREALTIME", "BASH_REMATCH", "BASH_EXECUTION_STRING", "UID",
    "EUID", "PWD",
})

SHELL_KEYWORDS = {
    "if": "if statement", "then": "if statement", "else": "if statement", "elif": "if statement",
    "fi": "if statement", "for": "for loop", "while": "while loop", "until": "until loop",
    "do": "loop", "done": "loop", "case": "case statement", "esac": "case statement",
    "function": "function definition", "select": "select loop", "[[": "test [[ … ]]",
    "[": "test [ … ]", "test": "test command", "source": "source", ".": "source (.)",
    "declare": "declare", "typeset": "typeset", "local": "local", "readonly": "readonly",
    "unset": "unset", "eval": "eval", "exec": "exec", "set": "set", "shopt": "shopt",
    "alias": "alias", "!": "negation !", "time": "time", "coproc": "coproc",
}
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_REDIRECT_RE = re.compile(r"2>>?/dev/(\$SECRET_OUTPUT_DEV|\$\{SECRET_OUTPUT_DEV\}|null)")


SUBSTITUTION_HINT = ("rescue runs no command from its configuration; it evaluates only $(hostname), $(date), "
                     "$(cat FILE), $(uname) and $(id) itself: write the value literally")


def _unsupported_hint(construct: str) -> str:
    if "command substitution" in construct:
        return SUBSTITUTION_HINT
    if construct.startswith("arithmetic"):
        return "rescue never runs commands from its configuration; write the value literally"
    if construct.startswith("source"):
        return "load more files with -C FILE instead"
    if construct.startswith("glob") or construct.startswith("brace expansion"):
        return "bash would expand it to file names; quote it"
    if construct.startswith("tilde"):
        return "a configuration file has no directory stack; write the path"
    if construct.startswith("expansion"):
        return "use $VAR, ${VAR}, ${VAR:-default}, ${ARR[@]} or ${ARR[*]}"
    return "only VAR=value, VAR+=value, VAR=( … ), export VAR=… and { VAR=… ; } 2>>/dev/$SECRET_OUTPUT_DEV are allowed"


class Unsupported(Exception):
    """Internal: raised by the parser, turned into a ConfigError with FILE:LINE."""

    def __init__(self, construct: str, line: int, hint: str = "") -> None:
        super().__init__(construct)
        self.construct = construct
        self.line = line
        self.hint = hint or _unsupported_hint(construct)


class SubstitutionFailed(Unsupported):
    """Internal: a supported command substitution that cannot give its value here (a missing
    file, a name that does not resolve). bash would go on with an empty value; we stop."""


# A word is a list of parts; expansion turns parts into segments (text, quoted, splittable).
@dataclass
class Lit:
    text: str
    quoted: bool


@dataclass
class Var:
    name: str
    quoted: bool
    op: str = ""                      # "", ":-", "-", ":+", "+"
    arg: Optional[list] = None        # the word after op, as parts
    index: Optional[str] = None       # None, "@", "*" or a decimal index
    # Inside the same "…" as a "${ARR[@]}": bash drops this part's empty result when the array
    # is empty ("$E${A[@]}" is no word at all, while "$E" alone is one empty word).
    beside_at: bool = False


@dataclass
class Tilde:
    """~ or ~user where bash expands it: a home directory, never split or globbed."""
    user: str


@dataclass
class CommandSub:
    """$( … ) or `…` running one of SUBSTITUTIONS, which ShellState evaluates (nothing is run)."""
    name: str
    args: List[list]                  # the words after the command name, as parts
    quoted: bool
    line: int
    beside_at: bool = False           # as Var.beside_at


@dataclass
class Assignment:
    name: str
    append: bool
    array: Optional[List[list]]       # list of words, for NAME=( … )
    word: Optional[list]              # parts, for NAME=value
    line: int
    secret: bool = False


class ShellParser:
    """Parse one file of the bash subset into a list of Assignments (never executes anything)."""

    METACHARS = " \t\n;&|<>()"

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1

    # -- low-level scanning -------------------------------------------------------------------

    def peek(self, n: int = 0) -> str:
        j = self.i + n
        return self.s[j] if j < len(self.s) else ""

    def advance(self, n: int = 1) -> str:
        chunk = self.s[self.i:self.i + n]
        self.line += chunk.count("\n")
        self.i += n
        return chunk

    def startswith(self, prefix: str) -> bool:
        return self.s.startswith(prefix, self.i)

    def fail(self, construct: str, hint: str = "") -> "Unsupported":
        return Unsupported(construct, self.line, hint)

    def skip_blanks(self) -> None:
        """Spaces, tabs and backslash-newline continuations (not newlines)."""
        while True:
            c = self.peek()
            if c in (" ", "\t"):
                self.advance()
            elif c == "\\" and self.peek(1) == "\n":
                self.advance(2)
            else:
                return

    def skip_comment(self) -> None:
        while self.peek() not in ("", "\n"):
            self.advance()

    # -- statements ---------------------------------------------------------------------------

    def parse(self) -> List[Assignment]:
        out: List[Assignment] = []
        while True:
            self.skip_blanks()
            c = self.peek()
            if c == "":
                return out
            if c == "#":
                self.skip_comment()
            elif c in ("\n", ";"):
                if c == ";" and self.peek(1) == ";":
                    raise self.fail("case terminator ;;")
                self.advance()
            elif c == "{" and self.peek(1) in (" ", "\t", "\n"):
                out.extend(self.parse_group())
            else:
                out.extend(self.parse_simple_statement())

    def parse_group(self) -> List[Assignment]:
        """`{ VAR=… ; } 2>>/dev/$SECRET_OUTPUT_DEV` — ReaR's way to keep a value out of logs."""
        start = self.line
        self.advance()
        inner: List[Assignment] = []
        while True:
            self.skip_blanks()
            c = self.peek()
            if c == "":
                raise Unsupported("unterminated { … } group", start, "close it with '; }'")
            if c == "#":
                self.skip_comment()
            elif c in ("\n", ";"):
                self.advance()
            elif c == "}" and self.peek(1) in ("", " ", "\t", "\n", ";"):
                if not self._after_separator():
                    raise self.fail("'}' without a preceding ';' or newline", "write { VAR=value ; }")
                self.advance()
                break
            else:
                inner.extend(self.parse_simple_statement(in_group=True))
        self.skip_blanks()
        secret = False
        match = SECRET_REDIRECT_RE.match(self.s, self.i)
        if match:
            self.advance(match.end() - self.i)
            secret = True
        for assignment in inner:
            assignment.secret = assignment.secret or secret
        self.expect_statement_end()
        return inner

    def _after_separator(self) -> bool:
        j = self.i - 1
        while j >= 0 and self.s[j] in " \t":
            j -= 1
        return j >= 0 and self.s[j] in ";\n"

    def expect_statement_end(self) -> None:
        self.skip_blanks()
        c = self.peek()
        if c == "#":
            self.skip_comment()
        elif c not in ("", "\n", ";") and not (c == "}" and self._after_separator()):
            raise self.fail(self.describe_operator())

    def describe_operator(self) -> str:
        for op, name in (("&&", "&& list"), ("||", "|| list"), ("|", "pipeline |"),
                         ("&", "background &"), ("<(", "process substitution"),
                         (">(", "process substitution"), ("<<", "here-document"),
                         (">", "redirection >"), ("<", "redirection <"), ("(", "subshell ( … )"),
                         (")", "unexpected )")):
            if self.startswith(op):
                return name
        return f"unexpected text {self.s[self.i:self.i + 20].splitlines()[0]!r}"

    def parse_simple_statement(self, in_group: bool = False) -> List[Assignment]:
        """Assignments, optionally after `export`; anything that would run a command is refused."""
        out: List[Assignment] = []
        exporting = False
        while True:
            self.skip_blanks()
            c = self.peek()
            if c in ("", "\n", ";", "#") or (in_group and c == "}" and self._after_separator()):
                return out
            if in_group and c == "}" and self.peek(1) in ("", " ", "\t", "\n"):
                raise self.fail("'}' without a preceding ';' or newline", "write { VAR=value ; }")
            if c in "&|<>()":
                if c == "(" and not out and not exporting:
                    raise self.fail("subshell ( … )")
                if c == "(" and self.s[self.i - 1:self.i] in (")",):
                    raise self.fail("function definition")
                raise self.fail(self.describe_operator())
            match = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\+?=)").match(self.s, self.i)
            if match:
                out.append(self.parse_assignment(match))
                continue
            if match is None and self.startswith("export") and self.peek(6) in (" ", "\t") and not out:
                self.advance(6)
                exporting = True
                self.skip_blanks()
                if self.peek() == "-":
                    raise self.fail("export with options")
                continue
            word_line = self.line
            raw = self.raw_word()
            if exporting and NAME_RE.fullmatch(raw):
                continue    # `export NAME`: the value does not change
            raise Unsupported(self.describe_command(raw), word_line)

    def raw_word(self) -> str:
        start = self.i
        while self.peek() and self.peek() not in self.METACHARS:
            c = self.peek()
            if c == "\\":
                self.advance(2)
            elif c in ("'", '"'):
                quote = self.advance()
                while self.peek() and self.peek() != quote:
                    self.advance(2 if self.peek() == "\\" and quote == '"' else 1)
                self.advance()
            else:
                self.advance()
        return self.s[start:self.i]

    def describe_command(self, raw: str) -> str:
        if raw in SHELL_KEYWORDS:
            return SHELL_KEYWORDS[raw]
        if self.peek() == "(" and self.peek(1) == ")":
            return "function definition"
        if "$(" in raw or "`" in raw:
            return "command substitution"
        if re.match(r"[A-Za-z_][A-Za-z0-9_]*\[", raw):
            return "array element assignment NAME[i]=…"
        return f"command {raw!r}"

    def parse_assignment(self, match: "re.Match") -> Assignment:
        name, op = match.group(1), match.group(2)
        line = self.line
        self.advance(match.end() - self.i)
        if name in BASH_INTERNAL:
            raise Unsupported(f"assignment to bash variable {name}", line,
                              f"{name} is maintained by bash itself")
        if self.peek() == "(":
            self.advance()
            return Assignment(name, op == "+=", self.parse_array_words(), None, line)
        return Assignment(name, op == "+=", None, self.parse_word(assignment=True), line)

    def parse_array_words(self) -> List[list]:
        start_line = self.line
        words: List[list] = []
        while True:
            c = self.peek()
            if c in (" ", "\t", "\n"):
                self.advance()
            elif c == "\\" and self.peek(1) == "\n":
                self.advance(2)
            elif c == "#":
                self.skip_comment()
            elif c == ")":
                self.advance()
                return words
            elif c == "":
                raise Unsupported("unterminated array ( … )", start_line, "close it with ')'")
            elif c in ";&|<>(":
                raise self.fail(self.describe_operator() if c != ";" else "';' inside an array")
            else:
                words.append(self.parse_word(assignment=False))

    # -- words --------------------------------------------------------------------------------

    def parse_word(self, assignment: bool, stop: str = "", in_dquotes: bool = False) -> list:
        """Parse one word (quotes, escapes, expansions) into parts.

        assignment: the value of NAME=… (tilde after ':' expands there; no globbing or splitting).
        A word starts with ~ only where bash expands it (at the start, after ':' in an assignment).
        stop: "}" for the word inside ${VAR:-word}; there, shell metacharacters are literal.
        in_dquotes: that inner word sits inside "…", where bash's quote handling is murky: refused.
        """
        parts: list = []
        at_start = True
        while True:
            c = self.peek()
            if c == "" or (c == stop if stop else c in self.METACHARS):
                return parts
            if in_dquotes and c in ("'", '"', "\\"):
                raise self.fail('quotes or backslashes inside "${VAR:-…}"',
                                "bash treats them inconsistently there; use a plain default")
            if stop and c == "{":
                raise self.fail("brace inside ${VAR:-…}", "use a plain default")
            if c == "\\":
                self.advance()
                if self.peek() == "\n":
                    self.advance()
                elif self.peek():
                    parts.append(Lit(self.advance(), True))
            elif c == "'":
                parts.append(Lit(self.single_quoted(), True))
            elif c == '"':
                parts.extend(self.double_quoted())
            elif c == "$":
                parts.append(self.dollar(quoted=in_dquotes, assignment=assignment))
            elif c == "`":
                parts.append(self.backticks(quoted=in_dquotes))
            elif c == "~" and not in_dquotes and (
                    at_start or (assignment and self._prev_unquoted_colon(parts))):
                parts.append(self.tilde(stop, assignment))
            else:
                parts.append(Lit(self.advance(), in_dquotes))
            at_start = False

    def tilde(self, stop: str, assignment: bool) -> Union[Tilde, Lit]:
        """~, ~/…, ~user: bash's tilde-prefix runs to an unquoted '/' or ':' or the end of the word
        (inside ${VAR:-…}, blanks too); with quotes, a backslash or an expansion inside it bash
        leaves the ~ as it is."""
        self.advance()
        ends = "/:" + stop if stop else self.METACHARS + "/:"
        prefix = re.compile(r"[^%s]*" % re.escape(ends)).match(self.s, self.i).group(0)
        if re.fullmatch(r"[+-]?[0-9]*", prefix) and prefix:
            raise self.fail(f"tilde expansion ~{prefix}")
        if not re.fullmatch(r"[A-Za-z0-9._-]*", prefix):
            return Lit("~", False)
        self.advance(len(prefix))
        if self.peek() == ":" and not assignment:
            # bash then takes the rest of an array element or argument literally ($V unexpanded).
            raise self.fail(f"tilde expansion ~{prefix}: outside an assignment", 'write "$HOME:…" instead')
        return Tilde(prefix)

    @staticmethod
    def _prev_unquoted_colon(parts: list) -> bool:
        last = parts[-1] if parts else None
        return isinstance(last, Lit) and not last.quoted and last.text.endswith(":")

    def single_quoted(self) -> str:
        start_line = self.line
        self.advance()
        end = self.s.find("'", self.i)
        if end < 0:
            raise Unsupported("unterminated single quote", start_line, "add the closing '")
        return self.advance(end - self.i + 1)[:-1]

    def double_quoted(self) -> list:
        start_line = self.line
        self.advance()
        parts: list = []
        while True:
            c = self.peek()
            if c == "":
                raise Unsupported("unterminated double quote", start_line, 'add the closing "')
            if c == '"':
                self.advance()
                # "" is an empty word of its own; "${EMPTY_ARRAY[@]}" is no word at all.
                if any(isinstance(p, Var) and p.index == "@" for p in parts):
                    for p in parts:
                        if isinstance(p, CommandSub) or (isinstance(p, Var) and p.index != "@"):
                            p.beside_at = True
                return parts or [Lit("", True)]
            if c == "\\":
                nxt = self.peek(1)
                if nxt == "\n":
                    self.advance(2)
                elif nxt in ('"', "\\", "$", "`"):
                    self.advance()
                    parts.append(Lit(self.advance(), True))
                else:
                    parts.append(Lit(self.advance(), True))
            elif c == "$":
                parts.append(self.dollar(quoted=True))
            elif c == "`":
                parts.append(self.backticks(quoted=True))
            else:
                parts.append(Lit(self.advance(), True))

    def dollar(self, quoted: bool, assignment: bool = False):
        nxt = self.peek(1)
        if nxt == "(":
            if self.peek(2) == "(":
                raise self.fail("arithmetic $(( … ))")
            line = self.line
            self.advance(2)
            return self.command(self.command_words(")", line), quoted, line)
        if nxt == "[":
            raise self.fail("arithmetic $[ … ]")
        if nxt == "{":
            return self.braced(quoted, assignment)
        if nxt and NAME_RE.match(nxt):
            self.advance()
            name = NAME_RE.match(self.s, self.i).group(0)
            self.advance(len(name))
            return Var(name, quoted)
        if nxt and (nxt.isdigit() or nxt in "@*#?$!-"):
            raise self.fail(f"special parameter ${nxt}", "positional and special parameters do not exist in a configuration file")
        if nxt == "'" and not quoted:
            raise self.fail("ANSI-C quoting $'…'", "use ordinary quotes")
        if nxt == '"' and not quoted:
            raise self.fail('locale quoting $"…"', "use ordinary quotes")
        self.advance()
        return Lit("$", quoted)

    def braced(self, quoted: bool, assignment: bool) -> Var:
        start_line = self.line
        self.advance(2)
        match = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[(@|\*|[0-9]+)\])?").match(self.s, self.i)
        if not match:
            raise self.fail(f"expansion ${{{self.s[self.i:self.i + 12].split('}')[0]}}}")
        name, index = match.group(1), match.group(2)
        self.advance(match.end() - self.i)
        if self.peek() == "}":
            self.advance()
            return Var(name, quoted, index=index)
        op = next((o for o in (":-", ":+", "-", "+") if self.startswith(o)), "")
        if not op or index in ("@", "*"):
            rest = self.s[self.i:self.i + 12].split("}")[0]
            raise self.fail(f"expansion ${{{name}{'[' + index + ']' if index else ''}{rest}…}}")
        self.advance(len(op))
        arg = self.parse_word(assignment=assignment and not quoted, stop="}", in_dquotes=quoted)
        if self.peek() != "}":
            raise Unsupported(f"unterminated ${{{name}{op}…", start_line, "add the closing }")
        self.advance()
        return Var(name, quoted, op, arg, index)

    # -- command substitutions ----------------------------------------------------------------

    def backticks(self, quoted: bool) -> CommandSub:
        line = self.line
        self.advance()
        end = self.s.find("`", self.i)
        if end < 0:
            raise self.fail("unterminated command substitution `…`", "add the closing `")
        body = self.advance(end - self.i + 1)[:-1]
        if "\\" in body:
            raise Unsupported("backslash inside a command substitution `…`", line, "write $( … ) instead")
        inner = ShellParser(body)
        inner.line = line
        return inner.command(inner.command_words("", line), quoted, line)

    def command_words(self, close: str, line: int) -> List[list]:
        """The words of the one simple command in $( … ) (close ")") or in a `…` body (close "")."""
        words: List[list] = []
        ended = False                 # a newline or ';' after the command: only blanks may follow
        while True:
            self.skip_blanks()
            c = self.peek()
            if c == close:
                self.advance(len(close))
                return words
            if c == "":
                raise Unsupported("unterminated command substitution $( … )", line, "add the closing )")
            if c == ";" and not words:
                raise self.fail("';' before the command in a command substitution")
            if c in ("\n", ";"):
                self.advance()
                ended = ended or bool(words)
            elif c == "#":
                self.skip_comment()
            elif c == "<" and not words and self.peek(1) != "<":
                self.advance()
                self.skip_blanks()
                words = [[Lit("cat", False)], self.parse_word(assignment=False)]
                if not words[1]:
                    raise self.fail("redirection < without a file in a command substitution")
                ended = True          # $(< FILE) is bash's own cat FILE
            elif c in "&|<>()" or ended:
                what = "more than one command" if ended else self.describe_operator()
                raise self.fail(f"{what} in a command substitution")
            else:
                words.append(self.parse_word(assignment=False))

    def command(self, words: List[list], quoted: bool, line: int) -> CommandSub:
        if not words:
            raise Unsupported("empty command substitution", line, "write the value literally")
        if not all(isinstance(p, Lit) for p in words[0]):
            raise Unsupported("command substitution with an expansion as the command", line)
        name = "".join(p.text for p in words[0])
        if re.match(r"[A-Za-z_][A-Za-z0-9_]*\+?=", name):
            raise Unsupported("assignment inside a command substitution", line)
        if name not in SUBSTITUTIONS:
            shown = name if len(name) <= 40 else name[:40] + "…"
            raise Unsupported(f"command substitution $({shown} …)", line)
        for word in words[1:]:
            # bash expands ~ after the '=' of an argument such as a=~/x; we do not: refuse.
            for n, part in enumerate(word):
                if isinstance(part, Lit) and part.text == "~" and not part.quoted and any(
                        isinstance(p, Lit) and p.text == "=" and not p.quoted for p in word[:n]):
                    raise Unsupported(f"tilde after '=' in an argument of {name}", line, 'write "$HOME" instead of ~')
        return CommandSub(name, words[1:], quoted, line)


BREAK = None          # a field boundary, from "${ARR[@]}"
IFS_WHITESPACE = " \t\n"
GLOB_CHARS = "*?["


def hostname() -> str:
    """$HOSTNAME as bash sets it: from the environment, else the kernel's host name."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


# -- the command substitutions rescue evaluates itself ----------------------------------------
# Each takes the command's arguments (expanded as bash would) and the shell variables, and
# returns what the command prints; SubstitutionFailed where the command would fail. Options we
# do not know are refused: the value would not be bash's.

def refuse_option(command: str, arg: str, hint: str) -> Unsupported:
    shown = arg if len(arg) <= 30 else arg[:30] + "…"
    return Unsupported(f"command substitution $({command} {shown})", 0, hint)


def substitute_hostname(args: List[str], variables: Dict[str, Value]) -> str:
    """hostname(1) as it prints: the kernel's name, -s up to the first dot, -f resolved."""
    name = socket.gethostname()
    if not args:
        return name + "\n"
    if args in (["-s"], ["--short"]):
        return name.split(".")[0] + "\n"
    if args in (["-f"], ["--fqdn"], ["--long"]):
        try:
            return socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)[0][3] + "\n"
        except (OSError, IndexError) as exc:
            raise SubstitutionFailed(f"$(hostname -f): the host name {name} does not resolve ({exc})", 0,
                                     "add it to /etc/hosts, or write the full name literally") from None
    raise refuse_option("hostname", " ".join(args), "rescue evaluates hostname, hostname -s and hostname -f")


DATE_ISO_8601 = {"date": "%Y-%m-%d", "hours": "%Y-%m-%dT%H%:z", "minutes": "%Y-%m-%dT%H:%M%:z",
                 "seconds": "%Y-%m-%dT%H:%M:%S%:z", "ns": "%Y-%m-%dT%H:%M:%S,%N%:z"}
DATE_RFC_3339 = {"date": "%Y-%m-%d", "seconds": "%Y-%m-%d %H:%M:%S%:z", "ns": "%Y-%m-%d %H:%M:%S.%N%:z"}
DATE_RFC_EMAIL = "%a, %d %b %Y %H:%M:%S %z"
DATE_DEFAULT = "%a %b %e %H:%M:%S %Z %Y"
# The conversions (and flags -_0^#) that C's strftime prints as date(1) does; %s %N %z %:z %Z
# and %% are done here, because strftime gets them wrong for -u or does not know them.
STRFTIME_SHARED = frozenset("aAbBcCdDeFgGhHIjklmMnpPrRStTuUVwWxXyY")
DATE_CONVERSION_RE = re.compile(r"%([-_0^#]?)([0-9]*)(:?.?)", re.S)
DATE_HINT = ("rescue evaluates date [-u] [+FORMAT | -I[TIMESPEC] | -R | --rfc-3339=TIMESPEC] with "
             "the conversions %Y %m %d %H %M %S %F %T %s %N %z %Z and the other strftime letters")


def substitute_date(args: List[str], variables: Dict[str, Value]) -> str:
    """date(1) in the C locale that ReaR reads its configuration in: now, local or -u."""
    utc, form = False, None
    for arg in args:
        if arg in ("-u", "--utc", "--universal"):
            utc = True
            continue
        chosen = date_option_format(arg)
        if chosen is None or form is not None:
            raise refuse_option("date", arg, DATE_HINT)
        form = chosen
    if not utc and variables.get("TZ") != os.environ.get("TZ"):
        raise Unsupported("$(date) with a TZ of its own", 0,
                          "set TZ in the environment rescue runs in, or use date -u")
    seconds, nanoseconds = divmod(time.time_ns(), 10 ** 9)
    moment = time.gmtime(seconds) if utc else time.localtime(seconds)
    return format_date(DATE_DEFAULT if form is None else form, moment, seconds, nanoseconds, utc) + "\n"


def date_option_format(arg: str) -> Optional[str]:
    """The format an output option of date(1) stands for (a TIMESPEC may be abbreviated)."""
    if arg.startswith("+"):
        return arg[1:]
    if arg in ("-R", "--rfc-email", "--rfc-2822", "--rfc-822"):
        return DATE_RFC_EMAIL
    match = re.fullmatch(r"-I(.*)|--iso-8601(?:=(.+))?|--rfc-3339=(.+)", arg)
    if not match:
        return None
    table = DATE_RFC_3339 if match.group(3) else DATE_ISO_8601
    spec = match.group(3) or match.group(1) or match.group(2) or "date"
    names = [name for name in table if name.startswith(spec)]
    return table[names[0]] if len(names) == 1 else None


def format_date(form: str, moment: time.struct_time, seconds: int, nanoseconds: int, utc: bool) -> str:
    offset = 0 if utc else moment.tm_gmtoff
    sign, minutes = "-" if offset < 0 else "+", abs(offset) // 60
    native = {"%": "%", "s": str(seconds), "z": "%s%02d%02d" % (sign, minutes // 60, minutes % 60),
              ":z": "%s%02d:%02d" % (sign, minutes // 60, minutes % 60),
              "Z": "UTC" if utc else time.strftime("%Z", moment)}

    def convert(match: "re.Match") -> str:
        flag, width, letter = match.groups()
        if letter == "N" and not flag and width in ("", "1", "2", "3", "4", "5", "6", "7", "8", "9"):
            return ("%09d" % nanoseconds)[:int(width or 9)]
        if letter == "Z" and not width:
            return {"^": str.upper, "#": str.lower}.get(flag, str)(native["Z"])
        if letter in native and not flag and not width:
            return native[letter]
        if letter in STRFTIME_SHARED and not width:
            return time.strftime("%" + flag + letter, moment)
        raise refuse_option("date", "+" + form, f"rescue does not evaluate {match.group(0)!r}; " + DATE_HINT)

    return DATE_CONVERSION_RE.sub(convert, form)


CAT_LIMIT = 1 << 20


def substitute_cat(args: List[str], variables: Dict[str, Value]) -> str:
    """cat FILE…: the files read (regular text files only), as $(cat FILE) gives them."""
    if not args:
        raise refuse_option("cat", "", "give cat a file")
    out: List[str] = []
    for name in args:
        if name.startswith("-"):
            raise refuse_option("cat", name, "rescue evaluates cat FILE… without options")
        out.append(read_substituted_file(name))
    return "".join(out)


def read_substituted_file(name: str) -> str:
    def failed(why: str) -> SubstitutionFailed:
        return SubstitutionFailed(f"$(cat {name}): {why}", 0, "create the file, or write the value literally")

    try:
        # O_NONBLOCK: a FIFO must not hang the load (it is refused below, as every non-file is).
        with os.fdopen(os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY), "rb") as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise failed("not a regular file")
            data = stream.read(CAT_LIMIT + 1)
    except OSError as exc:
        raise failed(f"cannot read {name}: {exc.strerror}") from None
    if len(data) > CAT_LIMIT or b"\0" in data:
        raise failed("not a short text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise failed("not UTF-8 text") from None


UNAME_FIELDS = (("s", "--kernel-name", "sysname"), ("n", "--nodename", "nodename"),
                ("r", "--kernel-release", "release"), ("v", "--kernel-version", "version"),
                ("m", "--machine", "machine"))


def substitute_uname(args: List[str], variables: Dict[str, Value]) -> str:
    """uname -s -n -r -v -m (in uname's order); -a, -p, -i and -o differ between distributions."""
    chosen: Set[str] = set()
    long_names = {long: short for short, long, _ in UNAME_FIELDS}
    for arg in args:
        if arg in long_names:
            chosen.add(long_names[arg])
        elif re.fullmatch(r"-[snrvm]+", arg):
            chosen.update(arg[1:])
        else:
            raise refuse_option("uname", arg, "rescue evaluates uname -s, -n, -r, -v and -m")
    info = os.uname()
    return " ".join(getattr(info, attr) for short, _, attr in UNAME_FIELDS if short in (chosen or {"s"})) + "\n"


def substitute_id(args: List[str], variables: Dict[str, Value]) -> str:
    """id -u / -g, with -n for the name and -r for the real id, of rescue or of a named user."""
    flags, users = "", []
    for arg in args:
        if re.fullmatch(r"-[ugnr]+", arg):
            flags += arg[1:]
        elif arg in ("--user", "--group", "--name", "--real"):
            flags += arg[2]
        elif not arg.startswith("-") and not users:
            users.append(arg)
        else:
            raise refuse_option("id", arg, "rescue evaluates id -u, -un, -g and -gn [USER]")
    if ("u" in flags) == ("g" in flags):
        raise refuse_option("id", " ".join(args), "rescue evaluates id -u, -un, -g and -gn [USER]")
    user = "u" in flags
    try:
        if users:
            entry = pwd.getpwnam(users[0])
            number = entry.pw_uid if user else entry.pw_gid
        elif "r" in flags:
            number = os.getuid() if user else os.getgid()
        else:
            number = os.geteuid() if user else os.getegid()
        if "n" not in flags:
            return f"{number}\n"
        return (pwd.getpwuid(number).pw_name if user else grp.getgrgid(number).gr_name) + "\n"
    except KeyError:
        raise SubstitutionFailed(f"$(id {' '.join(args)}): no such user or group here", 0,
                                 "write the value literally") from None


SUBSTITUTIONS: Dict[str, Callable[[List[str], Dict[str, Value]], str]] = {
    "hostname": substitute_hostname, "date": substitute_date, "cat": substitute_cat,
    "uname": substitute_uname, "id": substitute_id,
}


class ShellState:
    """Variables as bash would see them: the environment, HOSTNAME, then the config files."""

    def __init__(self, environ: Dict[str, str]) -> None:
        self.vars: Dict[str, Value] = {k: v for k, v in environ.items() if NAME_RE.fullmatch(k)}
        self.vars.setdefault("HOSTNAME", hostname())

    def lookup(self, name: str, line: int) -> Optional[Value]:
        if name == "UID":
            return str(os.getuid())
        if name == "EUID":
            return str(os.geteuid())
        if name in BASH_INTERNAL:
            raise Unsupported(f"bash variable ${name}", line, f"{name} is maintained by bash itself")
        return self.vars.get(name)

    def assign(self, a: Assignment) -> None:
        old = self.vars.get(a.name)
        if a.array is not None:
            items: List[str] = []
            for word in a.array:
                items.extend(self.expand_fields(word, a.line))
            base = [] if old is None else ([old] if isinstance(old, str) else list(old))
            self.vars[a.name] = base + items if a.append else items
            return
        value = self.expand_scalar(a.word or [], a.line)
        if isinstance(old, list):
            # bash: a scalar assignment to an array sets element 0 and keeps the rest.
            first = (old[0] if old else "") + value if a.append else value
            self.vars[a.name] = [first] + old[1:]
        else:
            self.vars[a.name] = (old or "") + value if a.append else value

    # -- expansion ----------------------------------------------------------------------------

    def expand_scalar(self, parts: list, line: int) -> str:
        return "".join(seg[0] for seg in self.segments(parts, line, fields=False) if seg is not BREAK)

    def expand_fields(self, parts: list, line: int) -> List[str]:
        """One array element word -> its fields, with bash's word splitting and null removal."""
        segments = self.segments(parts, line, fields=True)
        self.refuse_globs(parts, segments, line)
        fields: List[str] = []
        current: List[str] = []
        keep = False               # a quoted part makes a field even when it is empty

        def finish() -> None:
            nonlocal current, keep
            if current or keep:
                fields.append("".join(current))
            current, keep = [], False

        for seg in segments:
            if seg is BREAK:
                finish()
                continue
            text, quoted, splittable = seg
            keep = keep or quoted
            if not splittable:
                current.append(text)
                continue
            for ch in text:
                if ch in IFS_WHITESPACE:
                    finish()
                else:
                    current.append(ch)
        finish()
        return fields

    @staticmethod
    def refuse_globs(parts: list, segments: list, line: int) -> None:
        literal = "".join(p.text for p in parts if isinstance(p, Lit) and not p.quoted)
        if any(c in literal for c in GLOB_CHARS):
            raise Unsupported(f"glob pattern {literal!r}", line)
        if "{" in literal and "}" in literal[literal.index("{"):]:
            raise Unsupported(f"brace expansion {literal!r}", line)
        for seg in segments:
            if seg is not BREAK and seg[2] and any(c in seg[0] for c in GLOB_CHARS):
                raise Unsupported(f"glob characters in an unquoted expansion ({seg[0]!r})", line,
                                  "bash would expand them to file names; put the expansion in double quotes")

    def segments(self, parts: list, line: int, fields: bool) -> list:
        out: list = []
        for part in parts:
            if isinstance(part, Lit):
                out.append((part.text, part.quoted, False))
            elif isinstance(part, Tilde):
                out.append(self.home(part.user))
            elif isinstance(part, CommandSub):
                out.extend(self.substitute(part, fields))
            else:
                out.extend(self.expand_var(part, line, fields))
        return out

    def home(self, user: str) -> tuple:
        """~ is $HOME (the passwd entry when HOME is unset); ~user stays as written when no such user."""
        if not user:
            home = self.vars.get("HOME")
            if home is None:
                return (pwd.getpwuid(os.getuid()).pw_dir, True, False)
            return (self.element(home, None) or "", True, False)
        try:
            return (pwd.getpwnam(user).pw_dir, True, False)
        except KeyError:
            return ("~" + user, False, False)

    def substitute(self, sub: CommandSub, fields: bool) -> list:
        """What bash's $( … ) gives: the output without its trailing newlines, split when unquoted."""
        args = [arg for word in sub.args for arg in self.expand_fields(word, sub.line)]
        try:
            text = SUBSTITUTIONS[sub.name](args, self.vars).rstrip("\n")
        except Unsupported as exc:
            raise type(exc)(exc.construct, sub.line, exc.hint) from None
        if fields and not sub.quoted and any(c in text for c in GLOB_CHARS):
            raise Unsupported(f"glob characters in the output of $({sub.name} …)", sub.line,
                              "bash would expand them to file names; put it in double quotes")
        if sub.beside_at and not text:
            return []
        return [(text, sub.quoted and not sub.beside_at, not sub.quoted)]

    def expand_var(self, var: Var, line: int, fields: bool) -> list:
        value = self.lookup(var.name, line)
        if var.index in ("@", "*"):
            items = [] if value is None else ([value] if isinstance(value, str) else value)
            if fields and not (var.quoted and var.index == "*"):
                out: list = []
                for n, item in enumerate(items):
                    if n:
                        out.append(BREAK)
                    out.append((item, var.quoted, not var.quoted))
                return out
            if var.quoted and not items and (var.index == "@" or var.beside_at):
                return []
            return [(" ".join(items), var.quoted, not var.quoted)]
        quoted_null = [("", True, False)] if var.quoted and not var.beside_at else []
        scalar = self.element(value, var.index)
        if var.op:
            use_arg = {":-": not scalar, "-": scalar is None,
                       ":+": bool(scalar), "+": scalar is not None}[var.op]
            if use_arg:
                segs = self.segments(var.arg or [], line, fields)
                # An unquoted ${X:-a b} is split like any other unquoted expansion.
                return quoted_null + [s if s is BREAK else (s[0], s[1], s[2] or not (var.quoted or s[1]))
                                      for s in segs]
            if var.op in (":+", "+"):
                scalar = None
        if not scalar:
            return quoted_null
        return [(scalar, var.quoted and not var.beside_at, not var.quoted)]

    @staticmethod
    def element(value: Optional[Value], index: Optional[str]) -> Optional[str]:
        n = int(index) if index else 0
        if isinstance(value, list):
            return value[n] if n < len(value) else None
        if value is None or n:
            return None
        return value


def is_secret_name(name: str) -> bool:
    return name not in NOT_SECRET_NAMES and any(p in name for p in SECRET_NAME_PARTS)


TRUE_WORDS = frozenset({"1", "y", "yes", "true", "on"})


@dataclass
class Config:
    """The effective configuration: values assigned by the config files, and which are secret."""

    values: Dict[str, Value]
    secret_names: Set[str]
    files: List[Path]
    origin: Dict[str, Tuple[Path, int]] = field(default_factory=dict)
    typed: Dict[str, object] = field(default_factory=dict)     # every setting, checked (settings)

    def setting(self, name: str):
        """A setting's typed value, checked when the configuration was loaded."""
        return self.typed[name]

    def get(self, name: str, default: str = "") -> str:
        value = self.values.get(name)
        if isinstance(value, list):
            return value[0] if value else default
        return default if value is None else value

    def get_list(self, name: str) -> List[str]:
        value = self.values.get(name)
        if isinstance(value, list):
            return list(value)
        return [value] if value else []

    def is_true(self, name: str) -> bool:
        """ReaR's is_true: 1, y, yes, true, on (any case)."""
        return self.get(name).strip().lower() in TRUE_WORDS

    def is_secret(self, name: str) -> bool:
        return name in self.secret_names or is_secret_name(name)

    def secret_values(self) -> Set[str]:
        out: Set[str] = set()
        for name, value in self.values.items():
            if self.is_secret(name):
                out.update(v for v in ([value] if isinstance(value, str) else value) if v)
        return out


def parse_config_text(text: str, path: Path) -> List[Assignment]:
    try:
        return ShellParser(text).parse()
    except Unsupported as exc:
        raise config_refusal(path, exc, text) from None


ASSIGNED_RE = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)(?:\[[^]]*\])?\+?=")


def config_refusal(path: Path, exc: Unsupported, text: str) -> ConfigError:
    """The refusal of a line; for the line of a secret variable it names the variable, never
    the text (which would show the secret, or part of it)."""
    if isinstance(exc, SubstitutionFailed):
        return ConfigError(f"{path}:{exc.line}: {exc.construct} ({exc.hint})")
    lines = text.splitlines()
    assigned = ASSIGNED_RE.match(lines[exc.line - 1]) if 0 < exc.line <= len(lines) else None
    if assigned and is_secret_name(assigned.group(1)):
        return ConfigError(f"{path}:{exc.line}: {assigned.group(1)}: the value is not one word or uses shell "
                           "syntax rescue does not run (its text is not shown: it is a secret)",
                           f"quote the whole value: {assigned.group(1)}='…'")
    return ConfigError(f"{path}:{exc.line}: unsupported shell syntax: {exc.construct} ({exc.hint})")


def format_value(value: Value) -> str:
    if isinstance(value, list):
        return "(" + "".join(f" {shlex.quote(v)}" for v in value) + (" )" if value else ")")
    return shlex.quote(value)


# =============================================================================================
# 3. settings
#
# Every setting rescue reads, with its type, default and meaning, checked when the
# configuration is loaded: a bad value stops the run before anything is done, naming FILE:LINE.
# conf/default.conf is the user's documentation of the same settings (a test keeps the two equal).
# =============================================================================================

class BadValue(ValueError):
    """A setting's value does not fit its type; the message says what was expected."""


def whole_number(text: str, least: int = 0) -> int:
    """A whole number written in ASCII digits (int() would take "٣" and " 3 ")."""
    if not re.fullmatch(r"[0-9]+", text, re.ASCII) or int(text) < least:
        raise BadValue(f"expected a whole number{' of %d or more' % least if least else ''}")
    return int(text)


def seconds_value(text: str) -> float:
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", text, re.ASCII):
        raise BadValue("expected a number of seconds")
    if float(text) <= 0:
        raise BadValue("expected a number of seconds greater than 0")
    return float(text)


def count_value(text: str) -> Optional[int]:
    return whole_number(text, 1) if text else None


def workers_value(text: str) -> Union[str, int]:
    if text.lower() in ("", "auto"):
        return "auto"
    try:
        return whole_number(text, 1)
    except BadValue:
        raise BadValue('expected "auto" or a whole number of 1 or more') from None


FALSE_WORDS = frozenset({"", "0", "n", "no", "false", "off"})


def bool_value(text: str) -> bool:
    word = text.strip().lower()
    if word not in TRUE_WORDS | FALSE_WORDS:
        raise BadValue("expected yes or no (also true/false, y/n, 1/0, on/off)")
    return word in TRUE_WORDS


DURATION_RE = re.compile(r"now|[0-9]+|([0-9]+[smhDWMY])+", re.ASCII)
DATE_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})(?:[T ]([0-9]{2}):([0-9]{2})(?::([0-9]{2}))?"
                     r"(Z|[+-][0-9]{2}:?[0-9]{2})?)?", re.ASCII)


def duplicity_time_value(text: str) -> Optional[str]:
    """A time as duplicity takes it (now, seconds since 1970, an interval like 2h30m or 1Y,
    or a date and time), checked here so that a typo fails before anything is removed and a
    date duplicity would reject (2026-13-45) is named. ReaR's "--restore-time=1D" form too."""
    value = text.strip()
    if value.startswith("--restore-time="):
        value = value[len("--restore-time="):]
    if not value:
        return None
    date = DATE_RE.fullmatch(value)
    if date:
        try:
            stamp = datetime.datetime(*(int(g) for g in date.groups()[:6] if g is not None))
        except ValueError:
            raise BadValue("expected a real date and time") from None
        if stamp.year < 1970:
            raise BadValue("expected a date after 1970")
        return value
    if not DURATION_RE.fullmatch(value):
        raise BadValue("expected a duplicity time such as 30D, 6M, 1Y, 2h30m, 2026-01-05 or 2026-01-05T17:56:18")
    return value


def time_option(option: str, value: str) -> str:
    """A time given on the command line (--restore-time, --time), checked like the settings."""
    try:
        checked = duplicity_time_value(value)
    except BadValue as exc:
        raise ConfigError(f"{option} {value}: {exc}", "see 'rescue help'") from None
    if checked is None:
        raise ConfigError(f"{option}: expected a time", "e.g. --restore-time 2026-01-05T17:56:18 or 3D")
    return checked


def name_value(text: str) -> str:
    """A name that becomes one path component (a directory on the target, a cache name)."""
    if not text or text in (".", "..") or "/" in text or text.startswith("-") or \
            any(ord(c) < 32 or c == "\x7f" for c in text):
        raise BadValue("expected a name (not empty, no '/', not '.' or '..', not starting with '-', "
                       "no control characters)")
    return text


def path_value(text: str) -> str:
    if text and not text.startswith("/"):
        raise BadValue("expected an absolute path")
    return text


def program_value(text: str) -> str:
    """An absolute path, or a program's name that PATH finds (ReaR's templates say "duplicity")."""
    if text and not text.startswith("/") and "/" in text:
        raise BadValue("expected an absolute path or a program name")
    return text


REAR_OUTPUTS = ("ISO", "RAMDISK", "USB", "PXE", "OBDR", "RAWDISK", "PORTABLE")
MEDIA_OUTPUTS = ("ISO", "RAMDISK")


def choice_value(*choices: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        found = next((c for c in choices if c.lower() == text.lower()), None)
        if found is None:
            raise BadValue("expected " + " or ".join(choices))
        return found
    return check


# duplicity 3's backends; rescue's zipapp carries the ones that need nothing beyond the system's
# ssh, rsync and gpg (file, rsync, pexpect+sftp/scp); the others need duplicity's Python SDKs.
DUPLICITY_SCHEMES = frozenset({
    "file", "rsync", "sftp", "scp", "pexpect+sftp", "pexpect+scp", "paramiko+sftp", "paramiko+scp",
    "ftp", "ftps", "lftp+ftp", "lftp+ftps", "lftp+sftp", "lftp+webdav", "lftp+webdavs", "fish",
    "webdav", "webdavs", "s3", "s3+http", "boto3+s3", "gs", "azure", "b2", "swift", "onedrive",
    "dpbx", "gdrive", "pydrive", "mega", "megav2", "megav3", "rclone", "copy", "cf+http", "hsi",
    "imap", "imaps", "jottacloud", "box", "idrive", "slate", "tahoe", "xorriso", "par2", "multi",
})
SSH_SCHEMES = ("rsync", "sftp", "scp", "ssh", "pexpect+sftp", "pexpect+scp", "paramiko+sftp",
               "paramiko+scp", "fish")


def url_value(text: str) -> str:
    """A duplicity target URL that names one place: scheme://…, no query or fragment (duplicity
    would take them as part of a file name), an absolute path for file://, a host where the
    scheme needs one."""
    if not text:
        return text
    scheme, sep, rest = text.partition("://")
    if not sep or not re.fullmatch(r"[a-z0-9+.-]+", scheme, re.ASCII):
        raise BadValue("expected a URL such as file:///srv/backup or rsync://user@host//srv/backup")
    if scheme not in DUPLICITY_SCHEMES:
        raise BadValue(f"expected a URL of a scheme duplicity has (file, rsync, sftp, scp, …), not {scheme}://")
    if "?" in rest or "#" in rest:
        raise BadValue("expected a URL without ?… or #… (write such characters as %3F and %23)")
    parsed = urllib.parse.urlsplit(text)
    path = urllib.parse.unquote(parsed.path)
    if ".." in path.split("/") or "\0" in path:
        raise BadValue("expected a URL whose path has no '..' component (and no %00): one place, named plainly")
    if scheme == "file" and (parsed.netloc or not parsed.path.startswith("/") or parsed.path == "/"):
        raise BadValue("expected file:// with an absolute directory, e.g. file:///srv/backup")
    if scheme != "file" and not parsed.hostname:
        raise BadValue(f"expected {scheme}://[user@]host/path")
    return text


def url_path(url: str) -> Optional[str]:
    """The local directory of a file:// URL (None for other URLs)."""
    if not url.startswith("file://"):
        return None
    return os.path.normpath(urllib.parse.unquote(urllib.parse.urlsplit(url).path))


def words_value(value: Value) -> List[str]:
    """An options variable: an array gives one argument per element; a string is split on
    whitespace, as ReaR's unquoted $VAR is."""
    return list(value) if isinstance(value, list) else value.split()


def list_value(value: Value) -> List[str]:
    return list(value) if isinstance(value, list) else ([value] if value else [])


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[..., object]       # the type: value text (or array, for lists) -> typed value
    meaning: str
    default: Value = ""                # as conf/default.conf sets it ($HOSTNAME unexpanded)
    whole: bool = False                # parse gets the whole value (an array), not its first word

    @property
    def secret(self) -> bool:
        return is_secret_name(self.name)


def _settings(*rows: Setting) -> Dict[str, Setting]:
    return {row.name: row for row in rows}


TEXT, WORDS, LIST = str, words_value, list_value
SETTINGS = _settings(
    Setting("BACKUP", TEXT, "the backup method: rescue implements DUPLICITY (checked by the backup workflows)",
            "DUPLICITY"),
    Setting("HOSTNAME", name_value, "this machine's name: backups live in $BACKUP_DUPLICITY_URL/$HOSTNAME"),
    Setting("DUPLICITY_USER", TEXT, "helper for BACKUP_DUPLICITY_URL: the user at the server"),
    Setting("DUPLICITY_HOST", TEXT, "helper for BACKUP_DUPLICITY_URL: the server"),
    Setting("DUPLICITY_PROTO", TEXT, "helper for BACKUP_DUPLICITY_URL: the protocol"),
    Setting("DUPLICITY_PATH", TEXT, "helper for BACKUP_DUPLICITY_URL: the path on the server"),
    Setting("BACKUP_DUPLICITY_URL", url_value, "where backups go: one directory per host below it"),
    Setting("BACKUP_DUPLICITY_NAME", name_value, "duplicity's --name (its cache of the chain)", "rear-backup"),
    Setting("DUPLICITY_PROG", program_value, "a duplicity to run instead of the bundled one"),
    Setting("BACKUP_DUPLICITY_GPG_ENC_KEY", TEXT, "public keys to encrypt to (space-separated)"),
    Setting("BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE", TEXT, "the secret key's or the symmetric passphrase"),
    Setting("BACKUP_DUPLICITY_GPG_SIGN_KEY", TEXT, "the key to sign the backup with"),
    Setting("BACKUP_DUPLICITY_GPG_SIGN_PASSPHRASE", TEXT, "the signing key's passphrase"),
    Setting("BACKUP_DUPLICITY_GPG_HIDDEN_ENC_KEY", TEXT, "public keys to encrypt to without naming them"),
    Setting("BACKUP_DUPLICITY_ASK_PASSPHRASE", bool_value, "ask for the passphrase on restore"),
    Setting("BACKUP_DUPLICITY_MAX_SETS", count_value, "keep only the last N full chains"),
    Setting("BACKUP_DUPLICITY_MAX_SETS_KEEP_FULL", count_value, "keep incrementals of the last N full chains only"),
    Setting("BACKUP_DUPLICITY_MAX_TIME", duplicity_time_value, "remove backups older than this"),
    Setting("BACKUP_DUPLICITY_FULL_IF_OLDER_THAN", duplicity_time_value, "start a new full chain after this"),
    Setting("BACKUP_DUPLICITY_OPTIONS", WORDS, "the user's own duplicity options", whole=True),
    Setting("BACKUP_DUPLICITY_TUNING", WORDS, "rescue's duplicity tuning, before the user's options",
            ["--gpg-options=--compress-level 1"], whole=True),
    Setting("BACKUP_DUPLICITY_PARALLEL", workers_value, "duplicity processes side by side", "auto"),
    Setting("BACKUP_DUPLICITY_PART_MIN_MB", whole_number, "the smallest directory (MiB) for a chain of its own", "64"),
    Setting("BACKUP_DUPLICITY_COMPRESSION_CHECK", bool_value, "store incompressible parts uncompressed", "yes"),
    Setting("BACKUP_DUPLICITY_SSH_OPTIONS", TEXT, "options for ssh to the backup server"),
    Setting("BACKUP_DUPLICITY_EXCLUDE", LIST, "duplicity patterns not to back up", [], whole=True),
    Setting("BACKUP_DUPLICITY_INCLUDE", LIST, "back up only these duplicity patterns", [], whole=True),
    Setting("BACKUP_DUPLICITY_RESTORE_TIME", duplicity_time_value, "restore the backup as of this time"),
    Setting("BACKUP_DUPLICITY_TEMP_RAMDISK", bool_value, "duplicity's temporary files on a tmpfs when restoring"),
    Setting("OUTPUT", choice_value(*REAR_OUTPUTS), "what mkrescue produces besides kernel and initramfs "
            "(ISO or RAMDISK; ReaR's other outputs load, and mkrescue refuses them)", "ISO"),
    Setting("OUTPUT_URL", TEXT, "where mkrescue copies the rescue media (file://, rsync://, sftp://; ReaR's others load and mkrescue refuses them)"),
    Setting("ISO_DIR", path_value, "where mkrescue writes the rescue media", "/var/lib/rescue/output"),
    Setting("ISO_PREFIX", name_value, "the rescue media's file names start with this", "rescue-$HOSTNAME"),
    Setting("ISO_VOLID", TEXT, "the ISO's volume label", "RESCUE"),
    Setting("KERNEL_FILE", path_value, "the kernel of the rescue system (empty: /boot/vmlinuz-$KERNEL_VERSION)"),
    Setting("KERNEL_VERSION", TEXT, "the release whose kernel and modules the rescue system gets (empty: "
            "KERNEL_FILE's own, else $(uname -r))"),
    Setting("KERNEL_CMDLINE", TEXT, "more kernel arguments for the rescue system"),
    Setting("SECURE_BOOT_BOOTLOADER", TEXT, "the signed shim the ISO boots by UEFI with (empty: the host's "
            "shim and signed GRUB when it has them; no: GRUB unsigned)"),
    Setting("MODULES", LIST, "kernel modules for the rescue system", [], whole=True),
    Setting("MODULES_LOAD", LIST, "kernel modules the rescue system loads at boot (besides those its "
            "storage needs)", [], whole=True),
    Setting("FIRMWARE_FILES", LIST, "firmware files for the rescue system", [], whole=True),
    Setting("RESCUE_GPG_PRIVATE_KEYS", bool_value, "root's GPG private keys go into the rescue system"),
    Setting("RESCUE_GPG_PASSPHRASE", bool_value, "the duplicity passphrase goes into the rescue system "
            "(for rescue.auto=recover with no one at the console)"),
    Setting("SSH_UNPROTECTED_PRIVATE_KEYS", LIST, "root's ssh private keys that go into the rescue system",
            ["no"], whole=True),
    Setting("USE_STATIC_NETWORKING", bool_value, "the rescue system's network as this machine's"),
    Setting("SSH_ROOT_PASSWORD", TEXT, "root's password for ssh into the rescue system"),
    Setting("LAYOUT_DIR", path_value, "where savelayout keeps layout.json", "/var/lib/rescue/layout"),
    Setting("TARGET_FS_ROOT", path_value, "where recover mounts the recreated filesystems", "/mnt/local"),
    Setting("AUTORESIZE_PARTITIONS", LIST, "false: no partition is resized onto a disk of another size", [], whole=True),
    Setting("AUTORESIZE_LV", TEXT, "VG/LV that grows or shrinks with its resized PV (empty: the last)"),
    Setting("LUKS_KEY_FILE", path_value, "a file holding the passphrase of recreated LUKS devices"),
    Setting("USER_INPUT_WIPE_DISKS_CONFIRMATION", TEXT, "a preset answer to recover's confirmation"),
    Setting("REBUILD_INITRAMFS", bool_value, "recover builds the restored system's initramfs anew", "yes"),
    Setting("SELINUX_RELABEL", choice_value("auto", "yes", "no"),
            "relabel the restored files for SELinux: auto (when their labels are missing), yes, no", "auto"),
    Setting("GRUB2_INSTALL_DEVICES", WORDS, "the disks recover installs GRUB on (BIOS); empty: the boot disks",
            whole=True),
    Setting("EXCLUDE_MOUNTPOINTS", LIST, "mountpoints left out of the layout", [], whole=True),
    Setting("EXCLUDE_VG", LIST, "volume groups left out of the layout", [], whole=True),
    Setting("ONLY_INCLUDE_VG", LIST, "only these volume groups are in the layout", [], whole=True),
    Setting("EXCLUDE_DISKS", LIST, "disks left out of the layout", [], whole=True),
    Setting("PROGRESS_MODE", choice_value("ANSI", "plain"), "progress as an updating line or as lines", "ANSI"),
    Setting("PROGRESS_WAIT_SECONDS", seconds_value, "seconds between progress updates", "1"),
    Setting("USER_INPUT_TIMEOUT", seconds_value, "seconds to wait for an answer", "300"),
    Setting("VAR_DIR", path_value, "rescue's state (backed up)", "/var/lib/rescue"),
    Setting("NODE_EXPORTER_TEXTFILE_DIR", path_value, "where to write Prometheus metrics of each backup"),
    Setting("LOGFILE", path_value, "the log file of each run", "/var/log/rescue/rescue-$HOSTNAME.log"),
    Setting("LOCKFILE", path_value, "the lock of state-changing workflows", "/run/lock/rescue.lock"),
    Setting("SECRET_OUTPUT_DEV", TEXT, "ReaR's device for the secret wrapper (kept for bash)", "null"),
)


def typed_settings(config: Config, environ: Dict[str, str]) -> Dict[str, object]:
    """Every setting's typed value, or a ConfigError naming where the bad value comes from
    (never quoting a secret)."""
    out: Dict[str, object] = {}
    for name, setting in SETTINGS.items():
        raw: Value = config.values.get(name, setting.default)
        if name == "HOSTNAME" and name not in config.values:
            raw = environ.get("HOSTNAME") or hostname()
        if not setting.whole and isinstance(raw, list):
            raw = raw[0] if raw else ""         # $NAME of an array is its first element
        try:
            out[name] = setting.parse(raw)
        except BadValue as exc:
            where, fix = setting_origin(config, name, environ)
            shown = "" if config.is_secret(name) else f', got "{" ".join(raw) if isinstance(raw, list) else raw}"'
            raise ConfigError(f"{where}{name}: {exc}{shown}", fix) from None
    return out


def setting_origin(config: Config, name: str, environ: Dict[str, str]) -> Tuple[str, str]:
    """("FILE:LINE: " of the value, how to correct it)."""
    path, line = config.origin.get(name, (None, 0))
    if path is None or (path == DEFAULT_CONF and name in environ):
        return "the environment's ", f"correct or unset {name} in the environment"
    return f"{path}:{line}: ", f"correct {name} in {path}"


def config_from_values(values: Dict[str, Value], secret_names: Sequence[str] = (),
                       environ: Optional[Dict[str, str]] = None) -> Config:
    """A Config as load_config gives it for these values over the defaults, checked the same
    way (for programs and tests that make a configuration without files)."""
    environ = dict(os.environ) if environ is None else environ
    host = environ.get("HOSTNAME") or hostname()
    merged: Dict[str, Value] = {name: setting.default.replace("$HOSTNAME", host) if isinstance(setting.default, str)
                                else list(setting.default) for name, setting in SETTINGS.items() if name != "HOSTNAME"}
    merged.update(values)
    config = Config(merged, set(secret_names), [])
    config.typed = typed_settings(config, environ)
    return config


def config_text(path: Path) -> str:
    """A configuration file's text; a file that is not UTF-8 text, or has Windows line endings
    (bash would keep the \\r in every value), is refused with what to do."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}",
                          "check the path and its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (not UTF-8 at byte {exc.start})",
                          "give a configuration file: VAR=value lines, as ReaR's") from None
    if "\0" in text:
        raise ConfigError(f"{path}: not a text file (it holds NUL bytes)", "give a configuration file: VAR=value lines")
    if "\r\n" in text:
        line = text[:text.index("\r\n")].count("\n") + 1
        raise ConfigError(f"{path}:{line}: Windows line endings (CRLF): bash would keep the \\r in the values",
                          f"convert the file: dos2unix {path}")
    return text


def load_config(files: Sequence[Path], environ: Dict[str, str], log: Log) -> Config:
    """Parse and evaluate files in order (the first is default.conf), then check every setting."""
    state = ShellState(environ)
    values: Dict[str, Value] = {}
    secret_names: Set[str] = set()
    origin: Dict[str, Tuple[Path, int]] = {}
    warned: Set[str] = set()
    for path in files:
        text = config_text(path)
        for a in parse_config_text(text, path):
            try:
                state.assign(a)
            except Unsupported as exc:
                raise config_refusal(path, exc, text) from None
            values[a.name] = state.vars[a.name]
            origin[a.name] = (path, a.line)
            if a.secret:
                secret_names.add(a.name)
            if a.name not in SETTINGS and a.name not in warned:
                warn_unknown(a.name, set(SETTINGS), path, a.line, log)
                warned.add(a.name)
    config = Config(values, secret_names, list(files), origin)
    for secret in config.secret_values():
        log.add_secret(secret)
    config.typed = typed_settings(config, environ)
    return config


def warn_unknown(name: str, known: Set[str], path: Path, line: int, log: Log) -> None:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
    advice = f"did you mean {close[0]}?" if close else "rescue does not use it"
    log.warn(f"{path}:{line}: {name} is not a known variable; {advice}")


def config_directory(config_dir: Optional[str]) -> Path:
    """-c CONFIG_DIR, else /etc/rescue, else (for an existing ReaR setup) /etc/rear."""
    if config_dir is None:
        return Path("/etc/rescue" if Path("/etc/rescue").is_dir() else "/etc/rear")
    return Path(config_dir)


def config_files(config_dir: Optional[str], extra: Sequence[str]) -> List[Path]:
    """default.conf, then CONFIG_DIR/{site,local}.conf, then each -C file, as ReaR does."""
    if not DEFAULT_CONF.is_file():
        raise RescueError(f"{DEFAULT_CONF} is missing",
                          "run rescue from its source tree or as dist/rescue.pyz, which carries conf/")
    directory = config_directory(config_dir)
    if config_dir is not None and not directory.is_dir():
        raise ConfigError(f"configuration directory {directory} does not exist",
                          "give an existing directory with -c, or leave -c out")
    files = [DEFAULT_CONF] + [p for p in (directory / "site.conf", directory / "local.conf") if p.is_file()]
    for name in extra:
        files.append(resolve_extra_conf(name, directory))
    return files


def resolve_extra_conf(name: str, directory: Path) -> Path:
    for candidate in (Path(name), directory / name, directory / f"{name}.conf"):
        if candidate.is_file():
            return candidate
    if Path(name).is_dir():
        raise ConfigError(f"configuration file {name} is a directory", "give a file with -C (a directory is -c)")
    raise ConfigError(f"configuration file {name} not found",
                      f"give a path, or a name in {directory} (with or without .conf)")


def backup_host(config: Config) -> str:
    return config.setting("HOSTNAME")


def config_without_secrets(config: Config, keep: FrozenSet[str] = frozenset()) -> str:
    """The effective configuration as a file rescue can load again (-C), secrets left empty
    (but those named in keep)."""
    lines = [f"# rescue {__version__}: the configuration of {backup_host(config)} at backup time.",
             "# Secret values are not stored: set them again before using this file."]
    for name in sorted(config.values):
        value = config.values[name]
        if config.is_secret(name) and value and name not in keep:
            lines.append(f"{name}=''    # secret, not stored")
        else:
            lines.append(f"{name}={format_value(value)}")
    return "\n".join(lines) + "\n"


# =============================================================================================
# 4. tools
#
# Every external program rescue runs, named once, with the package that provides it on
# Debian/Ubuntu, RHEL/Alma/Rocky and SUSE (so an error can say what to install, and the rescue
# media know what to copy). The test suite checks that every program it saw run is here.
# =============================================================================================

@dataclass(frozen=True)
class Tool:
    program: str                  # as run (argv[0])
    debian: str                   # the package that provides it on Debian/Ubuntu
    rhel: str                     # … on RHEL/Alma/Rocky
    suse: str                     # … on SUSE
    needed_by: Tuple[str, ...]    # what uses it: capture, backup, restore, finalize


def _tools(*rows: Tuple[str, str, str, str, Tuple[str, ...]]) -> Dict[str, Tool]:
    return {row[0]: Tool(*row) for row in rows}


TOOLS = _tools(
    # program             Debian/Ubuntu      RHEL family          SUSE               needed by
    ("python3",           "python3",         "python3",           "python3",         ("backup", "restore")),
    ("duplicity",         "duplicity",       "duplicity (EPEL)",  "duplicity",       ("backup", "restore")),
    ("gpg",               "gpg",             "gnupg2",            "gpg2",            ("backup", "restore")),
    ("gpgconf",           "gpgconf",         "gnupg2",            "gpg2",            ("backup", "restore")),
    ("gpg-agent",         "gpg-agent",       "gnupg2",            "gpg2",            ("backup", "restore")),
    ("rsync",             "rsync",           "rsync",             "rsync",           ("backup", "restore")),
    ("ssh",               "openssh-client",  "openssh-clients",   "openssh",         ("backup", "restore")),
    ("fallocate",         "util-linux",      "util-linux",        "util-linux",      ("restore",)),
    ("ip",                "iproute2",        "iproute",           "iproute2",        ("capture", "rescue")),
    ("findmnt",           "util-linux",      "util-linux",        "util-linux",      ("capture", "backup", "restore")),
    ("lsblk",             "util-linux",      "util-linux",        "util-linux",      ("capture",)),
    ("blkid",             "util-linux",      "util-linux",        "util-linux",      ("capture", "recreate")),
    ("sfdisk",            "fdisk",           "util-linux",        "util-linux",      ("capture", "recreate")),
    ("lvm",               "lvm2",            "lvm2",              "lvm2",            ("capture", "recreate")),
    ("vgcfgbackup",       "lvm2",            "lvm2",              "lvm2",            ("capture",)),
    ("mdadm",             "mdadm",           "mdadm",             "mdadm",           ("capture", "recreate")),
    ("cryptsetup",        "cryptsetup-bin",  "cryptsetup",        "cryptsetup",      ("capture", "recreate")),
    ("dumpe2fs",          "e2fsprogs",       "e2fsprogs",         "e2fsprogs",       ("capture",)),
    ("xfs_info",          "xfsprogs",        "xfsprogs",          "xfsprogs",        ("capture",)),
    ("btrfs",             "btrfs-progs",     "btrfs-progs (not in RHEL 8/9)", "btrfsprogs", ("capture", "recreate")),
    ("efibootmgr",        "efibootmgr",      "efibootmgr",        "efibootmgr",      ("capture", "finalize")),
    ("wipefs",            "util-linux",      "util-linux",        "util-linux",      ("recreate",)),
    ("partx",             "util-linux",      "util-linux",        "util-linux",      ("recreate",)),
    ("mount",             "mount",           "util-linux",        "util-linux",      ("recreate",)),
    ("umount",            "mount",           "util-linux",        "util-linux",      ("recreate",)),
    ("dd",                "coreutils",       "coreutils",         "coreutils",       ("recreate",)),
    ("dmsetup",           "dmsetup",         "device-mapper",     "device-mapper",   ("recreate",)),
    ("mke2fs",            "e2fsprogs",       "e2fsprogs",         "e2fsprogs",       ("recreate",)),
    ("mkfs.xfs",          "xfsprogs",        "xfsprogs",          "xfsprogs",        ("recreate",)),
    ("mkfs.vfat",         "dosfstools",      "dosfstools",        "dosfstools",      ("recreate",)),
    ("mkfs.btrfs",        "btrfs-progs",     "btrfs-progs (not in RHEL 8/9)", "btrfsprogs", ("recreate",)),
    ("mkswap",            "util-linux",      "util-linux",        "util-linux",      ("recreate",)),
    # Found (not run) by savelayout, for the boot section of the layout; recover runs them.
    ("grub-install",      "grub2-common",    "",                  "",                ("finalize",)),
    ("grub2-install",     "",                "grub2-tools",       "grub2",           ("finalize",)),
    ("grub-mkconfig",     "grub-common",     "",                  "",                ("finalize",)),
    ("grub2-mkconfig",    "",                "grub2-tools",       "grub2",           ("finalize",)),
    ("dracut",            "dracut",          "dracut",            "dracut",          ("finalize",)),
    ("update-initramfs",  "initramfs-tools", "",                  "",                ("finalize",)),
    ("mkinitrd",          "",                "",                  "mkinitrd",        ("finalize",)),
    # Run by recover in the restored system (chroot) or on it (setfiles -r, efibootmgr).
    ("chroot",            "coreutils",       "coreutils",         "coreutils",       ("finalize",)),
    ("update-grub",       "grub2-common",    "",                  "",                ("finalize",)),
    ("lsinitramfs",       "initramfs-tools-core", "",             "",                ("finalize",)),
    ("lsinitrd",          "",                "dracut",            "dracut",          ("finalize",)),
    ("lvmdevices",        "lvm2",            "lvm2",              "lvm2",            ("finalize",)),
    ("setfiles",          "policycoreutils", "policycoreutils",   "policycoreutils", ("finalize",)),
    # Run by recover's finalize and by mkrescue, and the rescue system's own programs
    # (mkrescue copies every program of this table that the host has).
    ("grub-probe",        "grub-common",     "",                  "",                ("finalize",)),
    ("grub2-probe",       "",                "grub2-tools",       "grub2",           ("finalize",)),
    ("grub-mkimage",      "grub-common",     "",                  "",                ("finalize",)),
    ("grub2-mkimage",     "",                "grub2-tools",       "grub2",           ("finalize",)),
    ("grub-bios-setup",   "grub-pc-bin",     "",                  "",                ("finalize",)),
    ("grub2-bios-setup",  "",                "grub2-tools",       "grub2",           ("finalize",)),
    ("grub-editenv",      "grub-common",     "",                  "",                ("finalize",)),
    ("grub2-editenv",     "",                "grub2-tools",       "grub2",           ("finalize",)),
    ("grub-mkrelpath",    "grub-common",     "",                  "",                ("finalize",)),
    ("grub2-mkrelpath",   "",                "grub2-tools",       "grub2",           ("finalize",)),
    ("tune2fs",           "e2fsprogs",       "e2fsprogs",         "e2fsprogs",       ("recreate",)),
    ("e2fsck",            "e2fsprogs",       "e2fsprogs",         "e2fsprogs",       ("recreate",)),
    ("xfs_admin",         "xfsprogs",        "xfsprogs",          "xfsprogs",        ("recreate",)),
    ("xfs_db",            "xfsprogs",        "xfsprogs",          "xfsprogs",        ("recreate",)),
    ("mkfs.ext4",         "e2fsprogs",       "e2fsprogs",         "e2fsprogs",       ("recreate",)),
    ("ldd",               "libc-bin",        "glibc-common",      "glibc",           ("mkrescue",)),
    ("modinfo",           "kmod",            "kmod",              "kmod",            ("mkrescue",)),
    ("depmod",            "kmod",            "kmod",              "kmod",            ("mkrescue",)),
    ("zstd",              "zstd",            "zstd",              "zstd",            ("mkrescue",)),
    ("grub-mkimage",      "grub-common",     "",                  "",                ("mkrescue",)),
    ("grub2-mkimage",     "",                "grub2-tools",       "grub2",           ("mkrescue",)),
    ("xorriso",           "xorriso",         "xorriso",           "xorriso",         ("mkrescue",)),
    ("mformat",           "mtools",          "mtools",            "mtools",          ("mkrescue",)),
    ("mmd",               "mtools",          "mtools",            "mtools",          ("mkrescue",)),
    ("mcopy",             "mtools",          "mtools",            "mtools",          ("mkrescue",)),
    ("busybox",           "busybox",         "busybox",           "busybox",         ("rescue",)),
    ("sh",                "dash",            "bash",              "bash",            ("rescue",)),
    ("bash",              "bash",            "bash",              "bash",            ("rescue",)),
    ("ls",                "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("cat",               "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("cp",                "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("mv",                "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("rm",                "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("mkdir",             "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("rmdir",             "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("ln",                "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("chmod",             "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("chown",             "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("touch",             "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("sleep",             "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("sync",              "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("uname",             "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("df",                "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("du",                "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("head",              "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("tail",              "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("sort",              "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("tr",                "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("cut",               "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("wc",                "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("tee",               "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("env",               "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("basename",          "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("dirname",           "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("readlink",          "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("stat",              "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("date",              "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("id",                "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("true",              "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("false",             "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("test",              "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("mknod",             "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("sha256sum",         "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("md5sum",            "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("seq",               "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("stty",              "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("printf",            "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("echo",              "coreutils",       "coreutils",         "coreutils",       ("rescue",)),
    ("grep",              "grep",            "grep",              "grep",            ("rescue",)),
    ("sed",               "sed",             "sed",               "sed",             ("rescue",)),
    ("awk",               "mawk",            "gawk",              "gawk",            ("rescue",)),
    ("find",              "findutils",       "findutils",         "findutils",       ("rescue",)),
    ("xargs",             "findutils",       "findutils",         "findutils",       ("rescue",)),
    ("tar",               "tar",             "tar",               "tar",             ("rescue",)),
    ("gzip",              "gzip",            "gzip",              "gzip",            ("rescue",)),
    ("less",              "less",            "less",              "less",            ("rescue",)),
    ("ps",                "procps",          "procps-ng",         "procps",          ("rescue",)),
    ("kill",              "procps",          "procps-ng",         "procps",          ("rescue",)),
    ("free",              "procps",          "procps-ng",         "procps",          ("rescue",)),
    ("dmesg",             "util-linux",      "util-linux",        "util-linux",      ("rescue",)),
    ("setsid",            "util-linux",      "util-linux",        "util-linux",      ("rescue",)),
    ("hostname",          "hostname",        "hostname",          "hostname",        ("rescue",)),
    ("mountpoint",        "util-linux",      "util-linux",        "util-linux",      ("rescue",)),
    ("losetup",           "mount",           "util-linux",        "util-linux",      ("rescue",)),
    ("fdisk",             "fdisk",           "util-linux",        "util-linux",      ("rescue",)),
    ("kmod",              "kmod",            "kmod",              "kmod",            ("rescue",)),
    ("modprobe",          "kmod",            "kmod",              "kmod",            ("rescue",)),
    ("insmod",            "kmod",            "kmod",              "kmod",            ("rescue",)),
    ("lsmod",             "kmod",            "kmod",              "kmod",            ("rescue",)),
    ("udevadm",           "udev",            "systemd-udev",      "udev",            ("rescue",)),
    ("systemd-udevd",     "udev",            "systemd-udev",      "udev",            ("rescue",)),
    ("udevd",             "",                "",                  "",                ("rescue",)),
    ("dhclient",          "isc-dhcp-client", "dhcp-client",       "dhcp-client",     ("rescue",)),
    ("udhcpc",            "udhcpc",          "busybox",           "busybox",         ("rescue",)),
    ("ping",              "iputils-ping",    "iputils",           "iputils",         ("rescue",)),
    ("sshd",              "openssh-server",  "openssh-server",    "openssh-server",  ("rescue",)),
    ("ssh-keygen",        "openssh-client",  "openssh",           "openssh",         ("rescue",)),
    ("scp",               "openssh-client",  "openssh-clients",   "openssh",         ("rescue",)),
    ("sftp",              "openssh-client",  "openssh-clients",   "openssh",         ("rescue",)),
    ("loadkeys",          "kbd",             "kbd",               "kbd",             ("rescue",)),
)


def tool_of(argv0: str) -> str:
    """The TOOLS name of what argv[0] starts: the program's name, or python3 for the
    interpreter rescue runs in (the bundled duplicity runs with it)."""
    return "python3" if argv0 == sys.executable else os.path.basename(argv0)


# The kinds of work a run's time is told apart by (recover's "Time:" line): the tools that do
# the heavy lifting, by program; everything else rescue runs counts as its own orchestration.
TOOL_KINDS = {"duplicity": "duplicity", "gpg": "duplicity", "gpg-agent": "duplicity", "gpgconf": "duplicity",
              "mke2fs": "mkfs", "mkfs.ext4": "mkfs", "mkfs.xfs": "mkfs", "mkfs.vfat": "mkfs", "mkfs.btrfs": "mkfs",
              "mkswap": "mkfs", "dracut": "initramfs", "update-initramfs": "initramfs", "mkinitrd": "initramfs",
              "lsinitramfs": "initramfs", "lsinitrd": "initramfs", "grub-install": "bootloader",
              "grub2-install": "bootloader", "grub-mkconfig": "bootloader", "grub2-mkconfig": "bootloader",
              "update-grub": "bootloader", "efibootmgr": "bootloader"}


def tool_kind(argv: Sequence[str], program: Optional[str] = None) -> str:
    """The kind of work argv is (TOOL_KINDS; "other" for the rest): a command run in a chroot
    is the kind of the program it runs there."""
    name = program or tool_of(argv[0])
    if name == "chroot" and len(argv) > 2:
        name = os.path.basename(argv[2])
    return TOOL_KINDS.get(name, "other")


def missing_program(program: str) -> RescueError:
    tool = TOOLS.get(tool_of(program))
    packages = [f"{family}{package}" for family, package in
                (("Debian/Ubuntu package ", tool.debian), ("RHEL/Alma/Rocky ", tool.rhel), ("SUSE ", tool.suse))
                if package] if tool else []
    hint = "install it: " + ", ".join(packages) if packages else "install it, or check PATH"
    return RescueError(f"program '{program}' not found", hint)


# =============================================================================================
# 5. runner
#
# The only code that starts processes: argv lists (never a shell), an explicit environment with
# LC_ALL=C, a logged command line with secrets redacted, and failures turned into one clear error.
# =============================================================================================

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What a tool may need from the caller's environment; everything else is left behind.
PASSED_ENV = ("PATH", "HOME", "TERM", "TMPDIR", "USER", "LOGNAME", "SSH_AUTH_SOCK", "GNUPGHOME", "TZ")

STDERR_TAIL_LINES = 10
STREAM_TAIL_LINES = 200
PR_SET_PDEATHSIG = 1


def die_with_parent() -> Optional[Callable[[], None]]:
    """A preexec_fn that makes the child die when rescue dies, however it dies (SIGKILL too):
    commands run in sessions of their own (so Ctrl-C reaches rescue only, which stops them), and
    a killed rescue would otherwise leave duplicity running with the lock free. Looked up
    before any fork (the child only calls it); None where libc has no prctl."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:                  # rescue died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


@dataclass
class Result:
    argv: List[str]
    returncode: int
    stdout: str
    stderr: str
    duration: float


class CommandError(RescueError):
    """A command exited non-zero: names the command, its exit code and the end of its stderr."""

    def __init__(self, command: str, returncode: int, stderr: str) -> None:
        tail = "\n".join(stderr.rstrip().splitlines()[-STDERR_TAIL_LINES:])
        super().__init__(f"command failed with exit code {returncode}: {command}",
                         f"its last error output:\n{tail}" if tail else "it printed no error output")
        self.returncode = returncode
        self.stderr = stderr


class Runner:
    """Runs commands for the workflows, each logged before it starts."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.active: Set["subprocess.Popen"] = set()    # running commands (stop_all)
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self._preexec = die_with_parent()
        self.waited = 0.0            # seconds spent waiting for devices (wait())
        self.kinds: Dict[str, float] = {}    # seconds during which a command of each tool_kind ran
        self._kind_running: Dict[str, Tuple[int, float]] = {}   # kind -> (commands running, since)

    def wait(self, seconds: float) -> None:
        """Sleep while polling for a device, counted apart from rescue's own time."""
        time.sleep(seconds)
        self.waited += seconds

    def environment(self, extra: Optional[Dict[str, str]], inherit: bool) -> Dict[str, str]:
        if inherit:
            env = dict(os.environ)
        else:
            env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        # The sbin directories too, whatever PATH the caller had: a rescue shell or a cron job
        # may have a minimal one, and the storage tools live there.
        dirs = [d for d in env.get("PATH", "").split(":") if d]
        env["PATH"] = ":".join(dirs + [d for d in DEFAULT_PATH.split(":") if d not in dirs])
        env.update(LC_ALL="C", LANG="C")
        env.update(extra or {})
        for name, value in env.items():
            if is_secret_name(name):
                self.log.add_secret(value)
        return env

    def command_line(self, argv: Sequence[str], extra_env: Optional[Dict[str, str]]) -> str:
        shown = [f"{k}={shlex.quote(v)}" for k, v in sorted((extra_env or {}).items())]
        return self.log.redact(" ".join(shown + [shlex.quote(a) for a in argv]))

    def run(self, argv: Sequence[str], *, env: Optional[Dict[str, str]] = None,
            input: Optional[str] = None, timeout: Optional[float] = None, check: bool = True,
            capture: bool = True, cwd: Optional[str] = None, inherit_env: bool = False,
            on_line: Optional[Callable[[str], None]] = None, program: Optional[str] = None) -> Result:
        """Run argv. capture=False connects the command to our terminal (interactive tools).
        program: the TOOLS entry argv[0] stands for, when the configuration chose the path
        (DUPLICITY_PROG); the log line names it.

        on_line: stream the output (stderr merged into stdout) to this callback, line by line
        and redacted, as it comes; the Result then holds only the last STREAM_TAIL_LINES lines.
        """
        argv = [str(a) for a in argv]
        full_env = self.environment(env, inherit_env)
        line = self.command_line(argv, env)
        named = f" {program} as" if program and program != tool_of(argv[0]) else ""
        self.log.info(f"running{named}: {line}")
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv, env=full_env, cwd=cwd,
                stdin=subprocess.PIPE if input is not None else (None if not capture else subprocess.DEVNULL),
                stdout=subprocess.PIPE if capture else None,
                stderr=(subprocess.STDOUT if on_line else subprocess.PIPE) if capture else None,
                start_new_session=capture,     # own process group: a timeout kills all of it
                preexec_fn=self._preexec)
        except FileNotFoundError as exc:
            raise missing_program(argv[0]) if exc.filename in (argv[0], None) else exc from None
        except PermissionError:
            raise RescueError(f"cannot execute {argv[0]}: permission denied",
                              "check that it is an executable file") from None
        kind = tool_kind(argv, program)
        with self._lock:
            self.active.add(proc)
            running, since = self._kind_running.get(kind, (0, started))
            self._kind_running[kind] = (running + 1, since)
        try:
            if on_line is not None:
                stdout, stderr = self._stream(proc, on_line, timeout, line), ""
            else:
                stdout, stderr = self._communicate(proc, input, timeout, line)
        finally:
            with self._lock:
                self.active.discard(proc)
                now = time.monotonic()
                running, since = self._kind_running.pop(kind)
                if running > 1:
                    self._kind_running[kind] = (running - 1, since)
                else:
                    self.kinds[kind] = self.kinds.get(kind, 0.0) + now - since
        result = Result(argv, proc.returncode, stdout, stderr, time.monotonic() - started)
        self.log.debug(f"exit code {proc.returncode} after {result.duration:.2f}s")
        if check and proc.returncode != 0:
            raise CommandError(line, proc.returncode, self.log.redact(stderr or stdout))
        return result

    def stop_all(self) -> None:
        """Stop every command still running (commands run by other threads, on Ctrl-C)."""
        with self._lock:
            running = list(self.active)
        for proc in running:
            stop_process(proc)

    def _stream(self, proc: "subprocess.Popen", on_line: Callable[[str], None],
                timeout: Optional[float], line: str) -> str:
        tail: "collections.deque[str]" = collections.deque(maxlen=STREAM_TAIL_LINES)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            stop_process(proc)

        timer = threading.Timer(timeout, expire) if timeout else None
        if timer:
            timer.start()
        try:
            for raw in proc.stdout:
                text = self.log.redact(raw.decode("utf-8", "surrogateescape").rstrip("\n"))
                tail.append(text)
                on_line(text)
            proc.wait()
        except BaseException:
            stop_process(proc)     # Ctrl-C: never leave a half-finished tool running behind us
            raise
        finally:
            if timer:
                timer.cancel()
        if expired.is_set():
            raise RescueError(f"command timed out after {timeout:g}s and was stopped: {line}",
                              "the device or server may hang; check it, or raise the timeout")
        return "\n".join(tail)

    @staticmethod
    def _communicate(proc: "subprocess.Popen", input: Optional[str], timeout: Optional[float],
                     line: str) -> Tuple[str, str]:
        data = input.encode("utf-8", "surrogateescape") if input is not None else None
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise RescueError(f"command timed out after {timeout:g}s and was stopped: {line}",
                              "the device or server may hang; check it, or raise the timeout") from None
        except BaseException:
            stop_process(proc)     # Ctrl-C: never leave a half-finished tool running behind us
            raise
        decode = lambda b: b.decode("utf-8", "surrogateescape") if b else ""   # noqa: E731
        return decode(out), decode(err)


def stop_process(proc: "subprocess.Popen") -> None:
    """TERM the command's process group, then KILL it if it does not exit within 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def in_parallel(runner: Runner, tasks: Sequence[Callable[[], object]], workers: int) -> List[object]:
    """Run tasks (in the order given) on up to workers threads; their results in order. The
    first exception is raised once all started tasks are done; none starts after it. Ctrl-C
    stops every command still running."""
    if workers < 2 or len(tasks) < 2:
        return [task() for task in tasks]
    results: List[object] = [None] * len(tasks)
    errors: List[BaseException] = []
    pending = collections.deque(range(len(tasks)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending or errors:
                    return
                n = pending.popleft()
            try:
                results[n] = tasks[n]()
            except BaseException as exc:     # noqa: B036 - handed to the main thread
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(workers, len(tasks)))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except BaseException:
        with lock:
            pending.clear()
        runner.stop_all()
        for thread in threads:
            thread.join(30)
        raise
    if errors:
        raise errors[0]
    return results


# =============================================================================================
# 6. run state
#
# What a workflow gets (the Context: nothing is global), where rescue keeps its files and how
# it writes them, the lock that lets one state-changing workflow run at a time, questions to
# the user, and the ssh connections a run shares.
# =============================================================================================

SSH_SCHEMES = ("rsync", "sftp", "scp", "ssh", "pexpect+sftp", "pexpect+scp", "paramiko+sftp",
               "paramiko+scp", "fish")
# AES-GCM first where the CPU has AES instructions: OpenSSH prefers chacha20-poly1305, which
# takes about twice the CPU on each side (bench/backup.py; figures in the README).
FAST_SSH_CIPHERS = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
                    "aes128-ctr,aes192-ctr,aes256-ctr")


def cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " aes " in line + " " for line in cpuinfo)
    except OSError:
        return False


class SshSharing:
    """One ssh connection per server for all of a run's rsync/scp/sftp calls. duplicity starts
    a new ssh for every listing, volume and metadata file, and each would pay a key exchange,
    most of the cost of a call. The first ssh becomes
    the master (ControlPersist, so it outlives that call); close() ends the masters, and one
    left behind by a killed run exits after 60 idle seconds. Options the user sets
    (BACKUP_DUPLICITY_SSH_OPTIONS: Control*, Ciphers) are left as they are."""

    def __init__(self) -> None:
        self.directory: Optional[str] = None
        self.lock = threading.Lock()     # chains side by side ask at the same moment

    def options(self, config: Config) -> str:
        options = config.get("BACKUP_DUPLICITY_SSH_OPTIONS")
        scheme = urllib.parse.urlsplit(config.setting("BACKUP_DUPLICITY_URL")).scheme
        if scheme not in SSH_SCHEMES:
            return options
        added = []
        if "control" not in options.lower():
            with self.lock:
                if self.directory is None:
                    # short: a unix socket path has at most 107 bytes, %C adds 40
                    self.directory = tempfile.mkdtemp(prefix="rescue-ssh-",
                                                      dir="/tmp" if os.access("/tmp", os.W_OK) else None)
            added.append(f"-oControlMaster=auto -oControlPath={self.directory}/%C -oControlPersist=60")
        if "ciphers" not in options.lower() and cpu_has_aes():
            added.append("-oCiphers=" + FAST_SSH_CIPHERS)
        return " ".join(([options] if options else []) + added)

    def close(self, runner: "Runner") -> None:
        if self.directory is None:
            return
        for entry in os.scandir(self.directory):
            try:
                runner.run(["ssh", "-S", entry.path, "-O", "exit", "rescue-backup-server"], check=False, timeout=15)
            except RescueError as exc:
                runner.log.debug(f"could not end the shared ssh connection: {exc.message}")
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = None


@dataclass
class Context:
    """What a workflow gets: nothing is global."""

    args: argparse.Namespace
    config: Config
    log: Log
    runner: Runner
    ssh: "SshSharing" = field(default_factory=lambda: SshSharing())
    typed: Dict[str, str] = field(default_factory=dict)   # passphrases typed in this run, by purpose
    backup_opened: bool = False    # this run fetched the layout chain: the backup is there and decrypts

    def ssh_options(self) -> str:
        return self.ssh.options(self.config)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise RescueError(f"'rescue {what}' must run as root", f"run: sudo rescue {what}")


DEFAULT_VAR_DIR = "/var/lib/rescue"


def var_dir(config: Config) -> Path:
    return Path(config.setting("VAR_DIR") or DEFAULT_VAR_DIR)


def layout_dir(config: Config) -> Path:
    return Path(config.setting("LAYOUT_DIR") or DEFAULT_VAR_DIR + "/layout")


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o600, keep_dir_time: bool = False,
                  owner: Optional[Tuple[int, int]] = None) -> "Iterator[BinaryIO]":
    """A file written whole or not at all: written beside path, flushed to disk and renamed
    over it, so a reader or a crash (a full disk, a kill) sees the old content or the new,
    never a part. keep_dir_time: the directory keeps its times (it is backed up, and verify
    compares it). owner: (uid, gid) the file gets before it takes path's place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    before = os.stat(str(path.parent)) if keep_dir_time else None
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(str(partial), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as stream:
            if owner is not None and (os.fstat(stream.fileno()).st_uid, os.fstat(stream.fileno()).st_gid) != owner:
                os.fchown(stream.fileno(), *owner)
            os.fchmod(stream.fileno(), mode)
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(str(partial), str(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(str(partial))
        raise
    if before is not None:
        os.utime(str(path.parent), ns=(before.st_atime_ns, before.st_mtime_ns))


def write_file(path: Path, data: Union[str, bytes], mode: int = 0o600, keep_dir_time: bool = False) -> None:
    """Write a whole file atomically (see atomic_output); text as UTF-8."""
    with atomic_output(path, mode, keep_dir_time) as stream:
        stream.write(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)


OWNER_FILE = ".rescue-owner"


def process_identity(pid: int) -> str:
    """"PID STARTTIME" of a live process, "" when it is gone (a reused pid is another process)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return f"{pid} {fields[19]}" if len(fields) > 19 else ""


def sweep_stale_work(parent: str, prefix: str) -> None:
    """Remove the work directories of runs that died without cleaning up (SIGKILL): a copy of
    the keyring or duplicity's temporary volumes must not outlive the run that made them."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                owner = Path(entry.path, OWNER_FILE).read_text().strip()
                alive = process_identity(int(owner.split()[0])) == owner
            except (OSError, ValueError, IndexError):
                continue                          # not rescue's, or being made right now
            if not alive:
                shutil.rmtree(entry.path, ignore_errors=True)


@contextlib.contextmanager
def work_directory(prefix: str, parent: Optional[str] = None) -> "Iterator[Path]":
    """A new private directory, removed afterwards; it names its owner, so that the next run
    removes it should this one be killed."""
    parent = parent or tempfile.gettempdir()
    sweep_stale_work(parent, prefix)
    try:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as exc:
        raise RescueError(f"cannot create a working directory in {parent}: {exc.strerror}",
                          "it must be a writable directory (for a restore: the target; else $TMPDIR)") from None
    try:
        (path / OWNER_FILE).write_text(process_identity(os.getpid()) + "\n")
        yield path
    finally:
        shutil.rmtree(str(path), ignore_errors=True)


class Lock:
    """An exclusive flock; the kernel releases it when the holder exits, however it exits."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self.fd: Optional[int] = None

    def __enter__(self) -> "Lock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RescueError(f"cannot create the lock file {self.path}: {exc.strerror}",
                              "set LOCKFILE to a file in a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").split()
            os.close(fd)
            pid = holder[0] if holder else "unknown"
            running = " ".join(holder[1:]) or "a workflow"
            raise RescueError(f"another rescue process (PID {pid}) is running {running}",
                              f"wait for PID {pid} to finish; the lock ({self.path}) is released "
                              "when it exits") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.what}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def ask_line(prompt: str, timeout: float, echo: bool = True) -> Optional[str]:
    """Read one line (without echo on a terminal when echo is False); None when no answer came
    within timeout seconds or the input ended."""
    stream = sys.stdin
    old = termios.tcgetattr(stream.fileno()) if stream.isatty() else None
    sys.stderr.write(prompt)
    sys.stderr.flush()
    try:
        if old is not None and not echo:
            quiet = list(old)
            quiet[3] &= ~termios.ECHO
            termios.tcsetattr(stream.fileno(), termios.TCSADRAIN, quiet)
        ready, _, _ = select.select([stream], [], [], timeout)
        answer = stream.readline() if ready else None
    finally:
        if old is not None and not echo:
            termios.tcsetattr(stream.fileno(), termios.TCSADRAIN, old)
        if not echo or not answer:
            sys.stderr.write("\n")
    return answer.rstrip("\n") if answer else None


def ask_secret(prompt: str, timeout: float) -> str:
    """A passphrase typed without echo; empty when nothing was typed before the input ended."""
    answer = ask_line(prompt, timeout, echo=False)
    if answer is None and select.select([sys.stdin], [], [], 0)[0] == []:
        raise RescueError(f"no answer within {timeout:g} seconds", "run again and type the passphrase")
    return answer or ""


# =============================================================================================
# 7. layout model
#
# What a recovery needs to know about the machine's storage, as typed data with explicit
# dependencies (a partition names its disk, a PV its device, an LV its VG, a filesystem its
# device, a mount its filesystem and parent mount), saved as versioned, deterministic JSON.
# The recreate plan is a topological order of this graph. Schema: docs/layout.md.
# =============================================================================================

LAYOUT_VERSION = 1


@dataclass
class PartitionTable:
    label: str                        # "gpt" or "dos"
    id: Optional[str] = None          # disk GUID or MBR disk identifier (0x…)
    first_lba: Optional[int] = None
    last_lba: Optional[int] = None
    sector_size: int = 512


@dataclass
class Disk:
    id: str                           # /dev/vda, /dev/nvme0n1, /dev/md127 (a partitioned array)
    size: int                         # bytes
    logical_sector_size: int = 512
    physical_sector_size: int = 512
    model: Optional[str] = None
    serial: Optional[str] = None
    wwn: Optional[str] = None
    transport: Optional[str] = None
    by_id: List[str] = field(default_factory=list)
    partition_table: Optional[PartitionTable] = None


@dataclass
class Partition:
    id: str                           # /dev/vda1
    disk: str
    number: int
    start: int                        # in sectors of the table's sector size
    size: int                         # in sectors
    type: str                         # MBR id ("83") or GPT type GUID
    role: str = "primary"             # primary | extended | logical (MBR); primary for GPT
    uuid: Optional[str] = None        # PARTUUID of GPT partitions
    name: Optional[str] = None        # GPT partition name
    attrs: Optional[str] = None
    bootable: bool = False


@dataclass
class MdArray:
    id: str                           # /dev/md0
    level: str
    devices: List[str]
    uuid: Optional[str] = None
    name: Optional[str] = None
    metadata: Optional[str] = None
    raid_devices: Optional[int] = None
    chunk_size: Optional[str] = None
    layout: Optional[str] = None
    spares: List[str] = field(default_factory=list)


@dataclass
class Luks:
    id: str                           # /dev/mapper/<name>
    name: str
    device: str
    version: int
    uuid: Optional[str] = None
    cipher: Optional[str] = None
    key_size: Optional[int] = None    # bits
    hash: Optional[str] = None
    pbkdf: Optional[str] = None
    crypttab_options: Optional[str] = None
    sector_size: Optional[int] = None  # LUKS2 data sector size
    label: Optional[str] = None        # LUKS2 label


@dataclass
class PhysicalVolume:
    device: str
    uuid: str
    vg: Optional[str]
    size: int


@dataclass
class VolumeGroup:
    name: str
    uuid: str
    extent_size: int                  # bytes
    size: int
    pvs: List[str] = field(default_factory=list)


@dataclass
class LogicalVolume:
    id: str                           # /dev/mapper/vg0-root
    vg: str
    name: str
    uuid: str
    size: int
    segment_type: str = "linear"
    stripes: int = 1
    stripe_size: int = 0
    data_copies: int = 1
    pool: Optional[str] = None        # the thin pool of a thin volume
    metadata_size: Optional[int] = None   # of a thin pool


@dataclass
class Filesystem:
    device: str
    type: str
    uuid: Optional[str] = None
    label: Optional[str] = None
    size: Optional[int] = None
    used: Optional[int] = None
    options: Dict[str, object] = field(default_factory=dict)   # what mkfs needs to recreate it


@dataclass
class Swap:
    device: str
    uuid: Optional[str] = None
    label: Optional[str] = None


@dataclass
class Mount:
    mountpoint: str
    device: str
    type: str
    options: str
    parent: Optional[str] = None      # the mountpoint this one is mounted inside
    subvolume: Optional[str] = None   # btrfs: the subvolume mounted here


@dataclass
class Exclusion:
    what: str
    kind: str
    reason: str


@dataclass
class Boot:
    firmware: str                     # bios | uefi
    distribution: Dict[str, str] = field(default_factory=dict)
    family: str = "unknown"           # debian | rhel | suse | unknown
    bootloader: Optional[str] = None  # grub2 | None
    grub_disks: List[str] = field(default_factory=list)
    esp: Optional[str] = None
    efi_entries: List[Dict[str, str]] = field(default_factory=list)
    tools: Dict[str, str] = field(default_factory=dict)


@dataclass
class Interface:
    name: str                         # eth0, enp1s0
    mac: str
    addresses: List[str] = field(default_factory=list)    # 192.168.122.10/24, global scope only


@dataclass
class Network:
    """The machine's network interfaces with a device (not lo, bridges, VPNs), for a rescue
    system that comes up as the machine did and for moving its configuration to new NICs."""
    interfaces: List[Interface] = field(default_factory=list)
    gateway: Optional[str] = None
    nameservers: List[str] = field(default_factory=list)


@dataclass
class BackupFilesystem:
    """The filesystem that held a file:// backup (a USB or second disk) when the layout was
    saved: the rescue system mounts it where it was, and no plan may wipe its disk."""
    mountpoint: str
    uuid: str
    fstype: str
    label: Optional[str] = None


@dataclass
class Layout:
    hostname: str
    boot: Boot
    disks: List[Disk] = field(default_factory=list)
    partitions: List[Partition] = field(default_factory=list)
    md_arrays: List[MdArray] = field(default_factory=list)
    luks: List[Luks] = field(default_factory=list)
    physical_volumes: List[PhysicalVolume] = field(default_factory=list)
    volume_groups: List[VolumeGroup] = field(default_factory=list)
    logical_volumes: List[LogicalVolume] = field(default_factory=list)
    filesystems: List[Filesystem] = field(default_factory=list)
    swaps: List[Swap] = field(default_factory=list)
    mounts: List[Mount] = field(default_factory=list)
    excluded: List[Exclusion] = field(default_factory=list)
    unsupported: List[Exclusion] = field(default_factory=list)
    network: Network = field(default_factory=Network)
    backup_filesystem: Optional[BackupFilesystem] = None
    version: int = LAYOUT_VERSION


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name LVM gives an LV: dashes inside names are doubled."""
    return f"/dev/mapper/{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def partition_label(p: Partition, layout: Layout, on: str) -> Tuple[str, Optional[str], str]:
    disk = next((d for d in layout.disks if d.id == p.disk), None)
    sector = disk.partition_table.sector_size if disk and disk.partition_table else 512
    name = f" '{p.name}'" if p.name else ""
    return (f"{p.id}  {human_size(p.size * sector)}  #{p.number} {p.role} type {p.type}{name}"
            + (" boot" if p.bootable else ""), p.id, "")


def md_label(md: MdArray, layout: Layout, on: str) -> Tuple[str, Optional[str], str]:
    role = " (spare)" if on in md.spares else ""
    return (f"{md.id}  {md.level}{role}, {len(md.devices)} devices, metadata {md.metadata}, UUID {md.uuid}",
            md.id, f"{md.id}{role} (shown above)")


def luks_label(lk: Luks, layout: Layout, on: str) -> Tuple[str, Optional[str], str]:
    return f"{lk.id}  LUKS{lk.version} {lk.cipher} {lk.key_size}-bit, UUID {lk.uuid}", lk.id, ""


def pv_label(pv: PhysicalVolume, layout: Layout, on: str) -> Tuple[str, Optional[str], str]:
    vg = next((v for v in layout.volume_groups if v.name == pv.vg), None)
    if vg is None:
        return f"LVM PV of {pv.vg}", None, ""
    return (f"LVM PV -> VG {vg.name}  {human_size(vg.size)}, extents {human_size(vg.extent_size)}, "
            f"{len(vg.pvs)} PV{'s' if len(vg.pvs) != 1 else ''}", vg.name, f"LVM PV of {pv.vg} (shown above)")


def lv_label(lv: LogicalVolume, layout: Layout, on: str) -> Tuple[str, Optional[str], str]:
    return f"{lv.vg}/{lv.name}  {human_size(lv.size)}  {lv.segment_type}", lv.id, ""


def fs_label(fs: Filesystem, layout: Layout, on: str) -> Tuple[str, Optional[str], str]:
    label = f" LABEL={fs.label}" if fs.label else ""
    mounts = [m for m in layout.mounts if m.device == fs.device]
    where = ", ".join(m.mountpoint + (f" (subvolume {m.subvolume})" if m.subvolume else "") for m in mounts)
    used = f"  {human_size(fs.used)} used of {human_size(fs.size)}" if fs.size else ""
    return f"{fs.type}  {uuid_text(fs.uuid)}{label}" + (f"  -> {where}" if where else "") + used, None, ""


def uuid_text(uuid: Optional[str]) -> str:
    return f"UUID={uuid}" if uuid else "UUID unknown"


def swap_label(swap: Swap, layout: Layout, on: str) -> Tuple[str, Optional[str], str]:
    return f"swap  {uuid_text(swap.uuid)}" + (f" LABEL={swap.label}" if swap.label else ""), None, ""


@dataclass(frozen=True)
class Kind:
    """The facts about one kind of layout item, in one place: where a Layout keeps its items,
    their class, their order in layout.json, how a change names them, what each stands on
    (the devices, volume group or mountpoint it is made on: the edges of the recreate
    graph), what later items name it by, and its line in the readable tree."""
    items: str                                         # the Layout attribute
    cls: type
    title: str                                         # "LV vg0/root added"
    sort_key: Callable[[object], object]
    name: Callable[[object], str]                      # its identity, for people and diffs
    stands_on: Callable[[object], List[str]] = lambda item: []
    provides: Callable[[object], Optional[str]] = lambda item: None
    # (its line, the device its own users hang on, its line when that was drawn already)
    label: Optional[Callable[[object, "Layout", str], Tuple[str, Optional[str], str]]] = None
    volatile: FrozenSet[str] = frozenset()             # fields that change while a system runs
    compared: bool = True                              # by checklayout


KINDS = (
    Kind("disks", Disk, "disk", lambda d: d.id, lambda d: d.id, provides=lambda d: d.id),
    Kind("partitions", Partition, "partition", lambda p: (p.disk, p.number), lambda p: p.id,
         stands_on=lambda p: [p.disk], provides=lambda p: p.id, label=partition_label),
    Kind("md_arrays", MdArray, "RAID", lambda m: m.id, lambda m: m.id,
         stands_on=lambda m: m.devices + m.spares, provides=lambda m: m.id, label=md_label),
    Kind("luks", Luks, "LUKS", lambda x: x.id, lambda x: x.id,
         stands_on=lambda x: [x.device], provides=lambda x: x.id, label=luks_label),
    Kind("physical_volumes", PhysicalVolume, "PV", lambda p: p.device, lambda p: p.device,
         stands_on=lambda p: [p.device], label=pv_label),
    Kind("volume_groups", VolumeGroup, "VG", lambda v: v.name, lambda v: v.name,
         stands_on=lambda v: list(v.pvs), provides=lambda v: v.name),
    Kind("logical_volumes", LogicalVolume, "LV", lambda lv: (lv.vg, lv.name), lambda lv: f"{lv.vg}/{lv.name}",
         stands_on=lambda lv: [lv.vg] + ([dm_name(lv.vg, lv.pool)] if lv.pool else []),
         provides=lambda lv: lv.id, label=lv_label),
    Kind("filesystems", Filesystem, "filesystem", lambda f: f.device, lambda f: f.device,
         stands_on=lambda f: [f.device], provides=lambda f: f.device, label=fs_label, volatile=frozenset({"used"})),
    Kind("swaps", Swap, "swap", lambda s: s.device, lambda s: s.device, stands_on=lambda s: [s.device],
         label=swap_label),
    Kind("mounts", Mount, "mount", lambda m: m.mountpoint, lambda m: m.mountpoint,
         stands_on=lambda m: [m.device] + ([m.parent] if m.parent else []), provides=lambda m: m.mountpoint),
    Kind("excluded", Exclusion, "excluded", lambda e: (e.kind, e.what), lambda e: e.what, compared=False),
    Kind("unsupported", Exclusion, "unsupported", lambda e: (e.kind, e.what), lambda e: e.what),
)


def add_items(layout: Layout, items: Sequence[object]) -> None:
    """Put each item into the Layout's list of its kind."""
    for item in items:
        kind = next(k for k in KINDS if type(item) is k.cls and k.cls is not Exclusion)
        getattr(layout, kind.items).append(item)


def sort_layout(layout: Layout) -> Layout:
    for kind in KINDS:
        getattr(layout, kind.items).sort(key=kind.sort_key)
    return layout


def layout_digest(data: dict) -> str:
    """sha256 of a layout's content (its JSON without the digest itself)."""
    content = {k: v for k, v in data.items() if k != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def layout_to_json(layout: Layout) -> str:
    data = dataclasses.asdict(sort_layout(layout))
    data["digest"] = layout_digest(data)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def layout_from_json(text: str, source: str = "layout.json") -> Layout:
    """A layout.json read back, with every field checked against the model: a recovery must
    not start from a file that is truncated, of another version, or changed by accident."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("version") != LAYOUT_VERSION:
            raise RescueError(f"{source} has layout version {data.get('version')!r}, this rescue "
                              f"reads version {LAYOUT_VERSION}", "recreate it with rescue savelayout")
        if "digest" in data and data["digest"] != layout_digest(data):
            raise RescueError(f"{source} was changed after rescue savelayout wrote it (its digest does not match)",
                              'if you changed it on purpose, delete its "digest" line; else make it anew '
                              "with rescue savelayout")
        items = {kind.items: [item_from_dict(kind.cls, d, f"{kind.items}[{n}]") for n, d in enumerate(data.get(kind.items, []))]
                 for kind in KINDS}
        boot = item_from_dict(Boot, data["boot"], "boot")
        network = item_from_dict(Network, data.get("network", {}), "network")
        backup_fs = data.get("backup_filesystem")
        if backup_fs is not None:
            backup_fs = item_from_dict(BackupFilesystem, backup_fs, "backup_filesystem")
        if not isinstance(data["hostname"], str):
            raise ValueError("hostname: not a string")
        return Layout(hostname=data["hostname"], boot=boot, network=network, backup_filesystem=backup_fs, **items)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RescueError(f"{source} is not a valid layout: {exc}",
                          "recreate it with rescue savelayout") from None


def item_from_dict(cls, data: dict, where: str):
    """An item of the model from its JSON object, each field of the type the model says
    (fields from newer versions are ignored)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: not a JSON object")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ValueError(f"{where}: {f.name} is missing")
            continue
        value, hint = data[f.name], hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if inner and typing.get_origin(hint) is Union and value is not None:      # Optional[an item]
            value = item_from_dict(inner[0], value, f"{where}.{f.name}")
        elif inner and isinstance(value, list):                                 # List[an item]
            value = [item_from_dict(inner[0], v, f"{where}.{f.name}[{n}]") for n, v in enumerate(value)]
        elif not fits_type(value, hint):
            raise ValueError(f"{where}: {f.name} is {json.dumps(value)[:40]}, not of the right type")
        values[f.name] = value
    return cls(**values)


def fits_type(value: object, hint: object) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(fits_type(value, a) for a in args)
    if origin in (list, List):
        return isinstance(value, list) and all(fits_type(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin in (dict, Dict):
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is object:
        return True
    return isinstance(value, hint) if isinstance(hint, type) else True


# =============================================================================================
# 8. capture
#
# Facts come from tools that speak JSON where they can (lsblk, sfdisk, lvm, findmnt) and from
# text otherwise (mdadm, cryptsetup, dumpe2fs, xfs_info, blkid, btrfs, efibootmgr, /proc).
# Parsers are pure functions of text; a Probe runs the tools, and can record every output into
# a directory (a support bundle) or replay one without running anything.
# =============================================================================================

LSBLK_COLUMNS = ("NAME,KNAME,PKNAME,MAJ:MIN,TYPE,SIZE,LOG-SEC,PHY-SEC,MODEL,SERIAL,WWN,TRAN,RM,"
                 "FSTYPE,UUID,LABEL,PARTUUID,PARTLABEL,PARTTYPE,PARTFLAGS")
FINDMNT_COLUMNS = "TARGET,SOURCE,MAJ:MIN,FSTYPE,OPTIONS,SIZE,USED,FSROOT"
LVM_REPORT = ("--reportformat", "json", "--units", "b", "--nosuffix")
PV_FIELDS = "pv_name,pv_uuid,pv_size,vg_name"
VG_FIELDS = "vg_name,vg_uuid,vg_extent_size,vg_size"
LV_FIELDS = ("lv_name,vg_name,lv_uuid,lv_size,segtype,stripes,stripe_size,data_copies,pool_lv,"
             "lv_metadata_size,lv_attr")
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "ceph", "glusterfs",
                        "fuse.sshfs", "fuse.glusterfs", "fuse.s3fs", "9p", "davfs", "fuse.rclone"})
RUNTIME_TREES = ("/proc", "/sys", "/dev", "/run")
SUPPORTED_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "vfat", "btrfs"})
UNSUPPORTED_FSTYPES = {"zfs_member": "ZFS pool member", "bcache": "bcache device",
                       "drbd": "DRBD device", "ceph_bluestore": "Ceph OSD"}
UNSUPPORTED_NODE_TYPES = {"mpath": "multipath map", "dmraid": "BIOS RAID (dmraid)",
                          "dm": "device-mapper target", "bcache": "bcache device"}
SUPPORTED_SEGTYPES = frozenset({"linear", "striped", "raid0", "raid0_meta", "raid1", "raid4",
                                "raid5", "raid5_la", "raid5_ls", "raid5_ra", "raid5_rs", "raid5_n",
                                "raid6", "raid6_zr", "raid6_nr", "raid6_nc", "raid10", "mirror",
                                "thin-pool", "thin"})
ESP_TYPES = frozenset({"c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "ef", "0xef"})
EXTENDED_TYPES = frozenset({"5", "f", "85", "0x5", "0xf", "0x85"})


def loads_lenient(text: str):
    """JSON as some sfdisk and lvm versions really print it: trailing commas are tolerated."""
    try:
        return json.loads(text)
    except ValueError:
        return json.loads(re.sub(r",(\s*[}\]])", r"\1", text))


def to_int(value) -> Optional[int]:
    if value in (None, "", "-"):
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def to_bool(value) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true")


@dataclass
class BlockNode:
    """One device as lsblk sees it, with every parent (a RAID or VG can have several)."""

    name: str
    kname: str
    type: str
    size: int
    majmin: str = ""
    log_sec: int = 512
    phy_sec: int = 512
    model: Optional[str] = None
    serial: Optional[str] = None
    wwn: Optional[str] = None
    tran: Optional[str] = None
    removable: bool = False
    fstype: Optional[str] = None
    uuid: Optional[str] = None
    label: Optional[str] = None
    parttype: Optional[str] = None
    parents: List[str] = field(default_factory=list)
    children: List[str] = field(default_factory=list)


def parse_lsblk(text: str) -> Dict[str, BlockNode]:
    """lsblk -J (tree or list form) -> nodes by NAME. Multi-parent devices appear once."""
    nodes: Dict[str, BlockNode] = {}

    def clean(value):
        return value.strip() if isinstance(value, str) and value.strip() else None

    def walk(entry: dict, parent: Optional[str]) -> None:
        name = entry["name"]
        node = nodes.get(name)
        if node is None:
            node = nodes[name] = BlockNode(
                name=name, kname=entry.get("kname") or name, type=entry.get("type") or "",
                size=to_int(entry.get("size")) or 0, majmin=entry.get("maj:min") or "",
                log_sec=to_int(entry.get("log-sec")) or 512, phy_sec=to_int(entry.get("phy-sec")) or 512,
                model=clean(entry.get("model")), serial=clean(entry.get("serial")),
                wwn=clean(entry.get("wwn")), tran=clean(entry.get("tran")),
                removable=to_bool(entry.get("rm")), fstype=clean(entry.get("fstype")),
                uuid=clean(entry.get("uuid")), label=entry.get("label"),
                parttype=clean(entry.get("parttype")))
        parent = parent or entry.get("pkname")
        if parent and parent not in node.parents:
            node.parents.append(parent)
        for child in entry.get("children") or []:
            if child["name"] not in node.children:
                node.children.append(child["name"])
            walk(child, name)

    for entry in loads_lenient(text).get("blockdevices", []):
        walk(entry, None)
    return nodes


def partition_number(node: str) -> Optional[int]:
    match = re.search(r"(\d+)$", node)
    return int(match.group(1)) if match else None


def partition_device(disk: str, number: int) -> str:
    return f"{disk}{'p' if disk[-1].isdigit() else ''}{number}"


def parse_sfdisk(text: str, disk: str) -> Tuple[PartitionTable, List[Partition]]:
    """sfdisk -J DISK -> its table and partitions (node names may be paths, numbers or removed)."""
    table = loads_lenient(text)["partitiontable"]
    label = table.get("label", "")
    pt = PartitionTable(label=label, id=table.get("id"), first_lba=to_int(table.get("firstlba")),
                        last_lba=to_int(table.get("lastlba")),
                        sector_size=to_int(table.get("sectorsize")) or 512)
    parts = []
    for entry in table.get("partitions", []):
        number = partition_number(str(entry.get("node", "")))
        if number is None:
            continue
        ptype = str(entry.get("type", "")).lower()
        role = "primary"
        if label == "dos":
            role = "extended" if ptype in EXTENDED_TYPES else ("logical" if number > 4 else "primary")
        parts.append(Partition(
            id=partition_device(disk, number), disk=disk, number=number,
            start=to_int(entry.get("start")) or 0, size=to_int(entry.get("size")) or 0,
            type=ptype, role=role, uuid=entry.get("uuid"), name=entry.get("name"),
            attrs=entry.get("attrs"), bootable=bool(entry.get("bootable"))))
    return pt, parts


def parse_lvm_report(text: str, kind: str) -> List[Dict[str, str]]:
    rows: List[Dict[str, str]] = []
    for report in loads_lenient(text).get("report", []):
        rows.extend(report.get(kind, []))
    return [{k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()} for row in rows]


def parse_mdadm_detail(text: str, device: str) -> MdArray:
    """mdadm --detail DEVICE (text) -> MdArray."""
    fields: Dict[str, str] = {}
    members: List[str] = []
    spares: List[str] = []
    for line in text.splitlines():
        key, sep, value = line.partition(" : ")
        if sep and not line.startswith("/dev/"):
            fields[key.strip().lower()] = value.strip()
            continue
        cols = line.split()
        if len(cols) >= 5 and (cols[0].isdigit() or cols[0] == "-") and cols[-1].startswith("/dev/"):
            (spares if "spare" in cols else members).append(cols[-1])
    return MdArray(
        id=device, level=fields.get("raid level", "unknown"), devices=members,
        uuid=fields.get("uuid"), name=(fields.get("name") or "").split(" ")[0] or None,
        metadata=fields.get("version"), raid_devices=to_int(fields.get("raid devices")),
        chunk_size=fields.get("chunk size"), layout=fields.get("layout"), spares=spares)


def parse_luks_dump(text: str) -> Dict[str, object]:
    """cryptsetup luksDump (LUKS1 or LUKS2) -> version, uuid, cipher, key size, hash, pbkdf.
    Only these header fields are kept: never salts, digests or anything derived from keys."""
    out: Dict[str, object] = {}
    values: Dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values.setdefault(key.strip().lower(), value.strip())
    out["version"] = to_int(values.get("version")) or 1
    out["uuid"] = values.get("uuid")
    if out["version"] == 1:
        name, mode = values.get("cipher name"), values.get("cipher mode")
        out["cipher"] = f"{name}-{mode}" if name and mode else name
        out["key_size"] = to_int(values.get("mk bits"))
        out["hash"] = values.get("hash spec")
        out["pbkdf"] = "pbkdf2"
    else:
        out["cipher"] = values.get("cipher")
        key = re.search(r"^\s*Key:\s*(\d+) bits", text, re.M)
        out["key_size"] = int(key.group(1)) if key else None
        out["hash"] = values.get("hash")
        out["pbkdf"] = values.get("pbkdf")
        sector = re.search(r"^\s*sector:\s*(\d+) \[bytes\]", text, re.M)
        out["sector_size"] = int(sector.group(1)) if sector else None
        label = values.get("label")
        out["label"] = None if label in (None, "", "(no label)") else label
    return out


def parse_key_values(text: str, sep: str = ":") -> Dict[str, str]:
    out: Dict[str, str] = {}
    for line in text.splitlines():
        key, found, value = line.partition(sep)
        if found:
            out[key.strip()] = value.strip()
    return out


def parse_dumpe2fs(text: str) -> Dict[str, object]:
    """dumpe2fs -h -> what mkfs.ext4 needs to make the same filesystem again."""
    v = parse_key_values(text)
    block_size, blocks, inodes = (to_int(v.get(k)) for k in ("Block size", "Block count", "Inode count"))
    return {
        "block_size": block_size, "inode_size": to_int(v.get("Inode size")),
        "inode_count": inodes, "block_count": blocks,
        "reserved_blocks": to_int(v.get("Reserved block count")),
        "bytes_per_inode": (blocks * block_size // inodes) if blocks and block_size and inodes else None,
        "features": sorted((v.get("Filesystem features") or "").split()),
        "revision": (v.get("Filesystem revision #") or "").split(" ")[0] or None,
    }


def parse_xfs_info(text: str) -> Dict[str, Dict[str, str]]:
    """xfs_info -> {section: {key: value}}; a section's leading words (the device, "version 2",
    "internal log") are kept as its "value"."""
    sections: Dict[str, Dict[str, str]] = {}
    current = ""
    for line in text.splitlines():
        head, sep, rest = line.partition("=")
        if not sep:
            continue
        if head.strip():
            current = head.strip()
            words = []
            for token in rest.split():
                if "=" in token:
                    break
                words.append(token)
            if words:
                sections.setdefault(current, {})["value"] = " ".join(words)
        section = sections.setdefault(current, {})
        for key, value in re.findall(r"([a-z0-9_-]+)=([^\s,]+)", rest):
            section[key] = value
    return sections


def parse_blkid_export(text: str) -> Dict[str, str]:
    """blkid -o export: KEY=value lines, values backslash-escaped for the shell."""
    return {k: re.sub(r"\\(.)", r"\1", v) for k, v in parse_key_values(text, "=").items()}


def parse_btrfs_subvolumes(text: str) -> List[Dict[str, object]]:
    """btrfs subvolume list -a -p MOUNTPOINT -> [{id, parent, path}]."""
    out = []
    for line in text.splitlines():
        match = re.match(r"ID (\d+) gen \d+ parent (\d+) top level \d+ path (.*)$", line.strip())
        if match:
            path = re.sub(r"^<FS_TREE>/", "", match.group(3))
            out.append({"id": int(match.group(1)), "parent": int(match.group(2)), "path": path})
    return out


def parse_btrfs_default(text: str) -> Optional[int]:
    match = re.match(r"ID (\d+)", text.strip())
    return int(match.group(1)) if match else None


def parse_findmnt(text: str) -> List[Dict[str, object]]:
    """findmnt -J (list or tree form) -> flat list of mounts."""
    out: List[Dict[str, object]] = []

    def walk(entries):
        for entry in entries:
            out.append(entry)
            walk(entry.get("children") or [])

    walk(loads_lenient(text).get("filesystems", []))
    return out


def parse_proc_swaps(text: str) -> List[Tuple[str, str]]:
    """/proc/swaps -> [(path, type)] where type is partition or file."""
    rows = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 2:
            rows.append((cols[0].replace("\\040", " "), cols[1]))
    return rows


def parse_os_release(text: str) -> Dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("ID", "ID_LIKE", "VERSION_ID", "PRETTY_NAME"):
            out[key.strip().lower()] = value.strip().strip('"\'')
    return out


def distribution_family(os_release: Dict[str, str]) -> str:
    ids = {os_release.get("id", "")} | set(os_release.get("id_like", "").split())
    for family, members in (("rhel", {"rhel", "fedora", "centos", "almalinux", "rocky", "ol"}),
                            ("suse", {"suse", "sles", "opensuse", "opensuse-leap", "opensuse-tumbleweed"}),
                            ("debian", {"debian", "ubuntu"})):
        if ids & members:
            return family
    return "unknown"


def parse_efibootmgr(text: str) -> List[Dict[str, str]]:
    """efibootmgr -v -> [{num, label, path, active}] for each Boot#### entry."""
    entries = []
    for line in text.splitlines():
        match = re.match(r"Boot([0-9A-Fa-f]{4})(\*?)\s+(.*)$", line)
        if not match:
            continue
        label, tab, path = match.group(3).partition("\t")
        if not tab:                    # output copied from a terminal: the tab became spaces
            split = re.match(r"(.*?)\s+((?:HD|PciRoot|FvVol|BBS|VenHw|VenMsg|MAC|Uri)\(.*)$", label)
            label, path = (split.group(1), split.group(2)) if split else (label, "")
        entries.append({"num": match.group(1).upper(), "active": "yes" if match.group(2) else "no",
                        "label": label.strip(), "path": path.strip()})
    return entries


def parse_crypttab(text: str) -> Dict[str, Tuple[str, str]]:
    """/etc/crypttab -> {name: (device, options)}; the key file field is not kept."""
    out = {}
    for line in text.splitlines():
        cols = line.split()
        if cols and not cols[0].startswith("#") and len(cols) >= 2:
            out[cols[0]] = (cols[1], cols[3] if len(cols) >= 4 else "")
    return out


class Probe:
    """Where capture gets its facts. Live: runs read-only tools through the Runner (and with
    record_dir, keeps every output, one file per command, named after it). Replay: answers
    from such a directory and runs nothing."""

    MANIFEST = "manifest.json"

    def __init__(self, runner: Optional[Runner] = None, record_dir: Optional[Path] = None,
                 replay_dir: Optional[Path] = None) -> None:
        self.runner = runner
        self.record_dir = record_dir
        self.replay_dir = replay_dir
        self.manifest: Dict[str, dict] = {}
        if replay_dir is not None:
            try:
                self.manifest = json.loads((replay_dir / self.MANIFEST).read_text())
            except (OSError, ValueError) as exc:
                raise RescueError(f"{replay_dir} is not a rescue recording: {exc}",
                                  "make one with: rescue savelayout --record DIR") from None
        elif record_dir is not None:
            record_dir.mkdir(parents=True, exist_ok=True)

    # -- answers ------------------------------------------------------------------------------

    def run(self, argv: Sequence[str], output_arg: Optional[int] = None, optional: bool = False) -> Optional[Result]:
        """Run a read-only tool. None when the program is not installed. With output_arg, that
        argument is a file the tool writes, and its content is the result's stdout. optional:
        a recording made before rescue asked this question answers "not installed"."""
        key = "run: " + " ".join(shlex.quote(a) for a in argv)
        if self.replay_dir is not None:
            entry = self.manifest.get(key, {"missing": True}) if optional else self._replayed(key)
            if entry.get("missing"):
                return None
            return Result(list(argv), entry["returncode"], self._read_text(entry["file"]),
                          self._read_text(entry["file"] + ".stderr"), 0.0)
        if not self.which(argv[0]):
            self._record(key, {"missing": True})
            return None
        result = self._run_live(list(argv), output_arg)
        self._record(key, {"returncode": result.returncode}, result.stdout, result.stderr)
        return result

    def _run_live(self, argv: List[str], output_arg: Optional[int]) -> Result:
        if output_arg is None:
            return self.runner.run(argv, check=False, timeout=120)
        with tempfile.TemporaryDirectory(prefix="rescue-probe-") as tmp:
            out = Path(tmp) / "output"
            argv[output_arg] = str(out)
            result = self.runner.run(argv, check=False, timeout=120)
            result.stdout = out.read_text(errors="surrogateescape") if out.exists() else ""
            return result

    def read(self, path: str, limit: Optional[int] = None, optional: bool = False) -> Optional[bytes]:
        """A file's bytes (the first `limit`), or None when it cannot be read (optional: as run)."""
        key = f"read: {path}" + (f" [{limit}]" if limit else "")
        if self.replay_dir is not None:
            entry = self.manifest.get(key, {"missing": True}) if optional else self._replayed(key)
            return None if entry.get("missing") else (self.replay_dir / entry["file"]).read_bytes()
        try:
            with open(path, "rb") as handle:
                data = handle.read(limit) if limit else handle.read()
        except OSError:
            self._record(key, {"missing": True})
            return None
        self._record(key, {}, data)
        return data

    def read_text(self, path: str) -> Optional[str]:
        data = self.read(path)
        return None if data is None else data.decode("utf-8", "surrogateescape")

    def read_text_optional(self, path: str) -> Optional[str]:
        data = self.read(path, optional=True)
        return None if data is None else data.decode("utf-8", "surrogateescape")

    def exists(self, path: str, optional: bool = False) -> bool:
        key = f"exists: {path}"
        if optional and self.replay_dir is not None and key not in self.manifest:
            return False
        return bool(self._value(key, lambda: os.path.exists(path)))

    def which(self, program: str) -> Optional[str]:
        return self._value(f"which: {program}", lambda: shutil_which(program))

    def links(self, directory: str) -> Dict[str, str]:
        """Symlinks in a directory (e.g. /dev/disk/by-id) -> {name: resolved target}."""
        def live() -> Dict[str, str]:
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                return {}
            return {n: os.path.realpath(os.path.join(directory, n)) for n in names}
        return self._value(f"links: {directory}", live) or {}

    # -- recording ----------------------------------------------------------------------------

    def _value(self, key: str, live):
        if self.replay_dir is not None:
            return self._replayed(key).get("value")
        value = live()
        self._record(key, {"value": value})
        return value

    def _replayed(self, key: str) -> dict:
        try:
            return self.manifest[key]
        except KeyError:
            raise RescueError(f"the recording in {self.replay_dir} has no answer for '{key}'",
                              "record it again on the machine with this version of rescue") from None

    def _read_text(self, name: str) -> str:
        path = self.replay_dir / name
        return path.read_text(errors="surrogateescape") if path.exists() else ""

    def _record(self, key: str, entry: dict, stdout=None, stderr: str = "") -> None:
        if self.record_dir is None:
            return
        if stdout is not None:
            name = record_file_name(key, set(e.get("file") for e in self.manifest.values()))
            data = stdout if isinstance(stdout, bytes) else stdout.encode("utf-8", "surrogateescape")
            (self.record_dir / name).write_bytes(data)
            if stderr:
                (self.record_dir / (name + ".stderr")).write_text(stderr, errors="surrogateescape")
            entry["file"] = name
        self.manifest[key] = entry
        (self.record_dir / self.MANIFEST).write_text(json.dumps(self.manifest, indent=1, sort_keys=True))


def record_file_name(key: str, taken: Set[str]) -> str:
    """A file name that reads like the command: 'run: sfdisk -J /dev/vda' -> sfdisk_-J_dev_vda."""
    base = re.sub(r"[^A-Za-z0-9.+-]+", "_", key.split(": ", 1)[1]).strip("_")[:80] or "output"
    if key.startswith("read: "):
        base = "file_" + base
    name, n = base, 2
    while name in taken:
        name, n = f"{base}.{n}", n + 1
    return name


def shutil_which(program: str) -> Optional[str]:
    return shutil.which(program, path=os.environ.get("PATH", DEFAULT_PATH) + ":" + DEFAULT_PATH)


@dataclass
class Captured:
    layout: Layout
    vgcfg: Dict[str, str]             # volume group -> its vgcfgbackup file
    warnings: List[str] = field(default_factory=list)   # what savelayout could not learn, by device


def probe_output(probe: Probe, argv: Sequence[str], required: bool = False) -> Optional[str]:
    """stdout of a read-only tool; None when it is missing or fails (unless required)."""
    result = probe.run(argv)
    if result is not None and result.returncode == 0:
        return result.stdout
    if required:
        why = "is not installed" if result is None else f"failed: {result.stderr.strip()[-300:]}"
        raise RescueError(f"cannot read the storage layout: {argv[0]} {why}",
                          "install util-linux, or run savelayout on the machine itself")
    return None


class LayoutCapture:
    """Turns probe answers into a Layout: which mounts are in scope, what they stand on."""

    def __init__(self, probe: Probe, config: Config, hostname: str) -> None:
        self.probe = probe
        self.config = config
        self.hostname = hostname
        self.excluded: List[Exclusion] = []
        self.unsupported: List[Exclusion] = []
        self.warnings: List[str] = []
        self.backup_entry: Optional[dict] = None      # findmnt's entry of a file:// backup's filesystem
        self.nodes = parse_lsblk(probe_output(probe, ["lsblk", "-J", "-b", "-p", "-o", LSBLK_COLUMNS], True))
        self.by_majmin = {n.majmin: n for n in self.nodes.values() if n.majmin}
        self.by_kname = {n.kname: n for n in self.nodes.values()}
        self.pvs, self.vgs, self.lvs = self.read_lvm()

    def exclude(self, what: str, kind: str, reason: str) -> None:
        self.excluded.append(Exclusion(what, kind, reason))

    def unsupported_item(self, what: str, kind: str, reason: str) -> None:
        if not any(u.what == what for u in self.unsupported):
            self.unsupported.append(Exclusion(what, kind, reason))

    # -- nodes and their ancestry --------------------------------------------------------------

    def node_for(self, source: str, majmin: str) -> Optional[BlockNode]:
        source = re.sub(r"\[.*\]$", "", source)
        node = self.nodes.get(source) or self.by_kname.get(source)
        if node is None and source.startswith("/dev/"):
            node = self.nodes.get(os.path.realpath(source)) or self.by_kname.get(os.path.realpath(source))
        return node or self.by_majmin.get(majmin)

    def ancestors(self, node: BlockNode) -> List[BlockNode]:
        """The node and everything it stands on; an LV brings its whole volume group."""
        seen: Dict[str, BlockNode] = {}
        stack = [node]
        while stack:
            current = stack.pop()
            if current.name in seen:
                continue
            seen[current.name] = current
            stack.extend(self.nodes[p] for p in current.parents if p in self.nodes)
            vg = self.vg_of(current)
            if vg:
                stack.extend(self.nodes[pv.device] for pv in self.pvs if pv.vg == vg and pv.device in self.nodes)
        return list(seen.values())

    def vg_of(self, node: BlockNode) -> Optional[str]:
        lv = next((lv for lv in self.lvs if lv.id == node.name), None)
        return lv.vg if lv else None

    def disk_of(self, nodes: List[BlockNode]) -> List[BlockNode]:
        return [n for n in nodes if not n.parents]

    # -- what is in scope ----------------------------------------------------------------------

    def config_exclusion(self, chain: List[BlockNode]) -> Optional[str]:
        disks = {n.name for n in self.disk_of(chain)} | {n.kname for n in self.disk_of(chain)}
        excluded_disks = set(self.config.setting("EXCLUDE_DISKS"))
        hit = disks & (excluded_disks | {f"/dev/{d}" for d in excluded_disks})
        if hit:
            return f"on {sorted(hit)[0]}, excluded by EXCLUDE_DISKS"
        vgs = {self.vg_of(n) for n in chain} - {None}
        for vg in sorted(vgs):
            if vg in self.config.setting("EXCLUDE_VG"):
                return f"in volume group {vg}, excluded by EXCLUDE_VG"
            only = self.config.setting("ONLY_INCLUDE_VG")
            if only and vg not in only:
                return f"in volume group {vg}, not in ONLY_INCLUDE_VG"
        return None

    def device_exclusion(self, chain: List[BlockNode]) -> Optional[str]:
        for disk in self.disk_of(chain):
            kind = virtual_disk_kind(disk)
            if kind:
                return f"on {disk.name}, {kind}"
            if disk.tran == "usb" or disk.removable:
                return f"on {disk.name}, removable/USB media"
        return None

    def select_mounts(self) -> List[Tuple[Mount, BlockNode]]:
        text = probe_output(self.probe, ["findmnt", "-J", "-l", "-b", "-o", FINDMNT_COLUMNS], True)
        entries = parse_findmnt(text)
        target_dir = url_path(self.config.setting("BACKUP_DUPLICITY_URL"))
        target_mount = None
        if target_dir:
            candidates = [e["target"] for e in entries if path_within(target_dir, e["target"])]
            target_mount = max(candidates, key=len) if candidates else None
        self.backup_entry = next((e for e in entries if e["target"] == target_mount and target_mount != "/"), None)
        chosen: Dict[str, Tuple[Mount, BlockNode]] = {}
        first_mount: Dict[Tuple[str, Optional[str]], str] = {}
        for entry in entries:
            picked = self.classify_mount(entry, target_mount)
            if not picked or picked[0].mountpoint in chosen:
                continue
            mount = picked[0]
            seen = first_mount.setdefault((mount.device, mount.subvolume), mount.mountpoint)
            if seen != mount.mountpoint:     # the same filesystem again: a bind mount
                self.exclude(mount.mountpoint, "mount", f"bind mount of {mount.device} (mounted at {seen})")
                continue
            chosen[mount.mountpoint] = picked
        self.mount_sizes = {e["target"]: (to_int(e.get("size")), to_int(e.get("used"))) for e in entries}
        mounts = sorted(chosen.values(), key=lambda mn: mn[0].mountpoint)
        for mount, _ in mounts:
            parents = [m.mountpoint for m, _ in mounts if m.mountpoint != mount.mountpoint
                       and path_within(mount.mountpoint, m.mountpoint)]
            mount.parent = max(parents, key=len) if parents else None
        return mounts

    def classify_mount(self, entry: dict, target_mount: Optional[str]) -> Optional[Tuple[Mount, BlockNode]]:
        target, fstype = entry["target"], entry.get("fstype") or ""
        source, fsroot = entry.get("source") or "", entry.get("fsroot") or "/"
        if fstype in NETWORK_FS or fstype.startswith("nfs"):
            return self.exclude(target, "mount", f"network filesystem ({fstype})")
        node = self.node_for(source, entry.get("maj:min") or "")
        if node is None:
            if fstype == "tmpfs" and not any(path_within(target, t) for t in RUNTIME_TREES):
                self.exclude(target, "mount", "tmpfs: its contents live in memory only")
            return None
        chain = self.ancestors(node)
        reason = (self.device_exclusion(chain) or self.config_exclusion(chain)
                  or ("excluded by EXCLUDE_MOUNTPOINTS" if target in self.config.setting("EXCLUDE_MOUNTPOINTS") else None)
                  or ("holds the backup target " + self.config.get("BACKUP_DUPLICITY_URL")
                      if target == target_mount and target != "/" else None))
        if reason is None and fsroot != "/" and fstype != "btrfs":
            reason = f"bind mount of {node.name}{fsroot}"
        if reason:
            return self.exclude(target, "mount", reason)
        subvolume = fsroot.lstrip("/") if fstype == "btrfs" and fsroot != "/" else None
        return Mount(target, node.name, fstype, entry.get("options") or "", subvolume=subvolume), node

    def select_swaps(self) -> List[BlockNode]:
        out = []
        for path, kind in parse_proc_swaps(self.probe.read_text("/proc/swaps") or ""):
            node = self.node_for(path, "")
            if kind != "partition" or node is None:
                self.exclude(path, "swap", "swap file: restored with the filesystem that holds it")
                continue
            reason = self.device_exclusion(self.ancestors(node)) or self.config_exclusion(self.ancestors(node))
            if reason:
                self.exclude(path, "swap", reason)
            else:
                out.append(node)
        return out

    # -- components ----------------------------------------------------------------------------

    def read_lvm(self) -> Tuple[List[PhysicalVolume], List[VolumeGroup], List[LogicalVolume]]:
        if not self.probe.which("lvm"):
            return [], [], []
        reports = [probe_output(self.probe, ["lvm", cmd, *LVM_REPORT, "-o", fields])
                   for cmd, fields in (("pvs", PV_FIELDS), ("vgs", VG_FIELDS), ("lvs", LV_FIELDS))]
        if None in reports:
            self.unsupported_item("lvm", "lvm", "the lvm reports could not be read; LVM will not be recreated")
            return [], [], []
        pvs = [PhysicalVolume(r["pv_name"], r["pv_uuid"], r.get("vg_name") or None, to_int(r["pv_size"]) or 0)
               for r in parse_lvm_report(reports[0], "pv")]
        vgs = [VolumeGroup(r["vg_name"], r["vg_uuid"], to_int(r["vg_extent_size"]) or 0, to_int(r["vg_size"]) or 0,
                           sorted(pv.device for pv in pvs if pv.vg == r["vg_name"]))
               for r in parse_lvm_report(reports[1], "vg")]
        lvs = [self.logical_volume(r) for r in parse_lvm_report(reports[2], "lv")]
        return pvs, vgs, lvs

    def logical_volume(self, row: Dict[str, str]) -> LogicalVolume:
        lv = LogicalVolume(
            id=dm_name(row["vg_name"], row["lv_name"]), vg=row["vg_name"], name=row["lv_name"],
            uuid=row["lv_uuid"], size=to_int(row["lv_size"]) or 0, segment_type=row.get("segtype") or "linear",
            stripes=to_int(row.get("stripes")) or 1, stripe_size=to_int(row.get("stripe_size")) or 0,
            data_copies=to_int(row.get("data_copies")) or 1, pool=row.get("pool_lv") or None,
            metadata_size=to_int(row.get("lv_metadata_size")))
        attr = row.get("lv_attr") or "-"
        kind = {"s": "snapshot", "S": "snapshot", "C": "cache", "c": "cache pool", "v": "virtual LV",
                "d": "VDO pool", "D": "VDO volume"}.get(attr[0])
        if kind or lv.segment_type not in SUPPORTED_SEGTYPES:
            what = kind or f"segment type {lv.segment_type}"
            self.unsupported_item(f"{lv.vg}/{lv.name}", "lvm", f"LVM {what}: will not be recreated")
        return lv

    def partition_table(self, node: BlockNode) -> Tuple[Optional[PartitionTable], List[Partition]]:
        if not any(self.nodes[c].type == "part" for c in node.children if c in self.nodes):
            return None, []
        text = probe_output(self.probe, ["sfdisk", "-J", node.name])
        if text is None:
            self.unsupported_item(node.name, "disk", "sfdisk could not read its partition table")
            return None, []
        return parse_sfdisk(text, node.name)

    def disk(self, node: BlockNode, by_id: Dict[str, str]) -> Tuple[Disk, List[Partition]]:
        table, parts = self.partition_table(node)
        names = sorted(name for name, target in by_id.items() if target in (node.name, node.kname))
        return Disk(node.name, node.size, node.log_sec, node.phy_sec, node.model, node.serial, node.wwn,
                    node.tran, names, table), parts

    def md_array(self, node: BlockNode) -> Optional[MdArray]:
        text = probe_output(self.probe, ["mdadm", "--detail", node.name])
        if text is None:
            self.unsupported_item(node.name, "md", "mdadm --detail failed or mdadm is missing: not recreated")
            return None
        array = parse_mdadm_detail(text, node.name)
        if array.metadata in ("imsm", "ddf"):
            self.unsupported_item(node.name, "md", f"firmware RAID container ({array.metadata})")
        return array

    def luks(self, node: BlockNode, crypttab: Dict[str, Tuple[str, str]]) -> Optional[Luks]:
        device = node.parents[0] if node.parents else ""
        text = probe_output(self.probe, ["cryptsetup", "luksDump", device])
        if text is None:
            self.unsupported_item(node.name, "crypt", f"{device} is not LUKS or cryptsetup is missing")
            return None
        info = parse_luks_dump(text)
        name = os.path.basename(node.name)
        return Luks(node.name, name, device, int(info["version"]), info["uuid"], info["cipher"],
                    info["key_size"], info["hash"], info["pbkdf"], crypttab.get(name, ("", None))[1],
                    info.get("sector_size"), info.get("label"))

    def filesystem(self, node: BlockNode, mount: Optional[Mount]) -> Filesystem:
        fstype = node.fstype or (mount.type if mount else "unknown")
        size, used = self.mount_sizes.get(mount.mountpoint, (None, None)) if mount else (None, None)
        fs = Filesystem(node.name, fstype, node.uuid, node.label or None, size, used)
        where = mount.mountpoint if mount else node.name
        if fstype.startswith("ext"):
            text = self.options_output(node.name, fstype, ["dumpe2fs", "-h", node.name])
            fs.options = parse_dumpe2fs(text) if text is not None else {}
        elif fstype == "xfs":
            text = self.options_output(node.name, fstype, ["xfs_info", where])
            fs.options = parse_xfs_info(text) if text is not None else {}
        elif fstype == "vfat":
            info = parse_blkid_export(self.options_output(node.name, fstype, ["blkid", "-p", "-o", "export", node.name]) or "")
            fs.options = {"fat_size": to_int((info.get("VERSION") or "").replace("FAT", "")),
                          "volume_id": (node.uuid or "").replace("-", "") or None}
        elif fstype == "btrfs":
            fs.options = self.btrfs(where)
        if fstype not in SUPPORTED_FS:
            self.unsupported_item(node.name, "filesystem", f"{fstype} filesystems are not recreated")
        return fs

    def options_output(self, device: str, fstype: str, argv: List[str]) -> Optional[str]:
        """What a filesystem's tool says about it; when it fails, a warning naming the device
        (recover then makes the filesystem with mkfs's defaults), and None."""
        result = self.probe.run(argv)
        if result is not None and result.returncode == 0:
            return result.stdout
        lines = [line.strip() for line in (result.stderr if result else "").splitlines() if line.strip()]
        why = "is not installed" if result is None else f"failed: {lines[-1] if lines else f'exit {result.returncode}'}"
        self.warnings.append(f"{device}: {argv[0]} {why}; recover will make this {fstype} filesystem "
                             "with mkfs defaults (check the device, then run savelayout again)")
        return None

    def uuid_warnings(self, layout: Layout) -> None:
        for item in list(layout.filesystems) + list(layout.swaps):
            if not item.uuid:
                what = "swap" if isinstance(item, Swap) else f"{item.type} filesystem"
                self.warnings.append(f"{item.device}: no filesystem UUID found (lsblk, blkid): recover "
                                     f"gives this {what} a new one; fstab or boot entries that name it by UUID "
                                     "will not match")

    def btrfs(self, mountpoint: str) -> Dict[str, object]:
        listing = probe_output(self.probe, ["btrfs", "subvolume", "list", "-a", "-p", mountpoint]) or ""
        default = probe_output(self.probe, ["btrfs", "subvolume", "get-default", mountpoint]) or ""
        return {"subvolumes": parse_btrfs_subvolumes(listing), "default_subvolume": parse_btrfs_default(default)}

    # -- the whole layout ----------------------------------------------------------------------

    def fill_from_blkid(self, needed: Dict[str, BlockNode]) -> None:
        """Without a udev database (rescue systems, containers) lsblk knows no UUIDs: ask blkid."""
        for node in needed.values():
            if node.fstype is None and node.uuid is None and not node.children:
                info = parse_blkid_export(probe_output(self.probe, ["blkid", "-o", "export", node.name]) or "")
                node.fstype = node.fstype or info.get("TYPE")
                node.uuid = node.uuid or info.get("UUID")
                node.label = node.label or info.get("LABEL")

    def capture(self) -> Captured:
        mounts = self.select_mounts()
        swap_nodes = self.select_swaps()
        needed: Dict[str, BlockNode] = {}
        for node in [n for _, n in mounts] + swap_nodes:
            needed.update((n.name, n) for n in self.ancestors(node))
        self.fill_from_blkid(needed)
        layout = Layout(hostname=self.hostname, boot=Boot(firmware="bios"))
        layout.mounts = [m for m, _ in mounts]
        self.components(layout, needed)
        mounted = {m.device: m for m in layout.mounts}
        for node in {n.name: n for _, n in mounts}.values():
            layout.filesystems.append(self.filesystem(node, mounted.get(node.name)))
        layout.swaps = [Swap(n.name, n.uuid, n.label or None) for n in swap_nodes]
        for node in self.nodes.values():
            if not node.parents and node.name not in needed:
                self.exclude(node.name, "disk", self.device_exclusion([node]) or
                             "not used by any filesystem or swap in scope")
        layout.boot = self.boot(layout)
        layout.network = self.network()
        layout.excluded, layout.unsupported = self.excluded, self.unsupported
        layout.backup_filesystem = self.backup_filesystem()
        self.uuid_warnings(layout)
        vgcfg = {vg.name: self.vgcfg(vg.name) for vg in layout.volume_groups}
        return Captured(sort_layout(layout), {k: v for k, v in vgcfg.items() if v}, self.warnings)

    def backup_filesystem(self) -> Optional[BackupFilesystem]:
        """The local filesystem a file:// backup is on, when it is not the root's (by its UUID)."""
        entry = self.backup_entry
        if entry is None:
            return None
        node = self.node_for(entry.get("source") or "", entry.get("maj:min") or "")
        if node is None:
            return None
        self.fill_from_blkid({node.name: node})
        if not node.uuid or not node.fstype:
            return None
        return BackupFilesystem(entry["target"], node.uuid, node.fstype, node.label or None)

    def components(self, layout: Layout, needed: Dict[str, BlockNode]) -> None:
        by_id = self.probe.links("/dev/disk/by-id")
        crypttab = parse_crypttab(self.probe.read_text("/etc/crypttab") or "")
        vgs_needed = {self.vg_of(n) for n in needed.values()} - {None}
        for node in sorted(needed.values(), key=lambda n: n.name):
            add_items(layout, self.node_items(node, by_id, crypttab))
        layout.volume_groups = [vg for vg in self.vgs if vg.name in vgs_needed]
        layout.physical_volumes = [pv for pv in self.pvs if pv.vg in vgs_needed]
        layout.logical_volumes = [lv for lv in self.lvs if lv.vg in vgs_needed]
        # read_lvm reported unsupported LVs of every VG: keep those of the VGs in scope.
        self.unsupported = [u for u in self.unsupported if u.kind != "lvm" or u.what.startswith("/")
                            or u.what.split("/")[0] in vgs_needed or u.what == "lvm"]

    def node_items(self, node: BlockNode, by_id: Dict[str, str],
                   crypttab: Dict[str, Tuple[str, str]]) -> List[object]:
        """The layout items one block device gives: a disk and its partitions, an md array
        (and, when partitioned, its table), a LUKS device; LVM comes from the lvm reports."""
        is_md = node.type.startswith("raid") or node.type == "md"
        if node.type in UNSUPPORTED_NODE_TYPES or node.fstype in UNSUPPORTED_FSTYPES:
            what = UNSUPPORTED_NODE_TYPES.get(node.type) or UNSUPPORTED_FSTYPES[node.fstype]
            self.unsupported_item(node.name, node.type, f"{what}: will not be recreated")
            return []
        if is_md or not node.parents:
            items: List[object] = [a for a in [self.md_array(node)] if a] if is_md else []
            if not is_md or any(self.nodes[c].type == "part" for c in node.children if c in self.nodes):
                disk, parts = self.disk(node, by_id)
                items += [disk] + parts
            return items
        if node.type == "crypt":
            return [x for x in [self.luks(node, crypttab)] if x]
        if node.type == "lvm" and not any(lv.id == node.name for lv in self.lvs):
            self.unsupported_item(node.name, "lvm", "an LVM volume the lvm tools did not report "
                                  "(are they installed?): not recreated")
        return []

    def network(self) -> Network:
        return probe_network(self.probe)

    def vgcfg(self, vg: str) -> Optional[str]:
        result = self.probe.run(["vgcfgbackup", "-f", "OUTPUT", vg], output_arg=2)
        return result.stdout if result is not None and result.returncode == 0 else None

    def boot(self, layout: Layout) -> Boot:
        os_release = parse_os_release(self.probe.read_text("/etc/os-release") or "")
        boot = Boot(firmware="uefi" if self.probe.exists("/sys/firmware/efi") else "bios",
                    distribution=os_release, family=distribution_family(os_release))
        for role, candidates in (("bootloader_install", ("grub2-install", "grub-install")),
                                 ("bootloader_config", ("grub2-mkconfig", "grub-mkconfig")),
                                 ("initramfs", ("dracut", "update-initramfs", "mkinitrd"))):
            found = next((c for c in candidates if self.probe.which(c)), None)
            if found:
                boot.tools[role] = found
        esp = [p for p in layout.partitions if p.type.lower() in ESP_TYPES]
        mounted_esp = [p for p in esp if any(m.device == p.id for m in layout.mounts)]
        candidates = mounted_esp or esp
        boot.esp = candidates[0].id if candidates else None
        if boot.firmware == "uefi":
            boot.efi_entries = parse_efibootmgr(probe_output(self.probe, ["efibootmgr", "-v"]) or "")
        boot.grub_disks = [d.id for d in layout.disks if b"GRUB" in (self.probe.read(d.id, 512) or b"")]
        has_grub = boot.grub_disks or any(self.probe.exists(p) for p in ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg"))
        boot.bootloader = "grub2" if has_grub else None
        return boot


def probe_network(probe: "Probe") -> Network:
    """Interfaces that have a device behind them (a NIC), their global addresses, the default
    gateway and the name servers (capture, and finalize's look at the NICs of the machine
    being recovered)."""
    result = probe.run(["ip", "-j", "addr", "show"], optional=True)
    routes = probe.run(["ip", "-j", "route", "show", "default"], optional=True)
    links = loads_lenient(result.stdout) if result is not None and result.returncode == 0 else []
    interfaces = [Interface(link["ifname"], link.get("address") or "",
                            [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                             if a.get("scope") == "global" and "local" in a])
                  for link in links if link.get("link_type") == "ether"
                  and probe.exists(f"/sys/class/net/{link['ifname']}/device", optional=True)]
    default = loads_lenient(routes.stdout) if routes is not None and routes.returncode == 0 else []
    resolv = probe.read_text_optional("/etc/resolv.conf") or ""
    return Network(interfaces, next((r.get("gateway") for r in default if r.get("gateway")), None),
                   re.findall(r"^nameserver\s+(\S+)", resolv, re.M))


def virtual_disk_kind(node: BlockNode) -> Optional[str]:
    base = os.path.basename(node.name)
    if node.type == "loop" or base.startswith("loop"):
        return "a loop device"
    if node.type == "rom" or base.startswith("sr"):
        return "an optical drive"
    if re.match(r"(z?ram|nbd)\d", base):
        return "a RAM or network block device"
    return None


def path_within(path: str, directory: str) -> bool:
    return directory == "/" or path == directory or path.startswith(directory.rstrip("/") + "/")


def capture_layout(probe: Probe, config: Config, hostname: str) -> Captured:
    return LayoutCapture(probe, config, hostname).capture()


class LayoutTree:
    """The readable view: disk -> partitions -> RAID/LUKS/PV -> VG -> LV -> filesystem -> mount.
    What stands on several devices (an array, a volume group) is drawn once, below the first."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.shown: Set[str] = set()
        self.standing_on: Dict[str, List[Tuple[Kind, object]]] = {}     # in the order of KINDS
        for kind in (k for k in KINDS if k.label):
            for item in getattr(layout, kind.items):
                for device in kind.stands_on(item):
                    self.standing_on.setdefault(device, []).append((kind, item))

    def render(self) -> str:
        lines: List[str] = []
        arrays = {m.id for m in self.layout.md_arrays}
        for disk in self.layout.disks:
            if disk.id not in arrays:          # a partitioned array shows below its members
                lines.append(self.disk_label(disk))
                self.children(disk.id, "", lines)
        lines += self.summary()
        return "\n".join(lines)

    def children(self, device: str, indent: str, lines: List[str]) -> None:
        kids = self.users(device)
        for n, (label, child) in enumerate(kids):
            last = n == len(kids) - 1
            lines.append(f"{indent}{'└─' if last else '├─'} {label}")
            if child:
                self.children(child, indent + ("   " if last else "│  "), lines)

    def users(self, device: str) -> List[Tuple[str, Optional[str]]]:
        """(label, device whose users come next) for everything standing on `device`."""
        out: List[Tuple[str, Optional[str]]] = []
        for kind, item in self.standing_on.get(device, []):
            line, child, again = kind.label(item, self.layout, device)
            if child and again and child in self.shown:
                out.append((again, None))
                continue
            if child:
                self.shown.add(child)
            out.append((line, child))
        return out

    def disk_label(self, disk: Disk) -> str:
        table = disk.partition_table
        kind = f"{table.label} ({table.id})" if table else "no partition table"
        extra = " ".join(x for x in (disk.transport, disk.model, f"serial {disk.serial}" if disk.serial else "") if x)
        return f"{disk.id}  {human_size(disk.size)}  {kind}" + (f"  {extra}" if extra else "")

    def summary(self) -> List[str]:
        lay, boot = self.layout, self.layout.boot
        lines = ["", f"Boot: {boot.firmware.upper()}, bootloader {boot.bootloader or 'none found'}"
                 + (f" on {', '.join(boot.grub_disks)}" if boot.grub_disks else "")
                 + (f", ESP {boot.esp}" if boot.esp else "")
                 + f"; {boot.distribution.get('pretty_name', 'unknown distribution')} ({boot.family}; "
                 + (", ".join(v for _, v in sorted(boot.tools.items())) or "no bootloader or initramfs tools found")
                 + ")"]
        for title, items in (("Excluded", lay.excluded), ("Not recreated (unsupported)", lay.unsupported)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  {e.what} ({e.kind}): {e.reason}" for e in items]
        return lines


def format_layout(layout: Layout) -> str:
    return LayoutTree(layout).render()


def diff_layouts(old: Layout, new: Layout) -> List[str]:
    """Readable differences: 'LV vg0/data added', '/ grew from 8 GiB to 10 GiB'."""
    changes: List[str] = []
    for kind in (k for k in KINDS if k.compared):
        before = {kind.name(x): dataclasses.asdict(x) for x in getattr(old, kind.items)}
        after = {kind.name(x): dataclasses.asdict(x) for x in getattr(new, kind.items)}
        for name in sorted(set(before) | set(after)):
            if name not in after:
                changes.append(f"{kind.title} {name} removed")
            elif name not in before:
                changes.append(f"{kind.title} {name} added")
            else:
                changes += field_changes(kind.title, name, before[name], after[name], kind.volatile, new)
    for name in ("firmware", "bootloader", "esp", "grub_disks", "family", "tools"):
        a, b = getattr(old.boot, name), getattr(new.boot, name)
        if a != b:
            changes.append(f"boot {name} changed from {a!r} to {b!r}")
    return changes


def field_changes(kind: str, name: str, a: dict, b: dict, ignore: FrozenSet[str], new: Layout) -> List[str]:
    out = []
    for fname in sorted(set(a) | set(b)):
        if fname in ignore or a.get(fname) == b.get(fname):
            continue
        x, y = a.get(fname), b.get(fname)
        if fname == "size" and isinstance(x, int) and isinstance(y, int):
            subject = f"{kind} {name}"
            if kind == "filesystem":
                mount = next((m.mountpoint for m in new.mounts if m.device == name), None)
                subject = mount or subject
            units = (lambda v: f"{v} sectors") if kind == "partition" else human_size
            out.append(f"{subject} {'grew' if y > x else 'shrank'} from {units(x)} to {units(y)}")
        else:
            out.append(f"{kind} {name}: {fname} changed from {x!r} to {y!r}")
    return out


# -- layout files ------------------------------------------------------------------------------

def save_layout_files(captured: Captured, directory: Path) -> None:
    """layout.json plus one vgcfgbackup file per volume group (lvm/<vg>.vgcfg); stale ones go."""
    lvm_dir = directory / "lvm"
    try:
        lvm_dir.mkdir(parents=True, exist_ok=True)
        for name, text in captured.vgcfg.items():
            write_file(lvm_dir / f"{name}.vgcfg", text)
        for stale in lvm_dir.glob("*.vgcfg"):
            if stale.stem not in captured.vgcfg:
                stale.unlink()
        write_file(directory / "layout.json", layout_to_json(captured.layout))
    except OSError as exc:
        raise RescueError(f"cannot write the layout into {directory}: {exc.strerror}",
                          "give a directory rescue can create and write (savelayout -o DIR, LAYOUT_DIR)") from None


def capture_for(ctx: Context, what: str) -> Captured:
    """Capture the live system (root; --record keeps every tool output) or a --replay DIR."""
    args = ctx.args
    if args.replay:
        probe = Probe(replay_dir=Path(args.replay))
    else:
        require_root(what)
        probe = Probe(ctx.runner, record_dir=Path(args.record) if getattr(args, "record", None) else None)
    captured = capture_layout(probe, ctx.config, hostname())
    for line in [f"{item.what}: {item.reason}" for item in captured.layout.unsupported] + captured.warnings:
        ctx.log.warn(line)
    return captured


def save_layout_for_backup(ctx: "Context") -> "Layout":
    """savelayout, as the first step of every backup: the backup carries the current layout,
    and the layout decides what is backed up."""
    captured = capture_layout(Probe(ctx.runner), ctx.config, hostname())
    for line in [f"{item.what}: {item.reason}" for item in captured.layout.unsupported] + captured.warnings:
        ctx.log.warn(line)
    save_layout_files(captured, layout_dir(ctx.config))
    ctx.log.say(f"Saved the disk layout in {layout_dir(ctx.config)}")
    return captured.layout


def saved_layout(config: Config) -> "Layout":
    path = layout_dir(config) / "layout.json"
    try:
        return layout_from_json(path.read_text(encoding="utf-8"), str(path))
    except OSError as exc:
        raise RescueError(f"no saved layout ({path}: {exc.strerror})",
                          "run rescue mkbackuponly (or savelayout) first") from None
    except UnicodeDecodeError:
        raise RescueError(f"{path} is not a valid layout: not text", "recreate it with rescue savelayout") from None


# =============================================================================================
# 9. recreate: the disks here and the mapping
#
# Before anything is written, recover looks at the disks of the machine it runs on (through a
# Probe, so a recording made anywhere can stand in for them) and decides, by rules it prints,
# which disk takes the place of each disk of the layout. A disk that is in use (mounted, swap,
# holding the running system, the rescue medium or the backup) is never a candidate: it is
# left out with the reason. All of it is pure: facts in, a mapping or a refusal out.
# =============================================================================================

@dataclass
class DiskHere:
    """A disk of the machine recover runs on."""
    path: str
    size: int
    logical_sector_size: int = 512
    physical_sector_size: int = 512
    model: Optional[str] = None
    serial: Optional[str] = None
    wwn: Optional[str] = None
    transport: Optional[str] = None
    removable: bool = False
    by_id: List[str] = field(default_factory=list)
    partitions: List[str] = field(default_factory=list)       # as they are now (to wipe)
    holders: List[Tuple[str, str]] = field(default_factory=list)  # (kind, name) to stop, deepest first
    in_use: Optional[str] = None                               # why it must not be touched
    excluded: Optional[str] = None                             # why it is no candidate by itself

    def identity(self) -> Dict[str, object]:
        """What says it is the same disk on a re-run (names can change between boots)."""
        return {"path": self.path, "size": self.size, "serial": self.serial, "wwn": self.wwn}


EMMC_AREA_RE = re.compile(r"mmcblk\d+(boot\d+|rpmb)$")
RESCUE_MEDIUM_FS = frozenset({"iso9660", "udf"})


def node_descendants(nodes: Dict[str, BlockNode], name: str) -> List[BlockNode]:
    """Everything standing on a node (partitions, arrays, LUKS, LVs …), parents before children."""
    out: List[BlockNode] = []
    pending = [name]
    seen: Set[str] = set()
    while pending:
        current = pending.pop(0)
        for child in nodes[current].children if current in nodes else []:
            if child not in seen and child in nodes:
                seen.add(child)
                out.append(nodes[child])
                pending.append(child)
    return out


SYSFS_SERIALS = ("/sys/block/{}/serial", "/sys/block/{}/device/serial")     # virtio; NVMe


def fill_serials(nodes: Dict[str, BlockNode], read: Callable[[str], Optional[str]]) -> None:
    """lsblk takes a disk's serial from udev; a rescue system without udev still has it in
    sysfs (virtio, NVMe), and the mapping's 'same serial' rule needs it."""
    for node in (n for n in nodes.values() if not n.parents and not n.serial):
        for pattern in SYSFS_SERIALS:
            text = (read(pattern.format(os.path.basename(node.kname))) or "").strip()
            if text:
                node.serial = text
                break


def disks_here(nodes: Dict[str, BlockNode], mounts: Sequence[Dict[str, object]],
               swaps: Sequence[Tuple[str, str]], by_id: Dict[str, str], vg_of_pv: Dict[str, str],
               backup_dir: Optional[str], backup_fs: Optional[BackupFilesystem] = None) -> List[DiskHere]:
    """The disks of this machine, each with what stands on it now and whether it may be used
    (backup_fs: the layout's record of a file:// backup's filesystem, mounted here or not)."""
    by_majmin = {n.majmin: n.name for n in nodes.values() if n.majmin}
    mounted: Dict[str, str] = {}
    for entry in mounts:
        source = re.sub(r"\[.*\]$", "", str(entry.get("source") or ""))
        name = source if source in nodes else by_majmin.get(str(entry.get("maj:min") or ""))
        if name:
            mounted.setdefault(name, str(entry.get("target")))
    backup_mount = max((str(e["target"]) for e in mounts if backup_dir and path_within(backup_dir, str(e["target"]))),
                       key=len, default=None)
    swapping = {path for path, kind in swaps if kind == "partition"}
    out = []
    for node in sorted((n for n in nodes.values() if not n.parents), key=lambda n: n.name):
        below = node_descendants(nodes, node.name)
        disk = DiskHere(node.name, node.size, node.log_sec, node.phy_sec, node.model, node.serial, node.wwn,
                        node.tran, node.removable,
                        sorted(n for n, target in by_id.items() if target in (node.name, node.kname)),
                        [n.name for n in below if n.type == "part" and node.name in n.parents])
        disk.in_use = disk_in_use(node, below, mounted, swapping, backup_mount, backup_fs)
        disk.excluded = disk_exclusion(node, below)
        disk.holders = stale_holders(below, vg_of_pv)
        out.append(disk)
    return out


def disk_in_use(node: BlockNode, below: Sequence[BlockNode], mounted: Dict[str, str],
                swapping: Set[str], backup_mount: Optional[str],
                backup_fs: Optional[BackupFilesystem] = None) -> Optional[str]:
    """Why nothing may touch the disk, not even by --map: the backup or the running system first
    (the reasons a user most needs to read), then any mount, the rescue medium (an ISO image
    need not be mounted to be what the rescue system runs from), swap (/proc/swaps names LVs
    by kname)."""
    users = [node] + list(below)
    for n in users if backup_mount else []:
        if mounted.get(n.name) == backup_mount:
            return f"it holds the backup ({n.name} is mounted at {backup_mount})"
    for n in users if backup_fs else []:
        if n.uuid == backup_fs.uuid:
            return (f"it holds the backup ({n.name}, filesystem UUID {backup_fs.uuid}, was mounted at "
                    f"{backup_fs.mountpoint} when the layout was saved)")
    for n in users:
        if mounted.get(n.name) == "/":
            return f"it holds the running system ({n.name} is mounted at /)"
    for n in users:
        if n.name in mounted:
            return f"{n.name} is mounted at {mounted[n.name]}"
    if any(n.fstype in RESCUE_MEDIUM_FS for n in users):
        return "it holds an ISO 9660 image (a rescue or installation medium)"
    for n in users:
        if n.name in swapping or n.kname in swapping:
            return f"{n.name} is in use as swap"
    return None


def disk_exclusion(node: BlockNode, below: Sequence[BlockNode]) -> Optional[str]:
    """Why a disk is not a candidate unless --map names it (in use is a different, hard no)."""
    kind = virtual_disk_kind(node)
    if kind:
        return kind
    if EMMC_AREA_RE.search(node.name):
        return "an eMMC boot or RPMB area, not a disk"
    if node.tran == "usb" or node.removable:
        return "removable/USB media"
    if node.size <= 0:
        return "it has no size (no medium?)"
    return None


def stale_holders(below: Sequence[BlockNode], vg_of_pv: Dict[str, str]) -> List[Tuple[str, str]]:
    """What stands on a disk and would keep it busy (an auto-assembled array, an open LUKS
    device, active LVs): to be stopped before the disk is wiped, the deepest first."""
    out: List[Tuple[str, str]] = []
    for n in reversed(list(below)):
        if n.type == "lvm":
            vg = next((vg_of_pv[p] for p in n.parents if p in vg_of_pv), None)
            entry = ("lvm", vg) if vg else ("dm", n.name)
        elif n.type == "crypt":
            entry = ("crypt", os.path.basename(n.name))
        elif n.type.startswith("raid") or n.type == "md":
            entry = ("md", n.name)
        else:
            continue
        if entry not in out:
            out.append(entry)
    return out


@dataclass
class Mapping:
    """Which disk here takes the place of each disk of the layout, and why (for people)."""
    disks: Dict[str, str]                          # layout disk -> disk here
    reasons: Dict[str, str]                        # layout disk -> the rule that chose it
    left_out: List[Tuple[str, str]]                # (disk here, why it is no candidate)
    guessed: bool = False                          # a rule chose among equal candidates

    def new_name(self, device: str, layout: Layout) -> str:
        """The device's name on the disks here: a mapped disk, or a partition of one (named as
        the kernel names partitions of that disk); everything else keeps its name."""
        if device in self.disks:
            return self.disks[device]
        part = next((p for p in layout.partitions if p.id == device), None)
        if part is not None and part.disk in self.disks:
            return partition_device(self.disks[part.disk], part.number)
        return device


MAPPING_RULES = ("explicit --map or the mapping file", "the same WWN", "the same serial", "the same /dev/disk/by-id name",
                 "the same name and size", "the same size", "the smallest disk that is large enough",
                 "the largest disk left (smaller than the original)")


def parse_mapping_file(text: str, source: str) -> Dict[str, str]:
    """ReaR's disk_mappings format: `OLD NEW` per line, '#' comments."""
    out: Dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise RescueError(f"{source}:{n}: expected 'OLD-DISK NEW-DISK', got {line.strip()!r}",
                              "one mapping per line, e.g. /dev/sda /dev/nvme0n1")
        out[words[0]] = words[1]
    return out


def map_disks(layout: Layout, here: Sequence[DiskHere], explicit: Dict[str, str]) -> Mapping:
    """The mapping by the rules, in this order: explicit mappings; the same WWN, serial or
    by-id name; the same name and size; the same size (the first by name); the smallest disk
    that is large enough; else the largest disk left. Each disk here is used at most once.
    A disk in use is never mapped; one excluded (removable, an ISO medium …) only explicitly."""
    old_disks = [d for d in layout.disks if d.id not in {m.id for m in layout.md_arrays}]
    by_path = {d.path: d for d in here}
    chosen: Dict[str, str] = {}
    reasons: Dict[str, str] = {}
    guessed = False
    for old, new in explicit.items():
        if old not in {d.id for d in old_disks}:
            raise RescueError(f"the mapping names {old}, which is not a disk of the layout",
                              "the layout's disks: " + ", ".join(d.id for d in old_disks))
        disk = by_path.get(new) or next((d for d in here if new in ("/dev/disk/by-id/" + b for b in d.by_id)), None)
        if disk is None:
            raise RescueError(f"the mapping names {new}, which is not a disk here",
                              "the disks here: " + ", ".join(d.path for d in here) if here else "no disks were found")
        if disk.in_use:
            raise RescueError(f"{disk.path} cannot take the place of {old}: {disk.in_use}",
                              "map another disk, or unmount it first")
        if disk.path in chosen.values():
            raise RescueError(f"the mapping puts two disks onto {disk.path}", "map each disk of the layout to its own disk")
        chosen[old], reasons[old] = disk.path, MAPPING_RULES[0]
    free = lambda: [d for d in here if not d.in_use and not d.excluded and d.path not in chosen.values()]  # noqa: E731
    for old in (d for d in old_disks if d.id not in chosen):
        match = identity_match(old, free())
        if match:
            chosen[old.id], reasons[old.id] = match
    for old in (d for d in old_disks if d.id not in chosen):
        candidates = free()
        same = [d for d in candidates if d.size == old.size]
        bigger = sorted((d for d in candidates if d.size > old.size), key=lambda d: (d.size, d.path))
        smaller = sorted((d for d in candidates if d.size < old.size), key=lambda d: (-d.size, d.path))
        named = [d for d in same if d.path == old.id]
        if named:
            pick, rule = named[0], MAPPING_RULES[4]
        elif same:
            pick, rule = sorted(same, key=lambda d: d.path)[0], MAPPING_RULES[5]
            guessed = guessed or len(same) > 1
        elif bigger:
            pick, rule = bigger[0], MAPPING_RULES[6]
            guessed = guessed or (len(bigger) > 1 and bigger[1].size == bigger[0].size)
        elif smaller:
            pick, rule = smaller[0], MAPPING_RULES[7]
        else:
            raise no_disk_for(old, here, chosen)
        chosen[old.id], reasons[old.id] = pick.path, rule
    used = set(chosen.values())
    left_out = [(d.path, d.in_use or d.excluded or "not needed") for d in here if d.path not in used]
    return Mapping(chosen, reasons, left_out, guessed)


def identity_match(old: Disk, candidates: Sequence[DiskHere]) -> Optional[Tuple[str, str]]:
    """A disk here that says it is the same disk (WWN, serial, by-id name), if exactly one does."""
    for rule, same in ((MAPPING_RULES[1], lambda d: old.wwn and d.wwn == old.wwn),
                       (MAPPING_RULES[2], lambda d: old.serial and d.serial == old.serial),
                       (MAPPING_RULES[3], lambda d: set(old.by_id) & set(d.by_id))):
        hits = [d for d in candidates if same(d)]
        if len(hits) == 1:
            return hits[0].path, rule
    return None


def no_disk_for(old: Disk, here: Sequence[DiskHere], chosen: Dict[str, str]) -> RescueError:
    why = [f"{d.path}: {d.in_use or d.excluded or 'taken by another disk of the layout'}"
           for d in here if d.in_use or d.excluded or d.path in chosen.values()]
    return RescueError(f"no disk here can take the place of {old.id} ({human_size(old.size)})"
                       + (f"; left out: {'; '.join(why)}" if why else "; no disks were found"),
                       "attach a disk, or name one with --map OLD=NEW (e.g. --map /dev/sda=/dev/sdb)")


def describe_mapping(mapping: Mapping, layout: Layout, here: Sequence[DiskHere]) -> List[str]:
    """The comparison of disks, as a user reads it before confirming."""
    sizes = {d.path: d.size for d in here}
    lines = []
    for old in layout.disks:
        if old.id in mapping.disks:
            new = mapping.disks[old.id]
            size = sizes.get(new, 0)
            same = "the same size" if size == old.size else ("larger" if size > old.size else "SMALLER")
            lines.append(f"{old.id} ({human_size(old.size)}) -> {new} ({human_size(size)}, {same}): "
                         f"{mapping.reasons[old.id]}")
    lines += [f"{path}: left alone: {why}" for path, why in mapping.left_out]
    return lines


# =============================================================================================
# 10. recreate: the plan
#
# plan = recreate_plan(layout, disks here, mapping, options): an ordered list of Steps, each a
# value with the exact command (or a named action and its parameters), what it depends on and
# why. Nothing here runs anything, so a plan can be printed, written as a shell script, compared
# in a test, or made on another machine from a recording. One function per kind of item
# (plan_item, dispatched on the item's class), in a topological order of the layout's graph.
# =============================================================================================

MIB = 1024 * 1024
# LVM without udev (a minimal rescue system may have none): LVM makes the device nodes itself
# and waits for nobody; no devices file (that of the original system pins the old disks); no
# metadata backups in the rescue system.
LVM_CONFIG = ("devices { obtain_device_list_from_udev=0 use_devicesfile=0 } "
              "activation { udev_sync=0 udev_rules=0 } backup { backup=0 archive=0 }")
# The same for device-mapper users (cryptsetup): libdevmapper makes the nodes itself.
NO_UDEV_ENV = {"DM_DISABLE_UDEV": "1"}
EXT_FEATURES_NOT_SET = frozenset({"needs_recovery", "orphan_present", "journal_dev", "snapshot_bitmap"})
MOUNT_OPTIONS_DROPPED = ("ro", "rw", "defaults", "noauto", "auto", "user", "users", "nouser", "owner",
                         "nofail", "seclabel", "_netdev")
MOUNT_OPTION_PREFIXES_DROPPED = ("x-", "subvol=", "subvolid=", "context=", "fscontext=", "defcontext=",
                                 "rootcontext=", "comment=")
LVCREATE_TYPES = frozenset({"linear", "striped", "raid0", "raid1", "raid4", "raid5", "raid6", "raid10",
                            "mirror", "thin-pool", "thin"})


@dataclass
class Step:
    """One thing recover does, as a value: printed by --plan, written by --script, journaled."""
    id: str                                        # unique and stable (the journal's key)
    title: str
    argv: List[str] = field(default_factory=list)  # the command, or empty for an action
    action: str = ""                               # a named action (wait, mount) with params
    params: Dict[str, object] = field(default_factory=dict)
    input: str = ""                                # stdin (an sfdisk script); never a secret
    secret: str = ""                               # the secret given on stdin at run time
    env: Dict[str, str] = field(default_factory=dict)
    after: List[str] = field(default_factory=list)  # ids of the steps it needs done first
    fallback: List[str] = field(default_factory=list)  # the command again with fewer options
    note: str = ""                                 # why, when it is not obvious
    optional: bool = False                         # may fail: it stops what may not be there (a re-run)


@dataclass
class RecreateOptions:
    target_root: str = "/mnt/local"
    resize: bool = True                            # the last partition (and its LV) grows or shrinks
    grow_lv: str = ""                              # "VG/LV" to grow or shrink ("": the last of the VG)
    vgcfg: Dict[str, Tuple[str, str]] = field(default_factory=dict)   # VG -> (path, vgcfgbackup text)


@dataclass
class Plan:
    mapping: Mapping
    wipe: List[str]                                # the disks here that are wiped
    steps: List[Step]
    notes: List[str]                               # resizes, new UUIDs, what is not recreated
    secrets: List[Tuple[str, str]]                 # (name, what for): asked before anything runs
    target_root: str


class PlanContext:
    """What the plan_* functions share: the layout, where everything goes, sizes after resizing."""

    def __init__(self, layout: Layout, here: Sequence[DiskHere], mapping: Mapping, options: RecreateOptions) -> None:
        self.layout, self.mapping, self.options = layout, mapping, options
        self.here = {d.path: d for d in here}
        self.notes: List[str] = []
        self.secrets: List[Tuple[str, str]] = []
        self.tables: Dict[str, List[Tuple[Partition, int, Optional[int]]]] = {}  # disk -> (part, start, size)
        self.grown: Set[str] = set()               # devices made larger than the original
        self.lv_extents: Dict[str, int] = {}       # LV id -> extents, where they differ from the layout
        self.made: Dict[str, str] = {}             # device (new name) -> id of the step that made it

    def name(self, device: str) -> str:
        return self.mapping.new_name(device, self.layout)

    def after(self, *devices: str) -> List[str]:
        return sorted({self.made[self.name(d)] for d in devices if self.name(d) in self.made})


def recreate_plan(layout: Layout, here: Sequence[DiskHere], mapping: Mapping, options: RecreateOptions) -> Plan:
    check_names_free(layout, here, set(mapping.disks.values()))
    ctx = PlanContext(layout, here, mapping, options)
    for item in layout.unsupported:
        ctx.notes.append(f"not recreated: {item.what} ({item.kind}): {item.reason}")
    for disk in layout.disks:
        if disk.id in mapping.disks:
            ctx.tables[disk.id] = partition_table_plan(ctx, disk)
    resize_volumes(ctx)
    steps: List[Step] = []
    for item in creation_order(layout, set(mapping.disks)):
        made = plan_item(item, ctx)
        steps += made
    return Plan(mapping, [mapping.disks[d.id] for d in layout.disks if d.id in mapping.disks], steps,
                ctx.notes, ctx.secrets, options.target_root)


def check_names_free(layout: Layout, here: Sequence[DiskHere], wiped: Set[str]) -> None:
    """The arrays, LUKS devices and VGs the plan makes must not be names of devices standing on
    a disk that is not wiped: the plan stops what has those names (a re-run) and makes its own."""
    needed = {("md", m.id): f"the RAID {m.id}" for m in layout.md_arrays}
    needed.update({("crypt", x.name): f"the LUKS device {x.name}" for x in layout.luks})
    needed.update({("lvm", v.name): f"the VG {v.name}" for v in layout.volume_groups})
    for disk in (d for d in here if d.path not in wiped):
        for holder in disk.holders:
            if holder in needed:
                raise RescueError(f"{needed[holder]} of the layout has the name of a device on {disk.path}, "
                                  "which is not to be wiped",
                                  f"stop or rename it first, or map the layout onto {disk.path} too")


def creation_order(layout: Layout, roots: Set[str]) -> List[object]:
    """The layout's items (not the excluded ones), each after what it stands on (KINDS). A
    volume group also comes after its PVs; a partitioned md array's table after the array (a
    filesystem on a whole disk provides the disk's name too, but stands on the disk)."""
    items = [(kind, item) for kind in KINDS if kind.cls is not Exclusion for item in getattr(layout, kind.items)]
    providers: Dict[str, List[int]] = {}
    for n, (kind, item) in enumerate(items):
        provided = kind.provides(item)
        if provided:
            providers.setdefault(provided, []).append(n)
    needs: Dict[int, Set[int]] = {}
    for n, (kind, item) in enumerate(items):
        wanted = list(kind.stands_on(item))
        if isinstance(item, VolumeGroup):
            needs[n] = {m for m, (_, other) in enumerate(items) if isinstance(other, PhysicalVolume) and other.vg == item.name}
        elif isinstance(item, Disk):        # a partitioned array's table needs the array, not what stands on it
            needs[n] = {m for m in providers.get(item.id, []) if isinstance(items[m][1], MdArray)}
        else:
            needs[n] = set()
        for device in wanted:
            found = [m for m in providers.get(device, []) if m != n]
            if not found and device not in roots:
                raise RescueError(f"the layout's {kind.title} {kind.name(item)} stands on {device}, "
                                  "which the layout does not describe",
                                  "make a new layout on the original machine (rescue savelayout); see its "
                                  "'Not recreated' list for what rescue cannot recreate")
            needs[n] |= set(found)
    order: List[int] = []
    state: Dict[int, int] = {}

    def visit(n: int) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            kind, item = items[n]
            raise RescueError(f"the layout's {kind.title} {kind.name(item)} depends on itself",
                              "the layout is broken: make it again with rescue savelayout")
        state[n] = 1
        for m in sorted(needs[n]):
            visit(m)
        state[n] = 2
        order.append(n)

    for n in range(len(items)):
        visit(n)
    return [items[n][1] for n in order]


# -- partition tables and resizing ---------------------------------------------------------------

def align_down(value: int, unit: int) -> int:
    return value // unit * unit


def partition_table_plan(ctx: PlanContext, disk: Disk) -> List[Tuple[Partition, int, Optional[int]]]:
    """(partition, start, size) in the target's sectors; size None: to the end of the disk (the
    partition grows). The last partition grows onto a larger disk or shrinks onto a smaller one
    when options.resize allows it and what it holds fits; everything else keeps its place."""
    parts = [p for p in ctx.layout.partitions if p.disk == disk.id]
    if not parts or disk.partition_table is None:
        return []
    target = ctx.here[ctx.mapping.disks[disk.id]]
    old_ss, new_ss = disk.partition_table.sector_size, target.logical_sector_size
    reserved = (16384 // new_ss + 1) if disk.partition_table.label == "gpt" else 0     # the GPT backup
    last_usable = target.size // new_ss - 1 - reserved
    rows = []
    for p in parts:
        start_bytes, size_bytes = p.start * old_ss, p.size * old_ss
        if start_bytes % new_ss:
            aligned = -(-start_bytes // MIB) * MIB
            ctx.notes.append(f"{p.id}: its start is not a whole {new_ss}-byte sector of {target.path}; "
                             f"it starts at {aligned // MIB} MiB instead")
            size_bytes -= aligned - start_bytes
            start_bytes = aligned
        rows.append([p, start_bytes // new_ss, size_bytes // new_ss])
    last = max((r for r in rows if r[0].role != "extended"), key=lambda r: r[1] + r[2])
    end = last[1] + last[2] - 1
    if target.size != disk.size and ctx.options.resize:
        last[2] = resized_last_partition(ctx, disk, target, last, last_usable)
    elif end > last_usable:
        raise RescueError(f"{target.path} is too small for {disk.id}: {human_size((end - last_usable) * new_ss)} short",
                          "use a larger disk, or allow the last partition to shrink (AUTORESIZE_PARTITIONS=yes)")
    for r in rows:
        if r[0].role == "extended" and last[0].role == "logical":
            r[2] = None if last[2] is None else max(r[2], last[1] + last[2] - r[1])
        if r is not last and r[0].role != "extended" and r[1] + r[2] - 1 > last_usable:
            raise RescueError(f"{target.path} is too small for {disk.id}: {r[0].id} would end "
                              f"{human_size((r[1] + r[2] - 1 - last_usable) * new_ss)} past its end",
                              "use a larger disk: only the last partition can shrink")
    return [(p, start, size) for p, start, size in rows]


def resized_last_partition(ctx: PlanContext, disk: Disk, target: DiskHere, last: list,
                           last_usable: int) -> Optional[int]:
    """The last partition's new size in sectors (None: to the end of the disk)."""
    part, start, size = last
    ss = target.logical_sector_size
    room = align_down((last_usable - start + 1) * ss, MIB) // ss
    if room >= size:
        if disk.partition_table.label == "dos" and start + room > 2 ** 32:
            room = 2 ** 32 - 1 - start
            ctx.notes.append(f"{part.id}: an MBR partition ends at 2 TiB; use GPT for more")
        ctx.notes.append(f"{part.id} grows from {human_size(size * ss)} to {human_size(room * ss)} "
                         f"(to the end of {target.path}, {human_size(target.size)})")
        ctx.grown.add(part.id)
        return None if room == align_down((last_usable - start + 1) * ss, MIB) // ss else room
    need = content_need(ctx, part.id)
    if room <= 0:
        raise RescueError(f"{target.path} ({human_size(target.size)}) is too small for {disk.id}: the partitions "
                          f"before {part.id} alone need {human_size(start * ss)}", "use a larger disk")
    if need is None or room * ss < need:
        short = f"; it needs {human_size(need)}, {human_size(need - room * ss)} more" if need else ""
        raise RescueError(f"{target.path} is too small for {disk.id}: {part.id} would shrink from "
                          f"{human_size(size * ss)} to {human_size(room * ss)}{short}"
                          + ("" if need else " (what it holds cannot be made smaller)"),
                          "use a larger disk")
    ctx.notes.append(f"{part.id} shrinks from {human_size(size * ss)} to {human_size(room * ss)} "
                     f"(onto the smaller {target.path}; {human_size(need)} needed)")
    ctx.grown.add(part.id)        # its contents are sized anew too
    return room


def fs_need(fs: Optional[Filesystem]) -> Optional[int]:
    """The bytes a filesystem needs to be made anew and restored: what it used, plus a margin."""
    if fs is None or fs.used is None:
        return None
    floor = 300 * MIB if fs.type == "xfs" else 16 * MIB      # mkfs.xfs refuses less than 300 MiB
    return max(int(fs.used * 1.1) + 64 * MIB, floor)


def content_need(ctx: PlanContext, device: str) -> Optional[int]:
    """The bytes what stands on device needs, or None when it cannot be made smaller (an md
    member, LUKS, a PV shared with other PVs, a filesystem of unknown usage)."""
    lay = ctx.layout
    fs = next((f for f in lay.filesystems if f.device == device), None)
    if fs is not None:
        return fs_need(fs)
    if any(s.device == device for s in lay.swaps):
        return 64 * MIB
    pv = next((p for p in lay.physical_volumes if p.device == device), None)
    vg = next((v for v in lay.volume_groups if pv and v.name == pv.vg), None)
    if vg is None or len(vg.pvs) != 1:
        return None
    lv = growing_lv(ctx, vg)
    others = sum(x.size for x in lay.logical_volumes if x.vg == vg.name and x is not lv)
    lv_need = content_need(ctx, lv.id) if lv else 0
    return None if lv_need is None else others + lv_need + vg.extent_size + MIB


def growing_lv(ctx: PlanContext, vg: VolumeGroup) -> Optional[LogicalVolume]:
    """The LV that takes what a resized PV gains or loses: options.grow_lv, else the LV that
    ends last on the VG's PVs (vgcfgbackup's segments say where), else the VG's last LV."""
    lvs = [lv for lv in ctx.layout.logical_volumes if lv.vg == vg.name and lv.segment_type in ("linear", "striped")]
    named = [lv for lv in lvs if f"{lv.vg}/{lv.name}" == ctx.options.grow_lv]
    if named:
        return named[0]
    text = ctx.options.vgcfg.get(vg.name, ("", ""))[1]
    ends = vgcfg_lv_ends(text)
    return max(lvs, key=lambda lv: (ends.get(lv.name, -1), lvs.index(lv)), default=None)


def vgcfg_lv_ends(text: str) -> Dict[str, int]:
    """LV name -> the highest physical extent its segments start at, from a vgcfgbackup file."""
    ends: Dict[str, int] = {}
    section = re.search(r"logical_volumes \{(.*)", text, re.S)
    if not section:
        return ends
    for match in re.finditer(r"^\t\t(\S+) \{(.*?)^\t\t\}", section.group(1), re.S | re.M):
        offsets = [int(x) for x in re.findall(r'"pv\d+", (\d+)', match.group(2))]
        if offsets:
            ends[match.group(1)] = max(offsets)
    return ends


def resize_volumes(ctx: PlanContext) -> None:
    """A grown or shrunk partition that is a PV resizes its VG's growing LV with it."""
    for part in sorted(ctx.grown):
        pv = next((p for p in ctx.layout.physical_volumes if p.device == part), None)
        vg = next((v for v in ctx.layout.volume_groups if pv and v.name == pv.vg), None)
        lv = growing_lv(ctx, vg) if vg else None
        if vg is None or lv is None:
            continue
        disk, start, size = next((d, s, z) for d, rows in ctx.tables.items() for p, s, z in rows if p.id == part)
        if size is None:
            ctx.lv_extents[lv.id] = -1                  # all that is free, after the others
            ctx.notes.append(f"LV {lv.vg}/{lv.name} grows into the larger PV {ctx.name(part)}")
        else:
            ss = ctx.here[ctx.mapping.disks[disk]].logical_sector_size
            others = sum(x.size for x in ctx.layout.logical_volumes if x.vg == vg.name and x is not lv)
            extents = (size * ss - MIB) // vg.extent_size - others // vg.extent_size
            ctx.lv_extents[lv.id] = extents
            ctx.notes.append(f"LV {lv.vg}/{lv.name} shrinks to {human_size(extents * vg.extent_size)}")
        ctx.grown.add(lv.id)


def sfdisk_script(disk: Disk, rows: Sequence[Tuple[Partition, int, Optional[int]]], new_disk: str,
                  sector_size: int) -> str:
    """The table as sfdisk reads it. A GPT partition that starts before 1 MiB (a bios_grub at
    sector 34 of an older install) needs first-lba said: sfdisk's own is 1 MiB."""
    table = disk.partition_table
    lines = [f"label: {table.label}"] + ([f"label-id: {table.id}"] if table.id else []) + ["unit: sectors"]
    first = min((start for _, start, _ in rows), default=None)
    if table.label == "gpt" and first is not None and first < MIB // sector_size:
        lines.append(f"first-lba: {first}")
    lines.append("")
    for part, start, size in rows:
        fields = [f"start={start}"] + ([f"size={size}"] if size is not None else []) + [f"type={part.type}"]
        if part.uuid and table.label == "gpt":
            fields.append(f"uuid={part.uuid}")
        if part.name:
            fields.append('name="%s"' % part.name.replace('"', "'"))
        if part.attrs:
            fields.append(f'attrs="{part.attrs}"')
        if part.bootable:
            fields.append("bootable")
        lines.append(f"{partition_device(new_disk, part.number)} : " + ", ".join(fields))
    return "\n".join(lines) + "\n"


# -- one plan function per kind ---------------------------------------------------------------

@functools.singledispatch
def plan_item(item: object, ctx: PlanContext) -> List[Step]:
    raise RescueError(f"rescue cannot recreate {type(item).__name__} items", "report this with the layout")


@plan_item.register
def plan_disk(disk: Disk, ctx: PlanContext) -> List[Step]:
    """A mapped disk: stop what stands on it now, wipe it, write its partition table. A
    partitioned md array (not mapped): only its table, once the array exists."""
    new = ctx.mapping.disks.get(disk.id, disk.id)
    here = ctx.here.get(new)
    steps: List[Step] = []
    if here is not None:
        steps += stop_steps(new, here.holders)
        steps += wipe_steps(new, here)
    rows = ctx.tables.get(disk.id) or ([(p, p.start, p.size) for p in ctx.layout.partitions if p.disk == disk.id]
                                      if disk.partition_table else [])
    if rows:
        steps.append(Step(f"partition {new}", f"Disk {new}: {disk.partition_table.label} partition table with "
                          f"{len(rows)} partitions", ["sfdisk", "--wipe", "always", "--wipe-partitions", "always", new],
                          input=sfdisk_script(disk, rows, new, here.logical_sector_size if here else
                                              disk.partition_table.sector_size), after=ctx.after(disk.id)))
        parts = [[p.number, partition_device(new, p.number)] for p, _, _ in rows]
        steps.append(Step(f"wait for partitions of {new}", f"Disk {new}: wait until the kernel shows its partitions",
                          action="partitions", params={"disk": new, "partitions": parts}, after=[steps[-1].id]))
    if steps:
        ctx.made[new] = steps[-1].id
    return steps


def stop_steps(disk: str, holders: Sequence[Tuple[str, str]]) -> List[Step]:
    """Stale users of a disk (an array that assembled itself, LVs that activated, an open LUKS
    device) keep it busy and its old metadata alive: stop them, the deepest first."""
    out = []
    for kind, name in holders:
        argv = {"lvm": ["lvm", "vgchange", "--config", LVM_CONFIG, "-an", name],
                "dm": ["dmsetup", "remove", name], "crypt": ["cryptsetup", "close", name],
                "md": ["mdadm", "--stop", name]}[kind]
        out.append(Step(f"stop {kind} {name}", f"Stop {name}, which stands on {disk} now", argv,
                        env=dict(NO_UDEV_ENV) if kind in ("dm", "crypt") else {}, optional=True))
    return out


def wipe_steps(disk: str, here: DiskHere) -> List[Step]:
    """Every signature of the old partitions and of the disk, and the first and last 16 MiB
    (old GPT backup headers and md 0.90/1.0 superblocks live at the end)."""
    steps = [Step(f"wipe {p}", f"Wipe the signatures on {p}", ["wipefs", "-a", "-f", p], optional=True)
             for p in reversed(here.partitions)]
    steps.append(Step(f"wipe {disk}", f"Wipe the signatures on {disk}", ["wipefs", "-a", "-f", disk]))
    mib = here.size // MIB
    count = min(16, mib)
    steps.append(Step(f"zero start of {disk}", f"Zero the first {count} MiB of {disk}",
                      ["dd", "if=/dev/zero", f"of={disk}", "bs=1M", f"count={count}", "conv=fsync", "status=none"]))
    if mib > 16:
        steps.append(Step(f"zero end of {disk}", f"Zero the last 16 MiB of {disk}",
                          ["dd", "if=/dev/zero", f"of={disk}", "bs=1M", f"seek={mib - 16}", "count=16", "conv=fsync",
                           "status=none"]))
    return steps


def wipe_new(device: str, after: List[str]) -> Step:
    """Before something is made on a new device: old metadata there becomes visible only now."""
    return Step(f"wipe new {device}", f"Wipe old signatures on the new {device}", ["wipefs", "-a", "-f", device],
                after=after)


@plan_item.register
def plan_partition(part: Partition, ctx: PlanContext) -> List[Step]:
    new = ctx.name(part.id)
    if part.role == "extended":
        return []
    step = wipe_new(new, ctx.after(part.disk))
    ctx.made[new] = step.id
    return [step]


@plan_item.register
def plan_md(md: MdArray, ctx: PlanContext) -> List[Step]:
    members = [ctx.name(d) for d in md.devices]
    total = md.raid_devices or len(members)
    missing = ["missing"] * max(0, total - len(members))
    argv = ["mdadm", "--create", md.id, "--run", "--assume-clean", f"--level={md.level}", f"--raid-devices={total}"]
    argv += [f"--metadata={md.metadata}"] if md.metadata else []
    argv += [f"--uuid={md.uuid}"] if md.uuid else []
    argv += [f"--name={md.name}"] if md.name else []
    argv += [f"--chunk={md.chunk_size}"] if md.chunk_size and "raid1" != md.level else []
    argv += [f"--layout={md.layout}"] if md.layout and md.level in ("raid5", "raid6", "raid10") else []
    argv += [f"--spare-devices={len(md.spares)}"] if md.spares else []
    argv += members + missing + [ctx.name(d) for d in md.spares]
    stop = Step(f"stop old {md.id}", f"RAID {md.id}: stop it if it runs (a re-run)", ["mdadm", "--stop", md.id],
                after=ctx.after(*md.devices, *md.spares), optional=True)
    create = Step(f"create {md.id}", f"RAID {md.id}: {md.level} of {', '.join(members + missing)}", argv,
                  after=[stop.id], note="degraded: a member was missing when the layout was saved" if missing else "")
    wait = Step(f"wait for {md.id}", f"RAID {md.id}: wait for the device", action="devices",
                params={"devices": [md.id]}, after=[create.id])
    wipe = wipe_new(md.id, [wait.id])
    ctx.made[md.id] = wipe.id
    return [stop, create, wait, wipe]


@plan_item.register
def plan_luks(lk: Luks, ctx: PlanContext) -> List[Step]:
    device = ctx.name(lk.device)
    argv = ["cryptsetup", "luksFormat", "--batch-mode", "--type", f"luks{lk.version}"]
    for option, value in (("--uuid", lk.uuid), ("--cipher", lk.cipher), ("--key-size", lk.key_size),
                          ("--hash", lk.hash), ("--sector-size", lk.sector_size if lk.version == 2 else None),
                          ("--label", lk.label if lk.version == 2 else None),
                          ("--pbkdf", lk.pbkdf if lk.version == 2 else None)):
        if value:
            argv += [option, str(value)]
    secret = f"luks:{lk.name}"
    ctx.secrets.append((secret, f"the LUKS device {lk.name} on {device}"))
    close = ["cryptsetup", "close", lk.name]
    steps = [Step(f"close old {lk.id}", f"Close {lk.name} if it is open (a re-run)", close, env=dict(NO_UDEV_ENV),
                  after=ctx.after(lk.device), optional=True),
             Step(f"format {lk.id}", f"LUKS{lk.version} {lk.name} on {device}", argv + ["--key-file=-", device],
                  secret=secret, env=dict(NO_UDEV_ENV)),
             Step(f"close again {lk.id}", f"Close {lk.name} if a killed run opened it", close, env=dict(NO_UDEV_ENV),
                  optional=True),
             Step(f"open {lk.id}", f"Open {lk.name}", ["cryptsetup", "open", "--type", f"luks{lk.version}",
                                                       "--key-file=-", device, lk.name],
                  secret=secret, env=dict(NO_UDEV_ENV))]
    steps.append(wipe_new(lk.id, []))
    for n in range(1, len(steps)):
        steps[n].after = steps[n].after or [steps[n - 1].id]
    ctx.made[lk.id] = steps[-1].id
    return steps


def lvm(*args: str) -> List[str]:
    return ["lvm", args[0], "--config", LVM_CONFIG] + list(args[1:])


@plan_item.register
def plan_pv(pv: PhysicalVolume, ctx: PlanContext) -> List[Step]:
    vg = next(v for v in ctx.layout.volume_groups if v.name == pv.vg)
    device = ctx.name(pv.device)
    restore = vgcfg_restorable(ctx, vg)
    source = ["--restorefile", ctx.options.vgcfg[vg.name][0]] if restore else ["--norestorefile"]
    step = Step(f"pv {device}", f"LVM PV {device} of {pv.vg}", lvm("pvcreate", "-ff", "-y", "--uuid", pv.uuid, *source, device),
                after=ctx.after(pv.device))
    ctx.made[f"pv:{pv.device}"] = step.id
    return [step]


def vgcfg_restorable(ctx: PlanContext, vg: VolumeGroup) -> bool:
    """vgcfgrestore keeps every UUID and extent, but only for the same PVs, sizes and plain
    segments (it cannot make a thin pool's or a RAID LV's data consistent)."""
    lvs = [lv for lv in ctx.layout.logical_volumes if lv.vg == vg.name]
    return (vg.name in ctx.options.vgcfg and all(lv.segment_type in ("linear", "striped") for lv in lvs)
            and not any(ctx.lv_extents.get(lv.id, -1) >= 0 for lv in lvs))


@plan_item.register
def plan_vg(vg: VolumeGroup, ctx: PlanContext) -> List[Step]:
    pvs = [ctx.name(p) for p in vg.pvs]
    after = sorted({ctx.made[f"pv:{p}"] for p in vg.pvs if f"pv:{p}" in ctx.made})
    if vgcfg_restorable(ctx, vg):
        steps = [Step(f"vg {vg.name}", f"LVM VG {vg.name}: restore its metadata (every LV with its UUID and extents)",
                      lvm("vgcfgrestore", "-f", ctx.options.vgcfg[vg.name][0], vg.name), after=after)]
    else:
        steps = [Step(f"vg {vg.name}", f"LVM VG {vg.name} on {', '.join(pvs)}",
                      lvm("vgcreate", "-y", "--physicalextentsize", f"{vg.extent_size // 1024}k", vg.name, *pvs), after=after)]
        reason = ("no vgcfgbackup file" if vg.name not in ctx.options.vgcfg else
                  "an LV shrinks or is not linear/striped")
        ctx.notes.append(f"VG {vg.name} is made anew ({reason}): the VG and its LVs get new UUIDs")
        steps += lvcreate_steps(ctx, vg, steps[0].id)
    steps.append(Step(f"activate {vg.name}", f"Activate the LVs of {vg.name}", lvm("vgchange", "-ay", vg.name),
                      after=[steps[-1].id]))
    ctx.made[vg.name] = steps[-1].id
    for lv in (x for x in ctx.layout.logical_volumes if x.vg == vg.name):
        ctx.made[lv.id] = steps[-1].id
    return steps


def lvcreate_steps(ctx: PlanContext, vg: VolumeGroup, after: str) -> List[Step]:
    lvs = [lv for lv in ctx.layout.logical_volumes if lv.vg == vg.name]
    pools = [lv for lv in lvs if lv.segment_type == "thin-pool"]
    plain = [lv for lv in lvs if lv.segment_type not in ("thin-pool", "thin")]
    thin = [lv for lv in lvs if lv.segment_type == "thin"]
    grow = [lv for lv in plain if ctx.lv_extents.get(lv.id) == -1]
    ordered = pools + [lv for lv in plain if lv not in grow] + grow + thin     # what grows takes the rest
    steps = []
    for lv in ordered:
        if lv.segment_type not in LVCREATE_TYPES:
            raise RescueError(f"rescue cannot recreate the LV {lv.vg}/{lv.name} (segment type {lv.segment_type})",
                              "leave its VG out (EXCLUDE_VG) or recreate it by hand after layoutonly")
        steps.append(Step(f"lv {lv.vg}/{lv.name}", f"LVM LV {lv.vg}/{lv.name} ({lv.segment_type})",
                          lvm("lvcreate", "-y", "-Wy", "-Zy", "-n", lv.name, *lvcreate_args(ctx, lv, vg), vg.name),
                          after=[steps[-1].id if steps else after]))
    return steps


def lvcreate_args(ctx: PlanContext, lv: LogicalVolume, vg: VolumeGroup) -> List[str]:
    extents = ctx.lv_extents.get(lv.id, lv.size // vg.extent_size if vg.extent_size else 0)
    size = ["-l", "100%FREE"] if extents == -1 else ["-l", str(extents)]
    kind = lv.segment_type
    if kind == "thin":
        return ["--type", "thin", "-V", f"{lv.size // 1024}k", "--thinpool", lv.pool or ""]
    args = ["--type", kind] + size
    if kind == "striped" and lv.stripes > 1:
        args += ["-i", str(lv.stripes), "-I", f"{lv.stripe_size // 1024}k"]
    elif kind in ("raid1", "mirror"):
        args += ["-m", str(max(1, lv.data_copies - 1))]
    elif kind in ("raid0", "raid4", "raid5", "raid6", "raid10") and lv.stripes > 1:
        args += ["-i", str(lv.stripes)]
    if kind == "thin-pool" and lv.metadata_size:
        args += ["--poolmetadatasize", f"{lv.metadata_size // 1024}k"]
    return args


@plan_item.register
def plan_lv(lv: LogicalVolume, ctx: PlanContext) -> List[Step]:
    """LVs come with their VG (vgcfgrestore or lvcreate); a restored VG whose PVs grew (each
    one that did is resized) gives the growing LV what they gained."""
    vg = next(v for v in ctx.layout.volume_groups if v.name == lv.vg)
    if ctx.lv_extents.get(lv.id) != -1 or not vgcfg_restorable(ctx, vg):
        return []
    steps: List[Step] = []
    for pv in (p for p in ctx.layout.physical_volumes if p.vg == lv.vg and p.device in ctx.grown):
        steps.append(Step(f"pvresize {ctx.name(pv.device)}", f"LVM PV {ctx.name(pv.device)}: use the larger partition",
                          lvm("pvresize", ctx.name(pv.device)), after=[steps[-1].id if steps else ctx.made[lv.id]]))
    steps.append(Step(f"lvextend {lv.vg}/{lv.name}", f"LVM LV {lv.vg}/{lv.name}: grow into what the PVs gained",
                      lvm("lvextend", "-l", "+100%FREE", f"{lv.vg}/{lv.name}"), after=[steps[-1].id]))
    ctx.made[lv.id] = steps[-1].id
    return steps


@plan_item.register
def plan_filesystem(fs: Filesystem, ctx: PlanContext) -> List[Step]:
    device = ctx.name(fs.device)
    resized = fs.device in ctx.grown or ctx.name(fs.device) in ctx.grown
    argv, fallback, note = mkfs_command(fs, device, resized)
    step = Step(f"mkfs {device}", f"{fs.type} on {device}" + (f" (UUID {fs.uuid})" if fs.uuid else ""), argv,
                fallback=fallback, note=note, after=ctx.after(fs.device))
    steps = [step] + btrfs_subvolume_steps(fs, device, ctx, step.id)
    if fs.type == "xfs" and resized:
        ctx.notes.append(f"{device}: XFS cannot shrink or be resized in place; it is made new at its new size "
                         "(its files come from the backup)")
    if not fs.uuid:
        ctx.notes.append(f"{device}: the layout has no UUID for its {fs.type} filesystem; it gets a new one")
    ctx.made[f"fs:{fs.device}"] = steps[-1].id
    return steps


def mkfs_command(fs: Filesystem, device: str, resized: bool) -> Tuple[List[str], List[str], str]:
    """(mkfs argv with the original's UUID, label and options, the same with only UUID and
    label for a tool that rejects an option, why) for each filesystem type rescue makes."""
    opts, uuid, label = fs.options or {}, fs.uuid, fs.label
    if fs.type in ("ext2", "ext3", "ext4"):
        base = ["mke2fs", "-F", "-q", "-t", fs.type] + (["-U", uuid] if uuid else []) + (["-L", label] if label else [])
        extra = ext_options(opts, resized)
        return base + extra + [device], (base + [device] if extra else []), ""
    if fs.type == "xfs":
        meta = ["uuid=" + uuid] if uuid else []
        base = ["mkfs.xfs", "-f"] + (["-m", ",".join(meta)] if meta else []) + (["-L", label] if label else [])
        return xfs_command(opts, uuid, label, resized) + [device], base + [device], \
            "mkfs.xfs -m uuid= (not xfs_admin -U, whose incompat flag GRUB cannot read: ReaR #1065)"
    if fs.type == "vfat":
        volume_id = (opts.get("volume_id") or "").replace("-", "")
        argv = ["mkfs.vfat"] + (["-F", str(opts["fat_size"])] if opts.get("fat_size") else [])
        argv += (["-i", volume_id] if volume_id else []) + (["-n", label] if label else [])
        return argv + [device], [], ""
    if fs.type == "btrfs":
        return ["mkfs.btrfs", "-f"] + (["-U", uuid] if uuid else []) + (["-L", label] if label else []) + [device], [], ""
    raise RescueError(f"rescue cannot make {fs.type} filesystems ({fs.device})",
                      "leave it out of the layout (EXCLUDE_MOUNTPOINTS) and recreate it by hand")


def ext_options(opts: Dict[str, object], resized: bool) -> List[str]:
    out: List[str] = []
    if opts.get("block_size"):
        out += ["-b", str(opts["block_size"])]
    if opts.get("inode_size"):
        out += ["-I", str(opts["inode_size"])]
    if opts.get("inode_count") and not resized:
        out += ["-N", str(opts["inode_count"])]
    elif opts.get("bytes_per_inode"):
        out += ["-i", str(opts["bytes_per_inode"])]
    blocks, reserved = opts.get("block_count"), opts.get("reserved_blocks")
    if blocks and reserved is not None:
        out += ["-m", f"{100 * int(reserved) / int(blocks):.2f}".rstrip("0").rstrip(".")]
    features = [f for f in opts.get("features") or [] if f not in EXT_FEATURES_NOT_SET]
    if features:
        out += ["-O", "none," + ",".join(features)]
    return out


def xfs_command(opts: Dict[str, Dict[str, str]], uuid: Optional[str], label: Optional[str], resized: bool) -> List[str]:
    meta = opts.get("meta-data", {})
    data, naming = opts.get("data", {}), opts.get("naming", {})
    m = (["uuid=" + uuid] if uuid else []) + [f"{k}={meta[k]}" for k in ("crc", "finobt", "rmapbt", "reflink",
                                                                          "bigtime", "inobtcount") if k in meta]
    argv = ["mkfs.xfs", "-f"] + (["-m", ",".join(m)] if m else []) + (["-L", label] if label else [])
    inode = [f"size={meta['isize']}"] if "isize" in meta else []
    inode += [f"sparse={meta['sparse']}"] if "sparse" in meta else []
    argv += ["-i", ",".join(inode)] if inode else []
    argv += ["-b", f"size={data['bsize']}"] if "bsize" in data else []
    argv += ["-n", f"ftype={naming['ftype']}"] if "ftype" in naming else []
    if "agcount" in meta and not resized:
        argv += ["-d", f"agcount={meta['agcount']}"]
    return argv


def btrfs_subvolume_steps(fs: Filesystem, device: str, ctx: PlanContext, after: str) -> List[Step]:
    """Subvolumes parent first, then the default one (ReaR #2067), in the filesystem's top level
    mounted aside for a moment."""
    subvolumes = (fs.options or {}).get("subvolumes") or []
    if fs.type != "btrfs" or not subvolumes:
        return []
    top = f"/run/rescue/btrfs-{len(ctx.made)}"
    steps = [Step(f"btrfs top {device}", f"btrfs {device}: mount its top level at {top}", action="mount",
                  params={"device": device, "path": top, "type": "btrfs", "options": "subvolid=5"}, after=[after])]
    for sub in sorted(subvolumes, key=lambda s: (str(s["path"]).count("/"), str(s["path"]))):
        steps.append(Step(f"btrfs subvolume {device} {sub['path']}", f"btrfs {device}: subvolume {sub['path']}",
                          ["btrfs", "subvolume", "create", f"{top}/{sub['path']}"], after=[steps[-1].id]))
    default = next((s for s in subvolumes if s["id"] == (fs.options or {}).get("default_subvolume")), None)
    if default:
        steps.append(Step(f"btrfs default {device}", f"btrfs {device}: default subvolume {default['path']}",
                          ["btrfs", "subvolume", "set-default", f"{top}/{default['path']}"], after=[steps[-1].id]))
    steps.append(Step(f"btrfs done {device}", f"btrfs {device}: unmount its top level", ["umount", top],
                      after=[steps[-1].id]))
    ctx.notes.append(f"{device}: btrfs subvolumes get new IDs; mounts name them by path (subvol=)")
    return steps


@plan_item.register
def plan_swap(swap: Swap, ctx: PlanContext) -> List[Step]:
    device = ctx.name(swap.device)
    argv = ["mkswap", "-f"] + (["-U", swap.uuid] if swap.uuid else []) + (["-L", swap.label] if swap.label else [])
    return [Step(f"mkswap {device}", f"swap on {device}", argv + [device], after=ctx.after(swap.device))]


@plan_item.register
def plan_mount(mount: Mount, ctx: PlanContext) -> List[Step]:
    device = ctx.name(mount.device)
    path = os.path.normpath(ctx.options.target_root + "/" + mount.mountpoint)
    after = [ctx.made[f"fs:{mount.device}"]] if f"fs:{mount.device}" in ctx.made else []
    if mount.parent:
        after.append(ctx.made[f"mount:{mount.parent}"])
    step = Step(f"mount {mount.mountpoint}", f"Mount {device} at {path}", action="mount",
                params={"device": device, "path": path, "type": mount.type,
                        "options": recovery_mount_options(mount)}, after=after)
    ctx.made[f"mount:{mount.mountpoint}"] = step.id
    return [step]


def recovery_mount_options(mount: Mount) -> str:
    """The original options, without what would stop a restore or mount the wrong thing (ro,
    noauto, an old subvolume ID, SELinux contexts); btrfs: the subvolume by path."""
    kept = [o for o in mount.options.split(",") if o and o not in MOUNT_OPTIONS_DROPPED
            and not o.startswith(MOUNT_OPTION_PREFIXES_DROPPED)]
    if mount.type == "btrfs" and mount.subvolume:
        kept.append("subvol=" + mount.subvolume)
    return ",".join(kept)


def steps_to_run(steps: Sequence[Step], done: Sequence[str]) -> List[Step]:
    """The steps a run does: those not journaled as done, and again the optional ones just
    before the first of them. A killed run may have finished a command without journaling it
    (an array created, a LUKS device opened); the stop/close steps before it undo that, so the
    command can run again instead of failing on what it made itself."""
    finished = set(done)
    first = next((n for n, step in enumerate(steps) if step.id not in finished), None)
    if first is None:
        return []
    again = first
    while again > 0 and steps[again - 1].optional:
        again -= 1
    return [step for n, step in enumerate(steps) if step.id not in finished or again <= n < first]


# -- mountonly: the tree as it is --------------------------------------------------------------

def mountonly_plan(layout: Layout, target_root: str) -> List[Step]:
    """Assemble the arrays, open the LUKS devices, activate the VGs and mount every filesystem
    of the layout by its UUID under target_root: nothing is created, and a filesystem whose
    UUID is not there is an error, not a guess."""
    steps: List[Step] = []
    filesystems = {f.device: f for f in layout.filesystems}
    for item in creation_order(layout, {d.id for d in layout.disks}):
        if isinstance(item, MdArray):
            steps += [Step(f"assemble {item.id}", f"RAID {item.id}: assemble it", ["mdadm", "--assemble", item.id, "--run"]
                           + ([f"--uuid={item.uuid}"] if item.uuid else []), optional=True),
                      Step(f"wait for {item.id}", f"RAID {item.id}: wait for the device", action="devices",
                           params={"devices": [item.id]})]
        elif isinstance(item, Luks):
            if not item.uuid:
                raise RescueError(f"the layout has no UUID for the LUKS device {item.name}", "make the layout anew")
            steps.append(Step(f"open {item.id}", f"Open {item.name}", action="open_luks",
                              params={"uuid": item.uuid, "name": item.name}, secret=f"luks:{item.name}"))
        elif isinstance(item, VolumeGroup):
            steps.append(Step(f"activate {item.name}", f"Activate the LVs of {item.name}", lvm("vgchange", "-ay", item.name)))
        elif isinstance(item, Mount):
            fs = filesystems.get(item.device)
            if fs is None or not fs.uuid:
                raise RescueError(f"the layout has no filesystem UUID for {item.mountpoint}", "make the layout anew")
            steps.append(Step(f"mount {item.mountpoint}", f"Mount UUID={fs.uuid} at {item.mountpoint}", action="mount",
                              params={"device": f"UUID={fs.uuid}", "path": os.path.normpath(target_root + "/" + item.mountpoint),
                                      "type": item.type, "options": recovery_mount_options(item)}))
    return steps


def unmount_plan(layout: Layout, target_root: str) -> List[Step]:
    """Undo mountonly_plan: unmount the tree (and what finalize bound into it), deactivate the
    VGs, close the LUKS devices, stop the arrays. Each step may find its work done."""
    steps = [Step("unmount", f"Unmount everything below {target_root}", ["umount", "-R", target_root], optional=True)]
    for item in reversed(creation_order(layout, {d.id for d in layout.disks})):
        if isinstance(item, VolumeGroup):
            steps.append(Step(f"deactivate {item.name}", f"Deactivate {item.name}", lvm("vgchange", "-an", item.name),
                              optional=True))
        elif isinstance(item, Luks):
            steps.append(Step(f"close {item.id}", f"Close {item.name}", ["cryptsetup", "close", item.name], optional=True))
        elif isinstance(item, MdArray):
            steps.append(Step(f"stop {item.id}", f"Stop {item.id}", ["mdadm", "--stop", item.id], optional=True))
    return steps


# -- how a plan is shown ----------------------------------------------------------------------

def step_command(step: Step) -> str:
    """The step as one shell command line (actions as the commands that do the same)."""
    env = "".join(f"{k}={v} " for k, v in sorted(step.env.items()))
    if step.argv:
        line = env + " ".join(shlex.quote(a) for a in step.argv)
        if step.secret:
            line = f'printf %s "${secret_variable(step.secret)}" | ' + line
        return line
    p = step.params
    if step.action == "mount":
        options = ["-o", str(p["options"])] if p.get("options") else []
        mount = " ".join(shlex.quote(a) for a in ["mount", "-t", str(p["type"])] + options + [str(p["device"]), str(p["path"])])
        return f"mkdir -p {shlex.quote(str(p['path']))} && {{ mountpoint -q {shlex.quote(str(p['path']))} || {mount}; }}"
    if step.action == "partitions":
        checks = " && ".join(f"[ -b {shlex.quote(path)} ]" for _, path in p["partitions"])
        return f"until {checks}; do partx -u {shlex.quote(str(p['disk']))}; sleep 0.2; done"
    if step.action == "devices":
        checks = " && ".join(f"[ -b {shlex.quote(str(d))} ]" for d in p["devices"])
        return f"until {checks}; do sleep 0.2; done"
    return f"# {step.action} {p}"


def secret_variable(secret: str) -> str:
    return "SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", secret).upper()


def describe_plan(plan: Plan, layout: Layout, here: Sequence[DiskHere]) -> str:
    lines = ["Disks (the layout's -> the disks here):"]
    lines += ["  " + line for line in describe_mapping(plan.mapping, layout, here)]
    lines += ["", "Disks to be wiped completely: " + (", ".join(plan.wipe) or "none")]
    if plan.notes:
        lines += ["", "Notes:"] + [f"  {note}" for note in plan.notes]
    lines += ["", f"Steps ({len(plan.steps)}):"]
    for n, step in enumerate(plan.steps, 1):
        lines.append(f"  {n:3}. {step.title}")
        lines.append(f"       {step_command(step)}")
        if step.input:
            lines += [f"         | {line}" for line in step.input.rstrip("\n").splitlines()]
    return "\n".join(lines)


def plan_script(plan: Plan, layout: Layout, here: Sequence[DiskHere]) -> str:
    """The plan as a bash script a person could read and run by hand in the rescue system."""
    out = ["#!/bin/bash", f"# rescue {__version__}: recreate the storage of {layout.hostname} (made by layoutonly --script).",
           "# Review it first: it WIPES " + (", ".join(plan.wipe) or "nothing") + ".", "set -euo pipefail", ""]
    out += ["# " + line for line in describe_mapping(plan.mapping, layout, here)] + [""]
    for name, what in plan.secrets:
        out += [f"# {what}: the passphrase, typed once here",
                f"read -r -s -p 'Passphrase for {what}: ' {secret_variable(name)}; echo"]
    out += ["# " + note for note in plan.notes]
    for n, step in enumerate(plan.steps, 1):
        out += ["", f"# {n}. {step.title}" + (f" ({step.note})" if step.note else "")]
        if step.input:
            out.append(step_command(step) + " <<'EOF'")
            out += step.input.rstrip("\n").splitlines() + ["EOF"]
        else:
            out.append(step_command(step))
    return "\n".join(out) + "\n"


def plan_json(plan: Plan, layout: Layout) -> str:
    return json.dumps({"hostname": layout.hostname, "mapping": plan.mapping.disks, "rules": plan.mapping.reasons,
                       "left_out": plan.mapping.left_out, "wipe": plan.wipe, "notes": plan.notes,
                       "secrets": [name for name, _ in plan.secrets], "target_root": plan.target_root,
                       "steps": [dataclasses.asdict(s) for s in plan.steps]}, indent=2)


# =============================================================================================
# 11. duplicity and the backup target
#
# dist/rescue.pyz carries duplicity (pure Python once, plus _librsync for CPython 3.9-3.13), so
# one copied file works where duplicity is not installed; DUPLICITY_PROG selects another one.
#
# On the target, "$BACKUP_DUPLICITY_URL/$HOSTNAME" holds the duplicity chain (ReaR's place,
# so ReaR's chains stay usable) and ".../$HOSTNAME/layout" a second, tiny duplicity
# chain: one full backup per run of the disk layout and the configuration without its
# secrets, encrypted like the main chain, so a bare machine can fetch them before it restores.
# =============================================================================================

def bundled_duplicity_dir() -> Optional[Path]:
    """The directory holding an importable duplicity package, or None."""
    spec = importlib.util.find_spec("duplicity")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(list(spec.submodule_search_locations)[0])
    if not any((package / f"_librsync{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        version = "%d.%d" % sys.version_info[:2]
        raise RescueError(f"the duplicity in {package} has no _librsync for Python {version}",
                          "run rescue with python3.9 … python3.13, or set DUPLICITY_PROG "
                          "to an installed duplicity")
    return package.parent


# Runs the bundled duplicity like `python3 -m duplicity`, except for one thing: after a backup
# interrupted in its first volume, duplicity restarts itself with os.execve(sys.argv[0],
# sys.argv, environ), and under -m sys.argv[0] is duplicity/__main__.py, which cannot be
# executed (PermissionError, found by a test that stops a backup with SIGTERM). Here the
# restart runs the interpreter with this same code again.
DUPLICITY_LAUNCHER = (
    "import os, runpy, sys\n"
    "_execve = os.execve\n"
    "def execve(path, args, env):\n"
    "    if path != sys.argv[0]:\n"
    "        return _execve(path, args, env)\n"
    "    _execve(sys.executable, [sys.executable, '-c', 'C = %r\\nexec(C)' % C] + list(args[1:]), env)\n"
    "os.execve = execve\n"
    "runpy.run_module('duplicity', run_name='__main__', alter_sys=False)\n")


def duplicity_command(config: Config) -> Tuple[List[str], Dict[str, str]]:
    """argv prefix and extra environment that run duplicity."""
    prog = config.setting("DUPLICITY_PROG")
    if prog:
        return [prog], {}
    site = bundled_duplicity_dir()
    if site is not None:
        # The child is a fresh interpreter: it needs the (extracted) bundle on its path.
        return [sys.executable, "-c", f"C = {DUPLICITY_LAUNCHER!r}\nexec(C)"], {"PYTHONPATH": str(site)}
    return ["duplicity"], {}


LAYOUT_TARGET = "layout"              # below the host's target URL


def url_join(url: str, *names: str) -> str:
    """url with more path components (names, each one component), from the parsed URL."""
    parsed = urllib.parse.urlsplit(url)
    return parsed._replace(path="/".join([parsed.path.rstrip("/")] + list(names))).geturl()


def backup_url(config: Config) -> str:
    """Where this host's chain lives: $BACKUP_DUPLICITY_URL/$HOSTNAME, as ReaR does."""
    method = config.setting("BACKUP")
    if method.upper() != "DUPLICITY":
        raise ConfigError(f"BACKUP={method}: rescue implements BACKUP=DUPLICITY only",
                          "set BACKUP=DUPLICITY and the BACKUP_DUPLICITY_* variables (see conf/default.conf)")
    base = config.setting("BACKUP_DUPLICITY_URL")
    if not base:
        raise ConfigError("BACKUP_DUPLICITY_URL is not set",
                          "set it in local.conf, e.g. BACKUP_DUPLICITY_URL=\"rsync://root@server//srv/backup\"")
    # Plain sftp:// and scp:// mean paramiko to duplicity, which is not bundled: go through the
    # system's ssh instead (pexpect), which also reads the user's ssh configuration.
    scheme = base.split("://", 1)[0]
    if scheme in ("sftp", "scp"):
        base = "pexpect+" + base
    return url_join(base, backup_host(config))


def layout_url(url: str) -> str:
    """The layout chain beside the host's backup chains."""
    return url_join(url, LAYOUT_TARGET)


def default_archive_dir() -> str:
    """duplicity's own default (its cache of the chain's metadata), made explicit so that it
    can be excluded from the backup."""
    return str(Path(os.environ.get("HOME") or "/root") / ".cache" / "duplicity")


def ssh_login(url: str, ssh_options: str) -> Optional[List[str]]:
    """`ssh … USER@HOST` for a target reached over ssh, from the URL itself; None for other
    URLs and rsync daemon modules."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in SSH_SCHEMES or "::" in url or not parsed.hostname:
        return None
    login = f"{parsed.username}@{parsed.hostname}" if parsed.username else parsed.hostname
    port = ["-p", str(parsed.port)] if parsed.port else []
    return ["ssh", "-oBatchMode=yes"] + port + shlex.split(ssh_options) + [login]


def remote_path(url: str) -> str:
    """The directory of an ssh URL as the server's shell takes it: //abs is /abs, /rel is
    relative to the login's home."""
    path = urllib.parse.urlsplit(url).path
    path = "/" + path.lstrip("/") if path.startswith("//") else path.lstrip("/")
    return urllib.parse.unquote(path)


def ssh_mkdir_command(url: str, ssh_options: str, *more: str) -> Optional[List[str]]:
    """`ssh … mkdir -p PATH…` for a target reached over ssh (duplicity fails when the
    directory is missing), and the paths of more URLs on the same server."""
    login = ssh_login(url, ssh_options)
    paths = [shlex.quote(p) for p in map(remote_path, (url,) + more) if p]
    if login is None or not paths:
        return None
    return login + ["mkdir -p -- " + " ".join(paths)]


def duplicity_working_on(processes: Sequence[Tuple[int, List[str]]], url: str) -> List[int]:
    """The PIDs among processes (PID, argv) of duplicity runs on the chains at url or below it
    (the layout's, the parts'), by their argv: the URL is an argument of its own."""
    below = url.rstrip("/") + "/"
    return [pid for pid, argv in processes
            if any("duplicity" in word for word in argv[:3]) and any(w == url or w.startswith(below) for w in argv)]


def running_processes() -> List[Tuple[int, List[str]]]:
    """(PID, argv) of every other process this user can see."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            found.append((int(entry.name), [w.decode("utf-8", "surrogateescape") for w in argv if w]))
    return found


def check_no_duplicity_left(ctx: "Context", url: str) -> None:
    """A duplicity of an earlier run that is still at work on this backup (rescue's children
    die with it; one started by hand or by an older rescue may not): a second one beside it
    would remove or add sets under its feet."""
    pids = duplicity_working_on(running_processes(), url)
    if pids:
        raise RescueError(f"a duplicity (PID {', '.join(map(str, pids))}) is still at work on {ctx.log.redact(url)}",
                          f"let it finish, or stop it (kill {' '.join(map(str, pids))}), then run again")


# What a failure looks like in duplicity's output, and what to do about it.
KNOWN_FAILURES = (
    ("There is no assurance this key belongs", "gpg does not trust the encryption key (ReaR issue #1668)",
     "trust it once: gpg --edit-key KEY trust (answer 5 for your own key), or "
     "echo 'FINGERPRINT:6:' | gpg --import-ownertrust"),
    ("Unusable public key", "gpg cannot use the encryption key (untrusted, expired, revoked, or "
     "without an encryption subkey)", "check it with: gpg --list-keys KEY"),
    ("No public key", "the encryption key is not in the keyring",
     "import it: gpg --import KEY.asc (rescue uses the keyring of $GNUPGHOME or ~/.gnupg)"),
    ("No secret key", "the secret key needed to decrypt the backup is not in the keyring",
     "import it: gpg --import SECRET-KEY.asc"),
    ("Bad session key", "wrong passphrase", "check BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE or the answer typed"),
    ("Bad passphrase", "wrong passphrase", "check BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE or the answer typed"),
    ("decryption failed", "gpg could not decrypt the backup (wrong passphrase or key)",
     "check the passphrase and that the secret key is in the keyring"),
    ("No space left on device", "a disk is full (the backup target or the temporary directory)",
     "free space on the target, or keep fewer backups (BACKUP_DUPLICITY_MAX_SETS)"),
    ("Connection refused", "the backup server refused the connection", "check that sshd runs there and the port"),
    ("Could not resolve hostname", "the backup server's name does not resolve", "check the host in BACKUP_DUPLICITY_URL"),
    ("Permission denied", "permission denied (ssh login or a file)", "check the ssh key and the target's permissions"),
    ("CommandLineError:", "duplicity rejected its command line (an option in BACKUP_DUPLICITY_OPTIONS?)",
     "check each option in BACKUP_DUPLICITY_OPTIONS against: rescue duplicity --help"),
    ("Another duplicity instance is already running", "another duplicity is using this archive directory",
     "wait for it to finish"),
)


def diagnose(output: str) -> Optional[Tuple[str, str]]:
    """(what went wrong, what to do) for failures we recognise in duplicity's output."""
    for needle, what, fix in KNOWN_FAILURES:
        if needle in output:
            return what, fix
    return None


def prepare_target(ctx: "Context", url: str, *more: str) -> None:
    """Create the target directory, and those of more URLs on the same server (ReaR:
    "Checking backup-path at server ...")."""
    if url_path(url):
        for each in [p for p in map(url_path, (url,) + more) if p]:     # the same scheme: all file://
            try:
                os.makedirs(each, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise RescueError(f"cannot create the backup directory {each}: {exc.strerror}",
                                  "check BACKUP_DUPLICITY_URL and the permissions there") from None
        return
    argv = ssh_mkdir_command(url, ctx.ssh_options(), *more)
    if argv:
        ctx.log.info(f"Checking the backup directory at {urllib.parse.urlsplit(url).hostname}")
        result = ctx.runner.run(argv, check=False, timeout=120)
        if result.returncode != 0:
            raise ssh_failure("cannot create the backup directory on the server", result)


def ssh_failure(what: str, result: "Result") -> RescueError:
    """The error for an ssh call to the backup server that failed: the cause when known, and
    ssh's last words."""
    found = diagnose(result.stderr)
    return RescueError(f"{what}: {found[0] if found else 'ssh exited with ' + str(result.returncode)}",
                       (found[1] + "; " if found else "") + "ssh said: " +
                       " ".join(result.stderr.strip().splitlines()[-2:]))


def check_backup_there(ctx: "Context", url: str, needed: bool = True) -> bool:
    """Before duplicity reads a backup: is the server reachable, and is the backup's directory
    there? duplicity would retry an unreachable server for minutes and then print a
    traceback, and call a missing directory "no backup chains"; this says which it is, at
    once. needed=False (status): a missing directory is no error, the answer is False."""
    place = url_path(url)
    argv = ssh_login(url, ctx.ssh_options())
    if place is not None:
        present = os.path.isdir(place)
    elif argv is not None and remote_path(url):
        host = urllib.parse.urlsplit(url).hostname
        ctx.log.info(f"Checking the backup directory at {host}")
        result = ctx.runner.run(argv + ["test -d " + shlex.quote(remote_path(url))], check=False, timeout=120)
        if result.returncode not in (0, 1):
            raise ssh_failure(f"cannot reach the backup server {host}", result)
        present, place = result.returncode == 0, f"{host}:{remote_path(url)}"
    else:
        return True     # other backends: duplicity tells
    if needed and not present:
        raise RescueError(f"there is no backup at {ctx.log.redact(url)}: {place} does not exist",
                          f"check BACKUP_DUPLICITY_URL; backups are kept in a directory named after the "
                          f"machine ({backup_host(ctx.config)}): is that the original machine's name?")
    return present


# =============================================================================================
# 12. backup: command lines
#
# duplicity does the work; rescue decides what it is given. Pure builders turn the
# configuration and the mounts into argv lists (selection, encryption, retention, backup,
# restore, verify, status); readers turn what duplicity prints into progress, statistics and
# known failures.
# =============================================================================================


# -- what is backed up -------------------------------------------------------------------------

def backup_scope(layout_mounts: Sequence[str], reasons: Dict[str, str],
                 mounted: Sequence[Dict[str, object]]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """(in-scope mountpoints: the layout's; [(every other mountpoint now, why it is left out)])."""
    in_scope = sorted(set(layout_mounts))
    excluded: Dict[str, str] = {}
    for entry in mounted:
        target = str(entry.get("target") or "")
        if target and target not in in_scope and target not in excluded:
            fstype = entry.get("fstype") or "unknown"
            excluded[target] = reasons.get(target) or f"{fstype} filesystem, not in the layout"
    return in_scope, sorted(excluded.items())


def nearest_mount(path: str, mountpoints: Sequence[str]) -> Optional[str]:
    """The deepest other mountpoint that contains path."""
    parents = [m for m in mountpoints if m != path and path_within(path, m)]
    return max(parents, key=len) if parents else None


def mount_rules(in_scope: Sequence[str], excluded: Sequence[Tuple[str, str]]) -> List[str]:
    """One-file-system semantics per mountpoint, as duplicity --include/--exclude (first match
    wins, so the deepest rule comes first). An excluded mount inside another excluded one
    needs no rule of its own; an in-scope one inside an excluded one needs an --include."""
    excluded_paths = [path for path, _ in excluded]
    everything = list(in_scope) + excluded_paths
    rules: List[Tuple[str, str]] = []
    for path in excluded_paths:
        parent = nearest_mount(path, everything)
        if parent is None or parent not in excluded_paths:
            rules.append(("--exclude", path))
    for path in in_scope:
        parent = nearest_mount(path, everything)
        if parent is not None and parent in excluded_paths:
            rules.append(("--include", path))
    rules.sort(key=lambda rule: (-rule[1].rstrip("/").count("/"), rule[1]))
    return [word for rule in rules for word in rule]


@dataclass
class Selection:
    source: str                          # duplicity's source directory
    args: List[str]                      # --include/--exclude options, in order
    excluded: List[Tuple[str, str]]      # what is left out and why, for the summary
    roots: List[str]                     # where the files live (for rescue's own metadata walk)


def backup_selection(in_scope: Sequence[str], excluded: Sequence[Tuple[str, str]],
                     config: Config, own_paths: Sequence[str]) -> Selection:
    """What duplicity backs up: / and every in-scope filesystem (each one by itself), without
    other mounts, rescue's own files, the local backup target and BACKUP_DUPLICITY_EXCLUDE;
    VAR_DIR (the layout) always; only BACKUP_DUPLICITY_INCLUDE when that is set.

    Paths rescue computes are escaped (a mountpoint may contain '*'; duplicity's
    --filter-literal cannot be used: it rejects every path when the source is /); the user's
    patterns are duplicity glob patterns.
    """
    user_excludes = config.setting("BACKUP_DUPLICITY_EXCLUDE")
    includes = config.setting("BACKUP_DUPLICITY_INCLUDE")
    args: List[str] = []
    for path in own_paths:
        args += ["--exclude", glob_escape(path)]
    for kept in sorted({str(var_dir(config)), str(layout_dir(config))}):
        args += ["--include", glob_escape(kept)]
    args += [w for p in user_excludes for w in ("--exclude", p)]
    rules = mount_rules(in_scope, excluded)
    args += [glob_escape(w) if n % 2 else w for n, w in enumerate(rules)]
    args += [w for p in includes for w in ("--include", p)]
    if includes or "/" not in in_scope:
        args += ["--exclude", "**"]
    ruled = set(rules[1::2])
    left_out = [(p, "rescue's own files") for p in own_paths]
    left_out += [(p, why) for p, why in excluded if p in ruled]
    left_out += [(p, "BACKUP_DUPLICITY_EXCLUDE") for p in user_excludes]
    roots = [glob_prefix(p) for p in includes] if includes else list(in_scope)
    return Selection("/", args, left_out, roots + [str(var_dir(config)), str(layout_dir(config))])


def missing_includes(includes: Sequence[str], exists: Callable[[str], bool] = os.path.lexists) -> List[str]:
    """The BACKUP_DUPLICITY_INCLUDE patterns of which nothing exists (for a glob: nothing
    where its fixed part leads)."""
    return [p for p in includes if not exists(glob_prefix(p) if any(c in p for c in GLOB_CHARS) else p)]


def check_includes(config: Config, log: Log) -> None:
    """An include that does not exist is a warning; a backup that would hold nothing it was
    asked for is an error (it would be 'done', and restore nothing)."""
    includes = config.setting("BACKUP_DUPLICITY_INCLUDE")
    missing = missing_includes(includes)
    for pattern in missing:
        log.warn(f"BACKUP_DUPLICITY_INCLUDE: {pattern} does not exist: nothing of it is backed up")
    if includes and len(missing) == len(includes):
        raise ConfigError("nothing to back up: none of BACKUP_DUPLICITY_INCLUDE exists",
                          "correct BACKUP_DUPLICITY_INCLUDE, or leave it empty to back up the whole system")


def glob_escape(path: str) -> str:
    """A path as a duplicity glob pattern matching only itself ([*] is a literal *)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def glob_prefix(pattern: str) -> str:
    """The directory part of a pattern before its first wildcard (where a walk must start)."""
    cut = min([pattern.find(c) for c in "*?[" if c in pattern] or [len(pattern)])
    head = pattern[:cut]
    return head if cut == len(pattern) else (head.rsplit("/", 1)[0] or "/")


# -- encryption --------------------------------------------------------------------------------

@dataclass
class Encryption:
    args: List[str]                      # duplicity's gpg options
    env: Dict[str, str]                  # PASSPHRASE / SIGN_PASSPHRASE: never on a command line
    keys: List[str]                      # key ids to check, shown as <GPG_KEY> in logs


def encryption(config: Config, passphrase: str) -> Encryption:
    """Public-key (one or more --encrypt-key, optional --hidden-encrypt-key), symmetric
    (passphrase only), optional signing (--sign-key with SIGN_PASSPHRASE)."""
    keys = config.get("BACKUP_DUPLICITY_GPG_ENC_KEY").split()
    hidden = config.get("BACKUP_DUPLICITY_GPG_HIDDEN_ENC_KEY").split()
    sign_key = config.get("BACKUP_DUPLICITY_GPG_SIGN_KEY").strip()
    if "--no-encryption" in config.setting("BACKUP_DUPLICITY_OPTIONS"):
        return Encryption([], {}, [])
    if not keys and not hidden and not passphrase:
        raise ConfigError("no encryption is configured for the backup",
                          "set BACKUP_DUPLICITY_GPG_ENC_KEY (public key) or "
                          "BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE (symmetric); to store the backup "
                          "unencrypted on purpose, add --no-encryption to BACKUP_DUPLICITY_OPTIONS")
    args = [w for k in keys for w in ("--encrypt-key", k)]
    args += [w for k in hidden for w in ("--hidden-encrypt-key", k)]
    # Even a public-key backup reads PASSPHRASE (for the metadata of earlier backups): an
    # empty one keeps duplicity from prompting where nobody can answer.
    env = {"PASSPHRASE": passphrase}
    if sign_key:
        args += ["--sign-key", sign_key]
        sign_passphrase = config.get("BACKUP_DUPLICITY_GPG_SIGN_PASSPHRASE") or passphrase
        if not keys and not hidden and sign_passphrase != passphrase:
            raise ConfigError("with symmetric encryption, duplicity signs only with a key whose passphrase "
                              "is the encryption passphrase",
                              "make BACKUP_DUPLICITY_GPG_SIGN_PASSPHRASE equal to the encryption passphrase, "
                              "or encrypt to a public key (BACKUP_DUPLICITY_GPG_ENC_KEY)")
        env["SIGN_PASSPHRASE"] = sign_passphrase
    return Encryption(args, env, keys + hidden + ([sign_key] if sign_key else []))


# -- command lines -----------------------------------------------------------------------------

LAYOUT_SUFFIX = "-layout"             # the layout chain's --name suffix


@dataclass(frozen=True)
class DuplicityOptions:
    """What every duplicity command line of one run shares. The builders below are pure
    functions of it: the I/O that finds these values (the ssh sharing, a work directory)
    happens before, in the code that runs the commands."""
    name: str                    # --name: BACKUP_DUPLICITY_NAME-KEY (each chain adds its suffix)
    archive_dir: str             # duplicity's cache of the chains' metadata
    ssh_options: str             # for --ssh-options ("" when the target is not reached by ssh)
    extra: List[str]             # rescue's tuning, then the user's own options (so theirs win)
    crypt: Encryption


def target_key(url: str) -> str:
    """What tells the caches of different targets apart."""
    return hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def duplicity_options(config: Config, crypt: Encryption, archive_dir: str, ssh_options: str,
                      url: str) -> DuplicityOptions:
    """--name is BACKUP_DUPLICITY_NAME and a key of the host's target URL: duplicity's cache of
    one target's chains (and what a failed run left there) is never read for another."""
    return DuplicityOptions(f"{config.setting('BACKUP_DUPLICITY_NAME')}-{target_key(url)}", archive_dir, ssh_options,
                            config.setting("BACKUP_DUPLICITY_TUNING") + config.setting("BACKUP_DUPLICITY_OPTIONS"),
                            crypt)


def common_options(opts: DuplicityOptions, name_suffix: str = "", tempdir: Optional[str] = None) -> List[str]:
    args = ["--name", opts.name + name_suffix, "--archive-dir", opts.archive_dir]
    if tempdir:
        args += ["--tempdir", tempdir]
    if opts.ssh_options:
        args.append(f"--ssh-options={opts.ssh_options}")
    return args + opts.extra + opts.crypt.args


def retention_commands(config: Config) -> List[List[str]]:
    """The remove-* actions configured, in ReaR's order of strictness (each with --force)."""
    commands = [(action, config.setting(name)) for action, name in (
        ("remove-all-but-n-full", "BACKUP_DUPLICITY_MAX_SETS"),
        ("remove-all-inc-of-but-n-full", "BACKUP_DUPLICITY_MAX_SETS_KEEP_FULL"),
        ("remove-older-than", "BACKUP_DUPLICITY_MAX_TIME"))]
    return [[action, str(value), "--force"] for action, value in commands if value]


def retention_command(opts: DuplicityOptions, action: Sequence[str], url: str, name_suffix: str = "") -> List[str]:
    return list(action) + ["-v4"] + common_options(opts, name_suffix) + [url]


def run_time_option(run_time: Optional[int]) -> List[str]:
    """Every chain of one run stamps its set with the run's time (duplicity's --current-time),
    not with the moment its own duplicity started (seconds or, queued, minutes apart): a
    restore as of the time status shows then takes every chain's set of that run."""
    return ["--current-time", str(run_time)] if run_time else []


def backup_command(opts: DuplicityOptions, selection: Selection, url: str, tempdir: str,
                   name_suffix: str = "", chain_options: Sequence[str] = (),
                   full_if_older: Optional[str] = None, run_time: Optional[int] = None) -> List[str]:
    """duplicity's arguments for the backup (full or incremental, as duplicity decides)."""
    args = ["-v5"] + common_options(opts, name_suffix, tempdir) + list(chain_options) + run_time_option(run_time)
    if full_if_older:
        args += ["--full-if-older-than", full_if_older]
    return args + selection.args + [selection.source, url]


def layout_store_command(opts: DuplicityOptions, staging: str, url: str, tempdir: str,
                         run_time: Optional[int] = None) -> List[str]:
    """A full backup of the staged layout files into the layout chain beside the backup."""
    return ["full", "-v4", "--allow-source-mismatch"] + common_options(opts, LAYOUT_SUFFIX, tempdir) + \
        run_time_option(run_time) + [staging, layout_url(url)]


def restore_time(config: Config, override: Optional[str]) -> Optional[str]:
    return time_option("--restore-time", override) if override else config.setting("BACKUP_DUPLICITY_RESTORE_TIME")


def restore_command(opts: DuplicityOptions, url: str, target: str, tempdir: str, time_: Optional[str],
                    renames: Sequence[Tuple[str, str]] = (), name_suffix: str = "",
                    each_file: bool = False) -> List[str]:
    """duplicity's arguments to restore the whole backup into target. --numeric-owner: the
    rescue system's /etc/passwd is not the original's, so names would map to wrong ids.
    each_file: -v5, a line for each file, as ReaR's restore logs; only with rescue -d, as
    duplicity is measurably slower so and rescue reads and logs every line (bench/backup.py)."""
    args = ["restore", "-v5" if each_file else "-v4", "--force", "--numeric-owner"]
    args += common_options(opts, name_suffix, tempdir)
    if time_:
        args += ["--restore-time", time_]
    for old, new in renames:
        args += ["--rename", old, new]
    return args + [url, target]


def cleanup_command(opts: DuplicityOptions, url: str, name_suffix: str = "") -> List[str]:
    """Remove what an interrupted backup left (the volumes of an incomplete set)."""
    return ["cleanup", "-v4", "--force"] + common_options(opts, name_suffix) + [url]


def status_command(opts: DuplicityOptions, url: str, name_suffix: str = "") -> List[str]:
    return ["collection-status", "-v4"] + common_options(opts, name_suffix) + [url]


def verify_command(opts: DuplicityOptions, selection: Selection, url: str, tempdir: str,
                   time_: Optional[str], name_suffix: str = "") -> List[str]:
    """--compare-data always: without it duplicity 3 compares nothing at all
    (path.ROPath.compare_verbose returns "equal" at once), so a changed file would pass."""
    args = ["verify", "-v4", "--compare-data"] + (["--restore-time", time_] if time_ else [])
    return args + common_options(opts, name_suffix, tempdir) + selection.args + [url, selection.source]


# -- the sets of a chain, from its file names -------------------------------------------------
#
# A set is complete when its manifest is there: duplicity uploads the manifest last, so the
# volumes of an interrupted set stay without one, and duplicity itself lists such a set as a
# normal one (and then fails to restore the latest backup: "No remote manifest name").

SET_FILE_RE = re.compile(r"^duplicity-(full|inc)\.(?:\w+\.to\.)?(\w+)\.(manifest|vol\d+\.difftar)(?:\.gpg|\.gz|\.zst)?$")
INTERVAL_SECONDS = {"s": 1, "m": 60, "h": 3600, "D": 86400, "W": 7 * 86400, "M": 30 * 86400, "Y": 365 * 86400}


def stored_sets(names: Sequence[str]) -> Dict[float, bool]:
    """{the set's time (seconds since 1970): complete} of a chain directory's file names."""
    sets: Dict[float, bool] = {}
    for name in names:
        match = SET_FILE_RE.match(name)
        if match:
            when = datetime.datetime.strptime(match.group(2), "%Y%m%dT%H%M%SZ").replace(
                tzinfo=datetime.timezone.utc).timestamp()
            sets[when] = sets.get(when, False) or match.group(3) == "manifest"
    return sets


def time_seconds(value: str, now: float) -> float:
    """A time as duplicity_time_value() accepts it -> seconds since 1970 (a date without an
    offset is in local standard time, as duplicity takes it)."""
    if value == "now":
        return now
    if value.isdigit():
        return float(value)
    date = DATE_RE.fullmatch(value)
    if date:
        fields = [int(g) for g in date.groups()[:6] if g is not None]
        zone = date.group(7)
        offset = -time.timezone // 60            # duplicity: local standard time (gettzd(0))
        if zone:
            offset = 0 if zone == "Z" else int(zone[0] + "1") * (int(zone[1:3]) * 60 + int(zone[-2:]))
        return datetime.datetime(*fields, tzinfo=datetime.timezone(datetime.timedelta(minutes=offset))).timestamp()
    return now - sum(int(n) * INTERVAL_SECONDS[unit] for n, unit in re.findall(r"([0-9]+)([smhDWMY])", value))


def iso_time(seconds: float) -> str:
    """Local ISO 8601 with offset: what status shows, and duplicity takes as --restore-time."""
    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat()


def restore_point(chains: Dict[str, Dict[float, bool]], wanted: Optional[float]) -> Tuple[Optional[float], bool]:
    """The time every chain of one backup ({"main" or a part's path: its sets}) is restored as
    of, and whether that is earlier than asked: when the set a chain would take (its newest
    at or before the time) is incomplete, the latest time at which every chain's set is
    complete. wanted None: the latest, which stays None when every newest set is complete.
    A RescueError when a chain has no set that old: a restore must be complete or fail."""
    firsts = {label: min((t for t, ok in sets.items() if ok), default=None) for label, sets in chains.items()}
    for label, first in firsts.items():
        if first is None:
            raise RescueError(f"{chain_name(label)} has no complete set (its backups were interrupted, "
                              "or files of them were deleted)", "run rescue mkbackuponly to completion first")
    oldest = max(f for f in firsts.values() if f is not None)
    for label, first in firsts.items():
        if wanted is not None and first is not None and wanted < first:
            whose = "there is no backup" if label == "main" else f"the part {label} has no backup"
            raise RescueError(f"{whose} as old as {iso_time(wanted)}: the oldest time the whole backup "
                              f"can be restored as of is {iso_time(oldest)}",
                              "give a --restore-time at or after it ('rescue status' lists the backups)")

    def complete_at(point: Optional[float]) -> bool:
        return all(sets[max(t for t in sets if point is None or t <= point)] for sets in chains.values())

    if complete_at(wanted):
        return wanted, False
    # The chains of one run start a little apart: try each complete set's time, newest first.
    for point in sorted({t for sets in chains.values() for t, ok in sets.items() if ok}, reverse=True):
        if (wanted is None or point <= wanted) and point >= oldest and complete_at(point):
            return point, True
    raise RescueError("no time before the one asked has a complete set in every chain of the backup",
                      "run rescue mkbackuponly to completion, or give another --restore-time")


def chain_name(label: str) -> str:
    return "the backup" if label == "main" else f"the part {label}"


# -- reading duplicity's output ----------------------------------------------------------------

DIFFERENCE_RE = re.compile(r"^Difference found: File (.+?) has ")


def in_scope_differences(lines: Sequence[str], roots: Sequence[str]) -> List[str]:
    """verify's difference lines (paths relative to /) without those about the directories
    above the backed-up trees: duplicity stores them only to hold the trees (their mtimes
    change with whatever else happens in them), they are not part of what was backed up."""
    def above_scope(rel: str) -> bool:
        path = os.path.normpath("/" + rel)
        return any(path_within(root, path) and root != path for root in roots) and \
            not any(path_within(path, root) for root in roots)

    found = [(line, DIFFERENCE_RE.match(line)) for line in lines]
    return [line for line, match in found if not (match and above_scope(match.group(1)))]


STATISTICS_RE = re.compile(r"^(\w+) (-?[0-9.]+)(?: \(.*\))?$")


def parse_backup_statistics(lines: Sequence[str]) -> Dict[str, float]:
    """duplicity's "--------------[ Backup Statistics ]--------------" block -> {name: number}."""
    stats: Dict[str, float] = {}
    inside = False
    for line in lines:
        if "[ Backup Statistics ]" in line:
            inside, stats = True, {}
        elif inside and line.startswith("-----"):
            inside = False
        elif inside:
            match = STATISTICS_RE.match(line.strip())
            if match:
                number = float(match.group(2))
                stats[match.group(1)] = int(number) if number.is_integer() and "." not in match.group(2) else number
    return stats


def describe_statistics(stats: Dict[str, float], kind: str) -> str:
    """One readable paragraph of duplicity's statistics."""
    get = lambda name: stats.get(name, 0)    # noqa: E731
    elapsed = get("ElapsedTime") or 0.0
    rate = get("SourceFileSize") / elapsed if elapsed else 0.0
    return (f"Backup done ({kind}): {get('SourceFiles'):.0f} files, {human_size(get('SourceFileSize'))} "
            f"in scope; {get('NewFiles'):.0f} new ({human_size(get('NewFileSize'))}), "
            f"{get('ChangedFiles'):.0f} changed ({human_size(get('ChangedFileSize'))}), "
            f"{get('DeletedFiles'):.0f} deleted; {human_size(get('TotalDestinationSizeChange'))} "
            f"stored in {elapsed:.1f} s ({human_size(rate)}/s read); {get('Errors'):.0f} errors")


class DuplicityOutput:
    """Reads duplicity -v5 output as it comes: everything goes to the log; the console gets
    progress (one updating line on a terminal, else a line per volume) and warnings."""

    FILE_LINE = re.compile(r"^[AMD] ")
    VOLUME_LINE = re.compile(r"^Processed volume (\d+)")
    RESTORE_LINE = re.compile(r"^Writing .* of type ")

    def __init__(self, log: Log, what: str, ansi: bool, interval: float) -> None:
        self.log, self.what, self.ansi, self.interval = log, what, ansi, interval
        self.lines: List[str] = []           # the statistics block and warnings, not every file
        self.files = 0
        self.volumes = 0
        self.full = False
        self.started = time.monotonic()
        self.shown = 0.0
        self.warnings = 0

    def __call__(self, line: str) -> None:
        if self.FILE_LINE.match(line) or self.RESTORE_LINE.match(line):
            self.files += 1
            self.log.debug(line)
        else:
            self.log.info(line)
            self.lines.append(line)
            self.note(line)
        self.progress()

    def note(self, line: str) -> None:
        match = self.VOLUME_LINE.match(line)
        if match:
            self.volumes = int(match.group(1))
            self.progress(volume_done=True)
        elif "switching to full backup" in line or "Last full backup date: none" in line:
            self.full = True
        elif line.startswith("RESTART:"):
            self.log.say(f"Resuming the interrupted backup ({line[len('RESTART:'):].strip()})")
        elif line.startswith(("Warning", "Error ")) and self.warnings < 20:
            self.warnings += 1
            self.log.warn(f"duplicity: {line}")

    def progress(self, volume_done: bool = False) -> None:
        now = time.monotonic()
        if self.ansi and now - self.shown >= self.interval:
            self.shown = now
            self.log.status(self.text(now))
        elif volume_done and not self.ansi:
            self.log.console(self.text(now))

    def text(self, now: float) -> str:
        return f"{self.what}: {self.files} files, {self.volumes} volumes, {now - self.started:.0f} s"


class WriteProgress:
    """How far a restore is, which duplicity tells only at -v5, with a line for each file
    (see restore_command): what the target's filesystems gained, shown as one updating line
    on a terminal, else logged every `every` seconds. A thread, from `with` to its end."""

    def __init__(self, log: Log, what: str, paths: Sequence[str], ansi: bool,
                 interval: float, every: float = 30.0) -> None:
        self.log, self.what, self.ansi = log, what, ansi
        self.period = interval if ansi else every
        devices: Dict[int, str] = {}
        for path in paths:
            with contextlib.suppress(OSError):
                devices.setdefault(os.stat(path).st_dev, path)
        self.paths = list(devices.values())
        self.base = self.used()
        self.started = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def used(self) -> int:
        total = 0
        for path in self.paths:
            with contextlib.suppress(OSError):
                fs = os.statvfs(path)
                total += (fs.f_blocks - fs.f_bfree) * fs.f_frsize
        return total

    def written(self) -> int:
        """Bytes the filesystems gained since the start (file data and metadata, and the
        volume being unpacked when it sits on the target)."""
        return max(0, self.used() - self.base)

    def text(self) -> str:
        elapsed = time.monotonic() - self.started
        written = self.written()
        return (f"{self.what}: {human_size(written)} written, {human_size(written / max(elapsed, 0.001))}/s, "
                f"{elapsed:.0f} s")

    def run(self) -> None:
        while not self.done.wait(self.period):
            if self.ansi:
                self.log.status(self.text())
            else:
                self.log.say(self.text())

    def __enter__(self) -> "WriteProgress":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.log.end_status()


# =============================================================================================
# 13. backup: chains and runs
#
# A backup run: the layout first, then what duplicity does not keep (rescue's own record),
# the plan of parallel chains, retention, and the chains side by side, with a truthful record
# of the result (last-backup.json, Prometheus metrics).
# =============================================================================================


# -- parallel chains ---------------------------------------------------------------------------
#
# One duplicity process keeps about one core busy (gpg compressing in one process, tar and
# librsync in the other), so with more cores the backup is split: a few large directories
# ("parts") each get a chain of their own at URL/part-ID, backed up side by side with the main
# chain at URL, which holds everything else (the chain ReaR would make, minus the parts).
# The plan is kept in VAR_DIR/backup-parts.json and stored with the layout, so a restore as of
# any time reads the plan of that time. A part's ID comes from its path: a chain only ever
# holds one directory. A part is a plain directory inside one filesystem (no mountpoint at or
# below it), so it restores into a staging directory on its own filesystem, renamed into place.

PARTS_FILE = "backup-parts.json"


def part_id(path: str) -> str:
    return "part-" + hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def part_chain(url: str, path: str) -> Tuple[str, str]:
    """Where the part's chain lives below the host's URL, and its --name suffix."""
    return url_join(url, part_id(path)), "-" + part_id(path)


def parallel_workers(config: Config) -> int:
    """BACKUP_DUPLICITY_PARALLEL: how many duplicity processes run at once ("auto": one per
    CPU, at most 4)."""
    value = config.setting("BACKUP_DUPLICITY_PARALLEL")
    return max(1, min(os.cpu_count() or 1, 4)) if value == "auto" else value


def part_selection(args: Sequence[str], part: str) -> Optional[List[str]]:
    """The --include/--exclude options of a chain whose source is the directory part, from
    the whole backup's options (first match wins): rules inside part stay, rules elsewhere go,
    and the first rule that covers part decides the rest. None when part cannot be a chain of
    its own: excluded, or touched by a pattern whose reach into it cannot be told (a wildcard
    above it, a pattern that is not an absolute path)."""
    kept: List[str] = []
    for option, pattern in zip(args[0::2], args[1::2]):
        if pattern == "**":
            return kept if option == "--include" else None
        if not pattern.startswith("/"):
            return None
        wildcard = any(c in pattern for c in "*?[")
        if not wildcard and path_within(part, pattern):
            return kept if option == "--include" else None    # this rule decides all of part
        head = glob_prefix(pattern) if wildcard else pattern
        if path_within(head, part):
            kept += [option, pattern]
        elif path_within(part, head):
            return None                  # a wildcard above part may reach into it
    return kept


def subtree_sizes(direct: Dict[str, int]) -> Dict[str, int]:
    """Bytes below each directory, from the bytes of the files directly in each."""
    totals = dict(direct)
    for path in sorted(direct, key=lambda p: -p.count("/")):
        parent = os.path.dirname(path)
        if parent != path and parent in totals:
            totals[parent] += totals[path]
    return totals


def plan_parts(totals: Dict[str, int], roots: Sequence[str], workers: int,
               eligible: Callable[[str], bool], min_bytes: int) -> List[str]:
    """The directories to back up as chains of their own, so that `workers` duplicity
    processes get about equal shares: the largest directory that fits a share becomes a part,
    larger ones are looked into, until what is left for the main chain is half a share."""
    total = sum(totals.get(r, 0) for r in roots)
    if workers < 2 or total < 2 * min_bytes:
        return []
    share, smallest = total / workers, max(total / (4 * workers), min_bytes, 1)
    children: Dict[str, List[str]] = {}
    for path in totals:
        parent = os.path.dirname(path)
        if parent != path and parent in totals:
            children.setdefault(parent, []).append(path)
    heap = [(-totals[r], r) for r in set(roots) if r in totals]
    heapq.heapify(heap)
    parts: List[str] = []
    rest = total
    while heap and rest > share / 2 and len(parts) < 4 * workers - 1:
        path = heapq.heappop(heap)[1]
        size = totals[path]
        if size < smallest:
            break
        bigger = [c for c in children.get(path, []) if totals[c] >= smallest]
        if eligible(path) and (size <= share or not bigger):
            parts.append(path)
            rest -= size
        else:
            for child in bigger:
                heapq.heappush(heap, (-totals[child], child))
    return sorted(parts)


def part_eligible(path: str, args: Sequence[str], mountpoints: Sequence[str],
                  own: Sequence[str]) -> bool:
    """A directory may be a part when no mountpoint is at or below it, it is not inside
    rescue's own files, and the selection's rules for it can be told exactly."""
    if any(path_within(m, path) for m in mountpoints) or any(path_within(path, o) for o in own):
        return False
    return part_selection(args, path) is not None


@dataclass
class Chain:
    label: str                           # "main", or the part's path
    url: str
    name_suffix: str                     # for --name (each chain has its own archive cache)
    selection: "Selection"
    size: int = 0                        # bytes, to start the largest first
    options: List[str] = field(default_factory=list)     # duplicity options of this chain only


INCOMPRESSIBLE = 0.92                    # zlib level 1 saves less than 8 %: not worth gpg's time


def compressed_share(directory: str, samples: int = 48, chunk: int = 65536, scan: int = 4000) -> Optional[float]:
    """How much of the data in directory zlib level 1 keeps (0.3 for text, 1.0 for media and
    archives), from a chunk in the middle of each of the first `samples` files of at least
    16 KiB (breadth-first, at most `scan` entries looked at), weighted by file size. None
    when there is nothing to sample."""
    kept = total = 0.0
    pending, seen, taken = collections.deque([directory]), 0, 0
    while pending and taken < samples and seen < scan:
        try:
            entries = sorted(os.scandir(pending.popleft()), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            seen += 1
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                    continue
                if not entry.is_file(follow_symlinks=False) or taken >= samples:
                    continue
                size = entry.stat(follow_symlinks=False).st_size
                if size < 16384:
                    continue
                with open(entry.path, "rb") as f:
                    f.seek(max(0, size // 2 - chunk // 2))
                    data = f.read(chunk)
            except OSError:
                continue
            if data:
                taken += 1
                kept += size * len(zlib.compress(data, 1)) / len(data)
                total += size
    return kept / total if total else None


def chain_options(config: Config, path: str) -> List[str]:
    """A part whose data does not compress is stored without gpg's compression, which would
    only cost time (gpg's zlib is slow on such data and stores slightly more).
    Off with BACKUP_DUPLICITY_COMPRESSION_CHECK=no, or when the user's options set gpg's
    compression themselves."""
    if not config.setting("BACKUP_DUPLICITY_COMPRESSION_CHECK"):
        return []
    if "compress" in " ".join(config.setting("BACKUP_DUPLICITY_OPTIONS")):
        return []
    share = compressed_share(path)
    return ["--gpg-options=--compress-algo none"] if share is not None and share >= INCOMPRESSIBLE else []


def backup_chains(url: str, selection: "Selection", parts: Sequence[str],
                  totals: Dict[str, int], options: Callable[[str], List[str]] = lambda path: []) -> List[Chain]:
    """The main chain (everything but the parts) and one chain per part."""
    main_args = [w for p in parts for w in ("--exclude", glob_escape(p))] + selection.args
    rest = sum(totals.get(r, 0) for r in set(selection.roots)) - sum(totals.get(p, 0) for p in parts)
    chains = [Chain("main", url, "", Selection(selection.source, main_args, selection.excluded,
                                               selection.roots), max(rest, 0))]
    for path in parts:
        args = part_selection(selection.args, path) or []
        chains.append(Chain(path, *part_chain(url, path), Selection(path, args, [], [path]),
                            totals.get(path, 0), options(path)))
    return chains


@dataclass
class PartsPlan:
    """VAR_DIR/backup-parts.json: the parts backed up now, the retired ones (their chains still
    get the retention rules), and the workers the plan was made for."""
    parts: List[str] = field(default_factory=list)
    retired: List[str] = field(default_factory=list)
    workers: Optional[int] = None

    def to_json(self) -> str:
        return json.dumps({"version": 1, "workers": self.workers, "parts": self.parts,
                           "retired": self.retired}, indent=2) + "\n"


def read_parts_plan(path: Path) -> PartsPlan:
    """The plan file; an empty plan when there is none."""
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        return PartsPlan()
    except (OSError, ValueError) as exc:
        raise RescueError(f"cannot read {path}: {exc}", "remove it: the next backup plans the chains anew")
    fields = [plan.get(name, []) if isinstance(plan, dict) else None for name in ("parts", "retired")]
    workers = plan.get("workers") if isinstance(plan, dict) else None
    if not all(isinstance(f, list) and all(isinstance(p, str) for p in f) for f in fields) or \
            not (workers is None or (isinstance(workers, int) and workers > 0)):
        raise RescueError(f"cannot read {path}: not a plan of chains as rescue writes it",
                          "remove it: the next backup plans the chains anew")
    return PartsPlan(fields[0], fields[1], workers)


# -- rescue's own record of what duplicity does not keep ---------------------------------------
#
# duplicity stores neither extended attributes (so no POSIX ACLs, SELinux labels or file
# capabilities), nor hard links (each name becomes a copy), nor holes (sparse files come back
# full), and it does not restore the mtime of symbolic links. rescue walks the same
# filesystems before the backup, writes what duplicity would lose to
# VAR_DIR/backup-metadata.jsonl.gz (inside the backup), and puts it back after a restore.

METADATA_FILE = "backup-metadata.jsonl.gz"


def walk_filesystem(root: str, mountpoints: Set[str], skip: Sequence[str]) -> "Iterator[Tuple[str, os.stat_result]]":
    """root and everything below it, not descending into other mountpoints or skipped paths."""
    try:
        yield root, os.lstat(root)
    except OSError:
        return
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            path = entry.path
            if path in mountpoints or any(path_within(path, s) for s in skip):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                pending.append(path)


def metadata_records(path: str, st: os.stat_result, links: Dict[Tuple[int, int], List[str]]) -> List[dict]:
    records = []
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        names = []
    attrs = {}
    for name in names:
        try:
            attrs[name] = base64.b64encode(os.getxattr(path, name, follow_symlinks=False)).decode()
        except OSError:
            continue
    if attrs:
        records.append({"xattr": path, "attrs": attrs})
    if stat.S_ISLNK(st.st_mode):
        records.append({"symlink": path, "mtime_ns": st.st_mtime_ns})
    elif stat.S_ISREG(st.st_mode):
        if st.st_nlink > 1:
            links.setdefault((st.st_dev, st.st_ino), []).append(path)
        if st.st_size > 4096 and st.st_blocks * 512 < st.st_size:
            records.append({"sparse": path, "mtime_ns": st.st_mtime_ns})
    return records


def walk_roots(roots: Sequence[str], mountpoints: Sequence[str]) -> List[str]:
    """The roots to walk: each mountpoint, and each other root not inside another root."""
    unique = sorted(set(roots))
    return [r for r in unique
            if r in mountpoints or not any(o != r and path_within(r, o) for o in unique)]


def collect_metadata(roots: Sequence[str], mountpoints: Sequence[str], skip: Sequence[str],
                     out: Path, sizes: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Write the xattrs, hard-link groups and sparse files under roots to out (gzip'd JSON lines).
    sizes, when given, gets the bytes of the regular files directly in each directory."""
    counts = {"xattr": 0, "links": 0, "sparse": 0, "symlink": 0}
    links: Dict[Tuple[int, int], List[str]] = {}
    with atomic_output(out) as raw, gzip.open(raw, "wt", encoding="ascii", compresslevel=6) as stream:
        for root in walk_roots(roots, mountpoints):
            others = set(mountpoints) - {root}
            for path, st in walk_filesystem(root, others, skip):
                if sizes is not None:
                    if stat.S_ISDIR(st.st_mode):
                        sizes.setdefault(path, 0)
                    elif stat.S_ISREG(st.st_mode):
                        parent = os.path.dirname(path)
                        sizes[parent] = sizes.get(parent, 0) + st.st_size
                for record in metadata_records(path, st, links):
                    counts[next(iter(record))] += 1
                    stream.write(json.dumps(record) + "\n")
        for paths in links.values():
            if len(paths) > 1:
                counts["links"] += 1
                stream.write(json.dumps({"links": sorted(paths)}) + "\n")
    return counts


def read_metadata(path: Path) -> List[dict]:
    with gzip.open(str(path), "rt", encoding="ascii") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def below(target: Path, path: str) -> str:
    return os.path.join(str(target), path.lstrip("/"))


def apply_metadata(runner: Runner, target: Path, records: Sequence[dict]) -> Dict[str, int]:
    """Symlink times; holes before xattrs (punching one clears file capabilities); hard links."""
    done = {"sparse": 0, "xattr": 0, "links": 0, "symlink": 0, "failed": 0}
    for record in (r for r in records if "symlink" in r):
        path = below(target, record["symlink"])
        if os.path.islink(path):
            os.utime(path, ns=(os.lstat(path).st_atime_ns, record["mtime_ns"]), follow_symlinks=False)
            done["symlink"] += 1
    for record in (r for r in records if "sparse" in r):
        path = below(target, record["sparse"])
        if os.path.isfile(path) and not os.path.islink(path):
            runner.run(["fallocate", "--dig-holes", path])
            os.utime(path, ns=(os.lstat(path).st_atime_ns, record["mtime_ns"]), follow_symlinks=False)
            done["sparse"] += 1
    for record in (r for r in records if "xattr" in r):
        path = below(target, record["xattr"])
        for name, value in record["attrs"].items():
            try:
                os.setxattr(path, name, base64.b64decode(value), follow_symlinks=False)
                done["xattr"] += 1
            except OSError as exc:
                done["failed"] += 1
                runner.log.debug(f"cannot set {name} on {path}: {exc.strerror}")
    for record in (r for r in records if "links" in r):
        done["links"] += relink([below(target, p) for p in record["links"]])
    return done


def relink(paths: Sequence[str]) -> int:
    """Make paths[1:] hard links of paths[0] again, keeping their directories' times."""
    first = paths[0]
    if not os.path.isfile(first) or os.path.islink(first):
        return 0
    for other in paths[1:]:
        parent = os.path.dirname(other)
        if not os.path.lexists(other) or os.path.samefile(first, other):
            continue
        times = os.lstat(parent)
        temporary = other + ".rescue-link"
        try:
            os.link(first, temporary)      # fails across filesystems: then the copy stays
        except OSError:
            continue
        os.replace(temporary, other)
        os.utime(parent, ns=(times.st_atime_ns, times.st_mtime_ns))
    return 1


# -- keys and passphrases ----------------------------------------------------------------------

GPG_KEY_LABEL = "<GPG_KEY>"


def key_problem(kind: str, listing: str) -> Optional[Tuple[str, str]]:
    """What is wrong with a key for kind ("encrypt" or "sign"), from `gpg --with-colons`."""
    pub = next((line.split(":") for line in listing.splitlines() if line.startswith(("pub:", "sec:"))), None)
    if pub is None:
        return ("is not in the keyring",
                "import it (gpg --import KEY.asc); rescue uses the keyring of $GNUPGHOME or ~/.gnupg")
    validity, capabilities = pub[1], pub[11] if len(pub) > 11 else ""
    if validity in ("e", "r", "d"):
        return ({"e": "has expired", "r": "is revoked", "d": "is disabled"}[validity],
                "use another key, or extend it: gpg --quick-set-expire FINGERPRINT 1y")
    if ("E" if kind == "encrypt" else "S") not in capabilities:
        return (f"cannot {kind} (it has no usable {kind}ion subkey)",
                f"add one: gpg --quick-add-key FINGERPRINT default {'encr' if kind == 'encrypt' else 'sign'}")
    if validity not in ("u", "f"):
        return ("is not trusted by gpg, which then refuses to use it (ReaR issue #1668)",
                "if it is yours, trust it: gpg --edit-key KEY trust, answer 5, quit; or "
                "echo FINGERPRINT:6: | gpg --import-ownertrust")
    return None


def check_gpg_keys(ctx: "Context") -> None:
    """Fail before anything is removed or sent when a configured key cannot be used."""
    config = ctx.config
    wanted = [("BACKUP_DUPLICITY_GPG_ENC_KEY", "encrypt", k) for k in config.get("BACKUP_DUPLICITY_GPG_ENC_KEY").split()]
    wanted += [("BACKUP_DUPLICITY_GPG_HIDDEN_ENC_KEY", "encrypt", k)
               for k in config.get("BACKUP_DUPLICITY_GPG_HIDDEN_ENC_KEY").split()]
    wanted += [("BACKUP_DUPLICITY_GPG_SIGN_KEY", "sign", k) for k in config.get("BACKUP_DUPLICITY_GPG_SIGN_KEY").split()]
    for variable, kind, key in wanted:
        listing = "--list-secret-keys" if kind == "sign" else "--list-keys"
        result = ctx.runner.run(["gpg", "--batch", "--with-colons", listing, "--", key],
                                check=False)
        problem = key_problem(kind, result.stdout)
        if problem:
            raise RescueError(f"the GPG key in {variable} ({key}) {problem[0]}", problem[1])


def passphrase(ctx: "Context", purpose: str) -> str:
    """The configured passphrase, or (BACKUP_DUPLICITY_ASK_PASSPHRASE on restore, or none
    configured where one is needed) the one typed in."""
    config = ctx.config
    configured = config.get("BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE")
    symmetric = not (config.get("BACKUP_DUPLICITY_GPG_ENC_KEY") or config.get("BACKUP_DUPLICITY_GPG_HIDDEN_ENC_KEY"))
    asking = (purpose == "restore" and config.setting("BACKUP_DUPLICITY_ASK_PASSPHRASE")) or (
        symmetric and not configured)
    given = getattr(ctx.args, "passphrase_file", None)
    if given and purpose == "restore":
        return passphrase_from_file(ctx, given)
    if not asking or "--no-encryption" in config.setting("BACKUP_DUPLICITY_OPTIONS"):
        return configured
    if ctx.args.non_interactive:
        if configured:
            return configured
        raise RescueError(f"the duplicity passphrase is needed for the {purpose}, and --non-interactive forbids asking",
                          "set BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE, or run without --non-interactive")
    if purpose in ctx.typed:
        return ctx.typed[purpose]
    timeout = config.setting("USER_INPUT_TIMEOUT")
    answer = ask_secret(f"Enter the duplicity passphrase for the {purpose} [{timeout:g} secs]: ", timeout)
    if not answer:
        raise RescueError(f"no passphrase given: the {purpose} is aborted", "run again and type the passphrase")
    ctx.log.add_secret(answer)
    ctx.typed[purpose] = answer
    return answer


MANIFEST_RE = re.compile(r"^duplicity-(?:full|inc)\.(?:\w+\.to\.)?(\w+)\.manifest\.gpg$")
WRONG_PASSPHRASE = ("Bad passphrase", "Bad session key")


def newest_manifest(names: Sequence[str]) -> Optional[str]:
    """The manifest of the newest backup set among a chain directory's file names."""
    found = [(match.group(1), name) for name in names for match in [MANIFEST_RE.match(name)] if match]
    return max(found)[1] if found else None


def remote_file(ctx: "Context", url: str, name: Optional[str] = None) -> Optional[bytes]:
    """A file of the target directory (its listing, one name a line, when name is None), for
    file:// and ssh targets; None for other backends and a directory that is not there."""
    place = url_path(url)
    if place is not None:
        try:
            if name is None:
                return "\n".join(os.listdir(place)).encode("utf-8", "surrogateescape")
            return Path(place, name).read_bytes()
        except FileNotFoundError:
            return None
    login = ssh_login(url, ctx.ssh_options())
    if login is None or not remote_path(url):
        return None
    path = remote_path(url) + ("/" + name if name else "")
    result = ctx.runner.run(login + [("cat -- " if name else "ls -1 -- ") + shlex.quote(path)], check=False,
                            timeout=120)
    if result.returncode == 255:
        raise ssh_failure(f"cannot reach the backup server {urllib.parse.urlsplit(url).hostname}", result)
    return result.stdout.encode("utf-8", "surrogateescape") if result.returncode == 0 else None


def chain_sets(ctx: "Context", url: str, gone_is_empty: bool = False) -> Optional[Dict[float, bool]]:
    """The sets of the chain at url and whether each is complete (None: a backend rescue
    cannot list; gone_is_empty: a file:// chain whose directory is not there has no sets)."""
    listing = remote_file(ctx, url)
    if listing is None and gone_is_empty and url_path(url) is not None:
        listing = b""
    return stored_sets(listing.decode("utf-8", "surrogateescape").splitlines()) if listing is not None else None


def check_passphrase(ctx: "Context", crypt: Encryption, url: str, workdir: Path) -> None:
    """Before anything is written or removed: the passphrase opens the newest manifest of the
    chain at url. A mistyped one would otherwise encrypt new sets (the layout chain's fulls, a
    new full chain) that no later run, with the right passphrase, can read."""
    passphrase = crypt.env.get("PASSPHRASE")
    listing = remote_file(ctx, url) if passphrase else None
    newest = newest_manifest(listing.decode("utf-8", "surrogateescape").splitlines()) if listing else None
    data = remote_file(ctx, url, newest) if newest else None
    if data is None:
        return
    encrypted = workdir / "newest-manifest.gpg"
    encrypted.write_bytes(data)
    result = ctx.runner.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0",
                             "--decrypt", str(encrypted)],
                            input=passphrase + "\n", check=False, timeout=120)
    if result.returncode != 0 and any(text in result.stderr for text in WRONG_PASSPHRASE):
        raise RescueError(f"wrong passphrase: it does not open the backup at {ctx.log.redact(url)} "
                          f"({newest}); nothing was written",
                          "check BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE (or the answer typed)")
    if result.returncode != 0:
        ctx.log.info(f"Could not check the passphrase against {newest}: " + " ".join(result.stderr.split()[-12:]))


def gpg_agent_running(runner: Runner) -> bool:
    """Does a gpg-agent answer on the keyring's socket ($GNUPGHOME or ~/.gnupg)?"""
    result = runner.run(["gpgconf", "--list-dirs", "agent-socket"], check=False, timeout=30)
    path = result.stdout.strip()
    if result.returncode != 0 or not path:
        return False
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


def gnupg_home() -> Path:
    """The keyring's directory: $GNUPGHOME, else ~/.gnupg."""
    return Path(os.environ.get("GNUPGHOME") or Path(os.environ.get("HOME") or "/root") / ".gnupg")


@contextlib.contextmanager
def own_gpg_agent(runner: Runner) -> "Iterator[None]":
    """The keyring's gpg-agent for a run: started first when none runs (the chains side by side
    would each start one at once, and gpg waits only seconds for an agent another gpg is
    starting: too short on a loaded machine), and then stopped after the run (one that was
    running before, the user's, is left alone). A ~/.gnupg that does not exist yet is made
    first (0700, as gpg makes it): each gpg of the chains side by side checks for it and makes
    it, and the one that loses the race stops with "Fatal: can't create directory
    '/root/.gnupg': File exists" (a drill's backup failed so, duplicity exit 31)."""
    home = gnupg_home()
    if not home.exists() and home.parent.is_dir():
        with contextlib.suppress(FileExistsError):
            home.mkdir(mode=0o700)
    before = gpg_agent_running(runner)
    if not before:
        runner.run(["gpgconf", "--launch", "gpg-agent"], check=False, timeout=60)
    try:
        yield
    finally:
        if not before and gpg_agent_running(runner):
            runner.run(["gpgconf", "--kill", "gpg-agent"], check=False, timeout=30)


def passphrase_from_file(ctx: "Context", path: str) -> str:
    """--passphrase-file: the file's content without one trailing newline (never argv or a log)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise RescueError(f"cannot read the passphrase file {path}: {exc.strerror}", "give a readable file") from None
    value = text[:-1] if text.endswith("\n") else text
    if not value:
        raise RescueError(f"the passphrase file {path} is empty", "write the duplicity passphrase into it")
    ctx.log.add_secret(value)
    return value


def backup_encryption(ctx: "Context", purpose: str) -> Encryption:
    if purpose == "backup" and ctx.config.setting("BACKUP_DUPLICITY_ASK_PASSPHRASE"):
        ctx.log.say("The duplicity passphrase will be asked for on restore (BACKUP_DUPLICITY_ASK_PASSPHRASE)")
    crypt = encryption(ctx.config, passphrase(ctx, purpose))
    for key in crypt.keys:
        ctx.log.add_secret(key, GPG_KEY_LABEL)
    return crypt


# -- statistics and metrics --------------------------------------------------------------------

LAST_BACKUP_FILE = "last-backup.json"
STORED_CONFIG_FILE = "rescue.conf"
PROMETHEUS_FILE = "rescue_backup.prom"


def backup_record(stats: Dict[str, float], kind: str, url: str, started: float, ended: float,
                  returncode: int, previous: Dict[str, object]) -> Dict[str, object]:
    """What /var/lib/rescue/last-backup.json keeps about the last run."""
    success = returncode == 0
    return {
        "success": success, "exit_code": returncode, "kind": kind, "url": url,
        "start_time": started, "end_time": ended, "duration": round(ended - started, 3),
        "last_success_time": ended if success else previous.get("last_success_time"),
        "statistics": stats,
    }


def prometheus_text(record: Dict[str, object], host: str) -> str:
    """node_exporter textfile metrics of the last backup."""
    stats = record.get("statistics") or {}
    label = '{host="%s"}' % host.replace("\\", "\\\\").replace('"', '\\"')
    metrics = [
        ("rescue_backup_last_run_timestamp_seconds", "End of the last backup run.", record["end_time"]),
        ("rescue_backup_last_run_success", "1 if the last backup run succeeded.", int(bool(record["success"]))),
        ("rescue_backup_last_success_timestamp_seconds", "End of the last successful backup.",
         record.get("last_success_time") or 0),
        ("rescue_backup_duration_seconds", "Duration of the last backup run.", record["duration"]),
        ("rescue_backup_source_files", "Files in scope of the last backup.", stats.get("SourceFiles", 0)),
        ("rescue_backup_source_bytes", "Bytes in scope of the last backup.", stats.get("SourceFileSize", 0)),
        ("rescue_backup_new_bytes", "Bytes of new files in the last backup.", stats.get("NewFileSize", 0)),
        ("rescue_backup_changed_bytes", "Bytes of changed files in the last backup.", stats.get("ChangedFileSize", 0)),
        ("rescue_backup_stored_bytes", "Bytes the last backup added to the target.",
         stats.get("TotalDestinationSizeChange", 0)),
        ("rescue_backup_errors", "Errors duplicity reported in the last backup.", stats.get("Errors", 0)),
    ]
    lines = []
    for name, help_text, value in metrics:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{label} {value}"]
    return "\n".join(lines) + "\n"


def save_backup_record(ctx: "Context", record: Dict[str, object]) -> None:
    write_file(var_dir(ctx.config) / LAST_BACKUP_FILE, json.dumps(record, indent=2) + "\n", keep_dir_time=True)
    directory = ctx.config.get("NODE_EXPORTER_TEXTFILE_DIR")
    if directory:
        write_file(Path(directory) / PROMETHEUS_FILE, prometheus_text(record, backup_host(ctx.config)), 0o644)


def previous_record(config: Config) -> Dict[str, object]:
    """last-backup.json; empty when it is missing or not a record rescue wrote."""
    try:
        record = json.loads((var_dir(config) / LAST_BACKUP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


# -- running duplicity -------------------------------------------------------------------------

def mounted_now(runner: Runner) -> List[Dict[str, object]]:
    result = runner.run(["findmnt", "-J", "-l", "-o", "TARGET,SOURCE,FSTYPE"])
    return parse_findmnt(result.stdout)


def mounts_to_back_up(ctx: "Context", layout: "Layout") -> Tuple[List[str], List[Tuple[str, str]]]:
    """The layout's filesystems, and every other mount with why it is left out."""
    reasons = {item.what: item.reason for item in layout.excluded if item.kind == "mount"}
    return backup_scope([m.mountpoint for m in layout.mounts], reasons, mounted_now(ctx.runner))


def progress_line(config: Config) -> bool:
    """Progress as one updating line (on a terminal, PROGRESS_MODE=ANSI), else lines."""
    return sys.stdout.isatty() and config.setting("PROGRESS_MODE") == "ANSI"


def progress_interval(config: Config) -> float:
    return config.setting("PROGRESS_WAIT_SECONDS")


def duplicity_run(ctx: "Context", args: Sequence[str], crypt: Encryption, what: str,
                  env: Optional[Dict[str, str]] = None, shared_console: bool = False) -> Tuple[int, DuplicityOutput]:
    """Run duplicity, streaming its output to the log and progress to the console: an
    updating line, or a line per volume when the console is shared (several run at once, or
    the caller shows progress of its own)."""
    prefix, base_env = duplicity_command(ctx.config)
    full_env = dict(base_env, **crypt.env, **(env or {}))
    ansi = progress_line(ctx.config) and not shared_console
    output = DuplicityOutput(ctx.log, what, ansi, progress_interval(ctx.config))
    result = ctx.runner.run(prefix + list(args), env=full_env, check=False, on_line=output, program="duplicity")
    if ansi:
        ctx.log.end_status()
    return result.returncode, output


def without_traceback(text: str) -> str:
    """duplicity's output without the frames of a Python traceback (the whole is in the log):
    the exception's message stays, all of it (a GPGError carries the GnuPG log, which says why)."""
    out, in_frame = [], False
    for line in text.splitlines():
        at = line.find("Traceback (")     # "(most recent call last)" or duplicity's "(innermost last)"
        if at >= 0 and line[at:].rstrip().endswith("last):"):
            if line[:at].strip():
                out.append(line[:at].rstrip())
            in_frame = True
            continue
        if line.startswith('  File "'):
            in_frame = True                # a tail may begin inside the frames
            continue
        if in_frame and line.startswith("    "):
            continue                       # the frame's source line and its ^^^^ marks
        in_frame = False
        out.append(line)
    return "\n".join(out)


def duplicity_failure(what: str, returncode: int, output: DuplicityOutput, log: Log) -> RescueError:
    found = diagnose("\n".join(output.lines))
    cause = f": {found[0]}" if found else ""
    last = "\n".join(without_traceback("\n".join(output.lines)).splitlines()[-15:])
    hint = (found[1] + "\n" if found else "") + "duplicity's last output:\n" + last
    if log.path:
        hint += f"\nthe whole output is in {log.path}"
    return RescueError(f"{what} failed (duplicity exit code {returncode}){cause}", hint)


def run_checked(ctx: "Context", args: Sequence[str], crypt: Encryption, what: str,
                env: Optional[Dict[str, str]] = None, shared_console: bool = False) -> DuplicityOutput:
    returncode, output = duplicity_run(ctx, args, crypt, what, env, shared_console)
    if returncode != 0:
        raise duplicity_failure(what[0].lower() + what[1:], returncode, output, ctx.log)
    return output


def run_retention(ctx: "Context", opts: DuplicityOptions, url: str, parts: Sequence[str]) -> None:
    """The remove-* actions on the main chain; the layout chain and the parts' chains (retired
    ones too) follow it as one backup: each keeps what a restore as of the oldest time the
    main chain still has takes from it (remove-older-than its newest set at or before that
    time), so that rules counted chain by chain never leave the plan of that time or a part
    out of a restore the main chain offers. A target rescue cannot list: the same actions on
    every part, BACKUP_DUPLICITY_MAX_TIME on the layout chain."""
    actions = retention_commands(ctx.config)
    for action in actions:
        ctx.log.say(f"Removing old backups: {' '.join(action[:2])}")
        run_checked(ctx, retention_command(opts, action, url, ""), opts.crypt, "removing old backups")
    main = chain_sets(ctx, url) if actions else None
    oldest = min((t for t, ok in main.items() if ok), default=None) if main else None
    max_time = ctx.config.setting("BACKUP_DUPLICITY_MAX_TIME")
    followers = [(layout_url(url), LAYOUT_SUFFIX, [["remove-older-than", max_time, "--force"]] if max_time else [])]
    followers += [part_chain(url, part) + (actions,) for part in parts]
    for chain_url, suffix, otherwise in followers if actions else []:
        sets = chain_sets(ctx, chain_url) if oldest is not None else None
        if sets is None:
            follow = otherwise
        else:
            needed = [t for t, ok in sets.items() if ok and t <= oldest]
            follow = [a for a in actions if a[0] == "remove-all-inc-of-but-n-full" and suffix != LAYOUT_SUFFIX]
            follow += [["remove-older-than", str(int(max(needed))), "--force"]] if needed else []
        for action in follow:
            run_checked(ctx, retention_command(opts, action, chain_url, suffix), opts.crypt, "removing old backups")


def without_usage(value: object) -> object:
    """A layout.json value without "used" (how full a filesystem is: it changes all the time)
    and without the digest, which covers it."""
    if isinstance(value, dict):
        return {k: without_usage(v) for k, v in value.items() if k not in ("used", "digest")}
    if isinstance(value, list):
        return [without_usage(v) for v in value]
    return value


def tree_digest(root: Path) -> str:
    """sha256 over the names and contents of the files below root (layout.json without usage)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode("utf-8", "surrogateescape") + b"\0")
        data = path.read_bytes()
        if path.name == "layout.json":
            data = json.dumps(without_usage(json.loads(data)), sort_keys=True).encode()
        digest.update(data)
    return digest.hexdigest()


def upload_layout(ctx: "Context", opts: DuplicityOptions, url: str, workdir: Path, run_time: int) -> str:
    """A full backup of the layout and the configuration (no secrets) to URL/layout, unless the
    last backup, which succeeded, already stored the same (a restore as of any time then finds
    an equal one; a failed run's layout set is not trusted, it is stored again).
    Returns what identifies the stored content, for last-backup.json."""
    staging = workdir / "layout-upload"
    staging.mkdir(mode=0o700)
    layout = layout_dir(ctx.config)
    if layout.is_dir():
        shutil.copytree(str(layout), str(staging / "layout"), symlinks=True)
    write_file(staging / STORED_CONFIG_FILE, config_without_secrets(ctx.config))
    plan = var_dir(ctx.config) / PARTS_FILE
    if plan.is_file():
        shutil.copy2(str(plan), str(staging / PARTS_FILE))
    digest = hashlib.sha256((url + tree_digest(staging)).encode()).hexdigest()
    previous = previous_record(ctx.config)
    if previous.get("success") and previous.get("layout_digest") == digest:
        ctx.log.info("The layout and configuration on the target are up to date")
        return digest
    ctx.log.say(f"Storing the layout and configuration in {ctx.log.redact(layout_url(url))}")
    returncode, output = duplicity_run(ctx, layout_store_command(opts, str(staging), url, str(workdir), run_time),
                                       opts.crypt, "storing the layout")
    if returncode != 0:
        remove_incomplete_set(ctx, opts, layout_url(url), LAYOUT_SUFFIX, output)
        raise duplicity_failure("storing the layout", returncode, output, ctx.log)
    return digest


def own_paths(config: Config, archive_dir: str, workdir: Path) -> List[str]:
    """rescue's and duplicity's own files, never backed up."""
    paths = [archive_dir, str(workdir), str(var_dir(config) / LAST_BACKUP_FILE)]
    target = url_path(config.setting("BACKUP_DUPLICITY_URL"))
    return paths + ([target] if target else [])


def merge_statistics(all_stats: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """One statistics block for chains backed up side by side: counts and sizes add up, the
    times span all of them."""
    merged: Dict[str, float] = {}
    for stats in all_stats:
        for name, value in stats.items():
            merged[name] = merged.get(name, 0) + value
    starts = [s["StartTime"] for s in all_stats if "StartTime" in s]
    ends = [s["EndTime"] for s in all_stats if "EndTime" in s]
    if starts and ends:
        merged.update(StartTime=min(starts), EndTime=max(ends), ElapsedTime=round(max(ends) - min(starts), 2))
    return merged


def remove_incomplete_set(ctx: "Context", opts: DuplicityOptions, url: str, name_suffix: str,
                          output: DuplicityOutput) -> None:
    """After a backup that failed because a disk is full: duplicity's cleanup of the set it
    left incomplete (its volumes take room the next run needs, and resuming it would fail
    again). Other failures keep it: the next run resumes it; restores skip it meanwhile."""
    found = diagnose("\n".join(output.lines))
    if not found or "disk is full" not in found[0]:
        return
    ctx.log.say(f"Removing the incomplete backup set from {ctx.log.redact(url)}")
    returncode, _ = duplicity_run(ctx, cleanup_command(opts, url, name_suffix), opts.crypt, "Cleanup",
                                  shared_console=True)
    if returncode != 0:
        ctx.log.warn(f"could not remove the incomplete backup set (duplicity exit code {returncode}); "
                     "restores skip it, and the next backup resumes or removes it")


def run_backup(ctx: "Context", opts: DuplicityOptions, chains: Sequence[Chain], workdir: Path,
               store_layout: Callable[[], str], run_time: int) -> int:
    """Store the layout and back up every chain, side by side: the largest first, up to
    twice parallel_workers() at a time (much of a duplicity run is waiting for ssh and gpg,
    which others use to compute)."""
    workers = 2 * parallel_workers(ctx.config) if len(chains) > 1 else 1
    order = sorted(chains, key=lambda c: -c.size)
    if len(chains) > 1:
        at_once = "side by side" if workers >= len(chains) else f"{workers} at a time"
        ctx.log.say(f"Backing up in {len(chains)} chains {at_once}: the main chain and "
                    + ", ".join(f"{c.label} ({human_size(c.size)})" for c in chains[1:]))

    def back_up(chain: Chain) -> Tuple[int, DuplicityOutput]:
        tempdir = workdir / ("tmp" + chain.name_suffix)
        tempdir.mkdir()
        args = backup_command(opts, chain.selection, chain.url, str(tempdir), chain.name_suffix, chain.options,
                              ctx.config.setting("BACKUP_DUPLICITY_FULL_IF_OLDER_THAN"), run_time)
        ctx.log.say("Running: duplicity " + ctx.log.redact(" ".join(shlex.quote(a) for a in args)))
        what = "Backup" if len(chains) == 1 else f"Backup of {chain.label}"
        return duplicity_run(ctx, args, opts.crypt, what, shared_console=len(chains) > 1)

    def layout() -> Tuple[Optional[str], Optional[RescueError]]:
        try:
            return store_layout(), None
        except RescueError as exc:           # recorded as a failed backup, then raised
            return None, exc

    previous = previous_record(ctx.config)
    started = time.time()
    done = in_parallel(ctx.runner, [layout] + [lambda c=c: back_up(c) for c in order], workers + 1)
    (layout_digest, layout_error), results = done[0], done[1:]
    outputs = [output for _, output in results]
    stats = merge_statistics([parse_backup_statistics(o.lines) for o in outputs])
    kinds = {"full" if o.full else "incremental" for o in outputs}
    kind = "unknown" if not stats else (kinds.pop() if len(kinds) == 1 else "full+incremental")
    failed = [(chain, code, output) for chain, (code, output) in zip(order, results) if code != 0]
    returncode = failed[0][1] if failed else (1 if layout_error else 0)
    record = backup_record(stats, kind, ctx.log.redact(chains[0].url), started, time.time(), returncode, previous)
    record["layout_digest"] = layout_digest
    if len(chains) > 1:
        record["chains"] = [{"label": c.label, "exit_code": code, "full": o.full}
                            for c, (code, o) in zip(order, results)]
    save_backup_record(ctx, record)
    for chain, _, output in failed:
        remove_incomplete_set(ctx, opts, chain.url, chain.name_suffix, output)
    if failed:
        chain, code, output = failed[0]
        what = "the backup" if len(chains) == 1 else f"the backup of {chain.label}"
        raise duplicity_failure(what, code, output, ctx.log)
    if layout_error:
        raise layout_error
    ctx.log.say(describe_statistics(stats, kind) if stats else "Backup done (duplicity printed no statistics)")
    if stats.get("Errors"):
        ctx.log.warn(f"duplicity reported {stats['Errors']:.0f} errors (files it could not read); see {ctx.log.path}")
    return 0


def choose_parts(ctx: "Context", previous: PartsPlan, selection: Selection,
                 mountpoints: Sequence[str], own: Sequence[str], totals: Dict[str, int]) -> PartsPlan:
    """The plan for this backup: the previous parts while they are still valid directories
    (so their chains go on with incrementals), else a new plan from the sizes just measured."""
    workers = parallel_workers(ctx.config)
    eligible = lambda path: part_eligible(path, selection.args, mountpoints, own)   # noqa: E731
    old = previous.parts
    still = [p for p in old if p in totals and eligible(p)]
    if old and still == old and previous.workers == workers:
        parts = old
    else:
        parts = plan_parts(totals, walk_roots(selection.roots, mountpoints), workers, eligible,
                           ctx.config.setting("BACKUP_DUPLICITY_PART_MIN_MB") * 1024 * 1024)
    return PartsPlan(parts, sorted((set(previous.retired) | set(old)) - set(parts)), workers)


LEFT_OUT_FILE = "left-out.json"


def left_out_entries(excluded: Sequence[Tuple[str, str]], config: Config) -> List[Dict[str, object]]:
    """The mountpoints the backup leaves out (/proc, /sys, /dev, /run, /tmp, other mounts, a
    bind-mounted /etc/machine-id) and BACKUP_DUPLICITY_EXCLUDE's plain paths, as they are here:
    a restore makes them again with their type, mode, owner and times (not what is below)."""
    paths = sorted({p for p, _ in excluded} | {p for p in config.setting("BACKUP_DUPLICITY_EXCLUDE")
                                                if p.startswith("/") and not any(c in p for c in "*?[")})
    includes = [glob_prefix(i) for i in config.setting("BACKUP_DUPLICITY_INCLUDE")]
    if includes:
        paths = [p for p in paths if any(path_within(p, i) for i in includes)]
    out: List[Dict[str, object]] = []
    for path in paths:
        if path == "/" or any(path_within(path, o) and path != o for o in paths):
            continue                              # below another left-out path: not on the disk
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            out.append({"path": path, "type": "dir" if stat.S_ISDIR(st.st_mode) else "file",
                        "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                        "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns})
    return out


def make_backup(ctx: "Context") -> int:
    """A backup run; one that fails or is stopped before it recorded its result leaves a
    record of its failure (time, reason), so that status and the metrics do not go on showing
    the last success alone."""
    started = time.time()
    try:
        with own_gpg_agent(ctx.runner):
            return back_up_everything(ctx)
    except (RescueError, KeyboardInterrupt, Terminated) as exc:
        record_failure(ctx, started, exc)
        raise


def failure_reason(exc: BaseException) -> Tuple[int, str]:
    """(exit code, reason) of a run that ended with exc."""
    if isinstance(exc, RescueError):
        return exc.exit_code, exc.message
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted by Ctrl-C"
    return 143, "stopped by SIGTERM"


def record_failure(ctx: "Context", started: float, exc: BaseException) -> None:
    code, reason = failure_reason(exc)
    previous = previous_record(ctx.config)
    recorded = previous.get("start_time")
    if isinstance(recorded, (int, float)) and recorded >= started:     # run_backup recorded this run
        record = dict(previous, reason=reason)
    else:
        try:
            url = ctx.log.redact(backup_url(ctx.config))
        except RescueError:
            url = None
        record = dict(backup_record({}, "none", url, started, time.time(), code, previous), reason=reason)
    try:
        save_backup_record(ctx, record)
    except (OSError, RescueError) as error:
        ctx.log.warn(f"could not record the failed backup: {error}")


@contextlib.contextmanager
def duplicity_tempdirs_removed(opts: DuplicityOptions) -> "Iterator[None]":
    """duplicity keeps files it writes into its archive dir in duplicity-*-tempdir directories
    there; one stopped by a signal leaves them behind. Those that appear during the run go
    with it (those that were there before may belong to another run of another workflow)."""
    pattern = os.path.join(glob.escape(opts.archive_dir), glob.escape(opts.name) + "*", "duplicity-*-tempdir")
    before = set(glob.glob(pattern))
    try:
        yield
    finally:
        for leftover in set(glob.glob(pattern)) - before:
            shutil.rmtree(leftover, ignore_errors=True)


def back_up_everything(ctx: "Context") -> int:
    config = ctx.config
    url = backup_url(config)
    check_no_duplicity_left(ctx, url)
    crypt = backup_encryption(ctx, "backup")
    check_gpg_keys(ctx)
    check_includes(config, ctx.log)
    layout = save_layout_for_backup(ctx)
    ctx.log.say(f"Creating duplicity archives on '{ctx.log.redact(url)}'")
    prepare_target(ctx, layout_url(url))
    archive_dir = default_archive_dir()
    opts = duplicity_options(config, crypt, archive_dir, ctx.ssh_options(), url)
    plan_file = var_dir(config) / PARTS_FILE
    previous = read_parts_plan(plan_file)
    with duplicity_tempdirs_removed(opts), work_directory("rescue-backup-") as workdir:
        check_passphrase(ctx, crypt, url, workdir)
        in_scope, excluded = mounts_to_back_up(ctx, layout)
        own = own_paths(config, archive_dir, workdir)
        selection = backup_selection(in_scope, excluded, config, own)
        ctx.log.say("Backing up: " + ", ".join(in_scope))
        ctx.log.info("Leaving out: " + ", ".join(f"{p} ({why})" for p, why in selection.excluded))
        run_retention(ctx, opts, url, previous.parts + previous.retired)
        write_file(var_dir(config) / STORED_CONFIG_FILE, config_without_secrets(config))
        write_file(var_dir(config) / LEFT_OUT_FILE, json.dumps(left_out_entries(excluded, config), indent=1) + "\n")
        if not (var_dir(config) / LAST_BACKUP_FILE).exists():
            write_file(var_dir(config) / LAST_BACKUP_FILE, "{}\n")   # before the backup sees VAR_DIR
        mountpoints = in_scope + [p for p, _ in excluded]
        sizes: Dict[str, int] = {}
        counts = collect_metadata(selection.roots, mountpoints, own, var_dir(config) / METADATA_FILE, sizes)
        ctx.log.info(f"Recorded what duplicity does not keep: {counts}")
        totals = subtree_sizes(sizes)
        plan = choose_parts(ctx, previous, selection, mountpoints, own, totals)
        write_file(plan_file, plan.to_json())
        chains = backup_chains(url, selection, plan.parts, totals, lambda path: chain_options(config, path))
        for chain in chains[1:]:
            if chain.options:
                ctx.log.info(f"{chain.label}: its data does not compress, stored without gpg's compression")
        if len(chains) > 1:
            prepare_target(ctx, *[c.url for c in chains[1:]])
        run_time = int(time.time())
        return run_backup(ctx, opts, chains, workdir, lambda: upload_layout(ctx, opts, url, workdir, run_time),
                          run_time)


# =============================================================================================
# 14. restore
#
# duplicity 3.x refuses to restore into a directory that is not empty, even with --force, and
# recovery restores into /mnt/local where the child filesystems (/boot, /home, …) are already
# mounted. So duplicity restores into an empty staging directory on the target's root
# filesystem, with --rename sending each top-level name that holds a mountpoint (boot, home,
# var, …) through "../NAME" into the real tree: every byte is written once, onto the
# filesystem it belongs to. Afterwards the other top-level names are renamed from the staging
# directory into place (same filesystem: no copying) and the root's own attributes copied.
# =============================================================================================

def redirected_names(target: str, mountpoints: Sequence[str]) -> List[str]:
    """Top-level names under target that are, or contain, a mountpoint."""
    names = set()
    for mount in mountpoints:
        if mount != target and path_within(mount, target):
            names.add(mount[len(target.rstrip("/")) + 1:].split("/")[0])
    return sorted(names)


def unexpected_entries(entries: Dict[str, bool], redirected: Sequence[str]) -> List[str]:
    """Names in the target (name -> is an empty directory) that a restore would collide with."""
    return sorted(name for name, empty_dir in entries.items()
                  if name not in redirected and not empty_dir and not name.startswith(".rescue-"))


def target_entries(target: Path) -> Dict[str, bool]:
    entries = {}
    for entry in os.scandir(str(target)):
        empty = entry.is_dir(follow_symlinks=False) and not any(os.scandir(entry.path))
        entries[entry.name] = empty
    return entries


def make_room(destination: Path, what: str) -> None:
    """Before renaming something restored to destination: an empty directory there (a
    mountpoint's stand-in) goes, anything else is an error."""
    if os.path.lexists(str(destination)):
        if destination.is_dir() and not destination.is_symlink() and not any(os.scandir(str(destination))):
            destination.rmdir()
        else:
            raise RescueError(f"cannot put the restored {what} into place: {destination} exists",
                              "restore into an empty directory or freshly made filesystems")


def move_into_place(staging: Path, target: Path) -> None:
    """Rename what duplicity restored into staging up into target (the same filesystem)."""
    for entry in os.scandir(str(staging)):
        destination = target / entry.name
        make_room(destination, entry.name)
        os.rename(entry.path, str(destination))


def copy_root_attributes(source: os.stat_result, target: Path) -> None:
    os.chown(str(target), source.st_uid, source.st_gid)
    os.chmod(str(target), stat.S_IMODE(source.st_mode))
    os.utime(str(target), ns=(source.st_atime_ns, source.st_mtime_ns))


@contextlib.contextmanager
def private_gnupg_home(runner: Runner, crypt: Optional[Encryption] = None) -> "Iterator[Dict[str, str]]":
    """HOME and GNUPGHOME pointing at a temporary copy of the keyring, outside the target:
    gpg writes into its home (trustdb, agent sockets), which may be read-only in the rescue
    system, and nothing of it must be left on the restored disk.

    In the copy, the encryption keys are protected anew (same passphrase) with a cheap key
    derivation: gpg-agent derives the key from the cached passphrase at every decryption,
    with the count calibrated at key creation (a noticeable fraction of a second), one
    decryption at a time, and a restore decrypts every volume and metadata file. The
    copy lives in /run (a tmpfs, mode 0700) and is removed afterwards; the keyring itself is
    not touched."""
    with work_directory("rescue-home-", "/run" if os.access("/run", os.W_OK) else None) as home:
        with keyring_copy(runner, home, crypt) as env:
            yield env


@contextlib.contextmanager
def keyring_copy(runner: Runner, home: Path, crypt: Optional[Encryption]) -> "Iterator[Dict[str, str]]":
    """The keyring copied into home/.gnupg, its keys protected anew; its agent stopped afterwards."""
    gnupg = home / ".gnupg"
    source = gnupg_home()
    if source.is_dir():
        shutil.copytree(str(source), str(gnupg), symlinks=True,
                        ignore=shutil.ignore_patterns("S.*", "*.lock", ".#*", "random_seed"))
    else:
        gnupg.mkdir()
    os.chmod(str(gnupg), 0o700)
    env = {"HOME": str(home), "GNUPGHOME": str(gnupg)}
    try:
        passphrase = crypt.env.get("PASSPHRASE") if crypt else None
        if passphrase and crypt and crypt.keys:
            with open(str(gnupg / "gpg-agent.conf"), "a") as conf:
                conf.write("\nallow-loopback-pinentry\ns2k-count 65536\n")
            for key in crypt.keys:
                runner.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0", "--passwd", key],
                           env=env, input=f"{passphrase}\n{passphrase}\n", check=False, timeout=60)
        # one agent, up before the chains side by side ask for it (own_gpg_agent says why)
        runner.run(["gpgconf", "--launch", "gpg-agent"], env=env, check=False, timeout=60)
        yield env
    finally:
        try:
            runner.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False, timeout=30)
        except RescueError as exc:
            runner.log.debug(f"could not stop the temporary gpg-agent: {exc.message}")


def restore_workspace(config: Config, target: Path) -> "contextlib.AbstractContextManager[Path]":
    """duplicity's temporary files: on a tmpfs with BACKUP_DUPLICITY_TEMP_RAMDISK, else on the
    target's filesystem (where there is room for a volume)."""
    if config.setting("BACKUP_DUPLICITY_TEMP_RAMDISK"):
        return work_directory("rescue-restore-", "/dev/shm" if os.path.isdir("/dev/shm") else None)
    return work_directory(".rescue-tmp-", str(target))


def restore_layout_chain(ctx: "Context", opts: DuplicityOptions, home: Dict[str, str], work: Path,
                         destination: Path, time_: Optional[str]) -> Tuple[int, DuplicityOutput]:
    """Restore URL/layout (the layout, configuration and chain plan) into destination."""
    args = restore_command(opts, layout_url(backup_url(ctx.config)), str(destination), str(work), time_,
                           name_suffix=LAYOUT_SUFFIX)
    return duplicity_run(ctx, args, opts.crypt, "Fetching the layout", env=home)


NO_CHAIN_MESSAGES = ("No backup chains found", "No signatures found")


def stored_parts(ctx: "Context", opts: DuplicityOptions, home: Dict[str, str], work: Path,
                 time_: Optional[str], what: str = "restore") -> List[str]:
    """The parts (chains of their own) of the backup as of time_, from the plan stored with
    the layout. A backup without a layout chain (made by ReaR) is one chain."""
    destination = work / "stored-layout"
    returncode, output = restore_layout_chain(ctx, opts, home, work, destination, time_)
    if returncode != 0:
        if any(m in line for line in output.lines for m in NO_CHAIN_MESSAGES):
            ctx.log.info("No layout stored beside the backup (made by ReaR?): it is one chain")
            return []
        raise duplicity_failure(what, returncode, output, ctx.log)     # (of the stored layout, first)
    return read_parts_plan(destination / PARTS_FILE).parts


def local_parts(ctx: "Context", url: str, time_: Optional[str]) -> List[str]:
    """This machine's plan, when restoring the latest backup from where its last backup
    (which succeeded) went: most likely the stored plan. Empty otherwise."""
    if time_:
        return []
    last = previous_record(ctx.config)
    if not last.get("success") or last.get("url") != ctx.log.redact(url):
        return []
    try:
        return read_parts_plan(var_dir(ctx.config) / PARTS_FILE).parts
    except RescueError:
        return []


def checked_restore_time(ctx: "Context", url: str, parts: Sequence[str], time_: Optional[str],
                         doing: str = "restoring") -> Optional[str]:
    """The time to restore the main chain and these parts as of: time_ when every chain has a
    complete set then, else (with a warning) the last time they all have one; an error when
    one of them has no set that old."""
    chains = {}
    for label, chain_url in [("main", url)] + [(p, part_chain(url, p)[0]) for p in parts]:
        sets = chain_sets(ctx, chain_url)
        if sets is not None:
            chains[label] = sets
    if "main" not in chains:
        return time_
    if not chains["main"]:
        raise RescueError(f"there is no backup at {ctx.log.redact(url)}: its directory holds no backup sets",
                          "check BACKUP_DUPLICITY_URL and HOSTNAME, or make a backup first (rescue mkbackuponly)")
    point, earlier = restore_point(chains, None if time_ is None else time_seconds(time_, time.time()))
    if not earlier:
        return time_
    ctx.log.warn(f"the newest backup set{' as of ' + time_ if time_ else ''} is incomplete (a backup was "
                 f"interrupted): {doing} the last complete one, of {iso_time(point)}")
    return iso_time(point)


def check_parts_complete(ctx: "Context", url: str, parts: Sequence[str], time_: Optional[str]) -> None:
    """The stored plan's parts (when they are not the ones the restore time was chosen for)
    have a complete set as of time_, or the restore fails naming a time that works."""
    chains = {}
    for label, chain_url in [("main", url)] + [(p, part_chain(url, p)[0]) for p in parts]:
        sets = chain_sets(ctx, chain_url, gone_is_empty=True)
        if sets is not None:
            chains[label] = sets
    if not chains.get("main"):
        return
    point, earlier = restore_point(chains, None if time_ is None else time_seconds(time_, time.time()))
    if earlier:
        raise RescueError(f"a chain of the backup as of {time_ or 'now'} is incomplete (a backup was interrupted)",
                          f"restore with --restore-time {iso_time(point)}, the last time every chain is complete")


def place_part(staging: Path, target: Path, part: str) -> None:
    """Rename a part restored into staging (on its filesystem) to its place in target,
    keeping the times of the directory it goes into."""
    destination = Path(below(target, part))
    parent = destination.parent
    if not parent.is_dir():
        raise RescueError(f"cannot put the restored {part} into place: {parent} was not restored",
                          "the backup's chains do not fit together; restore with --restore-time of one backup run")
    make_room(destination, part)
    before = os.lstat(str(parent))
    os.rename(str(staging), str(destination))
    os.utime(str(parent), ns=(before.st_atime_ns, before.st_mtime_ns), follow_symlinks=False)


@dataclass(frozen=True)
class RestoreStep:
    """One chain to restore: duplicity writes it into a new staging directory on the
    filesystem it belongs to (onto), from where it is renamed into place."""
    label: str                                    # "main", or the part's path
    url: str
    name_suffix: str
    onto: str                                     # the directory the staging directory goes in
    renames: Tuple[Tuple[str, str], ...] = ()     # names that go through ../NAME into the tree


def restore_steps(url: str, target: str, filesystems: Sequence[str], parts: Sequence[str]) -> List[RestoreStep]:
    """The chains of a restore into target (a tree of the mounted filesystems): the main
    chain onto target's own filesystem, sending the top-level names that hold a mountpoint
    through --rename onto theirs, and each part onto the filesystem that holds it."""
    redirected = redirected_names(target, filesystems)
    steps = [RestoreStep("main", url, "", target, tuple((n, "../" + n) for n in redirected))]
    for part in parts:
        chain_url, suffix = part_chain(url, part)
        steps.append(RestoreStep(part, chain_url, suffix, nearest_mount(below(Path(target), part), filesystems) or target))
    return steps


PART_STAGING = ".rescue-part-"        # + a digest of the part's path: a part's staging directory
PART_DONE = ".done"                   # beside it, once duplicity restored all of it (RestoreRun.fingerprint)
MAIN_STAGING = ".rescue-restore-"


def part_staging(onto: str, label: str) -> Path:
    """Where the part label is restored to, on the filesystem onto: the same name in every
    run, so that a run after an interrupted one finds what that one finished."""
    return Path(onto) / (PART_STAGING + hashlib.sha256(label.encode("utf-8", "surrogateescape")).hexdigest()[:16])


def part_record(staging: Union[str, Path]) -> Path:
    """The PART_DONE record beside a part's staging directory."""
    return Path(str(staging) + PART_DONE)


def finished_part(path: str) -> bool:
    """Whether path (at the top of a filesystem) is a part restored completely: its staging
    directory with its record, or the record of such a directory."""
    name = os.path.basename(path)
    if not name.startswith(PART_STAGING):
        return False
    if name.endswith(PART_DONE):
        return os.path.isdir(path[:-len(PART_DONE)])
    return part_record(path).is_file()


def sweep_stagings(filesystems: Sequence[str]) -> List[str]:
    """Remove what interrupted restores left at the top of each filesystem of the tree: the
    main chain's staging directories and the parts' that were not finished (a finished
    part, with its PART_DONE record, stays for the run to take). Returns what went."""
    gone = []
    for top in filesystems:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(top):
                is_dir = entry.is_dir(follow_symlinks=False)
                if (entry.name.startswith(MAIN_STAGING) and is_dir) or \
                        (entry.name.startswith(PART_STAGING) and not finished_part(entry.path)):
                    shutil.rmtree(entry.path) if is_dir else os.unlink(entry.path)
                    gone.append(entry.path)
    return gone


class RestoreRun:
    """Runs restore steps (each duplicity into its own staging directory) and then puts what
    they restored into place. Several steps may run at once, from different threads.

    A part restored completely is recorded (PART_DONE, with the sets of its chain and the
    restore time): when the run fails or is killed, the next one takes it as it is, if its
    chain and the restore time are still the same, and restores only the unfinished chains."""

    def __init__(self, ctx: "Context", opts: DuplicityOptions, target: Path, work: Path,
                 home: Dict[str, str], time_: Optional[str]) -> None:
        self.ctx, self.opts, self.target, self.work, self.home, self.time_ = ctx, opts, target, work, home, time_
        self.staged: Dict[str, Path] = {}         # step label -> its staging directory
        self.lock = threading.Lock()

    def fingerprint(self, step: RestoreStep) -> Optional[Dict[str, object]]:
        """What a finished part was restored from: its chain's sets and the restore time (None
        for a backend whose sets rescue cannot list: such a part is never taken again)."""
        sets = chain_sets(self.ctx, step.url)
        if sets is None:
            return None
        return json.loads(json.dumps({"part": step.label, "url": step.url, "time": self.time_,
                                      "sets": sorted([t, complete] for t, complete in sets.items())}))

    def run(self, step: RestoreStep) -> Optional[DuplicityOutput]:
        """Restore step's chain into its staging directory; None when an earlier run had
        restored this part and it is taken as that run left it."""
        if step.label == "main":
            staging = Path(tempfile.mkdtemp(prefix=MAIN_STAGING, dir=step.onto))
        else:
            staging = part_staging(step.onto, step.label)
            done = part_record(staging)
            if staging.is_dir() and done.is_file():
                with contextlib.suppress(OSError, ValueError):
                    if json.loads(done.read_text()) == self.fingerprint(step):
                        with self.lock:
                            self.staged[step.label] = staging
                        self.ctx.log.say(f"{step.label}: restored completely by an interrupted run, taken as it is")
                        return None
            with contextlib.suppress(FileNotFoundError):
                done.unlink()
            shutil.rmtree(str(staging), ignore_errors=True)
            staging.mkdir(mode=0o700)
        with self.lock:
            self.staged[step.label] = staging
        args = restore_command(self.opts, step.url, str(staging), str(self.work), self.time_, step.renames,
                               step.name_suffix, each_file=self.ctx.log.debug_enabled)
        what = "Restore" if step.label == "main" else f"Restore of {step.label}"
        output = run_checked(self.ctx, args, self.opts.crypt, what, env=self.home, shared_console=True)  # WriteProgress
        if step.label != "main":
            fingerprint = self.fingerprint(step)
            if fingerprint is not None:
                write_file(part_record(staging), json.dumps(fingerprint) + "\n")
        return output

    def attempt(self, step: RestoreStep) -> Union[Optional[DuplicityOutput], RescueError]:
        """run(), with a failure returned instead of raised (for a step that may turn out unneeded)."""
        try:
            return self.run(step)
        except RescueError as exc:
            return exc

    def discard(self, label: str) -> None:
        with self.lock:
            staging = self.staged.pop(label, None)
        if staging is not None:
            with contextlib.suppress(FileNotFoundError):
                part_record(staging).unlink()
            shutil.rmtree(str(staging), ignore_errors=True)

    def place(self) -> os.stat_result:
        """Rename everything restored into place; returns the attributes of the backed-up root."""
        main = self.staged["main"]
        move_into_place(main, self.target)
        root = os.lstat(str(main))
        for label, staging in self.staged.items():
            if label != "main":
                place_part(staging, self.target, label)
                with contextlib.suppress(FileNotFoundError):
                    part_record(staging).unlink()
        return root

    def clean_up(self) -> None:
        """After the run, failed or not: what is left of the staging directories goes, but
        for the parts restored completely (a next run takes them)."""
        for label, staging in list(self.staged.items()):
            if not part_record(staging).is_file():
                self.discard(label)


def restore_parts(ctx: "Context", run: RestoreRun, url: str, filesystems: Sequence[str], workers: int) -> None:
    """The parts of the backup (from the plan stored with its layout), every part's chain at
    once. When this machine made the latest backup, its own plan is most likely the stored
    one: those parts start at once, beside reading the stored plan, which decides; should it
    differ, what was restored for the guess is thrown away."""
    def steps(parts: Sequence[str]) -> List[RestoreStep]:
        return restore_steps(url, str(run.target), filesystems, parts)[1:]

    def stored() -> List[str]:
        return stored_parts(ctx, run.opts, run.home, run.work, run.time_)

    guess = local_parts(ctx, url, run.time_)
    if guess:
        done = in_parallel(ctx.runner, [stored] + [lambda s=s: run.attempt(s) for s in steps(guess)], 2 * workers)
        parts, outputs = done[0], done[1:]
        if sorted(parts) == sorted(guess):           # checked with the restore time
            if any(isinstance(output, RescueError) for output in outputs):
                check_parts_complete(ctx, url, parts, run.time_)       # a part's chain deleted: say so
            say_parts(ctx, parts)
            for output in outputs:
                if isinstance(output, RescueError):
                    raise output
            return
        ctx.log.say("The stored plan of chains differs from this machine's: restoring its parts instead")
        for part in guess:
            run.discard(part)
    else:
        parts = stored()
    check_parts_complete(ctx, url, parts, run.time_)
    say_parts(ctx, parts)
    in_parallel(ctx.runner, [lambda s=s: run.run(s) for s in steps(parts)], 2 * workers - 1)   # beside the main chain


def say_parts(ctx: "Context", parts: Sequence[str]) -> None:
    if parts:
        ctx.log.say(f"The backup has {len(parts)} more chains (parts), restored alongside: " + ", ".join(parts))


def check_restore_target(target: Path, mounts: Sequence[str]) -> None:
    """A directory (or one that can be made): empty but for the stand-ins of mountpoints."""
    if target.exists() and not target.is_dir():
        raise RescueError(f"the restore target {target} is not a directory",
                          "give a directory: new, empty, or with freshly made filesystems mounted there")
    clash = unexpected_entries(target_entries(target), redirected_names(str(target), mounts)) if target.is_dir() else []
    if clash:
        raise RescueError(f"the restore target {target} is not empty: {', '.join(clash[:5])}",
                          "restore into an empty directory, or a tree of freshly made filesystems")


def restore_backup(ctx: "Context", target: Path, time_: Optional[str]) -> int:
    """Restore the backup (latest, or as of time_) into target, which may be a tree of
    mountpoints; then put back what duplicity does not keep. Returns the bytes written.
    The main chain and the parts' chains restore side by side."""
    url = backup_url(ctx.config)
    target = target.resolve()
    mounts = [str(m["target"]) for m in mounted_now(ctx.runner)]
    check_restore_target(target, mounts)
    check_backup_there(ctx, url)
    time_ = checked_restore_time(ctx, url, local_parts(ctx, url, time_), time_)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RescueError(f"cannot create the restore target {target}: {exc.strerror}",
                          "give a directory that can be made there") from None
    crypt = backup_encryption(ctx, "restore")
    filesystems = [str(target)] + [m for m in mounts if path_within(m, str(target))]
    for path in sweep_stagings(filesystems):
        ctx.log.info(f"Removed what an interrupted restore left: {path}")
    workers = parallel_workers(ctx.config)
    with private_gnupg_home(ctx.runner, crypt) as home, restore_workspace(ctx.config, target) as work:
        opts = duplicity_options(ctx.config, crypt, str(work / "archive"), ctx.ssh_options(), url)
        run = RestoreRun(ctx, opts, target, work, home, time_)
        main = restore_steps(url, str(target), filesystems, [])[0]
        ctx.log.say(f"Restoring from '{ctx.log.redact(url)}' into {target}" + (f" as of {time_}" if time_ else ""))
        progress = WriteProgress(ctx.log, "Restoring", filesystems, progress_line(ctx.config),
                                 progress_interval(ctx.config))
        try:
            with progress:
                parts = lambda: restore_parts(ctx, run, url, filesystems, workers)   # noqa: E731
                if workers > 1:
                    in_parallel(ctx.runner, [lambda: run.run(main), parts], 2)
                else:
                    run.run(main)
                    parts()
            root = run.place()
        finally:
            run.clean_up()
    sidecar = Path(below(target, str(var_dir(ctx.config) / METADATA_FILE)))
    if sidecar.is_file():
        done = apply_metadata(ctx.runner, target, read_metadata(sidecar))
        ctx.log.info(f"Restored what duplicity does not keep: {done}")
        if done["failed"]:
            ctx.log.warn(f"{done['failed']} extended attributes could not be set (see the log)")
    made = make_left_out(target, read_left_out(Path(below(target, str(var_dir(ctx.config) / LEFT_OUT_FILE)))))
    if made:
        ctx.log.info("Made again what the backup left out: " + ", ".join(made))
    copy_root_attributes(root, target)
    return progress.written()


def read_left_out(path: Path) -> List[Dict[str, object]]:
    """The record of what the backup left out; a backup without one (ReaR's) left out the
    pseudo filesystems and /tmp, which every system needs as directories."""
    try:
        return [dict(e) for e in json.loads(path.read_text())]
    except FileNotFoundError:
        return [{"path": p, "type": "dir", "mode": m, "uid": 0, "gid": 0} for p, m in
                (("/proc", 0o555), ("/sys", 0o555), ("/dev", 0o755), ("/run", 0o755), ("/tmp", 0o1777))]
    except (OSError, ValueError, TypeError) as exc:
        raise RescueError(f"cannot read {path}: {exc}", "the restored files are there; make the directories "
                          "the backup left out (/proc, /sys, /dev, /run, /tmp) by hand") from None


def make_left_out(target: Path, entries: Sequence[Dict[str, object]]) -> List[str]:
    """Make each left-out path that the restore did not bring (whose directory it did), with
    its type, mode, owner and times; the directory it is made in keeps its times."""
    made = []
    for entry in sorted(entries, key=lambda e: str(e["path"]).count("/")):
        path = Path(below(target, str(entry["path"])))
        if os.path.lexists(str(path)) or not path.parent.is_dir():
            continue
        before = os.lstat(str(path.parent))
        if entry["type"] == "dir":
            path.mkdir()
        else:
            path.touch()
        os.chown(str(path), int(entry["uid"]), int(entry["gid"]))
        os.chmod(str(path), int(entry["mode"]))
        if "mtime_ns" in entry:
            os.utime(str(path), ns=(int(entry["atime_ns"]), int(entry["mtime_ns"])))
        os.utime(str(path.parent), ns=(before.st_atime_ns, before.st_mtime_ns))
        made.append(str(entry["path"]))
    return made


def fetch_layout(ctx: "Context", destination: Path, time_: Optional[str]) -> None:
    """Get the layout and configuration stored beside the backup (for a bare machine)."""
    url = backup_url(ctx.config)
    check_backup_there(ctx, url)
    crypt = backup_encryption(ctx, "restore")
    destination.mkdir(parents=True, exist_ok=True)
    if any(os.scandir(str(destination))):
        raise RescueError(f"{destination} is not empty", "give an empty or new directory")
    with private_gnupg_home(ctx.runner, crypt) as home, work_directory("rescue-layout-") as work:
        opts = duplicity_options(ctx.config, crypt, str(work / "archive"), ctx.ssh_options(), url)
        returncode, output = restore_layout_chain(ctx, opts, home, work, destination, time_)
        if returncode != 0:
            raise duplicity_failure("fetching the layout", returncode, output, ctx.log)
    ctx.backup_opened = True


# =============================================================================================
# 15. status and verify
# =============================================================================================

SET_LINE_RE = re.compile(r"^\s*(Full|Incremental)\s+(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\s+(\d+)\s*$")
VERIFY_RE = re.compile(r"Verify complete: (\d+) files?(?:\(s\))? compared, (\d+) differences?(?:\(s\))? found")


def ctime_to_iso(text: str) -> str:
    """duplicity's local ctime() text ("Sun Nov 29 00:43:55 2026") -> ISO 8601 with offset."""
    stamp = time.mktime(time.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y"))
    return datetime.datetime.fromtimestamp(stamp).astimezone().isoformat()


def parse_collection_status(text: str) -> Dict[str, object]:
    """`duplicity collection-status` -> {"chains": [...], "orphaned_or_incomplete": bool}."""
    chains: List[Dict[str, object]] = []
    for line in text.splitlines():
        if line.startswith("Found primary backup chain") or line.startswith("Secondary chain"):
            chains.append({"primary": line.startswith("Found primary"), "sets": []})
            continue
        match = SET_LINE_RE.match(line)
        if match and chains:
            chains[-1]["sets"].append({"type": match.group(1).lower(), "time": ctime_to_iso(match.group(2)),
                                       "volumes": int(match.group(3))})
    for chain in chains:
        sets = chain["sets"]
        chain["start"] = sets[0]["time"] if sets else None
        chain["end"] = sets[-1]["time"] if sets else None
    chains.sort(key=lambda c: c["start"] or "")
    clean = "No orphaned or incomplete backup sets found." in text
    return {"chains": chains, "orphaned_or_incomplete": not clean}


def mark_incomplete(status: Dict[str, object], stored: Optional[Dict[float, bool]]) -> Dict[str, object]:
    """Each set with "complete" from the chain's files (duplicity lists the volumes of an
    interrupted set as a normal set); an incomplete one makes the chain orphaned_or_incomplete."""
    if stored is None:
        return status
    complete = {iso_time(t): ok for t, ok in stored.items()}
    for chain in status["chains"]:
        for backup_set in chain["sets"]:
            backup_set["complete"] = complete.get(backup_set["time"], True)
            if not backup_set["complete"]:
                status["orphaned_or_incomplete"] = True
    return status


def describe_status(status: Dict[str, object], last: Dict[str, object]) -> str:
    lines = [f"Backups of {status['host']} at {status['url']}:"]
    if not status["chains"]:
        lines.append("  none yet")
    for n, chain in enumerate(status["chains"], 1):
        kind = "primary" if chain["primary"] else "older"
        lines.append(f"  chain {n} ({kind}): {len(chain['sets'])} sets, {chain['start']} … {chain['end']}")
        for backup_set in chain["sets"]:
            lines.append(f"    {backup_set['type']:<12} {backup_set['time']}  {backup_set['volumes']} volumes"
                         + ("" if backup_set.get("complete", True) else "  INCOMPLETE (interrupted; not restored)"))
    if status["orphaned_or_incomplete"]:
        lines.append("  warning: there are orphaned or incomplete backup sets (a backup was interrupted)")
    for part in status.get("parts", []):
        sets = [s for chain in part["chains"] for s in chain["sets"]]
        newest = sets[-1]["time"] if sets else "none yet"
        lines.append(f"  part {part['path']} (its own chain at …/{part['url'].rsplit('/', 1)[-1]}): "
                     f"{len(part['chains'])} chains, {len(sets)} sets, latest {newest}"
                     + (", with orphaned or incomplete sets" if part["orphaned_or_incomplete"] else ""))
        if status["chains"] and not any(s.get("complete", True) for s in sets):
            lines.append(f"  warning: the part {part['path']} has no complete set: a restore of the whole backup "
                         "fails until rescue mkbackuponly runs to completion")
    if last:
        result = "succeeded" if last.get("success") else f"FAILED (exit code {last.get('exit_code')}" + (
            f": {last['reason']})" if last.get("reason") else ")")
        lines.append(f"Last backup from this machine: {last.get('kind')}, {result}, "
                     f"{last.get('duration')} s")
        if last.get("statistics"):
            lines.append("  " + describe_statistics(last["statistics"], str(last.get("kind"))))
    return "\n".join(lines)


def collection_status(ctx: "Context") -> Dict[str, object]:
    """The main chain's sets, and each part's (parts of this machine's current plan)."""
    url = backup_url(ctx.config)
    status: Dict[str, object] = {"chains": [], "orphaned_or_incomplete": False}
    status.update(host=backup_host(ctx.config), url=ctx.log.redact(url), parts=[])
    if not check_backup_there(ctx, url, needed=False):
        return status
    opts = duplicity_options(ctx.config, backup_encryption(ctx, "status"), default_archive_dir(), ctx.ssh_options(),
                             url)
    parts = read_parts_plan(var_dir(ctx.config) / PARTS_FILE).parts

    def read(chain_url: str, suffix: str) -> Dict[str, object]:
        output = run_checked(ctx, status_command(opts, chain_url, suffix), opts.crypt, "reading the collection status")
        return mark_incomplete(parse_collection_status("\n".join(output.lines)), chain_sets(ctx, chain_url))

    status.update(read(url, ""))
    status["parts"] = [dict(read(*part_chain(url, p)), path=p, url=ctx.log.redact(part_chain(url, p)[0]))
                       for p in parts]
    return status


def verify_backup(ctx: "Context", time_: Optional[str]) -> Tuple[int, int, List[str]]:
    """(files compared, differences, difference lines) of the backup against the live system:
    each chain of the backup as of time_ (its stored plan says which), with --compare-data
    always: without it duplicity 3 compares nothing at all (path.ROPath.compare_verbose
    returns "equal" at once), so a changed or missing file would pass."""
    config = ctx.config
    url = backup_url(config)
    check_backup_there(ctx, url)
    archive_dir = default_archive_dir()
    opts = duplicity_options(config, backup_encryption(ctx, "verify"), archive_dir, ctx.ssh_options(), url)
    time_ = checked_restore_time(ctx, url, [], time_, "verifying")
    with work_directory("rescue-verify-") as workdir:
        in_scope, excluded = mounts_to_back_up(ctx, saved_layout(config))
        selection = backup_selection(in_scope, excluded, config, own_paths(config, archive_dir, workdir))
        parts = stored_parts(ctx, opts, {}, workdir, time_, "verify")
        check_parts_complete(ctx, url, parts, time_)
        chains = backup_chains(url, selection, parts, {})

        def verify(chain: Chain) -> Tuple[int, int, List[str]]:
            args = verify_command(opts, chain.selection, chain.url, str(workdir), time_, chain.name_suffix)
            what = "Verify" if len(chains) == 1 else f"Verify of {chain.label}"
            returncode, output = duplicity_run(ctx, args, opts.crypt, what, shared_console=len(chains) > 1)
            match = VERIFY_RE.search("\n".join(output.lines))
            if match is None or returncode not in (0, 1):
                raise duplicity_failure(what[0].lower() + what[1:], returncode, output, ctx.log)
            differences = [line for line in output.lines if line.startswith("Difference found")]
            if chain.label != "main":        # duplicity names files relative to the chain's source
                prefix = "Difference found: File "
                base = chain.selection.source.strip("/")
                differences = [prefix + base + "/" + line[len(prefix):] if line.startswith(prefix) else line
                               for line in differences]
            kept = in_scope_differences(differences, selection.roots)
            return int(match.group(1)), int(match.group(2)) - (len(differences) - len(kept)), kept

        results = in_parallel(ctx.runner, [lambda c=c: verify(c) for c in chains], parallel_workers(config))
    return (sum(r[0] for r in results), sum(r[1] for r in results), [line for r in results for line in r[2]])


# =============================================================================================
# 16. finalize
#
# After the restore, make the restored system boot on the disks here: the names that changed
# rewritten in its configuration, the LVM devices file made anew, SELinux labels where they
# are missing, an initramfs for every installed kernel built on this hardware, and GRUB
# installed (BIOS) or the NVRAM entries made (UEFI), each with the system's own tools run
# through chroot. TreeProbe is the only reader of the restored tree; probe_restored and
# finalize_plan are pure (what the tree holds + options -> Steps); FINALIZE_ACTIONS do the
# steps that are more than one command.
# =============================================================================================

@dataclass(frozen=True)
class Family:
    """How one distribution family builds its initramfs and installs GRUB."""
    name: str
    initramfs: Tuple[str, ...]        # the initramfs tools, in order of preference
    initrd_name: str                  # the image's name in /boot, {kver} for the kernel version
    lister: str                       # lists an initramfs' files (the check after the rebuild)
    grub_install: str
    grub_mkconfig: Tuple[str, ...]    # in order of preference
    grub_cfg: str                     # where grub-mkconfig writes (BIOS, and UEFI with a stub)
    efi_grub_install: str             # always | without-shim | never (RHEL: shim is the chain)
    efi_ids: Tuple[str, ...]          # its directories in \EFI on the ESP


FAMILIES = {
    "debian": Family("debian", ("update-initramfs",), "initrd.img-{kver}", "lsinitramfs", "grub-install",
                     ("grub-mkconfig", "update-grub"), "/boot/grub/grub.cfg", "always", ("debian", "ubuntu")),
    "rhel": Family("rhel", ("dracut",), "initramfs-{kver}.img", "lsinitrd", "grub2-install", ("grub2-mkconfig",),
                   "/boot/grub2/grub.cfg", "never", ("redhat", "centos", "almalinux", "rocky", "fedora", "ol")),
    "suse": Family("suse", ("dracut", "mkinitrd"), "initrd-{kver}", "lsinitrd", "grub2-install", ("grub2-mkconfig",),
                   "/boot/grub2/grub.cfg", "without-shim", ("opensuse", "sles", "sle_hpc")),
}
# Files that name devices, UUIDs or by-id names (ESP paths are added below the ESP's mountpoint).
NAMING_FILES = ("/etc/fstab", "/etc/crypttab", "/etc/mdadm/mdadm.conf", "/etc/mdadm.conf", "/etc/default/grub",
                "/etc/kernel/cmdline", "/etc/initramfs-tools/conf.d/resume", "/boot/grub/grub.cfg",
                "/boot/grub2/grub.cfg", "/boot/grub/grubenv", "/boot/grub2/grubenv")
TREE_PROGRAM_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
TREE_PROGRAMS = ("update-initramfs", "dracut", "mkinitrd", "lsinitramfs", "lsinitrd", "grub-install", "grub2-install",
                 "grub-mkconfig", "grub2-mkconfig", "update-grub", "lvmdevices", "setfiles", "efibootmgr")
# Where a restored system names its NICs by MAC or name: (directory, file name prefix, suffixes).
# udev rules only those about network devices (SUBSYSTEM=="net").
NETWORK_FILE_DIRS = (("/etc/udev/rules.d", "", (".rules",)),
                     ("/etc/NetworkManager/system-connections", "", ()),
                     ("/etc/sysconfig/network-scripts", "ifcfg-", ()),          # RHEL
                     ("/etc/sysconfig/network", "ifcfg-", ()),                  # SUSE
                     ("/etc/netplan", "", (".yaml", ".yml")),
                     ("/etc/systemd/network", "", (".link", ".network", ".netdev")),
                     ("/etc/network/interfaces.d", "", ()))
NETWORK_FILES = ("/etc/network/interfaces",)
# Lines of network files whose values are secrets (Wi-Fi keys, 802.1x passwords): never logged.
SECRET_LINE = re.compile(r"^\s*[-+]?\s*[\w.-]*(psk|password|passwd|secret|wep-key\d?|pin)[\w.-]*\s*[=:]", re.I)
# Files whose security.selinux label says whether the restore kept labels.
LABEL_SAMPLES = ("/etc/passwd", "/etc/selinux/config", "/usr/bin/ls", "/usr/sbin/init", "/var/log")
BIND_MOUNTS = ("/proc", "/sys", "/dev", "/run")
EFIVARS = "/sys/firmware/efi/efivars"
REMOVABLE_LOADER = "EFI/BOOT/BOOTX64.EFI"
SHIM_LOADERS = ("shimx64.efi", "shim.efi")          # SUSE: shim.efi and grub.efi
GRUB_LOADERS = ("grubx64.efi", "grub.efi")
GRUBENV_SIZE = 1024


class TreeProbe:
    """Reads the restored tree at root, as the restored system will see it: absolute symlinks
    (/lib -> usr/lib, /boot/grub2/grubenv -> ../efi/EFI/redhat/grubenv) resolve inside root,
    never on the rescue system."""

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = os.path.abspath(str(root))

    def resolve(self, path: str) -> str:
        """path with every symlink resolved inside the tree (a path of the tree, /…)."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        done: List[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            here = os.path.join(self.root, *done, part)
            if os.path.islink(here) and hops < 40:
                hops += 1
                target = os.readlink(here)
                if target.startswith("/"):
                    done = []
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                continue
            done.append(part)
        return "/" + "/".join(done)

    def host_path(self, path: str) -> str:
        """Where the tree's path is on this system."""
        return os.path.join(self.root, self.resolve(path).lstrip("/"))

    def exists(self, path: str) -> bool:
        return os.path.exists(self.host_path(path))

    def is_file(self, path: str) -> bool:
        return os.path.isfile(self.host_path(path))

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(self.host_path(path))

    def read_text(self, path: str) -> Optional[str]:
        try:
            with open(self.host_path(path), encoding="utf-8", errors="surrogateescape") as stream:
                return stream.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def listdir(self, path: str) -> List[str]:
        try:
            return sorted(os.listdir(self.host_path(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def has_xattr(self, path: str, name: str) -> bool:
        try:
            return name in os.listxattr(self.host_path(path), follow_symlinks=False)
        except OSError:
            return False

    def which(self, program: str) -> Optional[str]:
        for directory in TREE_PROGRAM_DIRS:
            candidate = f"{directory}/{program}"
            if os.access(self.host_path(candidate), os.X_OK) and self.is_file(candidate):
                return candidate
        return None


@dataclass
class RestoredSystem:
    """What finalize needs to know about the restored system (probe_restored)."""
    family: str                                    # debian | rhel | suse | unknown
    os_release: Dict[str, str]
    kernels: List[str]                             # versions in /lib/modules with /boot/vmlinuz-…
    initrds: Dict[str, str]                        # kernel -> its initramfs now in /boot (if any)
    modules: Dict[str, List[str]]                  # kernel -> its loadable modules (modules.dep)
    builtin: Dict[str, List[str]]                  # kernel -> modules built into it
    texts: Dict[str, str]                          # file that may name devices -> its text
    lvm_devices: bool                              # /etc/lvm/devices/system.devices is there
    selinux: str                                   # enforcing | permissive | disabled | "" (none)
    file_contexts: str                             # of the configured policy ("" when absent)
    labels_present: bool                           # the restored files carry security.selinux
    esp_dir: str                                   # where the ESP is mounted ("" if none)
    efi_dirs: Dict[str, List[str]]                 # vendor directory in \EFI (not BOOT) -> its files
    removable: bool                                # \EFI\BOOT\BOOTX64.EFI is there
    grub_cfg: str                                  # the GRUB configuration grub-mkconfig writes
    tools: Dict[str, str]                          # program -> its path in the tree
    network_texts: Dict[str, str] = field(default_factory=dict)   # network configuration file -> its text


def probe_restored(probe: TreeProbe) -> RestoredSystem:
    os_release = parse_os_release(probe.read_text("/etc/os-release") or probe.read_text("/usr/lib/os-release") or "")
    tools = {name: path for name in TREE_PROGRAMS for path in [probe.which(name)] if path}
    family = distribution_family(os_release)
    if family not in FAMILIES:
        family = next((f.name for f in FAMILIES.values() if any(t in tools for t in f.initramfs)), "unknown")
    kernels = [k for k in probe.listdir("/lib/modules") if probe.is_file(f"/boot/vmlinuz-{k}")]
    esp_dir = esp_mountpoint(probe.read_text("/etc/fstab") or "") or next(
        (d for d in ("/boot/efi", "/efi") if probe.is_dir(f"{d}/EFI")), "")
    efi_dirs = {d: probe.listdir(f"{esp_dir}/EFI/{d}") for d in probe.listdir(f"{esp_dir}/EFI")
                if d.upper() != "BOOT"} if esp_dir else {}
    texts = {}
    for path in naming_files(probe, esp_dir, efi_dirs):
        text = probe.read_text(path)
        if text is not None:
            texts.setdefault(probe.resolve(path), text)
    selinux, policy = selinux_config(probe.read_text("/etc/selinux/config") or "")
    contexts = f"/etc/selinux/{policy}/contexts/files/file_contexts" if policy else ""
    return RestoredSystem(
        family=family, os_release=os_release, kernels=kernels,
        initrds={k: path for k in kernels for path in [existing_initrd(probe, k)] if path},
        modules={k: module_names(probe.read_text(f"/lib/modules/{k}/modules.dep") or "", ":") for k in kernels},
        builtin={k: module_names(probe.read_text(f"/lib/modules/{k}/modules.builtin") or "") for k in kernels},
        texts=texts, lvm_devices=probe.is_file("/etc/lvm/devices/system.devices"),
        selinux=selinux, file_contexts=contexts if contexts and probe.is_file(contexts) else "",
        labels_present=all(probe.has_xattr(p, "security.selinux") for p in LABEL_SAMPLES if probe.exists(p)),
        esp_dir=esp_dir, efi_dirs=efi_dirs,
        removable=bool(esp_dir) and probe.is_file(f"{esp_dir}/{REMOVABLE_LOADER}"),
        grub_cfg=system_grub_cfg(probe, family, esp_dir, efi_dirs), tools=tools,
        network_texts=network_texts(probe))


def network_texts(probe: TreeProbe) -> Dict[str, str]:
    """The restored network configuration (NETWORK_FILE_DIRS, NETWORK_FILES): path -> text."""
    paths = list(NETWORK_FILES)
    for directory, prefix, suffixes in NETWORK_FILE_DIRS:
        paths += [f"{directory}/{name}" for name in probe.listdir(directory)
                  if name.startswith(prefix) and (not suffixes or name.endswith(suffixes)) and not name.startswith(".")]
    out = {}
    for path in paths:
        text = probe.read_text(path) if probe.is_file(path) else None
        if text is not None and (not path.startswith("/etc/udev/") or re.search(r'SUBSYSTEM\s*==\s*"net"', text)):
            out.setdefault(probe.resolve(path), text)
    return out


def naming_files(probe: TreeProbe, esp_dir: str, efi_dirs: Sequence[str]) -> List[str]:
    entries = [f"/boot/loader/entries/{name}" for name in probe.listdir("/boot/loader/entries") if name.endswith(".conf")]
    on_esp = [f"{esp_dir}/EFI/{d}/{name}" for d in efi_dirs for name in ("grub.cfg", "grubenv")]
    return list(NAMING_FILES) + entries + on_esp


def esp_mountpoint(fstab: str) -> str:
    """The mountpoint of the vfat filesystem at /boot/efi or /efi in fstab ("" if none)."""
    for line in fstab.splitlines():
        cols = line.split()
        if len(cols) >= 3 and not cols[0].startswith("#") and cols[2] == "vfat" and cols[1] in ("/boot/efi", "/efi"):
            return cols[1]
    return ""


def selinux_config(text: str) -> Tuple[str, str]:
    """(SELINUX=, SELINUXTYPE=) of /etc/selinux/config; ("", "") without it."""
    values = dict(re.findall(r"^\s*(SELINUX|SELINUXTYPE)\s*=\s*(\S+)", text, re.M))
    return values.get("SELINUX", "").strip("'\"").lower(), values.get("SELINUXTYPE", "").strip("'\"")


def module_names(text: str, separator: str = "") -> List[str]:
    """Module names (dashes as underscores, as the kernel names them) of modules.dep lines
    ("kernel/…/dm-mod.ko.xz: deps") or modules.builtin lines."""
    names = set()
    for line in text.splitlines():
        path = line.split(separator, 1)[0] if separator else line
        match = re.search(r"([^/\s]+)\.ko(\.[a-z0-9]+)?$", path.strip())
        if match:
            names.add(match.group(1).replace("-", "_"))
    return sorted(names)


def existing_initrd(probe: TreeProbe, kernel: str) -> Optional[str]:
    for family in FAMILIES.values():
        path = "/boot/" + family.initrd_name.format(kver=kernel)
        if probe.is_file(path):
            return path
    return None


def system_grub_cfg(probe: TreeProbe, family: str, esp_dir: str, efi_dirs: Sequence[str]) -> str:
    """Where the system's GRUB reads its menu: on the ESP when the grub.cfg there is the whole
    menu (RHEL 8 on UEFI), else the family's path (the ESP holds a stub that points to it)."""
    for d in efi_dirs:
        text = probe.read_text(f"{esp_dir}/EFI/{d}/grub.cfg")
        if text and re.search(r"^\s*(menuentry|blscfg)\b", text, re.M):
            return f"{esp_dir}/EFI/{d}/grub.cfg"
    if family in FAMILIES:
        return FAMILIES[family].grub_cfg
    return "/boot/grub2/grub.cfg" if probe.exists("/boot/grub2") else "/boot/grub/grub.cfg"


@dataclass
class EspTarget:
    """One ESP that gets an NVRAM boot entry (every member of a RAID1 ESP is one)."""
    disk: str                                      # the disk here
    partition: int
    label: str                                     # the original entry's label
    loader: str = ""                               # \EFI\redhat\shimx64.efi ("": the system's own)


@dataclass
class FinalizeOptions:
    target_root: str = "/mnt/local"
    boot_mode: str = "bios"                        # bios | uefi (the layout's Boot.firmware)
    boot_disks: List[str] = field(default_factory=list)    # grub-install onto each (BIOS)
    esps: List[EspTarget] = field(default_factory=list)    # an efibootmgr entry for each (UEFI)
    changes: Dict[str, str] = field(default_factory=dict)  # old name -> new: /dev/sda1, UUIDs, by-id
    pvs: List[str] = field(default_factory=list)           # the recreated PVs (the LVM devices file)
    drivers: List[str] = field(default_factory=list)       # the storage drivers of the disks here
    rebuild_initramfs: bool = True                         # REBUILD_INITRAMFS
    selinux_relabel: str = "auto"                          # SELINUX_RELABEL: auto | yes | no
    nic_changes: Dict[str, str] = field(default_factory=dict)   # old MAC or NIC name -> new (nic_changes)


def finalize_plan(system: RestoredSystem, options: FinalizeOptions) -> List[Step]:
    """The finalize steps, in order: names rewritten (nothing bound yet), the bind mounts, the
    LVM devices file, the initramfs of each kernel and its check, the bootloader, the unbind,
    then the SELinux relabel (last, so that it also labels what the steps above wrote)."""
    family = FAMILIES.get(system.family)
    if family is None:
        raise RescueError(f"the restored system's distribution ({system.os_release.get('pretty_name') or 'no /etc/os-release'}) "
                          "is not one rescue can finalize", "finalize supports the Debian/Ubuntu, RHEL and SUSE families")
    root = options.target_root
    steps = rename_steps(system.texts, options.changes, root)
    steps += rename_steps(system.network_texts, options.nic_changes, root, kind="network")
    steps += bind_steps(root, options.boot_mode == "uefi")
    steps += lvm_devices_steps(system, options, root)
    if options.rebuild_initramfs:
        for kernel in system.kernels:
            steps += initramfs_steps(system, family, options, kernel)
    steps += bootloader_steps(system, family, options)
    unbound = [root + p for p in reversed(bind_points(options.boot_mode == "uefi"))]
    steps.append(Step("finalize unbind", f"Unmount the bind mounts below {root}", argv=["umount"] + unbound,
                      action="unbind", params={"paths": unbound}))
    steps += selinux_steps(system, options)
    return steps


def in_root(root: str, *argv: str) -> List[str]:
    return ["chroot", root] + list(argv)


def rename_steps(texts: Dict[str, str], changes: Dict[str, str], root: str, kind: str = "names") -> List[Step]:
    """One step per file that names something that changed (none when nothing changed).
    kind: names (devices, UUIDs) or network (NIC MACs and names: their diffs leave secrets out)."""
    steps = []
    what = "the NICs that changed" if kind == "network" else "the names that changed"
    for path, text in sorted(texts.items()):
        new = rewrite_file_text(path, text, changes) if changes else text
        if new != text:
            params = {"path": root + path, "changes": dict(changes), "before": text_digest(text), "after": text_digest(new)}
            if kind == "network":
                params["secrets"] = True
            steps.append(Step(f"finalize {kind} {path}", f"Rewrite {what} in {path}", action="rewrite_names",
                              params=params))
    return steps


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def bind_points(uefi: bool) -> List[str]:
    return list(BIND_MOUNTS) + ([EFIVARS] if uefi else [])


def bind_steps(root: str, uefi: bool) -> List[Step]:
    # argv: what the (idempotent) action amounts to, for --plan and --script.
    return [Step(f"finalize bind {path}", f"Bind {path} into {root}", argv=["mount", "--bind", path, root + path],
                 action="bind", params={"source": path, "path": root + path}) for path in bind_points(uefi)]


def lvm_devices_steps(system: RestoredSystem, options: FinalizeOptions, root: str) -> List[Step]:
    if not system.lvm_devices or not options.pvs:
        return []
    return [Step("finalize lvm devices file", "Write /etc/lvm/devices/system.devices anew with the recreated PVs",
                 action="lvm_devices", params={"root": root, "pvs": list(options.pvs)},
                 note="the old file names the old disks' IDs: LVM would ignore the new ones and the boot hang")]


def initramfs_steps(system: RestoredSystem, family: Family, options: FinalizeOptions, kernel: str) -> List[Step]:
    root = options.target_root
    tool = next((t for t in family.initramfs if t in system.tools), None)
    if tool is None:
        raise RescueError(f"the restored system has no {' or '.join(family.initramfs)} to build the initramfs of {kernel}",
                          "the backup lacks it; set REBUILD_INITRAMFS=no to boot with the restored initramfs "
                          "as it is (made for the old hardware)")
    image = system.initrds.get(kernel) or "/boot/" + family.initrd_name.format(kver=kernel)
    loadable = set(system.modules.get(kernel, [])) - set(system.builtin.get(kernel, []))
    drivers = [d for d in options.drivers if d.replace("-", "_") in loadable]
    if tool == "update-initramfs":
        argv = in_root(root, tool, "-u" if kernel in system.initrds else "-c", "-k", kernel)
    elif tool == "dracut":
        added = ["--add-drivers", " ".join(drivers)] if drivers else []
        argv = in_root(root, tool, "-f", *added, "--kver", kernel, image)
    else:
        argv = in_root(root, tool, "-k", f"/boot/vmlinuz-{kernel}", "-i", image)
    steps = [Step(f"finalize initramfs {kernel}", f"Build the initramfs of {kernel} for this hardware ({tool})",
                  argv=argv, note="the restored one is made for the old disks and controllers")]
    if family.lister in system.tools and drivers:
        steps.append(Step(f"finalize check initramfs {kernel}", f"Check that {image} holds the storage drivers",
                          argv=in_root(root, family.lister, image), action="check_initramfs",
                          params={"root": root, "image": image, "lister": family.lister, "drivers": drivers}))
    return steps


def bootloader_steps(system: RestoredSystem, family: Family, options: FinalizeOptions) -> List[Step]:
    root = options.target_root
    mkconfig = next((t for t in family.grub_mkconfig if t in system.tools), None)
    if family.grub_install not in system.tools and mkconfig is None:
        return []
    config = [] if mkconfig is None else [Step(
        "finalize grub config", f"Write the GRUB menu {system.grub_cfg}",
        argv=in_root(root, mkconfig) if mkconfig == "update-grub" else in_root(root, mkconfig, "-o", system.grub_cfg))]
    if options.boot_mode != "uefi":
        if family.grub_install not in system.tools:
            raise RescueError(f"the restored system has no {family.grub_install} to install GRUB with",
                              "the backup lacks GRUB's tools: restore them, or install the bootloader by hand")
        return bios_steps(family, options, root) + config
    return uefi_steps(system, family, options) + config + efi_entry_steps(system, options)


def bios_steps(family: Family, options: FinalizeOptions, root: str) -> List[Step]:
    if not options.boot_disks:
        raise RescueError("there is no disk to install GRUB on (the layout names none)",
                          "name them in GRUB2_INSTALL_DEVICES, e.g. GRUB2_INSTALL_DEVICES=\"/dev/sda /dev/sdb\"")
    return [Step(f"finalize grub-install {disk}", f"Install GRUB (BIOS) on {disk}",
                 argv=in_root(root, family.grub_install, "--target=i386-pc", disk)) for disk in options.boot_disks]


def vendor_dir(system: RestoredSystem, family: Family, options: FinalizeOptions) -> str:
    """The system's directory in \\EFI: that of the original boot entry's loader, else the
    family's, else the only one there."""
    for esp in options.esps:
        parts = [p for p in esp.loader.replace("\\", "/").split("/") if p]
        if len(parts) >= 3 and parts[0].upper() == "EFI" and parts[1].upper() != "BOOT":
            return parts[1]
    own = [d for d in system.efi_dirs if d.lower() in family.efi_ids]
    return (own or list(system.efi_dirs) or [family.efi_ids[0]])[0]


def efi_loaders(system: RestoredSystem, vendor: str) -> Tuple[str, str]:
    """(shim, GRUB) file names in the vendor directory ("" where there is none)."""
    files = {name.lower(): name for name in system.efi_dirs.get(vendor, [])}
    return (next((files[n] for n in SHIM_LOADERS if n in files), ""),
            next((files[n] for n in GRUB_LOADERS if n in files), ""))


def uefi_steps(system: RestoredSystem, family: Family, options: FinalizeOptions) -> List[Step]:
    """grub-install for EFI only where the distribution expects it; the loader checked; the
    removable path as a fallback."""
    root, esp = options.target_root, system.esp_dir or "/boot/efi"
    vendor = vendor_dir(system, family, options)
    shim, grub = efi_loaders(system, vendor)
    steps = []
    if family.grub_install in system.tools and (
            family.efi_grub_install == "always" or (family.efi_grub_install == "without-shim" and not shim)):
        grub = grub or GRUB_LOADERS[0]
        steps.append(Step("finalize grub-install efi", f"Install GRUB (UEFI) into {esp}/EFI/{vendor}",
                          argv=in_root(root, family.grub_install, "--target=x86_64-efi", f"--efi-directory={esp}",
                                       f"--bootloader-id={vendor}", "--no-nvram")))
    files = [shim, grub or GRUB_LOADERS[0]] if shim else [grub or GRUB_LOADERS[0]]
    steps.append(Step("finalize efi loader", f"Check the loader {esp}/EFI/{vendor}/{files[0]}", action="efi_loader",
                      params={"directory": f"{root}{esp}/EFI/{vendor}", "files": files},
                      note="the shim chain is kept as restored" if shim else ""))
    if not system.removable:
        steps.append(Step("finalize efi removable path", f"Copy the loader to the removable path {esp}/{REMOVABLE_LOADER}",
                          action="efi_fallback", params={"directory": f"{root}{esp}/EFI/{vendor}", "files": files,
                                                         "target": f"{root}{esp}/{REMOVABLE_LOADER}"},
                          note="firmware that lost its NVRAM entries still finds it"))
    return steps


def efi_entry_steps(system: RestoredSystem, options: FinalizeOptions) -> List[Step]:
    if not options.esps:
        return []
    vendor = vendor_dir(system, FAMILIES[system.family], options)
    shim, grub = efi_loaders(system, vendor)
    default = f"\\EFI\\{vendor}\\{shim or grub or GRUB_LOADERS[0]}"
    entries = [{"disk": e.disk, "partition": e.partition, "label": e.label, "loader": e.loader or default}
               for e in options.esps]
    return [Step("finalize efi boot entries", "NVRAM boot entries: " + ", ".join(
        f"{e['label']} on {e['disk']} partition {e['partition']}" for e in entries), action="efi_entries",
        params={"entries": entries, "efivars": EFIVARS}, note="entries of the same label are removed first")]


def selinux_steps(system: RestoredSystem, options: FinalizeOptions) -> List[Step]:
    """Relabel (setfiles) when SELinux is on and the restore did not keep the labels
    (SELINUX_RELABEL=auto), or always (yes); /.autorelabel as the backstop for the first boot."""
    root = options.target_root
    wanted = options.selinux_relabel == "yes" or (
        options.selinux_relabel == "auto" and system.selinux in ("enforcing", "permissive") and not system.labels_present)
    if not wanted or not system.selinux:
        return []
    steps = []
    if system.file_contexts:
        excluded = [a for path in ([system.esp_dir] if system.esp_dir else []) for a in ("-e", root + path)]
        steps.append(Step("finalize selinux relabel", f"Label the restored files for SELinux ({system.file_contexts})",
                          argv=["setfiles", "-m", "-r", root] + excluded + [root + system.file_contexts, root],
                          note="unlabeled files make an enforcing system unbootable"))
    steps.append(Step("finalize selinux autorelabel", "Ask for a relabel at the first boot (/.autorelabel)",
                      action="write_marker", params={"path": root + "/.autorelabel"}))
    return steps


# -- the rewrites ---------------------------------------------------------------------------------

def names_pattern(changes: Dict[str, str]) -> "re.Pattern[str]":
    """One pattern for all old names, the longest first, each a whole word (/dev/sda is not in
    /dev/sda1); a by-id or by-path disk name also matches as its partitions' prefix
    (…-part2); UUIDs and MAC addresses in either case."""
    alternatives = []
    for n, old in enumerate(sorted(changes, key=len, reverse=True)):
        escaped = re.escape(old)
        if re.fullmatch(r"[0-9A-Fa-f:-]+", old):                # UUIDs, MAC addresses
            escaped = f"(?i:{escaped})"
        suffix = r"(?:-part\d+)?" if old.startswith(("/dev/disk/by-id/", "/dev/disk/by-path/")) else ""
        alternatives.append(f"(?P<k{n}>{escaped}{suffix})")
    return re.compile(r"(?<![0-9A-Za-z_])(?:" + "|".join(alternatives) + r")(?![0-9A-Za-z_])")


def rewrite_names(text: str, changes: Dict[str, str]) -> str:
    """text with each old name replaced by its new one, in one pass (a swap of two names is
    a swap, not a chain); a hex name found in upper case (HWADDR=52:54:00:AB:…) is replaced in
    upper case."""
    if not changes:
        return text
    ordered = sorted(changes, key=len, reverse=True)
    lowered = {old.lower(): new for old, new in changes.items()}

    def replace(match: "re.Match[str]") -> str:
        found = match.group(0)
        old = ordered[int(match.lastgroup[1:])]
        new = changes.get(found) or lowered.get(found.lower())
        if new is None:
            return changes[old] + found[len(old):]    # …-partN of a by-id disk
        return new.upper() if re.fullmatch(r"[0-9A-F:-]*[A-F][0-9A-F:-]*", found) else new

    return names_pattern(changes).sub(replace, text)


def rewrite_file_text(path: str, text: str, changes: Dict[str, str]) -> str:
    """The file's new text; a grubenv stays a 1024-byte block padded with '#' (GRUB reads
    it as such: saved_entry and kernelopts stay where they are)."""
    if os.path.basename(path) != "grubenv":
        return rewrite_names(text, changes)
    content = text.rstrip("#")
    new = rewrite_names(content, changes)
    size = max(len(text.encode("utf-8", "surrogateescape")), GRUBENV_SIZE)
    padding = size - len(new.encode("utf-8", "surrogateescape"))
    if padding < 0:
        raise RescueError(f"{path}: with the new names it would not fit in GRUB's {size}-byte environment block",
                          "shorten kernelopts in it, or map to shorter names")
    return new + "#" * padding if new != content else text


def file_diff(path: str, old: str, new: str, secrets: bool = False) -> str:
    """A unified diff; secrets: of a file that may hold secrets (a Wi-Fi key): the changed
    lines only, a secret's value hidden."""
    lines = difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a{path}", f"b{path}", n=0 if secrets else 3)
    if secrets:
        lines = (re.sub(r"([=:]).*", r"\1(hidden)", line) if SECRET_LINE.match(line) else line for line in lines)
    return "".join(lines)


# -- the NICs: old -> new ---------------------------------------------------------------------------

MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class NicPair:
    """A NIC of the layout and the one here that takes its place (another MAC)."""
    old_name: str
    old_mac: str
    new_name: str                                  # "" when the mapping names a MAC no NIC here has
    new_mac: str
    how: str                                       # why these two


def parse_mac_mapping(text: str, source: str) -> Dict[str, str]:
    """ReaR's mappings/mac: `OLD-MAC NEW-MAC [INTERFACE]` per line, '#' comments -> old -> new."""
    out: Dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        macs = [w.lower() for w in words[:2]]
        if len(words) not in (2, 3) or not all(MAC_RE.fullmatch(m) for m in macs):
            raise RescueError(f"{source}:{n}: expected 'OLD-MAC NEW-MAC [INTERFACE]', got {line.strip()!r}",
                              "one NIC per line, e.g. 00:11:85:c2:b8:d5 00:50:56:b3:75:ad eth0")
        out[macs[0]] = macs[1]
    return out


def pair_nics(old: Sequence[Interface], here: Sequence[Interface],
              configured: Dict[str, str]) -> Tuple[List[NicPair], List[str]]:
    """Which NIC here takes the place of each NIC of the layout whose MAC is not here: the
    configured mapping (ReaR's mappings/mac), else the NIC of the same name, else the only one
    left when one is missing and one is new. NICs whose MAC is here are themselves (no pair).
    Returns the pairs and, for the NICs left without one, what to do about them."""
    mac = lambda nic: nic.mac.lower()                                      # noqa: E731
    by_mac = {mac(n): n for n in here if n.mac}
    ours = {mac(n) for n in old if n.mac}
    pairs: List[NicPair] = []
    missing = []
    for nic in (n for n in old if n.mac):
        if mac(nic) in configured:
            new = by_mac.get(configured[mac(nic)])
            pairs.append(NicPair(nic.name, mac(nic), new.name if new else "", configured[mac(nic)], "the mapping file"))
        elif mac(nic) not in by_mac:
            missing.append(nic)
    taken = set(configured.values()) | ours
    free = [n for n in here if n.mac and mac(n) not in taken]
    for nic in list(missing):
        same = next((n for n in free if n.name == nic.name), None)
        if same is not None:
            pairs.append(NicPair(nic.name, mac(nic), same.name, mac(same), "the same name"))
            missing.remove(nic)
            free.remove(same)
    if len(missing) == 1 and len(free) == 1:
        pairs.append(NicPair(missing[0].name, mac(missing[0]), free[0].name, mac(free[0]), "the only NIC missing and the only one new"))
        missing = []
    notes = [f"the NIC {n.name} ({mac(n)}) is not here and rescue cannot tell which NIC takes its place "
             f"({', '.join(f'{f.name} {mac(f)}' for f in free) or 'no NIC here is free'}): its configuration is left "
             "as restored; name the new MAC in the mappings/mac file of the configuration directory "
             "(OLD-MAC NEW-MAC per line) to have it moved" for n in missing]
    return pairs, notes


def nic_name_scheme(name: str) -> str:
    """kernel (eth0) or stable (enp1s0, ens3, eno1, em1, …): how names are given."""
    return "kernel" if re.fullmatch(r"eth\d+", name) else "stable"


def nic_changes(pairs: Sequence[NicPair]) -> Dict[str, str]:
    """The rewrites for the restored network configuration: each old MAC -> the new one, and
    the old name -> the new one where both are names of the same scheme (a rescue system that
    names NICs eth0 while the restored system names them enp1s0 says nothing about the name
    the restored system will give: its names are kept)."""
    out = {}
    for pair in pairs:
        if pair.new_mac != pair.old_mac:
            out[pair.old_mac] = pair.new_mac
        if pair.new_name and pair.new_name != pair.old_name and \
                nic_name_scheme(pair.new_name) == nic_name_scheme(pair.old_name):
            out[pair.old_name] = pair.new_name
    return out


# -- efibootmgr --------------------------------------------------------------------------------------

def efi_loader_of(path: str) -> str:
    """The loader of an `efibootmgr -v` device path: …/File(\\EFI\\redhat\\shimx64.efi) (before
    efibootmgr 18) or …/\\EFI\\redhat\\shimx64.efi (18 and later); "" when it names no file."""
    match = re.search(r"File\((\\[^)]*)\)", path) or re.search(r"\)/(\\[^\s]*\.[Ee][Ff][Ii])", path)
    return match.group(1) if match else ""


def efi_partition_uuid(path: str) -> str:
    """The GPT partition UUID of an `efibootmgr -v` device path (HD(1,GPT,<uuid>,…)), lower case."""
    match = re.search(r"HD\(\d+,GPT,([0-9A-Fa-f-]{36})", path)
    return match.group(1).lower() if match else ""


def stale_efi_entries(text: str, labels: Sequence[str]) -> List[str]:
    """The Boot#### numbers in `efibootmgr -v` output whose label is one of labels."""
    return [e["num"] for e in parse_efibootmgr(text) if e["label"] in labels]


# -- the actions -----------------------------------------------------------------------------------

def mounted_at(path: str) -> Optional[str]:
    """The source last mounted at path (from /proc/self/mounts), or None."""
    found = None
    with contextlib.suppress(OSError), open("/proc/self/mounts") as mounts:
        for line in mounts:
            cols = line.split()
            if len(cols) > 2 and cols[1].replace("\\040", " ") == path:
                found = cols[0]
    return found


def finalize_action_rewrite_names(ctx: Context, path: str, changes: Dict[str, str], before: str, after: str,
                                  secrets: bool = False) -> None:
    """Rewrite one file atomically, keeping its mode and owner; the diff goes to the log. A
    re-run finds it rewritten already and leaves it (a swap of two names stays a swap)."""
    target = Path(path)
    old = target.read_text(encoding="utf-8", errors="surrogateescape")
    if text_digest(old) == after:
        ctx.log.info(f"{path}: rewritten already")
        return
    if text_digest(old) != before:
        raise RescueError(f"{path} changed after finalize was planned",
                          "check the file; then run again with --restart to plan finalize anew")
    new = rewrite_file_text(path, old, changes)
    info = os.stat(path)
    with atomic_output(target, stat.S_IMODE(info.st_mode), owner=(info.st_uid, info.st_gid)) as stream:
        stream.write(new.encode("utf-8", "surrogateescape"))
    ctx.log.info(f"rewrote {path}:\n{file_diff(path, old, new, secrets)}")


def finalize_action_bind(ctx: Context, source: str, path: str) -> None:
    if mounted_at(path) is not None:
        ctx.log.info(f"{path} is mounted already")
        return
    if source == EFIVARS and not os.path.isdir(source):
        ctx.log.warn(f"this system was not booted by UEFI (no {EFIVARS}): the restored system's tools "
                     "run without the firmware's variables")
        return
    os.makedirs(path, exist_ok=True)
    ctx.runner.run(["mount", "--bind", source, path], timeout=60)


def finalize_action_unbind(ctx: Context, paths: Sequence[str]) -> None:
    """Unmount what finalize bound, in reverse order; a busy one lazily (it goes when the
    last process in the chroot ends)."""
    for path in paths:
        if mounted_at(path) is None:
            continue
        result = ctx.runner.run(["umount", path], check=False, timeout=60)
        if result.returncode != 0:
            ctx.log.warn(f"{path} is busy ({result.stderr.strip()[-200:]}); unmounting it lazily")
            ctx.runner.run(["umount", "-l", path], timeout=60)


def finalize_action_lvm_devices(ctx: Context, root: str, pvs: Sequence[str]) -> None:
    """The devices file with exactly the recreated PVs: the old one removed, each PV added by
    lvmdevices in the restored system (not vgimportdevices -a, which adds every VG it sees)."""
    path = Path(TreeProbe(root).host_path("/etc/lvm/devices/system.devices"))
    old = path.read_text(errors="replace") if path.is_file() else ""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    for pv in pvs:
        ctx.runner.run(in_root(root, "lvmdevices", "--adddev", pv), timeout=120)
    new = path.read_text(errors="replace") if path.is_file() else ""
    ctx.log.info(f"rewrote {path}:\n{file_diff(str(path), old, new)}")


def finalize_action_check_initramfs(ctx: Context, root: str, image: str, lister: str, drivers: Sequence[str]) -> None:
    result = ctx.runner.run(in_root(root, lister, image), check=False, timeout=600)
    if result.returncode != 0:
        raise CommandError(ctx.runner.command_line(in_root(root, lister, image), None), result.returncode, result.stderr)
    missing = initramfs_lacks(result.stdout, drivers)
    if missing:
        raise RescueError(f"the new initramfs {image} lacks the storage drivers {', '.join(missing)}: "
                          "the restored system would not find its disks",
                          "add them to the restored system's initramfs configuration (dracut: add_drivers+=\" … \" "
                          "in /etc/dracut.conf.d/; initramfs-tools: /etc/initramfs-tools/modules), then resume")
    ctx.log.info(f"{image} holds the storage drivers {', '.join(drivers)}")


def initramfs_lacks(listing: str, drivers: Sequence[str]) -> List[str]:
    """The drivers that a lsinitramfs / lsinitrd listing does not hold."""
    present = set(module_names("\n".join(word for line in listing.splitlines() for word in line.split())))
    return [d for d in drivers if d.replace("-", "_") not in present]


def finalize_action_efi_loader(ctx: Context, directory: str, files: Sequence[str]) -> None:
    missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise RescueError(f"the ESP lacks the boot loader: {', '.join(os.path.join(directory, m) for m in missing)}",
                          "the backup did not hold the ESP's files: restore them (or reinstall shim and GRUB's EFI "
                          "package in the restored system), then resume")


def finalize_action_efi_fallback(ctx: Context, directory: str, files: Sequence[str], target: str) -> None:
    """The loader at the removable path (shim loads grubx64.efi from its own directory)."""
    if os.path.isfile(target):
        return
    for n, name in enumerate(files):
        destination = target if n == 0 else os.path.join(os.path.dirname(target), name)
        write_file(Path(destination), Path(directory, name).read_bytes(), 0o700)
        ctx.log.info(f"copied {os.path.join(directory, name)} to {destination}")


def finalize_action_efi_entries(ctx: Context, entries: Sequence[Dict[str, object]], efivars: str = EFIVARS) -> None:
    """Remove the entries of the same labels, then make one per ESP (the last made comes first
    in BootOrder, so they are made in reverse). A rescue system booted by BIOS cannot: the
    machine then starts from the removable path."""
    if not os.path.isdir(efivars):
        ctx.log.warn(f"this system was not booted by UEFI (no {efivars}): no NVRAM boot entry is made; "
                     f"the firmware finds the loader at \\{REMOVABLE_LOADER.replace('/', chr(92))}, or add an entry "
                     "in its setup")
        return
    listing = ctx.runner.run(["efibootmgr", "-v"], timeout=60).stdout
    for number in stale_efi_entries(listing, sorted({str(e["label"]) for e in entries})):
        ctx.runner.run(["efibootmgr", "-q", "-b", number, "-B"], timeout=60)
    for entry in reversed(entries):
        ctx.runner.run(["efibootmgr", "-q", "-c", "-d", str(entry["disk"]), "-p", str(entry["partition"]),
                        "-L", str(entry["label"]), "-l", str(entry["loader"])], timeout=60)


def finalize_action_write_marker(ctx: Context, path: str) -> None:
    write_file(Path(path), "", 0o644)


FINALIZE_ACTIONS: Dict[str, Callable[..., None]] = {
    "rewrite_names": finalize_action_rewrite_names, "bind": finalize_action_bind, "unbind": finalize_action_unbind,
    "lvm_devices": finalize_action_lvm_devices, "check_initramfs": finalize_action_check_initramfs,
    "efi_loader": finalize_action_efi_loader, "efi_fallback": finalize_action_efi_fallback,
    "efi_entries": finalize_action_efi_entries, "write_marker": finalize_action_write_marker}


# -- from the layout -------------------------------------------------------------------------------

def finalize_options(layout: Layout, mapping: Mapping, config: Config, drivers: Sequence[str] = (),
                     changes: Optional[Dict[str, str]] = None, here: Sequence[DiskHere] = (),
                     nics: Optional[Dict[str, str]] = None) -> FinalizeOptions:
    """FinalizeOptions for a recovery of layout onto the disks of mapping: the boot disks
    (GRUB2_INSTALL_DEVICES, mapped as ReaR's MIGRATION_MODE does, else the disks GRUB was on,
    else those under /boot), each ESP (RAID1 members too) with its original entry's label and
    loader, the device and by-id names that changed (by-id: with here, the disks here), plus
    changes (e.g. UUIDs recreate could not keep); nics: the NIC rewrites (nic_changes)."""
    configured = config.setting("GRUB2_INSTALL_DEVICES")
    if configured:
        boot_disks = [mapping.new_name(d, layout) for d in configured]
    else:
        boot_disks = [mapping.new_name(d, layout) for d in layout.boot.grub_disks] or boot_disks_under(layout, mapping)
    renamed = {old: new for old, new in ((item, mapping.new_name(item, layout)) for item in
                                         [d.id for d in layout.disks] + [p.id for p in layout.partitions]) if old != new}
    return FinalizeOptions(
        target_root=config.setting("TARGET_FS_ROOT"), boot_mode=layout.boot.firmware, boot_disks=boot_disks,
        esps=esp_targets(layout, mapping), changes={**renamed, **by_id_changes(layout, mapping, here), **(changes or {})},
        pvs=[mapping.new_name(pv.device, layout) for pv in layout.physical_volumes],
        drivers=list(drivers), rebuild_initramfs=config.setting("REBUILD_INITRAMFS"),
        selinux_relabel=config.setting("SELINUX_RELABEL"), nic_changes=dict(nics or {}))


def by_id_changes(layout: Layout, mapping: Mapping, here: Sequence[DiskHere]) -> Dict[str, str]:
    """/dev/disk/by-id names of the layout's disks -> the name of the same kind (ata-, nvme-,
    wwn-, …) of the disk that takes its place (partitions follow as …-partN)."""
    by_path = {d.path: d for d in here}
    out = {}
    for disk in layout.disks:
        new = by_path.get(mapping.disks.get(disk.id, ""))
        for name in disk.by_id if new else []:
            kind = name.split("-", 1)[0]
            match = next((n for n in new.by_id if n.split("-", 1)[0] == kind), None)
            if match and match != name:
                out[f"/dev/disk/by-id/{name}"] = f"/dev/disk/by-id/{match}"
    return out


def storage_drivers(disks: Sequence[str], sys_root: str = "/sys") -> List[str]:
    """The drivers (as module names) of the disks here and the controllers above them, from
    sysfs: what the restored system's initramfs needs to find its disks (dracut --add-drivers
    and the check of the new initramfs)."""
    found = []
    devices = os.path.join(sys_root, "devices")
    for disk in disks:
        path = os.path.realpath(os.path.join(sys_root, "block", os.path.basename(os.path.realpath(disk)), "device"))
        while path.startswith(devices + "/"):
            driver = os.path.join(path, "driver")
            if os.path.islink(driver):
                module = os.path.join(driver, "module")
                found.append(os.path.basename(os.path.realpath(module if os.path.exists(module) else driver)).replace("-", "_"))
            path = os.path.dirname(path)
    return list(dict.fromkeys(found))


def partitions_under(device: str, layout: Layout) -> List[Partition]:
    """The partitions a device stands on (through RAID, LUKS and LVM)."""
    part = next((p for p in layout.partitions if p.id == device), None)
    if part is not None:
        return [part]
    below: List[str] = []
    for md in layout.md_arrays:
        below += md.devices if md.id == device else []
    below += [lk.device for lk in layout.luks if lk.id == device]
    for lv in layout.logical_volumes:
        if lv.id == device:
            below += [pv for vg in layout.volume_groups if vg.name == lv.vg for pv in vg.pvs]
    return [p for d in below for p in partitions_under(d, layout)]


def boot_disks_under(layout: Layout, mapping: Mapping) -> List[str]:
    mounts = {m.mountpoint: m.device for m in layout.mounts}
    device = mounts.get("/boot") or mounts.get("/")
    disks = [p.disk for p in partitions_under(device, layout)] if device else []
    return [mapping.new_name(d, layout) for d in dict.fromkeys(disks)]


def esp_targets(layout: Layout, mapping: Mapping) -> List[EspTarget]:
    if layout.boot.firmware != "uefi" or not layout.boot.esp:
        return []
    mount = next((m for m in layout.mounts if m.mountpoint in ("/boot/efi", "/efi")), None)
    parts = partitions_under(mount.device, layout) if mount else []
    parts = parts or [p for p in layout.partitions if p.id == layout.boot.esp]
    entries = [e for e in layout.boot.efi_entries if efi_loader_of(e.get("path", ""))]
    family = FAMILIES.get(layout.boot.family)
    own_ids = set(family.efi_ids if family else ()) | {layout.boot.distribution.get("id", "")}
    # The system's own entry: its loader in the distribution's \EFI directory (not Windows', not \EFI\BOOT).
    own = next((e for e in entries if efi_loader_of(e["path"]).split("\\")[2:3] and
                efi_loader_of(e["path"]).split("\\")[2].lower() in own_ids), None)
    out = []
    for part in parts:
        entry = next((e for e in entries if part.uuid and efi_partition_uuid(e["path"]) == part.uuid.lower()), own)
        label = entry["label"] if entry else (layout.boot.distribution.get("id") or "Linux")
        out.append(EspTarget(mapping.new_name(part.disk, layout), part.number, label,
                             efi_loader_of(entry["path"]) if entry else ""))
    return out


# =============================================================================================
# 17. recreate: execute
#
# One short loop runs a plan's steps through the Runner, each timed and logged, and journals
# each finished step (VAR_DIR/recreate.json: the layout's digest, the mapping with each disk's
# identity, the plan, the steps done), so that a re-run after a failure or a kill checks that
# the disks are the same and resumes at the step that did not finish. Before the first step:
# the programs the plan needs, the one confirmation, the passphrases.
# =============================================================================================

RECREATE_STATE = "recreate.json"
WAIT_SECONDS = 60.0


@dataclass
class RecreateState:
    layout_digest: str
    mapping: Dict[str, Dict[str, object]]      # layout disk -> the identity of the disk here
    plan: Dict[str, object]                    # plan_json's content
    done: List[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"


def read_recreate_state(path: Path) -> Optional[RecreateState]:
    try:
        data = json.loads(path.read_text())
        state = RecreateState(str(data["layout_digest"]), dict(data["mapping"]), dict(data["plan"]),
                              [str(s) for s in data.get("done", [])])
        [Step(**step) for step in state.plan["steps"]]
        return state
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RescueError(f"cannot read the journal of an earlier layoutonly ({path}): {exc}",
                          "start over with --restart (the disks are planned and confirmed anew)") from None


def plan_from_state(state: RecreateState) -> List[Step]:
    return [Step(**step) for step in state.plan["steps"]]


def programs_needed(steps: Sequence[Step]) -> List[str]:
    names = {s.argv[0] for s in steps if s.argv}
    names |= {"mount", "mkdir"} if any(s.action == "mount" for s in steps) else set()
    names |= {"partx"} if any(s.action == "partitions" for s in steps) else set()
    return sorted(names)


def check_programs(steps: Sequence[Step]) -> None:
    missing = [p for p in programs_needed(steps) if not shutil_which(p)]
    if missing:
        errors = [missing_program(p) for p in missing]
        raise RescueError(f"this system lacks what the layout needs: {', '.join(missing)}",
                          "; ".join(e.hint for e in errors) + " (or use rescue media made on the original machine)")


def confirm(ctx: Context, question: str, preset: str) -> bool:
    """yes or no, asked once: --yes or a preset answer from the configuration say yes; "no",
    anything else, a timeout (USER_INPUT_TIMEOUT) and the end of input say no."""
    if ctx.args.yes:
        ctx.log.say(f"{question} yes (--yes)")
        return True
    if preset:
        ctx.log.say(f"{question} {preset} (preset by the configuration)")
        return preset.lower() in TRUE_WORDS
    if ctx.args.non_interactive:
        ctx.log.say(f"{question} no (--non-interactive without --yes)")
        return False
    timeout = ctx.config.setting("USER_INPUT_TIMEOUT")
    answer = ask_line(f"{question} [yes/no, no after {timeout:g} secs]: ", timeout)
    ctx.log.info(f"answer: {answer!r}")
    return (answer or "").strip().lower() in ("y", "yes")


def luks_secrets(ctx: Context, secrets: Sequence[Tuple[str, str]], new: bool = True) -> Dict[str, str]:
    """The passphrase of each (new) LUKS device: LUKS_KEY_FILE's content (one trailing newline
    taken off, as cryptsetup does with a typed one), else typed at the prompt (twice if new)."""
    out: Dict[str, str] = {}
    if not secrets:
        return out
    key_file = ctx.config.setting("LUKS_KEY_FILE")
    if key_file:
        try:
            text = Path(key_file).read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            raise RescueError(f"cannot read LUKS_KEY_FILE {key_file}: {exc.strerror}",
                              "give a readable file, or leave LUKS_KEY_FILE empty to type the passphrase") from None
        value = text[:-1] if text.endswith("\n") else text
        if not value:
            raise RescueError(f"LUKS_KEY_FILE {key_file} is empty", "write the passphrase into it")
        out = {name: value for name, _ in secrets}
    elif ctx.args.non_interactive:
        raise RescueError("a passphrase is needed for " + ", ".join(what for _, what in secrets)
                          + ", and --non-interactive forbids asking", "set LUKS_KEY_FILE to a file that holds it")
    else:
        timeout = ctx.config.setting("USER_INPUT_TIMEOUT")
        for name, what in secrets:
            first = ask_secret(f"{'New passphrase' if new else 'Passphrase'} for {what} [{timeout:g} secs]: ", timeout)
            if not first or (new and ask_secret("The same passphrase again: ", timeout) != first):
                raise RescueError(f"no passphrase for {what}, or the two differed", "run again (nothing was touched)")
            out[name] = first
    for value in out.values():
        ctx.log.add_secret(value)
    return out


def run_plan_steps(ctx: Context, steps: Sequence[Step], state: RecreateState, state_path: Path,
                   secrets: Dict[str, str], resume_command: str) -> None:
    run_journaled(ctx, steps, state.done, lambda: write_file(state_path, state.to_json()), secrets, resume_command)


def run_journaled(ctx: Context, steps: Sequence[Step], done: List[str], save: Callable[[], None],
                  secrets: Dict[str, str], resume_command: str, again: Sequence[str] = ()) -> None:
    """Run the steps not in done, each timed and logged, appending each to done and saving
    the journal after it; actions named in again run even when done (a bind mount does not
    outlive a reboot of the rescue system)."""
    total = len(steps)
    todo = {step.id for step in steps_to_run(steps, done)} | {s.id for s in steps if s.action in again}
    for n, step in enumerate(steps, 1):
        if step.id not in todo:
            continue
        ctx.log.say(f"[{n}/{total}] {step.title}")
        started = time.monotonic()
        try:
            run_step(ctx, step, secrets)
        except RescueError as exc:
            raise RescueError(f"step {n}/{total} failed: {step.title}: {exc.message}",
                              f"the command: {step_command(step)}\n{exc.hint}\n"
                              f"fix the cause, then resume with: {resume_command}") from None
        ctx.log.info(f"step {n} done in {time.monotonic() - started:.1f} s")
        if step.id not in done:
            done.append(step.id)
        save()


def run_step(ctx: Context, step: Step, secrets: Dict[str, str]) -> None:
    if step.action:
        STEP_ACTIONS[step.action](ctx, **step.params, **({"secret": secrets[step.secret]} if step.secret else {}))
        return
    given = secrets[step.secret] if step.secret else (step.input or None)
    result = ctx.runner.run(step.argv, input=given, env=step.env or None, check=False, timeout=3600)
    if result.returncode != 0 and step.fallback:
        ctx.log.warn(f"{step.argv[0]} refused the original options ({(result.stderr or result.stdout).strip()[-200:]}); "
                     "making it with its defaults (UUID and label kept)")
        result = ctx.runner.run(step.fallback, input=given, env=step.env or None, check=False, timeout=3600)
    if result.returncode != 0 and step.optional:
        ctx.log.info(f"{step.title}: nothing to do ({(result.stderr or result.stdout).strip()[-200:]})")
    elif result.returncode != 0:
        raise CommandError(ctx.runner.command_line(step.fallback or step.argv, step.env), result.returncode,
                           ctx.log.redact(result.stderr or result.stdout))


def is_partition_of(path: str, disk: str, number: int) -> bool:
    """Whether the kernel shows path as partition `number` of disk (sysfs, not names)."""
    try:
        if not stat.S_ISBLK(os.stat(path).st_mode):
            return False
        sysfs = Path("/sys/class/block") / os.path.basename(os.path.realpath(path))
        parent = os.path.basename(os.path.realpath(str(sysfs / "..")))
        return (sysfs / "partition").read_text().strip() == str(number) and \
            parent == os.path.basename(os.path.realpath(disk))
    except OSError:
        return False


def action_partitions(ctx: Context, disk: str, partitions: Sequence[Sequence[object]]) -> None:
    """Poll until every partition is there as the kernel names it (udevadm settle only waits
    for events already queued: ReaR #791); ask the kernel to re-read with partx meanwhile."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        missing = [str(path) for number, path in partitions if not is_partition_of(str(path), disk, int(number))]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RescueError(f"the kernel does not show {', '.join(missing)} as partitions of {disk} "
                              f"after {WAIT_SECONDS:g} s", "check dmesg; another program may hold the disk")
        for argv in (["partx", "-a", disk], ["partx", "-u", disk]):
            ctx.runner.run(argv, check=False, timeout=60)
        ctx.runner.wait(0.2)


def action_devices(ctx: Context, devices: Sequence[str]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        missing = [d for d in devices if not (os.path.exists(d) and stat.S_ISBLK(os.stat(d).st_mode))]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RescueError(f"{', '.join(missing)} did not appear within {WAIT_SECONDS:g} s", "check dmesg")
        ctx.runner.wait(0.2)


def action_mount(ctx: Context, device: str, path: str, type: str, options: str) -> None:
    """Mount device at path unless it is mounted there already (a re-run); with the original
    options, or with none when the kernel refuses one of them."""
    source = mounted_at(path)
    if source and os.path.realpath(source) == os.path.realpath(device):
        ctx.log.info(f"{device} is mounted at {path} already")
        return
    device = resolve_uuid(ctx, device)
    os.makedirs(path, exist_ok=True)
    argv = ["mount", "-t", type] + (["-o", options] if options else []) + [device, path]
    result = ctx.runner.run(argv, check=False, timeout=600)
    if result.returncode != 0 and options:
        ctx.log.warn(f"mounting {device} with {options} failed ({result.stderr.strip()[-200:]}); trying without them")
        result = ctx.runner.run(["mount", "-t", type, device, path], check=False, timeout=600)
    if result.returncode != 0:
        raise CommandError(ctx.runner.command_line(argv, None), result.returncode, result.stderr)


# -- the layout a recovery starts from, and the disks here ----------------------------------------

FETCHED_LAYOUT = "layout-from-backup"


def recovery_layout(ctx: Context) -> Tuple[Layout, Path]:
    """--layout FILE, else the rescue system's own copy, else the one stored beside the backup
    (fetched as of --restore-time); says which. Returns the layout and its file."""
    args, config = ctx.args, ctx.config
    if args.layout:
        path, source = Path(args.layout), "given with --layout"
    elif (layout_dir(config) / "layout.json").is_file():
        path, source = layout_dir(config) / "layout.json", "the rescue system's copy"
    else:
        fetched = var_dir(config) / FETCHED_LAYOUT
        if not (fetched / "layout" / "layout.json").is_file():
            ctx.log.say("No layout here: fetching the one stored beside the backup")
            shutil.rmtree(str(fetched), ignore_errors=True)
            fetch_layout(ctx, fetched, restore_time(config, getattr(args, "restore_time", None)))
        path, source = fetched / "layout" / "layout.json", "stored beside the backup"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RescueError(f"cannot read the layout {path}: {getattr(exc, 'strerror', None) or exc}",
                          "give a layout.json made by rescue savelayout (--layout FILE)") from None
    layout = layout_from_json(text, str(path))
    ctx.log.say(f"Using the layout of {layout.hostname} in {path} ({source})")
    return layout, path


def vgcfg_files(layout: Layout, layout_file: Path) -> Dict[str, Tuple[str, str]]:
    """The vgcfgbackup file of each VG, from lvm/ beside layout.json (VG -> (path, text))."""
    out = {}
    for vg in layout.volume_groups:
        path = layout_file.parent / "lvm" / f"{vg.name}.vgcfg"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            out[vg.name] = (str(path), path.read_text())
    return out


def probe_disks_here(probe: Probe, config: Config, own_root: Optional[str] = None,
                     backup_fs: Optional[BackupFilesystem] = None) -> List[DiskHere]:
    """The disks here, from the same questions savelayout asks (so its recording can answer).
    Mounts below own_root (the tree an earlier run mounted) do not make a disk busy; the disk
    of backup_fs (found by its UUID, by blkid where udev has not told lsblk) is the backup's."""
    nodes = parse_lsblk(probe_output(probe, ["lsblk", "-J", "-b", "-p", "-o", LSBLK_COLUMNS], True))
    fill_serials(nodes, probe.read_text_optional)
    if backup_fs and not any(n.uuid == backup_fs.uuid for n in nodes.values()):
        for path in (probe_output(probe, ["blkid", "-U", backup_fs.uuid]) or "").split():
            if path in nodes:
                nodes[path].uuid = backup_fs.uuid
    mounts = parse_findmnt(probe_output(probe, ["findmnt", "-J", "-l", "-b", "-o", FINDMNT_COLUMNS], True))
    if own_root:
        mounts = [m for m in mounts if not path_within(str(m.get("target")), own_root)]
    swaps = parse_proc_swaps(probe.read_text("/proc/swaps") or "")
    vg_of_pv: Dict[str, str] = {}
    if probe.which("lvm"):
        report = probe_output(probe, ["lvm", "pvs", *LVM_REPORT, "-o", PV_FIELDS]) or '{"report": []}'
        vg_of_pv = {r["pv_name"]: r["vg_name"] for r in parse_lvm_report(report, "pv") if r.get("vg_name")}
    return disks_here(nodes, mounts, swaps, probe.links("/dev/disk/by-id"), vg_of_pv,
                      url_path(config.setting("BACKUP_DUPLICITY_URL")), backup_fs)


def explicit_mapping(ctx: Context) -> Dict[str, str]:
    """ReaR's mapping file (CONFIG_DIR/mappings/disk_mappings), then each --map OLD=NEW."""
    out: Dict[str, str] = {}
    path = config_directory(ctx.args.config_dir) / "mappings" / "disk_mappings"
    if path.is_file():
        out.update(parse_mapping_file(path.read_text(errors="replace"), str(path)))
        ctx.log.say(f"Using the disk mapping in {path}")
    for item in ctx.args.map:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise ConfigError(f"--map {item}: expected OLD=NEW", "e.g. --map /dev/sda=/dev/nvme0n1")
        out[old] = new
    return out


def recreate_options(config: Config, layout: Layout, layout_file: Path) -> RecreateOptions:
    resize = config.setting("AUTORESIZE_PARTITIONS")
    return RecreateOptions(config.setting("TARGET_FS_ROOT"),
                           not (resize and resize[0].lower() in FALSE_WORDS - {""}),
                           config.setting("AUTORESIZE_LV"), vgcfg_files(layout, layout_file))


def check_same_disks(state: RecreateState, here: Sequence[DiskHere]) -> None:
    """A resumed run goes on only on the disks the interrupted one was confirmed for."""
    by_path = {d.path: d for d in here}
    for old, identity in state.mapping.items():
        disk = by_path.get(str(identity["path"]))
        if disk is None or disk.identity() != identity:
            raise RescueError(f"the disk that was to take the place of {old} ({identity['path']}) is not here "
                              "as it was when the interrupted run started",
                              "start over with --restart (the disks are planned and confirmed anew)")
        if disk.in_use:
            raise RescueError(f"{disk.path} cannot be used: {disk.in_use}", "unmount it, then resume")


def recreate(ctx: Context, resume_command: str, chosen: Optional[Tuple[Layout, Path]] = None,
             later: Sequence[str] = ()) -> Optional[RecreateState]:
    """layoutonly's work, also recover's first part: plan (or resume), show, confirm, run.
    None when it only showed the plan (and what comes after it: later). recover (chosen: the
    layout it found) holds the lock for its whole run."""
    args, config = ctx.args, ctx.config
    layout, layout_file = chosen or recovery_layout(ctx)
    digest = layout_digest(json.loads(layout_to_json(layout)))
    reviewing = args.plan or args.script or args.json
    probe = Probe(replay_dir=Path(args.replay)) if args.replay else Probe(ctx.runner)
    if args.replay and not reviewing:
        raise ConfigError("--replay makes a plan to review only", "add --plan, --script FILE or --json")
    if not reviewing:
        require_root("layoutonly")
    state_path = var_dir(config) / RECREATE_STATE
    state = None if (reviewing or args.restart) else read_recreate_state(state_path)
    if state is not None and state.layout_digest != digest:
        raise RescueError(f"{state_path} is the journal of a run with another layout",
                          "start over with --restart (the disks are planned and confirmed anew)")
    if state is not None:
        steps = plan_from_state(state)
        left = [s for s in steps if s.id not in state.done]
        if not left:
            ctx.log.say(f"Nothing to do: the storage of {layout.hostname} was recreated already (journal "
                        f"{state_path}); --restart does it again")
            return state
        check_same_disks(state, probe_disks_here(probe, config, config.setting("TARGET_FS_ROOT"),
                                                 layout.backup_filesystem))
        ctx.log.say(f"Resuming the interrupted run at step {len(steps) - len(left) + 1} of {len(steps)}: {left[0].title}")
        check_programs(left)
        secrets = luks_secrets(ctx, [(str(name), str(what)) for name, what in state.plan["secrets_asked"]
                                     if any(x.secret == name for x in left)])
        with (contextlib.nullcontext() if chosen else Lock(Path(config.setting("LOCKFILE")), "layoutonly")):
            run_plan_steps(ctx, steps, state, state_path, secrets, resume_command)
        return state
    here = probe_disks_here(probe, config, backup_fs=layout.backup_filesystem)
    mapping = map_disks(layout, here, explicit_mapping(ctx))
    plan = recreate_plan(layout, here, mapping, recreate_options(config, layout, layout_file))
    if reviewing:
        show_plan(ctx, plan, layout, here, later)
        return None
    check_programs(plan.steps)
    for line in describe_plan(plan, layout, here).split("\n\nSteps")[0].splitlines():
        ctx.log.say(line)
    preset = "" if mapping.guessed else config.setting("USER_INPUT_WIPE_DISKS_CONFIRMATION")
    if mapping.guessed:
        ctx.log.say("The mapping chose between disks of the same size by the rules above: check it.")
    if not confirm(ctx, f"Wipe {', '.join(plan.wipe) or 'no disk'} and recreate the storage of {layout.hostname}?", preset):
        raise RescueError("not confirmed: nothing was touched", "run again and answer yes, or give --map OLD=NEW")
    secrets = luks_secrets(ctx, plan.secrets)
    by_path = {d.path: d for d in here}
    state = RecreateState(digest, {old: by_path[new].identity() for old, new in mapping.disks.items()},
                          dict(json.loads(plan_json(plan, layout)), secrets_asked=[list(x) for x in plan.secrets]))
    with (contextlib.nullcontext() if chosen else Lock(Path(config.setting("LOCKFILE")), "layoutonly")):
        write_file(state_path, state.to_json())
        run_plan_steps(ctx, plan.steps, state, state_path, secrets, resume_command)
    return state


def show_plan(ctx: Context, plan: Plan, layout: Layout, here: Sequence[DiskHere], later: Sequence[str] = ()) -> None:
    """--plan, --script FILE, --json: the plan to review (and what comes after it); nothing is touched."""
    if ctx.args.script:
        write_file(Path(ctx.args.script), plan_script(plan, layout, here)
                   + "".join(f"\n# then (rescue recover): {what}" for what in later) + ("\n" if later else ""), 0o700)
        ctx.log.say(f"Wrote the plan as a script to {ctx.args.script} (nothing was run)")
    if ctx.args.json:
        print(json.dumps(dict(json.loads(plan_json(plan, layout)), then=list(later)), indent=2))
    elif ctx.args.plan:
        then = "\n\nThen:" + "".join(f"\n  - {what}" for what in later) if later else ""
        print(describe_plan(plan, layout, here) + then)


def device_with_uuid(ctx: Context, uuid: str) -> Optional[str]:
    """The device whose filesystem (or LUKS header, md superblock) has this UUID, by blkid."""
    result = ctx.runner.run(["blkid", "-U", uuid], check=False, timeout=120)
    found = result.stdout.strip().splitlines()
    return found[0] if result.returncode == 0 and found else None


def resolve_uuid(ctx: Context, device: str) -> str:
    """A device given as UUID=… (mountonly: names may have changed, UUIDs may not)."""
    if not device.startswith("UUID="):
        return device
    uuid = device[len("UUID="):]
    found = device_with_uuid(ctx, uuid)
    if found is None:
        raise RescueError(f"nothing here has the UUID {uuid} that the layout names",
                          "mountonly mounts storage recover recreated (the same UUIDs); check with blkid")
    return found


def action_open_luks(ctx: Context, uuid: str, name: str, secret: str) -> None:
    if os.path.exists(f"/dev/mapper/{name}"):
        ctx.log.info(f"{name} is open already")
        return
    device = resolve_uuid(ctx, f"UUID={uuid}")
    ctx.runner.run(["cryptsetup", "open", "--key-file=-", device, name], input=secret, env=dict(NO_UDEV_ENV),
                   timeout=600)


STEP_ACTIONS: Dict[str, Callable[..., None]] = {
    "partitions": action_partitions, "devices": action_devices, "mount": action_mount,
    "open_luks": action_open_luks, **FINALIZE_ACTIONS}


# =============================================================================================
# 18. recover
#
# rescue recover = the layout → the mapping and the one confirmation → recreate (section 17's
# journaled plan) → restore into TARGET_FS_ROOT → finalize → a report in the recovered system.
# Before any disk is touched the backup is checked: reachable, and decryptable with the
# passphrase given (a wrong one is asked again, then a clear stop). recover's own journal
# (VAR_DIR/recover.json) records the phases done, so a re-run goes on where a failure or a kill
# stopped it: a restore that did not finish is started again on emptied filesystems, which this
# recover made (the recreate journal says so), never on anything else.
# =============================================================================================

RECOVER_STATE = "recover.json"
PASSPHRASE_TRIES = 3


@dataclass
class RecoverState:
    layout_digest: str
    restore_time: Optional[str]
    restore: str = ""                          # "" | "started" | "done"
    finalized: List[str] = field(default_factory=list)   # finalize steps done
    reported: bool = False
    timings: Dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"


def read_recover_state(path: Path) -> Optional[RecoverState]:
    try:
        data = json.loads(path.read_text())
        return RecoverState(str(data["layout_digest"]), data.get("restore_time"), str(data.get("restore", "")),
                            [str(s) for s in data.get("finalized", [])],
                            bool(data.get("reported")), {str(k): float(v) for k, v in data.get("timings", {}).items()})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RescueError(f"cannot read the journal of an earlier recover ({path}): {exc}",
                          "start over with --restart (the disks are planned and confirmed anew)") from None


def check_backup_readable(ctx: Context, time_: Optional[str]) -> None:
    """The backup is there and the passphrase opens it (by fetching its small layout chain),
    before anything is wiped. A typed passphrase that does not open it is asked again."""
    if ctx.backup_opened:
        ctx.log.say("The backup is there and the passphrase opens it (the layout came from it)")
        return
    url = backup_url(ctx.config)
    check_backup_there(ctx, url)
    for attempt in range(1, PASSPHRASE_TRIES + 1):
        crypt = backup_encryption(ctx, "restore")
        with private_gnupg_home(ctx.runner, crypt) as home, work_directory("rescue-check-") as work:
            opts = duplicity_options(ctx.config, crypt, str(work / "archive"), ctx.ssh_options(), url)
            returncode, output = restore_layout_chain(ctx, opts, home, work, work / "layout", time_)
        if returncode == 0:
            ctx.log.say("The backup is there and the passphrase opens it")
            return
        text = "\n".join(output.lines)
        if any(m in text for m in NO_CHAIN_MESSAGES):
            ctx.log.say("No layout chain beside the backup (made by ReaR?): the passphrase is checked by the restore")
            return
        found = diagnose(text)
        if found and "passphrase" in found[0] and ctx.typed.pop("restore", None) is not None \
                and attempt < PASSPHRASE_TRIES:
            ctx.log.say("That passphrase does not open the backup; try again")
            continue
        raise duplicity_failure("opening the backup (before any disk is touched)", returncode, output, ctx.log)


def reach_backup_filesystem(ctx: Context, layout: Layout) -> None:
    """A file:// backup on a disk of its own (USB, a second disk) is not mounted in a rescue
    system: mount the filesystem the layout recorded for it, found by its UUID, read-only
    where it was. Nothing is done when something is mounted there (or at the backup's
    directory) already, or when the layout records no such filesystem."""
    fs = layout.backup_filesystem
    place = url_path(ctx.config.setting("BACKUP_DUPLICITY_URL"))
    if fs is None or place is None or not path_within(place, fs.mountpoint):
        return
    here = Path(place)
    for directory in [here] + [p for p in here.parents if path_within(str(p), fs.mountpoint)]:
        if os.path.ismount(str(directory)):
            return
    device = device_with_uuid(ctx, fs.uuid)
    label = f" (label {fs.label})" if fs.label else ""
    if not device:
        raise RescueError(f"the backup is on the {fs.fstype} filesystem UUID={fs.uuid}{label}, which was mounted "
                          f"at {fs.mountpoint} when the layout was saved, and no disk here has it",
                          f"attach the disk that holds the backup (or mount the backup at {fs.mountpoint}) "
                          "and run again: no disk was touched")
    Path(fs.mountpoint).mkdir(parents=True, exist_ok=True)
    ctx.runner.run(["mount", "-o", "ro", "-t", fs.fstype, device, fs.mountpoint], timeout=300)
    ctx.log.say(f"Mounted the backup's filesystem {device}{label} read-only at {fs.mountpoint}")


def empty_restored_tree(target: Path, mountpoints: Sequence[str]) -> int:
    """Remove what an interrupted restore wrote, keeping the mountpoints (and lost+found at
    each filesystem's root) and the parts it restored completely (at a filesystem's root,
    with their PART_DONE record); returns the entries removed."""
    removed = 0
    mounts = set(mountpoints) | {str(target)}
    for entry in os.scandir(str(target)):
        holds_mount = any(path_within(m, entry.path) for m in mounts)
        if entry.name == "lost+found" and str(target) in mounts:
            continue
        if str(target) in mounts and finished_part(entry.path):
            continue              # a part restored completely: the restore takes it (RestoreRun)
        if holds_mount and entry.is_dir(follow_symlinks=False):
            removed += empty_restored_tree(Path(entry.path), mountpoints)
        elif entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
            removed += 1
        else:
            os.unlink(entry.path)
            removed += 1
    return removed


def restore_phase(ctx: Context, state: RecoverState, state_path: Path, root: Path) -> None:
    if state.restore == "done":
        ctx.log.say(f"The restore into {root} is done already (journal {state_path})")
        return
    if state.restore == "started":
        mounts = [str(m["target"]) for m in mounted_now(ctx.runner) if path_within(str(m["target"]), str(root))]
        removed = empty_restored_tree(root, mounts)
        ctx.log.say(f"The interrupted restore is started again: {removed} entries it had written are removed")
    state.restore = "started"
    write_file(state_path, state.to_json())
    started = time.monotonic()
    written = restore_backup(ctx, root, state.restore_time)
    state.timings["restore"] = round(time.monotonic() - started, 1)
    ctx.log.say(f"Restore done: {human_size(written)} written into {root} in {state.timings['restore']:.1f} s")
    state.restore = "done"
    write_file(state_path, state.to_json())


def finalize_phase(ctx: Context, layout: Layout, recreated: RecreateState, state: RecoverState,
                   state_path: Path, root: Path) -> None:
    """The finalize plan of what was restored (read from the tree, so a re-run plans the same
    steps), run and journaled step by step."""
    mapping = Mapping({old: str(identity["path"]) for old, identity in recreated.mapping.items()}, {}, [])
    system = probe_restored(TreeProbe(str(root)))
    here = probe_disks_here(Probe(ctx.runner), ctx.config, str(root))
    options = finalize_options(layout, mapping, ctx.config, storage_drivers(list(mapping.disks.values())), here=here,
                               nics=nics_here(ctx, layout))
    steps = finalize_plan(system, options)
    check_programs(steps)
    left = [s for s in steps if s.id not in state.finalized]
    if not left:
        ctx.log.say("Finalize is done already")
        return
    ctx.log.say(f"Finalizing {system.os_release.get('pretty_name') or layout.hostname} ({system.family}): {len(left)} steps")
    started = time.monotonic()
    run_journaled(ctx, steps, state.finalized, lambda: write_file(state_path, state.to_json()), {},
                  "rescue recover", again=("bind", "unbind"))
    state.timings["finalize"] = round(time.monotonic() - started, 1)
    write_file(state_path, state.to_json())


def mac_mapping(ctx: Context) -> Dict[str, str]:
    """ReaR's CONFIG_DIR/mappings/mac (old MAC -> new), {} without one; recover reads it before
    any disk is touched, so that a mistake in it stops nothing half-way."""
    path = config_directory(ctx.args.config_dir) / "mappings" / "mac"
    return parse_mac_mapping(path.read_text(errors="replace"), str(path)) if path.is_file() else {}


def nics_here(ctx: Context, layout: Layout) -> Dict[str, str]:
    """The NIC rewrites for the restored network configuration: the layout's NICs paired with
    those of this machine (pair_nics), each pair said; {} when every MAC is here."""
    if not layout.network.interfaces:
        return {}
    configured = mac_mapping(ctx)
    here = probe_network(Probe(ctx.runner)).interfaces
    if not here and not configured:
        ctx.log.warn("no NIC is to be seen here (is `ip` there?): the restored network configuration is left as it is")
        return {}
    pairs, notes = pair_nics(layout.network.interfaces, here, configured)
    for pair in pairs:
        ctx.log.say(f"NIC {pair.old_name} {pair.old_mac} -> {pair.new_name or '(not here)'} {pair.new_mac} ({pair.how})")
    for note in notes:
        ctx.log.warn(note)
    changes = nic_changes(pairs)
    kept = [p for p in pairs if p.new_name and p.new_name != p.old_name and p.old_name not in changes]
    for pair in kept:
        ctx.log.say(f"The restored system keeps the name {pair.old_name}: this rescue system names NICs "
                    f"another way ({pair.new_name})")
    return changes


RESTOREONLY_STATE = "restoreonly.json"


def restore_and_finalize(ctx: Context, time_: Optional[str]) -> int:
    """restoreonly without --target: restore into the tree layoutonly (or mountonly) mounted
    at TARGET_FS_ROOT, then finalize it as recover does."""
    root = Path(ctx.config.setting("TARGET_FS_ROOT"))
    if not os.path.ismount(str(root)):
        raise RescueError(f"nothing is mounted at {root}", "recreate and mount the storage first (rescue layoutonly, "
                          "or rescue mountonly), or restore elsewhere with --target DIR")
    layout, _ = recovery_layout(ctx)
    digest = layout_digest(json.loads(layout_to_json(layout)))
    recreated = read_recreate_state(var_dir(ctx.config) / RECREATE_STATE)
    if recreated is None or recreated.layout_digest != digest:
        recreated = RecreateState(digest, {d.id: {"path": d.id} for d in layout.disks}, {})
        ctx.log.say("No recreate journal of this layout: the disks are taken to have their original names")
    reach_backup_filesystem(ctx, layout)
    check_backup_readable(ctx, time_)
    state = RecoverState(digest, time_)
    state_path = var_dir(ctx.config) / RESTOREONLY_STATE
    restore_phase(ctx, state, state_path, root)
    finalize_phase(ctx, layout, recreated, state, state_path, root)
    wrap_up(ctx, layout, recreated, state, root)
    return 0


def recover_report(layout: Layout, recreated: RecreateState, state: RecoverState) -> str:
    lines = [f"rescue {__version__} recovered {layout.hostname} on {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
             "", "Disks (the layout's -> the disks here):"]
    lines += [f"  {old} -> {identity['path']}" for old, identity in sorted(recreated.mapping.items())]
    lines += ["", f"Restored: {'the backup as of ' + state.restore_time if state.restore_time else 'the latest backup'}"]
    lines += ["", "Steps done: " + str(len(recreated.done)) + " to recreate the storage, "
              + str(len(state.finalized)) + " to finalize"]
    lines += [f"  {phase}: {seconds:.1f} s" for phase, seconds in sorted(state.timings.items())]
    return "\n".join(lines) + "\n"


def wrap_up(ctx: Context, layout: Layout, recreated: RecreateState, state: RecoverState, root: Path) -> None:
    """The report and a copy of the log (0600) into the recovered system's /var/log/rescue."""
    logs = Path(below(root, "/var/log/rescue"))
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_file(logs / f"recover-{stamp}.txt", recover_report(layout, recreated, state))
    if ctx.log.path and ctx.log.path.is_file():
        write_file(logs / f"recover-{stamp}.log", ctx.log.path.read_bytes())
    ctx.log.say(f"The report and the log are in {logs}")


def unmount_tree(ctx: Context, layout: Layout, root: str) -> None:
    for step in unmount_plan(layout, root):
        ctx.log.info(step.title)
        run_step(ctx, step, {})
    ctx.log.say(f"Unmounted {root}; LVM, LUKS and RAID are stopped")


def time_split(runner: Runner) -> str:
    """Where the run's time went (since the runner was made, at the start): in the heavy
    tools (TOOL_KINDS), waiting for devices, and rescue's own orchestration: the rest, its
    small tools (sfdisk, lvm, blkid, …) included."""
    total = time.monotonic() - runner.started
    heavy = {k: v for k, v in sorted(runner.kinds.items()) if k != "other"}
    own = max(0.0, total - sum(heavy.values()) - runner.waited)
    parts = ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in heavy.items())
    return (f"Time: {total:.1f} s: {parts + ', ' if parts else ''}waiting for devices {runner.waited:.1f} s, "
            f"orchestration {own:.1f} s ({100 * own / total if total else 0:.1f} %; "
            f"other tools {runner.kinds.get('other', 0.0):.1f} s of it)")


def recover(ctx: Context) -> int:
    args, config = ctx.args, ctx.config
    reviewing = args.plan or args.script or args.json
    if not reviewing:
        require_root("recover")
    time_ = restore_time(config, args.restore_time)
    state_path = var_dir(config) / RECOVER_STATE
    chosen = recovery_layout(ctx)
    layout = chosen[0]
    digest = layout_digest(json.loads(layout_to_json(layout)))
    state = None if (reviewing or args.restart) else read_recover_state(state_path)
    if state is not None and (state.layout_digest != digest or state.restore_time != time_):
        raise RescueError(f"{state_path} is the journal of a recover with another layout or restore time",
                          "start over with --restart (the disks are planned and confirmed anew)")
    mac_mapping(ctx)
    if not reviewing and (state is None or state.restore != "done"):
        reach_backup_filesystem(ctx, layout)
        check_backup_readable(ctx, time_)
    resume = "rescue recover" + (f" --restore-time {shlex.quote(time_)}" if time_ else "")
    if reviewing:
        recreate(ctx, resume, chosen, later=recover_outline(ctx, time_))
        return 0
    started = time.monotonic()
    root = Path(config.setting("TARGET_FS_ROOT"))
    recreated = recreate(ctx, resume, chosen)
    assert recreated is not None
    if state is None:
        state = RecoverState(digest, time_)
    state.timings.setdefault("recreate", round(time.monotonic() - started, 1))
    write_file(state_path, state.to_json())
    restore_phase(ctx, state, state_path, root)
    finalize_phase(ctx, layout, recreated, state, state_path, root)
    if not state.reported:
        wrap_up(ctx, layout, recreated, state, root)
        state.reported = True
        write_file(state_path, state.to_json())
    ctx.log.say(f"{layout.hostname} is recovered in {time.monotonic() - started:.0f} s")
    ctx.log.say(time_split(ctx.runner))
    if args.unmount:
        unmount_tree(ctx, layout, str(root))
    else:
        ctx.log.say(f"The recovered system stays mounted at {root} for a look; then: rescue recover --unmount")
    return 0


def recover_outline(ctx: Context, time_: Optional[str]) -> List[str]:
    """What recover does after the recreate plan (its steps depend on what is restored)."""
    root = ctx.config.setting("TARGET_FS_ROOT")
    return [f"restore the backup at {ctx.log.redact(backup_url(ctx.config))}"
            + (f" as of {time_}" if time_ else " (the latest)") + f" into {root}",
            "finalize in the restored system: device names, NICs, the initramfs of each kernel, the bootloader",
            f"write a report and the log into {root}/var/log/rescue"]


# =============================================================================================
# 19. rescue media: manifest
#
# What goes into the rescue system, as data: every file with where it comes from and why (a
# tool, a library of a tool, a kernel module, firmware a module asks for, rescue's own files),
# worked out from the host through a MediaProbe (pointed at a fake root in tests) and printable
# with `mkrescue --manifest`. Secrets stay out by construction: the configuration is written
# without them, and of root's keys only the public ones go in unless a setting opts in by name.
# =============================================================================================

@dataclass(frozen=True)
class MediaFile:
    path: str                          # in the image, absolute
    kind: str                          # file | dir | symlink | data
    source: str = ""                   # file: the host path; symlink: the link's target
    mode: int = 0o644                  # data: the mode it gets; file: from the host
    why: str = ""                      # the tool, module, … it is there for
    data: bytes = b""                  # data: the content (made by rescue)


@dataclass
class Manifest:
    kernel_release: str
    kernel: str                        # host path of the kernel image
    compression: str                   # zstd | xz | gzip
    cmdline: str                       # kernel command line of the rescue system
    hostname: str
    files: Dict[str, MediaFile] = field(default_factory=dict)
    tools: Dict[str, str] = field(default_factory=dict)       # TOOLS name -> host path
    modules: List[str] = field(default_factory=list)
    load: List[str] = field(default_factory=list)              # modules /init loads at boot
    firmware: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    boot: Optional["IsoBoot"] = None                          # how the ISO boots (OUTPUT=ISO)

    def add(self, item: MediaFile) -> None:
        self.files.setdefault(item.path, item)

    def as_dict(self) -> dict:
        return {"kernel_release": self.kernel_release, "kernel": self.kernel, "compression": self.compression,
                "cmdline": self.cmdline, "hostname": self.hostname, "tools": dict(sorted(self.tools.items())),
                "modules": self.modules, "load": self.load, "firmware": self.firmware, "warnings": self.warnings,
                "boot": dataclasses.asdict(self.boot) if self.boot else None,
                "files": [{"path": f.path, "kind": f.kind, "source": f.source, "why": f.why}
                          for f in sorted(self.files.values(), key=lambda f: f.path)]}


def manifest_text(manifest: Manifest) -> str:
    lines = [f"# rescue {__version__}: rescue media of {manifest.hostname}",
             f"# kernel {manifest.kernel_release}: {manifest.kernel}; initramfs compressed with {manifest.compression}",
             f"# command line: {manifest.cmdline}",
             f"# {len(manifest.tools)} tools, {len(manifest.modules)} modules, {len(manifest.firmware)} firmware files"]
    if manifest.boot:
        lines.append(f"# ISO boot: {manifest.boot.summary()}")
    lines += [f"# warning: {w}" for w in manifest.warnings]
    for f in sorted(manifest.files.values(), key=lambda f: f.path):
        origin = {"file": f" <- {f.source}", "symlink": f" -> {f.source}", "data": " (made by rescue)"}.get(f.kind, "")
        lines.append(f"{f.kind:7} {f.path}{origin}  [{f.why}]")
    return "\n".join(lines) + "\n"


class MediaProbe:
    """The host as mkrescue sees it: files under root (/ on a live system), and the few
    questions only a program answers (ldd, modinfo, the interpreter's paths). Tests point it
    at a fake root and answer those from recorded output."""

    def __init__(self, runner: Optional[Runner], root: str = "/", kernel_release: Optional[str] = None) -> None:
        self.runner = runner
        self.root = root
        self.release = kernel_release

    def host(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def kernel_release(self) -> str:
        return self.release or os.uname().release

    def read_text(self, path: str) -> Optional[str]:
        try:
            with open(self.host(path), encoding="utf-8", errors="surrogateescape") as handle:
                return handle.read()
        except OSError:
            return None

    def read_bytes(self, path: str, limit: int) -> Optional[bytes]:
        try:
            with open(self.host(path), "rb") as handle:
                return handle.read(limit)
        except OSError:
            return None

    def is_file(self, path: str) -> bool:
        return os.path.isfile(self.host(path))

    def which(self, program: str, directories: Sequence[str]) -> Optional[str]:
        for directory in directories:
            path = posixpath.join(directory, program)
            if os.path.isfile(self.host(path)) and os.access(self.host(path), os.X_OK):
                return path
        return None

    def ldd(self, paths: Sequence[str]) -> Dict[str, str]:
        """ldd's output for each file, from one ldd (a process costs much under emulation)."""
        hosts = [self.host(p) for p in paths]
        result = self.runner.run(["ldd"] + hosts, check=False, timeout=300)
        parts = split_ldd(result.stdout, hosts)
        return {path: parts.get(host, "") for path, host in zip(paths, hosts)}

    def module_firmware(self, paths: Sequence[str]) -> List[str]:
        if not paths:
            return []
        result = self.runner.run(["modinfo", "-F", "firmware"] + [self.host(p) for p in paths], check=False, timeout=120)
        return sorted({line.strip() for line in result.stdout.splitlines() if line.strip()})

    def python_paths(self, python: str) -> Dict[str, str]:
        """{"stdlib", "dynload", "ext_suffix", "version"} of the root's python3."""
        script = ("import json, sys, sysconfig, importlib.machinery as m\n"
                  "p = sysconfig.get_paths()\n"
                  "print(json.dumps({'stdlib': p['stdlib'], 'dynload': sysconfig.get_config_var('DESTSHARED') or '',"
                  " 'ext_suffix': m.EXTENSION_SUFFIXES[0], 'version': '%d.%d' % sys.version_info[:2]}))")
        result = self.runner.run([self.host(python), "-I", "-c", script], timeout=60)
        return json.loads(result.stdout)


def parse_ldd(text: str) -> Tuple[List[str], List[str]]:
    """ldd's output -> (the libraries' paths, the interpreter first; the names not found).
    The vDSO has no file; a static program lists nothing."""
    found: List[str] = []
    missing: List[str] = []
    for line in text.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            target = rest.strip().split(" (")[0].strip()
            if target == "not found":
                missing.append(name.strip())
            elif target.startswith("/"):
                found.append(target)
        elif line.startswith("/"):
            found.insert(0, line.split(" (")[0])
    return list(dict.fromkeys(found)), missing


def split_ldd(text: str, paths: Sequence[str]) -> Dict[str, str]:
    """The output of `ldd A B …` -> each file's part (ldd heads each with "FILE:"; with one
    file, no head)."""
    if len(paths) == 1:
        return {paths[0]: text}
    parts: Dict[str, str] = {}
    current = None
    wanted = set(paths)
    for line in text.splitlines():
        if line.endswith(":") and line[:-1] in wanted:
            current = line[:-1]
            parts[current] = ""
        elif current is not None:
            parts[current] += line + "\n"
    return parts


MODULE_SUFFIX = re.compile(r"\.ko(\.(xz|zst|gz))?$")


def module_name(path_or_name: str) -> str:
    """The kernel's name of a module: file name without .ko[.xz|.zst|.gz], '-' as '_'."""
    return MODULE_SUFFIX.sub("", posixpath.basename(path_or_name)).replace("-", "_")


@dataclass
class ModuleIndex:
    """modules.dep, .softdep, .alias and .builtin of one kernel, by module name."""
    paths: Dict[str, str]                  # name -> path relative to /lib/modules/KVER
    deps: Dict[str, List[str]]
    softdeps: Dict[str, List[str]]
    aliases: Dict[str, List[str]]          # an exact alias (fs-xfs, crypto-xts) -> module names
    builtin: Set[str]

    def resolve(self, name: str) -> List[str]:
        """A module name or exact alias -> the loadable modules it means ([] when built in or unknown)."""
        norm = name.replace("-", "_")
        if norm in self.paths:
            return [norm]
        return [m for m in self.aliases.get(name, []) if m in self.paths]

    def closure(self, names: Sequence[str]) -> List[str]:
        """The modules and everything they depend on (hard and soft), sorted."""
        seen: Set[str] = set()
        todo = [m for name in names for m in self.resolve(name)]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            todo += self.deps.get(name, [])
            todo += [m for soft in self.softdeps.get(name, []) for m in self.resolve(soft)]
        return sorted(seen)


def parse_module_index(dep: str, softdep: str = "", alias: str = "", builtin: str = "") -> ModuleIndex:
    paths: Dict[str, str] = {}
    deps: Dict[str, List[str]] = {}
    for line in dep.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        name = module_name(path)
        paths[name] = path.strip()
        deps[name] = [module_name(d) for d in rest.split()]
    softdeps: Dict[str, List[str]] = {}
    for line in softdep.splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "softdep":
            softdeps.setdefault(words[1].replace("-", "_"), []).extend(w for w in words[2:] if not w.endswith(":"))
    aliases: Dict[str, List[str]] = {}
    for line in alias.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias" and not any(c in words[1] for c in "*?["):
            aliases.setdefault(words[1], []).append(words[2].replace("-", "_"))
    return ModuleIndex(paths, deps, softdeps, aliases, {module_name(p) for p in builtin.split()})


def parse_proc_modules(text: str) -> List[str]:
    return sorted({line.split()[0] for line in text.splitlines() if line.split()})


FS_MODULES = {"vfat": ["vfat", "nls_cp437", "nls_iso8859_1", "nls_ascii"], "ext2": ["ext4"], "ext3": ["ext4"],
              "swap": []}
MD_MODULES = {"raid0": "raid0", "raid1": "raid1", "raid4": "raid456", "raid5": "raid456", "raid6": "raid456",
              "raid10": "raid10", "linear": "linear"}
LUKS_MODULES = ["dm_crypt", "xts", "crypto-aes", "crypto-sha256", "algif_skcipher", "af_alg"]


def layout_modules(layout: Layout) -> List[str]:
    """Modules the storage of the layout needs to be recreated and mounted."""
    wanted: List[str] = []
    for fs in layout.filesystems:
        wanted += FS_MODULES.get(fs.type, [fs.type])
    if layout.md_arrays:
        wanted += ["md_mod"] + [MD_MODULES.get(md.level.replace("level", "raid"), md.level) for md in layout.md_arrays]
    if layout.luks:
        wanted += LUKS_MODULES
    if layout.volume_groups or layout.luks:
        wanted.append("dm_mod")
    for lv in layout.logical_volumes:
        wanted += {"thin-pool": ["dm_thin_pool"], "thin": ["dm_thin_pool"], "raid1": ["dm_raid"],
                   "mirror": ["dm_mirror"], "cache": ["dm_cache"]}.get(lv.segment_type, [])
    if layout.boot.firmware == "uefi":
        wanted.append("efivarfs")
    return list(dict.fromkeys(wanted))


def layout_tools(layout: Layout, config: Config) -> List[List[str]]:
    """Programs recover needs for this layout and configuration; each entry is a list of
    alternatives, any one of which will do."""
    need = [["python3"], ["sfdisk"], ["wipefs"], ["blkid"], ["lsblk"], ["mount"], ["umount"], ["findmnt"],
            ["gpg"], ["sh"]]
    mkfs = {"ext2": "mke2fs", "ext3": "mke2fs", "ext4": "mke2fs", "xfs": "mkfs.xfs", "vfat": "mkfs.vfat",
            "btrfs": "mkfs.btrfs"}
    need += [[mkfs[fs.type]] for fs in layout.filesystems if fs.type in mkfs]
    need += [["btrfs"]] if any(fs.type == "btrfs" for fs in layout.filesystems) else []
    need += [["mkswap"]] if layout.swaps else []
    need += [["mdadm"]] if layout.md_arrays else []
    need += [["cryptsetup"]] if layout.luks else []
    need += [["lvm"]] if layout.volume_groups else []
    if layout.boot.bootloader == "grub2":
        need.append(["grub-install", "grub2-install"])
    if layout.boot.firmware == "uefi":
        need.append(["efibootmgr"])
    scheme = urllib.parse.urlsplit(config.setting("BACKUP_DUPLICITY_URL") or "").scheme
    if scheme in SSH_SCHEMES:
        need.append(["ssh"])
    if scheme == "rsync":
        need.append(["rsync"])
    unique: List[List[str]] = []
    for entry in need:
        if entry not in unique:
            unique.append(entry)
    return unique


# The rescue system's own programs where they are not on PATH; optional ones, by what they
# give the rescue system (a warning names what is lost when none of them is on the host).
TOOL_PATHS = {"systemd-udevd": ("/lib/systemd", "/usr/lib/systemd"), "udevd": ("/sbin", "/usr/sbin")}
OPTIONAL_GROUPS = (
    (("systemd-udevd", "udevd"), "no udevd: the rescue system loads modules by modalias and has no /dev/disk links"),
    (("dhclient", "udhcpc", "busybox"), "no DHCP client: the network comes up only with the layout's addresses"),
    (("sshd",), "no sshd: the rescue system cannot be reached over ssh"),
)
# Libraries programs open at run time (ldd cannot see them): name lookups, thread cancellation.
DLOPEN_LIBRARIES = ("libnss_files.so.2", "libnss_dns.so.2", "libnss_compat.so.2", "libresolv.so.2", "libgcc_s.so.1")
LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")
# Directories of files tools read at run time.
TOOL_DATA = {"grub-install": ("/usr/lib/grub", "/usr/share/grub"), "grub2-install": ("/usr/lib/grub", "/usr/share/grub"),
             "systemd-udevd": ("/lib/udev", "/usr/lib/udev", "/etc/udev"), "udevd": ("/lib/udev", "/etc/udev"),
             "lvm": ("/etc/lvm/lvm.conf",), "mdadm": ("/etc/mdadm",), "sshd": ("/etc/ssh/moduli",)}
# Left out of tools' data directories: udev's hardware database (device names, 20 MB),
# GRUB's prebuilt monolithic EFI images (grub-install builds its own from the modules), and of
# Debian's signed ones those for CDs and network boot (grub-install --uefi-secure-boot copies
# only grubx64.efi.signed; 11 MiB).
MEDIA_EXCLUDE = re.compile(r"/udev/hwdb\.(bin|d)$|/grub/[^/]+/monolithic$|/grub/[^/]+-signed/(gcd|grubnet)[^/]*$"
                           r"|/__pycache__$")
GNUPG_PUBLIC = ("pubring.kbx", "pubring.gpg", "trustdb.gpg", "gpg.conf", "tofu.db")
GNUPG_PRIVATE = ("private-keys-v1.d", "secring.gpg")
IMAGE_CONFIG_DIR = "/etc/rescue"
IMAGE_PYZ = "/usr/share/rescue/rescue.pyz"
MEDIA_DATA = HERE / "conf" / "media"


def rescue_pyz() -> Path:
    """The zipapp the image carries: the one running (by any name: it is often installed as
    /usr/local/sbin/rescue), else dist/rescue.pyz beside rescue.py."""
    running = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if running and running.is_file() and zipfile.is_zipfile(str(running)):
        return running
    built = HERE / "dist" / "rescue.pyz"
    if built.is_file():
        return built
    raise RescueError("no rescue.pyz to put into the rescue system",
                      "run mkrescue from dist/rescue.pyz, or build it: python3 build_zipapp.py")


def bzimage_release(image: bytes) -> str:
    """The release (uname -r) an x86 kernel image says it is, from its setup header's
    kernel_version string ("" when image is not the start of a bzImage)."""
    if len(image) < 0x210 or image[0x202:0x206] != b"HdrS":
        return ""
    start = struct.unpack_from("<H", image, 0x20E)[0] + 0x200
    end = image.find(b"\0", start, start + 256)
    words = image[start:end].decode("ascii", "replace").split() if start > 0x200 and end > start else []
    return words[0] if words else ""


def rescue_kernel(probe: MediaProbe, config: Config) -> Tuple[str, str]:
    """The rescue system's kernel and the release whose modules go with it, as ReaR chooses:
    KERNEL_VERSION (empty: the running kernel's) names /boot/vmlinuz-VERSION; KERNEL_FILE names
    another image, whose release its header says unless KERNEL_VERSION does."""
    version, kernel = config.setting("KERNEL_VERSION"), config.setting("KERNEL_FILE")
    if not kernel:
        release = version or probe.kernel_release()
        return f"/boot/vmlinuz-{release}", release
    own = bzimage_release(probe.read_bytes(kernel, 1 << 16) or b"")
    if version and own and own != version:
        raise RescueError(f"KERNEL_FILE={kernel} is the kernel {own}, not KERNEL_VERSION={version}: "
                          "the rescue system's modules would not load in it",
                          "leave KERNEL_VERSION empty (the file's own release is used), or name that kernel's file")
    return kernel, version or own or probe.kernel_release()


class ManifestBuilder:
    """Collects the rescue system's files into a Manifest, one kind of content per method."""

    def __init__(self, probe: MediaProbe, config: Config, layout: Layout, pyz: Path) -> None:
        self.probe = probe
        self.config = config
        self.layout = layout
        self.pyz = pyz
        self.kernel, self.release = rescue_kernel(probe, config)
        self.m = Manifest(self.release, self.kernel, "", "", backup_host(config))
        self.libraries_done: Set[str] = set()
        self.pending: Dict[str, str] = {}        # programs whose libraries are still to add -> why

    def build(self) -> Manifest:
        if not os.path.isfile(self.probe.host(self.kernel)):
            raise RescueError(f"no kernel at {self.kernel}", "set KERNEL_FILE to the kernel image to boot")
        self.m.kernel = self.probe.host(self.kernel)
        self.m.compression = initramfs_compression(self.probe.read_text(f"/boot/config-{self.release}") or "",
                                                   self.probe.which("zstd", self.path_dirs()) is not None)
        self.m.cmdline = rescue_cmdline(self.probe.read_text("/proc/cmdline") or "", self.config.setting("KERNEL_CMDLINE"))
        self.tools()
        self.python()
        self.modules()
        self.rescue_files()
        self.secrets_policy_files()
        if self.config.setting("OUTPUT") == "ISO":
            self.m.boot, warnings = iso_boot(self.probe, self.config.setting("SECURE_BOOT_BOOTLOADER"),
                                             self.layout.boot.family)
            self.m.warnings += warnings
            if self.m.boot.shim and pe_signed(self.probe.read_bytes(self.kernel, 4096) or b"") is False:
                self.m.warnings.append(f"the kernel {self.kernel} is not signed: with Secure Boot on, shim refuses to "
                                       "boot it (set KERNEL_FILE to a signed kernel, or boot with Secure Boot off)")
        return self.m

    # -- files and their symlinks ----------------------------------------------------------------

    def path_dirs(self) -> List[str]:
        return DEFAULT_PATH.split(":")

    def add_host(self, path: str, why: str, depth: int = 0) -> Optional[str]:
        """Add a host file (or directory, recursively) at its own path, with every symlink on
        the way (/lib -> usr/lib, python3 -> python3.11); the real path, or None if absent."""
        parts = [p for p in path.split("/") if p]
        current = "/"
        for n, part in enumerate(parts):
            candidate = posixpath.join(current, part)
            host = self.probe.host(candidate)
            if os.path.islink(host) and depth < 40:
                target = os.readlink(host)
                self.m.add(MediaFile(candidate, "symlink", target, 0o777, why))
                resolved = posixpath.normpath(posixpath.join(current, target))
                return self.add_host(posixpath.join(resolved, *parts[n + 1:]), why, depth + 1)
            current = candidate
        host = self.probe.host(current)
        if os.path.isdir(host):
            self.m.add(MediaFile(current, "dir", "", 0o755, why))
            for name in sorted(os.listdir(host)):
                if not MEDIA_EXCLUDE.search(posixpath.join(current, name)):
                    self.add_host(posixpath.join(current, name), why, depth)
            return current
        if not os.path.isfile(host):
            return None
        self.m.add(MediaFile(current, "file", host, stat.S_IMODE(os.stat(host).st_mode), why))
        return current

    def add_program(self, path: str, why: str) -> None:
        real = self.add_host(path, why)
        if real is not None:
            self.add_libraries(real, why)

    def add_libraries(self, real: str, why: str) -> None:
        if real not in self.libraries_done:
            self.libraries_done.add(real)
            self.pending[real] = why

    def flush_libraries(self) -> None:
        """Add the libraries of every pending program (ldd lists each one's whole closure)."""
        pending, self.pending = self.pending, {}
        outputs = self.probe.ldd(sorted(pending)) if pending else {}
        for real, text in sorted(outputs.items()):
            found, missing = parse_ldd(text)
            for name in missing:
                self.m.warnings.append(f"{real}: library {name} not found on this host")
            for library in found:
                if library.startswith(self.probe.root.rstrip("/") + "/") and self.probe.root != "/":
                    library = "/" + os.path.relpath(library, self.probe.root)
                self.add_host(library, f"library of {pending[real]}")

    # -- contents ------------------------------------------------------------------------------

    def tools(self) -> None:
        for name, tool in TOOLS.items():
            if tool.needed_by == ("mkrescue",):
                continue
            path = self.probe.which(name, TOOL_PATHS.get(name, self.path_dirs()))
            if path is None:
                continue
            self.m.tools[name] = path
            self.add_program(path, name)
            for data in TOOL_DATA.get(name, ()):
                real = self.add_host(data, f"data of {name}")
                helpers = [f.path for f in list(self.m.files.values()) if real and f.kind == "file"
                           and f.path.startswith(real + "/") and f.mode & 0o111]
                for helper in helpers:          # udev's *_id programs, run by its rules
                    self.add_libraries(helper, f"helper of {name}")
        for alternatives in layout_tools(self.layout, self.config):
            if not any(a in self.m.tools for a in alternatives):
                tool = TOOLS.get(alternatives[0])
                hint = f"install {tool.debian} (Debian/Ubuntu) or {tool.rhel} (RHEL)" if tool else "install it"
                raise RescueError(f"recover needs {' or '.join(alternatives)}, which this host does not have",
                                  hint + ", then run mkrescue again")
        for alternatives, loss in OPTIONAL_GROUPS:
            if not any(a in self.m.tools for a in alternatives):
                self.m.warnings.append(loss)
        for library in DLOPEN_LIBRARIES:
            for directory in LIBRARY_DIRS:
                if os.path.exists(self.probe.host(posixpath.join(directory, library))):
                    self.add_program(posixpath.join(directory, library), "loaded at run time")
                    break
        self.flush_libraries()

    def python(self) -> None:
        python = self.m.tools["python3"]
        paths = self.probe.python_paths(python)
        sources = pyz_sources(self.pyz)
        for relative in stdlib_closure(self.probe, paths, sources):
            real = self.add_host(posixpath.join(paths["stdlib"], relative), "python3 standard library")
            if real and real.endswith(".so"):
                self.add_libraries(real, f"python3 module {relative}")
        self.flush_libraries()

    def modules(self) -> None:
        moddir = f"/lib/modules/{self.release}"
        read = lambda name: self.probe.read_text(f"{moddir}/{name}") or ""    # noqa: E731
        index = parse_module_index(read("modules.dep"), read("modules.softdep"), read("modules.alias"),
                                   read("modules.builtin"))
        if not index.paths:
            self.m.warnings.append(f"no {moddir}/modules.dep: the rescue system gets no kernel modules")
            return
        setting = self.config.setting("MODULES")
        if "all_modules" in setting:
            wanted = sorted(index.paths)
        else:
            wanted = parse_proc_modules(self.probe.read_text("/proc/modules") or "")
            if "loaded_modules" not in setting:
                wanted += layout_modules(self.layout)
            wanted += [m for m in setting if m not in ("loaded_modules",)]
        for name in wanted:
            if not index.resolve(name) and name.replace("-", "_") not in index.builtin:
                self.m.warnings.append(f"kernel module {name} is neither a module of {self.release} nor built in")
        self.m.modules = index.closure(wanted)
        # What no driver core asks for by itself (udev loads a disk's or NIC's driver; nothing
        # loads dm_mod, md or a filesystem before lvm, mdadm or mount need it): /init loads
        # these, else "/dev/mapper/control: open failed" (ReaR #1202, #2677: present, never loaded).
        self.m.load = [name for name in dict.fromkeys(layout_modules(self.layout) + self.config.setting("MODULES_LOAD"))
                       if any(m in self.m.modules for m in index.resolve(name))]
        self.m.add(MediaFile("/etc/rescue/modules-load", "data", mode=0o644, why="modules /init loads",
                             data="".join(f"{name}\n" for name in self.m.load).encode()))
        for name in self.m.modules:
            self.add_host(f"{moddir}/{index.paths[name]}", f"module {name}")
        for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            self.add_host(f"{moddir}/{name}", "depmod")
        self.firmware([f"{moddir}/{index.paths[name]}" for name in self.m.modules])

    def firmware(self, module_paths: List[str]) -> None:
        setting = self.config.setting("FIRMWARE_FILES")
        if [w.lower() for w in setting] == ["no"]:
            return
        names = self.probe.module_firmware(module_paths)
        found = []
        for name in names:
            for suffix in ("", ".zst", ".xz"):
                if self.add_host(f"/lib/firmware/{name}{suffix}", "firmware of a module"):
                    found.append(name + suffix)
                    break
        for pattern in setting:
            matches = sorted(Path(self.probe.host("/lib/firmware")).glob(pattern.lstrip("/")))
            for match in matches:
                found.append(self.add_host("/lib/firmware/" + str(match.relative_to(self.probe.host("/lib/firmware"))),
                                           "FIRMWARE_FILES") or "")
        self.m.firmware = sorted(set(f for f in found if f))

    def rescue_files(self) -> None:
        m = self.m
        m.add(MediaFile("/init", "data", mode=0o755, why="rescue's init", data=(MEDIA_DATA / "init").read_bytes()))
        m.add(MediaFile(IMAGE_PYZ, "file", str(self.pyz), 0o644, "rescue"))
        wrapper = f"#!/bin/sh\nexec python3 {IMAGE_PYZ} -c {IMAGE_CONFIG_DIR} \"$@\"\n"
        m.add(MediaFile("/usr/bin/rescue", "data", mode=0o755, why="rescue", data=wrapper.encode()))
        m.add(MediaFile(f"{IMAGE_CONFIG_DIR}/local.conf", "data", mode=0o600, why="configuration without secrets",
                        data=image_config(self.config).encode()))
        directory = layout_dir(self.config)
        m.add(MediaFile(f"{directory}/layout.json", "data", mode=0o600, why="the layout",
                        data=layout_to_json(self.layout).encode()))
        for vgcfg in sorted(Path(self.probe.host(str(directory / "lvm"))).glob("*.vgcfg")):
            m.add(MediaFile(f"{directory}/lvm/{vgcfg.name}", "file", str(vgcfg), 0o600, "the layout"))
        m.add(MediaFile("/etc/rescue/network", "data", mode=0o644, why="the network as the host had it",
                        data=network_config(self.layout, self.config).encode()))
        release = dict(name="rescue", version=__version__, hostname=m.hostname, kernel=m.kernel_release)
        m.add(MediaFile("/etc/rescue/release", "data", mode=0o644, why="the banner",
                        data="".join(f"{k.upper()}={shlex.quote(v)}\n" for k, v in release.items()).encode()))
        m.add(MediaFile("/etc/passwd", "data", mode=0o644, why="users", data=(
            "root:x:0:0:root:/root:/bin/sh\nsshd:x:74:65534:sshd:/run/sshd:/bin/false\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n").encode()))
        password = self.config.setting("SSH_ROOT_PASSWORD")
        salt = "".join(CRYPT_ALPHABET[b % 64] for b in os.urandom(16))
        shadow = f"root:{sha512_crypt(password, salt) if password else '*'}:19000:0:99999:7:::\nsshd:!:19000::::::\n"
        m.add(MediaFile("/etc/shadow", "data", mode=0o600, why="SSH_ROOT_PASSWORD, as a hash", data=shadow.encode()))
        m.add(MediaFile("/etc/ssh/sshd_config", "data", mode=0o644, why="sshd", data=(
            f"HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin yes\n"
            f"PasswordAuthentication {'yes' if password else 'no'}\nUsePAM no\n"
            "PrintMotd no\nSubsystem sftp internal-sftp\n").encode()))
        m.add(MediaFile("/etc/group", "data", mode=0o644, why="users",
                        data=b"root:x:0:\ntty:x:5:\ndisk:x:6:\nnogroup:x:65534:\n"))
        for path in ("/etc/nsswitch.conf", "/etc/hosts", "/etc/resolv.conf", "/etc/services", "/etc/protocols"):
            self.add_host(path, "name lookups")

    def secrets_policy_files(self) -> None:
        """root's public keyring and ssh public keys; private keys only when a setting asks."""
        home = "/root"
        gnupg = f"{home}/.gnupg"
        if os.path.isdir(self.probe.host(gnupg)):
            self.m.add(MediaFile(gnupg, "dir", "", 0o700, "root's public keyring"))
            for name in GNUPG_PUBLIC:
                self.add_host(f"{gnupg}/{name}", "root's public keyring")
            if self.config.setting("RESCUE_GPG_PRIVATE_KEYS"):
                for name in GNUPG_PRIVATE:
                    self.add_host(f"{gnupg}/{name}", "RESCUE_GPG_PRIVATE_KEYS=yes")
        ssh = f"{home}/.ssh"
        for name in ("authorized_keys", "known_hosts", "config"):
            self.add_host(f"{ssh}/{name}", "root's ssh (public parts)")
        for key in ssh_private_keys(self.config.setting("SSH_UNPROTECTED_PRIVATE_KEYS"),
                                    sorted(os.listdir(self.probe.host(ssh))) if os.path.isdir(self.probe.host(ssh)) else []):
            self.add_host(key if key.startswith("/") else f"{ssh}/{key}", "SSH_UNPROTECTED_PRIVATE_KEYS")
        for item in list(self.m.files.values()):
            if item.path.startswith(ssh) or item.path.startswith(gnupg):
                self.m.files[item.path] = dataclasses.replace(item, mode=item.mode & 0o700 if item.kind != "symlink" else item.mode)


CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SHA512_CRYPT_ORDER = [(0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26), (6, 27, 48),
                      (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32), (12, 33, 54), (34, 55, 13),
                      (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38), (18, 39, 60), (40, 61, 19), (62, 20, 41)]


def sha512_crypt(password: str, salt: str) -> str:
    """The $6$ hash of /etc/shadow (glibc's SHA-crypt, 5000 rounds): the crypt module is gone
    from Python 3.13, and the password must not reach a command line."""
    pw, sl = password.encode(), salt.encode()[:16]
    digest = lambda data: hashlib.sha512(data).digest()    # noqa: E731
    b = digest(pw + sl + pw)
    a = pw + sl + (b * (len(pw) // 64 + 1))[:len(pw)]
    n = len(pw)
    while n:
        a += b if n & 1 else pw
        n >>= 1
    a = digest(a)
    p = (digest(pw * len(pw)) * (len(pw) // 64 + 1))[:len(pw)]
    s = (digest(sl * (16 + a[0])) * (len(sl) // 64 + 1))[:len(sl)]
    c = a
    for i in range(5000):
        c = digest((p if i & 1 else c) + (s if i % 3 else b"") + (p if i % 7 else b"") + (c if i & 1 else p))
    out = []
    for x, y, z in SHA512_CRYPT_ORDER + [(None, None, 63)]:
        w = ((c[x] << 16) | (c[y] << 8) | c[z]) if x is not None else c[z]
        for _ in range(4 if x is not None else 2):
            out.append(CRYPT_ALPHABET[w & 0x3F])
            w >>= 6
    return f"$6${salt[:16]}${''.join(out)}"


def ssh_private_keys(setting: List[str], names: List[str]) -> List[str]:
    """SSH_UNPROTECTED_PRIVATE_KEYS (ReaR's name): no (default), yes (root's id_* keys), or paths."""
    words = [w for w in setting if w]
    if not words or [w.lower() for w in words] in (["no"], ["false"], ["n"], ["0"]):
        return []
    if [w.lower() for w in words] in (["yes"], ["true"], ["y"], ["1"]):
        return [n for n in names if n.startswith("id_") and not n.endswith(".pub")]
    return words


def image_config(config: Config) -> str:
    """The configuration the rescue system loads: the host's, secrets left empty, and any
    secret value that hides inside another value (a password in a URL) removed; with
    RESCUE_GPG_PASSPHRASE=yes the duplicity passphrase stays."""
    keep = frozenset({"BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE"} if config.setting("RESCUE_GPG_PASSPHRASE") else ())
    text = config_without_secrets(config, keep)
    if "HOSTNAME" not in config.values:
        text += f"HOSTNAME={shlex.quote(backup_host(config))}\n"
    kept = {str(config.values.get(name) or "") for name in keep}
    for secret in sorted(config.secret_values() - kept, key=len, reverse=True):
        text = text.replace(secret, "")
    return text


def network_config(layout: Layout, config: Config) -> str:
    """Shell-readable lines for /init: how the host's network was (MAC, name, addresses)."""
    lines = [f"STATIC={'yes' if config.setting('USE_STATIC_NETWORKING') else 'no'}"]
    for n, nic in enumerate(layout.network.interfaces):
        lines.append(f"NIC{n}={shlex.quote(' '.join([nic.mac, nic.name] + nic.addresses))}")
    lines.append(f"GATEWAY={shlex.quote(layout.network.gateway or '')}")
    lines.append(f"NAMESERVERS={shlex.quote(' '.join(layout.network.nameservers))}")
    return "\n".join(lines) + "\n"


def initramfs_compression(kernel_config: str, have_zstd_program: bool) -> str:
    """The best compression this kernel unpacks and rescue can write: zstd (with the zstd
    program), else xz, else gzip. A kernel without a readable config gets gzip, which every
    kernel with initramfs support unpacks."""
    enabled = set(re.findall(r"^CONFIG_RD_([A-Z0-9]+)=y", kernel_config, re.M))
    if "ZSTD" in enabled and have_zstd_program:
        return "zstd"
    if "XZ" in enabled:
        return "xz"
    return "gzip"


def rescue_cmdline(host_cmdline: str, extra: str) -> str:
    """The host's console= arguments (the console it is managed on) and KERNEL_CMDLINE."""
    consoles = [w for w in host_cmdline.split() if w.startswith("console=")]
    return " ".join(consoles + extra.split())


def pyz_sources(pyz: Path) -> Dict[str, str]:
    """The Python sources inside rescue.pyz, by name (rescue.py, duplicity/…, shiv's bootstrap)."""
    sources: Dict[str, str] = {}
    with zipfile.ZipFile(str(pyz)) as archive:
        for name in archive.namelist():
            if name.endswith(".py"):
                sources[name] = archive.read(name).decode("utf-8", "surrogateescape")
    return sources


# Imported by name at run time (codecs, sysconfig), not by an import statement.
PYTHON_ALWAYS = ("encodings", "site", "sitecustomize", "_sitebuiltins", "_sysconfigdata")


IMPORT_START = re.compile(r"(?:^|[:;])[ \t]*((?:import|from)[ \t])", re.M)


def imported_names(source: str, package: str = "") -> Set[str]:
    """The absolute names a module's import statements mention (functions included). Only
    the statements themselves are parsed: each line's `import`/`from` (also after `if x:`
    or `;`) with its parenthesised or backslash-continued rest; what is not a statement
    (prose in a docstring) does not parse and is skipped. 14 times faster than parsing whole
    modules, and the same names over Python's standard library and site-packages (tested)."""
    def line_end(position: int) -> int:
        found = source.find("\n", position)
        return len(source) if found < 0 else found

    names: Set[str] = set()
    end = 0
    for match in IMPORT_START.finditer(source):
        start = match.start(1)
        if start < end:         # the continuation line of the statement before
            continue
        end = line_end(start)
        statement = source[start:end]
        while (statement.count("(") > statement.count(")") or statement.rstrip().endswith("\\")) \
                and end < len(source):
            end = line_end(end + 1)
            statement = source[start:end]
        try:
            body = ast.parse(statement.strip()).body
        except (SyntaxError, ValueError):
            continue
        for node in body:
            names |= import_node_names(node, package)
    return names


def import_node_names(node: "ast.AST", package: str) -> Set[str]:
    """The absolute names one Import/ImportFrom node mentions (relative ones resolved against
    package); nothing for any other node."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        parts = package.split(".") if package else []
        parts = parts[:len(parts) - node.level + 1] if node.level > 1 else parts
        base = ".".join(parts + ([node.module] if node.module else []))
    if not base:
        return set()
    return {base} | {f"{base}.{alias.name}" for alias in node.names if alias.name != "*"}


def stdlib_closure(probe: MediaProbe, paths: Dict[str, str], sources: Dict[str, str]) -> List[str]:
    """The standard library files (relative to stdlib) that the sources import, directly or
    through other stdlib modules: a static module finder over import statements, which also
    sees imports inside functions (taken on a path only some workflows run)."""
    stdlib, dynload = paths["stdlib"], paths["dynload"]
    suffix = paths["ext_suffix"]
    found: Set[str] = set()
    todo = [(name, "") for name in PYTHON_ALWAYS]
    for filename, text in sources.items():
        package = filename[:-3].replace("/", ".")
        package = package[:-len(".__init__")] if package.endswith(".__init__") else package.rpartition(".")[0]
        todo += [(name, "") for name in imported_names(text, package)]
    seen: Set[str] = set()
    while todo:
        name, _ = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            todo.append((".".join(parts[:n]), ""))
        relative = stdlib_file(probe, stdlib, dynload, suffix, parts)
        for rel in relative:
            if rel in found:
                continue
            found.add(rel)
            if rel.endswith(".py"):
                package = ".".join(parts) if rel.endswith("__init__.py") else ".".join(parts[:-1])
                text = probe.read_text(posixpath.join(stdlib, rel)) or ""
                todo += [(n, "") for n in imported_names(text, package)]
            if rel.endswith("__init__.py") and name == "encodings":
                directory = probe.host(posixpath.join(stdlib, "encodings"))
                todo += [(f"encodings.{p[:-3]}", "") for p in sorted(os.listdir(directory)) if p.endswith(".py")]
    return sorted(found)


def stdlib_file(probe: MediaProbe, stdlib: str, dynload: str, suffix: str, parts: List[str]) -> List[str]:
    """Where a module of the standard library is: [path relative to stdlib] or [] (built in,
    not in the standard library, or not there)."""
    base = posixpath.join(*parts)
    for candidate in (base + ".py", posixpath.join(base, "__init__.py")):
        if os.path.isfile(probe.host(posixpath.join(stdlib, candidate))):
            return [candidate]
    if len(parts) == 1:
        if parts[0] == "_sysconfigdata":
            return sorted(p for p in os.listdir(probe.host(stdlib)) if p.startswith("_sysconfigdata"))
        for name in (parts[0] + suffix, parts[0] + ".abi3.so", parts[0] + ".so"):
            full = posixpath.join(dynload, name)
            if os.path.isfile(probe.host(full)):
                return [posixpath.relpath(full, stdlib)]
    return []


# -- how the ISO boots ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ShimChain:
    """Where a distribution keeps its signed shim and the signed GRUB shim loads."""
    shims: Tuple[str, ...]             # in order of preference
    grubs: Tuple[str, ...]             # the signed GRUB: the first that is there
    grub_name: str                     # the name shim loads it by, from its own directory
    mok_managers: Tuple[str, ...] = ()


SHIM_CHAINS = (
    # Debian, Ubuntu (shim-signed, grub-efi-amd64-signed): the CD GRUB first, as their ISOs use
    ShimChain(("/usr/lib/shim/shimx64.efi.signed.latest", "/usr/lib/shim/shimx64.efi.signed"),
              ("/usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed", "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"),
              "grubx64.efi", ("/usr/lib/shim/mmx64.efi.signed",)),
    # SUSE (shim, grub2-x86_64-efi): its shim loads grub.efi
    ShimChain(("/usr/share/efi/x86_64/shim.efi",), ("/usr/share/efi/x86_64/grub.efi",), "grub.efi",
              ("/usr/share/efi/x86_64/MokManager.efi",)),
) + tuple(
    # RHEL, Alma, Rocky, CentOS, Fedora, Oracle (shim-x64, grub2-efi-x64): on the ESP
    ShimChain((f"/boot/efi/EFI/{vendor}/shimx64.efi",), (f"/boot/efi/EFI/{vendor}/grubx64.efi",), "grubx64.efi",
              (f"/boot/efi/EFI/{vendor}/mmx64.efi",)) for vendor in FAMILIES["rhel"].efi_ids)
GRUB_PLATFORMS = {"bios": "i386-pc", "efi": "x86_64-efi"}
GRUB_MODULE_DIRS = ("/usr/lib/grub", "/usr/share/grub2")      # Debian, RHEL, SUSE: /usr/lib/grub; old SUSE
# What the ISO's own GRUB images hold (no modules are read from the ISO): the boot menu's commands.
GRUB_IMAGE_MODULES = ("normal", "configfile", "linux", "search", "search_fs_file", "echo", "test", "serial",
                      "terminal", "iso9660", "part_msdos", "part_gpt", "fat", "ls", "cat", "sleep", "reboot", "halt")
GRUB_PLATFORM_MODULES = {"bios": ("biosdisk",), "efi": ("all_video",)}


@dataclass(frozen=True)
class IsoBoot:
    """How the ISO boots, from what the host has: GRUB made here for BIOS (its modules'
    directory) and for UEFI (unsigned), or for UEFI the host's signed shim chain. Paths are
    the files' paths here (MediaProbe.host)."""
    bios_modules: str = ""             # host directory of GRUB's i386-pc modules ("": no BIOS boot)
    efi_modules: str = ""              # … of its x86_64-efi modules (UEFI without a shim chain)
    shim: str = ""                     # host path of the signed shim ("": no Secure Boot chain)
    grub: str = ""                     # the signed GRUB it loads
    grub_name: str = "grubx64.efi"
    mok_manager: str = ""
    vendor_dirs: Tuple[str, ...] = ()  # \EFI\<dir>: where a signed GRUB may read its grub.cfg

    @property
    def bootable(self) -> bool:
        return bool(self.bios_modules or self.efi_modules or self.shim)

    def summary(self) -> str:
        bios = "BIOS (GRUB)" if self.bios_modules else "no BIOS"
        uefi = (f"UEFI with Secure Boot (shim {self.shim}, GRUB {self.grub})" if self.shim else
                "UEFI (GRUB, unsigned: Secure Boot must be off)" if self.efi_modules else "no UEFI")
        return f"{bios}, {uefi}"


def pe_signed(data: bytes) -> Optional[bool]:
    """Whether a PE/COFF image (an EFI binary, a kernel with its EFI stub) carries an
    Authenticode signature: its certificate table (data directory 4) is not empty. None when
    data is not the start of a PE image."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        return None
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if len(data) < pe + 24 + 2 or data[pe:pe + 4] != b"PE\0\0":
        return None
    optional = pe + 24
    magic = struct.unpack_from("<H", data, optional)[0]
    directories = optional + (112 if magic == 0x20B else 96)      # PE32+ | PE32
    if len(data) < directories + 5 * 8:
        return None
    size = struct.unpack_from("<II", data, directories + 4 * 8)[1]
    return size > 0


def efi_prefix_dirs(image: bytes) -> Set[str]:
    """The \\EFI\\<dir> names a GRUB EFI image has built in as its prefix (/EFI/debian)."""
    return {m.decode() for m in re.findall(rb"\0/EFI/([A-Za-z0-9_.-]{1,32})\0", image) if m.upper() != b"BOOT"}


def grub_modules_dir(probe: MediaProbe, platform: str) -> str:
    name = GRUB_PLATFORMS[platform]
    return next((f"{d}/{name}" for d in GRUB_MODULE_DIRS if probe.is_file(f"{d}/{name}/moddep.lst")), "")


def iso_boot(probe: MediaProbe, setting: str, family: str) -> Tuple[IsoBoot, List[str]]:
    """The ISO's boot equipment and the warnings about what it lacks (mkrescue refuses an ISO
    that boots neither way: IsoBoot.bootable). setting:
    SECURE_BOOT_BOOTLOADER: a shim's path (its GRUB beside it), "no" (GRUB made here,
    unsigned), or empty (the host's shim chain when it has one); family: the host's
    distribution family (FAMILIES)."""
    warnings = []
    bios, efi = grub_modules_dir(probe, "bios"), grub_modules_dir(probe, "efi")
    shim = grub = mok = ""
    grub_name = "grubx64.efi"
    if setting and setting.lower() not in FALSE_WORDS - {""}:
        if not probe.is_file(setting):
            raise RescueError(f"SECURE_BOOT_BOOTLOADER={setting}: there is no such file",
                              "name the signed shim (e.g. /boot/efi/EFI/redhat/shimx64.efi), or leave it empty")
        directory = posixpath.dirname(setting)
        names = sorted(n for n in os.listdir(probe.host(directory)) if re.fullmatch(r"(?i)grub.*\.efi", n))
        if not names:
            raise RescueError(f"SECURE_BOOT_BOOTLOADER={setting}: no signed GRUB (grub*.efi) beside it in {directory}",
                              "install the distribution's signed GRUB (grub2-efi-x64, grub-efi-amd64-signed)")
        shim, grub_name = setting, next((n for n in names if n.lower() == "grubx64.efi"), names[0])
        grub = f"{directory}/{grub_name}"
        mok = next((f"{directory}/{n}" for n in ("mmx64.efi", "MokManager.efi") if probe.is_file(f"{directory}/{n}")), "")
    elif not setting:
        for chain in SHIM_CHAINS:
            found = next((p for p in chain.shims if probe.is_file(p)), "")
            signed = next((p for p in chain.grubs if probe.is_file(p)), "")
            if found and signed:
                shim, grub, grub_name = found, signed, chain.grub_name
                mok = next((p for p in chain.mok_managers if probe.is_file(p)), "")
                break
    if not bios:
        warnings.append("GRUB's i386-pc modules are not on this host (grub-pc-bin, grub2-pc-modules): "
                        "the ISO does not boot by BIOS")
    if not shim and not efi:
        warnings.append("neither a signed shim with its GRUB nor GRUB's x86_64-efi modules are on this host "
                        "(shim-signed, grub-efi-amd64-bin, grub2-efi-x64-modules): the ISO does not boot by UEFI")
    vendors = set()
    if shim:    # where the signed GRUB reads grub.cfg: its built-in prefix (/EFI/debian), else its own
        # directory on an ESP (/boot/efi/EFI/redhat), else the family's
        parent, name = posixpath.split(posixpath.dirname(grub))
        vendors = (efi_prefix_dirs(probe.read_bytes(grub, 64 << 20) or b"")
                   or ({name} if posixpath.basename(parent) == "EFI" and name.upper() != "BOOT" else set())
                   or set(FAMILIES[family].efi_ids if family in FAMILIES else ()))
    host = lambda path: probe.host(path) if path else ""                  # noqa: E731
    return IsoBoot(host(bios), "" if shim else host(efi), host(shim), host(grub), grub_name, host(mok),
                   tuple(sorted(v for v in vendors if v))), warnings


def build_manifest(probe: MediaProbe, config: Config, layout: Layout, pyz: Path) -> Manifest:
    return ManifestBuilder(probe, config, layout, pyz).build()


# =============================================================================================
# 20. rescue media: packers
#
# The manifest made real: a staged tree (modules.dep regenerated for what was copied, a self-test
# run inside it with chroot), rescue's own cpio newc writer (reproducible: sorted, mtime 0,
# owner root), compression the kernel unpacks, and the ISO (xorriso: BIOS and UEFI in one hybrid
# image that also works written to a USB stick; GRUB images made here with every module they use
# built in, or for UEFI the host's signed shim chain).
# =============================================================================================

@dataclass(frozen=True)
class CpioEntry:
    name: str                          # without the leading "/"
    mode: int                          # st_mode: type and permission bits
    data: bytes = b""                  # content, or a symlink's target
    ino: int = 0
    nlink: int = 1
    rdev: Tuple[int, int] = (0, 0)


def cpio_header(entry: CpioEntry, ino: int, size: int) -> bytes:
    name = entry.name.encode("utf-8", "surrogateescape") + b"\0"
    fields = (ino, entry.mode, 0, 0, entry.nlink, 0, size, 0, 0, entry.rdev[0], entry.rdev[1], len(name), 0)
    header = b"070701" + b"".join(b"%08X" % v for v in fields) + name
    return header + b"\0" * (-len(header) % 4)


def write_cpio(stream: BinaryIO, entries: Sequence[CpioEntry]) -> None:
    """The newc format the kernel unpacks. Hard links share an inode number and carry their
    data on the last name, as GNU cpio writes them (the kernel takes either order)."""
    last_of: Dict[int, int] = {}
    for n, entry in enumerate(entries):
        if entry.nlink > 1:
            last_of[entry.ino] = n
    for n, entry in enumerate(entries):
        ino = entry.ino or n + 1
        data = entry.data if entry.nlink == 1 or last_of.get(entry.ino) == n else b""
        stream.write(cpio_header(entry, ino, len(data)))
        stream.write(data + b"\0" * (-len(data) % 4))
    stream.write(cpio_header(CpioEntry("TRAILER!!!", 0), 0, 0))


def read_cpio(data: bytes) -> List[CpioEntry]:
    """Entries of a newc archive (the tests read rescue's images back with it)."""
    entries: List[CpioEntry] = []
    offset = 0
    while True:
        if data[offset:offset + 6] != b"070701":
            raise ValueError(f"not a newc header at offset {offset}")
        fields = [int(data[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, nlink, size, rmajor, rminor, namesize = (fields[0], fields[1], fields[4], fields[6],
                                                             fields[9], fields[10], fields[11])
        start = offset + 110
        name = data[start:start + namesize - 1].decode("utf-8", "surrogateescape")
        body = start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries.append(CpioEntry(name, mode, data[body:body + size], ino, nlink, (rmajor, rminor)))
        offset = body + size + (-size % 4)


def tree_entries(stage: Path) -> List[CpioEntry]:
    """Every file under stage, sorted (parents first), hard links kept, plus /dev/console
    for the kernel to open before /init runs."""
    entries = [CpioEntry("dev", stat.S_IFDIR | 0o755), CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))]
    inodes: Dict[Tuple[int, int], int] = {}
    for path in sorted(stage.rglob("*"), key=lambda p: p.relative_to(stage).parts):
        name = path.relative_to(stage).as_posix()
        info = path.lstat()
        if name == "dev" or name.startswith("dev/"):
            continue
        if stat.S_ISLNK(info.st_mode):
            entries.append(CpioEntry(name, stat.S_IFLNK | 0o777, os.readlink(str(path)).encode()))
        elif stat.S_ISDIR(info.st_mode):
            entries.append(CpioEntry(name, stat.S_IFDIR | stat.S_IMODE(info.st_mode)))
        else:
            key = (info.st_dev, info.st_ino)
            ino = inodes.setdefault(key, 100000 + len(inodes)) if info.st_nlink > 1 else 0
            entries.append(CpioEntry(name, stat.S_IFREG | stat.S_IMODE(info.st_mode), path.read_bytes(),
                                     ino, info.st_nlink if ino else 1))
    return entries


def compress(data: bytes, method: str, runner: Runner, work: Path) -> bytes:
    if method == "gzip":
        # Level 6: on rescue images, 9 is 0.6 % smaller and takes 4 times as long (24 s).
        return gzip.compress(data, 6, mtime=0)
    if method == "xz":
        import lzma     # here: a Python built without _lzma still runs everything else
        # The kernel's xz decoder checks CRC32 (not xz's default CRC64).
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                             filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
    raw, packed = work / "initramfs.cpio", work / "initramfs.cpio.zst"
    raw.write_bytes(data)
    # Level 9: on rescue images, -15 is 1.5 % smaller and takes 10 times as long.
    runner.run(["zstd", "-q", "-f", "-T0", "-9", "-o", str(packed), str(raw)], timeout=600)
    return packed.read_bytes()


def stage_tree(manifest: Manifest, stage: Path) -> None:
    """Write the manifest's files under stage; files that are one inode on the host stay one."""
    linked: Dict[Tuple[int, int], Path] = {}
    for item in sorted(manifest.files.values(), key=lambda f: f.path):
        target = stage / item.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if item.kind == "dir":
            target.mkdir(exist_ok=True)
            target.chmod(item.mode)
        elif item.kind == "symlink":
            os.symlink(item.source, str(target))
        elif item.kind == "data":
            target.write_bytes(item.data)
            target.chmod(item.mode)
        else:
            info = os.stat(item.source)
            first = linked.setdefault((info.st_dev, info.st_ino), target)
            if first != target:
                os.link(str(first), str(target))
            else:
                shutil.copyfile(item.source, str(target))
                target.chmod(item.mode)
    for name in ("proc", "sys", "dev", "run", "tmp", "mnt", "var/log/rescue", "var/tmp", "root"):
        (stage / name).mkdir(parents=True, exist_ok=True)
    (stage / "tmp").chmod(0o1777)
    (stage / "root").chmod(0o700)


def regenerate_module_index(ctx: Context, manifest: Manifest, stage: Path) -> None:
    """depmod for what was copied, then every copied module must resolve there (ReaR's
    modules that were present but never loaded came from a stale modules.dep)."""
    if not manifest.modules:
        return
    ctx.runner.run(["depmod", "-b", str(stage), manifest.kernel_release], timeout=300)
    moddir = stage / "lib" / "modules" / manifest.kernel_release
    index = parse_module_index((moddir / "modules.dep").read_text())
    unresolved = [m for m in manifest.modules if not index.resolve(m)]
    if unresolved:
        raise RescueError(f"depmod does not know the copied modules {', '.join(unresolved)}",
                          f"check {moddir} and run mkrescue again")


def self_test(ctx: Context, manifest: Manifest, stage: Path) -> List[str]:
    """Run the rescue system's own programs inside the staged tree (chroot): rescue, the bundled
    duplicity and gpg start, and every tool's libraries resolve. Whatever the tests write
    there is removed again. Returns what was checked."""
    before = {p for p in stage.rglob("*")}
    env = {"HOME": "/root", "SHIV_ROOT": "/run/rescue-selftest", "PYTHONDONTWRITEBYTECODE": "1",
           "PATH": DEFAULT_PATH, "LOGFILE": "/run/rescue-selftest.log"}
    checks = [["/usr/bin/rescue", "--version"], ["/usr/bin/rescue", "duplicity", "--version"],
              [manifest.tools["gpg"], "--version"]]

    def check(argv: List[str]) -> str:
        result = ctx.runner.run(["chroot", str(stage)] + argv, env=env, check=False, timeout=300)
        if result.returncode != 0:
            raise RescueError(f"the rescue system's self-test failed: {' '.join(argv)} exited {result.returncode}",
                              "its output: " + (result.stderr or result.stdout).strip()[-500:])
        return f"{' '.join(argv)}: {(result.stdout or result.stderr).strip().splitlines()[0]}"

    def missing_libraries(name: str, path: str) -> str:
        result = ctx.runner.run(["chroot", str(stage), loader, "--list", path], env=env, check=False, timeout=60)
        return f"{name}: " + ", ".join(parse_ldd(result.stdout)[1]) if "not found" in result.stdout else ""

    loader = next((f.path for f in manifest.files.values() if re.search(r"/ld-linux[^/]*\.so", f.path)
                   and f.kind == "file"), None)
    workers = min(8, max(2, os.cpu_count() or 2))
    tools = sorted(manifest.tools.items()) if loader else []
    try:
        # rescue first and alone: it unpacks the zipapp the duplicity check then runs from
        done = [check(checks[0])]
        results = in_parallel(ctx.runner, [functools.partial(check, argv) for argv in checks[1:]]
                              + [functools.partial(missing_libraries, name, path) for name, path in tools], workers)
        done += [str(r) for r in results[:len(checks) - 1]]
        broken = [str(r) for r in results[len(checks) - 1:] if r]
        if broken:
            raise RescueError("libraries missing in the rescue system: " + "; ".join(broken),
                              "report this with the output of rescue mkrescue --manifest")
        if tools:
            done.append(f"libraries of {len(tools)} tools resolve")
    finally:
        for path in sorted(set(stage.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(str(path), ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()
    return done


def grub_config(manifest: Manifest) -> str:
    template = (MEDIA_DATA / "grub.cfg").read_text()
    return (template.replace("@VERSION@", __version__).replace("@HOSTNAME@", manifest.hostname)
            .replace("@CMDLINE@", manifest.cmdline))


ISO_EPOCH = "0"                     # SOURCE_DATE_EPOCH of the ISO and its FAT image: the same bytes every build


def grub_search_config(marker: str, then_menu: bool) -> str:
    """GRUB finds the ISO by its marker file wherever it booted from (CD, USB stick, the
    El Torito FAT image) and reads the menu there."""
    text = f"search --no-floppy --file --set=root {marker}\nset prefix=($root)/boot/grub\n"
    return text + ("configfile $prefix/grub.cfg\n" if then_menu else "")


def grub_image(ctx: Context, platform: str, modules_dir: str, config: Path, out: Path) -> None:
    """A GRUB image that needs nothing from the ISO but its menu: every module it uses built in."""
    program = next((p for p in ("grub-mkimage", "grub2-mkimage") if shutil.which(p)), "grub-mkimage")
    fmt = "i386-pc-eltorito" if platform == "bios" else "x86_64-efi"
    ctx.runner.run([program, "-O", fmt, "-d", modules_dir, "-p", "/boot/grub", "-c", str(config), "-o", str(out),
                    *GRUB_IMAGE_MODULES, *GRUB_PLATFORM_MODULES[platform]], timeout=300)


def fat_image(ctx: Context, files: Sequence[Tuple[str, Path]], out: Path) -> None:
    """A FAT image (the ISO's El Torito UEFI image and EFI system partition) holding files
    ((path in the image, source)); its size is what they need."""
    mib = 1 << 20
    size = sum(source.stat().st_size for _, source in files)
    sectors = (-(-(size * 105 // 100 + mib) // mib) + 1) * 2048
    env = {"SOURCE_DATE_EPOCH": ISO_EPOCH, "MTOOLS_SKIP_CHECK": "1"}
    ctx.runner.run(["mformat", "-i", str(out), "-C", "-T", str(sectors), "-h", "64", "-s", "32", "-N", "0", "::"],
                   env=env, timeout=60)
    directories = sorted({posixpath.dirname(p) for p, _ in files} - {""})
    wanted = sorted({"/".join(d.split("/")[:n]) for d in directories for n in range(1, d.count("/") + 2)})
    ctx.runner.run(["mmd", "-i", str(out)] + [f"::/{d}" for d in wanted], env=env, timeout=60)
    for path, source in files:
        ctx.runner.run(["mcopy", "-i", str(out), str(source), f"::/{path}"], env=env, timeout=60)


def make_iso(ctx: Context, manifest: Manifest, kernel: Path, initrd: Path, iso: Path, work: Path) -> None:
    """The hybrid ISO (xorriso): BIOS boots GRUB's El Torito image, UEFI the FAT image (also the
    EFI system partition when the ISO is written to a USB stick) with the host's signed shim
    chain or a GRUB made here; both find the ISO by its marker and show one menu."""
    boot = manifest.boot or IsoBoot()
    tree = work / "iso"
    (tree / "boot" / "grub").mkdir(parents=True)
    (tree / ".disk").mkdir()
    shutil.copyfile(str(kernel), str(tree / "boot" / "kernel"))
    shutil.copyfile(str(initrd), str(tree / "boot" / "initrd.cgz"))
    (tree / "boot" / "grub" / "grub.cfg").write_text(grub_config(manifest))
    marker = f"/.disk/rescue-{hashlib.sha256(initrd.read_bytes()).hexdigest()[:16]}"
    # Debian's signed CD GRUB finds its medium by /.disk/info when its own prefix is not there.
    for name in (marker, "/.disk/info"):
        (tree / name.lstrip("/")).write_text(f"rescue {__version__}: rescue system of {manifest.hostname}\n")
    embedded = work / "grub-embedded.cfg"
    embedded.write_text(grub_search_config(marker, then_menu=False))
    partial = iso.with_name(f".{iso.name}.partial")
    argv = ["xorriso", "-as", "mkisofs", "-quiet", "-o", str(partial), "-R", "-V", ctx.config.setting("ISO_VOLID")]
    if boot.bios_modules:
        grub_image(ctx, "bios", boot.bios_modules, embedded, tree / "boot" / "grub" / "bios.img")
        argv += ["-b", "boot/grub/bios.img", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
                 "--grub2-boot-info", "--grub2-mbr", f"{boot.bios_modules}/boot_hybrid.img"]
    files: List[Tuple[str, Path]] = []
    if boot.shim:
        stub = work / "grub-stub.cfg"
        stub.write_text(grub_search_config(marker, then_menu=True))
        files = [(REMOVABLE_LOADER, Path(boot.shim)),
                 (f"EFI/BOOT/{boot.grub_name}", Path(boot.grub)), ("EFI/BOOT/grub.cfg", stub)]
        mok = posixpath.basename(boot.mok_manager)
        files += [(f"EFI/BOOT/{mok.removesuffix('.signed')}", Path(boot.mok_manager))] if boot.mok_manager else []
        files += [(f"EFI/{vendor}/grub.cfg", stub) for vendor in boot.vendor_dirs]
    elif boot.efi_modules:
        loader = work / "BOOTX64.EFI"
        grub_image(ctx, "efi", boot.efi_modules, embedded, loader)
        files = [(REMOVABLE_LOADER, loader)]
    if files:
        fat_image(ctx, files, tree / "boot" / "efi.img")
        argv += ["--efi-boot", "boot/efi.img", "-efi-boot-part", "--efi-boot-image"]
    argv += ["--protective-msdos-label", str(tree)]
    for path in [tree, *tree.rglob("*")]:          # xorriso records them (SOURCE_DATE_EPOCH sets the rest)
        os.utime(str(path), (int(ISO_EPOCH), int(ISO_EPOCH)), follow_symlinks=False)
    ctx.runner.run(argv, env={"SOURCE_DATE_EPOCH": ISO_EPOCH}, timeout=600)
    os.replace(str(partial), str(iso))


@dataclass
class MediaResult:
    files: List[Path]
    initramfs_size: int
    checks: List[str]
    seconds: float


def make_rescue_media(ctx: Context, manifest: Manifest, selftest: bool = True) -> MediaResult:
    started = time.monotonic()
    out_dir = Path(ctx.config.setting("ISO_DIR"))
    prefix = ctx.config.setting("ISO_PREFIX").replace("$HOSTNAME", manifest.hostname) or f"rescue-{manifest.hostname}"
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with work_directory("rescue-media-", str(out_dir)) as work:
        stage = work / "root"
        stage_tree(manifest, stage)
        regenerate_module_index(ctx, manifest, stage)
        checks = self_test(ctx, manifest, stage) if selftest else []
        buffer = io.BytesIO()
        write_cpio(buffer, tree_entries(stage))
        packed = compress(buffer.getvalue(), manifest.compression, ctx.runner, work)
        kernel, initrd = out_dir / f"{prefix}-kernel", out_dir / f"{prefix}-initrd.cgz"
        write_file(initrd, packed)
        with open(manifest.kernel, "rb") as source:
            write_file(kernel, source.read(), 0o644)
        files = [kernel, initrd]
        if ctx.config.setting("OUTPUT") == "ISO":
            iso = out_dir / f"{prefix}.iso"
            make_iso(ctx, manifest, kernel, initrd, iso, work)
            files.append(iso)
    copy_to_output_url(ctx, files)
    return MediaResult(files, len(packed), checks, time.monotonic() - started)


def copy_to_output_url(ctx: Context, files: List[Path]) -> None:
    url = ctx.config.setting("OUTPUT_URL")
    if not url:
        return
    scheme = urllib.parse.urlsplit(url).scheme
    local = url_path(url)
    if local is not None:
        Path(local).mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copyfile(str(path), os.path.join(local, path.name))
    elif scheme in ("rsync", "sftp", "scp") and ssh_login(url, "") is not None:
        login = ssh_login(url, ctx.ssh_options())
        mkdir = ssh_mkdir_command(url, ctx.ssh_options())
        if mkdir:
            ctx.runner.run(mkdir, timeout=120)
        host = login[-1]
        ssh = " ".join(shlex.quote(a) for a in login[:-1])
        ctx.runner.run(["rsync", "-t", "-e", ssh] + [str(p) for p in files] + [f"{host}:{remote_path(url) or '.'}/"],
                       timeout=3600)
    else:
        raise RescueError(f"OUTPUT_URL {url}: rescue copies media to file://, rsync:// and sftp:// URLs",
                          "use one of those, or copy the files from ISO_DIR yourself")
    ctx.log.say(f"Copied the rescue media to {url}")


# =============================================================================================
# 21. cli
# =============================================================================================

@dataclass
class Workflow:
    name: str
    func: object
    summary: str
    needs_root: bool = False       # touches the system
    changes_state: bool = False    # takes the lock
    arguments: Optional[object] = None    # adds its own argparse arguments


WORKFLOWS: Dict[str, Workflow] = {}


def workflow(name: str, summary: str, needs_root: bool = False, changes_state: bool = False,
             arguments: Optional[object] = None):
    def register(func):
        WORKFLOWS[name] = Workflow(name, func, summary, needs_root, changes_state, arguments)
        return func
    return register


def dump_text(config: Config, expose: bool) -> str:
    lines = [f"# rescue {__version__}: effective configuration",
             "# from: " + ", ".join(str(p) for p in config.files)]
    for name in sorted(config.values):
        value = config.values[name]
        if config.is_secret(name) and not expose and value:
            lines.append(f"{name}={REDACTED}")
        else:
            lines.append(f"{name}={format_value(value)}")
    return "\n".join(lines)


def dump_json(config: Config, expose: bool) -> str:
    shown = {name: (REDACTED if config.is_secret(name) and not expose and value else value)
             for name, value in config.values.items()}
    return json.dumps(shown, indent=2, sort_keys=True, ensure_ascii=False)


def dump_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object {NAME: value}")


@workflow("dump", "show the effective configuration (secrets as ***)", arguments=dump_arguments)
def wf_dump(ctx: Context) -> int:
    expose = ctx.args.expose_secrets
    text = dump_json(ctx.config, expose) if ctx.args.json else dump_text(ctx.config, expose)
    # A secret can hide inside another value (a password in a URL): redact the whole output.
    print(text if expose else ctx.log.redact(text))
    return 0


@workflow("duplicity", "run the bundled duplicity (or DUPLICITY_PROG) with ARGS")
def wf_duplicity(ctx: Context) -> int:
    argv, env = duplicity_command(ctx.config)
    result = ctx.runner.run(argv + ctx.args.duplicity_args, env=env, capture=False, check=False,
                            inherit_env=True, program="duplicity")
    return result.returncode


def savelayout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the layout as JSON instead of a tree")
    parser.add_argument("--record", metavar="DIR", help="also keep every tool output in DIR (a support bundle)")
    parser.add_argument("--replay", metavar="DIR", help="build the layout from a recording; runs nothing")
    parser.add_argument("-o", "--output", metavar="DIR",
                        help="write layout.json here (default LAYOUT_DIR; with --replay nothing is written unless given)")


@workflow("savelayout", "record the storage layout into layout.json (and vgcfgbackup files)",
          changes_state=True, arguments=savelayout_arguments)
def wf_savelayout(ctx: Context) -> int:
    captured = capture_for(ctx, "savelayout")
    output = ctx.args.output or (None if ctx.args.replay else layout_dir(ctx.config))
    if output:
        save_layout_files(captured, Path(output))
        ctx.log.info(f"Saved the layout in {output}/layout.json")
    print(layout_to_json(captured.layout) if ctx.args.json else format_layout(captured.layout), end="\n")
    return 0


def checklayout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replay", metavar="DIR", help="compare a recording instead of the live system")


@workflow("checklayout", "exit 0 if the storage equals the saved layout, 1 if it differs, 2 on error",
          arguments=checklayout_arguments)
def wf_checklayout(ctx: Context) -> int:
    saved_path = layout_dir(ctx.config) / "layout.json"
    try:
        saved = saved_layout(ctx.config)
        current = capture_for(ctx, "checklayout").layout
    except RescueError as exc:
        exc.exit_code = 2
        raise
    changes = diff_layouts(saved, current)
    if not changes:
        ctx.log.say(f"The storage layout equals the saved one ({saved_path}).")
        return 0
    ctx.log.say(f"The storage layout differs from the saved one ({saved_path}):")
    for change in changes:
        ctx.log.say(f"  {change}")
    ctx.log.say("Run 'rescue savelayout' (and make new rescue media and a backup) to record it.")
    return 1


@workflow("mkbackuponly", "save the layout, remove old backups as configured, back up with duplicity",
          needs_root=True, changes_state=True)
def wf_mkbackuponly(ctx: Context) -> int:
    return make_backup(ctx)


def status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


@workflow("status", "show the backup chains on the target and the last backup's statistics",
          arguments=status_arguments)
def wf_status(ctx: Context) -> int:
    with own_gpg_agent(ctx.runner):
        status = collection_status(ctx)
    last = previous_record(ctx.config)
    if ctx.args.json:
        print(ctx.log.redact(json.dumps(dict(status, last_backup=last or None), indent=2)))
    else:
        print(ctx.log.redact(describe_status(status, last)))
    return 0


def verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compare-data", action="store_true",
                        help="accepted as duplicity's option: rescue's verify always compares contents and metadata "
                             "(duplicity 3 compares nothing without it)")
    parser.add_argument("--time", metavar="TIME", help="verify the backup as of TIME (default: the latest)")


@workflow("verify", "compare the latest (or --time) backup with the live system; exit 1 when there are "
          "differences, 2 when it could not verify", needs_root=True, arguments=verify_arguments)
def wf_verify(ctx: Context) -> int:
    time_ = time_option("--time", ctx.args.time) if ctx.args.time else None
    try:
        with own_gpg_agent(ctx.runner):
            compared, differences, lines = verify_backup(ctx, time_)
    except RescueError as exc:             # not a difference: the comparison did not happen
        exc.exit_code = max(exc.exit_code, 2)
        raise
    for line in lines[:50]:
        ctx.log.say("  " + line)
    if len(lines) > 50:
        ctx.log.say(f"  … and {len(lines) - 50} more (see the log)")
    ctx.log.say(f"Verify: {compared} files compared, {differences} differences found")
    return 1 if differences else 0


def restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", metavar="DIR",
                        help="restore into DIR: empty, or freshly made filesystems mounted there (default: "
                        "into TARGET_FS_ROOT, as recreated by layoutonly, and finalize it to boot)")
    parser.add_argument("--restore-time", metavar="TIME",
                        help="restore the backup as of TIME (default: BACKUP_DUPLICITY_RESTORE_TIME, else the latest)")
    parser.add_argument("--layout-only", action="store_true",
                        help="only fetch the layout and configuration stored beside the backup")
    passphrase_argument(parser)


def passphrase_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--passphrase-file", metavar="FILE",
                        help="read the duplicity passphrase from FILE (instead of the configuration or the prompt)")


@workflow("restoreonly", "restore the backup into --target DIR (may hold mounted filesystems)",
          needs_root=True, changes_state=True, arguments=restore_arguments)
def wf_restoreonly(ctx: Context) -> int:
    time_ = restore_time(ctx.config, ctx.args.restore_time)
    if ctx.args.target is not None and not ctx.args.target.strip():
        raise ConfigError("--target is empty", "give the directory to restore into, e.g. --target /mnt/local")
    if ctx.args.target and ctx.args.target != os.fsencode(ctx.args.target).decode("utf-8", "replace"):
        shown = os.fsencode(ctx.args.target).decode("utf-8", "backslashreplace")
        raise ConfigError(f"--target {shown}: the name is not UTF-8, and duplicity can restore only into one that is",
                          "restore into a directory with a UTF-8 name, then move the files")
    if not ctx.args.target:
        if ctx.args.layout_only:
            raise ConfigError("--layout-only needs --target DIR", "e.g. --layout-only --target /tmp/layout")
        return restore_and_finalize(ctx, time_)
    target = Path(ctx.args.target)
    if ctx.args.layout_only:
        fetch_layout(ctx, target, time_)
        ctx.log.say(f"Layout and configuration stored in {target}")
        return 0
    started = time.monotonic()
    written = restore_backup(ctx, target, time_)
    ctx.log.say(f"Restore done: {human_size(written)} written into {target} in {time.monotonic() - started:.1f} s")
    return 0


def recreate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", metavar="FILE", help="the layout.json to recreate (default: LAYOUT_DIR's, "
                        "else the one stored beside the backup)")
    parser.add_argument("--restore-time", metavar="TIME", help="the layout stored with the backup of TIME")
    parser.add_argument("--map", metavar="OLD=NEW", action="append", default=[],
                        help="put the layout's disk OLD onto the disk NEW here (repeatable)")
    parser.add_argument("--plan", action="store_true", help="show the mapping, the disks to wipe and every step; run nothing")
    parser.add_argument("--script", metavar="FILE", help="write the plan as a commented bash script; run nothing")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON; run nothing")
    parser.add_argument("--replay", metavar="DIR",
                        help="take the disks here from a 'savelayout --record' recording (with --plan/--script/--json)")
    parser.add_argument("--yes", action="store_true", help="confirm the mapping and the wipe without asking")
    parser.add_argument("--restart", action="store_true", help="forget an interrupted run and plan anew")


@workflow("layoutonly", "recreate partitions, RAID, LUKS, LVM and filesystems from the layout and mount them "
          "under TARGET_FS_ROOT (--plan: only show how)", arguments=recreate_arguments)
def wf_layoutonly(ctx: Context) -> int:
    if recreate(ctx, "rescue layoutonly" + ("" if not ctx.args.layout else f" --layout {shlex.quote(ctx.args.layout)}")):
        ctx.log.say(f"The storage is recreated; its filesystems are mounted under {ctx.config.setting('TARGET_FS_ROOT')}")
    return 0


def mountonly_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", metavar="FILE", help="the layout.json to mount (default: as layoutonly)")
    parser.add_argument("--restore-time", metavar="TIME", help="the layout stored with the backup of TIME")


@workflow("mountonly", "assemble RAID, open LUKS, activate LVM and mount the recreated tree under "
          "TARGET_FS_ROOT (creates nothing)", needs_root=True, arguments=mountonly_arguments)
def wf_mountonly(ctx: Context) -> int:
    layout, _ = recovery_layout(ctx)
    root = ctx.config.setting("TARGET_FS_ROOT")
    steps = mountonly_plan(layout, root)
    check_programs(steps)
    secrets = luks_secrets(ctx, [(s.secret, f"the LUKS device {s.params['name']}") for s in steps if s.secret], new=False)
    for n, step in enumerate(steps, 1):
        ctx.log.say(f"[{n}/{len(steps)}] {step.title}")
        run_step(ctx, step, secrets)
    ctx.log.say(f"The storage of {layout.hostname} is mounted under {root}")
    return 0


def recover_arguments(parser: argparse.ArgumentParser) -> None:
    recreate_arguments(parser)
    passphrase_argument(parser)
    parser.add_argument("--unmount", action="store_true",
                        help="unmount the recovered system afterwards (stop LVM, LUKS, RAID)")


@workflow("recover", "recreate the storage, restore the backup into it and make it boot "
          "(--plan: only show how)", changes_state=True, arguments=recover_arguments)
def wf_recover(ctx: Context) -> int:
    return recover(ctx)
def mkrescue_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", action="store_true",
                        help="print what the rescue system would hold, and from where; build nothing")
    parser.add_argument("--json", action="store_true", help="with --manifest: as JSON")


def mkrescue(ctx: Context) -> int:
    output = ctx.config.setting("OUTPUT")
    if output not in MEDIA_OUTPUTS:
        raise RescueError(f"OUTPUT={output}: rescue makes OUTPUT=ISO (a BIOS+UEFI hybrid ISO, which can be written "
                          "to a USB stick) or OUTPUT=RAMDISK (kernel and initramfs, e.g. for PXE)",
                          "set OUTPUT=ISO or OUTPUT=RAMDISK; the backup workflows do not depend on it")
    if ctx.args.manifest:
        layout = capture_layout(Probe(ctx.runner), ctx.config, hostname()).layout
    else:
        layout = save_layout_for_backup(ctx)
    manifest = build_manifest(MediaProbe(ctx.runner), ctx.config, layout, rescue_pyz())
    if ctx.args.manifest:
        print(json.dumps(manifest.as_dict(), indent=2) if ctx.args.json else manifest_text(manifest), end="")
        return 0
    if manifest.boot and not manifest.boot.bootable:
        raise RescueError("this host has no GRUB to make a bootable ISO with",
                          "install GRUB's modules (grub-pc-bin, grub-efi-amd64-bin; grub2-pc-modules), or set OUTPUT=RAMDISK")
    for warning in manifest.warnings:
        ctx.log.warn(warning)
    if ctx.config.setting("RESCUE_GPG_PASSPHRASE") and ctx.config.get("BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE"):
        ctx.log.warn("RESCUE_GPG_PASSPHRASE=yes: the duplicity passphrase goes into the rescue media; "
                     "whoever holds them can read the backup")
    ctx.log.say(f"Making the rescue system: {len(manifest.files)} files, {len(manifest.tools)} tools, "
                f"{len(manifest.modules)} kernel modules, {len(manifest.firmware)} firmware files")
    result = make_rescue_media(ctx, manifest)
    for check in result.checks:
        ctx.log.info(f"self-test: {check}")
    ctx.log.say(f"Self-test passed ({len(result.checks)} checks); initramfs {human_size(result.initramfs_size)} "
                f"({manifest.compression}), made in {result.seconds:.1f} s")
    for path in result.files:
        ctx.log.say(f"  {path} ({human_size(path.stat().st_size)})")
    return 0


@workflow("mkrescue", "make the rescue media from this host: kernel, initramfs and (OUTPUT=ISO) a BIOS+UEFI ISO "
          "in ISO_DIR, copied to OUTPUT_URL", needs_root=True, changes_state=True, arguments=mkrescue_arguments)
def wf_mkrescue(ctx: Context) -> int:
    return mkrescue(ctx)


@workflow("mkbackup", "mkrescue, then mkbackuponly", needs_root=True, changes_state=True, arguments=mkrescue_arguments)
def wf_mkbackup(ctx: Context) -> int:
    rc = mkrescue(ctx)
    return rc if rc or ctx.args.manifest else make_backup(ctx)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors in rescue's one-line form."""

    def error(self, message: str) -> NoReturn:
        hint = f"see '{self.prog} --help'"
        unknown = message.split(":", 1)[1].split() if message.startswith("unrecognized arguments:") else []
        misplaced = [word for word in unknown if word in GLOBAL_OPTIONS]
        if misplaced:
            hint = f"{', '.join(misplaced)} is an option of rescue itself: put it before the workflow " \
                   f"(rescue {' '.join(misplaced)} … WORKFLOW …)"
        raise ConfigError(message, hint)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="rescue", description="Bare-metal disaster recovery for Linux with duplicity "
        "(ReaR-compatible configuration).")
    parser.add_argument("--version", action="version", version=f"rescue {__version__}")
    parser.add_argument("-c", dest="config_dir", metavar="CONFIG_DIR",
                        help="configuration directory (default /etc/rescue, else /etc/rear)")
    parser.add_argument("-C", dest="extra_conf", metavar="EXTRA_CONF", action="append", default=[],
                        help="additional configuration file, loaded last (repeatable)")
    parser.add_argument("-v", dest="verbose", action="store_true", help="verbose: show every command")
    parser.add_argument("-d", dest="debug", action="store_true", help="debug: details and tracebacks")
    parser.add_argument("--non-interactive", action="store_true",
                        help="never ask: take the safe default, or stop")
    parser.add_argument("--expose-secrets", action="store_true",
                        help="show secret values in dump output (they are never logged)")
    sub = parser.add_subparsers(dest="workflow", metavar="WORKFLOW", parser_class=ArgumentParser)
    sub.add_parser("help", help="show this help")
    for wf in WORKFLOWS.values():
        wf_parser = sub.add_parser(wf.name, help=wf.summary, description=wf.summary)
        if wf.arguments:
            wf.arguments(wf_parser)
    return parser


PASSTHROUGH = "duplicity"
GLOBAL_OPTIONS_WITH_VALUE = ("-c", "-C")
GLOBAL_OPTIONS = GLOBAL_OPTIONS_WITH_VALUE + ("-v", "-d", "--non-interactive", "--expose-secrets")


def split_passthrough(argv: List[str]) -> Tuple[List[str], List[str]]:
    """`rescue [options] duplicity ARGS…`: everything after the workflow name belongs to
    duplicity, options included, which argparse cannot express."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in GLOBAL_OPTIONS_WITH_VALUE:
            i += 2
            continue
        if token.startswith("-"):
            i += 1
            continue
        if token == PASSTHROUGH:
            return argv[:i + 1], argv[i + 1:]
        break
    return argv, []


def open_log(config: Config, log: Log) -> None:
    path = Path(config.get("LOGFILE") or f"/var/log/rescue/rescue-{hostname()}.log")
    try:
        log.open_file(path)
    except OSError as exc:
        if os.geteuid() == 0:
            raise RescueError(f"cannot write the log file {path}: {exc.strerror}",
                              "set LOGFILE to a writable path") from None
        log.debug(f"no log file ({path}: {exc.strerror})")
        return
    log.info(f"Using log file: {path}")


def run_workflow(args: argparse.Namespace, parser: argparse.ArgumentParser, log: Log) -> int:
    if args.workflow in (None, "help"):
        parser.print_help()
        return 0 if args.workflow == "help" else 2
    wf = WORKFLOWS[args.workflow]
    config = load_config(config_files(args.config_dir, args.extra_conf), dict(os.environ), log)
    if wf.needs_root:
        require_root(wf.name)
    ctx = Context(args, config, log, Runner(log))
    if wf.name != "dump":
        open_log(config, log)
    try:
        if not wf.changes_state:
            return wf.func(ctx)
        with Lock(Path(config.get("LOCKFILE") or "/run/lock/rescue.lock"), wf.name):
            return wf.func(ctx)
    finally:
        ctx.ssh.close(ctx.runner)


def on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    log = Log()
    debug = "-d" in (sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        parser = build_parser()
        own, passed = split_passthrough(list(sys.argv[1:] if argv is None else argv))
        args = parser.parse_args(own)
        args.duplicity_args = passed
        log.verbose, log.debug_enabled = args.verbose, args.debug
        return run_workflow(args, parser, log)
    except RescueError as exc:
        if debug:
            import traceback
            traceback.print_exc()
        log.error(exc.message, exc.hint)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted by Ctrl-C", "nothing more was started; a re-run continues from a safe state")
        return 130
    except Terminated:
        log.error("stopped by SIGTERM", "the running commands were stopped; a re-run continues from a safe state")
        return 143
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if debug:
            raise
        log.error(f"internal error: {type(exc).__name__}: {exc}",
                  "run again with -d for a traceback, and report it with the log")
        return 3
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
