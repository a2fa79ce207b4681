import { execFileSync } from 'node:child_process'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

/**
 * A static test app for clone tests: it answers each TCP connection on 8080
 * with one line naming what must differ between clones: its hostname, eth0's
 * MAC and IPv4 address, 16 fresh bytes of /dev/urandom, and $CLONE_ENV.
 */
const SOURCE = String.raw`
#include <arpa/inet.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static void read_line(const char *path, char *buf, size_t n) {
    int fd = open(path, O_RDONLY);
    ssize_t r = fd >= 0 ? read(fd, buf, n - 1) : -1;
    if (fd >= 0) close(fd);
    buf[r > 0 ? r : 0] = 0;
    buf[strcspn(buf, "\n")] = 0;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(8080) };
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 8) < 0) { perror("identity-app: listen"); return 1; }
    printf("identity-app: ready\n");
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        char host[65] = { 0 }, mac[32], ip[INET_ADDRSTRLEN] = "-", rnd[33];
        unsigned char bytes[16] = { 0 };
        gethostname(host, sizeof host - 1);
        read_line("/sys/class/net/eth0/address", mac, sizeof mac);
        struct ifreq ifr = { 0 };
        strcpy(ifr.ifr_name, "eth0");
        if (ioctl(c, SIOCGIFADDR, &ifr) == 0)
            inet_ntop(AF_INET, &((struct sockaddr_in *)&ifr.ifr_addr)->sin_addr, ip, sizeof ip);
        int r = open("/dev/urandom", O_RDONLY);
        if (r >= 0) { (void)read(r, bytes, sizeof bytes); close(r); }
        for (int i = 0; i < 16; i++) sprintf(rnd + 2 * i, "%02x", bytes[i]);
        char out[512];
        int n = snprintf(out, sizeof out, "host=%s mac=%s ip=%s rand=%s env=%s\n", host, mac, ip, rnd,
                         getenv("CLONE_ENV") ? getenv("CLONE_ENV") : "-");
        (void)write(c, out, n);
        close(c);
    }
}
`

/** Compiles the app into a root file system directory and returns it. */
export async function makeIdentityRootfs (scratch: string): Promise<string> {
  const root = join(scratch, 'identity-root')
  await mkdir(join(root, 'bin'), { recursive: true })
  await writeFile(join(scratch, 'identity-app.c'), SOURCE)
  execFileSync('gcc', ['-static', '-O2', '-Wall', '-o', join(root, 'bin/identity-app'), join(scratch, 'identity-app.c')])
  return root
}
