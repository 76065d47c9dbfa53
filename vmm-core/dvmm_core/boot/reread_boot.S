# dvmm re-read boot sector: GNU as, 16-bit real mode, i386+ instructions.
# Built by dvmm_core.boot.reread (as --32, ld -Ttext 0x7c00 --oformat binary).
#
# A crash-recovery workload for the core tier.  SeaBIOS loads it at
# 0000:7C00 with the boot drive in DL.  The program reads the same region
# (`count` sectors from LBA 1) `reads` times with int 13h AH=42h: the first
# read into buffer A (1000:0000), every later one into buffer B (2000:0000),
# which is zeroed before each read, and compared with A dword by dword
# (repe cmpsl).  So a read that is lost, answered twice, answered with stale
# or wrong data, or failed, shows as a mismatch or a read error.
#
# Parameter block at 0x1BE (filled in by dvmm_core.boot.reread):
#   +0 "DVMR", +4 u32 reads (>= 1), +8 u8 unused, +9 u8 count (1..127),
#   +10 the int 13h disk address packet (template).
#
# Output lines (CR LF):
#   dvmm-reread: booted
#   dvmm-reread: reads <N>            (every 256 reads)
#   dvmm-reread: done <N> equal
# On failure, then halt:
#   dvmm-reread: MISMATCH at read <N>
#   dvmm-reread: read error AH=<hex> at read <N>
#   dvmm-reread: bad params
#
# Assembled with --defsym CHAOS=1 it is the `blk` workload of `dvmm chaos`
# (dvmm_core.chaos.workload): magic "DVMC", prefix "dvmm-chaos: ", and a
# failed read is reported ("read error AH=<hex>") and retried instead of
# halting, because a campaign injects EIO on purpose (a fault the guest may
# see) and the program must go on checking every later read.

        .code16
        .text
        .globl _start

        .set COM1, 0x3f8
        .include "com1_init.inc"        # the com1_init macro
        .set BUF_A, 0x1000
        .set BUF_B, 0x2000
        .set PFX, 1
        .set PARAMS, 0x1be
        .set P_MAGIC, 0
        .set P_READS, 4
        .set P_CHUNK, 9
        .set D_PACKET, 10
        .set D_COUNT, 12
        .set D_SEG, 16
.ifdef CHAOS
        .set MAGIC, 0x434d5644          # "DVMC"
.else
        .set MAGIC, 0x524d5644          # "DVMR"
.endif

# BP = parameter block; `done` (reads finished) and `drive` live in memory
# because putdec clobbers EBX, ECX and EDX.  Interrupts stay disabled.

_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %ss
        movw    %ax, %sp
        cld
        movw    $0x7c00 + PARAMS, %bp
        movb    %dl, drive

        com1_init                       # AX = 0 here

        movw    $s_booted, %si
        call    puts
        movw    $s_badparams, %si
        cmpl    $MAGIC, P_MAGIC(%bp)
        jne     fail
        movb    P_CHUNK(%bp), %al
        decb    %al
        js      fail
        cmpl    $0, P_READS(%bp)
        je      fail

        movw    $BUF_A, %ax             # the reference read
        call    read
next:
        movl    done, %eax
        cmpl    P_READS(%bp), %eax
        jae     finished
        testb   %al, %al                # progress every 256 reads
        jnz     1f
        movw    $s_reads, %si
        call    puts
        call    putdec
        call    puts                    # s_crlf
1:      movw    $BUF_B, %ax             # zero B, read into it, compare with A
        movw    %ax, %es
        xorw    %di, %di
        call    dwords
        xorl    %eax, %eax
        rep stosl
        movw    $BUF_B, %ax
        call    read
        pushw   %ds
        movw    $BUF_A, %ax
        movw    %ax, %ds
        movw    $BUF_B, %ax
        movw    %ax, %es
        xorw    %si, %si
        xorw    %di, %di
        call    dwords
        repe cmpsl
        popw    %ds
        je      next
        decl    done                    # report prints done + 1
        movw    $s_mismatch, %si
        jmp     report

# One int 13h read of `count` sectors into segment AX; done += 1.
read:
        movw    %ax, D_SEG(%bp)
retry:                                  # the BIOS may have cut D_COUNT: set it again
        movzbw  P_CHUNK(%bp), %ax
        movw    %ax, D_COUNT(%bp)
        movb    drive, %dl
        movb    $0x42, %ah
        leaw    D_PACKET(%bp), %si
        int     $0x13
        jc      read_error
        testb   %ah, %ah
        jnz     read_error
        incl    done
        ret

# CX = dwords in one read (128 per sector).
dwords:
        movzbw  P_CHUNK(%bp), %cx
        shlw    $7, %cx
        ret

read_error:
        movw    $s_readerr, %si
        call    puts
        shll    $16, %eax
        movw    $2, %cx
        call    puthex
.ifdef CHAOS
# Report the error, then retry the same read (still inside `read`'s call:
# the packet's segment is in memory, the return address on the stack).
        movw    $s_crlf, %si
        call    puts
        jmp     retry
.else
        movw    $s_at, %si
.endif
report:                                 # SI = message; then " read N"
        call    puts
        movl    done, %eax
        incl    %eax
        call    putdec
        movw    $s_crlf, %si
fail:
        call    puts
halt:
        cli
        hlt
        jmp     halt

finished:
        movw    $s_done, %si
        call    puts
        movl    done, %eax
        call    putdec
        movw    $s_equal, %si
        jmp     fail

        .include "com1.inc"             # puts, puthex, putdec, putc

done:        .long 0
drive:       .byte 0
.ifdef CHAOS
s_prefix:    .asciz "dvmm-chaos: "
.else
s_prefix:    .asciz "dvmm-reread: "
.endif
s_reads:     .asciz "\1reads "
s_crlf:      .asciz "\r\n"
s_mismatch:  .asciz "\1MISMATCH at read "
s_readerr:   .asciz "\1read error AH="
.ifndef CHAOS
s_at:        .asciz " at read "
.endif
s_done:      .asciz "\1done "
end_of_code:

        .org    PARAMS
params:
        .long   MAGIC
        .long   0                       # reads
        .byte   0
        .byte   8                       # sectors per read
dap:
        .byte   16, 0
        .word   0
        .word   0, BUF_A
        .quad   1                       # LBA

s_booted:    .asciz "\r\n\1booted\r\n"
s_equal:     .asciz " equal\r\n"
s_badparams: .asciz "\1bad params\r\n"

        .org    0x1fe
        .word   0xaa55
