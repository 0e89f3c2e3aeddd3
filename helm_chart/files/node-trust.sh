#!/bin/sh
# Makes this machine's container runtime trust the registry's CA: for every registry address
# (HOST:PORT) a directory HOST_DIR/HOST:PORT/ holding ca.crt, and for containerd a hosts.toml
# that names it. containerd, docker and podman read these per pull: no restart, no reboot.
#
# The node-trust DaemonSet runs it on the registry's own image (busybox sh), and `crflow
# trust` runs it on a client machine, so both write exactly the same files.
#
# Environment:
#   HOST_DIR   the runtime's certs.d directory
#   CA_FILE    the CA certificate (PEM); a Secret volume, refreshed in place when it changes
#   ADDRESSES  the registry's addresses, HOST:PORT, separated by spaces
#   FORMAT     containerd (ca.crt and hosts.toml) or certs (ca.crt only: docker, podman)
#   MIRRORS    containerd only, optional: pull-through mirrors, PREFIX|UPSTREAM_URL|MIRROR_ADDRESS
#              separated by spaces. Pulls of PREFIX/... try the mirror first, the upstream after.
#   MIRROR_LOGIN_DIR  optional: a folder holding `username` and `password`, the login the
#              mirrors take, sent as a header (read on every sync: a rotated login arrives
#              like a changed CA); the hosts.toml holding it is written 0600
#   OWNER      who wrote the files; only directories marked with it are changed or removed
#   STATE_DIR  scratch space; STATE_DIR/synced exists once every address is written
#   MODE       keep (sync every RESYNC seconds), once (sync, then exit) or remove (undo, then
#              idle; `once-remove` undoes and exits)
set -u
# As a pod's PID 1, sh ignores SIGTERM unless it traps it: without this every node-trust pod
# took its whole grace period (30 s) to stop. Sleeps run in the background so the trap fires
# at once.
trap 'exit 0' TERM INT
nap() { sleep "$1" & wait $!; }
umask 022  # a CA certificate is public; runtimes that are not root read it too
MARK=.crflow-owner
log() { echo "node-trust: $*"; }

# Atomic and only when different: a runtime reading mid-write sees the old file or the new.
put() {
  if ! cmp -s "$2" "$1" 2>/dev/null; then
    cp "$2" "$1.crflow-tmp" && mv -f "$1.crflow-tmp" "$1" && log "wrote $1"
  fi
}

ours() { [ -f "$1/$MARK" ] && [ "$(cat "$1/$MARK")" = "$OWNER" ]; }

# Undo exactly what this script writes in one address directory.
undo() {
  rm -f "$1/ca.crt" "$1/hosts.toml" "$1/$MARK"
  if rmdir "$1" 2>/dev/null; then log "removed $1"; else log "left $1: it holds files crflow did not write"; fi
}

sync_once() {
  [ -s "$CA_FILE" ] || { log "no CA at $CA_FILE yet"; return 1; }
  ok=0
  for address in $ADDRESSES; do
    dir="$HOST_DIR/$address"
    if [ -d "$dir" ] && ! ours "$dir" && [ -n "$(ls -A "$dir")" ]; then
      # Someone else's configuration for this address: not taken over. If it does not trust
      # the CA, verify's pull on this node fails and names the node.
      log "left $dir alone: it was not written by $OWNER"; continue
    fi
    mkdir -p "$dir" || { ok=1; continue; }
    [ -f "$dir/$MARK" ] || printf '%s\n' "$OWNER" > "$dir/$MARK"
    put "$dir/ca.crt" "$CA_FILE" || ok=1
    if [ "$FORMAT" = containerd ]; then
      # `ca` relative to this directory, so the file is right wherever the host mounts it.
      printf 'server = "https://%s"\n\n[host."https://%s"]\n  capabilities = ["pull", "resolve"]\n  ca = "ca.crt"\n' \
        "$address" "$address" > "$STATE_DIR/hosts.toml"
      put "$dir/hosts.toml" "$STATE_DIR/hosts.toml" || ok=1
    fi
  done
  prefixes="" auth=""
  if [ -n "${MIRROR_LOGIN_DIR:-}" ] && [ -n "${MIRRORS:-}" ]; then
    [ -r "$MIRROR_LOGIN_DIR/username" ] && [ -r "$MIRROR_LOGIN_DIR/password" ] ||
      { log "no login for the mirrors in $MIRROR_LOGIN_DIR yet"; return 1; }
    auth=$(printf '%s:%s' "$(cat "$MIRROR_LOGIN_DIR/username")" "$(cat "$MIRROR_LOGIN_DIR/password")" | base64 | tr -d '\n')
  fi
  if [ "$FORMAT" = containerd ]; then
    for entry in ${MIRRORS:-}; do
      prefix=${entry%%|*}; rest=${entry#*|}; upstream=${rest%%|*}; mirror=${rest#*|}
      prefixes="$prefixes $prefix"
      dir="$HOST_DIR/$prefix"
      if [ -d "$dir" ] && ! ours "$dir" && [ -n "$(ls -A "$dir")" ]; then
        log "left $dir alone: it was not written by $OWNER"; continue
      fi
      mkdir -p "$dir" || { ok=1; continue; }
      [ -f "$dir/$MARK" ] || printf '%s\n' "$OWNER" > "$dir/$MARK"
      put "$dir/ca.crt" "$CA_FILE" || ok=1  # the mirror serves the registry's certificate
      (
        umask 077  # it may hold the mirrors' login
        {
          printf 'server = "%s"\n\n[host."https://%s"]\n  capabilities = ["pull", "resolve"]\n  ca = "ca.crt"\n' \
            "$upstream" "$mirror"
          if [ -n "$auth" ]; then
            printf '  [host."https://%s".header]\n    Authorization = ["Basic %s"]\n' "$mirror" "$auth"
          fi
        } > "$STATE_DIR/hosts.toml"
        put "$dir/hosts.toml" "$STATE_DIR/hosts.toml"
      ) || ok=1
    done
  fi
  for marker in "$HOST_DIR"/*/"$MARK"; do  # an address (or a mirror's prefix) that left the list
    [ -f "$marker" ] || continue
    dir=${marker%/*}
    case " $ADDRESSES $prefixes " in *" ${dir##*/} "*) continue ;; esac
    ours "$dir" && undo "$dir"
  done
  return $ok
}

remove_all() {
  for marker in "$HOST_DIR"/*/"$MARK"; do
    [ -f "$marker" ] && ours "${marker%/*}" && undo "${marker%/*}"
  done
  return 0
}

mkdir -p "$STATE_DIR"
case "$MODE" in
  once) sync_once; exit ;;
  once-remove) remove_all; exit ;;
  remove) remove_all; touch "$STATE_DIR/synced"; log "removed; idle"
          while :; do nap 3600; done ;;
esac
log "keeping $HOST_DIR current for $ADDRESSES ($FORMAT)"
while :; do
  if sync_once; then touch "$STATE_DIR/synced"; fi
  nap "${RESYNC:-10}"
done
