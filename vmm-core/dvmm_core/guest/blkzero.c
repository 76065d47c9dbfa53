/* blkzero OFFSET LENGTH DEVICE: zero a byte range of a block device with the
 * BLKZEROOUT ioctl, which Linux turns into VIRTIO_BLK_T_WRITE_ZEROES when the
 * device offers it.  Busybox has no such applet (util-linux's blkdiscard -z
 * does this).  Built statically into the dvmm test guest. */
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: blkzero OFFSET LENGTH DEVICE\n");
        return 2;
    }
    uint64_t range[2] = { strtoull(argv[1], NULL, 0), strtoull(argv[2], NULL, 0) };
    int fd = open(argv[3], O_WRONLY);
    if (fd < 0) {
        perror(argv[3]);
        return 1;
    }
    if (ioctl(fd, BLKZEROOUT, range) != 0) {
        perror("BLKZEROOUT");
        return 1;
    }
    return close(fd) == 0 ? 0 : 1;
}
