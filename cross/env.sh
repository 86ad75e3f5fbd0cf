# Sourced by cross/build and cross/test: the environment that lets cargo
# build for aarch64-unknown-linux-gnu on an x86-64 Debian machine, and run
# the result under qemu-aarch64 user emulation.
#
# Everything is keyed by the target triple, so a native build in the same
# shell (build scripts, proc macros, an x86-64 kith) is left untouched.

KITH_AARCH64=aarch64-unknown-linux-gnu

# Debian's cross toolchain links, and compiles the C and assembly of ring
# and tract-linalg.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

# alsa-sys finds the arm64 ALSA library (libasound2-dev:arm64) through
# pkg-config, looking only in the arm64 multiarch directory.
export PKG_CONFIG_ALLOW_CROSS=1
export PKG_CONFIG_LIBDIR_aarch64_unknown_linux_gnu=/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig
export PKG_CONFIG_SYSROOT_DIR_aarch64_unknown_linux_gnu=/

# `cargo test --target aarch64-unknown-linux-gnu` runs each test binary
# under qemu. It loads the multiarch arm64 C library (libc6:arm64, with
# libasound2:arm64) from the usual paths. Not `-L /usr/aarch64-linux-gnu`:
# that loader comes from libc6-arm64-cross, a different glibc build than
# the multiarch libc.so.6 it then finds, and the mix hangs in the first
# pthread_create.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64"

# Installs the Debian packages named that are not installed yet.
kith_apt_install() {
  local sudo="" need=() p
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing Debian packages: ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

# Installs what the cross build needs on Debian (safe to run again).
kith_cross_setup() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "==> adding the arm64 architecture to dpkg (for libasound2-dev:arm64)" >&2
    $sudo dpkg --add-architecture arm64
    $sudo apt-get update -qq
  fi
  kith_apt_install gcc-aarch64-linux-gnu libc6-dev-arm64-cross libc6:arm64 libasound2-dev:arm64 qemu-user pkg-config
  rustup target list --installed | grep -qx "$KITH_AARCH64" || rustup target add "$KITH_AARCH64"
}
