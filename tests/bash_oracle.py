"""bash as the oracle: source files in a real bash and read back every variable they set."""

import subprocess

# Prints, NUL-separated, each variable that sourcing the files created or changed:
# S name value | A name count items... | U name (unset)
SCRIPT = r'''
__emit() {
  if ! declare -p "$1" >/dev/null 2>&1; then printf 'U\0%s\0' "$1"; return; fi
  local __d; __d=$(declare -p "$1")
  if [[ $__d == "declare -a"* ]]; then
    eval "__v=(\"\${$1[@]}\")"
    printf 'A\0%s\0%s\0' "$1" "${#__v[@]}"
    for __e in "${__v[@]}"; do printf '%s\0' "$__e"; done
  else
    printf 'S\0%s\0%s\0' "$1" "${!1}"
  fi
}
__before=$'\n'"$(declare -p)"$'\n'
for __f in "$@"; do source "$__f" || exit 97; done
for __n in $__ORACLE_NAMES; do __emit "$__n"; done
for __n in $(compgen -v); do
  case $__n in __*|BASH*|FUNCNAME|PIPESTATUS|_|LINENO|SECONDS|RANDOM|SRANDOM|EPOCH*|OPTIND|OPTERR|DIRSTACK|GROUPS|HISTCMD|COMP_WORDBREAKS|PWD|OLDPWD|PPID|SHLVL) continue;; esac
  [[ $__before == *$'\n'"$(declare -p "$__n")"$'\n'* ]] || __emit "$__n"
done
'''


def bash_source(files, env, extra_names=()):
    """Return {name: str | list} for every variable the files set or changed, as bash sees it."""
    env = dict(env)
    env["__ORACLE_NAMES"] = " ".join(extra_names)
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", SCRIPT, "oracle"] + [str(f) for f in files],
                          env=env, capture_output=True, timeout=30)
    if proc.returncode != 0:
        raise AssertionError(f"bash failed ({proc.returncode}): {proc.stderr.decode()}")
    fields = proc.stdout.decode("utf-8", "surrogateescape").split("\0")
    values, i = {}, 0
    while i < len(fields) - 1:
        kind, name = fields[i], fields[i + 1]
        if kind == "S":
            values[name] = fields[i + 2]
            i += 3
        elif kind == "A":
            count = int(fields[i + 2])
            values[name] = fields[i + 3:i + 3 + count]
            i += 3 + count
        else:
            values[name] = None
            i += 2
    return values
