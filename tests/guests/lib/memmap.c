#include "guest.h"

static const struct hvm_memmap_table_entry *memmap_entries(uint32_t *count)
{
    *count = 0;
    if (!start_info || start_info->version < 1 || !start_info->memmap_paddr)
        return NULL;
    if (start_info->memmap_paddr >= (1ull << 32))
        return NULL;
    *count = start_info->memmap_entries;
    return (const struct hvm_memmap_table_entry *)(uintptr_t)start_info->memmap_paddr;
}

const char *memmap_type_name(uint32_t type)
{
    switch (type) {
    case 1: return "ram";
    case 2: return "reserved";
    case 3: return "acpi";
    case 4: return "nvs";
    case 5: return "unusable";
    case 6: return "disabled";
    case 7: return "pmem";
    default: return "unknown";
    }
}

void memmap_print(void)
{
    uint32_t n;
    const struct hvm_memmap_table_entry *e = memmap_entries(&n);
    if (!e) {
        printf("memmap: none (start_info version %u)\n", start_info ? start_info->version : 0);
        return;
    }
    printf("memmap: %u entries\n", n);
    for (uint32_t i = 0; i < n; i++)
        printf("memmap: [mem 0x%016lx-0x%016lx] %s\n", e[i].addr, e[i].addr + e[i].size - 1,
               memmap_type_name(e[i].type));
}

uint64_t memmap_total_ram(void)
{
    uint32_t n;
    const struct hvm_memmap_table_entry *e = memmap_entries(&n);
    uint64_t total = 0;
    for (uint32_t i = 0; e && i < n; i++)
        if (e[i].type == 1)
            total += e[i].size;
    return total;
}

bool memmap_is_ram(uint64_t addr, uint64_t len)
{
    uint32_t n;
    const struct hvm_memmap_table_entry *e = memmap_entries(&n);
    for (uint32_t i = 0; e && i < n; i++)
        if (e[i].type == 1 && addr >= e[i].addr && addr + len <= e[i].addr + e[i].size)
            return true;
    return false;
}
