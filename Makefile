# Bartleby top-level Makefile. The relay itself builds with plain `cargo build`.
#   make image        kernel + i486 musl + i486 binary + initramfs + disk/ISO/floppy -> image/out/
#   make qemu         boot image/out/bartleby.img in QEMU (-cpu 486 -m 16), serial on this terminal
#   make test-qemu    QEMU tests (tests/qemu/run_all.sh)
#   make clean-image  remove image/out (the build cache in ~/.cache/bartleby stays)
.PHONY: image qemu test-qemu clean-image

image:
	./image/build.sh

qemu:
	./qemu/run

test-qemu: image
	./tests/qemu/run_all.sh

clean-image:
	rm -rf image/out
