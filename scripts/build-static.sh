#!/usr/bin/env bash
# Builds statically linked Linux binaries of nowconnect-hub and nowconnect-agent for
# x86_64-unknown-linux-musl, checks that they are static and run, strips copies into
# target/static/ and prints their sizes.
#
#   scripts/build-static.sh [--quick] [--no-mimalloc] [hub|agent ...]
#
#   hub, agent      which binaries (default: both)
#   --quick         CI smoke build: the release profile without LTO and with 16 codegen units and
#                   no debug info (much faster to build; the binary is a little larger and slower)
#   --no-mimalloc   keep musl's own malloc (slower under many threads; see README)
#
# Needs: rustup target x86_64-unknown-linux-musl (`rustup target add x86_64-unknown-linux-musl`)
# and a C compiler for the musl target for ring's and mimalloc's C code: Debian's musl-tools
# (musl-gcc). Output: target/static/nowconnect-{hub,agent} (stripped), plus the unstripped
# binaries cargo leaves in target/x86_64-unknown-linux-musl/release/ ($CARGO_TARGET_DIR if set).
set -euo pipefail

TARGET=x86_64-unknown-linux-musl
cd "$(dirname "${BASH_SOURCE[0]}")/.."

quick=0
mimalloc=1
bins=()
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --no-mimalloc) mimalloc=0 ;;
    hub | agent) bins+=("nowconnect-$arg") ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-static.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done
[ ${#bins[@]} -gt 0 ] || bins=(nowconnect-hub nowconnect-agent)

die() { echo "build-static.sh: $*" >&2; exit 1; }

if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed | grep -qx "$TARGET" ||
    die "rustup target $TARGET is not installed: rustup target add $TARGET"
fi
# ring (and mimalloc) compile C for the target; musl-gcc builds it against musl's headers.
if [ -z "${CC_x86_64_unknown_linux_musl:-}" ]; then
  command -v musl-gcc >/dev/null 2>&1 ||
    die "musl-gcc not found: apt-get install musl-tools (or set CC_x86_64_unknown_linux_musl)"
  export CC_x86_64_unknown_linux_musl=musl-gcc
fi

if [ "$quick" = 1 ]; then
  # Profile overrides through the environment: same output directory as --release.
  export CARGO_PROFILE_RELEASE_LTO=false
  export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
  export CARGO_PROFILE_RELEASE_DEBUG=false
fi

# musl's malloc is 2-3x slower for the thread-per-socket design: mimalloc is the allocator.
pkgs=()
features=()
for b in "${bins[@]}"; do
  pkgs+=(-p "$b")
  if [ "$mimalloc" = 1 ]; then features+=(--features "$b/mimalloc"); fi
done
echo "+ cargo build --locked --release --target $TARGET ${pkgs[*]} ${features[*]}"
t0=$(date +%s)
cargo build --locked --release --target "$TARGET" "${pkgs[@]}" "${features[@]}"
echo "build took $(( $(date +%s) - t0 ))s"

tdir=${CARGO_TARGET_DIR:-target}
out=$tdir/static
mkdir -p "$out"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
for b in "${bins[@]}"; do
  built="$tdir/$TARGET/release/$b"
  dest="$out/$b"
  cp -f "$built" "$dest"
  strip "$dest"
  echo "=== $dest"
  file "$dest"
  # ldd exits 1 on a static binary ("not a dynamic executable" / "statically linked").
  ldd "$dest" 2>&1 || true
  # Static means: no program interpreter and no shared library to load.
  # (Outputs captured first: `cmd | grep -q` fails under pipefail when grep exits early.)
  headers=$(readelf -l -d "$dest" 2>&1 || true)
  if grep -q INTERP <<<"$headers"; then die "$dest has a program interpreter (dynamic)"; fi
  if grep -q NEEDED <<<"$headers"; then die "$dest needs shared libraries"; fi
  grep -Eq 'statically linked|static-pie linked' <<<"$(file "$dest")" ||
    die "file does not call $dest static"
  # mimalloc linked in (LTO inlines mi_malloc itself; these entry points stay).
  if [ "$mimalloc" = 1 ] &&
    ! grep -Eq ' [Tt] (mi_malloc|mi_malloc_aligned|_mi_malloc_generic)$' <<<"$(nm "$built" 2>/dev/null || true)"; then
    die "$built was built with mimalloc but has no mimalloc symbol"
  fi
  got=$("$dest" --version)
  [ "$got" = "$b $version" ] || die "$dest --version printed '$got', expected '$b $version'"
  echo "--version: $got"
  printf 'size: %s bytes stripped (%s KiB); unstripped %s bytes\n' \
    "$(stat -c %s "$dest")" "$(( $(stat -c %s "$dest") / 1024 ))" "$(stat -c %s "$built")"
done
