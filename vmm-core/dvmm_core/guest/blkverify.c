/* blkverify DEVICE SIZE PASSES [SEED [THREADS]]
 *
 * Write, flush and re-read SIZE bytes of numbered, checksummed 4 KiB blocks
 * at the start of DEVICE, PASSES times, with O_DIRECT so every read and
 * write reaches the device (no page cache), from THREADS threads (default
 * 4) so several requests are in flight at once.  Built statically into the
 * dvmm test guest for the crash-recovery tests: the backend serving DEVICE
 * is killed and restarted while this runs, and it must not notice.
 *
 * Block layout (little endian; the host recomputes it, see
 * vmm-core/dvmm_core/guest/blkpattern.py, which must stay in step):
 *   0     8  magic "DVMMBLK1"
 *   8     8  block number
 *   16    8  pass number (1..PASSES)
 *   24    8  seed
 *   32 4056  payload: 507 words, word j = tag ^ splitmix64(j),
 *            tag = splitmix64(seed ^ pass << 32 ^ block)
 *   4088  4  crc32 (zlib's) of bytes 0..4087
 *   4092  4  zero
 *
 * PASSES 0 means: until SIGUSR1, after which the pass under way is finished
 * (written, flushed and verified) and the tool stops.
 *
 * Output: one line per pass, then one summary line
 *   "blkverify: done passes=P blocks_verified=N bad=B eio=E seed=S".
 * A read or write that fails (EIO...) is reported and retried (at most
 * RETRIES times, 10 ms apart); it, or a block that does not verify, is
 * reported on its own line ("blkverify: EIO ..." / "blkverify: MISMATCH ...",
 * the first 20 of each) and makes the exit status 1.  Bad arguments: 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define CHUNK_BLOCKS 16 /* 64 KiB per read/write call */
#define WORDS 507
#define CRC_AT 4088
#define MAX_REPORTS 20

static const char MAGIC[8] = "DVMMBLK1";
static uint64_t table[WORDS];
static uint32_t crc_table[8][256];
/* The CRC of each block as this pass wrote it: the read phase compares with
 * it instead of computing it again (the guest's CPU, emulated, is the
 * bottleneck; the less it computes, the busier the backend under test). */
static uint32_t *crcs;
#define RETRIES 100
static int dev_fd;
static uint64_t nblocks, seed;
static unsigned nthreads = 4;
static pthread_mutex_t report_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned reports_eio, reports_bad;
static volatile sig_atomic_t stop_requested;

struct job {
    unsigned index;
    uint64_t pass;
    int writing;
    uint64_t ok, bad, eio;
};

static uint64_t splitmix64(uint64_t x)
{
    uint64_t z = x + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* zlib's CRC-32, eight bytes per step ("slicing-by-8"). */
static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320U ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

static uint32_t crc32(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFU;
    for (; n >= 8; n -= 8, p += 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= c;
        c = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^
            crc_table[5][(lo >> 16) & 0xFF] ^ crc_table[4][lo >> 24] ^
            crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
            crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
    }
    while (n--)
        c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFU;
}

static void put64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* Block *block* of pass *pass*; its CRC is computed when *crc* is NULL. */
static void fill_block(unsigned char *b, uint64_t block, uint64_t pass, const uint32_t *crc)
{
    uint64_t tag = splitmix64(seed ^ pass << 32 ^ block);
    memcpy(b, MAGIC, 8);
    put64(b + 8, block);
    put64(b + 16, pass);
    put64(b + 24, seed);
    for (int j = 0; j < WORDS; j++)
        put64(b + 32 + 8 * j, tag ^ table[j]);
    uint32_t sum = crc != NULL ? *crc : crc32(b, CRC_AT), zero = 0;
    memcpy(b + CRC_AT, &sum, 4);
    memcpy(b + CRC_AT + 4, &zero, 4);
}

static void report(unsigned *counter, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(unsigned *counter, const char *fmt, ...)
{
    pthread_mutex_lock(&report_lock);
    if ((*counter)++ < MAX_REPORTS) {
        va_list ap;
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
        fflush(stdout);
    }
    pthread_mutex_unlock(&report_lock);
}

/* Why a block does not verify, for the report line. */
static void check_block(const unsigned char *got, unsigned char *want, uint64_t block,
                        uint64_t pass, struct job *j)
{
    fill_block(want, block, pass, &crcs[block]);
    if (memcmp(got, want, BLOCK) == 0) {
        j->ok++;
        return;
    }
    j->bad++;
    uint32_t crc;
    memcpy(&crc, got + CRC_AT, 4);
    report(&reports_bad, "blkverify: MISMATCH block %llu pass %llu: found magic %s "
           "block %llu pass %llu seed %llu crc %s\n",
           (unsigned long long)block, (unsigned long long)pass,
           memcmp(got, MAGIC, 8) == 0 ? "ok" : "bad",
           (unsigned long long)get64(got + 8), (unsigned long long)get64(got + 16),
           (unsigned long long)get64(got + 24),
           crc == crc32(got, CRC_AT) ? "ok" : "bad");
}

static void do_chunk(struct job *j, unsigned char *buf, unsigned char *want, uint64_t first,
                     uint64_t count)
{
    size_t len = count * BLOCK;
    off_t off = (off_t)(first * BLOCK);
    if (j->writing)
        for (uint64_t i = 0; i < count; i++) {
            fill_block(buf + i * BLOCK, first + i, j->pass, NULL);
            memcpy(&crcs[first + i], buf + i * BLOCK + CRC_AT, 4);
        }
    /* A failed transfer is reported and retried (up to RETRIES times): an
     * injected error may surface once, and a write the device refused is not
     * acknowledged, so the pass must still end with the block written. */
    for (int attempt = 0;; attempt++) {
        ssize_t n = j->writing ? pwrite(dev_fd, buf, len, off) : pread(dev_fd, buf, len, off);
        if (n == (ssize_t)len)
            break;
        j->eio += count;
        report(&reports_eio, "blkverify: EIO %s blocks %llu..%llu pass %llu: %s\n",
               j->writing ? "writing" : "reading", (unsigned long long)first,
               (unsigned long long)(first + count - 1), (unsigned long long)j->pass,
               n < 0 ? strerror(errno) : "short transfer");
        if (attempt + 1 >= RETRIES)
            return;
        usleep(10000);
    }
    if (!j->writing)
        for (uint64_t i = 0; i < count; i++)
            check_block(buf + i * BLOCK, want, first + i, j->pass, j);
}

static void *worker(void *arg)
{
    struct job *j = arg;
    unsigned char *buf, *want;
    if (posix_memalign((void **)&buf, BLOCK, CHUNK_BLOCKS * BLOCK) != 0 ||
        posix_memalign((void **)&want, BLOCK, BLOCK) != 0) {
        perror("blkverify: posix_memalign");
        exit(1);
    }
    uint64_t chunks = (nblocks + CHUNK_BLOCKS - 1) / CHUNK_BLOCKS;
    for (uint64_t c = j->index; c < chunks; c += nthreads) {
        uint64_t first = c * CHUNK_BLOCKS;
        uint64_t count = nblocks - first < CHUNK_BLOCKS ? nblocks - first : CHUNK_BLOCKS;
        do_chunk(j, buf, want, first, count);
    }
    free(buf);
    free(want);
    return NULL;
}

/* One phase (write or read+verify) over every block, all threads; totals in *sum. */
static void phase(uint64_t pass, int writing, struct job *sum)
{
    pthread_t tid[64];
    struct job jobs[64];
    for (unsigned t = 0; t < nthreads; t++) {
        jobs[t] = (struct job){ .index = t, .pass = pass, .writing = writing };
        if (pthread_create(&tid[t], NULL, worker, &jobs[t]) != 0) {
            fprintf(stderr, "blkverify: pthread_create failed\n");
            exit(1);
        }
    }
    for (unsigned t = 0; t < nthreads; t++) {
        pthread_join(tid[t], NULL);
        sum->ok += jobs[t].ok;
        sum->bad += jobs[t].bad;
        sum->eio += jobs[t].eio;
    }
}

static uint64_t parse_size(const char *s)
{
    char *end;
    uint64_t v = strtoull(s, &end, 0);
    switch (*end) {
    case 'G': v <<= 10; /* fall through */
    case 'M': v <<= 10; /* fall through */
    case 'K': v <<= 10; end++; break;
    }
    return *end == '\0' ? v : 0;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void on_usr1(int sig)
{
    (void)sig;
    stop_requested = 1;
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc > 6) {
        fprintf(stderr, "usage: blkverify DEVICE SIZE[K|M|G] PASSES [SEED [THREADS]]\n");
        return 2;
    }
    uint64_t size = parse_size(argv[2]);
    long passes = strtol(argv[3], NULL, 0);
    seed = argc > 4 ? strtoull(argv[4], NULL, 0) : 1;
    nthreads = argc > 5 ? (unsigned)strtoul(argv[5], NULL, 0) : 4;
    if (size < BLOCK || size % BLOCK || passes < 0 || nthreads < 1 || nthreads > 64) {
        fprintf(stderr, "blkverify: SIZE must be a multiple of 4096, PASSES >= 0, "
                "1 <= THREADS <= 64\n");
        return 2;
    }
    nblocks = size / BLOCK;
    dev_fd = open(argv[1], O_RDWR | O_DIRECT);
    if (dev_fd < 0) {
        fprintf(stderr, "blkverify: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    crc_init();
    crcs = calloc(nblocks, sizeof *crcs);
    if (crcs == NULL) {
        fprintf(stderr, "blkverify: out of memory\n");
        return 1;
    }
    for (int j = 0; j < WORDS; j++)
        table[j] = splitmix64((uint64_t)j);
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGUSR1, on_usr1);
    uint64_t verified = 0, bad = 0, eio = 0;
    long p;
    for (p = 1; passes == 0 ? !stop_requested : p <= passes; p++) {
        struct job w = {0}, r = {0};
        double t0 = now();
        phase((uint64_t)p, 1, &w);
        int synced = fsync(dev_fd) == 0;
        if (!synced) {
            eio++;
            report(&reports_eio, "blkverify: EIO fsync pass %ld: %s\n", p, strerror(errno));
        }
        double t1 = now();
        phase((uint64_t)p, 0, &r);
        double t2 = now();
        verified += r.ok;
        bad += r.bad;
        eio += w.eio + r.eio;
        printf("blkverify: pass %ld/%ld wrote %llu (%.1f s) fsync %s verified %llu "
               "(%.1f s) bad %llu eio %llu\n", p, passes,
               (unsigned long long)(nblocks - w.eio), t1 - t0, synced ? "ok" : "FAILED",
               (unsigned long long)r.ok, t2 - t1, (unsigned long long)r.bad,
               (unsigned long long)(w.eio + r.eio));
    }
    printf("blkverify: done passes=%ld blocks_verified=%llu bad=%llu eio=%llu seed=%llu\n",
           p - 1, (unsigned long long)verified, (unsigned long long)bad,
           (unsigned long long)eio, (unsigned long long)seed);
    close(dev_fd);
    return bad == 0 && eio == 0 ? 0 : 1;
}
