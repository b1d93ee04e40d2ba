"""Every setting is typed and checked when the configuration is loaded: a bad value is one
line naming FILE:LINE, the variable, what was expected and what was given; exit 2, nothing run.
SETTINGS (the code's table) and conf/default.conf (the user's documentation) agree."""

import re

import pytest

import rescue
from conftest import run_rescue

TYPED = str, rescue.words_value, rescue.list_value


def assigned_in_default_conf():
    names = re.findall(r"^([A-Z_][A-Z0-9_]*)\+?=", rescue.DEFAULT_CONF.read_text(), re.M)
    return set(names)


def test_every_setting_is_in_default_conf_and_every_assignment_there_is_a_setting():
    assert assigned_in_default_conf() == set(rescue.SETTINGS) - {"HOSTNAME"}
    assert re.search(r"^# HOSTNAME", rescue.DEFAULT_CONF.read_text(), re.M), \
        "default.conf documents HOSTNAME (bash sets it; default.conf must not)"


def test_the_tables_defaults_are_what_default_conf_sets():
    config = rescue.load_config([rescue.DEFAULT_CONF], {"HOSTNAME": "$HOSTNAME"}, rescue.Log())
    for name, setting in rescue.SETTINGS.items():
        if name != "HOSTNAME":
            assert config.values[name] == setting.default, name


def test_secret_settings_are_the_ones_named_so():
    secret = {name for name, setting in rescue.SETTINGS.items() if setting.secret}
    assert secret == {"BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE", "BACKUP_DUPLICITY_GPG_SIGN_PASSPHRASE",
                      "SSH_ROOT_PASSWORD"}


def test_every_setting_has_a_meaning():
    assert all(setting.meaning for setting in rescue.SETTINGS.values())


BAD = [
    ("PROGRESS_WAIT_SECONDS", "abc", "expected a number of seconds"),
    ("PROGRESS_WAIT_SECONDS", "-1", "expected a number of seconds"),
    ("PROGRESS_WAIT_SECONDS", "0", "expected a number of seconds greater than 0"),
    ("PROGRESS_WAIT_SECONDS", "٣", "expected a number of seconds"),
    ("PROGRESS_WAIT_SECONDS", "1e3", "expected a number of seconds"),
    ("USER_INPUT_TIMEOUT", "abc", "expected a number of seconds"),
    ("USER_INPUT_TIMEOUT", " 30", "expected a number of seconds"),
    ("BACKUP_DUPLICITY_MAX_SETS", "three", "expected a whole number of 1 or more"),
    ("BACKUP_DUPLICITY_MAX_SETS", "0", "expected a whole number of 1 or more"),
    ("BACKUP_DUPLICITY_MAX_SETS_KEEP_FULL", "-2", "expected a whole number of 1 or more"),
    ("BACKUP_DUPLICITY_MAX_SETS_KEEP_FULL", "٣", "expected a whole number of 1 or more"),
    ("BACKUP_DUPLICITY_PART_MIN_MB", "x", "expected a whole number"),
    ("BACKUP_DUPLICITY_PART_MIN_MB", "-1", "expected a whole number"),
    ("BACKUP_DUPLICITY_PARALLEL", "0", 'expected "auto" or a whole number of 1 or more'),
    ("BACKUP_DUPLICITY_PARALLEL", "many", 'expected "auto" or a whole number of 1 or more'),
    ("BACKUP_DUPLICITY_MAX_TIME", "1 year", "expected a duplicity time"),
    ("BACKUP_DUPLICITY_FULL_IF_OLDER_THAN", "1X", "expected a duplicity time"),
    ("BACKUP_DUPLICITY_RESTORE_TIME", "2026-13-45", "expected a real date and time"),
    ("BACKUP_DUPLICITY_RESTORE_TIME", "1900-01-01", "expected a date after 1970"),
    ("BACKUP_DUPLICITY_ASK_PASSPHRASE", "maybe", "expected yes or no"),
    ("BACKUP_DUPLICITY_TEMP_RAMDISK", "2", "expected yes or no"),
    ("BACKUP_DUPLICITY_COMPRESSION_CHECK", "sometimes", "expected yes or no"),
    ("USE_STATIC_NETWORKING", "static", "expected yes or no"),
    ("HOSTNAME", "../../etc", "expected a name"),
    ("HOSTNAME", "-rf", "expected a name"),
    ("BACKUP_DUPLICITY_NAME", "../../evil", "expected a name"),
    ("BACKUP_DUPLICITY_NAME", "", "expected a name"),
    ("BACKUP_DUPLICITY_NAME", "..", "expected a name"),
    ("BACKUP_DUPLICITY_URL", "file://", "expected file:// with an absolute directory"),
    ("BACKUP_DUPLICITY_URL", "file://relative/dir", "expected file:// with an absolute directory"),
    ("BACKUP_DUPLICITY_URL", "file:///", "expected file:// with an absolute directory"),
    ("BACKUP_DUPLICITY_URL", "rsync://", "expected rsync://[user@]host/path"),
    ("BACKUP_DUPLICITY_URL", "file:///b/x?x=1#f", "expected a URL without ?… or #…"),
    ("BACKUP_DUPLICITY_URL", "gopher://host/x", "expected a URL of a scheme duplicity has"),
    ("BACKUP_DUPLICITY_URL", "file:///srv/b/../../etc", "expected a URL whose path has no '..' component"),
    ("BACKUP_DUPLICITY_URL", "rsync://h//srv/b%2F..%2F..%2Froot", "expected a URL whose path has no '..' component"),
    ("BACKUP_DUPLICITY_URL", "file:///srv/b%00x", "expected a URL whose path has no '..' component"),
    ("BACKUP_DUPLICITY_URL", "/srv/backup", "expected a URL such as"),
    ("LAYOUT_DIR", "relative/layout", "expected an absolute path"),
    ("VAR_DIR", "var", "expected an absolute path"),
    ("LOCKFILE", "lock", "expected an absolute path"),
    ("PROGRESS_MODE", "fancy", "expected ANSI or plain"),
    ("DUPLICITY_PROG", "bin/duplicity", "expected an absolute path or a program name"),
]


@pytest.mark.parametrize("name,value,expected", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_a_bad_value_is_one_line_naming_file_line_variable_and_value(tmp_path, name, value, expected):
    conf = tmp_path / "bad.conf"
    conf.write_text(f"# a comment\n{name}='{value}'\n")
    with pytest.raises(rescue.ConfigError) as info:
        rescue.load_config([rescue.DEFAULT_CONF, conf], {"HOSTNAME": "host"}, rescue.Log())
    assert info.value.message.startswith(f"{conf}:2: {name}: {expected}"), info.value.message
    assert info.value.message.endswith(f', got "{value}"')
    assert "\n" not in info.value.message and info.value.exit_code == 2


@pytest.mark.parametrize("name,value", [("BACKUP_DUPLICITY_MAX_SETS", "3"), ("PROGRESS_WAIT_SECONDS", "0.5"),
                                        ("BACKUP_DUPLICITY_RESTORE_TIME", "--restore-time=1D"),
                                        ("BACKUP_DUPLICITY_RESTORE_TIME", "2026-01-05T17:56:18+01:00"),
                                        ("BACKUP_DUPLICITY_PARALLEL", "AUTO"), ("BACKUP_DUPLICITY_ASK_PASSPHRASE", "Yes"),
                                        ("BACKUP_DUPLICITY_URL", "rsync://root@192.168.122.1//apps/export/ReaR"),
                                        ("BACKUP_DUPLICITY_URL", "sftp://backup@server/backups"),
                                        ("BACKUP_DUPLICITY_URL", "file:///srv/back%20up"),
                                        ("HOSTNAME", "alma.example.com"), ("PROGRESS_MODE", "plain"),
                                        ("DUPLICITY_PROG", "duplicity"), ("DUPLICITY_PROG", "/usr/bin/duplicity")])
def test_good_values_load_typed(tmp_path, name, value):
    conf = tmp_path / "good.conf"
    conf.write_text(f"{name}='{value}'\n")
    config = rescue.load_config([rescue.DEFAULT_CONF, conf], {}, rescue.Log())
    assert config.setting(name) not in (None, "")


def test_typed_values():
    config = rescue.config_from_values({"BACKUP_DUPLICITY_MAX_SETS": "3", "PROGRESS_WAIT_SECONDS": "0.5",
                                        "BACKUP_DUPLICITY_RESTORE_TIME": "--restore-time=1D",
                                        "BACKUP_DUPLICITY_ASK_PASSPHRASE": "Yes",
                                        "BACKUP_DUPLICITY_OPTIONS": "--volsize  50"})
    assert config.setting("BACKUP_DUPLICITY_MAX_SETS") == 3
    assert config.setting("PROGRESS_WAIT_SECONDS") == 0.5
    assert config.setting("BACKUP_DUPLICITY_RESTORE_TIME") == "1D"
    assert config.setting("BACKUP_DUPLICITY_ASK_PASSPHRASE") is True
    assert config.setting("BACKUP_DUPLICITY_OPTIONS") == ["--volsize", "50"]
    assert config.setting("BACKUP_DUPLICITY_MAX_SETS_KEEP_FULL") is None


def test_a_value_from_the_environment_is_named_so(tmp_path, conf_dir):
    proc = run_rescue("-c", conf_dir, "dump", env={"USER_INPUT_TIMEOUT": "soon"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == \
        'rescue: error: the environment\'s USER_INPUT_TIMEOUT: expected a number of seconds, got "soon"'


def test_a_bad_value_stops_every_workflow_before_anything_runs(tmp_path, conf_dir):
    conf = tmp_path / "bad.conf"
    conf.write_text('PROGRESS_WAIT_SECONDS="abc"\n')
    proc = run_rescue("-c", conf_dir, "-C", conf, "status")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f'rescue: error: {conf}:1: PROGRESS_WAIT_SECONDS: expected a number of seconds, got "abc"',
        f"rescue: hint: correct PROGRESS_WAIT_SECONDS in {conf}"]
    assert not (tmp_path / "log").exists()


def test_hostname_in_local_conf_is_a_known_setting_and_names_the_backup_directory(tmp_path, conf_dir):
    conf = tmp_path / "host.conf"
    conf.write_text("HOSTNAME=alma\nBACKUP_DUPLICITY_URL=file:///srv/b\n")
    proc = run_rescue("-c", conf_dir, "-C", conf, "dump")
    assert proc.returncode == 0 and "HOSTNAME" not in proc.stderr
    config = rescue.load_config([rescue.DEFAULT_CONF, conf], {}, rescue.Log())
    assert rescue.backup_url(config) == "file:///srv/b/alma"


def test_backup_method_other_than_duplicity_is_refused_by_the_backup_workflows():
    config = rescue.config_from_values({"BACKUP": "NETFS", "BACKUP_DUPLICITY_URL": "file:///b"})
    with pytest.raises(rescue.ConfigError, match="BACKUP=NETFS: rescue implements BACKUP=DUPLICITY only"):
        rescue.backup_url(config)
