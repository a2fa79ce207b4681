import { createHash } from 'node:crypto'

/**
 * The MAC address of a VM's network card, derived from its id: stable across
 * daemon restarts and re-adoption (the guest keeps its neighbours' ARP entries
 * valid), and different for every clone of a snapshot. The first octet `02`
 * marks it locally administered and unicast, so it can never equal a vendor's
 * burned-in address.
 *
 * @example
 * macForVm('web-1') // '02:xx:xx:xx:xx:xx', the same on every call
 */
export function macForVm (id: string): string {
  const digest = createHash('sha256').update(`uigniter-vm:${id}`).digest()
  const octets = ['02']
  for (let i = 0; i < 5; i++) octets.push((digest[i] ?? 0).toString(16).padStart(2, '0'))
  return octets.join(':')
}
