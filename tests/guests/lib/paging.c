#include "guest.h"

extern uint64_t boot_pml4[512], boot_pdpt[512], boot_pd[4 * 512];

#define POOL_PAGES 16
static uint64_t pool[POOL_PAGES][512] __attribute__((aligned(4096)));
static int pool_used;

void paging_flush(void)
{
    write_cr3(read_cr3());
}

void paging_set_user(uint64_t start, uint64_t end, bool user)
{
    if (end > (1ull << 32))
        end = 1ull << 32;
    for (uint64_t a = start & ~((2ull << 20) - 1); a < end; a += 2ull << 20) {
        uint64_t *e = &boot_pd[a >> 21];
        *e = user ? (*e | PTE_U) : (*e & ~(uint64_t)PTE_U);
    }
    paging_flush();
}

static uint64_t *next_level(uint64_t *entry)
{
    if (!(*entry & PTE_P)) {
        if (pool_used == POOL_PAGES)
            panic("paging: page-table pool exhausted");
        uint64_t *table = pool[pool_used++];
        memset(table, 0, 4096);
        *entry = (uint64_t)(uintptr_t)table | PTE_P | PTE_W | PTE_U;
    }
    if (*entry & PTE_PS)
        panic("paging: 0x%lx is inside a large page", *entry);
    return (uint64_t *)(uintptr_t)(*entry & 0x000FFFFFFFFFF000ull);
}

void paging_map_2m(uint64_t virt, uint64_t phys, uint64_t flags)
{
    if ((virt | phys) & ((2ull << 20) - 1) || virt >= (1ull << 47))
        panic("paging: bad 2 MiB mapping 0x%lx -> 0x%lx", virt, phys);
    uint64_t *pdpt = next_level(&boot_pml4[(virt >> 39) & 511]);
    uint64_t *pd = next_level(&pdpt[(virt >> 30) & 511]);
    pd[(virt >> 21) & 511] = phys | flags | PTE_P | PTE_PS;
    paging_flush();
}
