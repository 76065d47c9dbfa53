# dvmm demo boot sector: GNU as, 16-bit real mode, i386+ instructions.
# Built by dvmm_core.boot.demo (as --32, ld -Ttext 0x7c00 --oformat binary).
#
# SeaBIOS loads this 512-byte MBR at 0000:7C00 and jumps to it with the boot
# drive number in DL.  The program
#   1. sets up DS/SS/SP, initialises COM1 (0x3F8) itself and writes to it by
#      polling LSR bit 5 (int 10h is never used); prints the banner;
#   2. checks the parameter block at offset 0x1BE (filled in by
#      dvmm_core.boot.demo.make_demo_disk);
#   3. reads `sectors` payload sectors starting at LBA 1 with int 13h AH=42h
#      (extended read with a disk address packet), `chunk` sectors per call,
#      into the buffer at 1000:0000 (linear 0x10000), checking CF and AH;
#   4. prints the first line of the payload, the sector count and the
#      checksum, then "done", and performs the `after` action.
#
# Checksum: the payload as little-endian 32-bit words w[0..n-1]; A = B = 0;
# for each word in order A = (A + w) mod 2^32, B = (B + A) mod 2^32; the
# checksum is B, which equals sum((n - i) * w[i]) mod 2^32.  Unlike a plain
# sum it changes when sectors arrive in the wrong order.
#
# Sector layout (0x000-0x1BD is the classic MBR code area):
#   0x000-0x1BD  code and strings
#   0x1BE-0x1C7  parameter block, little-endian:
#                  +0 "DVMD" magic, +4 u32 payload sectors (from LBA 1),
#                  +8 u8 after (0 = cli;hlt, 1 = reset via port 0xCF9 (0x02
#                  then 0x06), 2 = reset via the i8042 (0xFE to port 0x64)),
#                  +9 u8 sectors per read (1..128).
#                The magic's first byte (0x44) sits where the first partition
#                entry's boot indicator would be and is not a valid one
#                (0x00/0x80), so partition scanners (Linux, libblkid) treat
#                the disk as unpartitioned.
#   0x1C8-0x1D7  the int 13h disk address packet (template)
#   0x1D8-0x1FD  more strings
#   0x1FE        0x55 0xAA
#
# Output lines, each printed whole and ending in CR LF (the banner line is
# preceded by a CR LF of its own):
#   dvmm-demo: booted
#   dvmm-demo: message: <the payload's first bytes, at most 64, up to the
#                        first control character>
#   dvmm-demo: read <N> sectors checksum <8 uppercase hex digits>
#   dvmm-demo: done
# On failure the program halts after one of:
#   dvmm-demo: read error AH=<2 hex digits> at LBA <decimal>
#   dvmm-demo: bad params

        .code16
        .text
        .globl _start

        .set COM1, 0x3f8
        .include "com1_init.inc"        # the com1_init macro
        .set BUF_SEG, 0x1000            # read buffer: 1000:0000 = linear 0x10000
        .set MSG_MAX, 64
        .set PFX, 1                     # in strings: prints "dvmm-demo: "
        .set PARAMS, 0x1be              # offset of the parameter block
        # BP-relative offsets (BP = 0x7C00 + PARAMS)
        .set P_MAGIC, 0
        .set P_SECTORS, 4
        .set P_AFTER, 8
        .set P_CHUNK, 9
        .set D_PACKET, 10               # the disk address packet follows
        .set D_COUNT, 12
        .set D_LBA, 18

# Registers: DL = boot drive (until the last read), BP = parameter block,
# ES = buffer segment, EBX = A and EDI = B of the checksum.
#
# Interrupts stay disabled in this program, so it never runs SeaBIOS's timer
# handler, which flushes SeaBIOS's own pending serial-console output: that
# only happens inside int 13h, and every line here is printed whole (prefix
# to CR LF) between int 13h calls, so the two outputs never mix in a line.

_start:
        cli
        xorw    %ax, %ax                # SeaBIOS enters at 0000:7C00
        movw    %ax, %ds
        movw    %ax, %ss
        movw    %ax, %sp                # stack: down from 0000:FFFF
        pushw   $BUF_SEG
        popw    %es
        cld
        movw    $0x7c00 + PARAMS, %bp

        pushw   %dx                     # the boot drive
        com1_init                       # AX = 0 here
        popw    %dx

        movw    $s_booted, %si
        call    puts

        movw    $s_badparams, %si
        cmpl    $0x444d5644, P_MAGIC(%bp)       # "DVMD"
        jne     fail
        movb    P_CHUNK(%bp), %al       # sectors per read: 1..128
        decb    %al
        js      fail
        xorl    %ebx, %ebx
        xorl    %edi, %edi
        jmp     read_loop

read_error:                             # AH = status
        movw    $s_readerr, %si
        call    puts
        shll    $16, %eax               # AH -> bits 31..24
        movw    $2, %cx
        call    puthex
        call    puts                    # s_atlba
        movl    D_LBA(%bp), %eax
        call    putdec                  # SI = s_crlf
fail:                                   # SI = message
        call    puts
halt:
        cli
        hlt
        jmp     halt

read_loop:
        movl    P_SECTORS(%bp), %eax    # sectors still to read
        testl   %eax, %eax
        jz      finished
        movzbl  P_CHUNK(%bp), %ecx
        cmpl    %ecx, %eax
        jae     1f
        movw    %ax, %cx                # last, shorter chunk
1:      movw    %cx, D_COUNT(%bp)
        movb    $0x42, %ah              # extended read, DS:SI = packet
        leaw    D_PACKET(%bp), %si
        int     $0x13                   # (preserves all but AH, flags)
        jc      read_error
        testb   %ah, %ah
        jnz     read_error
        subl    %ecx, P_SECTORS(%bp)

        cmpl    $1, D_LBA(%bp)          # first chunk: print its first line
        jne     4f
        pushw   %cx
        movw    $s_message, %si
        call    puts
        movb    $MSG_MAX, %cl           # (CH = 0: CX was at most 128)
        xorw    %si, %si
1:      lodsb   %es:(%si)               # at most 64 chars, up to the first
        cmpb    $' ', %al               # control character
        jb      3f
        call    putc
        loop    1b
3:      movw    $s_crlf, %si
        call    puts
        popw    %cx
4:      xorw    %si, %si                # ES:SI = the data just read
        pushw   %cx
        shlw    $7, %cx                 # 128 dwords per sector
5:      lodsl   %es:(%si)
        addl    %eax, %ebx
        addl    %ebx, %edi
        loop    5b
        popw    %cx
        addl    %ecx, D_LBA(%bp)
        jmp     read_loop

finished:
        movw    $s_read, %si
        call    puts
        movl    D_LBA(%bp), %eax
        decl    %eax                    # sectors read = next LBA - 1
        call    putdec
        call    puts                    # s_sectors
        movl    %edi, %eax
        movw    $8, %cx
        call    puthex
        call    puts                    # s_done

        movb    P_AFTER(%bp), %al
        decb    %al
        jz      reset_cf9
        decb    %al
        jnz     halt
1:      inb     $0x64, %al              # i8042: wait (bounded: CX = 0 here)
        testb   $0x02, %al              # for an empty input buffer, then
        loopnz  1b                      # pulse the reset line
        movb    $0xfe, %al
        outb    %al, $0x64
        jmp     halt
reset_cf9:
        movw    $0xcf9, %dx
        movb    $0x02, %al
        outb    %al, %dx
        movb    $0x06, %al
        outb    %al, %dx
        jmp     halt

        .include "com1.inc"             # puts, puthex, putdec, putc

s_prefix:    .asciz "dvmm-demo: "
s_read:      .asciz "\1read "
s_sectors:   .asciz " sectors checksum "
s_done:      .asciz "\r\n\1done\r\n"
s_readerr:   .asciz "\1read error AH="
s_atlba:     .asciz " at LBA "
s_crlf:      .asciz "\r\n"
end_of_code:

        .org    PARAMS                  # "attempt to move .org backwards" = too big
params:                                 # written by demo.py
        .ascii  "DVMD"                  # magic ('D' = 0x44 is no valid boot
                                        # indicator: no partition table)
        .long   0                       # payload sectors (from LBA 1)
        .byte   0                       # after: 0 halt, 1 0xCF9, 2 i8042
        .byte   64                      # sectors per read, 1..128
dap:                                    # int 13h disk address packet
        .byte   16, 0
        .word   0                       # sector count
        .word   0, BUF_SEG              # buffer offset, segment
        .quad   1                       # LBA

s_booted:    .asciz "\r\n\1booted\r\n"
s_message:   .asciz "\1message: "
s_badparams: .asciz "\1bad params\r\n"
end_of_tail:

        .org    0x1fe
        .word   0xaa55
