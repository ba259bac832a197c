/*
 * PIIX IDE guest driver: finds the IDE function (8086:7010) by scanning every PCI
 * function through mechanism #1 (functions 1-7 only behind a multi-function
 * function 0, as Linux and SeaBIOS scan), drives the primary master ATA disk by
 * PIO and by bus-master DMA, and the secondary master ATAPI CD-ROM by PACKET
 * commands, all polled (nIEN set), at the legacy ports of compatibility mode.
 *
 * The disk holds the host's pattern: byte j of sector i is disk_byte(i, j).
 * cmdline: lba=N (8) where the reads start, wlba=N (100) where the writes go,
 * waitkey=1 waits for a byte on COM1 before the writes.
 * Prints:
 *   ide: found at 00:SS.F bmdma 0xPPPP
 *   ide: disk "MODEL" sectors N lba48 1
 *   ide: pio read lba L ok
 *   ide: multiple read lba L ok
 *   ide: dma read lba L ok
 *   ide: wrote lba W (pio) and W+1 (dma), flushed
 *   ide: cdrom signature ok
 *   ide: cdrom capacity N sectors of 2048
 *   ide: cdrom volume descriptor CD001 "VOLUME-ID"
 *   ide: cdrom dma read ok
 * and "ide: FAIL ..." on the first thing that goes wrong.
 */
#include "guest.h"

#define PRI 0x1f0
#define PRI_CTL 0x3f6
#define SEC 0x170
#define SEC_CTL 0x376

#define ST_BSY 0x80
#define ST_DRDY 0x40
#define ST_DRQ 0x08
#define ST_ERR 0x01

static uint8_t buf[65536] __attribute__((aligned(65536)));
static uint8_t dmabuf[16384] __attribute__((aligned(4096)));
static struct prd { uint32_t addr; uint16_t count, flags; } prd[4] __attribute__((aligned(64)));
static uint16_t bmdma;

static uint32_t cfg_read(int slot, int fn, int reg)
{
    outl(0xcf8, 0x80000000u | (uint32_t)slot << 11 | (uint32_t)fn << 8 | (reg & 0xfc));
    return inl(0xcfc);
}

static void cfg_write16(int slot, int fn, int reg, uint16_t v)
{
    outl(0xcf8, 0x80000000u | (uint32_t)slot << 11 | (uint32_t)fn << 8 | (reg & 0xfc));
    outw(0xcfc + (reg & 2), v);
}

static uint8_t disk_byte(uint64_t lba, uint32_t j)
{
    return (uint8_t)(lba * 31 + j * 7 + (j >> 8));
}

static int fail(const char *what)
{
    printf("ide: FAIL %s\n", what);
    return 1;
}

/* Waits for BSY to clear (a bounded number of polls); returns the status or -1. */
/* Polls before a wait gives up; a test that pauses the VM on a write error asks
 * for more (waitkey=1): the drive stays busy until the monitor's cont. */
static long patience = 50000000;

static int wait_ready(uint16_t base)
{
    for (long i = 0; i < patience; i++) {
        uint8_t st = inb(base + 7);
        if (!(st & ST_BSY))
            return st;
        cpu_relax();
    }
    return -1;
}

static void taskfile48(uint16_t base, uint64_t lba, uint16_t count)
{
    outb(base + 6, 0x40);                 /* master, LBA */
    outb(base + 2, count >> 8);
    outb(base + 3, lba >> 24);
    outb(base + 4, lba >> 32);
    outb(base + 5, lba >> 40);
    outb(base + 2, count);
    outb(base + 3, lba);
    outb(base + 4, lba >> 8);
    outb(base + 5, lba >> 16);
}

static int check_disk(const uint8_t *p, uint64_t lba, int sectors)
{
    for (int s = 0; s < sectors; s++)
        for (uint32_t j = 0; j < 512; j++)
            if (p[s * 512 + j] != disk_byte(lba + s, j)) {
                printf("ide: byte %u of lba %lu is 0x%02x, not 0x%02x\n", j, lba + s, p[s * 512 + j],
                       disk_byte(lba + s, j));
                return -1;
            }
    return 0;
}

static int pio_in(uint16_t base, uint8_t *p, int blocks, int block_bytes)
{
    for (int b = 0; b < blocks; b++) {
        int st = wait_ready(base);
        if (st < 0 || (st & ST_ERR) || !(st & ST_DRQ))
            return -1;
        for (int i = 0; i < block_bytes; i += 4) {
            uint32_t v = inl(base);
            memcpy(p + b * block_bytes + i, &v, 4);
        }
    }
    return 0;
}

/* Waits for the engine to go inactive (the transfer's end; DRQ may show until then,
 * and with nIEN set the interrupt bit stays clear). */
static int wait_dma(uint16_t bm)
{
    for (long i = 0; i < patience; i++) {
        uint8_t bst = inb(bm + 2);
        if (!(bst & 0x01) || (bst & 0x02))
            return bst;
        cpu_relax();
    }
    return -1;
}

/* A DMA command: PRD entries over ``p`` in pieces of ``piece`` bytes, the ATA command, start, wait. */
static int dma(uint16_t base, uint16_t bm, uint8_t cmd, int to_memory, uint8_t *p, uint32_t bytes, uint32_t piece)
{
    int n = 0;
    for (uint32_t off = 0; off < bytes; off += piece, n++) {
        uint32_t len = bytes - off < piece ? bytes - off : piece;
        prd[n] = (struct prd){(uint32_t)(uintptr_t)(p + off), (uint16_t)len, 0};
    }
    prd[n - 1].flags = 0x8000;
    outl(bm + 4, (uint32_t)(uintptr_t)prd);
    outb(bm + 2, 0x06);                   /* clear interrupt and error */
    outb(bm, to_memory ? 0x08 : 0x00);
    outb(base + 7, cmd);
    outb(bm, to_memory ? 0x09 : 0x01);
    int bst = wait_dma(bm);
    int st = wait_ready(base);
    outb(bm, 0);
    if (st < 0 || bst < 0 || (st & (ST_ERR | ST_DRQ)) || (bst & 0x02)) {
        printf("ide: dma command 0x%02x: status 0x%02x bmdma status 0x%02x\n", cmd, st, bst);
        return -1;
    }
    return 0;
}

static int packet(const uint8_t *cdb, uint8_t *out, uint32_t max, uint32_t *got, int use_dma)
{
    outb(SEC + 6, 0xa0);
    outb(SEC + 1, use_dma ? 1 : 0);
    outb(SEC + 4, 0xfe);
    outb(SEC + 5, 0xff);
    outb(SEC + 7, 0xa0);
    int st = wait_ready(SEC);
    if (st < 0 || !(st & ST_DRQ))
        return -1;
    for (int i = 0; i < 12; i += 2)
        outw(SEC, (uint16_t)(cdb[i] | cdb[i + 1] << 8));
    if (use_dma) {
        outb(bmdma + 8, 0x09);
        int bst = wait_dma(bmdma + 8);
        st = wait_ready(SEC);
        outb(bmdma + 8, 0);
        *got = max;
        return st < 0 || bst < 0 || (bst & 0x02) || (st & ST_ERR) ? -1 : 0;
    }
    *got = 0;
    for (;;) {
        st = wait_ready(SEC);
        if (st < 0 || (st & ST_ERR))
            return -1;
        if (!(st & ST_DRQ))
            return 0;
        uint32_t n = inb(SEC + 4) | (uint32_t)inb(SEC + 5) << 8;
        for (uint32_t i = 0; i < n; i += 2) {
            uint16_t v = inw(SEC);
            if (*got + 2 <= max)
                memcpy(out + *got, &v, 2);
            *got += 2;
        }
    }
}

int guest_main(const struct hvm_start_info *si)
{
    uint64_t lba = cmdline_get_u64("lba", 8);
    uint64_t wlba = cmdline_get_u64("wlba", 100);
    int slot = -1, fn = -1;
    for (int s = 0; s < 32 && slot < 0; s++) {
        if ((cfg_read(s, 0, 0) & 0xffff) == 0xffff)
            continue;
        int fns = (cfg_read(s, 0, 0x0c) >> 16) & 0x80 ? 8 : 1;
        for (int f = 0; f < fns; f++)
            if (cfg_read(s, f, 0) == 0x70108086) {
                slot = s;
                fn = f;
                break;
            }
    }
    if (slot < 0)
        return fail("no PIIX IDE function (8086:7010)");
    if ((cfg_read(slot, fn, 0x08) >> 8) != 0x010180)
        return fail("class is not IDE in compatibility mode");
    bmdma = cfg_read(slot, fn, 0x20) & 0xfffc;
    cfg_write16(slot, fn, 0x04, 0x05);    /* I/O decode and bus mastering */
    printf("ide: found at 00:%02x.%x bmdma 0x%04x\n", slot, fn, bmdma);

    /* a software reset of both channels (nIEN kept: polled): the firmware may have
     * left the devices mid-conversation, and the signatures show only after a reset */
    outb(PRI_CTL, 0x06);
    outb(SEC_CTL, 0x06);
    for (int i = 0; i < 1000; i++)
        inb(PRI_CTL);
    outb(PRI_CTL, 0x02);
    outb(SEC_CTL, 0x02);
    /* the reset may end some time after SRST goes low (QEMU finishes it later): BSY
     * clear first, then the master selected and ready */
    if (wait_ready(PRI) < 0)
        return fail("primary channel stays busy after the reset");
    /* selecting again until it takes: a device ignores the write while the one
     * selected before is busy (QEMU's absent slave can be, for a moment) */
    int ready = 0;
    for (long i = 0; i < 50000000 && !ready; i++) {
        outb(PRI + 6, 0xa0);
        ready = (inb(PRI + 7) & (ST_BSY | ST_DRDY)) == ST_DRDY;
    }
    if (!ready)
        return fail("primary master not ready");
    outb(PRI + 7, 0xec);
    if (pio_in(PRI, buf, 1, 512) < 0) {
        printf("ide: status 0x%02x error 0x%02x\n", inb(PRI + 7), inb(PRI + 1));
        return fail("IDENTIFY DEVICE");
    }
    const uint16_t *id = (const uint16_t *)buf;
    char model[41];
    for (int i = 0; i < 20; i++) {
        model[2 * i] = (char)(id[27 + i] >> 8);
        model[2 * i + 1] = (char)id[27 + i];
    }
    model[40] = 0;
    for (int i = 39; i >= 0 && model[i] == ' '; i--)
        model[i] = 0;
    uint64_t sectors = id[100] | (uint64_t)id[101] << 16 | (uint64_t)id[102] << 32;
    printf("ide: disk \"%s\" sectors %lu lba48 %d\n", model, sectors, (id[83] >> 10) & 1);
    if (lba + 16 > sectors || wlba + 2 > sectors)
        return fail("disk too small");

    /* READ SECTORS (LBA28), 4 sectors one DRQ block each */
    outb(PRI + 6, 0xe0 | ((lba >> 24) & 0x0f));
    outb(PRI + 2, 4);
    outb(PRI + 3, lba);
    outb(PRI + 4, lba >> 8);
    outb(PRI + 5, lba >> 16);
    outb(PRI + 7, 0x20);
    memset(buf, 0, 4 * 512);
    if (pio_in(PRI, buf, 4, 512) < 0 || check_disk(buf, lba, 4) < 0)
        return fail("pio read");
    printf("ide: pio read lba %lu ok\n", lba);

    /* SET MULTIPLE MODE 8, READ MULTIPLE EXT of 16 sectors: two blocks */
    outb(PRI + 2, 8);
    outb(PRI + 7, 0xc6);
    if (wait_ready(PRI) & ST_ERR)
        return fail("set multiple");
    taskfile48(PRI, lba, 16);
    outb(PRI + 7, 0x29);
    memset(buf, 0, 16 * 512);
    if (pio_in(PRI, buf, 2, 8 * 512) < 0 || check_disk(buf, lba, 16) < 0)
        return fail("read multiple");
    printf("ide: multiple read lba %lu ok\n", lba);

    /* READ DMA EXT of 8 sectors over three PRD entries */
    memset(dmabuf, 0, 8 * 512);
    taskfile48(PRI, lba + 3, 8);
    if (dma(PRI, bmdma, 0x25, 1, dmabuf, 8 * 512, 1536) < 0 || check_disk(dmabuf, lba + 3, 8) < 0)
        return fail("dma read");
    printf("ide: dma read lba %lu ok\n", lba + 3);

    if (cmdline_get_u64("waitkey", 0)) {      /* a test sets up its monitor first */
        puts("ide: waiting for a key");
        while (serial_getc_nowait() < 0)
            cpu_relax();
        patience *= 20;
    }
    /* WRITE SECTORS (PIO) at wlba, WRITE DMA at wlba+1, FLUSH CACHE EXT */
    for (uint32_t j = 0; j < 1024; j++)
        dmabuf[j] = (uint8_t)(0x5a ^ j ^ (j >> 8));
    taskfile48(PRI, wlba, 1);
    outb(PRI + 6, 0xe0);
    outb(PRI + 7, 0x30);
    int st = wait_ready(PRI);
    if (st < 0 || !(st & ST_DRQ))
        return fail("write sectors: no DRQ");
    for (int i = 0; i < 512; i += 2)
        outw(PRI, (uint16_t)(dmabuf[i] | dmabuf[i + 1] << 8));
    st = wait_ready(PRI);
    if (st < 0 || (st & (ST_ERR | ST_DRQ)))
        return fail("write sectors");
    taskfile48(PRI, wlba + 1, 1);
    if (dma(PRI, bmdma, 0xca, 0, dmabuf + 512, 512, 512) < 0)
        return fail("dma write");
    outb(PRI + 7, 0xea);
    st = wait_ready(PRI);
    if (st < 0 || (st & ST_ERR))
        return fail("flush cache ext");
    printf("ide: wrote lba %lu (pio) and %lu (dma), flushed\n", wlba, wlba + 1);

    /* The CD-ROM, secondary master */
    if (wait_ready(SEC) < 0)
        return fail("secondary channel stays busy after the reset");
    int selected = 0;
    for (long i = 0; i < 50000000 && !selected; i++) {
        outb(SEC + 6, 0xa0);
        selected = !(inb(SEC + 7) & ST_BSY) && (inb(SEC + 6) & 0x10) == 0;
    }
    if (!selected)
        return fail("secondary master cannot be selected");
    if (inb(SEC + 4) != 0x14 || inb(SEC + 5) != 0xeb)
        return fail("no ATAPI signature on the secondary master");
    puts("ide: cdrom signature ok");
    uint8_t cdb[12];
    uint32_t got = 0;
    ready = 0;
    for (int tries = 0; tries < 4 && !ready; tries++) {
        memset(cdb, 0, 12);                       /* TEST UNIT READY: a unit attention first is fine */
        ready = packet(cdb, buf, 0, &got, 0) == 0;
    }
    if (!ready)
        return fail("cdrom not ready");
    memset(cdb, 0, 12);
    cdb[0] = 0x25;                                /* READ CAPACITY */
    if (packet(cdb, buf, 8, &got, 0) < 0 || got != 8)
        return fail("read capacity");
    uint32_t last = (uint32_t)buf[0] << 24 | buf[1] << 16 | buf[2] << 8 | buf[3];
    uint32_t block = (uint32_t)buf[4] << 24 | buf[5] << 16 | buf[6] << 8 | buf[7];
    printf("ide: cdrom capacity %u sectors of %u\n", last + 1, block);
    memset(cdb, 0, 12);
    cdb[0] = 0x28;                                /* READ(10) of sector 16: the primary volume descriptor */
    cdb[5] = 16;
    cdb[8] = 1;
    if (packet(cdb, buf, 2048, &got, 0) < 0 || got != 2048)
        return fail("read(10)");
    if (buf[0] != 1 || memcmp(buf + 1, "CD001", 5) != 0)
        return fail("sector 16 is no primary volume descriptor");
    char volume[33];
    memcpy(volume, buf + 40, 32);
    volume[32] = 0;
    for (int i = 31; i >= 0 && volume[i] == ' '; i--)
        volume[i] = 0;
    printf("ide: cdrom volume descriptor CD001 \"%s\"\n", volume);
    /* the same sector again by DMA, compared with the PIO copy */
    prd[0] = (struct prd){(uint32_t)(uintptr_t)dmabuf, 2048, 0x8000};
    outl(bmdma + 8 + 4, (uint32_t)(uintptr_t)prd);
    outb(bmdma + 8 + 2, 0x06);
    outb(bmdma + 8, 0x08);
    memset(dmabuf, 0, 2048);
    if (packet(cdb, dmabuf, 2048, &got, 1) < 0 || memcmp(dmabuf, buf, 2048) != 0)
        return fail("cdrom dma read");
    puts("ide: cdrom dma read ok");
    return 0;
}
