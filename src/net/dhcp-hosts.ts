import { parseIpv4 } from './subnet.js'

/** One VM as the DHCP server knows it: its card's MAC and the address allocated to it. */
export interface DhcpHost {
  mac: string
  ip: string
}

/**
 * Where HostNetwork tells the VMs on the bridge to, so that a DHCP server
 * answers exactly them (DhcpServer; a test may pass its own).
 */
export interface DhcpHosts {
  /** Replaces the whole table: every VM with an address, none else. */
  setHosts(hosts: DhcpHost[]): Promise<void>
}

const MAC = /^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$/

/**
 * The table in dnsmasq's `--dhcp-hostsfile` format, one `MAC,IP,infinite`
 * per line, sorted, so that the same VMs give the same bytes. The lease is
 * infinite: an address belongs to its VM for the VM's whole life, so there
 * is nothing to renew, and a VM that outlives its daemon (they are adopted
 * later) keeps its address while no server runs.
 *
 * `leases` (address → MAC) names who holds each address in the server's
 * memory. dnsmasq forgets a lease only when it expires or is released, and
 * refuses a configured address that another MAC holds ("not using configured
 * address ... because it is leased to ..."), so a VM given the address of one
 * that ended would get no answer. A line naming both MACs lets dnsmasq
 * abandon the old lease to the new one (its "one host, several MACs" form);
 * the old MAC belongs to a VM that ended, whose id, and so MAC, never returns.
 *
 * Throws on a malformed MAC or address: dnsmasq would skip that line with a
 * log entry, and the VM would go without an answer for no visible reason.
 *
 * @example
 * renderDhcpHosts([{ mac: '02:aa:bb:cc:dd:ee', ip: '10.77.0.2' }]) // '02:aa:bb:cc:dd:ee,10.77.0.2,infinite\n'
 */
export function renderDhcpHosts (hosts: DhcpHost[], leases: ReadonlyMap<string, string> = new Map()): string {
  const lines = hosts.map((h) => {
    const mac = h.mac.toLowerCase()
    if (!MAC.test(mac)) throw new TypeError(`"${h.mac}" is not a MAC address`)
    if (parseIpv4(h.ip) === undefined) throw new TypeError(`"${h.ip}" is not an IPv4 address`)
    const holder = leases.get(h.ip)?.toLowerCase()
    const macs = holder !== undefined && holder !== mac && MAC.test(holder) ? `${mac},${holder}` : mac
    return { key: parseIpv4(h.ip) ?? 0, line: `${macs},${h.ip},infinite` }
  })
  lines.sort((a, b) => a.key - b.key || a.line.localeCompare(b.line))
  return lines.map((l) => `${l.line}\n`).join('')
}
