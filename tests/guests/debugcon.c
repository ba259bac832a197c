/* A port device that is not kvmpy's: the Bochs/QEMU debug console at port 0xE9
 * (`iobase=N` on the command line moves it).  Reading the port returns 0xE9 when
 * the device is there; every byte written goes to the host's file. */
#include "guest.h"

int guest_main(const struct hvm_start_info *si)
{
    uint16_t port = (uint16_t)cmdline_get_u64("iobase", 0xE9);
    uint8_t probe = inb(port);
    printf("debugcon probe at 0x%x: 0x%x\n", port, probe);
    if (probe != 0xE9)
        return 3;
    const char *msg = "hello through a plug-in port device\n";
    for (const char *p = msg; *p; p++)
        outb(port, (uint8_t)*p);
    return 0;
}
