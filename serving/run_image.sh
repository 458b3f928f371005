#!/usr/bin/env bash
# Run the built bookrec serving image once, as a check: start it, wait for its health check, send
# the example requests (a rate and two recommends through serving/client.py, then one bad request:
# python -m serving.examples), print the answers and stop it. Exit 0 only when every step passed.
# `make image-check` runs this script after `make image`.
#
#   serving/run_image.sh --run-dir runs/demo                 # the run the image's archive was built from
#   serving/run_image.sh --run-dir runs/demo --engine buildah --tag bookrec-serve:test
#
# With docker: `docker run` with the inference port published on a free loopback port. With buildah
# (no Docker engine; rootful, chroot isolation): `buildah run` shares the host's network, so the
# container gets a copy of the image's config.properties with free ports instead of 8080-8082 and
# 7070-7071, and runs the image's ENTRYPOINT + CMD as the image's user. Either way the health check
# is the image's own healthcheck.py run inside the container (ping and a READY worker).
# Options (defaults in brackets):
#   --run-dir DIR       the training run of the image's archive: the examples take its ids [required]
#   --tag TAG           image to run [bookrec-serve]
#   --engine E          auto | docker | buildah [auto: docker when `docker info` answers, else buildah]
#   --timeout S         seconds to wait for the health check [300]
# Environment: PYTHON, the Python with bookrec's client dependencies for the examples [python3].
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "run_image.sh: $1" >&2; exit "${2:-1}"; }
bad_arg() { die "$1 (see --help)" 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || bad_arg "$1 needs a value"; }

run_dir="" tag=bookrec-serve engine=auto timeout=300
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --run-dir) need_value "$@"; run_dir=$2; shift 2 ;;
        --tag) need_value "$@"; tag=$2; shift 2 ;;
        --engine) need_value "$@"; engine=$2; shift 2 ;;
        --timeout) need_value "$@"; timeout=$2; shift 2 ;;
        *) bad_arg "unknown option '$1'" ;;
    esac
done
[[ -n "$run_dir" ]] || bad_arg "--run-dir is required (the run the image's archive was built from)"
case "$engine" in auto | docker | buildah) ;; *) bad_arg "--engine must be auto, docker or buildah, not '$engine'" ;; esac
[[ "$timeout" =~ ^[0-9]+$ && "$timeout" -gt 0 ]] || bad_arg "--timeout must be a positive number of seconds, not '$timeout'"

# The examples import serving/ and model/: run from the repository root.
cd "$(dirname "$0")/.."
[[ -d "$run_dir" ]] || die "no run folder '$run_dir'"
read -r -a python <<<"${PYTHON:-python3}"

if [[ "$engine" == auto ]]; then
    if docker info >/dev/null 2>&1; then engine=docker
    elif command -v buildah >/dev/null; then engine=buildah
    else die "neither a Docker engine (docker info failed) nor buildah (apt-get install buildah) is available"
    fi
fi
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
case "$engine" in
    docker) docker image inspect "$tag" >/dev/null 2>&1 || die "docker has no image '$tag' (make image)" ;;
    buildah) buildah inspect --type image "$tag" >/dev/null 2>&1 || die "buildah has no image '$tag' (make image)" ;;
esac
echo "engine: $engine, image: $tag"

home=/home/model-server
work=$(mktemp -d "${TMPDIR:-/tmp}/bookrec-run.XXXXXX")
ctr="" mnt="" server_pid="" stopped=0

# Five free TCP ports on the host (inference, management, metrics, gRPC inference and management).
free_ports() {
    "${python[@]}" -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))'
}

# Every process below $1 (the `buildah run` process), depth first.
descendants() {
    local child
    for child in $(pgrep -P "$1" || true); do
        echo "$child"
        descendants "$child"
    done
}

# The image's ENTRYPOINT + CMD (what `docker run` starts), one word per line.
image_command() {
    buildah inspect --type image -f '{{json .Docker.Config.Entrypoint}}{{"\n"}}{{json .Docker.Config.Cmd}}' "$tag" \
        | "${python[@]}" -c 'import json, sys; print(*[w for line in sys.stdin for w in json.loads(line) or []], sep="\n")'
}

# What docker stop does: SIGTERM to the container's init (tini), which forwards it to the group.
stop_server() {
    [[ "$stopped" == 0 ]] || return 0
    stopped=1
    case "$engine" in
        docker)
            local start=$SECONDS
            docker stop -t 30 "$ctr" >/dev/null
            echo "stopped in $((SECONDS - start)) s, exit status $(docker inspect -f '{{.State.ExitCode}}' "$ctr")"
            ;;
        buildah)
            [[ -n "$server_pid" ]] || return 0
            local pid init="" start=$SECONDS status=0
            for pid in $(descendants "$server_pid"); do
                if [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == /usr/bin/tini* ]]; then init=$pid; break; fi
            done
            if [[ -n "$init" ]]; then kill -TERM "$init"; else kill -TERM "$server_pid"; fi
            for _ in $(seq 60); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.5; done
            if kill -0 "$server_pid" 2>/dev/null; then
                echo "still running 30 s after SIGTERM: SIGKILL" >&2
                for pid in $(descendants "$server_pid"); do kill -KILL "$pid" 2>/dev/null || true; done
            fi
            wait "$server_pid" || status=$?
            echo "stopped in $((SECONDS - start)) s, exit status $status (143: SIGTERM, as docker stop ends it)"
            ;;
    esac
}

cleanup() {
    local status=$?
    stop_server || true
    case "$engine" in
        docker) [[ -z "$ctr" ]] || docker rm -f "$ctr" >/dev/null 2>&1 || true ;;
        buildah)
            [[ -z "$mnt" ]] || buildah umount "$ctr" >/dev/null || true
            [[ -z "$ctr" ]] || buildah rm "$ctr" >/dev/null || true
            ;;
    esac
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r inf man met grpc_inf grpc_man <<<"$(free_ports)"
start=$SECONDS
case "$engine" in
    docker)
        ctr=bookrec-check-$$
        echo "+ docker run -d --name $ctr -p 127.0.0.1:$inf:8080 $tag"
        docker run -d --name "$ctr" -p "127.0.0.1:$inf:8080" "$tag" >/dev/null
        in_ctr() { docker exec "$ctr" "$@"; }
        container_url=http://127.0.0.1:8080 container_management=http://127.0.0.1:8081
        key_file() { docker cp "$ctr:$home/key_file.json" "$work/key_file.json" >/dev/null 2>&1; }
        logs() { docker logs --tail 40 "$ctr" 2>&1; docker exec "$ctr" tail -n 40 "$home/logs/model_log.log" 2>&1 || true; }
        ;;
    buildah)
        ctr=$(buildah from "$tag")
        mnt=$(buildah mount "$ctr")
        sed -e "s#^inference_address=.*:8080\$#inference_address=http://0.0.0.0:$inf#" \
            -e "s#^management_address=.*:8081\$#management_address=http://127.0.0.1:$man#" \
            -e "s#^metrics_address=.*:8082\$#metrics_address=http://0.0.0.0:$met#" \
            -e "s#^grpc_inference_port=.*#grpc_inference_port=$grpc_inf#" \
            -e "s#^grpc_management_port=.*#grpc_management_port=$grpc_man#" \
            "$mnt$home/config.properties" >"$mnt/tmp/config.properties"
        grep -q "^inference_address=http://0.0.0.0:$inf\$" "$mnt/tmp/config.properties" \
            && grep -q "^management_address=http://127.0.0.1:$man\$" "$mnt/tmp/config.properties" \
            || die "the image's config.properties has no inference/management address to move to free ports"
        mapfile -t command < <(image_command)
        [[ ${#command[@]} -gt 0 ]] || die "the image '$tag' has no ENTRYPOINT or CMD"
        user=$(buildah inspect --type image -f '{{.Docker.Config.User}}' "$tag")
        echo "ports: inference $inf, management $man, metrics $met, gRPC $grpc_inf/$grpc_man"
        echo "+ buildah run --user ${user:-root} --env TS_CONFIG_FILE=/tmp/config.properties $ctr -- ${command[*]}"
        buildah run ${user:+--user "$user"} --env TS_CONFIG_FILE=/tmp/config.properties "$ctr" -- "${command[@]}" \
            >"$work/server.log" 2>&1 &
        server_pid=$!
        in_ctr() { buildah run "$ctr" -- "$@"; }
        container_url=http://127.0.0.1:$inf container_management=http://127.0.0.1:$man
        key_file() { cp "$mnt$home/key_file.json" "$work/key_file.json" 2>/dev/null; }
        logs() { tail -n 40 "$work/server.log"; tail -n 40 "$mnt$home/logs/model_log.log" 2>/dev/null || true; }
        ;;
esac

# The image's health check (its healthcheck.py with its Python), until it passes or the time is up.
health=(python3 "$home/healthcheck.py" --url "$container_url" --management-url "$container_management"
    --key-file "$home/key_file.json")
echo "+ ${health[*]}"
while true; do
    if answer=$(in_ctr "${health[@]}" 2>&1); then
        echo "$answer   ($((SECONDS - start)) s after the start)"
        break
    fi
    if [[ "$engine" == buildah ]] && ! kill -0 "$server_pid" 2>/dev/null; then
        logs >&2
        die "the server ended before its health check passed"
    fi
    if ((SECONDS - start >= timeout)); then
        echo "last health check: $answer" >&2
        logs >&2
        die "not healthy ${timeout} s after the start (the logs' last lines are above)"
    fi
    sleep 3
done

key_file || die "no readable key_file.json in the container"
echo "+ ${python[*]} -m serving.examples --run-dir $run_dir --url http://127.0.0.1:$inf --key-file KEY_FILE"
"${python[@]}" -m serving.examples --run-dir "$run_dir" --url "http://127.0.0.1:$inf" \
    --key-file "$work/key_file.json" --timeout 120
stop_server
