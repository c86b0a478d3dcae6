# Helpers shared by the launch scripts (sourced, not run). Each script sets $prog first.

die() { echo "$prog: error: $*" >&2; exit 2; }
need_value() { (($# >= 2)) || die "$1 needs a value"; }

# Print a command as one line a shell can run: plain words as they are, words with spaces or
# quotes in single quotes (easier to read than %q), control characters with $'...'.
show() {
  local w line='' q="'" escaped_q="'\\''"
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      :
    elif [[ $w == *[[:cntrl:]]* ]]; then
      w=$(printf '%q' "$w")
    else
      w="'${w//$q/$escaped_q}'"
    fi
    line+="${line:+ }$w"
  done
  printf '%s\n' "$line"
}
