#include "guest.h"

#define CMDLINE_MAX 2048

/* Copied at boot: the loader's copy may sit in memory a guest reuses (e.g. low RAM). */
static char cmdline_copy[CMDLINE_MAX];

void cmdline_init(const struct hvm_start_info *si)
{
    cmdline_copy[0] = 0;
    if (!si->cmdline_paddr)
        return;
    if (si->cmdline_paddr >= (1ull << 32)) {
        printf("guest: cmdline at 0x%lx is above 4 GiB, ignored\n", si->cmdline_paddr);
        return;
    }
    const char *src = (const char *)(uintptr_t)si->cmdline_paddr;
    size_t n = 0;
    while (n < CMDLINE_MAX - 1 && src[n])
        n++;
    if (src[n])
        printf("guest: cmdline longer than %d bytes, truncated\n", CMDLINE_MAX - 1);
    memcpy(cmdline_copy, src, n);
    cmdline_copy[n] = 0;
}

const char *cmdline(void)
{
    return cmdline_copy;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Finds key as a whole token; returns the start of its value ("" for a bare key). */
static const char *find_value(const char *key, size_t *value_len)
{
    size_t klen = strlen(key);
    const char *p = cmdline_copy;
    const char *found = NULL;
    while (*p) {
        while (is_space(*p))
            p++;
        const char *tok = p;
        while (*p && !is_space(*p))
            p++;
        size_t tlen = (size_t)(p - tok);
        if (tlen >= klen && strncmp(tok, key, klen) == 0 && (tlen == klen || tok[klen] == '=')) {
            /* The last occurrence wins, as on Linux. */
            found = tok + klen + (tlen > klen);
            *value_len = tlen - klen - (tlen > klen);
        }
    }
    return found;
}

bool cmdline_get(const char *key, char *buf, size_t size)
{
    size_t len;
    const char *v = find_value(key, &len);
    if (!v)
        return false;
    if (size) {
        if (len > size - 1)
            len = size - 1;
        memcpy(buf, v, len);
        buf[len] = 0;
    }
    return true;
}

bool cmdline_has(const char *key)
{
    size_t len;
    return find_value(key, &len) != NULL;
}

bool parse_u64(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    unsigned base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    if (!*s)
        return false;
    for (; *s; s++) {
        unsigned d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            return false;
        if (v > (UINT64_MAX - d) / base)
            return false;
        v = v * base + d;
    }
    *out = v;
    return true;
}

uint64_t cmdline_get_u64(const char *key, uint64_t dflt)
{
    char buf[32];
    if (!cmdline_get(key, buf, sizeof(buf)))
        return dflt;
    if (!buf[0])
        return 1;
    uint64_t v;
    if (!parse_u64(buf, &v)) {
        printf("guest: cmdline %s=%s is not a number, using %lu\n", key, buf, dflt);
        return dflt;
    }
    return v;
}
