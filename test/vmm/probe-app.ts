import { execFileSync } from 'node:child_process'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

/**
 * A static test app for driver tests. argv[1] picks what it does:
 * `serve` (default) answers "probe" on TCP 8080 until SIGTERM, then exits 0;
 * `ignore-term` does the same but ignores SIGTERM; `check` reports reads and
 * writes of the shares and the root, then exits 0; `flood N` prints N
 * numbered lines of 100 bytes, then serves; `exit N` exits with N;
 * `escape` tries to leave its 9p shares with `..` and symlinks (the jail
 * test); `eat N` touches N MiB of memory, then serves.
 * It always prints its arguments and the FOO and BAR variables first.
 */
const SOURCE = String.raw`
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static volatile sig_atomic_t term;
static void on_term(int s) { (void)s; term = 1; }

static void try_write(const char *label, const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { printf("probe: %s write errno=%d\n", label, errno); return; }
    int ok = write(fd, "written by the guest\n", 21) == 21;
    close(fd);
    printf("probe: %s write ok=%d\n", label, ok);
}

static void try_read(const char *label, const char *path) {
    char buf[256] = { 0 };
    int fd = open(path, O_RDONLY);
    if (fd < 0) { printf("probe: %s read errno=%d\n", label, errno); return; }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n > 0 && buf[n - 1] == '\n') buf[n - 1] = 0;
    printf("probe: %s read=%s\n", label, buf);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argc > 1 ? argv[1] : "serve";
    printf("probe: argc=%d", argc);
    for (int i = 1; i < argc; i++) printf(" [%s]", argv[i]);
    printf("\nprobe: FOO=[%s] BAR=[%s]\n", getenv("FOO") ? getenv("FOO") : "-", getenv("BAR") ? getenv("BAR") : "-");
    if (strcmp(mode, "check") == 0) {
        try_read("ro-share", "/data/ro/hello.txt");
        try_write("ro-share", "/data/ro/new.txt");
        try_write("rw-share", "/data/rw/from-guest.txt");
        try_write("root", "/etc/probe-written");
        try_read("root", "/etc/probe-written");
        return 0;
    }
    if (strcmp(mode, "escape") == 0) {
        try_read("dotdot", "/data/rw/../../jail-secret.txt");
        try_read("dotdot-deep", "/data/rw/../../../../../../jail-secret.txt");
        try_read("host-rel-link", "/data/rw/rel-link");
        try_read("host-abs-link", "/data/rw/abs-link");
        try_write("host-victim-link", "/data/rw/victim-link");
        printf("probe: escape symlink-up=%d\n", symlink("../../../../..", "/data/rw/up") == 0 ? 0 : errno);
        try_read("guest-up-link", "/data/rw/up/jail-secret.txt");
        printf("probe: escape symlink-root=%d\n", symlink("/", "/data/rw/to-root") == 0 ? 0 : errno);
        try_write("guest-root-link", "/data/rw/to-root/data/rw/through-root.txt");
        try_write("rw-direct", "/data/rw/direct.txt");
        printf("probe: escape mkdir=%d\n", mkdir("/data/rw/made-dir", 0750) == 0 ? 0 : errno);
        try_read("ro-share", "/data/ro/hello.txt");
        printf("probe: escape done\n");
        return 0;
    }
    if (strcmp(mode, "eat") == 0) {
        long mib = argc > 2 ? atol(argv[2]) : 64;
        for (long i = 0; i < mib; i++) {
            char *p = malloc(1 << 20);
            if (p == NULL) { printf("probe: eat malloc failed at %ld MiB\n", i); break; }
            for (long j = 0; j < (1 << 20); j += 4096) p[j] = 1;
            if (i % 16 == 15) printf("probe: eat %ld MiB\n", i + 1);
        }
        printf("probe: eat done\n");
    }
    if (strcmp(mode, "exit") == 0) return argc > 2 ? atoi(argv[2]) : 0;
    if (strcmp(mode, "flood") == 0) {
        int n = argc > 2 ? atoi(argv[2]) : 1000;
        for (int i = 0; i < n; i++)
            printf("probe: flood %06d ..........................................................................\n", i);
        printf("probe: flood done\n");
    }
    struct sigaction sa = { .sa_handler = strcmp(mode, "ignore-term") == 0 ? SIG_IGN : on_term };
    sigaction(SIGTERM, &sa, NULL);
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(8080) };
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 8) < 0) { perror("probe: listen"); return 1; }
    printf("probe: ready\n");
    while (!term) {
        int c = accept(fd, NULL, NULL);
        if (c >= 0) { (void)write(c, "probe\n", 6); close(c); }
    }
    printf("probe: stopping on SIGTERM\n");
    return 0;
}
`

/** Compiles the probe into a root file system directory (with the share mount points) and returns it. */
export async function makeProbeRootfs (scratch: string): Promise<string> {
  const root = join(scratch, 'probe-root')
  for (const dir of ['bin', 'data/ro', 'data/rw', 'etc']) await mkdir(join(root, dir), { recursive: true })
  await writeFile(join(scratch, 'probe.c'), SOURCE)
  execFileSync('gcc', ['-static', '-O2', '-Wall', '-o', join(root, 'bin/probe'), join(scratch, 'probe.c')])
  return root
}
