/*
 * Resets the machine through the i8042 (0xFE to port 0x64), or with `mode=triple`
 * through a triple fault.  Reaching the end means the reset did not happen: exit 1.
 */
#include "guest.h"

int guest_main(const struct hvm_start_info *si)
{
    char mode[16] = "i8042";
    cmdline_get("mode", mode, sizeof(mode));
    if (strcmp(mode, "triple") == 0) {
        puts("rebooting (triple fault)");
        /* No IDT: the #UD cannot be delivered, nor the #GP that raises, nor the #DF.
         * ud2 rather than int3: some KVM hosts cannot emulate software interrupts. */
        static const struct { uint16_t limit; uint64_t base; } __attribute__((packed)) empty = { 0, 0 };
        __asm__ volatile("lidt %0; ud2" :: "m"(empty));
    } else if (strcmp(mode, "i8042") == 0) {
        puts("rebooting");
        outb(0x64, 0xFE);
    } else {
        printf("reboot: unknown mode=%s (want i8042 or triple)\n", mode);
        return GUEST_EXIT_FAIL;
    }
    /* A reset may take effect a little after the write. */
    delay_cycles(2000000000ull);
    puts("reboot failed");
    return GUEST_EXIT_FAIL;
}
