/* Exits with `code=N` (default 0): checks a VMM's exit-status plumbing. */
#include "guest.h"

int guest_main(const struct hvm_start_info *si)
{
    uint64_t code = cmdline_get_u64("code", 0);
    printf("exit code: %lu\n", code);
    return (int)(uint32_t)code;
}
