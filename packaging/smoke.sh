#!/usr/bin/env bash
# Smoke test of a built regproxy binary, as an operator would use it.
#
#   packaging/smoke.sh [BINARY]          default BINARY: ./dist/regproxy
#
# 1. `--version` (matches $EXPECTED_VERSION when set)
# 2. `serve` on a free loopback port with a temp config; /readyz, /metrics, the web page
# 3. a real push with skopeo (an OCI image made here, no network), and a pull back
# 4. a second `serve` (port and upstream from REGPROXY_* environment variables)
#    pulling the same image through its cache from the first
# 5. `verify`, `ls --json` and `gc --dry-run` on that storage while it serves
# 6. SIGTERM: both stop cleanly
#
# Needs skopeo, sha256sum, tar and gzip (the HTTP checks use bash's /dev/tcp, no curl).
# Everything lives in a temp folder that is removed at the end; every server started
# here is stopped on any exit.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
binary=$(realpath -m "${1:-$here/../dist/regproxy}")
work=$(mktemp -d "${TMPDIR:-/tmp}/regproxy-smoke.XXXXXX")
pids=()

cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

say() { printf 'smoke: %s\n' "$*"; }
die() {
    printf 'smoke: FAILED: %s\n' "$*" >&2
    for log in "$work"/*.log; do
        [ -f "$log" ] && { echo "--- $log" >&2; tail -n 30 "$log" >&2; }
    done
    exit 1
}
need() { command -v "$1" >/dev/null || die "$1 is not installed"; }
for tool in skopeo sha256sum tar gzip; do need "$tool"; done
[ -x "$binary" ] || die "no executable at $binary (run packaging/build.sh first)"
now_ms() { date +%s%3N; }
# get HOST:PORT PATH: print the body of a 200 answer, fail on anything else
get() {
    local answer status
    exec 3<>"/dev/tcp/${1%:*}/${1##*:}" || return 1
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$1" >&3
    answer=$(cat <&3)
    exec 3<&-
    status=$(head -n 1 <<<"$answer")
    [[ $status == "HTTP/1."?" 200 "* ]] || { echo "GET $2: $status" >&2; return 1; }
    sed '1,/^\r\{0,1\}$/d' <<<"$answer"
}

# ---- 1. version --------------------------------------------------------------------------
version_line=$("$binary" --version)
say "$version_line"
[[ $version_line == "regproxy, version "* ]] || die "unexpected --version output"
if [ -n "${EXPECTED_VERSION:-}" ] && [ "$version_line" != "regproxy, version $EXPECTED_VERSION" ]; then
    die "expected version $EXPECTED_VERSION"
fi

# ---- 2. serve ----------------------------------------------------------------------------
cat >"$work/configuration.toml" <<'TOML'
registry_storage = "origin/registry"
temporary_registry_storage = "origin/tmp"
proxy_storage = "origin/proxy"

[server]
listen = "127.0.0.1:0"
TOML

# start NAME CONFIG [ENV=VALUE...]: run `serve` in the background; sets $port to its port
start() {
    local name=$1 config=$2 started line
    shift 2
    started=$(now_ms)
    env "$@" "$binary" serve -c "$config" >"$work/$name.log" 2>&1 &
    pids+=("$!")
    for _ in $(seq 300); do
        line=$(grep -o 'listening on http://127\.0\.0\.1:[0-9]*' "$work/$name.log" || true)
        [ -n "$line" ] && break
        kill -0 "${pids[-1]}" 2>/dev/null || die "$name exited at start"
        sleep 0.05
    done
    [ -n "$line" ] || die "$name did not report its port"
    port=${line##*:}
    say "$name ready on 127.0.0.1:$port in $(($(now_ms) - started)) ms"
}

start origin "$work/configuration.toml"
origin=127.0.0.1:$port
get "$origin" /v2/ >/dev/null || die "GET /v2/ failed"
get "$origin" /healthz | grep -q '"ok"' || die "/healthz"
get "$origin" /readyz | grep -q '"ready"' || die "/readyz"
# the web page: its templates and stylesheet are package data the binary must carry
# (read whole first: grep -q stopping early would fail the pipeline under pipefail)
page=$(get "$origin" /) || die "GET / (the web page)"
grep -q '<title>regproxy</title>' <<<"$page" || die "GET / is not the web page"
css=$(get "$origin" /ui/static/ui.css) || die "GET /ui/static/ui.css"
grep -q 'prefers-color-scheme' <<<"$css" || die "the web page's stylesheet is not in the binary"

# ---- 3. push and pull with skopeo ---------------------------------------------------------
mkdir -p "$work/containers/tmp" "$work/image/rootfs" "$work/layout/blobs/sha256"
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$work/containers/policy.json"
printf 'unqualified-search-registries = []\n' >"$work/containers/registries.conf"
echo '{}' >"$work/containers/auth.json"
export CONTAINERS_REGISTRIES_CONF=$work/containers/registries.conf
export REGISTRY_AUTH_FILE=$work/containers/auth.json
export TMPDIR=$work/containers/tmp
skopeo_() { skopeo --policy "$work/containers/policy.json" "$@"; }

blob() { # blob FILE -> stores it in the layout, prints "sha256:<hex> <size>"
    local hex size
    hex=$(sha256sum "$1" | cut -d' ' -f1)
    size=$(stat -c %s "$1")
    cp "$1" "$work/layout/blobs/sha256/$hex"
    echo "sha256:$hex $size"
}
echo "hello from the regproxy smoke test, $(date -u +%FT%TZ)" >"$work/image/rootfs/hello.txt"
tar -C "$work/image/rootfs" --owner=0 --group=0 --mtime=@0 -cf "$work/image/layer.tar" hello.txt
diff_id=sha256:$(sha256sum "$work/image/layer.tar" | cut -d' ' -f1)
gzip -n -c "$work/image/layer.tar" >"$work/image/layer.tar.gz"
read -r layer_digest layer_size < <(blob "$work/image/layer.tar.gz")
printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
    "$diff_id" >"$work/image/config.json"
read -r config_digest config_size < <(blob "$work/image/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":%d}]}' \
    "$config_digest" "$config_size" "$layer_digest" "$layer_size" >"$work/image/manifest.json"
read -r manifest_digest manifest_size < <(blob "$work/image/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"v1"}}]}' \
    "$manifest_digest" "$manifest_size" >"$work/layout/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$work/layout/oci-layout"

skopeo_ copy -q --dest-tls-verify=false "oci:$work/layout:v1" "docker://$origin/smoke/hello:v1" ||
    die "skopeo push"
say "pushed smoke/hello:v1 ($manifest_digest)"
skopeo_ copy -q --src-tls-verify=false "docker://$origin/smoke/hello:v1" "oci:$work/pulled:v1" ||
    die "skopeo pull"
cmp -s "$work/pulled/blobs/sha256/${layer_digest#sha256:}" "$work/image/layer.tar.gz" ||
    die "the pulled layer differs from the pushed one"
pulled_digest=sha256:$(skopeo_ inspect --raw --tls-verify=false "docker://$origin/smoke/hello:v1" | sha256sum | cut -d' ' -f1)
[ "$pulled_digest" = "$manifest_digest" ] || die "manifest digest $pulled_digest != $manifest_digest"
say "pulled it back: same manifest and layer"

# ---- 4. a caching proxy in front of it, configured from the environment -------------------
cat >"$work/cache.toml" <<'TOML'
registry_storage = "cache/registry"
temporary_registry_storage = "cache/tmp"
proxy_storage = "cache/proxy"
TOML
start cache "$work/cache.toml" \
    REGPROXY_SERVER__LISTEN=127.0.0.1:0 \
    REGPROXY_LOG__FORMAT=json \
    "REGPROXY_PROXY__UPSTREAMS__ORIGIN__URL=http://$origin"
cache=127.0.0.1:$port
skopeo_ copy -q --src-tls-verify=false "docker://$cache/p/origin/smoke/hello:v1" "oci:$work/cached:v1" ||
    die "pull through the cache"
cmp -s "$work/cached/blobs/sha256/${layer_digest#sha256:}" "$work/image/layer.tar.gz" ||
    die "the layer pulled through the cache differs"
metrics=$(get "$cache" /metrics) || die "GET /metrics"
grep -Eq '^regproxy_proxy_requests_total\{[^}]*result="miss"[^}]*\} [1-9]' <<<"$metrics" ||
    die "no proxy misses in /metrics"
# access lines are written in batches (every 50 ms): give the last ones a moment
for _ in 1 2 3 4 5 6 7 8 9 10; do
    grep -q '"logger": "regproxy.access"' "$work/cache.log" && break
    sleep 0.2
done
grep -q '"logger": "regproxy.access"' "$work/cache.log" || die "no JSON access lines"
say "pulled through the cache: layer identical, misses counted, JSON logs"

# ---- 5. the offline commands, on the live storage ------------------------------------------
"$binary" verify -c "$work/configuration.toml" >"$work/verify.out" || die "verify: $(cat "$work/verify.out")"
"$binary" ls -c "$work/configuration.toml" --json >"$work/ls.json" || die "ls --json"
grep -q '"smoke/hello"' "$work/ls.json" || die "ls --json does not list smoke/hello"
"$binary" gc -c "$work/configuration.toml" --dry-run >"$work/gc.out" || die "gc --dry-run"
"$binary" gc -c "$work/cache.toml" --dry-run --json >/dev/null || die "gc --dry-run (cache)"
say "verify, ls --json, gc --dry-run: ok"
skopeo_ inspect --raw --tls-verify=false "docker://$origin/smoke/hello:v1" >/dev/null ||
    die "the image is gone after gc --dry-run"

# ---- 6. graceful stop --------------------------------------------------------------------
for i in "${!pids[@]}"; do
    kill -TERM "${pids[$i]}"
    status=0
    wait "${pids[$i]}" || status=$?
    [ "$status" -eq 0 ] || die "serve exited with $status after SIGTERM"
done
pids=()
grep -q 'stopped' "$work/origin.log" || die "no 'stopped' line"
say "OK"
