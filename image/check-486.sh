#!/bin/bash
# Prove a binary is 486-clean: no instruction a 486 lacks (P5/P6/SSE), and it runs
# under `qemu-i386 -cpu 486` (which raises #UD for CMOV/CMPXCHG8B/FCOMI...).
# Usage: check-486.sh BINARY [CONFIG]      exit 1 on any finding
set -uo pipefail
BIN=${1:?binary}; CONF=${2:-}
fail=0
# mnemonic (3rd tab-separated objdump field), and any SSE/AVX register operand
bad=$(objdump -d --no-show-raw-insn "$BIN" | awk -F'\t' 'NF>=2 {print $2}' |
  grep -E '^(cmov|fcmov|cmpxchg8b|cmpxchg16b|rdtsc|rdtscp|fcomi|fcomip|fucomi|fucomip|lfence|mfence|sfence|movnti|nopl|nopw|endbr32|prefetch|sysenter|syscall|ud1|popcnt|lzcnt|tzcnt|movbe|crc32)|%[xyz]mm|%mm[0-7]' |
  awk '{print $1}' | sort | uniq -c)
total=$(objdump -d --no-show-raw-insn "$BIN" | grep -c $'^ *[0-9a-f]*:\t')
if [ -n "$bad" ]; then
  echo "FAIL: non-486 instructions in $BIN:"; echo "$bad"; fail=1
else
  echo "PASS: 486-clean: $total instructions, none of cmov/fcmov/cmpxchg8b/rdtsc/f(u)comi/fences/long nop/endbr32/SSE/MMX"
fi
cpuid=$(objdump -d --no-show-raw-insn "$BIN" | awk -F'\t' '$2 ~ /^cpuid/' | wc -l)
echo "info: cpuid instructions: $cpuid (guarded by the EFLAGS.ID check in std_detect; early 486s lack CPUID)"
if out=$(qemu-i386 -cpu 486 "$BIN" --version 2>&1); then echo "PASS: qemu-i386 -cpu 486 $(basename "$BIN") --version: $out"; else echo "FAIL: --version under qemu-i386 -cpu 486: $out"; fail=1; fi
if [ -n "$CONF" ]; then
  if out=$(qemu-i386 -cpu 486 "$BIN" check -c "$CONF" 2>&1); then echo "PASS: check -c $CONF: $out"; else echo "FAIL: check -c $CONF: $out"; fail=1; fi
fi
exit $fail
