"""The config parser against bash itself: same values for everything we accept, and a one-line
FILE:LINE refusal, with nothing executed, for everything we do not."""

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rescue
from bash_oracle import bash_source
from conftest import REPO, run_rescue

DATA = Path(__file__).resolve().parent / "data" / "config"
REALDATA = REPO.parent / "shared" / "realdata" / "localconf"
ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/tester",
    "SECRET_OUTPUT_DEV": "null",
    "FROM_ENV": "from the environment",
    "EMPTY_ENV": "",
    "SPACEY": "  lead  mid\ttab\nnewline  trail ",
    **({"TZ": os.environ["TZ"]} if "TZ" in os.environ else {}),     # $(date) needs rescue's own
}


def parse_files(files, env=ENV):
    log = rescue.Log()
    config = rescue.load_config([rescue.DEFAULT_CONF] + list(files), env, log)
    return config, log


def write_conf(tmp_path, text, name="subst.conf"):
    conf = tmp_path / name
    conf.write_text(text.replace("{tmp}", str(tmp_path)))
    return conf


def assert_same_as_bash(files, env=ENV):
    config, _ = parse_files(files, env)
    oracle = bash_source([rescue.DEFAULT_CONF] + list(files), env, extra_names=config.values)
    ours = dict(config.values)
    assert set(ours) == {n for n in oracle if oracle[n] is not None} | (set(ours) - set(oracle))
    for name in sorted(set(ours) | set(oracle)):
        assert ours.get(name) == oracle.get(name), f"{name}: ours {ours.get(name)!r}, bash {oracle.get(name)!r}"
    return config


@pytest.mark.parametrize("name", ["scalars.conf", "arrays.conf", "statements.conf"])
def test_corpus_matches_bash(name):
    assert_same_as_bash([DATA / name])


def test_default_conf_is_bash_and_parses_the_same():
    assert_same_as_bash([])


def test_seed_local_conf_matches_bash():
    config = assert_same_as_bash([REPO / "conf" / "examples" / "duplicity-rsync-local.conf"])
    assert config.get("BACKUP_DUPLICITY_URL") == "rsync://root@192.168.122.1//apps/export/ReaR"
    assert config.get_list("BACKUP_DUPLICITY_EXCLUDE")[4] == "/home/tester/.cache"
    assert config.is_true("BACKUP_DUPLICITY_ASK_PASSPHRASE")
    assert {"BACKUP_DUPLICITY_GPG_ENC_KEY", "BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE",
            "SSH_ROOT_PASSWORD"} <= config.secret_names


def test_secret_wrapper_and_names_mark_secrets():
    config, log = parse_files([DATA / "statements.conf"])
    assert {"SECRET_ONE", "KEY_A", "KEY_B", "MULTI_SECRET"} <= config.secret_names
    assert "NOT_REDIRECTED" not in config.secret_names
    assert config.is_secret("BACKUP_DUPLICITY_GPG_SIGN_PASSPHRASE")     # by its name
    assert not config.is_secret("BACKUP_DUPLICITY_ASK_PASSPHRASE")      # a flag, not a secret
    assert log.redact("[k1] [k2 k1] [s3cret value] [m]") == "[***] [***] [***] [***]"


def test_later_files_override_and_append(tmp_path):
    first, second = tmp_path / "a.conf", tmp_path / "b.conf"
    first.write_text("BACKUP_DUPLICITY_EXCLUDE=( /a )\nOUTPUT=ISO\n")
    second.write_text("BACKUP_DUPLICITY_EXCLUDE+=( '/b c' )\nOUTPUT=USB\n")
    config = assert_same_as_bash([first, second])
    assert config.get_list("BACKUP_DUPLICITY_EXCLUDE") == ["/a", "/b c"]
    assert config.origin["OUTPUT"] == (second, 2)


# A generator of random assignments from the supported subset, each file checked against bash.
PIECES_SCALAR = ["a", "b c", "$", "\\", "'", '"', "#", "*", ":", "=", "{", "}", "~", "é", "\t", " "]


SUBSTITUTED = ["$(hostname)", '"$(hostname -s)"', "`uname -r`", "$(cat TMP/empty)", '"$(cat TMP/empty)"',
               "$(cat TMP/words)", '"$(cat TMP/words)"', "~", "~/p", "~root", ":~"]


def random_word(rng, depth=0):
    kinds = ["lit", "squote", "dquote", "var", "braced", "subst", "default"]
    out = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(kinds if depth < 2 else kinds[:6])
        if kind == "lit":
            out.append(rng.choice(["x", "y1", "-", ".", "/p", "@", "%", ","]))
        elif kind == "squote":
            text = "".join(rng.choice(PIECES_SCALAR) for _ in range(rng.randint(0, 4))).replace("'", "")
            out.append(f"'{text}'")
        elif kind == "dquote":
            inner = "".join(rng.choice(["a", " ", "\\$", "\\\\", "\\\"", "'", "$V1", "${V2}", "${ARR[@]}",
                                        "${ARR[*]}", "${EMPTY_ARR[@]}", "*", "\\a", "$"]) for _ in range(rng.randint(0, 4)))
            out.append(f'"{inner}"')
        elif kind == "var":
            out.append(rng.choice(["$V1", "$V2", "$SPACEY", "$UNSET_X", "$ARR", "$EMPTY_ENV"]))
        elif kind == "braced":
            out.append(rng.choice(["${V1}", "${ARR[@]}", "${ARR[*]}", "${ARR[1]}", "${EMPTY_ARR[@]}", "${SPACEY}"]))
        elif kind == "subst":
            out.append(rng.choice(SUBSTITUTED))
        else:
            op = rng.choice([":-", "-", ":+", "+"])
            var = rng.choice(["V1", "UNSET_X", "EMPTY_ENV"])
            inner = random_word(rng, depth + 1).replace("}", "").replace("{", "").replace("'", "").replace('"', "")
            out.append("${%s%s%s}" % (var, op, inner.replace("\\", "")))
    return "".join(out)


@pytest.mark.parametrize("seed", range(60))
def test_random_files_match_bash(tmp_path, seed):
    rng = random.Random(seed)
    lines = ['V1="one two"', "V2=x", "ARR=( 'a b' '' c )", "EMPTY_ARR=()"]
    for n in range(12):
        if rng.random() < 0.4:
            words = " ".join(random_word(rng) for _ in range(rng.randint(0, 3)))
            lines.append(f"R{n}{'+=' if rng.random() < 0.2 else '='}( {words} )")
        else:
            lines.append(f"R{n}{'+=' if rng.random() < 0.2 else '='}{random_word(rng)}")
    (tmp_path / "empty").write_text("")
    (tmp_path / "words").write_text(" w1  w2\n\n")
    conf = write_conf(tmp_path, "\n".join(lines).replace("TMP", str(tmp_path)) + "\n", "random.conf")
    try:
        parse_files([conf])
    except rescue.ConfigError as exc:
        assert "unsupported shell syntax" in exc.message       # refused, never misparsed
        return
    assert_same_as_bash([conf])


REFUSED = [
    ("A=1\nX=$(touch {canary})\n", 2, "command substitution"),
    ("X=`touch {canary}`\n", 1, "command substitution"),
    ('X="$(touch {canary})"\n', 1, "command substitution"),
    ("X=$((1+2))\n", 1, "arithmetic"),
    ("if true; then A=1; fi\n", 1, "if statement"),
    ("f() { A=1; }\n", 1, "function definition"),
    ("function f { A=1; }\n", 1, "function definition"),
    ("source /etc/os-release\n", 1, "source"),
    (". /etc/os-release\n", 1, "source (.)"),
    ("A=1 | touch {canary}\n", 1, "pipeline"),
    ("A=1 && touch {canary}\n", 1, "&& list"),
    ("A=1 || B=2\n", 1, "|| list"),
    ("A=1 &\n", 1, "background"),
    ("A=( *.conf )\n", 1, "glob pattern"),
    ("A=( /etc/[a-z]* )\n", 1, "glob pattern"),
    ("A=( {a,b} )\n", 1, "brace expansion"),
    ("A=~+/x\n", 1, "tilde expansion ~+"),
    ("A=/x:~-\n", 1, "tilde expansion ~-"),
    ("A=( ~1 )\n", 1, "tilde expansion ~1"),
    ("A=( ~:$HOME )\n", 1, "tilde expansion ~: outside an assignment"),
    ("A=( ${X:-~root:b c} )\n", 1, "tilde expansion ~root: outside an assignment"),
    ("touch {canary}\n", 1, "command 'touch"),
    ("\n\nA=1 touch {canary}\n", 3, "command 'touch"),
    ("A[1]=x\n", 1, "array element assignment"),
    ("X=${#A}\n", 1, "expansion"),
    ("X=${A/x/y}\n", 1, "expansion"),
    ("X=${A:=x}\n", 1, "expansion"),
    ("X=${A[@]:-x}\n", 1, "expansion"),
    ("X=$1\n", 1, "special parameter"),
    ("X=$@\n", 1, "special parameter"),
    ("X=$'a\\nb'\n", 1, "ANSI-C"),
    ("IFS=:\n", 1, "bash variable IFS"),
    ("X=$RANDOM\n", 1, "bash variable $RANDOM"),
    ('X="unterminated\n', 1, "unterminated double quote"),
    ("X='unterminated\n", 1, "unterminated single quote"),
    ("A=( a b\n", 1, "unterminated array"),
    ("declare -a X=(1)\n", 1, "declare"),
    ("GLOBBY='*'\nA=( $GLOBBY )\n", 2, "glob characters in an unquoted expansion"),
    ("A=1 > {canary}\n", 1, "redirection"),
    ("( A=1 )\n", 1, "subshell"),
    ("while :; do :; done\n", 1, "while loop"),
    ("case x in x) A=1;; esac\n", 1, "case statement"),
    ("{ A=1 }\n", 1, "'}' without a preceding ';'"),
    ("X=$( vgs | awk '{print $1}' ; touch {canary} )\n", 1, "pipeline | in a command substitution"),
    ("X=$(hostname; touch {canary})\n", 1, "more than one command in a command substitution"),
    ("X=$(hostname\ntouch {canary})\n", 2, "more than one command in a command substitution"),
    ("X=$(hostname && touch {canary})\n", 1, "&& list in a command substitution"),
    ("X=$(hostname > {canary})\n", 1, "redirection > in a command substitution"),
    ("X=$( (touch {canary}) )\n", 1, "subshell ( … ) in a command substitution"),
    ("X=$(echo hi)\n", 1, "command substitution $(echo …)"),
    ("X=\"$(/usr/bin/hostname)\"\n", 1, "command substitution $(/usr/bin/hostname …)"),
    ("C=touch\nX=$($C {canary})\n", 2, "an expansion as the command"),
    ("X=$(LC_ALL=C date)\n", 1, "assignment inside a command substitution"),
    ("X=$()\n", 1, "empty command substitution"),
    ("X=$(;hostname)\n", 1, "';' before the command"),
    ("X=$(hostname\n", 1, "unterminated command substitution"),
    ("X=`hostname\n", 1, "unterminated command substitution `"),
    ("X=`echo \\`touch {canary}\\``\n", 1, "backslash inside a command substitution"),
    ("X=$(hostname web2)\n", 1, "$(hostname web2)"),
    ("X=$(hostname -i)\n", 1, "$(hostname -i)"),
    ("X=$(date -d yesterday)\n", 1, "$(date -d)"),
    ("X=$(date +%F +%T)\n", 1, "$(date +%T)"),
    ("X=$(date '+%Y %q')\n", 1, "rescue does not evaluate '%q'"),
    ("X=$(date +%10Y)\n", 1, "rescue does not evaluate '%10Y'"),
    ("X=$(date +%_z)\n", 1, "rescue does not evaluate '%_z'"),
    ("X=$(date -Ifoo)\n", 1, "$(date -Ifoo)"),
    ("X=$(uname -a)\n", 1, "$(uname -a)"),
    ("X=$(uname -p)\n", 1, "$(uname -p)"),
    ("X=$(id -G)\n", 1, "$(id -G)"),
    ("X=$(id)\n", 1, "$(id )"),
    ("X=$(id -ug)\n", 1, "$(id -ug)"),
    ("X=$(cat -n /etc/hostname)\n", 1, "$(cat -n)"),
    ("X=$(cat)\n", 1, "$(cat )"),
    ("X=$(cat a=~/x)\n", 1, "tilde after '='"),
    ("X=$(date <<<{canary})\n", 1, "here-document"),
    ("X=$(<)\n", 1, "redirection < without a file"),
    ("X=$(< <(touch {canary}))\n", 1, "redirection < without a file"),
    ('X="${A:-\'q\'}"\n', 1, "quotes or backslashes"),
    ("cat <<EOF\nx\nEOF\n", 1, "command 'cat'"),
]


@pytest.mark.parametrize("text,line,construct", REFUSED, ids=[r[2] + f"-{i}" for i, r in enumerate(REFUSED)])
def test_unsupported_syntax_is_refused_with_file_and_line(tmp_path, text, line, construct):
    canary = tmp_path / "canary"
    conf = tmp_path / "bad.conf"
    conf.write_text(text.replace("{canary}", str(canary)))
    with pytest.raises(rescue.ConfigError) as info:
        parse_files([conf])
    assert info.value.message.startswith(f"{conf}:{line}: unsupported shell syntax: "), info.value.message
    assert construct in info.value.message
    assert "\n" not in info.value.message
    assert not canary.exists()


def test_cli_refusal_is_one_line_exit_2_and_runs_nothing(tmp_path, conf_dir):
    canary = tmp_path / "x"
    conf = tmp_path / "bad.conf"
    conf.write_text(f"BACKUP=DUPLICITY\nX=$(touch {canary})\n")
    proc = run_rescue("-c", conf_dir, "-C", conf, "dump")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"rescue: error: {conf}:2: unsupported shell syntax: command substitution $(touch …) "
        "(rescue runs no command from its configuration; it evaluates only $(hostname), $(date), "
        "$(cat FILE), $(uname) and $(id) itself: write the value literally)"]
    assert proc.stdout == ""
    assert not canary.exists()


@pytest.mark.parametrize("line", ["BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE=LeakA1 LeakB2",
                                  "export SSH_ROOT_PASSWORD=LeakA1$(LeakB2)",
                                  "MY_SECRET_KEY+=LeakA1 `LeakB2`"])
def test_a_refused_line_of_a_secret_names_the_variable_never_the_text(tmp_path, conf_dir, line):
    """Issue 11 C: PASSPHRASE=LeakA1 LeakB2 printed "unsupported shell syntax: command 'LeakB2'"."""
    conf = tmp_path / "bad.conf"
    conf.write_text(f"BACKUP=DUPLICITY\n{line}\n")
    proc = run_rescue("-c", conf_dir, "-C", conf, "dump")
    assert proc.returncode == 2
    name = line.split()[1 if line.startswith("export") else 0].split("+")[0].split("=")[0]
    assert proc.stderr.startswith(f"rescue: error: {conf}:2: {name}: the value is not one word"), proc.stderr
    assert "Leak" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("data,message,hint", [
    (b"BACKUP=DUPLICITY\n\xa5\x01\xff binary", "not a text file (not UTF-8 at byte 17)", "give a configuration file"),
    (b"BACKUP=DUPLICITY\nX=\0\n", "not a text file (it holds NUL bytes)", "give a configuration file"),
    (b"BACKUP=DUPLICITY\nX=1\r\n", ":2: Windows line endings (CRLF)", "dos2unix"),
], ids=["binary", "nul", "crlf"])
def test_a_config_file_that_is_not_a_unix_text_file_is_refused_with_what_to_do(tmp_path, conf_dir, data, message, hint):
    """Issue 11 C: a binary config gave "'utf-8' codec can't decode byte …" with the hint to check
    the permissions; CRLF was taken with the \\r dropped, although bash keeps it."""
    conf = tmp_path / "odd.conf"
    conf.write_bytes(data)
    proc = run_rescue("-c", conf_dir, "-C", conf, "dump")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"rescue: error: {conf}") and message in lines[0], proc.stderr
    assert hint in lines[1] and "codec" not in proc.stderr


def test_a_directory_given_as_an_extra_config_is_named_a_directory(tmp_path, conf_dir):
    proc = run_rescue("-c", conf_dir, "-C", tmp_path, "dump")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"rescue: error: configuration file {tmp_path} is a directory"), proc.stderr


def test_unknown_variable_warns_with_the_closest_name(tmp_path, conf_dir):
    conf = tmp_path / "typo.conf"
    conf.write_text("BACKUP_DUPLICTY_URL=file:///x\nMY_OWN_HELPER=1\n")
    proc = run_rescue("-c", conf_dir, "-C", conf, "dump")
    assert proc.returncode == 0
    assert (f"rescue: warning: {conf}:1: BACKUP_DUPLICTY_URL is not a known variable; "
            "did you mean BACKUP_DUPLICITY_URL?") in proc.stderr
    assert f"{conf}:2: MY_OWN_HELPER is not a known variable; rescue does not use it" in proc.stderr


def realdata_files():
    return sorted(p for p in REALDATA.glob("*.conf") if p.name != "rear-default.conf") if REALDATA.is_dir() else []


CAT_IN_CONFIG = re.compile(r"\$\(\s*cat\s+(/[^\s)$]+)\s*\)")


def with_cat_files_here(path, tmp_path):
    """A copy of a real config whose $(cat /ABSOLUTE/FILE) read files made under tmp_path."""
    text = path.read_text()
    for name in set(CAT_IN_CONFIG.findall(text)):
        here = tmp_path / name.lstrip("/")
        here.parent.mkdir(parents=True, exist_ok=True)
        here.write_text(f"content of {name}\n")
        text = text.replace(name, str(here))
    copy = tmp_path / path.name
    copy.write_text(text)
    return copy


@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is not present")
@pytest.mark.parametrize("path", realdata_files(), ids=lambda p: p.name)
def test_real_rear_configs_match_bash_or_are_refused_cleanly(path, tmp_path):
    conf = with_cat_files_here(path, tmp_path)
    try:
        parse_files([conf])
    except rescue.ConfigError as exc:
        assert exc.message.startswith(f"{conf}:") and "unsupported shell syntax" in exc.message
        # What real configs substitute is evaluated: a refusal is for something else.
        assert "command substitution" not in exc.message and "tilde" not in exc.message, exc.message
        return
    assert_same_as_bash([conf])


@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is not present")
def test_rear_default_conf_is_refused_at_its_first_command():
    # ReaR's own default.conf runs commands ($(type -P …) and more): a clean refusal, no crash.
    with pytest.raises(rescue.ConfigError) as info:
        parse_files([REALDATA / "rear-default.conf"])
    assert "unsupported shell syntax" in info.value.message


# -- command substitutions and ~, evaluated natively, against bash ------------------------------

def same_moment_as_bash(files, env=ENV, tries=10):
    """assert_same_as_bash for values that change with time: bash runs between two loads of ours,
    and the comparison counts only when both of ours agree (a second boundary was not crossed)."""
    for _ in range(tries):
        before, _ = parse_files(files, env)
        oracle = bash_source([rescue.DEFAULT_CONF] + list(files), env, extra_names=before.values)
        after, _ = parse_files(files, env)
        if before.values == after.values:
            for name in sorted(set(before.values) | set(oracle)):
                assert before.values.get(name) == oracle.get(name), \
                    f"{name}: ours {before.values.get(name)!r}, bash {oracle.get(name)!r}"
            return before
    raise AssertionError("the clock moved during every attempt")


def test_substitutions_beside_arrays_and_tildes_match_bash(tmp_path):
    (tmp_path / "empty").write_text("")
    conf = write_conf(tmp_path, """
E=()
A=( "$(hostname)${E[@]}" "${E[@]}$(cat {tmp}/empty)" "$(cat {tmp}/empty)${E[@]}" x"$(cat {tmp}/empty)" )
B="$(hostname)${E[@]}" C=( $(cat {tmp}/empty)"" )
D=( ${UNSET_X:-$(hostname) $(uname -r)} "${UNSET_X:-$(hostname) $(uname)}" )
F=$(hostname)$(hostname -s)`uname` G=( ~root$(hostname) ~/$(hostname) ) H=$(cat {tmp}/empty):~/x
""")
    assert_same_as_bash([conf])


def test_hostname_uname_and_id_substitutions_match_bash(tmp_path):
    conf = write_conf(tmp_path, """
H1=$(hostname)
H2="$(hostname -s)"
H3=`hostname --short`
H4="x-`hostname`-y"
H5=( $(hostname) "$(hostname -s)" `hostname` )
H6=base; H6+=$(hostname -s)
H7=( a ); H7+=( "$(hostname)" x$(hostname -s) )
H8=${UNSET_X:-$(hostname -s)}
H9="${UNSET_X:-$(hostname)}"
H10=${FROM_ENV:+$(hostname)} H11=${FROM_ENV:-$(hostname)}
H12=$( hostname
)
H13=$(hostname # the short one
)
H14=$('hostname' "-s")
export H15="$(hostname)"
U1=$(uname) U2=$(uname -r) U3="$(uname -n)" U4=$(uname -m) U5=$(uname -s)
U6=( $(uname -srm) ) U7=$(uname -m -r) U8=$(uname --kernel-release --machine) U9="$(uname -v)"
U10=`uname -rnsvm`
I1=$(id -u) I2="$(id -un)" I3=$(id -u -n) I4=$(id -g) I5=$(id -gn) I6=$(id -u root)
I7=$(id -un root) I8=$(id -ru) I9=`id -nu` I10=( $(id -u) "$(id --group --name)" )
""")
    assert_same_as_bash([conf])


def test_hostname_fqdn_matches_bash_where_the_name_resolves(tmp_path):
    try:
        socket.getaddrinfo(socket.gethostname(), None, flags=socket.AI_CANONNAME)
    except OSError:
        pytest.skip("this machine's host name does not resolve")
    assert_same_as_bash([write_conf(tmp_path, 'F1=$(hostname -f) F2="`hostname --fqdn`"\n')])


UTS_SCRIPT = r'''
import json, pathlib, socket, sys
sys.path[:0] = sys.argv[3:5]
socket.sethostname(sys.argv[1])
import rescue
from bash_oracle import bash_source
files = [rescue.DEFAULT_CONF, pathlib.Path(sys.argv[2])]
env = {"PATH": "/usr/bin:/bin", "HOME": "/home/tester", "SECRET_OUTPUT_DEV": "null"}
try:
    ours = rescue.load_config(files, env, rescue.Log()).values
except rescue.ConfigError as exc:
    ours = {"error": exc.message}
print(json.dumps([ours, bash_source(files, env, extra_names=[n for n in ours if n != "error"])]))
'''


def in_own_hostname(name, conf):
    """Load conf in a UTS namespace of its own whose host name is name, by us and by bash."""
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("no UTS namespace here (unshare --uts needs root)")
    proc = subprocess.run(["unshare", "--uts", sys.executable, "-c", UTS_SCRIPT, name, str(conf),
                           str(REPO), str(Path(__file__).resolve().parent)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_hostname_with_a_domain_matches_bash(tmp_path):
    conf = write_conf(tmp_path, 'S=$(hostname -s) L=$(hostname) N=$(uname -n) A=( $(hostname -s) )\n')
    ours, bash = in_own_hostname("web1.example.org", conf)
    assert (ours["S"], ours["L"], ours["A"]) == ("web1", "web1.example.org", ["web1"])
    assert all(ours[n] == bash[n] for n in ("S", "L", "N", "A"))


def test_hostname_fqdn_that_does_not_resolve_is_an_error_not_an_empty_value(tmp_path):
    conf = write_conf(tmp_path, 'A=1\nF=$(hostname -f)\nB=2\n')
    ours, bash = in_own_hostname("nowhere.invalid", conf)
    assert bash["F"] == ""          # bash goes on with an empty name; we stop at the line
    assert ours["error"].startswith(f"{conf}:2: $(hostname -f): the host name nowhere.invalid does not resolve (")
    assert ours["error"].endswith(") (add it to /etc/hosts, or write the full name literally)")


def test_cat_substitutions_match_bash(tmp_path):
    (tmp_path / "key").write_text("ABCD1234\n\n\n")
    (tmp_path / "words").write_text("  a b\n\tc  \n")
    (tmp_path / "with space").write_text("spaced\n")
    (tmp_path / "empty").write_text("")
    (tmp_path / "multi").write_text("line one\n\nline three\r\n")
    (tmp_path / "noeol").write_text("é no newline")
    conf = write_conf(tmp_path, """
KEYFILE={tmp}/key
C1=$(cat {tmp}/key)
C2="$(cat {tmp}/key)"
C3=$(cat {tmp}/multi {tmp}/key)
C4=( $(cat {tmp}/words) "$(cat {tmp}/words)" )
C5="$( cat $KEYFILE )"
C6=$(< {tmp}/key) C7="$(<"$KEYFILE")"
C8=$(cat "{tmp}/with space") C9=`cat {tmp}/noeol`
C10=$(cat {tmp}/empty) C11=( $(cat {tmp}/empty) ) C12=( "$(cat {tmp}/empty)" )
C13=$(cat ~/key) C14=${UNSET_X:-$(cat {tmp}/key)} C15=( x ) C15+=( $(cat {tmp}/key) )
C16="${UNSET_X:-$(cat "$KEYFILE")}" C17=$(cat {tmp}/multi)
{ BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="$(cat {tmp}/key)" ; } 2>>/dev/$SECRET_OUTPUT_DEV
""")
    config = assert_same_as_bash([conf], env=dict(ENV, HOME=str(tmp_path)))
    assert config.get("C1") == "ABCD1234"


def test_tilde_expansion_matches_bash(tmp_path):
    conf = write_conf(tmp_path, r"""
T1=~ T2=~/x T3=~root/x T4=a:~/y:~root:~nosuch/q
T5=( ~/x a:~/y ~root "~" ~nosuch x=~/q ~root/x:$FROM_ENV )
T6="~/x" T7='~' T8=\~/x T9=~"root" T10=~ro\ot T11=~$FROM_ENV T12=~root=x
T13=${UNSET_X:-~/w} T14=${UNSET_X:-a:~/w} T15=( ${UNSET_X:-~/w} ${UNSET_X:-a:~/w} "${UNSET_X:-~/w}" )
T26=${UNSET_X-~root a$} T27=${UNSET_X-~	x} T28=( ${UNSET_X:-~ x} ${UNSET_X:-~/a b} ) T29=${UNSET_X:-~:$FROM_ENV}
T16="${UNSET_X:-~}" T17=x${UNSET_X:-~/w} T18=${FROM_ENV:+~root}
T19=x; T19+=:~/j; T20=( a ); T20+=( ~/k ~root )
export T21=~/h T22=a:~/i
T23=~/"a b" T24=( ~/"a b" ) T25=~root/
""")
    assert_same_as_bash([conf])
    assert_same_as_bash([conf], env=dict(ENV, HOME="/home/a b*"))
    assert_same_as_bash([conf], env={k: v for k, v in ENV.items() if k != "HOME"})


def test_tilde_follows_home_as_the_configuration_sets_it(tmp_path):
    conf = write_conf(tmp_path, "HOME=/set/here\nA=~/x\nHOME=\nB=~/y\nC=( ~ )\n")
    assert_same_as_bash([conf])


def test_date_substitutions_match_bash(tmp_path):
    conf = write_conf(tmp_path, """
D1=$(date +%Y-%m-%d)
D2="$(date '+%Y-%m-%d-%H%M%S')"
D3=`date +%F`
D4="${HOSTNAME}-$(date '+%Y-%m-%d-%H%M%S')"
D5=$(date -u +%s) D6=$(date +%s) D7=$(date -I) D8=$(date -Iseconds) D9=$(date --iso-8601=minutes)
D10=$(date -R) D11=$(date -u) D12=$(date) D13=$(date --rfc-3339=seconds) D14=( $(date) )
D15="$(date +'%a %A %b %B %c %C %d %D %e %g %G %h %H %I %j %k %l %m %M %n %p %P %r %R %S %t %T %u')"
D16="$(date +'%U %V %w %W %x %X %y %z %Z %% %-d %_m %0e %^a %#Z %^B %-H %_I')"
D17=$(date -u '+%z %:z %Z') D18=$(date -Ih) D19=$(date -u -Is) D20=$(date --utc --rfc-email)
D21=( a ) D21+=( "$(date +%Y)" $(date +%m) ) D22=${UNSET_X:-$(date +%Y)} D23="${UNSET_X:-`date -u +%H`}"
D24=$(date +%n%n) D25="$(date +%F%n)"
""")
    same_moment_as_bash([conf])


@pytest.fixture
def time_zone(monkeypatch):
    """Switch this process (and the bash runs) to another time zone, and back."""
    def switch(name):
        monkeypatch.setenv("TZ", name)
        time.tzset()
        return dict(ENV, TZ=name)
    yield switch
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("zone", ["America/St_Johns", "Asia/Kathmandu", "UTC"])
def test_date_in_other_time_zones_matches_bash(tmp_path, time_zone, zone):
    env = time_zone(zone)
    conf = write_conf(tmp_path, "A=$(date '+%F %T %z %Z %s') B=$(date -Iseconds) C=$(date -R) "
                                "D=$(date) E=$(date -u) F=$(date --rfc-3339=s) G=$(date -u -Im)\n")
    same_moment_as_bash([conf], env=env)


def test_date_nanoseconds_have_date_s_shape(tmp_path):
    conf = write_conf(tmp_path, "A=$(date -Ins) B=$(date +%N) C=$(date +%s%3N) D=$(date -u --rfc-3339=ns)\n")
    config, _ = parse_files([conf])
    oracle = bash_source([conf], ENV)
    shapes = {"A": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{9}[+-]\d\d:\d\d", "B": r"\d{9}", "C": r"\d{13}",
              "D": r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{9}\+00:00"}
    for name, shape in shapes.items():
        assert re.fullmatch(shape, config.get(name)) and re.fullmatch(shape, oracle[name]), name


def test_date_with_a_time_zone_of_the_configuration_is_refused(tmp_path):
    conf = write_conf(tmp_path, "TZ=Asia/Tokyo\nA=$(date +%H)\nB=$(date -u +%H)\n")
    with pytest.raises(rescue.ConfigError) as info:
        parse_files([conf])
    assert info.value.message.startswith(f"{conf}:2: unsupported shell syntax: $(date) with a TZ of its own")


FAILED = [
    ("A=1\nK=$(cat {tmp}/missing)\n", 2, "$(cat {tmp}/missing): cannot read {tmp}/missing: No such file or directory"),
    ("K=( a \"`cat {tmp}`\" )\n", 1, "$(cat {tmp}): cannot read {tmp}: Is a directory"),
    ("K=$(cat /dev/zero)\n", 1, "$(cat /dev/zero): not a regular file"),
    ("K=$(cat {tmp}/fifo)\n", 1, "$(cat {tmp}/fifo): not a regular file"),
    ("K=$(< {tmp}/binary)\n", 1, "$(cat {tmp}/binary): not a short text file"),
    ("K=$(cat {tmp}/latin1)\n", 1, "$(cat {tmp}/latin1): not UTF-8 text"),
    ("K=$(id -u no-such-user-here)\n", 1, "$(id -u no-such-user-here): no such user or group here"),
]


@pytest.mark.parametrize("text,line,message", FAILED, ids=[f[2][:14] for f in FAILED])
def test_a_substitution_that_fails_is_an_error_at_its_line(tmp_path, text, line, message):
    (tmp_path / "binary").write_bytes(b"key\0\n")
    (tmp_path / "latin1").write_bytes("clé".encode("latin-1"))
    os.mkfifo(tmp_path / "fifo")
    conf = write_conf(tmp_path, text)
    with pytest.raises(rescue.ConfigError) as info:
        parse_files([conf])
    assert info.value.message.startswith(f"{conf}:{line}: " + message.replace("{tmp}", str(tmp_path)) + " ("), \
        info.value.message
    assert "\n" not in info.value.message


def test_missing_cat_file_in_the_cli_is_one_line_exit_2(tmp_path, conf_dir):
    conf = write_conf(tmp_path, 'BACKUP=DUPLICITY\nBACKUP_DUPLICITY_GPG_ENC_KEY="$(cat {tmp}/root.gpgkey)"\n')
    proc = run_rescue("-c", conf_dir, "-C", conf, "dump")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"rescue: error: {conf}:2: $(cat {tmp_path}/root.gpgkey): cannot read {tmp_path}/root.gpgkey: "
        "No such file or directory (create the file, or write the value literally)"]


CANARY = "c4n4ry-s3cr*t"


def test_a_secret_read_by_cat_stays_secret(tmp_path, conf_dir):
    (tmp_path / "pass").write_text(CANARY + "\n")
    conf = write_conf(tmp_path, """
{ BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="$(cat {tmp}/pass)" ; } 2>>/dev/$SECRET_OUTPUT_DEV
SSH_ROOT_PASSWORD=`cat {tmp}/pass`
""")
    config, log = parse_files([conf])
    assert config.get("BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE") == config.get("SSH_ROOT_PASSWORD") == CANARY
    assert log.redact(f"x {CANARY} y") == "x *** y"
    assert CANARY not in rescue.config_without_secrets(config)
    for args in (["dump"], ["dump", "--json"]):
        proc = run_rescue("-c", conf_dir, "-C", conf, *args)
        assert proc.returncode == 0, proc.stderr
        assert CANARY not in proc.stdout + proc.stderr


def test_refusals_never_show_what_cat_read(tmp_path):
    (tmp_path / "pass").write_text(CANARY)
    conf = write_conf(tmp_path, "A=( $(cat {tmp}/pass) )\n")
    with pytest.raises(rescue.ConfigError) as info:
        parse_files([conf])
    assert "glob characters in the output of $(cat …)" in info.value.message
    assert CANARY not in info.value.message


def test_evaluating_substitutions_starts_no_process(tmp_path, monkeypatch):
    (tmp_path / "key").write_text("k\n")
    conf = write_conf(tmp_path, "A=$(hostname -s) B=`date +%F` C=\"$(cat {tmp}/key)\" D=( $(uname -r) ) "
                                "E=$(id -un) F=${UNSET_X:-$(< {tmp}/key)} G=~root/x H=~/y\n")

    def no_process(*args, **kwargs):
        raise AssertionError("the configuration started a process")

    for module, name in ((subprocess, "Popen"), (os, "fork"), (os, "system"), (os, "posix_spawn"),
                         (os, "posix_spawnp"), (os, "execv"), (os, "execve"), (os, "execvp"), (os, "execvpe")):
        monkeypatch.setattr(module, name, no_process)
    config, _ = parse_files([conf])
    assert config.get("C") == "k" and config.get("G") == "/root/x"
