/* dirtyguest: a multiboot guest that dirties and checks its own memory.

   Build (tests/dirtyguest.py does this, cached per session):
       as --32 -o dirtyguest.o dirtyguest.S
       ld -m elf_i386 -n -Ttext=0x100000 -e _start -o dirtyguest.elf dirtyguest.o
   Run:
       qemu-system-x86_64 -machine q35 -accel tcg -m 128 -nodefaults -display none \
           -kernel dirtyguest.elf -append "mib=64 rate=0 write=1" -debugcon file:guest.log

   Parameters (multiboot command line, decimal):
       mib=N    working set in MiB (default 64), at guest-physical 16 MiB
       rate=R   pages rewritten per second of guest time (HPET), 0 = flat out (default)
       write=W  0: fill once, then only verify (a static working set, for pmemsave)

   Every dword of working-set page p at guest-physical address a holds
   a XOR (gen[p] * 0x9E3779B1), where gen[p] is the page's generation, kept in
   a table at guest-physical 4 MiB (4 bytes per page, in guest memory, so it
   migrates with the pages).  After the fill (generation 1 everywhere) the
   guest loops: it verifies the next page of a sequential sweep, and when a
   rewrite is due it picks a pseudo-random page, verifies it, bumps its
   generation and rewrites it.  A page that lost a rewrite (stale content
   under a newer generation) or was never copied (zeros) fails verification.

   Output on port 0xe9 (-debugcon), numbers in hex:
       START mib rate write
       READY                               (fill done)
       PROGRESS sweeps rewrites verified corrupt    (every ~0.25 s of guest time)
       CORRUPT addr expected found         (first 32 mismatches; the page is then rewritten)
       ERROR text                          (then the guest halts)
   Interrupts stay off; there is no IDT, so a fault resets the machine. */

        .intel_syntax noprefix
        .code32

        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000002
        .set GEN_BASE, 0x00400000
        .set WS_BASE, 0x01000000
        .set STACK_TOP, 0x00300000
        .set HPET, 0xFED00000
        .set PORT, 0xE9
        .set MAX_REPORTS, 32
        .set GOLDEN, 0x9E3779B1

        .text
        .align 4
mb_header:
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .globl _start
_start:
        cli
        cld
        mov esp, STACK_TOP
        xor eax, eax
        mov [cmdline], eax
        test dword ptr [ebx], 4         /* mbi flags: cmdline present */
        jz 1f
        mov eax, [ebx + 16]
        mov [cmdline], eax
1:      mov eax, 0xFFFFFFFF
        test dword ptr [ebx], 1         /* mem_lower/mem_upper present */
        jz 2f
        mov eax, [ebx + 8]              /* KiB above 1 MiB */
        shl eax, 10
        add eax, 0x100000
2:      mov [mem_end], eax

        lea esi, key_mib
        mov eax, 64
        call param
        mov [mib], eax
        lea esi, key_rate
        xor eax, eax
        call param
        mov [rate], eax
        lea esi, key_write
        mov eax, 1
        call param
        mov [write], eax

        lea esi, msg_start
        call puts
        mov eax, [mib]
        call puthex
        call space
        mov eax, [rate]
        call puthex
        call space
        mov eax, [write]
        call puthex
        call newline

        /* the working set must fit the gen table (3 MiB: 3072 MiB) and guest RAM */
        mov eax, [mib]
        test eax, eax
        jz too_big
        cmp eax, 3072
        ja too_big
        shl eax, 8                      /* pages */
        mov [npages], eax
        mov eax, [mib]
        shl eax, 20
        add eax, WS_BASE
        cmp eax, [mem_end]
        ja too_big

        /* HPET: period in fs (spec: at most 100 ns); ticks per second = 1e15 / period */
        xor eax, eax
        mov [tps], eax
        mov ecx, [HPET + 4]
        test ecx, ecx
        jz 3f
        cmp ecx, 100000000
        ja 3f
        mov edx, 0x00038D7E             /* 1e15 = 0x00038D7EA4C68000 */
        mov eax, 0xA4C68000
        div ecx
        mov [tps], eax
        or dword ptr [HPET + 0x10], 1   /* ENABLE_CNF: the main counter runs */
        mov eax, [HPET + 0xF0]
        mov [last_tick], eax
        mov [report_tick], eax
3:
        /* fill: generation 1 everywhere */
        xor ecx, ecx
4:      mov dword ptr [GEN_BASE + ecx * 4], 1
        call fill_page
        inc ecx
        cmp ecx, [npages]
        jb 4b
        lea esi, msg_ready
        call puts

        mov dword ptr [seed], 0x12345678
        xor ecx, ecx                    /* ecx: the sweep cursor */
main_loop:
        call verify_page
        inc dword ptr [verified]
        inc ecx
        cmp ecx, [npages]
        jb 5f
        xor ecx, ecx
        inc dword ptr [sweeps]
5:      cmp dword ptr [write], 0
        je 6f
        call rewrite_due
        jnc 6f
        push ecx
        mov eax, [seed]                 /* LCG, then scale to [0, npages) */
        imul eax, eax, 1103515245
        add eax, 12345
        mov [seed], eax
        mul dword ptr [npages]
        mov ecx, edx
        call verify_page
        inc dword ptr [GEN_BASE + ecx * 4]
        call fill_page
        inc dword ptr [rewrites]
        pop ecx
6:      call report_due
        jmp main_loop

too_big:
        lea esi, msg_too_big
        call puts
halt:   hlt
        jmp halt

/* rewrite_due: CF=1 when a rewrite is due (flat out, no HPET, or enough guest time passed) */
rewrite_due:
        cmp dword ptr [rate], 0
        je 9f
        cmp dword ptr [tps], 0
        je 9f
        push eax
        push ecx
        push edx
        mov eax, [HPET + 0xF0]
        mov ecx, eax
        sub eax, [last_tick]
        mov [last_tick], ecx
        mul dword ptr [rate]            /* credit in tick*rate units; one page costs tps */
        test edx, edx
        jnz 7f
        add eax, [credit]
        jc 7f
        cmp eax, 0xF0000000
        jbe 8f
7:      mov eax, 0xF0000000             /* bounded backlog after a slow spell */
8:      cmp eax, [tps]
        jb 10f
        sub eax, [tps]
        mov [credit], eax
        pop edx
        pop ecx
        pop eax
9:      stc
        ret
10:     mov [credit], eax
        pop edx
        pop ecx
        pop eax
        clc
        ret

/* report_due: a PROGRESS line every ~0.25 s of guest time (every 4096 loops without HPET) */
report_due:
        push eax
        cmp dword ptr [tps], 0
        jne 11f
        inc dword ptr [loops]
        test dword ptr [loops], 4095
        jnz 13f
        jmp 12f
11:     push edx
        mov eax, [HPET + 0xF0]
        sub eax, [report_tick]
        mov edx, [tps]
        shr edx, 2
        cmp eax, edx
        pop edx
        jb 13f
        add [report_tick], eax
12:     push esi
        lea esi, msg_progress
        call puts
        mov eax, [sweeps]
        call puthex
        call space
        mov eax, [rewrites]
        call puthex
        call space
        mov eax, [verified]
        call puthex
        call space
        mov eax, [corrupt]
        call puthex
        call newline
        pop esi
13:     pop eax
        ret

/* fill_page: page ecx := its pattern at its current generation */
fill_page:
        push eax
        push ecx
        push edx
        push edi
        mov edx, [GEN_BASE + ecx * 4]
        imul edx, edx, GOLDEN
        mov edi, ecx
        shl edi, 12
        add edi, WS_BASE
        mov ecx, 1024
14:     mov eax, edi
        xor eax, edx
        stosd
        dec ecx
        jnz 14b
        pop edi
        pop edx
        pop ecx
        pop eax
        ret

/* verify_page: check page ecx against its generation; report a mismatch and rewrite the page */
verify_page:
        push eax
        push ebx
        push edx
        push edi
        mov edx, [GEN_BASE + ecx * 4]
        imul edx, edx, GOLDEN
        mov edi, ecx
        shl edi, 12
        add edi, WS_BASE
        mov ebx, 1024
15:     mov eax, edi
        xor eax, edx
        cmp eax, [edi]
        jne 16f
        add edi, 4
        dec ebx
        jnz 15b
        jmp 17f
16:     inc dword ptr [corrupt]
        cmp dword ptr [corrupt], MAX_REPORTS
        ja 18f
        push esi
        lea esi, msg_corrupt
        call puts
        pop esi
        xchg eax, edi                   /* eax: the address, edi: the expected value */
        call puthex
        call space
        xchg eax, edi
        call puthex
        call space
        mov eax, [edi]
        call puthex
        call newline
18:     inc dword ptr [GEN_BASE + ecx * 4]
        call fill_page
17:     pop edi
        pop edx
        pop ebx
        pop eax
        ret

/* param: esi = key ("mib="), eax = default; returns eax = the decimal value after the key
   where it starts a word of the command line */
param:
        push ebx
        push ecx
        push edx
        push edi
        mov edi, [cmdline]
        test edi, edi
        jz 24f
        mov bl, ' '
20:     cmp bl, ' '
        jne 22f
        xor ecx, ecx
21:     mov dl, [esi + ecx]
        test dl, dl
        jz 23f
        cmp dl, [edi + ecx]
        jne 22f
        inc ecx
        jmp 21b
22:     mov bl, [edi]
        test bl, bl
        jz 24f
        inc edi
        jmp 20b
23:     add edi, ecx
        xor eax, eax
25:     movzx edx, byte ptr [edi]
        sub edx, '0'
        cmp edx, 9
        ja 24f
        imul eax, eax, 10
        add eax, edx
        inc edi
        jmp 25b
24:     pop edi
        pop edx
        pop ecx
        pop ebx
        ret

puts:   push eax
        push esi
26:     lodsb
        test al, al
        jz 27f
        out PORT, al
        jmp 26b
27:     pop esi
        pop eax
        ret

space:  push eax
        mov al, ' '
        out PORT, al
        pop eax
        ret

newline:
        push eax
        mov al, 10
        out PORT, al
        pop eax
        ret

/* puthex: eax as 8 hex digits */
puthex: push eax
        push ecx
        push edx
        mov edx, eax
        mov ecx, 8
28:     rol edx, 4
        mov al, dl
        and al, 15
        add al, '0'
        cmp al, '9'
        jbe 29f
        add al, 'a' - '0' - 10
29:     out PORT, al
        dec ecx
        jnz 28b
        pop edx
        pop ecx
        pop eax
        ret

        .section .rodata
key_mib:        .asciz "mib="
key_rate:       .asciz "rate="
key_write:      .asciz "write="
msg_start:      .asciz "START "
msg_ready:      .asciz "READY\n"
msg_progress:   .asciz "PROGRESS "
msg_corrupt:    .asciz "CORRUPT "
msg_too_big:    .asciz "ERROR the working set does not fit (mib= at most 3072, and 16 MiB + mib below the end of RAM)\n"

        .bss
        .align 4
cmdline:        .space 4
mem_end:        .space 4
mib:            .space 4
rate:           .space 4
write:          .space 4
npages:         .space 4
tps:            .space 4
last_tick:      .space 4
report_tick:    .space 4
credit:         .space 4
seed:           .space 4
sweeps:         .space 4
rewrites:       .space 4
verified:       .space 4
corrupt:        .space 4
loops:          .space 4
