/*
 * uigniter-init: PID 1 of a uigniter guest.
 *
 * The guest image has no shell and exactly one application.  This program
 * prepares what a Linux program expects (pseudo filesystems, loopback, the
 * configured IPv4 address), starts the application, reaps everything that
 * gets orphaned onto PID 1, and reboots as soon as the application is gone:
 * QEMU runs with -no-reboot and the kernel with reboot=t, so that ends the VM.
 *
 * The host reads "UIGNITER:" marker lines on the serial console, and talks to
 * us over the virtio-console port "uigniter.ctl" (see "control channel").
 *
 * Build: gcc -static -Os -Wall -Wextra -Werror -o uigniter-init uigniter-init.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <grp.h>
#include <fcntl.h>
#include <linux/if_packet.h>
#include <linux/random.h>
#include <net/ethernet.h>
#include <net/if_arp.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

/*
 * 4: uigniter.volume=.  The host records it in each image's manifest
 * (src/guest/image-builder.ts), so that it can refuse what an older init
 * would silently ignore.
 */
#define INIT_VERSION 5
/* The app's end of the after-clone ack pipe (see cmd_after_clone); its number is in UIGNITER_ACK_FD. */
#define ACK_FD 3
#define APP_CONFIG "/uigniter/config"
#define MODULE_LIST "/uigniter/modules"
#define CTL_PORT_NAME "uigniter.ctl"
#define DEFAULT_PATH "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
#define CTL_LINE_MAX 4096
#define CTL_OUT_CAP 8192
/* Larger than any reply we build; input is not read without this much room. */
#define CTL_REPLY_MAX 512
#define DEFAULT_SHUTDOWN_MS 5000UL
/* A day: anything longer is more likely a unit mistake than intended. */
#define MAX_SHUTDOWN_MS 86400000UL

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* ================================================================ output */

/*
 * Each message goes to the console in a single write(), so that a line from
 * init is never split by output of the app and the host can match it whole.
 */
static void write_line(int fd, const char *prefix, const char *fmt, va_list ap)
{
	char buf[1024];
	int n = snprintf(buf, sizeof(buf), "%s", prefix);
	int m = vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);

	n += m > 0 ? m : 0;
	if (n > (int)sizeof(buf) - 1)
		n = sizeof(buf) - 1;
	buf[n++] = '\n';
	while (write(fd, buf, n) < 0 && errno == EINTR)
		;
}

/* Lines the host parses; always on fd 1. */
__attribute__((format(printf, 1, 2)))
static void marker(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	write_line(1, "UIGNITER:", fmt, ap);
	va_end(ap);
}

/* Diagnostics for humans reading the console. */
__attribute__((format(printf, 1, 2)))
static void warnmsg(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	write_line(2, "uigniter-init: ", fmt, ap);
	va_end(ap);
}

__attribute__((noreturn))
static void reboot_now(void)
{
	/*
	 * write() on the serial tty returns once the bytes are buffered, not
	 * sent; without draining, the last lines (typically the EXIT marker)
	 * would be lost with the VM.
	 */
	tcdrain(1);
	tcdrain(2);
	reboot(RB_AUTOBOOT);
	marker("INIT-FAILED error=\"reboot: %s\"", strerror(errno));
	/* Returning from PID 1 panics the kernel; park instead. */
	for (;;)
		pause();
}

static void release_volumes(void);

__attribute__((noreturn, format(printf, 1, 2)))
static void fatal(const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	marker("INIT-FAILED error=\"%s\"", msg);
	sync();
	release_volumes();
	reboot_now();
}

/* =============================================================== helpers */

/* Whole file as a NUL-terminated heap string; stat sizes of /proc are 0. */
static char *read_file(const char *path, size_t cap, size_t *len_out)
{
	size_t size = 0, len = 0;
	char *buf = NULL;
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return NULL;
	do {
		if (len == size) {
			char *nb = NULL;
			if (size >= cap)
				errno = EFBIG;
			else
				nb = realloc(buf, (size = size ? 2 * size : 4096) + 1);
			if (!nb)
				goto fail;
			buf = nb;
		}
		n = read(fd, buf + len, size - len);
		if (n > 0)
			len += n;
	} while (n > 0 || (n < 0 && errno == EINTR));
	if (n < 0)
		goto fail;
	close(fd);
	buf[len] = '\0';
	if (len_out)
		*len_out = len;
	return buf;
fail:
	n = errno;
	free(buf);
	close(fd);
	errno = n;
	return NULL;
}

static int write_all(int fd, const void *data, size_t n)
{
	const char *p = data;
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno != EINTR)
			return -1;
		if (w > 0) {
			p += w;
			n -= w;
		}
	}
	return 0;
}

static long long boottime_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static long long monotonic_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ======================================================= filesystems */

static bool is_mountpoint(const char *path)
{
	struct stat root, st;
	return stat("/", &root) == 0 && stat(path, &st) == 0 && st.st_dev != root.st_dev;
}

/* Returns 0 or an errno value. */
static int mount_at(const char *src, const char *dir, const char *type,
		    unsigned long flags, const char *data)
{
	/* On a read-only root the directory is expected to ship in the image. */
	mkdir(dir, 0755);
	return mount(src, dir, type, flags, data) == 0 ? 0 : errno;
}

/*
 * With an initramfs the kernel neither mounts devtmpfs nor, if the archive
 * lacks /dev/console, opens fds 0-2; so /dev comes before anything we print.
 * With a disk root, CONFIG_DEVTMPFS_MOUNT has usually mounted it already.
 */
static int mount_dev(void)
{
	if (is_mountpoint("/dev"))
		return 0;
	int err = mount_at("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	return err == EBUSY ? 0 : err;
}

static void setup_console_fds(void)
{
	for (int fd = 0; fd <= 2; fd++) {
		if (fcntl(fd, F_GETFD) >= 0)
			continue;
		/* Lower fds are open, so this lands on fd itself. */
		if (open("/dev/console", O_RDWR | O_NOCTTY) < 0)
			open("/dev/null", O_RDWR);
	}
}

static void mount_others(void)
{
	static const struct {
		const char *src, *dir, *type;
		unsigned long flags;
		const char *data;
	} mounts[] = {
		{ "sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL },
		{ "devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666" },
		{ "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" },
		{ "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" },
		{ "tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755" },
	};
	for (size_t i = 0; i < ARRAY_LEN(mounts); i++) {
		int err = mount_at(mounts[i].src, mounts[i].dir, mounts[i].type,
				   mounts[i].flags, mounts[i].data);
		if (err)
			warnmsg("mount %s: %s", mounts[i].dir, strerror(err));
	}

	/*
	 * devtmpfs lacks these conventional links, and container-style apps
	 * commonly log to /dev/stdout or use /dev/fd.
	 */
	static const char *const links[][2] = {
		{ "/proc/self/fd", "/dev/fd" },
		{ "/proc/self/fd/0", "/dev/stdin" },
		{ "/proc/self/fd/1", "/dev/stdout" },
		{ "/proc/self/fd/2", "/dev/stderr" },
	};
	for (size_t i = 0; i < ARRAY_LEN(links); i++)
		symlink(links[i][0], links[i][1]);
}

/* Only a fallback distro kernel has modules; ours has everything built in. */
static void load_modules(void)
{
	char *list = read_file(MODULE_LIST, 1 << 20, NULL);
	if (!list)
		return;
	for (char *save = NULL, *path = strtok_r(list, "\r\n", &save); path;
	     path = strtok_r(NULL, "\r\n", &save)) {
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST))
			warnmsg("module %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
	}
	free(list);
}

/* ==================================================== kernel command line */

struct params {
	const char *ip, *gw, *dns, *hostname;
	const char *overlay; /* block device holding the writable overlay */
	const char *wait;    /* "identity": a template's boot; the app starts after the identity verb */
	bool probe;
	bool noargs;         /* the host replaces the app's arguments with none */
	/* Repeatable parameters, in command-line order; values are decoded. */
	char **args, **envs, **mounts, **volumes;
	size_t nargs, nenvs, nmounts, nvolumes;
};

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * The host percent-encodes values that may hold spaces, quotes or ':'
 * (the kernel splits its command line on spaces and interprets quotes).
 * Decodes in place; a '%' not followed by two hex digits stays as it is.
 */
static char *pct_decode(char *s)
{
	char *r = s, *w = s;

	while (*r) {
		int hi, lo;
		if (r[0] == '%' && (hi = hexval(r[1])) >= 0 && (lo = hexval(r[2])) >= 0) {
			*w++ = (char)(hi << 4 | lo);
			r += 3;
		} else {
			*w++ = *r++;
		}
	}
	*w = '\0';
	return s;
}

/* Values point into the returned buffer, which must outlive them. */
static char *parse_cmdline(struct params *p)
{
	const struct {
		const char *prefix;
		const char **value;
	} keys[] = {
		{ "uigniter.ip=", &p->ip },
		{ "uigniter.gw=", &p->gw },
		{ "uigniter.dns=", &p->dns },
		{ "uigniter.hostname=", &p->hostname },
		{ "uigniter.overlay=", &p->overlay },
		{ "uigniter.wait=", &p->wait },
	};
	char *buf = read_file("/proc/cmdline", 1 << 16, NULL);

	memset(p, 0, sizeof(*p));
	if (!buf) {
		warnmsg("/proc/cmdline: %s", strerror(errno));
		return NULL;
	}
	/* No list can hold more entries than there are words. */
	size_t words = 1;
	for (const char *c = buf; *c; c++)
		words += *c == ' ';
	p->args = calloc(words, sizeof(char *));
	p->envs = calloc(words, sizeof(char *));
	p->mounts = calloc(words, sizeof(char *));
	p->volumes = calloc(words, sizeof(char *));
	if (!p->args || !p->envs || !p->mounts || !p->volumes)
		fatal("out of memory parsing the kernel command line");

	for (char *save = NULL, *tok = strtok_r(buf, " \t\n", &save); tok;
	     tok = strtok_r(NULL, " \t\n", &save)) {
		if (strcmp(tok, "uigniter.probe=1") == 0)
			p->probe = true;
		else if (strcmp(tok, "uigniter.noargs") == 0)
			p->noargs = true;
		else if (strncmp(tok, "uigniter.arg=", 13) == 0)
			p->args[p->nargs++] = pct_decode(tok + 13);
		else if (strncmp(tok, "uigniter.env=", 13) == 0) {
			char *kv = pct_decode(tok + 13);
			char *eq = strchr(kv, '=');
			if (eq && eq != kv)
				p->envs[p->nenvs++] = kv;
			else
				warnmsg("uigniter.env: ignoring '%s', want NAME=VALUE", kv);
		} else if (strncmp(tok, "uigniter.mount=", 15) == 0)
			/* Decoded when split: an encoded ':' must not split it. */
			p->mounts[p->nmounts++] = tok + 15;
		else if (strncmp(tok, "uigniter.volume=", 16) == 0)
			p->volumes[p->nvolumes++] = tok + 16;
		/* Later occurrences win, as for kernel parameters. */
		for (size_t i = 0; i < ARRAY_LEN(keys); i++)
			if (strncmp(tok, keys[i].prefix, strlen(keys[i].prefix)) == 0)
				*keys[i].value = tok + strlen(keys[i].prefix);
	}
	return buf;
}

/* ============================================================ overlay */

static void mkdir_p(const char *path)
{
	char buf[PATH_MAX];

	if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf))
		return;
	for (char *c = buf + 1; *c; c++) {
		if (*c != '/')
			continue;
		*c = '\0';
		mkdir(buf, 0755);
		*c = '/';
	}
	mkdir(buf, 0755);
}

static void move_mount_to(const char *from, const char *to)
{
	if (mount(from, to, NULL, MS_MOVE, NULL) < 0)
		fatal("overlay: move %s to %s: %s", from, to, strerror(errno));
}

/*
 * Makes the root writable: an overlayfs whose lower layer is the image's
 * read-only root and whose upper layer is an ext4 disk of this VM, then
 * switches into it (as switch_root does: move it onto "/" and chroot, which
 * works from an initramfs too, where pivot_root does not).  /run serves as
 * the staging area since every image ships it empty; the final /run is a
 * tmpfs mounted later inside the new root.
 */
static void setup_overlay(const char *dev)
{
	/* devtmpfs creates the node when the disk probes; it may trail init briefly. */
	for (int tries = 0; access(dev, F_OK) < 0 && tries < 100; tries++)
		nanosleep(&(struct timespec){ .tv_nsec = 10000000 }, NULL);
	if (mount(dev, "/run", "ext4", MS_NOATIME, NULL) < 0)
		fatal("overlay: mount %s: %s", dev, strerror(errno));
	mkdir("/run/upper", 0755);
	mkdir("/run/work", 0755);
	mkdir("/run/root", 0755);
	if (mount("overlay", "/run/root", "overlay", 0,
		  "lowerdir=/,upperdir=/run/upper,workdir=/run/work") < 0)
		fatal("overlay: mount overlayfs: %s", strerror(errno));
	move_mount_to("/dev", "/run/root/dev");
	move_mount_to("/proc", "/run/root/proc");
	if (chdir("/run/root") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 ||
	    chroot(".") < 0 || chdir("/") < 0)
		fatal("overlay: switch to the new root: %s", strerror(errno));
}

/* ============================================================ 9p shares */

/*
 * Each share is "TAG:PATH[:ro]", PATH percent-encoded.  A share that cannot
 * be mounted stops the VM: an app running without its data is worse than
 * one that does not start.
 */
static void mount_shares(const struct params *p)
{
	for (size_t i = 0; i < p->nmounts; i++) {
		char *tag = p->mounts[i];
		char *path = strchr(tag, ':');
		bool ro = false;

		if (!path || path == tag || path[1] != '/')
			fatal("uigniter.mount: invalid '%s', want TAG:/PATH[:ro]", tag);
		*path++ = '\0';
		char *opt = strchr(path, ':');
		if (opt) {
			*opt++ = '\0';
			if (strcmp(opt, "ro") != 0)
				fatal("uigniter.mount: unknown option '%s' for %s", opt, tag);
			ro = true;
		}
		pct_decode(path);
		mkdir_p(path);
		if (mount(tag, path, "9p", MS_NOSUID | MS_NODEV | (ro ? MS_RDONLY : 0),
			  "trans=virtio,version=9p2000.L,msize=262144") < 0)
			fatal("mount shared directory %s on %s: %s", tag, path, strerror(errno));
	}
}

/* ============================================================= volumes */

/*
 * A persistent volume is a virtio disk holding ext4, "INDEX:PATH[:ro]" on
 * the command line, PATH percent-encoded.  The host names disk INDEX by its
 * serial, uigniter-vol<INDEX>: disks probe in command-line order today, but
 * nothing promises it, and a wrong match would put one volume's data where
 * the app expects another's (or a read-write disk where it expects a
 * read-only one).
 */
#define MAX_VOLUMES 64

/* Mounted volumes, unmounted at the end (see unmount_volumes). */
static struct {
	char *paths[MAX_VOLUMES];
	size_t n;
} volumes;

/* The /dev path of the disk whose serial is `serial`; false if none (yet). */
static bool find_disk_by_serial(const char *serial, char *dev, size_t devsz)
{
	DIR *d = opendir("/sys/block");
	struct dirent *e;
	bool found = false;

	if (!d)
		return false;
	while (!found && (e = readdir(d))) {
		char path[PATH_MAX];
		if (strncmp(e->d_name, "vd", 2) != 0)
			continue;
		snprintf(path, sizeof(path), "/sys/block/%s/serial", e->d_name);
		char *s = read_file(path, 256, NULL);
		if (!s)
			continue;
		/* The kernel may end it with a newline. */
		s[strcspn(s, "\r\n")] = '\0';
		if (strcmp(s, serial) == 0) {
			snprintf(dev, devsz, "/dev/%s", e->d_name);
			found = true;
		}
		free(s);
	}
	closedir(d);
	return found;
}

/*
 * A volume is fresh while it holds nothing but lost+found (and the staging
 * directory of a copy-up that did not finish, which is made again).
 */
#define COPY_UP_STAGING ".uigniter-copy-up"

static bool holds_nothing(int dirfd)
{
	int fd = dup(dirfd);
	DIR *d = fd < 0 ? NULL : fdopendir(fd);
	if (!d) {
		if (fd >= 0)
			close(fd);
		return false;
	}
	/* A dup shares the offset: another reading of the directory may have left it at the end. */
	rewinddir(d);
	bool fresh = true;
	struct dirent *e;
	while (fresh && (e = readdir(d)) != NULL)
		fresh = !strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") ||
			!strcmp(e->d_name, "lost+found") || !strcmp(e->d_name, COPY_UP_STAGING);
	closedir(d);
	return fresh;
}

/*
 * A new volume's root is root's, 0755: an app that runs as its own user
 * (redis, postgres) could not write it.  As Docker does for a new named
 * volume, a fresh volume takes the owner and mode of the directory it is
 * mounted on, as the image made it (a Dockerfile's "mkdir /data && chown
 * redis /data").  A volume in use keeps whatever its app made of it.
 */
static void adopt_mount_point_owner(int volfd, const char *path, const struct stat *image_dir)
{
	if (fchown(volfd, image_dir->st_uid, image_dir->st_gid) < 0 ||
	    fchmod(volfd, image_dir->st_mode & 07777) < 0)
		warnmsg("volume %s: cannot give it the owner of the image's directory: %s", path, strerror(errno));
}

/* Deeper trees than this are refused rather than risk init's stack. */
#define COPY_UP_MAX_DEPTH 128

/* Why a copy-up failed: the first error, and where. */
static struct {
	int err;
	char what[PATH_MAX];
} copy_up_failure;

static bool copy_up_fail(const char *what, const char *name)
{
	if (!copy_up_failure.err) {
		copy_up_failure.err = errno ? errno : EIO;
		snprintf(copy_up_failure.what, sizeof(copy_up_failure.what), "%s %s", what, name);
	}
	return false;
}

/* Owner, mode, times and file capabilities of `st` on the new entry `fd` (the mode after the owner: chown clears setuid). */
static bool copy_up_attrs(int srcfd, int fd, const struct stat *st, const char *name)
{
	char cap[64];
	ssize_t n = fgetxattr(srcfd, "security.capability", cap, sizeof(cap));
	if (fchown(fd, st->st_uid, st->st_gid) < 0)
		return copy_up_fail("chown", name);
	if (fchmod(fd, st->st_mode & 07777) < 0)
		return copy_up_fail("chmod", name);
	/* The guest kernel may keep no security xattrs on ext4: the copy then goes without them, and says so. */
	if (n > 0 && fsetxattr(fd, "security.capability", cap, (size_t)n, 0) < 0)
		warnmsg("volume copy-up: %s keeps no file capabilities: %s", name, strerror(errno));
	struct timespec times[2] = { st->st_atim, st->st_mtim };
	if (futimens(fd, times) < 0)
		return copy_up_fail("set times of", name);
	return true;
}

static bool copy_up_file(int srcfd, int dstdir, const char *name, const struct stat *st)
{
	int out = openat(dstdir, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (out < 0)
		return copy_up_fail("create", name);
	static char buf[64 * 1024];
	bool ok = true;
	for (;;) {
		ssize_t n = read(srcfd, buf, sizeof(buf));
		if (n == 0)
			break;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			ok = copy_up_fail("read", name);
			break;
		}
		for (ssize_t off = 0; ok && off < n;) {
			ssize_t w = write(out, buf + off, (size_t)(n - off));
			if (w < 0 && errno != EINTR)
				ok = copy_up_fail("write", name);
			else if (w > 0)
				off += w;
		}
		if (!ok)
			break;
	}
	ok = ok && copy_up_attrs(srcfd, out, st, name);
	close(out);
	return ok;
}

/*
 * Copies the directory `src` into `dst` (an empty directory on the volume):
 * directories, regular files (a hard link becomes a copy, as on the image's
 * disk) and symlinks, with owners, modes, times and file capabilities.
 * Nothing else is in an image (its builders skip devices, FIFOs and
 * sockets), and nothing else is copied.  Every name is
 * opened relative to its parent with O_NOFOLLOW, so the image's symlinks
 * are copied as links and never followed.
 */
static bool copy_up_tree(int src, int dst, int depth)
{
	if (depth > COPY_UP_MAX_DEPTH) {
		errno = ELOOP;
		return copy_up_fail("copy (deeper than 128 directories)", "");
	}
	int fd = dup(src);
	DIR *d = fd < 0 ? NULL : fdopendir(fd);
	if (!d) {
		if (fd >= 0)
			close(fd);
		return copy_up_fail("read directory", "");
	}
	rewinddir(d);
	bool ok = true;
	struct dirent *e;
	while (ok && (errno = 0, e = readdir(d)) != NULL) {
		const char *name = e->d_name;
		struct stat st;
		if (!strcmp(name, ".") || !strcmp(name, "..") ||
		    (depth == 0 && (!strcmp(name, "lost+found") || !strcmp(name, COPY_UP_STAGING))))
			continue;
		if (fstatat(src, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
			ok = copy_up_fail("stat", name);
			break;
		}
		if (S_ISDIR(st.st_mode)) {
			int from = openat(src, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
			int to = -1;
			if (from < 0)
				ok = copy_up_fail("open", name);
			else if (mkdirat(dst, name, 0700) < 0)
				ok = copy_up_fail("mkdir", name);
			else if ((to = openat(dst, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) < 0)
				ok = copy_up_fail("open", name);
			else
				ok = copy_up_tree(from, to, depth + 1) && copy_up_attrs(from, to, &st, name);
			if (from >= 0)
				close(from);
			if (to >= 0)
				close(to);
		} else if (S_ISREG(st.st_mode)) {
			int from = openat(src, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
			if (from < 0) {
				ok = copy_up_fail("open", name);
			} else {
				ok = copy_up_file(from, dst, name, &st);
				close(from);
			}
		} else if (S_ISLNK(st.st_mode)) {
			char target[PATH_MAX];
			ssize_t n = readlinkat(src, name, target, sizeof(target) - 1);
			if (n < 0)
				ok = copy_up_fail("readlink", name);
			else {
				target[n] = '\0';
				struct timespec times[2] = { st.st_atim, st.st_mtim };
				if (symlinkat(target, dst, name) < 0)
					ok = copy_up_fail("symlink", name);
				else if (fchownat(dst, name, st.st_uid, st.st_gid, AT_SYMLINK_NOFOLLOW) < 0)
					ok = copy_up_fail("chown", name);
				else if (utimensat(dst, name, times, AT_SYMLINK_NOFOLLOW) < 0)
					ok = copy_up_fail("set times of", name);
			}
		}
	}
	if (ok && errno)
		ok = copy_up_fail("read directory", "");
	closedir(d);
	return ok;
}

/* Removes the tree `name` under `dirfd` (a staging directory left by a copy-up that did not finish). */
static void remove_tree(int dirfd, const char *name, int depth)
{
	int fd = depth > COPY_UP_MAX_DEPTH ? -1 : openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	DIR *d = fd < 0 ? NULL : fdopendir(fd);
	if (d) {
		struct dirent *e;
		while ((e = readdir(d)) != NULL) {
			if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
				continue;
			if (unlinkat(fd, e->d_name, 0) < 0 && (errno == EISDIR || errno == EPERM))
				remove_tree(fd, e->d_name, depth + 1);
		}
		closedir(d);
	} else if (fd >= 0) {
		close(fd);
	}
	unlinkat(dirfd, name, AT_REMOVEDIR);
}

/*
 * As Docker does for a new volume, a fresh volume mounted on a directory the
 * image fills gets a copy of what the image has there (an nginx image's
 * html, a default config), once: after that the volume is the app's.  The
 * copy goes into a staging directory on the volume first, and its entries
 * are moved to the root only once all of it is there, so a VM stopped in the
 * middle leaves a volume that is still fresh (the next boot copies again),
 * not a half copy.  `imagefd` is the image's directory, opened before the
 * volume was mounted over it.
 */
static void copy_up(int imagefd, int volfd, unsigned long index, const char *path)
{
	/* What a copy-up that was cut left: it starts again. */
	remove_tree(volfd, COPY_UP_STAGING, 0);
	if (holds_nothing(imagefd))
		return;
	long long started = boottime_ms();
	if (mkdirat(volfd, COPY_UP_STAGING, 0700) < 0)
		fatal("volume %lu (%s): cannot make %s for the image's files: %s", index, path, COPY_UP_STAGING, strerror(errno));
	int staging = openat(volfd, COPY_UP_STAGING, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (staging < 0 || !copy_up_tree(imagefd, staging, 0)) {
		if (staging < 0)
			copy_up_fail("open", COPY_UP_STAGING);
		fatal("volume %lu (%s): copying the image's files into the new volume failed (%s: %s)%s", index, path,
		      copy_up_failure.what, strerror(copy_up_failure.err),
		      copy_up_failure.err == ENOSPC ? "; make the volume larger" : "");
	}
	/* Every entry moves up; each rename is atomic, and all of them take a moment. */
	int fd = dup(staging);
	DIR *d = fd < 0 ? NULL : fdopendir(fd);
	if (!d)
		fatal("volume %lu (%s): cannot read %s: %s", index, path, COPY_UP_STAGING, strerror(errno));
	rewinddir(d);
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		if (renameat(staging, e->d_name, volfd, e->d_name) < 0)
			fatal("volume %lu (%s): cannot move %s into place: %s", index, path, e->d_name, strerror(errno));
	}
	closedir(d);
	close(staging);
	if (unlinkat(volfd, COPY_UP_STAGING, AT_REMOVEDIR) < 0)
		warnmsg("volume %s: cannot remove %s: %s", path, COPY_UP_STAGING, strerror(errno));
	if (syncfs(volfd) < 0)
		warnmsg("volume %s: syncfs after the copy: %s", path, strerror(errno));
	marker("VOLUME copied-up index=%lu ms=%lld", index, boottime_ms() - started);
}

/*
 * After the root is final (the overlay) and before the app: the app must
 * never run without its data, so a volume that cannot be mounted stops the
 * VM, as a share does.  Mounting ext4 replays its journal, which is the
 * recovery after a power cut (a kill -9 of QEMU).
 */
static void mount_volumes(const struct params *p)
{
	if (p->nvolumes > MAX_VOLUMES)
		fatal("uigniter.volume: %zu volumes, at most %d", p->nvolumes, MAX_VOLUMES);
	for (size_t i = 0; i < p->nvolumes; i++) {
		char *spec = p->volumes[i];
		char *path = strchr(spec, ':');
		char *end;
		bool ro = false;

		errno = 0;
		unsigned long index = strtoul(spec, &end, 10);
		if (!path || end != path || path == spec || errno || path[1] != '/')
			fatal("uigniter.volume: invalid '%s', want INDEX:/PATH[:ro]", spec);
		*path++ = '\0';
		char *opt = strchr(path, ':');
		if (opt) {
			*opt++ = '\0';
			if (strcmp(opt, "ro") != 0)
				fatal("uigniter.volume: unknown option '%s' for volume %lu", opt, index);
			ro = true;
		}
		pct_decode(path);

		char serial[32], dev[sizeof(((struct dirent *)0)->d_name) + 8];
		snprintf(serial, sizeof(serial), "uigniter-vol%lu", index);
		/* The disk may probe, and devtmpfs make its node, briefly after init starts. */
		bool found = false;
		for (int tries = 0; tries < 100; tries++) {
			if ((found = find_disk_by_serial(serial, dev, sizeof(dev)) && access(dev, F_OK) == 0))
				break;
			nanosleep(&(struct timespec){ .tv_nsec = 10000000 }, NULL);
		}
		if (!found)
			fatal("volume %lu for %s: no disk with serial %s", index, path, serial);

		mkdir_p(path);
		struct stat st;
		int st_err = stat(path, &st) < 0 ? errno : S_ISDIR(st.st_mode) ? 0 : ENOTDIR;
		if (st_err)
			fatal("volume %lu: mount point %s: %s%s", index, path, strerror(st_err),
			      p->overlay ? "" : " (without an overlay the root is read-only: the directory must exist in the image)");
		/* Opened before the mount: it still reads the image's directory once the volume covers it. */
		int imagefd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (imagefd < 0)
			fatal("volume %lu: mount point %s: %s", index, path, strerror(errno));
		if (mount(dev, path, "ext4", MS_NOATIME | MS_NOSUID | MS_NODEV | (ro ? MS_RDONLY : 0), NULL) < 0) {
			int err = errno;
			/* A journal to replay needs a writable disk. */
			fatal("mount volume %lu (%s) on %s: %s%s", index, dev, path, strerror(err),
			      ro && err == EROFS ? " (its journal needs a replay: attach it read-write once)" : "");
		}
		volumes.paths[volumes.n++] = path;
		int volfd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (volfd < 0)
			fatal("volume %lu: cannot open its root at %s: %s", index, path, strerror(errno));
		if (!ro && holds_nothing(volfd)) {
			copy_up(imagefd, volfd, index, path);
			adopt_mount_point_owner(volfd, path, &st);
		}
		close(volfd);
		close(imagefd);
	}
}

/*
 * At the end, after every other process is gone: a clean unmount marks the
 * filesystem clean, so that a graceful stop leaves nothing for the journal
 * to replay.  Innermost first, in case one volume is mounted inside another.
 */
static void unmount_volumes(void)
{
	while (volumes.n > 0) {
		const char *path = volumes.paths[--volumes.n];
		if (umount2(path, 0) == 0)
			continue;
		int err = errno;
		/* Detached, it is still written back once its last user goes. */
		if (umount2(path, MNT_DETACH) == 0)
			warnmsg("unmount volume %s: %s; detached it instead", path, strerror(err));
		else
			warnmsg("unmount volume %s: %s", path, strerror(errno));
	}
}

/*
 * SIGKILL to everything but us, then reap until no child is left: a killed
 * process holds its files (and so the volumes) until its exit completes.
 * Bounded, as a process stuck in the kernel (D state) never exits.
 */
static void kill_all_and_reap(void)
{
	/* Spares PID 1 only; daemonised leftovers must not outlive the app. */
	kill(-1, SIGKILL);
	long long deadline = boottime_ms() + 2000;
	for (;;) {
		pid_t pid = waitpid(-1, NULL, WNOHANG);
		if (pid < 0 && errno == ECHILD)
			return;
		if (pid > 0)
			continue;
		if (boottime_ms() > deadline) {
			warnmsg("processes still alive 2 s after SIGKILL");
			return;
		}
		nanosleep(&(struct timespec){ .tv_nsec = 5000000 }, NULL);
	}
}

/*
 * The way out once volumes are mounted, for a fatal error too (the app may
 * have run): nothing left that writes, everything written, then unmounted.
 */
static void release_volumes(void)
{
	if (volumes.n == 0)
		return;
	kill_all_and_reap();
	sync();
	unmount_volumes();
}

/* =============================================================== network */

static void set_inaddr(struct sockaddr *sa, in_addr_t addr)
{
	struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = addr };
	memcpy(sa, &sin, sizeof(sin));
}

static int if_up(int s, const char *ifname, in_addr_t addr, in_addr_t mask)
{
	struct ifreq ifr;
	const char *step;

	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
	set_inaddr(&ifr.ifr_addr, addr);
	step = "address";
	if (ioctl(s, SIOCSIFADDR, &ifr) < 0)
		goto fail;
	set_inaddr(&ifr.ifr_netmask, mask);
	step = "netmask";
	if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0)
		goto fail;
	step = "flags";
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		goto fail;
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
		goto fail;
	return 0;
fail:
	warnmsg("%s: set %s: %s", ifname, step, strerror(errno));
	return -1;
}

static int add_default_route(int s, const char *ifname, const char *gw)
{
	char dev[IFNAMSIZ];
	struct in_addr a;
	struct rtentry rt;

	if (inet_pton(AF_INET, gw, &a) != 1) {
		warnmsg("uigniter.gw: invalid address '%s'", gw);
		errno = EINVAL;
		return -1;
	}
	snprintf(dev, sizeof(dev), "%s", ifname);
	memset(&rt, 0, sizeof(rt));
	set_inaddr(&rt.rt_dst, INADDR_ANY);
	set_inaddr(&rt.rt_genmask, INADDR_ANY);
	set_inaddr(&rt.rt_gateway, a.s_addr);
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	rt.rt_dev = dev;
	if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST) {
		warnmsg("default route via %s: %s", gw, strerror(errno));
		return -1;
	}
	return 0;
}

static bool parse_cidr(const char *s, in_addr_t *addr, in_addr_t *mask)
{
	char host[INET_ADDRSTRLEN];
	const char *slash = strchr(s, '/');
	struct in_addr a;
	char *end;

	if (!slash || (size_t)(slash - s) >= sizeof(host))
		return false;
	memcpy(host, s, slash - s);
	host[slash - s] = '\0';
	if (inet_pton(AF_INET, host, &a) != 1 || slash[1] < '0' || slash[1] > '9')
		return false;
	unsigned long prefix = strtoul(slash + 1, &end, 10);
	if (*end || prefix > 32)
		return false;
	*addr = a.s_addr;
	*mask = prefix ? htonl(0xffffffffu << (32 - prefix)) : 0;
	return true;
}

/* /etc/resolv.conf in the image is a symlink to this file. */
static void write_resolv_conf(char *dns)
{
	char buf[2048];
	size_t len = 0;

	for (char *save = NULL, *a = strtok_r(dns, ",", &save); a;
	     a = strtok_r(NULL, ",", &save)) {
		unsigned char bin[sizeof(struct in6_addr)];
		if (inet_pton(AF_INET, a, bin) != 1 && inet_pton(AF_INET6, a, bin) != 1) {
			warnmsg("uigniter.dns: ignoring invalid address '%s'", a);
			continue;
		}
		int n = snprintf(buf + len, sizeof(buf) - len, "nameserver %s\n", a);
		if (n < 0 || (size_t)n >= sizeof(buf) - len)
			break;
		len += n;
	}
	int fd = open("/run/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || write_all(fd, buf, len) < 0)
		warnmsg("/run/resolv.conf: %s", strerror(errno));
	if (fd >= 0)
		close(fd);
}

/*
 * Kept open from boot, so that a clone resumes with them: under TCG every
 * code path a clone runs for the first time costs its translation (making
 * a socket, opening /dev/urandom), and closing a packet socket waits for an
 * RCU grace period (synchronize_net), tens of milliseconds.
 */
static struct {
	int sock;    /* AF_INET datagram socket: interface ioctls, the gateway's datagram */
	int packet;  /* AF_PACKET, send-only: ARP announcements; -1 without CONFIG_PACKET */
	int ifindex; /* eth0's; 0 when there is none */
} net = { .sock = -1, .packet = -1 };

/*
 * No IPv6 on eth0: the bridge network is IPv4 only (the host turns IPv6 off
 * on the bridge), and with it on, every boot sends duplicate-address,
 * router and multicast-listener messages that the bridge floods to every
 * VM, and every clone would keep its template's link-local address (one
 * derived from the template's MAC).  Loopback keeps ::1, so apps may still
 * listen on "::".
 */
static void disable_ipv6(const char *ifname)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/sys/net/ipv6/conf/%s/disable_ipv6", ifname);
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	/* A kernel without IPv6 has no such file, and nothing to turn off. */
	if (fd < 0)
		return;
	if (write_all(fd, "1", 1) < 0)
		warnmsg("%s: %s", path, strerror(errno));
	close(fd);
}

/* The gateway's MAC from the ARP cache; false when there is no complete entry. */
static bool arp_lookup(int s, in_addr_t ip, unsigned char mac[6])
{
	struct arpreq r;

	memset(&r, 0, sizeof(r));
	set_inaddr(&r.arp_pa, ip);
	snprintf(r.arp_dev, sizeof(r.arp_dev), "eth0");
	if (ioctl(s, SIOCGARP, &r) < 0 || !(r.arp_flags & ATF_COM))
		return false;
	memcpy(mac, r.arp_ha.sa_data, 6);
	return true;
}

/* A complete, not permanent entry: the kernel still revalidates it as usual. */
static int arp_store(int s, in_addr_t ip, const unsigned char mac[6])
{
	struct arpreq r;

	memset(&r, 0, sizeof(r));
	set_inaddr(&r.arp_pa, ip);
	r.arp_ha.sa_family = ARPHRD_ETHER;
	memcpy(r.arp_ha.sa_data, mac, 6);
	r.arp_flags = ATF_COM;
	snprintf(r.arp_dev, sizeof(r.arp_dev), "eth0");
	return ioctl(s, SIOCSARP, &r);
}

/*
 * Drops every ARP entry of eth0 (a new address with the same MAC; a new MAC
 * makes the kernel drop them itself).  /proc/net/arp lines are
 * "IP HWTYPE FLAGS MAC MASK DEVICE".
 */
static void arp_flush(int s)
{
	char *table = read_file("/proc/net/arp", 1 << 20, NULL);
	char *save = NULL;

	if (!table)
		return;
	/* The first line is the header. */
	strtok_r(table, "\n", &save);
	for (char *line; (line = strtok_r(NULL, "\n", &save)) != NULL;) {
		char ip[INET_ADDRSTRLEN], dev[IFNAMSIZ];
		struct in_addr a;
		struct arpreq r;

		if (sscanf(line, "%15s %*s %*s %*s %*s %15s", ip, dev) != 2 ||
		    strcmp(dev, "eth0") != 0 || inet_pton(AF_INET, ip, &a) != 1)
			continue;
		memset(&r, 0, sizeof(r));
		set_inaddr(&r.arp_pa, a.s_addr);
		snprintf(r.arp_dev, sizeof(r.arp_dev), "eth0");
		ioctl(s, SIOCDARP, &r);
	}
	free(table);
}

/*
 * One ARP request for `tip`, sent as (sha, sip) to `dest`: the broadcast
 * address, or a neighbour's own MAC.  Sent unicast to the gateway, it
 * teaches the host the new address's MAC (a request for the host's own
 * address creates the host's entry), the bridge the port the MAC is on,
 * and brings the gateway's answer, without a frame for every other VM on
 * the bridge to wake up for.
 */
static int send_arp_request(const unsigned char sha[6], in_addr_t sip, in_addr_t tip,
			    const unsigned char dest[6])
{
	struct __attribute__((packed)) {
		struct arphdr h;
		unsigned char sha[6], sip[4], tha[6], tip[4];
	} req = { .h = { .ar_hrd = htons(ARPHRD_ETHER), .ar_pro = htons(ETH_P_IP),
			 .ar_hln = 6, .ar_pln = 4, .ar_op = htons(ARPOP_REQUEST) } };
	struct sockaddr_ll to = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ARP),
				  .sll_halen = 6 };
	int rc = -1;

	memcpy(req.sha, sha, 6);
	memcpy(req.sip, &sip, 4);
	memcpy(req.tip, &tip, 4);
	memcpy(to.sll_addr, dest, 6);
	to.sll_ifindex = net.ifindex;
	if (net.packet >= 0 && net.ifindex > 0 &&
	    sendto(net.packet, &req, sizeof(req), 0, (struct sockaddr *)&to, sizeof(to)) == (ssize_t)sizeof(req))
		rc = 0;
	return rc;
}

/*
 * Has the kernel resolve the gateway now, with one datagram to its discard
 * port (the host's firewall drops it): the ARP reply then fills the cache,
 * which a template's snapshot carries to every clone (see set_eth0).
 * `wait_ms`: poll the cache until the entry is complete, at most that long.
 */
static void resolve_gateway(in_addr_t gw, int wait_ms)
{
	struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(9), .sin_addr.s_addr = gw };
	unsigned char mac[6];

	if (net.sock < 0)
		return;
	/* Queued behind the ARP request: sendto() does not wait for the answer. */
	sendto(net.sock, "", 0, MSG_DONTWAIT, (struct sockaddr *)&to, sizeof(to));
	/* A deadline, not a count: with a jiffies clocksource each sleep takes a whole tick. */
	for (long long until = boottime_ms() + wait_ms; boottime_ms() < until && !arp_lookup(net.sock, gw, mac);)
		nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
}

static void setup_network(const struct params *p)
{
	int s = net.sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		warnmsg("socket: %s", strerror(errno));
	} else {
		in_addr_t addr, mask;
		struct in_addr gw;
		if_up(s, "lo", htonl(INADDR_LOOPBACK), htonl(0xff000000u));
		disable_ipv6("eth0");
		net.ifindex = (int)if_nametoindex("eth0");
		/* Protocol 0: a socket that only sends, and is handed no frame meanwhile. */
		if (net.ifindex > 0)
			net.packet = socket(AF_PACKET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		if (p->ip && !parse_cidr(p->ip, &addr, &mask))
			warnmsg("uigniter.ip: invalid '%s', want ADDR/PREFIX", p->ip);
		else if (p->ip && if_up(s, "eth0", addr, mask) == 0 && p->gw &&
			 add_default_route(s, "eth0", p->gw) == 0 && inet_pton(AF_INET, p->gw, &gw) == 1)
			/* A template's boot (it waits for an identity) waits for the answer, so that its snapshot holds it. */
			resolve_gateway(gw.s_addr, p->wait && strcmp(p->wait, "identity") == 0 ? 100 : 0);
	}
	if (p->dns) {
		char *copy = strdup(p->dns);
		if (copy)
			write_resolv_conf(copy);
		free(copy);
	}
	if (p->hostname && sethostname(p->hostname, strlen(p->hostname)) < 0)
		warnmsg("sethostname '%s': %s", p->hostname, strerror(errno));
}

/* ================================================================ the app */

struct app {
	char **argv, **envp;
	const char *cwd;
	/* The app's uid and gid (an image's User); -1: root, as init runs. */
	long uid, gid;
};

/* The signal of a graceful stop (an image's StopSignal); SIGTERM unless the config names another. */
static int stop_signal = SIGTERM;

/* A whole decimal number in [0, max], or -1. */
static long parse_id(const char *v, long max)
{
	char *end;
	errno = 0;
	if (*v < '0' || *v > '9')
		return -1;
	unsigned long n = strtoul(v, &end, 10);
	return *end || errno || n > (unsigned long)max ? -1 : (long)n;
}

/*
 * The after-clone hook (cmd_after_clone).  The init makes one pipe at boot:
 * the app inherits its write end as fd ACK_FD and writes a byte there once
 * it has done what the signal asks (a clone: rekeyed its generators); the
 * init holds the read end.  A signal alone proves nothing: kill() returns
 * once the signal is queued, long before a runtime such as Node runs its
 * handler from its event loop, and a request could reach the app between
 * the two.  So the init answers the host only when the byte arrives, or
 * with an error when the deadline passes.
 */
static struct {
	int ack_r, ack_w; /* -1: no pipe (the hook is refused) */
	int timer_fd;     /* the hook's deadline */
	bool pending;     /* a signal was sent; its reply waits for the ack */
	long long sent_us;
} hook = { .ack_r = -1, .ack_w = -1, .timer_fd = -1 };

static void setup_ack_pipe(void)
{
	int p[2];

	if (pipe2(p, O_CLOEXEC) < 0 || fcntl(p[0], F_SETFL, O_NONBLOCK) < 0) {
		warnmsg("ack pipe: %s; after-clone signals cannot be acknowledged", strerror(errno));
		return;
	}
	hook.timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (hook.timer_fd < 0) {
		warnmsg("timerfd_create: %s; after-clone signals cannot be acknowledged", strerror(errno));
		close(p[0]);
		close(p[1]);
		return;
	}
	hook.ack_r = p[0];
	hook.ack_w = p[1];
}

/* Replaces the variable of the same name in envp[0..*envc), or appends. */
static void env_set(char **envp, size_t *envc, char *kv)
{
	size_t klen = strchr(kv, '=') - kv + 1;
	for (size_t i = 0; i < *envc; i++) {
		if (strncmp(envp[i], kv, klen) == 0) {
			envp[i] = kv;
			return;
		}
	}
	envp[(*envc)++] = kv;
}

/*
 * The config is NUL-terminated key/value string pairs, so that arguments
 * and environment values can hold any byte but NUL without escaping.  The
 * kernel command line may override the arguments (all of argv[1..]) and
 * single variables, for this VM only.
 * Returns false when there is no config or it names no program.
 */
static bool load_app_config(struct app *app, const struct params *p)
{
	size_t len;
	char *blob = read_file(APP_CONFIG, 16 << 20, &len);

	memset(app, 0, sizeof(*app));
	app->uid = app->gid = -1;
	if (!blob)
		return false;
	/* Every string could be an entry; +2 for PATH and HOME, +1 for NULL. */
	size_t max = 1 + p->nargs + p->nenvs;
	for (size_t i = 0; i < len; i++)
		max += blob[i] == '\0';
	app->argv = calloc(max + 1, sizeof(char *));
	app->envp = calloc(max + 3, sizeof(char *));
	if (!app->argv || !app->envp)
		fatal("out of memory reading " APP_CONFIG);

	bool override_args = p->noargs || p->nargs > 0;
	size_t argc = 0, envc = 0;
	/* read_file's terminator ends a last string that lacks its NUL. */
	for (char *s = blob, *end = blob + len; s < end;) {
		char *key = s;
		s += strlen(s) + 1;
		if (s >= end)
			break;
		char *val = s;
		s += strlen(s) + 1;

		if (strcmp(key, "arg") == 0) {
			if (!override_args || argc == 0)
				app->argv[argc++] = val;
		} else if (strcmp(key, "cwd") == 0) {
			app->cwd = val;
		} else if (strcmp(key, "uid") == 0) {
			app->uid = parse_id(val, 0x7fffffffL);
		} else if (strcmp(key, "gid") == 0) {
			app->gid = parse_id(val, 0x7fffffffL);
		} else if (strcmp(key, "stopsig") == 0) {
			long sig = parse_id(val, NSIG - 1);
			if (sig > 0)
				stop_signal = (int)sig;
		} else if (strcmp(key, "env") == 0 && strchr(val, '=')) {
			app->envp[envc++] = val;
		}
	}
	if (argc == 0)
		return false;
	for (size_t i = 0; override_args && i < p->nargs; i++)
		app->argv[argc++] = p->args[i];
	for (size_t i = 0; i < p->nenvs; i++)
		env_set(app->envp, &envc, p->envs[i]);

	bool have_path = false, have_home = false;
	for (size_t i = 0; i < envc; i++) {
		have_path |= strncmp(app->envp[i], "PATH=", 5) == 0;
		have_home |= strncmp(app->envp[i], "HOME=", 5) == 0;
	}
	if (!have_path)
		app->envp[envc++] = "PATH=" DEFAULT_PATH;
	if (!have_home)
		app->envp[envc++] = "HOME=/";
	return true;
}

/*
 * execvpe() without its two surprises: PATH is taken from the app's
 * environment rather than ours, and ENOEXEC is reported instead of retried
 * with /bin/sh, which these images do not have.  Returns with errno set.
 */
static void exec_app(char *const argv[], char *const envp[])
{
	const char *name = argv[0], *path = DEFAULT_PATH;
	bool eacces = false;

	if (strchr(name, '/')) {
		execve(name, argv, envp);
		return;
	}
	for (char *const *e = envp; *e; e++)
		if (strncmp(*e, "PATH=", 5) == 0)
			path = *e + 5;

	while (*name) {
		size_t dlen = strcspn(path, ":");
		char full[PATH_MAX];
		/* An empty PATH element means the current directory. */
		int n = snprintf(full, sizeof(full), "%.*s/%s",
				 dlen ? (int)dlen : 1, dlen ? path : ".", name);
		if (n > 0 && (size_t)n < sizeof(full)) {
			execve(full, argv, envp);
			if (errno == EACCES)
				eacces = true;
			else if (errno != ENOENT && errno != ENOTDIR && errno != ELOOP &&
				 errno != ENAMETOOLONG && errno != ESTALE && errno != ENODEV)
				return;
		}
		if (path[dlen] == '\0')
			break;
		path += dlen + 1;
	}
	errno = eacces ? EACCES : ENOENT;
}

__attribute__((noreturn))
static void child_exec(const struct app *app, int report_fd)
{
	struct sigaction dfl = { .sa_handler = SIG_DFL };
	sigset_t none;

	/* Init's signal setup must not leak into the app. */
	for (int sig = 1; sig < NSIG; sig++)
		sigaction(sig, &dfl, NULL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);

	/* A process group of its own lets shutdown signal the app's whole tree. */
	setsid();
	char *const *envp = app->envp;
	if (hook.ack_w >= 0) {
		static char ack_env[] = "UIGNITER_ACK_FD=3";
		size_t envc = 0;
		if (report_fd == ACK_FD)
			report_fd = fcntl(report_fd, F_DUPFD_CLOEXEC, ACK_FD + 1);
		/* dup2 clears close-on-exec on the new fd, but is a no-op when it is the same fd. */
		if (hook.ack_w == ACK_FD)
			fcntl(ACK_FD, F_SETFD, 0);
		else
			dup2(hook.ack_w, ACK_FD);
		while (app->envp[envc])
			envc++;
		char **with_ack = calloc(envc + 2, sizeof(char *));
		if (with_ack) {
			memcpy(with_ack, app->envp, envc * sizeof(char *));
			env_set(with_ack, &envc, ack_env);
			envp = with_ack;
		}
	}
	/* The image's User: groups first, then the gid, then the uid, which gives up the right to change them. */
	if (app->gid >= 0 && (setgroups(0, NULL) < 0 || setgid((gid_t)app->gid) < 0))
		goto failed;
	if (app->uid >= 0 && setuid((uid_t)app->uid) < 0)
		goto failed;
	if (chdir(app->cwd ? app->cwd : "/") == 0)
		exec_app(app->argv, envp);
failed:;
	int err = errno;
	write_all(report_fd, &err, sizeof(err));
	_exit(127);
}

/*
 * Returns the app's pid, or -1 when it could not be started.  The pipe is
 * close-on-exec: EOF means exec succeeded, otherwise it carries the errno.
 */
static pid_t start_app(const struct app *app)
{
	int pfd[2], err;
	ssize_t n;

	if (pipe2(pfd, O_CLOEXEC) < 0)
		fatal("pipe2: %s", strerror(errno));
	pid_t pid = fork();
	if (pid < 0)
		fatal("fork: %s", strerror(errno));
	if (pid == 0)
		child_exec(app, pfd[1]);
	close(pfd[1]);
	do
		n = read(pfd[0], &err, sizeof(err));
	while (n < 0 && errno == EINTR);
	close(pfd[0]);

	if (n == (ssize_t)sizeof(err)) {
		waitpid(pid, NULL, 0);
		marker("EXEC-FAILED errno=%d error=\"%s\"", err, strerror(err));
		return -1;
	}
	marker("APP-STARTED pid=%d", (int)pid);
	return pid;
}

static struct {
	pid_t pid;
	bool running;
	bool signaled; /* once !running: code is a signal number */
	int code;
} app_state;

static int timer_fd = -1;

/*
 * A template boots with uigniter.wait=identity: the init stops before the
 * app, the host snapshots the guest there, and every clone resumes at this
 * point and gets its own identity (cmd_identity) before the app starts.
 */
static struct {
	bool waiting;      /* the app is held back until an identity arrives */
	bool ready;        /* an identity was taken: start the app now */
	struct app *app;   /* the app to start, with its configured environment */
	char **envs;       /* NAME=VALUE strings from the identity, owned */
	size_t nenvs;
} identity;

static void signal_app(int sig)
{
	/* The app is a session leader, so its group id is its pid. */
	if (kill(-app_state.pid, sig) < 0)
		kill(app_state.pid, sig);
}

/* ======================================================= control channel */

/*
 * Protocol: the host sends "VERB [key=value ...]\n"; every non-blank line
 * gets exactly one JSON object on one line in reply.  The guest volunteers
 * two messages: {"event":"waiting","for":"identity","version":N} to each
 * host connection while the app waits for an identity (so the host need
 * not ask), and {"event":"exit",...} just before the VM ends.
 */
static struct {
	int fd;          /* -1: this VM has no control port */
	bool idle;       /* host end closed: left out of poll() until SIGIO */
	bool connected;  /* the host end was open at the last poll() */
	bool discarding; /* inside an over-long line, skipping to its '\n' */
	bool announce;   /* tell the host we wait for an identity, once it is connected */
	size_t in_len, out_len;
	char in[CTL_LINE_MAX + 1];
	char out[CTL_OUT_CAP];
} ctl = { .fd = -1 };

static bool find_ctl_port(char *dev, size_t devsz)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	struct dirent *e;
	bool found = false;

	while (d && !found && (e = readdir(d)) != NULL) {
		char path[300], *name;
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
		if (!(name = read_file(path, 4096, NULL)))
			continue;
		found = strcmp(name, CTL_PORT_NAME "\n") == 0 &&
			(size_t)snprintf(dev, devsz, "/dev/%s", e->d_name) < devsz;
		free(name);
	}
	if (d)
		closedir(d);
	return found;
}

static bool have_virtio_console(void)
{
	/* Bound devices appear as "virtioN" links in the driver's directory. */
	DIR *d = opendir("/sys/bus/virtio/drivers/virtio_console");
	struct dirent *e;
	bool found = false;

	while (d && !found && (e = readdir(d)) != NULL)
		found = strncmp(e->d_name, "virtio", 6) == 0;
	if (d)
		closedir(d);
	return found;
}

static void ctl_open(void)
{
	char dev[300];
	/*
	 * Ports and their names arrive from QEMU as asynchronous control
	 * messages, so one may not be visible yet right after boot.  Waiting
	 * briefly is only worth it if a virtio-serial device exists at all.
	 */
	bool wait = have_virtio_console();
	for (int tries = 0; !find_ctl_port(dev, sizeof(dev)); tries++) {
		if (!wait || tries == 25)
			return;
		nanosleep(&(struct timespec){ .tv_nsec = 10000000 }, NULL);
	}

	ctl.fd = open(dev, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
	if (ctl.fd < 0) {
		warnmsg("%s: %s", dev, strerror(errno));
		return;
	}
	/*
	 * While the host end is closed, poll() reports POLLHUP without end, so
	 * the fd leaves the poll set then; the driver raises SIGIO on each host
	 * connect and disconnect, which brings it back.  O_ASYNC stays on for
	 * good so that no transition can slip between seeing the hang-up and
	 * asking for the signal.
	 */
	int fl = fcntl(ctl.fd, F_GETFL);
	if (fcntl(ctl.fd, F_SETOWN, getpid()) < 0 || fcntl(ctl.fd, F_SETFL, fl | O_ASYNC) < 0)
		warnmsg("%s: O_ASYNC: %s", dev, strerror(errno));
}

__attribute__((format(printf, 1, 2)))
static void ctl_reply(const char *fmt, ...)
{
	size_t room = sizeof(ctl.out) - ctl.out_len;
	va_list ap;

	va_start(ap, fmt);
	int n = vsnprintf(ctl.out + ctl.out_len, room, fmt, ap);
	va_end(ap);
	/* Better no reply than a truncated JSON object. */
	if (n < 0 || (size_t)n + 1 >= room)
		return;
	ctl.out[ctl.out_len + n] = '\n';
	ctl.out_len += n + 1;
}

static void ctl_flush(void)
{
	size_t off = 0;
	while (off < ctl.out_len) {
		ssize_t w = write(ctl.fd, ctl.out + off, ctl.out_len - off);
		if (w > 0)
			off += w;
		else if (!(w < 0 && errno == EINTR))
			break;
	}
	memmove(ctl.out, ctl.out + off, ctl.out_len - off);
	ctl.out_len -= off;
}

/* JSON string body of at most max input bytes, for echoing host input. */
static void json_escape(char *dst, size_t dstsz, const char *s, size_t max)
{
	size_t o = 0;
	for (; *s && max-- && o + 7 < dstsz; s++) {
		unsigned char c = *s;
		if (c == '"' || c == '\\')
			o += snprintf(dst + o, dstsz - o, "\\%c", c);
		else if (c < 0x20 || c >= 0x7f)
			o += snprintf(dst + o, dstsz - o, "\\u%04x", c);
		else
			dst[o++] = c;
	}
	dst[o] = '\0';
}

/* ---------------------------------------------------------------- verbs */

#define CTL_MAX_ARGS 16

struct ctl_args {
	int n;
	const char *key[CTL_MAX_ARGS];
	const char *val[CTL_MAX_ARGS]; /* "" for a bare word */
};

static const char *arg_get(const struct ctl_args *a, const char *key)
{
	for (int i = a->n - 1; i >= 0; i--)
		if (strcmp(a->key[i], key) == 0)
			return a->val[i];
	return NULL;
}

static void cmd_ping(const struct ctl_args *a)
{
	(void)a;
	ctl_reply("{\"ok\":true,\"pong\":true}");
}

static void cmd_status(const struct ctl_args *a)
{
	(void)a;
	ctl_reply("{\"ok\":true,\"app\":\"%s\",\"pid\":%d,\"uptime_ms\":%lld}",
		  identity.waiting ? "waiting" : app_state.running ? "running" : "exited",
		  (int)app_state.pid, boottime_ms());
}

/* SIGTERM now, SIGKILL when timeout_ms passes; the exit path does the rest. */
static void cmd_shutdown(const struct ctl_args *a)
{
	const char *v = arg_get(a, "timeout_ms");
	unsigned long ms = DEFAULT_SHUTDOWN_MS;
	char *end;

	if (v) {
		errno = 0;
		ms = strtoul(v, &end, 10);
		if (*v < '0' || *v > '9' || *end || errno || ms > MAX_SHUTDOWN_MS) {
			ctl_reply("{\"ok\":false,\"error\":\"invalid timeout_ms\"}");
			return;
		}
	}
	ctl_reply("{\"ok\":true}");
	if (!app_state.running)
		return;
	signal_app(stop_signal);
	if (ms == 0) {
		signal_app(SIGKILL);
		return;
	}
	/* A repeated shutdown may bring the deadline forward, never push it back. */
	struct itimerspec cur, its = { .it_value = { ms / 1000, ms % 1000 * 1000000 } };
	if (timerfd_gettime(timer_fd, &cur) == 0 &&
	    (cur.it_value.tv_sec || cur.it_value.tv_nsec) &&
	    cur.it_value.tv_sec * 1000 + cur.it_value.tv_nsec / 1000000 <= (long long)ms)
		return;
	if (timerfd_settime(timer_fd, 0, &its, NULL) < 0) {
		warnmsg("timerfd_settime: %s; killing the app now", strerror(errno));
		signal_app(SIGKILL);
	}
}

/* XX:XX:XX:XX:XX:XX exactly (by hand: scanf is a lot of code for a clone to translate). */
static bool parse_mac(const char *s, unsigned char mac[6])
{
	for (int i = 0; i < 6; i++, s += 3) {
		int hi = hexval(s[0]), lo = hi < 0 ? -1 : hexval(s[1]);
		if (lo < 0 || s[2] != (i == 5 ? '\0' : ':'))
			return false;
		mac[i] = (unsigned char)(hi << 4 | lo);
	}
	return true;
}

/* 64 hex digits: the 32 bytes the host drew for this clone alone. */
static bool parse_seed(const char *s, unsigned char seed[32])
{
	if (strlen(s) != 64)
		return false;
	for (int i = 0; i < 32; i++) {
		int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
		if (hi < 0 || lo < 0)
			return false;
		seed[i] = (unsigned char)(hi << 4 | lo);
	}
	return true;
}

static int urandom_fd = -1;

/*
 * Mixes the host's seed into the input pool and reseeds the CRNG at once:
 * crediting alone would not rekey an already-initialised CRNG until its next
 * periodic reseed, so clones of one template would draw the same bytes.
 */
static int reseed_rng(const unsigned char seed[32])
{
	struct {
		struct rand_pool_info info;
		unsigned char buf[32];
	} req = { .info = { .entropy_count = 256, .buf_size = 32 } };
	memcpy(req.info.buf, seed, 32);
	/* Opened at boot (a clone resumes with it); once more if that failed. */
	if (urandom_fd < 0 && (urandom_fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC)) < 0)
		return -1;
	int rc = ioctl(urandom_fd, RNDADDENTROPY, &req.info);
	if (rc == 0)
		rc = ioctl(urandom_fd, RNDRESEEDCRNG);
	return rc;
}

static bool get_inaddr(int s, unsigned long req, struct ifreq *ifr, in_addr_t *out)
{
	if (ioctl(s, req, ifr) < 0)
		return false;
	struct sockaddr_in sin;
	memcpy(&sin, &ifr->ifr_addr, sizeof(sin));
	*out = sin.sin_addr.s_addr;
	return true;
}

/* What set_eth0 leaves for announce_eth0, which runs once the host has its reply. */
static struct {
	bool pending;
	bool to_gateway; /* unicast to the gateway, whose MAC is known */
	unsigned char mac[6], gw_mac[6];
	in_addr_t addr, gw;
} announcement;

/*
 * Gives eth0 the clone's MAC and address without taking the link down:
 * virtio-net changes its MAC live (VIRTIO_NET_F_CTRL_MAC_ADDR, which QEMU
 * offers), and a link taken down and up again costs the clone its queues'
 * buffers and the kernel's link-watch delay (up to a second before the
 * device sends anything).  A new MAC makes the kernel drop the device's
 * neighbours (NETDEV_CHANGEADDR), so nothing learnt under the template's
 * identity survives, save the gateway's entry, which is put back: the
 * bridge's MAC does not change, and asking the whole bridge for it again
 * would wake every VM on it.  A new address drops the default route, which
 * is added again.  What did not change is left alone.  The new pair is
 * announced afterwards (announce_eth0).
 */
static int set_eth0(in_addr_t addr, in_addr_t mask, const unsigned char mac[6], const char *gw,
		    const char **step)
{
	struct ifreq ifr;
	struct in_addr gw_a = { 0 };
	unsigned char gw_mac[6];
	in_addr_t old_addr = 0, old_mask = 0;
	int s = net.sock;

	*step = "socket";
	if (s < 0 && (s = net.sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0)) < 0)
		return -1;
	/* Checked by the caller. */
	if (gw)
		inet_pton(AF_INET, gw, &gw_a);
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "eth0");
	*step = "flags";
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		return -1;
	bool was_up = ifr.ifr_flags & IFF_UP;
	*step = "mac";
	if (ioctl(s, SIOCGIFHWADDR, &ifr) < 0)
		return -1;
	bool new_mac = memcmp(ifr.ifr_hwaddr.sa_data, mac, 6) != 0;
	/* No address yet (EADDRNOTAVAIL): a guest booted without one. */
	bool new_addr = !get_inaddr(s, SIOCGIFADDR, &ifr, &old_addr) ||
			!get_inaddr(s, SIOCGIFNETMASK, &ifr, &old_mask) ||
			old_addr != addr || old_mask != mask;
	if (!new_mac && !new_addr && was_up)
		return 0;
	bool known_gw = gw && arp_lookup(s, gw_a.s_addr, gw_mac);

	if (new_mac) {
		ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
		memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
		if (ioctl(s, SIOCSIFHWADDR, &ifr) < 0)
			return -1;
	} else {
		arp_flush(s);
	}
	if (new_addr) {
		/* SIOCSIFADDR gives the address its class's mask, so the netmask comes after it. */
		*step = "address";
		set_inaddr(&ifr.ifr_addr, addr);
		if (ioctl(s, SIOCSIFADDR, &ifr) < 0)
			return -1;
		set_inaddr(&ifr.ifr_netmask, mask);
		if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0)
			return -1;
	}
	if (!was_up) {
		*step = "link up";
		if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
			return -1;
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
			return -1;
	}
	*step = "route";
	if (gw && add_default_route(s, "eth0", gw) < 0)
		return -1;
	*step = "neighbours";
	if (known_gw && arp_store(s, gw_a.s_addr, gw_mac) < 0)
		return -1;
	announcement.pending = true;
	announcement.to_gateway = known_gw;
	memcpy(announcement.mac, mac, 6);
	memcpy(announcement.gw_mac, gw_mac, 6);
	announcement.addr = addr;
	announcement.gw = gw ? gw_a.s_addr : 0;
	return 0;
}

/*
 * Best effort, as ARP itself is: without it the host still finds the clone
 * by asking for it.  To the gateway when its MAC is known (see
 * send_arp_request); else the kernel asks everyone for the gateway; with no
 * gateway, a gratuitous request for our own address goes to everyone.
 */
static void announce_eth0(void)
{
	static const unsigned char broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

	if (!announcement.pending)
		return;
	announcement.pending = false;
	if (announcement.to_gateway)
		send_arp_request(announcement.mac, announcement.addr, announcement.gw, announcement.gw_mac);
	else if (announcement.gw)
		resolve_gateway(announcement.gw, 0);
	else
		send_arp_request(announcement.mac, announcement.addr, announcement.addr, broadcast);
}

/*
 * identity ip=ADDR/PREFIX [gw=ADDR] mac=MAC hostname=NAME seed=HEX64
 * time=UNIX_MS [env=PCT-ENCODED-NAME=VALUE ...]
 * A clone's new self.  Everything is checked before anything changes, and
 * {"ok":true} means every step took.  env is only for an app not yet
 * started (a template's clone); the app starts after the reply is queued.
 */
static void cmd_identity(const struct ctl_args *a)
{
	const char *ip = arg_get(a, "ip"), *gw = arg_get(a, "gw"), *mac_s = arg_get(a, "mac");
	const char *host = arg_get(a, "hostname"), *seed_s = arg_get(a, "seed"), *time_s = arg_get(a, "time");
	unsigned char mac[6], seed[32];
	in_addr_t addr, mask;
	struct in_addr gw_a;
	char *end;
	size_t nenv = 0;
	long long began_us = monotonic_us();

#define REFUSE(msg) do { ctl_reply("{\"ok\":false,\"error\":\"" msg "\"}"); return; } while (0)
	if (!ip || !parse_cidr(ip, &addr, &mask))
		REFUSE("identity: ip=ADDR/PREFIX is missing or invalid");
	if (gw && inet_pton(AF_INET, gw, &gw_a) != 1)
		REFUSE("identity: invalid gw");
	if (!mac_s || !parse_mac(mac_s, mac) || (mac[0] & 1))
		REFUSE("identity: mac=XX:XX:XX:XX:XX:XX (unicast) is missing or invalid");
	if (!host || !*host || strlen(host) > 64)
		REFUSE("identity: hostname is missing or longer than 64 bytes");
	if (!seed_s || !parse_seed(seed_s, seed))
		REFUSE("identity: seed=64 hex digits is missing or invalid");
	errno = 0;
	unsigned long long ms = time_s ? strtoull(time_s, &end, 10) : 0;
	if (!time_s || *time_s < '0' || *time_s > '9' || *end || errno)
		REFUSE("identity: time=UNIX_MS is missing or invalid");
	for (int i = 0; i < a->n; i++) {
		if (strcmp(a->key[i], "env") != 0)
			continue;
		const char *eq = strchr(a->val[i], '=');
		if (!eq || eq == a->val[i])
			REFUSE("identity: env wants NAME=VALUE");
		nenv++;
	}
	if (nenv && !identity.waiting)
		REFUSE("identity: env can only be given before the app starts (uigniter.wait=identity)");

	const char *step = "rng";
	if (reseed_rng(seed) < 0)
		goto fail;
	step = "clock";
	struct timespec ts = { .tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000 };
	if (clock_settime(CLOCK_REALTIME, &ts) < 0)
		goto fail;
	step = "hostname";
	if (sethostname(host, strlen(host)) < 0)
		goto fail;
	if (set_eth0(addr, mask, mac, gw, &step) < 0)
		goto fail;
	if (nenv) {
		/* The line buffer is reused for the next command: keep copies. */
		char **envs = realloc(identity.envs, (identity.nenvs + nenv) * sizeof(char *));
		step = "env";
		if (!envs)
			goto fail;
		identity.envs = envs;
		for (int i = 0; i < a->n; i++) {
			char *kv;
			if (strcmp(a->key[i], "env") != 0)
				continue;
			if (!(kv = strdup(a->val[i])))
				goto fail;
			identity.envs[identity.nenvs++] = pct_decode(kv);
		}
	}
#undef REFUSE
	/* The guest's own time for the whole step, so that the host can tell it from the channel's. */
	long long took_us = monotonic_us() - began_us;
	ctl_reply("{\"ok\":true,\"took_us\":%lld}", took_us);
	/* After the reply: the host waits for the reply alone, and the serial console is slow. */
	ctl_flush();
	announce_eth0();
	marker("IDENTITY hostname=%s took_us=%lld", host, took_us);
	if (identity.waiting)
		identity.ready = true;
	return;
fail:;
	char esc[7 * 64 + 1];
	json_escape(esc, sizeof(esc), strerror(errno), 64);
	ctl_reply("{\"ok\":false,\"error\":\"identity: %s: %s\"}", step, esc);
}

static void ctl_process(void);

/* Bytes left in the ack pipe from an earlier signal must not count for the next one. */
static bool drain_acks(void)
{
	char buf[64];
	bool got = false;
	ssize_t n;

	while ((n = read(hook.ack_r, buf, sizeof(buf))) > 0 || (n < 0 && errno == EINTR))
		got |= n > 0;
	return got;
}

/*
 * after-clone signal=N timeout_ms=N
 * Sends the signal to the app (its pid only: its children may not handle
 * it) and answers once the app has written to its ack fd, so that the host
 * routes nothing to a clone before its app has rekeyed; no other command is
 * handled meanwhile, so replies stay in order.  {"ok":true,"ack_us":N}, or
 * an error when the app exits or the deadline passes first.
 */
static void cmd_after_clone(const struct ctl_args *a)
{
	const char *sig_s = arg_get(a, "signal"), *ms_s = arg_get(a, "timeout_ms");
	char *end;

#define REFUSE(msg) do { ctl_reply("{\"ok\":false,\"error\":\"" msg "\"}"); return; } while (0)
	errno = 0;
	long sig = sig_s ? strtol(sig_s, &end, 10) : 0;
	if (!sig_s || *end || errno || sig < 1 || sig >= NSIG || sig == SIGKILL || sig == SIGSTOP)
		REFUSE("after-clone: signal=N is missing or invalid");
	errno = 0;
	unsigned long ms = ms_s ? strtoul(ms_s, &end, 10) : 0;
	if (!ms_s || *ms_s < '0' || *ms_s > '9' || *end || errno || ms == 0 || ms > MAX_SHUTDOWN_MS)
		REFUSE("after-clone: timeout_ms=N is missing or invalid");
	if (identity.waiting)
		REFUSE("after-clone: the app has not started yet");
	if (!app_state.running)
		REFUSE("after-clone: the app is not running");
	if (hook.ack_r < 0)
		REFUSE("after-clone: this guest has no ack pipe");
#undef REFUSE
	drain_acks();
	struct itimerspec its = { .it_value = { ms / 1000, ms % 1000 * 1000000 } };
	if (timerfd_settime(hook.timer_fd, 0, &its, NULL) < 0 || kill(app_state.pid, (int)sig) < 0) {
		char esc[7 * 64 + 1];
		json_escape(esc, sizeof(esc), strerror(errno), 64);
		ctl_reply("{\"ok\":false,\"error\":\"after-clone: %s\"}", esc);
		return;
	}
	hook.pending = true;
	hook.sent_us = monotonic_us();
}

/* The reply cmd_after_clone left pending; then the commands that waited behind it. */
static void after_clone_done(const char *error)
{
	struct itimerspec off = { 0 };

	timerfd_settime(hook.timer_fd, 0, &off, NULL);
	hook.pending = false;
	if (error)
		ctl_reply("{\"ok\":false,\"error\":\"after-clone: %s\"}", error);
	else
		ctl_reply("{\"ok\":true,\"ack_us\":%lld}", monotonic_us() - hook.sent_us);
	if (ctl.fd < 0)
		return;
	ctl_flush();
	ctl_process();
	ctl_flush();
}

/* A new verb is one function and one row here. */
static const struct {
	const char *verb;
	void (*run)(const struct ctl_args *);
} ctl_verbs[] = {
	{ "ping", cmd_ping },
	{ "status", cmd_status },
	{ "shutdown", cmd_shutdown },
	{ "identity", cmd_identity },
	{ "after-clone", cmd_after_clone },
};

static void ctl_dispatch(char *line)
{
	char *save = NULL, *tok;
	char *verb = strtok_r(line, " \t\r", &save);
	struct ctl_args args = { 0 };

	/* Blank lines get no reply, so the host may use them as keep-alives. */
	if (!verb)
		return;
	while ((tok = strtok_r(NULL, " \t\r", &save)) != NULL) {
		if (args.n == CTL_MAX_ARGS) {
			ctl_reply("{\"ok\":false,\"error\":\"too many arguments\"}");
			return;
		}
		char *eq = strchr(tok, '=');
		if (eq)
			*eq++ = '\0';
		args.key[args.n] = tok;
		args.val[args.n++] = eq ? eq : "";
	}
	for (size_t i = 0; i < ARRAY_LEN(ctl_verbs); i++) {
		if (strcmp(verb, ctl_verbs[i].verb) == 0) {
			ctl_verbs[i].run(&args);
			return;
		}
	}
	char esc[7 * 32 + 1];
	json_escape(esc, sizeof(esc), verb, 32);
	ctl_reply("{\"ok\":false,\"error\":\"unknown command: %s\"}", esc);
}

static bool ctl_reply_room(void)
{
	return sizeof(ctl.out) - ctl.out_len >= CTL_REPLY_MAX;
}

/* Handles buffered complete lines for as long as replies have room. */
static void ctl_process(void)
{
	while (ctl.in_len > 0 && ctl_reply_room() && !hook.pending) {
		char *nl = memchr(ctl.in, '\n', ctl.in_len);
		if (!nl) {
			/* A full buffer without '\n' is a line over CTL_LINE_MAX. */
			if (ctl.in_len < sizeof(ctl.in))
				return;
			if (!ctl.discarding)
				ctl_reply("{\"ok\":false,\"error\":\"line too long\"}");
			ctl.discarding = true;
			ctl.in_len = 0;
			return;
		}
		*nl = '\0';
		if (!ctl.discarding)
			ctl_dispatch(ctl.in);
		ctl.discarding = false;
		ctl.in_len -= nl + 1 - ctl.in;
		memmove(ctl.in, nl + 1, ctl.in_len);
	}
}

static short ctl_poll_events(void)
{
	/* A pending announcement waits for the port to be writable, which it is once a host is connected. */
	short ev = ctl.out_len || ctl.announce ? POLLOUT : 0;
	if (ctl.in_len < sizeof(ctl.in) && ctl_reply_room())
		ev |= POLLIN;
	return ev;
}

/*
 * Session boundaries are fuzzy: the driver learns of host connects and
 * disconnects from a control queue that it handles after data, so a new
 * client's first line can arrive while the port still reads as closed.  A
 * hang-up therefore only drops what was left over from before it was seen
 * (a half-sent line, replies nobody read); what arrives with or after it is
 * handled and its replies wait for the connect that SIGIO will announce.
 *
 * Then it loops until nothing moves: replies are only produced while there
 * is room for them, so buffered lines are revisited after every flush.
 */
static void ctl_service(short revents)
{
	bool hup = revents & (POLLHUP | POLLERR);
	size_t in_before, out_before;

	if (hup && ctl.connected) {
		ctl.in_len = ctl.out_len = 0;
		ctl.discarding = false;
	}
	/* Each host connection hears it (see the SIGIO handling): one that came after the first would wait in vain. */
	if (!hup && !ctl.connected && identity.waiting)
		ctl.announce = true;
	ctl.connected = !hup;
	if (ctl.announce && ctl.connected && ctl_reply_room()) {
		ctl.announce = false;
		if (identity.waiting)
			ctl_reply("{\"event\":\"waiting\",\"for\":\"identity\",\"version\":%d}", INIT_VERSION);
	}
	do {
		in_before = ctl.in_len;
		out_before = ctl.out_len;
		ctl_flush();
		ctl_process();
		if (ctl.in_len == sizeof(ctl.in) || !ctl_reply_room())
			continue;
		ssize_t n = read(ctl.fd, ctl.in + ctl.in_len, sizeof(ctl.in) - ctl.in_len);
		if (n > 0) {
			ctl.in_len += n;
		} else if (n == 0) {
			/* The host end is closed and everything it sent was read. */
			hup = true;
			break;
		} else if (errno == ENODEV) {
			warnmsg("control port unplugged");
			close(ctl.fd);
			ctl.fd = -1;
			return;
		}
	} while (ctl.in_len != in_before || ctl.out_len != out_before);

	if (hup) {
		ctl.connected = false;
		ctl.idle = true;
	}
}

/* Best effort: the host may be gone or not reading. */
static void ctl_send_exit_event(void)
{
	if (ctl.fd < 0)
		return;
	if (app_state.signaled)
		ctl_reply("{\"event\":\"exit\",\"signal\":%d}", app_state.code);
	else
		ctl_reply("{\"event\":\"exit\",\"code\":%d}", app_state.code);

	long long deadline = boottime_ms() + 200;
	for (;;) {
		ctl_flush();
		long long left = deadline - boottime_ms();
		if (ctl.out_len == 0 || left <= 0)
			return;
		struct pollfd p = { .fd = ctl.fd, .events = POLLOUT };
		if (poll(&p, 1, (int)left) < 0 && errno != EINTR)
			return;
		/* Without a host connection nothing will ever drain. */
		if ((p.revents & (POLLHUP | POLLERR)) && !(p.revents & POLLOUT))
			return;
	}
}

/* ============================================================ lifecycle */

__attribute__((noreturn))
static void app_gone(void)
{
	if (app_state.signaled)
		marker("EXIT signal=%d", app_state.code);
	else
		marker("EXIT code=%d", app_state.code);
	ctl_send_exit_event();
	kill_all_and_reap();
	sync();
	/* After the sync: the unmount itself then has little left to write. */
	unmount_volumes();
	reboot_now();
}

static void reap_children(void)
{
	int status;
	pid_t pid;

	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		if (pid != app_state.pid || !app_state.running)
			continue;
		app_state.running = false;
		app_state.signaled = WIFSIGNALED(status);
		app_state.code = app_state.signaled ? WTERMSIG(status) : WEXITSTATUS(status);
	}
}

static int setup_signals(void)
{
	sigset_t mask;

	/*
	 * Blocked before anything is forked or the port opened, so neither
	 * signal is lost.  Blocked signals queue even for PID 1, which would
	 * otherwise discard signals it has no handler for.
	 */
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigaddset(&mask, SIGIO);
	if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
		fatal("sigprocmask: %s", strerror(errno));
	int fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (fd < 0)
		fatal("signalfd: %s", strerror(errno));
	return fd;
}

/* The identity's variables replace the image's of the same name. */
static void start_after_identity(void)
{
	struct app *app = identity.app;
	size_t envc = 0;

	identity.ready = identity.waiting = false;
	while (app->envp[envc])
		envc++;
	char **envp = calloc(envc + identity.nenvs + 1, sizeof(char *));
	if (!envp)
		fatal("out of memory starting the app");
	memcpy(envp, app->envp, envc * sizeof(char *));
	for (size_t i = 0; i < identity.nenvs; i++)
		env_set(envp, &envc, identity.envs[i]);
	app->envp = envp;
	/* The reply goes out before the app can print or exit. */
	ctl_flush();
	app_state.pid = start_app(app);
	if (app_state.pid < 0) {
		app_state.code = 127;
		app_gone();
	}
	app_state.running = true;
}

__attribute__((noreturn))
static void event_loop(int sig_fd)
{
	/* No timeouts: an idle guest must not wake up at all. */
	for (;;) {
		struct pollfd pfd[5] = {
			{ .fd = sig_fd, .events = POLLIN },
			{ .fd = timer_fd, .events = POLLIN },
			{ .fd = -1 },
			{ .fd = hook.pending ? hook.ack_r : -1, .events = POLLIN },
			{ .fd = hook.pending ? hook.timer_fd : -1, .events = POLLIN },
		};
		if (ctl.fd >= 0 && !ctl.idle)
			pfd[2] = (struct pollfd){ .fd = ctl.fd, .events = ctl_poll_events() };

		if (poll(pfd, ARRAY_LEN(pfd), -1) < 0) {
			if (errno == EINTR)
				continue;
			fatal("poll: %s", strerror(errno));
		}
		if (pfd[0].revents) {
			struct signalfd_siginfo si;
			while (read(sig_fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
				if (si.ssi_signo == SIGCHLD)
					reap_children();
				else if (si.ssi_signo == SIGIO) {
					ctl.idle = false;
					/*
					 * Perhaps a host connected: it sends nothing until it
					 * hears us, so the announcement must ask for POLLOUT.
					 */
					ctl.announce |= identity.waiting;
				}
			}
		}
		if (pfd[1].revents) {
			uint64_t expirations;
			if (read(timer_fd, &expirations, sizeof(expirations)) > 0 && app_state.running) {
				warnmsg("shutdown timeout: sending SIGKILL to the app");
				signal_app(SIGKILL);
			}
		}
		if (hook.pending && pfd[3].revents && drain_acks())
			after_clone_done(NULL);
		if (hook.pending && !app_state.running)
			after_clone_done("the app exited before it acknowledged");
		if (hook.pending && pfd[4].revents) {
			uint64_t expirations;
			if (read(hook.timer_fd, &expirations, sizeof(expirations)) > 0)
				after_clone_done("the app did not acknowledge within timeout_ms");
		}
		if (pfd[2].fd >= 0 && pfd[2].revents)
			ctl_service(pfd[2].revents);
		if (identity.ready)
			start_after_identity();
		if (!app_state.running && !identity.waiting)
			app_gone();
	}
}

int main(void)
{
	struct params params;
	struct app app;

	int dev_err = mount_dev();
	setup_console_fds();
	marker("INIT version=%d", INIT_VERSION);
	if (dev_err)
		warnmsg("mount /dev: %s", strerror(dev_err));

	if (!is_mountpoint("/proc")) {
		int err = mount_at("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
		if (err)
			fatal("mount /proc: %s", strerror(err));
	}
	/* Kept for good: params and the app's overrides point into it. */
	char *cmdline = parse_cmdline(&params);
	if (params.probe) {
		marker("PROBE-OK");
		reboot_now();
	}
	if (cmdline && params.overlay)
		setup_overlay(params.overlay);

	mount_others();
	load_modules();
	setup_network(&params);
	/* For reseed_rng, which a clone runs first thing. */
	urandom_fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	/* Before the shares, so that a share inside a volume's path stays visible. */
	mount_volumes(&params);
	mount_shares(&params);

	int sig_fd = setup_signals();
	timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (timer_fd < 0)
		fatal("timerfd_create: %s", strerror(errno));
	ctl_open();
	setup_ack_pipe();

	if (!load_app_config(&app, &params)) {
		marker("EXEC-FAILED errno=%d error=\"no app configured\"", ENOENT);
		app_state.code = 127;
		app_gone();
	}
	if (params.wait && strcmp(params.wait, "identity") == 0) {
		if (ctl.fd >= 0) {
			identity.waiting = true;
			identity.app = &app;
			ctl.announce = true;
			marker("WAITING for=identity");
			event_loop(sig_fd);
		}
		warnmsg("uigniter.wait=identity without a control channel: starting the app now");
	} else if (params.wait) {
		warnmsg("uigniter.wait: ignoring unknown '%s'", params.wait);
	}
	app_state.pid = start_app(&app);
	if (app_state.pid < 0) {
		app_state.code = 127;
		app_gone();
	}
	app_state.running = true;
	event_loop(sig_fd);
}
