import { writeFile } from 'node:fs/promises'
import { UigniterError, hasErrno } from '../core/errors.js'
import { macForVm } from '../core/mac-address.js'
import { ipJson, runNetTool, type IpLink } from './net-tool.js'
import { Subnet } from './subnet.js'

/** The bridge uigniter's VMs are plugged into unless configured otherwise. */
export const DEFAULT_BRIDGE = 'uigniter0'

/** Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no slash, space or colon. */
export const INTERFACE_NAME = /^[A-Za-z0-9_.-]{1,15}$/

const NO_DEVICE = /does not exist|Cannot find device/

/**
 * Makes sure bridge `name` exists, carries the subnet's gateway address and is
 * up; does nothing that is already done, so it is safe at every daemon start.
 * Throws UIG_ERR_NET_BRIDGE_CONFLICT when a device of that name is not a
 * bridge or has another IPv4 address, and UIG_ERR_NET_SUBNET_CONFLICT when
 * another interface has an address in the subnet.
 *
 * @example
 * await ensureBridge({ name: 'uigniter0', subnet: Subnet.parseForVms('10.77.0.0/24') })
 */
export async function ensureBridge (options: { name: string, subnet: Subnet }): Promise<void> {
  const { name, subnet } = options
  if (!INTERFACE_NAME.test(name)) {
    throw new UigniterError('UIG_ERR_CONFIG_INVALID', `bridge name "${name}" is not a valid interface name (1 to 15 letters, digits, "_", "-" or ".")`)
  }
  const links = await ipJson<IpLink>(['-d', 'addr', 'show'])
  assertNoSubnetConflict(name, subnet, links ?? [])

  let link = links?.find((l) => l.ifname === name)
  if (link === undefined) {
    // A fixed address: a bridge otherwise takes the lowest MAC of its ports,
    // so it would change as taps come and go and the VMs' ARP caches go stale.
    // Any stable, locally administered address will do; this one is hashed from the name.
    await runNetTool('ip', ['link', 'add', 'name', name, 'address', macForVm(`bridge:${name}`), 'type', 'bridge'],
      { tolerate: /File exists/ })
    link = (await ipJson<IpLink>(['-d', 'addr', 'show', 'dev', name]))?.[0]
    if (link === undefined) throw new UigniterError('UIG_ERR_NET_SETUP_FAILED', `bridge ${name} vanished right after it was created`)
  }
  if (link.linkinfo?.info_kind !== 'bridge') {
    throw new UigniterError('UIG_ERR_NET_BRIDGE_CONFLICT',
      `a device named ${name} exists but is a ${link.linkinfo?.info_kind ?? 'plain'} device, not a bridge; ` +
      `delete it (ip link del ${name}) or configure another network.bridge`)
  }

  const v4 = (link.addr_info ?? []).filter((a) => a.family === 'inet')
  const others = v4.filter((a) => a.local !== subnet.gateway || a.prefixlen !== subnet.prefix)
  if (others.length > 0) {
    const has = others.map((a) => `${a.local}/${a.prefixlen}`).join(', ')
    throw new UigniterError('UIG_ERR_NET_BRIDGE_CONFLICT',
      `bridge ${name} has address ${has} but network.subnet ${subnet.cidr} wants ${subnet.gatewayCidr}; ` +
      `configure network.subnet to match, or remove the bridge (ip link del ${name}) so uigniter recreates it`)
  }
  if (v4.length === 0) {
    await runNetTool('ip', ['addr', 'add', subnet.gatewayCidr, 'brd', subnet.broadcast, 'dev', name], { tolerate: /File exists/ })
  }
  await disableIpv6(name)
  if (link.flags?.includes('UP') !== true) await runNetTool('ip', ['link', 'set', 'dev', name, 'up'])
}

/** Removes bridge `name`; no-op when it does not exist. Its taps stay, detached. */
export async function deleteBridge (name: string): Promise<void> {
  await runNetTool('ip', ['link', 'del', 'dev', name], { tolerate: NO_DEVICE })
}

function assertNoSubnetConflict (bridge: string, subnet: Subnet, links: IpLink[]): void {
  for (const link of links) {
    if (link.ifname === bridge) continue
    for (const a of link.addr_info ?? []) {
      if (a.family !== 'inet') continue
      if (Subnet.containing(a.local, a.prefixlen).overlaps(subnet)) {
        throw new UigniterError('UIG_ERR_NET_SUBNET_CONFLICT',
          `network.subnet ${subnet.cidr} overlaps ${a.local}/${a.prefixlen} on ${link.ifname}; ` +
          'VMs and that network would shadow each other; configure a subnet no interface uses')
      }
    }
  }
}

/**
 * Without IPv6 on the bridge the host has no link-local address there, so
 * guests cannot reach host services listening on `::` around the IPv4 rules.
 * Guests still talk IPv6 among themselves: the bridge forwards frames below IP.
 */
async function disableIpv6 (name: string): Promise<void> {
  try {
    await writeFile(`/proc/sys/net/ipv6/conf/${name}/disable_ipv6`, '1')
  } catch (err) {
    // A kernel without IPv6 has no such file, and nothing to disable.
    if (!hasErrno(err, 'ENOENT')) throw err
  }
}
