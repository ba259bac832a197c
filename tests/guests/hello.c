/* First boot check: console, command line, memory map, CPUID. */
#include "guest.h"

int guest_main(const struct hvm_start_info *si)
{
    puts("Hello from kvmpy test guest");
    printf("start_info: version %u at %p, flags 0x%x, modules %u, rsdp 0x%lx\n", si->version, si,
           si->flags, si->nr_modules, si->rsdp_paddr);
    printf("cmdline: %s\n", cmdline());
    memmap_print();
    uint64_t ram = memmap_total_ram();
    printf("total ram: %lu KiB (%lu MiB)\n", ram >> 10, ram >> 20);
    char vendor[13];
    cpuid_vendor(vendor);
    printf("cpu vendor: %s\n", vendor);
    return 0;
}
