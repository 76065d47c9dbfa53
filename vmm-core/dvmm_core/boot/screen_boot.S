# dvmm screen boot sector: GNU as, 16-bit real mode, i386+ instructions.
# Built by dvmm_core.boot.screen (as --32, ld -Ttext 0x7c00 --oformat binary).
#
# The display workload of the core tier.  SeaBIOS loads it at 0000:7C00.
# It draws a fixed picture through the VGA BIOS only (int 10h), so two
# machines with the same firmware and VGA BIOS -- the dvmm core and QEMU,
# both with SeaBIOS's ramfb VGA BIOS -- must show the same pixels:
#   1. int 10h AH=00h AL=03h: 80x25 text mode, which clears the screen
#      (whatever SeaBIOS printed before is gone);
#   2. int 10h AH=13h AL=01h (write string, attribute in BL, cursor moves):
#      the lines of `screen` at the rows and colours in their headers;
#   3. int 10h AH=02h: the cursor to the bottom-left corner;
# and it reports on COM1 (initialised here; int 10h output never goes
# there) so a test knows when the picture is complete:
#   dvmm-screen: booted
#   dvmm-screen: drawn
# then halts with interrupts disabled (the picture stays as it is).
#
# Parameter block at 0x1BE: "DVMS" (checked by dvmm_core.boot.screen only),
# followed by the COM1 strings (the picture's text fills the code area).

        .code16
        .text
        .globl _start

        .set COM1, 0x3f8
        .include "com1_init.inc"        # the com1_init macro
        .set PFX, 1
        .set PARAMS, 0x1be

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

        sti                             # the VGA BIOS may wait on timers
        movw    $0x0003, %ax            # set mode 3: clears the screen
        int     $0x10

# Each line: u8 row, u8 column, u8 attribute, then the text and a NUL; a
# row of 0xFF ends the list.
        movw    $screen, %si
line:
        lodsb
        cmpb    $0xff, %al
        je      drawn
        movb    %al, %dh                # row
        lodsb
        movb    %al, %dl                # column
        lodsb
        movzbw  %al, %bx                # BL = attribute, BH = page 0
        movw    %si, %bp                # ES:BP = the string
        xorw    %cx, %cx
1:      lodsb                           # CX = length; SI past the NUL
        testb   %al, %al
        jz      2f
        incw    %cx
        jmp     1b
2:      movw    $0x1301, %ax            # write string, update the cursor
        pushw   %si
        int     $0x10
        popw    %si
        jmp     line

drawn:
        movw    $0x0200, %ax            # cursor to row 24, column 0
        xorb    %bh, %bh
        movw    $0x1800, %dx
        int     $0x10
        cli
        movw    $s_drawn, %si
        call    puts
halt:
        cli
        hlt
        jmp     halt

        .include "com1.inc"             # puts, puthex, putdec, putc

s_prefix:    .asciz "dvmm-screen: "

screen:
        .byte   1, 2, 0x1f
        .asciz  " dvmm display test: text drawn through BIOS int 10h "
        .byte   3, 2, 0x07
        .asciz  "The quick brown fox jumps over the lazy dog. 0123456789"
        .byte   4, 2, 0x0e
        .asciz  "LAZY DOG! @#$%^&*()[]{}<>"
        .byte   6, 2, 0x4f
        .asciz  " white on red "
        .byte   6, 18, 0x2a
        .asciz  " green on green "
        .byte   6, 36, 0x70
        .asciz  " black on grey "
        .byte   20, 60, 0x0b
        .asciz  "bottom right"
        .byte   0xff
end_of_code:

        .org    PARAMS
params:
        .ascii  "DVMS"
s_booted:    .asciz "\r\n\1booted\r\n"
s_drawn:     .asciz "\1drawn\r\n"

        .org    0x1fe
        .word   0xaa55
