"""The config parser against bash itself: same values for everything we accept, and a one-line
FILE:LINE refusal, with nothing executed, for everything we do not."""

import random
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
}


def parse_files(files, env=ENV):
    log = rescue.Log()
    config = rescue.load_config([rescue.DEFAULT_CONF] + list(files), env, log)
    return config, log


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


def random_word(rng, depth=0):
    kinds = ["lit", "squote", "dquote", "var", "braced", "default"]
    out = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(kinds if depth < 2 else kinds[:5])
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
    conf = tmp_path / "random.conf"
    conf.write_text("\n".join(lines) + "\n")
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
    ("A=~/x\n", 1, "tilde"),
    ("A=/x:~/y\n", 1, "tilde"),
    ("A=( ~ )\n", 1, "tilde"),
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
    ("X=$(<{canary})\n", 1, "command substitution"),
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
        f"rescue: error: {conf}:2: unsupported shell syntax: command substitution $( … ) "
        "(rescue never runs commands from its configuration; write the value literally)"]
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


@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is not present")
@pytest.mark.parametrize("path", realdata_files(), ids=lambda p: p.name)
def test_real_rear_configs_match_bash_or_are_refused_cleanly(path):
    try:
        parse_files([path])
    except rescue.ConfigError as exc:
        assert exc.message.startswith(f"{path}:") and "unsupported shell syntax" in exc.message
        return
    assert_same_as_bash([path])


@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is not present")
def test_rear_default_conf_is_refused_at_its_first_command():
    # ReaR's own default.conf runs commands ($(type -P …) and more): a clean refusal, no crash.
    with pytest.raises(rescue.ConfigError) as info:
        parse_files([REALDATA / "rear-default.conf"])
    assert "unsupported shell syntax" in info.value.message
