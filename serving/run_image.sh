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

[[ -d "$run_dir" ]] || die "no run folder '$run_dir'"
run_dir=$(cd "$run_dir" && pwd)
# The examples import serving/ and model/: run from the repository root.
cd "$(dirname "$0")/.."
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

# The image's ENTRYPOINT + CMD (what `docker run` starts), one word per line, then its USER.
image_config() {
    buildah inspect --type image "$tag" | "${python[@]}" -c '
import json, sys
config = json.load(sys.stdin)["Docker"]["config"]
command = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
if not command:
    sys.exit("the image has no ENTRYPOINT or CMD")
print(*command, sep="\n")
print(config.get("User") or "root")'
}

# tini (the image's init) and the process group it forwards signals to (-g): its child's group, which
# TorchServe's frontend and workers join.
init_pid="" group=""
find_group() {
    [[ -z "$group" && -n "$server_pid" ]] || return 0
    local pid child
    for pid in $(descendants "$server_pid"); do
        if [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == /usr/bin/tini* ]]; then
            init_pid=$pid
            child=$(pgrep -P "$pid" | head -n 1) || return 0
            group=$(ps -o pgid= -p "$child" | tr -d ' ') || true
            return 0
        fi
    done
}

# The live processes of group $1 (not zombies: an exited worker waits there for the host's init).
group_alive() { ps -e -o pgid=,stat=,pid= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { print $3 }'; }

# What docker stop does: SIGTERM to the container's init, which forwards it to the group, and
# SIGKILL after 30 s. When a container's PID 1 exits, the kernel kills what is left of its PID
# namespace; chroot isolation has none, so this does it: SIGKILL to the group's survivors.
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
            local start=$SECONDS status=0 how="stopped" left=""
            find_group
            if kill -0 "$server_pid" 2>/dev/null; then
                kill -TERM "${init_pid:-$server_pid}" 2>/dev/null || true
                for _ in $(seq 60); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.5; done
                if kill -0 "$server_pid" 2>/dev/null; then
                    how="killed (still running 30 s after SIGTERM)"
                    kill -KILL "${init_pid:-$server_pid}" 2>/dev/null || true
                fi
            else
                how="had ended before the stop"
            fi
            wait "$server_pid" || status=$?
            echo "$how: init exited $((SECONDS - start)) s after SIGTERM, status $status (143: SIGTERM, as docker stop ends it)"
            if [[ -n "$group" ]]; then left=$(group_alive "$group" | paste -sd ,); fi
            if [[ -n "$left" ]]; then
                echo "left when init exited, killed as the end of a PID namespace would:"
                ps -o pid=,args= -p "$left" | cut -c1-120 || true
                kill -KILL -- "-$group" 2>/dev/null || true
            fi
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
        server_running() { [[ "$(docker inspect -f '{{.State.Running}}' "$ctr" 2>/dev/null)" == true ]]; }
        server_log() { docker logs "$ctr" 2>&1; }
        model_log() { docker exec "$ctr" cat "$home/logs/model_log.log" 2>/dev/null || true; }
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
        config=$(image_config) || die "cannot read the ENTRYPOINT, CMD and USER of '$tag'"
        mapfile -t command <<<"$config"
        user=${command[-1]}
        unset 'command[-1]'
        echo "ports: inference $inf, management $man, metrics $met, gRPC $grpc_inf/$grpc_man"
        echo "+ buildah run --user $user --env TS_CONFIG_FILE=/tmp/config.properties $ctr -- ${command[*]}"
        buildah run --user "$user" --env TS_CONFIG_FILE=/tmp/config.properties "$ctr" -- "${command[@]}" \
            >"$work/server.log" 2>&1 &
        server_pid=$!
        in_ctr() { buildah run "$ctr" -- "$@"; }
        container_url=http://127.0.0.1:$inf container_management=http://127.0.0.1:$man
        key_file() { cp "$mnt$home/key_file.json" "$work/key_file.json" 2>/dev/null; }
        server_running() { kill -0 "$server_pid" 2>/dev/null; }
        server_log() { cat "$work/server.log"; }
        model_log() { cat "$mnt$home/logs/model_log.log" 2>/dev/null || true; }
        ;;
esac

# Why it did not become healthy: the end of TorchServe's output and each distinct error the workers
# logged, in the order first seen (a missing module shows here, not in TorchServe's own output).
logs() {
    echo "--- the last lines of TorchServe's output"
    server_log | tail -n 15
    echo "--- the workers' errors (logs/model_log.log), first seen first"
    model_log | grep -o '[A-Za-z_.]*\(Error\|Exception\): .*' | awk '!seen[$0]++' | head -n 8
}

# The image's health check (its healthcheck.py with its Python), until it passes or the time is up.
health=(python3 "$home/healthcheck.py" --url "$container_url" --management-url "$container_management"
    --key-file "$home/key_file.json")
echo "+ ${health[*]}"
while true; do
    if answer=$(in_ctr "${health[@]}" 2>"$work/health.err"); then
        echo "$answer   ($((SECONDS - start)) s after the start)"
        break
    fi
    [[ "$engine" == docker ]] || find_group
    if ! server_running; then
        logs >&2
        die "the server ended before its health check passed"
    fi
    if ((SECONDS - start >= timeout)); then
        echo "last health check: ${answer:-$(cat "$work/health.err")}" >&2
        logs >&2
        die "not healthy ${timeout} s after the start (what the logs say is above)"
    fi
    sleep 3
done

key_file || die "no readable key_file.json in the container"
echo "+ ${python[*]} -m serving.examples --run-dir $run_dir --url http://127.0.0.1:$inf --key-file KEY_FILE"
"${python[@]}" -m serving.examples --run-dir "$run_dir" --url "http://127.0.0.1:$inf" \
    --key-file "$work/key_file.json" --timeout 120
stop_server
