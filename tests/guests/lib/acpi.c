#include "guest.h"

struct acpi_rsdp {
    char signature[8];
    uint8_t checksum;
    char oem_id[6];
    uint8_t revision;
    uint32_t rsdt_address;
    uint32_t length;            /* revision >= 2 from here */
    uint64_t xsdt_address;
    uint8_t extended_checksum;
    uint8_t reserved[3];
} __attribute__((packed));

static uint8_t sum_bytes(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint8_t s = 0;
    while (n--)
        s += *b++;
    return s;
}

static bool rsdp_valid(const struct acpi_rsdp *r)
{
    if (memcmp(r->signature, "RSD PTR ", 8) != 0)
        return false;
    if (sum_bytes(r, 20) != 0)
        return false;
    if (r->revision >= 2 && (r->length < sizeof(*r) || r->length > 4096 || sum_bytes(r, r->length) != 0))
        return false;
    return true;
}

static const void *scan_rsdp(uintptr_t start, uintptr_t end)
{
    for (uintptr_t p = start; p + 20 <= end; p += 16)
        if (rsdp_valid((const struct acpi_rsdp *)p))
            return (const void *)p;
    return NULL;
}

const void *acpi_find_rsdp(const struct hvm_start_info *si)
{
    if (si && si->rsdp_paddr) {
        if (si->rsdp_paddr < (1ull << 32) && rsdp_valid((const void *)(uintptr_t)si->rsdp_paddr))
            return (const void *)(uintptr_t)si->rsdp_paddr;
        printf("acpi: start_info.rsdp_paddr 0x%lx holds no valid RSDP, scanning\n", si->rsdp_paddr);
    }
    uintptr_t bda_ebda = 0x40E;
    __asm__("" : "+r"(bda_ebda));   /* a fixed low address is not an out-of-bounds object */
    uintptr_t ebda = (uintptr_t)(*(volatile uint16_t *)bda_ebda) << 4;
    const void *r = NULL;
    if (ebda >= 0x80000 && ebda < 0xA0000)
        r = scan_rsdp(ebda, ebda + 1024);
    if (!r)
        r = scan_rsdp(0xE0000, 0x100000);
    if (!r)
        printf("acpi: no RSDP found\n");
    return r;
}

static const struct acpi_sdt_header *checked_table(uint64_t paddr)
{
    if (!paddr || paddr >= (1ull << 32))
        return NULL;
    const struct acpi_sdt_header *h = (const void *)(uintptr_t)paddr;
    if (h->length < sizeof(*h) || h->length > (16u << 20)) {
        printf("acpi: table at 0x%lx has bad length %u\n", paddr, h->length);
        return NULL;
    }
    if (sum_bytes(h, h->length) != 0) {
        printf("acpi: table %.4s at 0x%lx has a bad checksum\n", h->signature, paddr);
        return NULL;
    }
    return h;
}

const struct acpi_sdt_header *acpi_find_table(const void *rsdp_ptr, const char sig[4])
{
    const struct acpi_rsdp *rsdp = rsdp_ptr;
    if (!rsdp)
        return NULL;
    const struct acpi_sdt_header *root = NULL;
    size_t entry_size = 4;
    if (rsdp->revision >= 2 && rsdp->xsdt_address) {
        root = checked_table(rsdp->xsdt_address);
        entry_size = 8;
    }
    if (!root) {
        root = checked_table(rsdp->rsdt_address);
        entry_size = 4;
    }
    if (!root) {
        printf("acpi: no valid RSDT/XSDT\n");
        return NULL;
    }
    size_t n = (root->length - sizeof(*root)) / entry_size;
    const uint8_t *entries = (const uint8_t *)(root + 1);
    for (size_t i = 0; i < n; i++) {
        uint64_t addr = 0;
        memcpy(&addr, entries + i * entry_size, entry_size);   /* XSDT entries are unaligned */
        const struct acpi_sdt_header *h = checked_table(addr);
        if (h && memcmp(h->signature, sig, 4) == 0)
            return h;
    }
    return NULL;
}

bool madt_parse(const struct hvm_start_info *si, struct madt_info *out, bool verbose)
{
    memset(out, 0, sizeof(*out));
    for (uint32_t irq = 0; irq < 16; irq++)
        out->isa_gsi[irq] = irq;
    const void *rsdp = acpi_find_rsdp(si);
    if (!rsdp)
        return false;
    if (verbose)
        printf("acpi: rsdp at %p (start_info.rsdp_paddr 0x%lx)\n", rsdp, si ? si->rsdp_paddr : 0);
    const struct acpi_sdt_header *madt = acpi_find_table(rsdp, "APIC");
    if (!madt) {
        printf("acpi: no MADT (APIC) table\n");
        return false;
    }
    if (madt->length < sizeof(*madt) + 8) {
        printf("acpi: MADT too short (%u bytes)\n", madt->length);
        return false;
    }
    const uint8_t *base = (const uint8_t *)madt;
    memcpy(&out->lapic_addr, base + sizeof(*madt), 4);
    uint32_t madt_flags;
    memcpy(&madt_flags, base + sizeof(*madt) + 4, 4);
    if (verbose)
        printf("madt: lapic address 0x%x flags 0x%x\n", out->lapic_addr, madt_flags);
    const uint8_t *p = base + sizeof(*madt) + 8, *end = base + madt->length;
    while (p + 2 <= end) {
        uint8_t type = p[0], len = p[1];
        if (len < 2 || p + len > end) {
            printf("acpi: MADT entry type %u at offset %u has bad length %u\n", type,
                   (unsigned)(p - base), len);
            return false;
        }
        uint32_t apic_id = 0, flags = 0, acpi_id = 0;
        bool cpu = false;
        if (type == 0 && len >= 8) {            /* processor local APIC */
            acpi_id = p[2];
            apic_id = p[3];
            memcpy(&flags, p + 4, 4);
            cpu = true;
        } else if (type == 9 && len >= 16) {    /* processor local x2APIC */
            memcpy(&apic_id, p + 4, 4);
            memcpy(&flags, p + 8, 4);
            memcpy(&acpi_id, p + 12, 4);
            cpu = true;
        } else if (type == 1 && len >= 12) {    /* IOAPIC */
            uint32_t addr, gsi_base;
            memcpy(&addr, p + 4, 4);
            memcpy(&gsi_base, p + 8, 4);
            if (verbose)
                printf("madt: ioapic id %u address 0x%x gsi base %u\n", p[2], addr, gsi_base);
            if (!out->ioapic_addr) {
                out->ioapic_addr = addr;
                out->ioapic_id = p[2];
                out->ioapic_gsi_base = gsi_base;
            }
        } else if (type == 2 && len >= 10) {    /* interrupt source override */
            uint32_t gsi;
            uint16_t iflags;
            memcpy(&gsi, p + 4, 4);
            memcpy(&iflags, p + 8, 2);
            if (verbose)
                printf("madt: override bus %u irq %u -> gsi %u flags 0x%x\n", p[2], p[3], gsi, iflags);
            if (p[2] == 0 && p[3] < 16) {
                out->isa_gsi[p[3]] = gsi;
                out->isa_flags[p[3]] = iflags;
            }
            out->noverrides++;
        } else if (verbose) {
            printf("madt: entry type %u length %u\n", type, len);
        }
        if (cpu) {
            bool usable = flags & 1;            /* enabled; online-capable ones are hotplug slots */
            if (verbose)
                printf("madt: lapic acpi id %u apic id %u flags 0x%x%s\n", acpi_id, apic_id, flags,
                       usable ? "" : " (disabled)");
            if (usable) {
                if (out->ncpus < 64) {
                    out->apic_ids[out->ncpus] = apic_id;
                    out->acpi_ids[out->ncpus] = acpi_id;
                    out->cpu_flags[out->ncpus] = flags;
                } else {
                    printf("madt: more than 64 cpus, ignoring apic id %u\n", apic_id);
                }
                out->ncpus++;
            }
        }
        p += len;
    }
    if (out->ncpus > 64)
        out->ncpus = 64;
    return true;
}
