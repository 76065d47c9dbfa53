/* netverify HOST PORT SEED [RATE]
 *
 * A sequenced, checksummed TCP stream between the dvmm test guest and a host
 * receiver (dvmm_core.chaos.workload_net), both ways at once, for the chaos
 * campaigns: the net backend under the guest's NIC drops, duplicates,
 * reorders and corrupts frames, or is killed, and TCP must still deliver
 * every record intact and in order.
 *
 * Record (little endian; the host recomputes it, see
 * vmm-core/dvmm_core/chaos/workload_net.py, which must stay in step):
 *   0  8  magic "DVMMNET1"
 *   8  8  sequence number (0, 1, 2 ... per direction and connection)
 *   16 4  payload length L = 16 + splitmix64(seed ^ dir << 40 ^ seq) % 1024
 *   20 L  payload: byte i = (splitmix64(seed ^ dir << 40 ^ seq) >> (8 * (i % 8))) + i / 8
 *   20+L 4 crc32 (zlib's) of bytes 0..20+L-1
 * dir is 1 for guest -> host records, 2 for host -> guest records.
 *
 * The guest sends RATE records per second (default 200, 0: as fast as it
 * can); a second thread reads and verifies the host's records.  Output lines:
 *   "netverify: tx N rx M"                     every second
 *   "netverify: MISMATCH rx seq S: why"        a host record did not verify
 *   "netverify: ERROR what: strerror"          the connection failed
 *   "netverify: connected N"                   connection N is up
 * After an error the tool connects again and both sides restart at seq 0.
 * Bad arguments: exit status 2.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PAYLOAD (16 + 1024)
#define HEAD 20

static const char MAGIC[8] = "DVMMNET1";
static uint64_t seed;
static uint32_t crc_table[256];
static volatile uint64_t tx_count, rx_count;

static uint64_t splitmix64(uint64_t x)
{
    uint64_t z = x + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static uint32_t crc32(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFU;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFU;
}

/* Record *seq* of direction *dir* into *r*; its total length. */
static size_t make_record(unsigned char *r, uint64_t dir, uint64_t seq)
{
    uint64_t tag = splitmix64(seed ^ dir << 40 ^ seq);
    uint32_t len = 16 + (uint32_t)(tag % 1024);
    memcpy(r, MAGIC, 8);
    memcpy(r + 8, &seq, 8);
    memcpy(r + 16, &len, 4);
    for (uint32_t i = 0; i < len; i++)
        r[HEAD + i] = (unsigned char)((tag >> (8 * (i % 8))) + i / 8);
    uint32_t sum = crc32(r, HEAD + len);
    memcpy(r + HEAD + len, &sum, 4);
    return HEAD + len + 4;
}

static int read_full(int fd, unsigned char *p, size_t n)
{
    while (n) {
        ssize_t got = read(fd, p, n);
        if (got <= 0)
            return got == 0 ? -2 : -1;
        p += got;
        n -= (size_t)got;
    }
    return 0;
}

/* Reads and verifies the host's records until the connection ends. */
static void *receiver(void *arg)
{
    int fd = *(int *)arg;
    static unsigned char got[HEAD + MAX_PAYLOAD + 4], want[HEAD + MAX_PAYLOAD + 4];
    for (uint64_t seq = 0;; seq++) {
        int rc = read_full(fd, got, HEAD);
        uint32_t len = 0;
        if (rc == 0) {
            memcpy(&len, got + 16, 4);
            if (memcmp(got, MAGIC, 8) != 0 || len > MAX_PAYLOAD) {
                printf("netverify: MISMATCH rx seq %llu: bad header\n", (unsigned long long)seq);
                return NULL;
            }
            rc = read_full(fd, got + HEAD, len + 4);
        }
        if (rc != 0) {
            if (rc == -1)
                printf("netverify: ERROR rx: %s\n", strerror(errno));
            return NULL;
        }
        size_t n = make_record(want, 2, seq);
        if (n != HEAD + len + 4 || memcmp(got, want, n) != 0) {
            uint64_t found;
            memcpy(&found, got + 8, 8);
            printf("netverify: MISMATCH rx seq %llu: found seq %llu len %u\n",
                   (unsigned long long)seq, (unsigned long long)found, len);
            return NULL;
        }
        rx_count++;
    }
}

static int connect_to(const char *host, int port)
{
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
        return -2;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One connection: send records until it fails. */
static void stream(int fd, long rate)
{
    static unsigned char rec[HEAD + MAX_PAYLOAD + 4];
    pthread_t rx;
    if (pthread_create(&rx, NULL, receiver, &fd) != 0) {
        printf("netverify: ERROR pthread_create\n");
        exit(1);
    }
    double start = now(), last = start;
    for (uint64_t seq = 0;; seq++) {
        size_t n = make_record(rec, 1, seq);
        size_t off = 0;
        while (off < n) {
            ssize_t put = write(fd, rec + off, n - off);
            if (put <= 0) {
                printf("netverify: ERROR tx: %s\n", put < 0 ? strerror(errno) : "closed");
                shutdown(fd, SHUT_RDWR);
                pthread_join(rx, NULL);
                return;
            }
            off += (size_t)put;
        }
        tx_count++;
        double t = now();
        if (t - last >= 1.0) {
            printf("netverify: tx %llu rx %llu\n", (unsigned long long)tx_count,
                   (unsigned long long)rx_count);
            last = t;
        }
        if (rate > 0) {
            double ahead = (double)(seq + 1) / (double)rate - (t - start);
            if (ahead > 0) {
                struct timespec ts = { (time_t)ahead, (long)((ahead - (time_t)ahead) * 1e9) };
                nanosleep(&ts, NULL);
            }
        }
    }
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: netverify HOST PORT SEED [RATE]\n");
        return 2;
    }
    int port = atoi(argv[2]);
    seed = strtoull(argv[3], NULL, 0);
    long rate = argc > 4 ? strtol(argv[4], NULL, 0) : 200;
    if (port <= 0 || port > 65535 || rate < 0) {
        fprintf(stderr, "netverify: PORT must be 1..65535 and RATE >= 0\n");
        return 2;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320U ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);  /* a reset connection is an error line, not the end */
    for (unsigned long conn = 1;; conn++) {
        int fd = connect_to(argv[1], port);
        if (fd == -2) {
            fprintf(stderr, "netverify: %s is not an IPv4 address\n", argv[1]);
            return 2;
        }
        if (fd < 0) {
            sleep(1);  /* the host receiver is not listening (yet) */
            conn--;
            continue;
        }
        printf("netverify: connected %lu\n", conn);
        stream(fd, rate);
        close(fd);
    }
}
