SUMMARY = "kith: a low-footprint AI agent for single-board computers"
DESCRIPTION = "One small daemon per device: local ONNX models on tract \
               (text generation, wake words, speech to intent), LAN discovery \
               with mDNS, coordination over MQTT, and an OpenAI-compatible \
               HTTP API."
HOMEPAGE = "https://github.com/kith-project/kith"
BUGTRACKER = "https://github.com/kith-project/kith/issues"
SECTION = "net"
LICENSE = "MIT | Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE-MIT;md5=a14a61ec7c938c2bb274d9c78f4200f9 \
                    file://LICENSE-APACHE;md5=3b83ef96387f14655fc854ddc3c6bd57"
CVE_PRODUCT = "kith"

# cpal captures the microphone through ALSA.
DEPENDS += "alsa-lib"

PV = "0.1.0+git"

# The layer lives in kith's repository and builds the main branch it was
# taken from, with the crates its Cargo.lock lists (kith-crates.inc). For a
# reproducible product image, pin SRCREV to a release and regenerate
# kith-crates.inc from that commit with yocto/generate-crates.
SRC_URI = "git://github.com/kith-project/kith.git;protocol=https;branch=main"
# nooelint: oelint.vars.autorev
SRCREV = "${AUTOREV}"

require kith-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

# Only the agent from the workspace; no benches, tests or fuzz targets.
CARGO_BUILD_FLAGS += "--package kith"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/kith.service ${D}${systemd_system_unitdir}/kith.service
    install -d ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${S}/systemd/kith.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/kith.conf
    install -d ${D}${sysconfdir}/kith
    install -m 0644 ${S}/systemd/kith.toml ${D}${sysconfdir}/kith/kith.toml
}

# The kith user of systemd/kith.sysusers, made when the image is built (a
# read-only root file system cannot add it at boot).
USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir ${localstatedir}/lib/kith --no-create-home \
                       --shell /sbin/nologin --user-group --groups audio kith"

SYSTEMD_SERVICE:${PN} = "kith.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

CONFFILES:${PN} = "${sysconfdir}/kith/kith.toml"
FILES:${PN} += "${systemd_system_unitdir}/kith.service \
                ${nonarch_libdir}/tmpfiles.d/kith.conf"
