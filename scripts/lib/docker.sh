# Shared by scripts/docker, scripts/images, scripts/test-compose and scripts/test-containers:
# which Docker CLI and compose CLI to use against the engine. Sourced, not run; expects ROOT.
#
# BuildKit (the Dockerfiles' cache mounts) needs a CLI that can drive it: a CLI with the buildx
# plugin, or one older than 23 (built-in BuildKit client, e.g. Debian 12's docker.io). A newer
# CLI without buildx (some machines have one in /usr/local/bin) refuses DOCKER_BUILDKIT=1, so the
# engine's own CLI is preferred then.

DOCKER_STATE="$ROOT/.services/docker"

# Prints the path of a docker CLI that can build with BuildKit, or fails.
docker_cli() {
  local candidate version
  for candidate in "$(command -v docker 2>/dev/null)" /usr/bin/docker; do
    [[ -n $candidate && -x $candidate ]] || continue
    if "$candidate" buildx version >/dev/null 2>&1; then echo "$candidate"; return; fi
    version=$("$candidate" --version 2>/dev/null | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')
    if [[ -n $version ]] && ((version < 23)); then echo "$candidate"; return; fi
  done
  return 1
}

# A folder whose `docker` is that CLI, for tools that run `docker` from PATH (docker-compose 1.29
# builds through it).
docker_bin_dir() {
  local cli
  cli=$(docker_cli) || return 1
  mkdir -p "$DOCKER_STATE/bin"
  ln -sfn "$cli" "$DOCKER_STATE/bin/docker"
  echo "$DOCKER_STATE/bin"
}

# Runs the docker CLI with BuildKit on (for commands other than builds, any docker CLI does).
# With DKR_TIMEOUT_S set (a plain shell variable of the test scripts, not exported: builds in
# the scripts they run stay unbounded), a call that takes longer is stopped and fails, so that
# an engine that stops answering fails a check instead of hanging the whole run.
dkr() {
  local cli
  cli=$(docker_cli) || cli=$(command -v docker) \
    || { echo "no docker CLI (scripts/docker up installs Debian's docker.io)" >&2; return 1; }
  if [[ -n ${DKR_TIMEOUT_S:-} ]]; then
    DOCKER_BUILDKIT=1 timeout --kill-after=10 "$DKR_TIMEOUT_S" "$cli" "$@"
  else
    DOCKER_BUILDKIT=1 "$cli" "$@"
  fi
}

# What a failed container test prints about the machine and the engine: an engine that stops
# answering is most often out of disk, memory or I/O, and CI's log is all that is left of it.
engine_report() {
  echo "--- the machine: disk, memory, load"
  df -h "$ROOT" /var/lib/docker 2>/dev/null | awk '!seen[$1]++'
  free -m | sed -n 1,2p
  cat /proc/loadavg
  echo "--- the engine"
  timeout 20 "$(command -v docker || echo /usr/bin/docker)" info \
    --format 'server {{.ServerVersion}}, storage {{.Driver}}, containers {{.Containers}} ({{.ContainersRunning}} running), images {{.Images}}' \
    2>&1 || echo "docker info: no answer within 20 s"
  if [[ -f $DOCKER_STATE/dockerd.log ]]; then
    echo "--- last lines of dockerd's log"
    tail -n 20 "$DOCKER_STATE/dockerd.log"
  fi
}

# True when an engine answers.
engine_answers() {
  local cli
  cli=$(command -v docker || echo /usr/bin/docker)
  [[ -x $cli ]] && timeout 20 "$cli" info --format '{{.ServerVersion}}' >/dev/null 2>&1
}

# Runs the compose CLI: Compose v2 (`docker compose`) where installed, else docker-compose 1.29
# (Debian's package), with BuildKit builds through the CLI above.
compose() {
  local bin
  bin=$(docker_bin_dir) || { echo "no docker CLI that can build with BuildKit" >&2; return 1; }
  if PATH="$bin:$PATH" docker compose version >/dev/null 2>&1; then
    PATH="$bin:$PATH" DOCKER_BUILDKIT=1 docker compose "$@"
  elif command -v docker-compose >/dev/null; then
    PATH="$bin:$PATH" DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1 docker-compose "$@"
  else
    echo "no compose CLI: run scripts/docker up (installs Debian's docker-compose)" >&2
    return 1
  fi
}

# The Dockerfile's Rust image, and whether the engine has it or can pull it (no registry: no).
rust_image() { sed -n 's/^ARG RUST_IMAGE=//p' "$ROOT/Dockerfile"; }
rust_image_available() {
  local image
  image=$(rust_image)
  dkr image inspect "$image" >/dev/null 2>&1 || timeout 120 "$(docker_cli)" pull -q "$image" >/dev/null 2>&1
}
