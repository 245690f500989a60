# Shared by the shell test scripts (scripts/test-compose): named checks, waits with a deadline,
# free ports, and the closing `N passed, N failed` line. Sourced, not run.

passed=0
failed=0

# check NAME CMD…: runs CMD; counts and prints the outcome. A failed check does not stop the
# script (later checks may still tell something), but the script's summary fails.
check() {
  local name=$1 started=$SECONDS
  shift
  if "$@"; then
    passed=$((passed + 1))
    printf 'ok - %s (%d s)\n' "$name" $((SECONDS - started))
  else
    failed=$((failed + 1))
    printf 'FAILED - %s (%d s)\n' "$name" $((SECONDS - started))
  fi
}

# eventually SECONDS CMD…: true as soon as CMD is, false if it never is within SECONDS.
eventually() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 1
  done
}

# A TCP port nothing listens on now, at random in 21000-28999: below the kernel's ephemeral
# range (32768-60999), where client connections take their local ports, so none can take it
# before the server binds it (testkit's free_port does the same).
free_port() {
  local port
  for _ in $(seq 1 200); do
    port=$((21000 + RANDOM % 8000))
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
  return 1
}

# The closing line; exit status 1 if anything failed.
summary() {
  printf '%d passed, %d failed\n' "$passed" "$failed"
  ((failed == 0))
}
