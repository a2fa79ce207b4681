import { chmod, copyFile, mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { run } from '../../src/core/exec.js'

/**
 * Guests made of Debian's busybox-static, for the tests of DHCP and of a
 * unikernel's command line: a rootfs image whose app is a DHCP client, and a
 * bring-your-own "unikernel" (our own guest kernel with a squashfs disk
 * holding busybox and a shell script as PID 1) that reads back its
 * command line, takes its address by DHCP or from the command line, and
 * can serve HTTP. Each prints `UIG-...` lines on the console.
 */

export const BUSYBOX = '/bin/busybox'

/** udhcpc's script: prints what the server handed out on its "bound" event. */
const LEASE_SCRIPT = `#!/bin/busybox sh
if [ "$1" = bound ]; then echo "UIG-LEASE ip=$ip mask=$subnet router=$router dns=$dns"; fi
exit 0
`

/** The app of the rootfs image: forgets the address our init gave eth0 and asks DHCP for it. */
const DHCP_APP = `#!/bin/busybox sh
export PATH=/bin
busybox ip addr flush dev eth0
busybox ip link set eth0 up
busybox udhcpc -i eth0 -f -q -n -t 6 -T 1 -s /lease.sh || echo "UIG-LEASE none"
echo UIG-DONE
`

/**
 * PID 1 of the unikernel disk. The kernel hands unknown name=value
 * parameters (uig_*) to init as environment variables, so the placeholders
 * filled on the command line arrive as $uig_ip and so on. uig_mode picks
 * what it does: probe (print the command line, then DHCP) or serve (the
 * address from the command line, and an HTTP server on 8080).
 */
const UNIKERNEL_INIT = `#!/bin/busybox sh
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t tmpfs tmpfs /tmp
echo "UIG-CMDLINE $(busybox cat /proc/cmdline)"
echo "UIG-ENV ip=$uig_ip prefix=$uig_prefix mask=$uig_mask gw=$uig_gw dns=$uig_dns host=$uig_host lit=$uig_lit"
busybox ip link set eth0 up
if [ "$uig_mode" = serve ]; then
  busybox ip addr add "$uig_ip/$uig_prefix" dev eth0
  busybox ip route add default via "$uig_gw"
  busybox mkdir -p /tmp/www
  echo "unikernel $uig_host at $uig_ip" > /tmp/www/index.html
  echo UIG-SERVING
  exec busybox httpd -f -p 8080 -h /tmp/www
fi
busybox udhcpc -i eth0 -f -q -n -t 6 -T 1 -s /lease.sh || echo "UIG-LEASE none"
echo UIG-DONE
busybox reboot -f
`

/** The unikernel's command line: our kernel's own parameters, then the placeholders it reads back. */
export function unikernelCmdline (mode: 'probe' | 'serve'): string {
  return 'console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda ro rootfstype=squashfs init=/init ' +
    `uig_mode=${mode} uig_ip={ip} uig_prefix={prefix} uig_mask={netmask} uig_gw={gateway} uig_dns={dns} uig_host={hostname} uig_lit={{x}}`
}

/** Busybox and the lease script; `mountPoints` for a root without our init, which makes them itself. */
async function busyboxTree (dir: string, mountPoints: boolean): Promise<void> {
  for (const sub of ['bin', ...(mountPoints ? ['proc', 'sys', 'dev', 'tmp'] : [])]) await mkdir(join(dir, sub), { recursive: true })
  await copyFile(BUSYBOX, join(dir, 'bin/busybox'))
  await chmod(join(dir, 'bin/busybox'), 0o755)
  await writeFile(join(dir, 'lease.sh'), LEASE_SCRIPT, { mode: 0o755 })
}

/** A directory for a `rootfs` source whose entrypoint /dhcp.sh runs udhcpc. */
export async function dhcpRootfs (dir: string): Promise<{ dir: string, entrypoint: string }> {
  await busyboxTree(dir, false)
  await writeFile(join(dir, 'dhcp.sh'), DHCP_APP, { mode: 0o755 })
  return { dir, entrypoint: '/dhcp.sh' }
}

/** A squashfs disk with busybox and the init above, for a `unikernel` source with our kernel. */
export async function unikernelDisk (work: string): Promise<string> {
  const tree = join(work, 'unikernel-tree')
  await busyboxTree(tree, true)
  await writeFile(join(tree, 'init'), UNIKERNEL_INIT, { mode: 0o755 })
  const disk = join(work, 'unikernel.squashfs')
  await run('mksquashfs', [tree, disk, '-comp', 'zstd', '-noappend', '-all-root', '-no-progress', '-quiet'])
  return disk
}

/** The `key=value` pairs of the last console line that starts with `marker`. */
export function consoleFields (console: string, marker: string): Record<string, string> | undefined {
  const line = console.split('\n').filter((l) => l.startsWith(`${marker} `)).pop()
  if (line === undefined) return undefined
  return Object.fromEntries(line.slice(marker.length + 1).trim().split(/\s+/).map((kv) => {
    const eq = kv.indexOf('=')
    return eq === -1 ? [kv, ''] : [kv.slice(0, eq), kv.slice(eq + 1)]
  }))
}
