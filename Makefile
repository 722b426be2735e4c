# Bartleby top-level Makefile. The relay itself builds with plain `cargo build`.
#   make image        kernel + i486 musl + i486 binary + initramfs + disk/ISO/floppy -> image/out/
#   make image-probe  same images with the stand-in PID 1 (image/pid1-probe) -> image/out/probe/
#   make qemu         boot image/out/bartleby.img in QEMU (-cpu 486 -m 16), serial on this terminal
#   make test-qemu    QEMU tests (tests/qemu/run_all.sh)
#   make clean-image  remove image/out (the build cache in ~/.cache/bartleby stays)
.PHONY: image image-probe qemu test-qemu clean-image

image:
	./image/build.sh

image-probe:
	BIN_CRATE=image/pid1-probe BIN_NAME=pid1-probe IMG=image/out/probe ./image/build.sh

qemu:
	./qemu/run

test-qemu: image
	./tests/qemu/run_all.sh

clean-image:
	rm -rf image/out
