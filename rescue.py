#!/usr/bin/env python3
"""rescue - bare-metal disaster recovery for Linux with duplicity.

A Python reimplementation of what Relax-and-Recover (ReaR) does with BACKUP=DUPLICITY, in one
stdlib-only module (Python 3.9+). It reads ReaR-compatible configuration (/etc/rescue or /etc/rear),
and shells out to the system's storage tools, gpg and duplicity through one runner.

Map of this file (sections in the order data flows):
  1. errors and log   RescueError, the Log that redacts every secret value, once
  2. config           a parser for the safe subset of bash that ReaR configs use -> Config
  3. runner           the only code that starts processes; dry-run records instead
  4. tools            every external program named once, with the package that provides it
  5. duplicity        where duplicity comes from (bundled in the zipapp, or the system's)
  6. lock             one state-changing workflow at a time
  7. cli              argparse; each workflow is a short function composing the above

Usage: rescue [-c CONFIG_DIR] [-C EXTRA_CONF]... [-v] [-d] [--non-interactive]
              [--expose-secrets] WORKFLOW [args]
"""

import argparse
import difflib
import fcntl
import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

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


REDACTED = "***"


class Log:
    """Console messages and the log file. Every line passes through redact() first.

    Secrets are registered as soon as they are known (config values, secret environment
    variables given to the runner), so no later message can carry one.
    """

    def __init__(self, verbose: bool = False, debug: bool = False) -> None:
        self.verbose = verbose
        self.debug_enabled = debug
        self.secrets: Set[str] = set()
        self.path: Optional[Path] = None
        self._file = None

    def add_secret(self, value: str) -> None:
        if value:
            self.secrets.add(value)

    def redact(self, text: str) -> str:
        # Longest first, so a secret that contains another is replaced whole.
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
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
        if self._file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            for line in message.splitlines() or [""]:
                self._file.write(f"{stamp} {level:5} {line}\n")
            self._file.flush()

    def say(self, message: str) -> None:
        """A message the user always sees (progress of a workflow)."""
        message = self.redact(message)
        print(message, flush=True)
        self._write("INFO", message)

    def info(self, message: str) -> None:
        """Detail for the log; on the console only with -v."""
        message = self.redact(message)
        if self.verbose:
            print(message, flush=True)
        self._write("INFO", message)

    def debug(self, message: str) -> None:
        message = self.redact(message)
        if self.debug_enabled:
            print(message, file=sys.stderr, flush=True)
        self._write("DEBUG", message)

    def warn(self, message: str) -> None:
        message = self.redact(message)
        print(f"rescue: warning: {message}", file=sys.stderr, flush=True)
        self._write("WARN", message)

    def error(self, message: str, hint: str = "") -> None:
        message, hint = self.redact(message), self.redact(hint)
        print(f"rescue: error: {message}", file=sys.stderr, flush=True)
        if hint:
            print(f"rescue: hint: {hint}", file=sys.stderr, flush=True)
        self._write("ERROR", message + (f"\nhint: {hint}" if hint else ""))


# =============================================================================================
# 2. config
#
# ReaR's configuration files are bash. We parse the subset that assigns variables and refuse
# everything else with FILE:LINE, so nothing in a configuration is ever executed, and a value is
# never different from what bash would give: where we cannot be sure, we refuse.
# =============================================================================================

Value = Union[str, List[str]]

SECRET_NAME_PARTS = ("PASSPHRASE", "PASSWORD", "SECRET")
# Names that contain a secret-looking word but hold a flag or a device name, not a secret:
# redacting "true" or "null" everywhere would garble every log line.
NOT_SECRET_NAMES = frozenset({"BACKUP_DUPLICITY_ASK_PASSPHRASE", "SECRET_OUTPUT_DEV"})
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


def _unsupported_hint(construct: str) -> str:
    if construct.startswith("command substitution") or construct.startswith("arithmetic"):
        return "rescue never runs commands from its configuration; write the value literally"
    if construct.startswith("source"):
        return "load more files with -C FILE instead"
    if construct.startswith("glob") or construct.startswith("brace expansion"):
        return "bash would expand it to file names; quote it"
    if construct.startswith("tilde"):
        return 'write "$HOME" instead of ~'
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
                parts.append(self.dollar(quoted=in_dquotes))
            elif c == "`":
                raise self.fail("command substitution `…`")
            elif c == "~" and not in_dquotes and (
                    at_start or (assignment and self._prev_unquoted_colon(parts))):
                raise self.fail("tilde expansion ~")
            else:
                parts.append(Lit(self.advance(), in_dquotes))
            at_start = False

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
                        if isinstance(p, Var) and p.index != "@":
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
                raise self.fail("command substitution `…`")
            else:
                parts.append(Lit(self.advance(), True))

    def dollar(self, quoted: bool):
        nxt = self.peek(1)
        if nxt == "(":
            raise self.fail("arithmetic $(( … ))" if self.peek(2) == "(" else "command substitution $( … )")
        if nxt == "[":
            raise self.fail("arithmetic $[ … ]")
        if nxt == "{":
            return self.braced(quoted)
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

    def braced(self, quoted: bool) -> Var:
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
        arg = self.parse_word(assignment=False, stop="}", in_dquotes=quoted)
        if self.peek() != "}":
            raise Unsupported(f"unterminated ${{{name}{op}…", start_line, "add the closing }")
        self.advance()
        return Var(name, quoted, op, arg, index)


BREAK = None          # a field boundary, from "${ARR[@]}"
Segment = Tuple[str, bool, bool]      # text, quoted, subject to word splitting
IFS_WHITESPACE = " \t\n"
GLOB_CHARS = "*?["


class ShellState:
    """Variables as bash would see them: the environment, HOSTNAME, then the config files."""

    def __init__(self, environ: Dict[str, str]) -> None:
        self.vars: Dict[str, Value] = {k: v for k, v in environ.items() if NAME_RE.fullmatch(k)}
        self.vars.setdefault("HOSTNAME", socket.gethostname())

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
            else:
                out.extend(self.expand_var(part, line, fields))
        return out

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
        raise config_refusal(path, exc) from None


def config_refusal(path: Path, exc: Unsupported) -> ConfigError:
    return ConfigError(f"{path}:{exc.line}: unsupported shell syntax: {exc.construct} ({exc.hint})")


def load_config(files: Sequence[Path], environ: Dict[str, str], log: Log) -> Config:
    """Parse and evaluate files in order (the first is default.conf, which defines known names)."""
    state = ShellState(environ)
    values: Dict[str, Value] = {}
    secret_names: Set[str] = set()
    origin: Dict[str, Tuple[Path, int]] = {}
    known: Set[str] = set()
    warned: Set[str] = set()
    for n, path in enumerate(files):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc}",
                              "check the path and its permissions") from None
        for a in parse_config_text(text, path):
            try:
                state.assign(a)
            except Unsupported as exc:
                raise config_refusal(path, exc) from None
            values[a.name] = state.vars[a.name]
            origin[a.name] = (path, a.line)
            if a.secret:
                secret_names.add(a.name)
            if n == 0:
                known.add(a.name)
            elif a.name not in known and a.name not in warned:
                warn_unknown(a.name, known, path, a.line, log)
                warned.add(a.name)
    config = Config(values, secret_names, list(files), origin)
    for secret in config.secret_values():
        log.add_secret(secret)
    return config


def warn_unknown(name: str, known: Set[str], path: Path, line: int, log: Log) -> None:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
    advice = f"did you mean {close[0]}?" if close else "rescue does not use it"
    log.warn(f"{path}:{line}: {name} is not a known variable; {advice}")


def config_files(config_dir: Optional[str], extra: Sequence[str]) -> List[Path]:
    """default.conf, then CONFIG_DIR/{site,local}.conf, then each -C file, as ReaR does."""
    if not DEFAULT_CONF.is_file():
        raise RescueError(f"{DEFAULT_CONF} is missing",
                          "run rescue from its source tree or as dist/rescue.pyz, which carries conf/")
    if config_dir is None:
        config_dir = "/etc/rescue" if Path("/etc/rescue").is_dir() else "/etc/rear"
        directory = Path(config_dir)
    else:
        directory = Path(config_dir)
        if not directory.is_dir():
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
    raise ConfigError(f"configuration file {name} not found",
                      f"give a path, or a name in {directory} (with or without .conf)")


# =============================================================================================
# 3. runner
#
# The only code that starts processes: argv lists (never a shell), an explicit environment with
# LC_ALL=C, a logged command line with secrets redacted, and failures turned into one clear error.
# =============================================================================================

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What a tool may need from the caller's environment; everything else is left behind.
PASSED_ENV = ("PATH", "HOME", "TERM", "TMPDIR", "USER", "LOGNAME", "SSH_AUTH_SOCK", "GNUPGHOME", "TZ")
STDERR_TAIL_LINES = 10


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
    """Runs commands for the workflows. In dry-run mode, commands that change the system are
    recorded (for a reviewable plan) instead of run; read-only probes still run."""

    def __init__(self, log: Log, dry_run: bool = False) -> None:
        self.log = log
        self.dry_run = dry_run
        self.recorded: List[str] = []

    def environment(self, extra: Optional[Dict[str, str]], inherit: bool) -> Dict[str, str]:
        if inherit:
            env = dict(os.environ)
        else:
            env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.setdefault("PATH", DEFAULT_PATH)
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
            capture: bool = True, cwd: Optional[str] = None, readonly: bool = False,
            inherit_env: bool = False) -> Result:
        """Run argv. capture=False connects the command to our terminal (interactive tools)."""
        argv = [str(a) for a in argv]
        full_env = self.environment(env, inherit_env)
        line = self.command_line(argv, env)
        if self.dry_run and not readonly:
            self.recorded.append(line)
            self.log.info(f"would run: {line}")
            return Result(argv, 0, "", "", 0.0)
        self.log.info(f"running: {line}")
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv, env=full_env, cwd=cwd,
                stdin=subprocess.PIPE if input is not None else (None if not capture else subprocess.DEVNULL),
                stdout=subprocess.PIPE if capture else None,
                stderr=subprocess.PIPE if capture else None,
                start_new_session=capture)     # own process group: a timeout kills all of it
        except FileNotFoundError as exc:
            raise missing_program(argv[0]) if exc.filename in (argv[0], None) else exc from None
        except PermissionError:
            raise RescueError(f"cannot execute {argv[0]}: permission denied",
                              "check that it is an executable file") from None
        stdout, stderr = self._communicate(proc, input, timeout, line)
        result = Result(argv, proc.returncode, stdout, stderr, time.monotonic() - started)
        self.log.debug(f"exit code {proc.returncode} after {result.duration:.2f}s")
        if check and proc.returncode != 0:
            raise CommandError(line, proc.returncode, self.log.redact(stderr))
        return result

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


# =============================================================================================
# 4. tools
#
# Every external program rescue runs, named once, with the package that usually provides it on
# Debian/Ubuntu, RHEL/Alma/Rocky and SUSE (so an error can say what to install).
# =============================================================================================

TOOLS: Dict[str, Tuple[str, str, str]] = {
    #  program             Debian/Ubuntu      RHEL family       SUSE
    "duplicity":        ("duplicity",       "duplicity (EPEL)", "duplicity"),
    "gpg":              ("gnupg",           "gnupg2",          "gpg2"),
    "rsync":            ("rsync",           "rsync",           "rsync"),
    "ssh":              ("openssh-client",  "openssh-clients", "openssh-clients"),
}


def missing_program(program: str) -> RescueError:
    packages = TOOLS.get(os.path.basename(program))
    if packages:
        hint = (f"install it: Debian/Ubuntu package {packages[0]}, RHEL/Alma/Rocky {packages[1]}, "
                f"SUSE {packages[2]}")
    else:
        hint = "install it, or check PATH"
    return RescueError(f"program '{program}' not found", hint)


# =============================================================================================
# 5. duplicity
#
# dist/rescue.pyz carries duplicity (pure Python once, plus _librsync for CPython 3.9-3.13), so
# one copied file works where duplicity is not installed. DUPLICITY_PROG selects another one.
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


def duplicity_command(config: Config) -> Tuple[List[str], Dict[str, str]]:
    """argv prefix and extra environment that run duplicity."""
    prog = config.get("DUPLICITY_PROG")
    if prog:
        return [prog], {}
    site = bundled_duplicity_dir()
    if site is not None:
        # The child is a fresh interpreter: it needs the (extracted) bundle on its path.
        return [sys.executable, "-m", "duplicity"], {"PYTHONPATH": str(site)}
    return ["duplicity"], {}


# =============================================================================================
# 6. lock
# =============================================================================================

class Lock:
    """An exclusive flock; the kernel releases it when the holder exits, however it exits."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self.fd: Optional[int] = None

    def __enter__(self) -> "Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o600)
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


# =============================================================================================
# 7. cli
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


@dataclass
class Context:
    """What a workflow gets: nothing is global."""

    args: argparse.Namespace
    config: Config
    log: Log
    runner: Runner


def format_value(value: Value) -> str:
    if isinstance(value, list):
        return "(" + "".join(f" {shlex.quote(v)}" for v in value) + (" )" if value else ")")
    return shlex.quote(value)


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
                            inherit_env=True)
    return result.returncode


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors in rescue's one-line form."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[name-defined]
        raise ConfigError(message, f"see '{self.prog} --help'")


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
    path = Path(config.get("LOGFILE") or f"/var/log/rescue/rescue-{socket.gethostname()}.log")
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
    if wf.needs_root and os.geteuid() != 0:
        raise RescueError(f"'rescue {wf.name}' must run as root", f"run: sudo rescue {wf.name}")
    ctx = Context(args, config, log, Runner(log))
    if wf.name != "dump":
        open_log(config, log)
    if not wf.changes_state:
        return wf.func(ctx)
    with Lock(Path(config.get("LOCKFILE") or "/run/lock/rescue.lock"), wf.name):
        return wf.func(ctx)


def main(argv: Optional[Sequence[str]] = None) -> int:
    log = Log()
    debug = "-d" in (sys.argv[1:] if argv is None else argv)
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
