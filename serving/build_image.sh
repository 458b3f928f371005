#!/usr/bin/env bash
# Build the bookrec serving image (the repository's Dockerfile) where users build it: with
# `docker build` when a Docker engine answers, with buildah when none does (rootful, chroot
# isolation: no daemon, no namespaces needed). `make image` runs this script.
#
#   serving/build_image.sh                         # docker or buildah, debian:bookworm-slim, CPU torch index
#   serving/build_image.sh --wheels                # offline build: wheels downloaded here, no index in the build
#   serving/build_image.sh --torch-wheel torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
#
# Base image: used when present, pulled when a registry serves it, and otherwise (--local-base auto)
# made here with debootstrap from Debian's packages and imported as localhost/bookrec-base:<suite>-slim.
# Options (defaults in brackets):
#   --tag TAG             image name [bookrec-serve]
#   --engine E            auto | docker | buildah [auto: docker when `docker info` answers, else buildah]
#   --base IMAGE          BASE_IMAGE of the Dockerfile [debian:bookworm-slim]
#   --local-base MODE     auto | always | never: make a debian:<suite> base with debootstrap [auto]
#   --mirror URL          Debian mirror for debootstrap [http://deb.debian.org/debian]
#   --torch-index URL     TORCH_INDEX, the index torch comes from [Dockerfile default: PyTorch CPU index]
#   --torch-version V     TORCH_VERSION [Dockerfile default]
#   --wheels              download torch and handlers/requirements-serve.txt into serving/wheels/
#                         here (pip download, for the image's Python and glibc), build with WHEELS_ONLY=1
#   --torch-wheel FILE    a local torch wheel to use (implies --wheels; TORCH_VERSION from its name)
#   --python-version X.Y  the image's Python, for --wheels [3.11: Debian 12]
#   --glibc X.Y           the image's glibc, for --wheels [2.36: Debian 12]
#   --dry-run             print the commands that change anything instead of running them
#   -- ARGS...            passed on to docker build / buildah bud
# Environment: PIP (the pip for --wheels) [python3 -m pip]; BUILDAH_ISOLATION [chroot];
# STORAGE_DRIVER is buildah's own (e.g. vfs where overlay mounts are not allowed).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "build_image.sh: $1" >&2; exit "${2:-1}"; }
bad_arg() { die "$1 (see --help)" 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || bad_arg "$1 needs a value"; }

tag=bookrec-serve engine=auto base=debian:bookworm-slim local_base=auto
mirror=http://deb.debian.org/debian torch_index="" torch_version="" torch_wheel=""
wheels=0 python_version=3.11 glibc=2.36 dry_run=0 extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --tag) need_value "$@"; tag=$2; shift 2 ;;
        --engine) need_value "$@"; engine=$2; shift 2 ;;
        --base) need_value "$@"; base=$2; shift 2 ;;
        --local-base) need_value "$@"; local_base=$2; shift 2 ;;
        --mirror) need_value "$@"; mirror=$2; shift 2 ;;
        --torch-index) need_value "$@"; torch_index=$2; shift 2 ;;
        --torch-version) need_value "$@"; torch_version=$2; shift 2 ;;
        --torch-wheel) need_value "$@"; torch_wheel=$2; wheels=1; shift 2 ;;
        --wheels) wheels=1; shift ;;
        --python-version) need_value "$@"; python_version=$2; shift 2 ;;
        --glibc) need_value "$@"; glibc=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; extra=("$@"); break ;;
        *) bad_arg "unknown option '$1'" ;;
    esac
done

case "$engine" in auto | docker | buildah) ;; *) bad_arg "--engine must be auto, docker or buildah, not '$engine'" ;; esac
case "$local_base" in auto | always | never) ;; *) bad_arg "--local-base must be auto, always or never, not '$local_base'" ;; esac
[[ "$python_version" =~ ^3\.[0-9]+$ ]] || bad_arg "--python-version must look like 3.11, not '$python_version'"
[[ "$glibc" =~ ^2\.([0-9]+)$ ]] || bad_arg "--glibc must look like 2.36, not '$glibc'"
glibc_minor=${BASH_REMATCH[1]}
if [[ -n "$torch_wheel" ]]; then
    [[ -f "$torch_wheel" ]] || bad_arg "--torch-wheel: no such file '$torch_wheel'"
    [[ "$(basename "$torch_wheel")" =~ ^torch-([^-]+)-.+\.whl$ ]] \
        || bad_arg "--torch-wheel: '$torch_wheel' is not named like a torch wheel (torch-<version>-<tags>.whl)"
    wheel_version=${BASH_REMATCH[1]}
    [[ -z "$torch_version" || "$torch_version" == "$wheel_version" ]] \
        || bad_arg "--torch-version $torch_version contradicts the wheel's version $wheel_version"
    torch_version=$wheel_version
    torch_wheel=$(cd "$(dirname "$torch_wheel")" && pwd)/$(basename "$torch_wheel")
fi

# Everything below runs from the repository root: the Dockerfile's build context.
cd "$(dirname "$0")/.."
[[ -f model-store/bookrec.mar ]] \
    || die "no model-store/bookrec.mar in $PWD: build the archive first (make archive RUN=runs/<run>)"
[[ -f Dockerfile ]] || die "no Dockerfile in $PWD"

run() {
    echo "+ $*"
    [[ "$dry_run" == 1 ]] || "$@"
}

if [[ "$engine" == auto ]]; then
    if docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v buildah >/dev/null; then
        engine=buildah
    else
        die "neither a Docker engine (docker info failed) nor buildah (apt-get install buildah) is available"
    fi
elif [[ "$dry_run" == 0 ]]; then
    case "$engine" in
        docker) docker info >/dev/null 2>&1 || die "docker info failed: no Docker engine answers" ;;
        buildah) command -v buildah >/dev/null || die "buildah is not installed (apt-get install buildah)" ;;
    esac
fi
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
echo "engine: $engine"

image_present() {
    [[ "$dry_run" == 0 ]] || return 1
    case "$engine" in
        docker) docker image inspect "$1" >/dev/null 2>&1 ;;
        buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
    esac
}

pull() {
    case "$engine" in
        docker) run docker pull "$1" ;;
        buildah) run buildah pull "$1" ;;
    esac
}

# A failed debootstrap can leave /proc or /sys mounted inside the tree: unmount before deleting.
base_work=""
remove_base_work() {
    [[ -n "$base_work" ]] || return 0
    local m
    for m in proc sys dev/pts; do
        if mountpoint -q "$base_work/rootfs/$m" 2>/dev/null; then umount -l "$base_work/rootfs/$m" || true; fi
    done
    rm -rf --one-file-system "$base_work"
    base_work=""
}

# A debian:<suite>-slim look-alike from Debian's packages: minbase, the slim image's dpkg
# path-excludes (no docs, man pages or locales), the official image's apt sources, no apt caches.
make_local_base() {
    local suite=$1 local_tag=$2 work root
    command -v debootstrap >/dev/null || [[ "$dry_run" == 1 ]] \
        || die "the base $base is not available and debootstrap is not installed (apt-get install debootstrap)"
    [[ "$EUID" == 0 || "$dry_run" == 1 ]] || die "debootstrap needs root to make the base $base"
    work=$(mktemp -d "${TMPDIR:-/var/tmp}/bookrec-base.XXXXXX")
    root=$work/rootfs
    base_work=$work
    trap remove_base_work EXIT
    run debootstrap --variant=minbase "$suite" "$root" "$mirror"
    if [[ "$dry_run" == 0 ]]; then
        mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
        printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
            'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
            'path-exclude /usr/share/locale/*' 'path-include /usr/share/locale/locale.alias' \
            'path-exclude /usr/share/groff/*' 'path-exclude /usr/share/lintian/*' \
            >"$root/etc/dpkg/dpkg.cfg.d/docker-slim"
        find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
        rm -rf "$root"/usr/share/{man,info,groff,lintian}/* "$root"/var/cache/apt/*.bin \
            "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
        find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
        rm -f "$root/etc/apt/sources.list"
        printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: %s\n\n' \
            "$mirror" "$suite" "$suite" /usr/share/keyrings/debian-archive-keyring.gpg \
            >"$root/etc/apt/sources.list.d/debian.sources"
        printf 'Types: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: %s\n' \
            http://deb.debian.org/debian-security "$suite" /usr/share/keyrings/debian-archive-keyring.gpg \
            >>"$root/etc/apt/sources.list.d/debian.sources"
    fi
    run tar -C "$root" --numeric-owner -cf "$work/rootfs.tar" .
    case "$engine" in
        docker) run docker import --change 'CMD ["bash"]' "$work/rootfs.tar" "$local_tag" ;;
        buildah)
            local ctr
            if [[ "$dry_run" == 1 ]]; then
                ctr=CONTAINER
                echo "+ buildah from scratch"
            else
                ctr=$(buildah from scratch)
            fi
            run buildah add "$ctr" "$work/rootfs.tar" /
            run buildah config --cmd '["bash"]' "$ctr"
            run buildah commit --rm "$ctr" "$local_tag"
            ;;
    esac
    remove_base_work
    trap - EXIT
}

if [[ "$local_base" != always ]] && { image_present "$base" || { [[ "$dry_run" == 0 ]] && pull "$base"; }; }; then
    echo "base: $base"
elif [[ "$local_base" == never ]]; then
    [[ "$dry_run" == 1 ]] || die "the base $base is neither present nor pullable (--local-base never)"
    pull "$base"
else
    [[ "$base" =~ ^(docker\.io/)?(library/)?debian:([a-z]+)(-slim)?$ ]] \
        || bad_arg "cannot make $base locally: only debian:<suite>[-slim] bases can be made with debootstrap"
    suite=${BASH_REMATCH[3]}
    local_tag=localhost/bookrec-base:$suite-slim
    if [[ "$local_base" == auto && "$dry_run" == 0 ]] && image_present "$local_tag"; then
        echo "base: $local_tag (made earlier with debootstrap)"
    else
        [[ "$dry_run" == 1 && "$local_base" == auto ]] && pull "$base"
        echo "base: $local_tag (made here with debootstrap from $mirror)"
        make_local_base "$suite" "$local_tag"
    fi
    base=$local_tag
fi

build_args=(--build-arg "BASE_IMAGE=$base")
[[ -n "$torch_index" ]] && build_args+=(--build-arg "TORCH_INDEX=$torch_index")
[[ -n "$torch_version" ]] && build_args+=(--build-arg "TORCH_VERSION=$torch_version")

# serving/wheels/ belongs to this script: stale wheels would enter the context and the install.
remove_wheels() { find serving/wheels -maxdepth 1 -name '*.whl' -delete; }
[[ "$dry_run" == 1 ]] || remove_wheels
if [[ "$wheels" == 1 ]]; then
    [[ "$dry_run" == 1 ]] || trap remove_wheels EXIT
    arch=$(uname -m)
    platforms=()
    for ((minor = glibc_minor; minor >= 17; minor--)); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
    platforms+=(--platform "manylinux2014_$arch")
    sources=()
    if [[ -n "$torch_wheel" ]]; then
        run cp "$torch_wheel" serving/wheels/
        sources=(--find-links serving/wheels)
    else
        sources=(--extra-index-url "${torch_index:-https://download.pytorch.org/whl/cpu}")
    fi
    read -r -a pip <<<"${PIP:-python3 -m pip}"
    run "${pip[@]}" download --dest serving/wheels --only-binary=:all: \
        --python-version "$python_version" "${platforms[@]}" "${sources[@]}" \
        "torch==${torch_version:-$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)}" -r handlers/requirements-serve.txt
    build_args+=(--build-arg WHEELS_ONLY=1)
fi

start=$SECONDS
case "$engine" in
    docker) run docker build -t "$tag" "${build_args[@]}" "${extra[@]}" -f Dockerfile . ;;
    # --format docker: the OCI format has no HEALTHCHECK, buildah would drop it.
    buildah) run buildah bud --format docker -t "$tag" "${build_args[@]}" "${extra[@]}" -f Dockerfile . ;;
esac
[[ "$dry_run" == 1 ]] && exit 0
echo "built $tag with $engine in $((SECONDS - start)) s (the build step alone)"
case "$engine" in
    docker) docker image ls "$tag" ;;
    buildah) buildah images "$tag" ;;
esac
