# Shared by the drivers (source it): validate env-var knobs before anything heavy starts.
# Each check names the knob and exits 2 on a bad value.

knob_fail() { echo "$(basename "$0"): knob $1=${!1-} $2" >&2; exit 2; }
# Integer knobs are rewritten in plain decimal (010 -> 10): bash arithmetic and YAML 1.1 read a leading 0 as octal.
knob_int() {
  [[ "${!1-}" =~ ^[0-9]+$ ]] || knob_fail "$1" "must be a non-negative integer"
  printf -v "$1" '%d' "$((10#${!1}))"
}
knob_pos_int() {
  [[ "${!1-}" =~ ^[0-9]+$ ]] && (( 10#${!1} >= 1 )) || knob_fail "$1" "must be an integer >= 1"
  printf -v "$1" '%d' "$((10#${!1}))"
}
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

# --- Child processes die with the driver ------------------------------------------------------------------
# knob_spawn CMD...  starts CMD in the background in a session of its own (so its process group holds every
#                    process it starts: engines, grader workers) and sets KNOB_PID (= its process-group id);
# knob_wait PID      waits for it and returns its exit status.
# Every spawned group gets TERM, then KILL after KNOB_KILL_GRACE_S seconds, when the driver exits, is
# interrupted or terminated (traps), and when it is killed with -9, which no trap sees: a watchdog in a session
# of its own reads a pipe that only the driver holds open, and kills the groups when the pipe closes.
: "${KNOB_KILL_GRACE_S:=20}"
_knob_groups=()
_knob_watchdog_fd=
_knob_kill_groups() {  # PGID...: TERM each group, wait up to the grace period, KILL what is left
  local g alive ticks=0
  for g in "$@"; do kill -TERM -- "-$g" 2>/dev/null || true; done
  while (( ticks < KNOB_KILL_GRACE_S * 10 )); do
    alive=0
    for g in "$@"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.1
    ticks=$(( ticks + 1 ))
  done
  for g in "$@"; do kill -KILL -- "-$g" 2>/dev/null || true; done
}
_knob_watchdog() {  # reads "+PGID" / "-PGID" lines; at end of input (the driver is gone) kills the rest
  local line groups=()
  while read -r line; do
    case "$line" in
      +*) groups+=("${line#+}") ;;
      -*) local g keep=(); for g in "${groups[@]}"; do [[ "$g" == "${line#-}" ]] || keep+=("$g"); done
          groups=("${keep[@]}") ;;
    esac
  done
  (( ${#groups[@]} == 0 )) || _knob_kill_groups "${groups[@]}"
}
_knob_cleanup() { (( ${#_knob_groups[@]} == 0 )) || _knob_kill_groups "${_knob_groups[@]}"; }
_knob_start_watchdog() {
  local code
  code="$(declare -f _knob_kill_groups _knob_watchdog); KNOB_KILL_GRACE_S=$KNOB_KILL_GRACE_S; _knob_watchdog"
  exec {_knob_watchdog_fd}> >(exec setsid bash -c "$code" >/dev/null 2>&1)
  trap _knob_cleanup EXIT
  trap '_knob_cleanup; trap - EXIT; exit 130' INT
  trap '_knob_cleanup; trap - EXIT; exit 143' TERM
  trap '_knob_cleanup; trap - EXIT; exit 129' HUP
}
knob_spawn() {
  command -v setsid >/dev/null || { echo "$(basename "$0"): setsid (util-linux) is required" >&2; exit 1; }
  [[ -n "$_knob_watchdog_fd" ]] || _knob_start_watchdog
  setsid "$@" {_knob_watchdog_fd}>&- &
  KNOB_PID=$!
  _knob_groups+=("$KNOB_PID")
  echo "+$KNOB_PID" >&"$_knob_watchdog_fd"
}
knob_wait() {
  local pid=$1 status=0 g keep=()
  wait "$pid" || status=$?
  _knob_kill_groups "$pid"  # stragglers the finished command left in its group
  for g in "${_knob_groups[@]}"; do [[ "$g" == "$pid" ]] || keep+=("$g"); done
  _knob_groups=("${keep[@]}")
  echo "-$pid" >&"$_knob_watchdog_fd"
  return "$status"
}
# KNOBS=("NAME config.key check" ...) -> args=(config.key=value ...) for every knob that is set, each value
# checked first (pos_int | int | float | topk (a positive int or null) | choice:a,b,...).
knob_overrides() {
  local spec name key check choices
  args=()
  for spec in "${KNOBS[@]}"; do
    read -r name key check <<< "$spec"
    [[ -n "${!name-}" ]] || continue
    case "$check" in
      pos_int) knob_pos_int "$name" ;;
      int) knob_int "$name" ;;
      float) knob_float "$name" ;;
      topk) [[ "${!name}" == null ]] || knob_pos_int "$name" ;;
      choice:*) IFS=, read -r -a choices <<< "${check#choice:}"; knob_choice "$name" "${choices[@]}" ;;
    esac
    args+=("$key=${!name}")
  done
}
