# dvmm chaos write boot sector: GNU as, 16-bit real mode, i386+ instructions.
# Built by dvmm_core.chaos.workload (as --32, ld -Ttext 0x7c00 --oformat binary).
#
# The blk write workload of `dvmm chaos` under the core.  SeaBIOS loads it
# at 0000:7C00 with the boot drive in DL.  Write number S (S = 0, 1, 2...)
# fills one sector with S's pattern -- dword k = S xor (k * 0x9E3779B9),
# so dword 0 is S itself -- writes it to LBA 1 + (S mod slots) with int 13h
# AH=43h, reads that sector back into a zeroed buffer (AH=42h) and compares.
# So the disk always holds the last `slots` writes, a window of consecutive
# numbers the host checks after the VM stopped, and an acknowledged write
# that is lost, altered or answered with stale data shows as a mismatch.
# A failed read or write (an injected EIO) is reported and retried.
#
# Parameter block at 0x1BE (filled in by dvmm_core.chaos.workload):
#   +0 "DVMW", +4 u32 unused, +8 u8 slots (1..127), +9 u8 unused,
#   +10 the int 13h disk address packet (template, one sector).
#
# Output lines (CR LF):
#   dvmm-chaos: booted
#   dvmm-chaos: writes <N>            (every 256 writes: writes 0..N-1 verified)
#   dvmm-chaos: I/O error AH=<hex>    (not fatal: retried)
# On failure, then halt:
#   dvmm-chaos: MISMATCH at write <N>
#   dvmm-chaos: bad params

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
        .set P_SLOTS, 8
        .set D_PACKET, 10
        .set D_SEG, 16
        .set D_LBA, 18

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
        cmpl    $0x574d5644, P_MAGIC(%bp)       # "DVMW"
        jne     fail
        movb    P_SLOTS(%bp), %al
        decb    %al
        js      fail

next:
        movl    done, %eax
        testb   %al, %al                # progress every 256 writes
        jnz     1f
        movw    $s_reads, %si
        call    puts
        call    putdec
        call    puts                    # s_crlf
1:      movw    $BUF_A, %ax             # A = the pattern of write `done`
        movw    %ax, %es
        xorw    %di, %di
        xorl    %ecx, %ecx
2:      imull   $0x9e3779b9, %ecx, %eax
        xorl    done, %eax
        stosl
        incw    %cx
        cmpw    $128, %cx
        jb      2b
        movl    done, %eax              # LBA = 1 + done mod slots
        xorl    %edx, %edx
        movzbl  P_SLOTS(%bp), %ebx
        divl    %ebx
        incw    %dx
        movw    %dx, D_LBA(%bp)
        movw    $BUF_A, %bx             # write A
        movb    $0x43, %al
        call    io
        movw    $BUF_B, %ax             # zero B, read into it, compare with A
        movw    %ax, %es
        xorw    %di, %di
        movw    $128, %cx
        xorl    %eax, %eax
        rep stosl
        movw    $BUF_B, %bx
        movb    $0x42, %al
        call    io
        pushw   %ds
        movw    $BUF_A, %ax
        movw    %ax, %ds
        movw    $BUF_B, %ax
        movw    %ax, %es
        xorw    %si, %si
        xorw    %di, %di
        movw    $128, %cx
        repe cmpsl
        popw    %ds
        jne     mismatch
        incl    done
        jmp     next

mismatch:
        movw    $s_mismatch, %si
        call    puts
        movl    done, %eax
        call    putdec
        movw    $s_crlf, %si
fail:
        call    puts
halt:
        cli
        hlt
        jmp     halt

# One int 13h request of one sector: AL = 42h (read) or 43h (write), BX =
# the buffer's segment.  Retried until it succeeds, each failure reported.
io:
        movb    %al, op
        movw    %bx, D_SEG(%bp)
retry:
        movw    $1, D_PACKET+2(%bp)     # sectors
        movb    drive, %dl
        movb    op, %ah
        xorb    %al, %al                # write: no verify
        leaw    D_PACKET(%bp), %si
        int     $0x13
        jc      io_error
        testb   %ah, %ah
        jnz     io_error
        ret
io_error:
        movw    $s_readerr, %si
        call    puts
        shll    $16, %eax
        movw    $2, %cx
        call    puthex
        movw    $s_crlf, %si
        call    puts
        jmp     retry

        .include "com1.inc"             # puts, puthex, putdec, putc

done:        .long 0
drive:       .byte 0
op:          .byte 0
s_prefix:    .asciz "dvmm-chaos: "
s_reads:     .asciz "\1writes "
s_crlf:      .asciz "\r\n"
s_mismatch:  .asciz "\1MISMATCH at write "
s_readerr:   .asciz "\1I/O error AH="
end_of_code:

        .org    PARAMS
params:
        .ascii  "DVMW"
        .long   0
        .byte   8                       # slots
        .byte   0
dap:
        .byte   16, 0
        .word   1
        .word   0, BUF_A
        .quad   1                       # LBA

s_booted:    .asciz "\r\n\1booted\r\n"
s_badparams: .asciz "\1bad params\r\n"

        .org    0x1fe
        .word   0xaa55
