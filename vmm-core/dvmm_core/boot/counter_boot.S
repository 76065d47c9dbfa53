# dvmm counter boot sector: GNU as, 16-bit real mode, i386+ instructions.
# Built by dvmm_core.boot.counter (as --32, ld -Ttext 0x7c00 --oformat binary).
#
# The management workload of the core tier (QMP stop/cont/system_reset, the
# serial console's escape keys).  SeaBIOS loads it at 0000:7C00.  Forever:
# it prints the next value of a counter, then polls COM1's line status
# `delay` times; every byte received meanwhile is echoed as two hex digits.
# Each poll is a port exit, so the pace is the VMM's exit rate (a few lines
# a second), not the CPU's.  Interrupts stay disabled: timers never run it.
#
# Parameter block at 0x1BE (filled in by dvmm_core.boot.counter):
#   +0 "DVMC", +4 u32 delay (polls between two counter lines, >= 1).
#
# Output lines (CR LF), in the order things happen:
#   dvmm-count: booted
#   dvmm-count: <N>            (N = 1, 2, 3, ... in decimal)
#   dvmm-count: echo <HH>      (one per byte received, in order)

        .code16
        .text
        .globl _start

        .set COM1, 0x3f8
        .include "com1_init.inc"        # the com1_init macro
        .set PFX, 1
        .set PARAMS, 0x1be
        .set P_DELAY, 0x7c00 + PARAMS + 4

_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    $0x7c00, %sp
        cld

        com1_init                       # AX = 0 here

        movw    $s_booted, %si
        call    puts

next:
        incl    count
        movb    $PFX, %al
        call    putc
        movl    count, %eax
        call    putdec
        movw    $s_crlf, %si
        call    puts
        movl    P_DELAY, %ecx
poll:
        movw    $COM1+5, %dx            # LSR
        inb     %dx, %al
        testb   $1, %al                 # DR: a byte waits in RBR
        jnz     echo
        decl    %ecx
        jnz     poll
        jmp     next

echo:
        pushl   %ecx
        movb    $COM1 & 0xff, %dl       # RBR
        inb     %dx, %al
        movzbl  %al, %eax
        shll    $24, %eax               # puthex prints the top nibbles first
        pushl   %eax
        movw    $s_echo, %si
        call    puts
        popl    %eax
        movw    $2, %cx
        call    puthex
        movw    $s_crlf, %si
        call    puts
        popl    %ecx
        jmp     poll

        .include "com1.inc"

count:    .long   0
s_booted: .byte   PFX
          .ascii  "booted"
s_crlf:   .asciz  "\r\n"
s_echo:   .byte   PFX
          .asciz  "echo "
s_prefix: .asciz  "dvmm-count: "

        .org    PARAMS
params:   .ascii  "DVMC"
          .long   5000
        .org    510
        .word   0xaa55
