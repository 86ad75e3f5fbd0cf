SUMMARY = "kith and what a device running it needs"
DESCRIPTION = "The kith agent, ALSA's tools to find and test the microphone, \
               and CA certificates for MQTT over TLS. Add it to an image \
               with IMAGE_INSTALL:append = \" packagegroup-kith\"."
HOMEPAGE = "https://github.com/kith-project/kith"
BUGTRACKER = "https://github.com/kith-project/kith/issues"
SECTION = "net"
LICENSE = "MIT"

inherit packagegroup

RDEPENDS:${PN} = "\
    alsa-utils-amixer \
    alsa-utils-arecord \
    ca-certificates \
    kith \
"
