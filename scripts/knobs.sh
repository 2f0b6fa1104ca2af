# Shared by the drivers (source it): validate env-var knobs before anything heavy starts.
# Each check names the knob and exits 2 on a bad value.

knob_fail() { echo "$(basename "$0"): knob $1=${!1-} $2" >&2; exit 2; }
knob_int() { [[ "${!1-}" =~ ^[0-9]+$ ]] || knob_fail "$1" "must be a non-negative integer"; }
knob_pos_int() { [[ "${!1-}" =~ ^[0-9]+$ && "${!1}" -ge 1 ]] || knob_fail "$1" "must be an integer >= 1"; }
knob_float() { [[ "${!1-}" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || knob_fail "$1" "must be a non-negative number"; }
knob_choice() { local name=$1; shift; local v; for v in "$@"; do [[ "${!name-}" == "$v" ]] && return 0; done; knob_fail "$name" "must be one of: $*"; }
knob_set() { [[ -n "${!1-}" ]] || knob_fail "$1" "must be set"; }
knob_opt_int() { [[ -z "${!1-}" ]] || knob_int "$1"; }
# Print the knobs (name=value), one per line, so every run's log starts with its settings.
knob_print() { local n; for n in "$@"; do printf '  %-26s %s\n' "$n" "${!n-}"; done; }
# Default interpreter: the project's virtualenv when present.
knob_python() { if [[ -x "${VENV_DIR:-.venv}/bin/python" ]]; then echo "${VENV_DIR:-.venv}/bin/python"; else echo python3; fi; }
# Number of visible NVIDIA GPUs (0 without nvidia-smi).
knob_gpu_count() { if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; else echo 0; fi; }
