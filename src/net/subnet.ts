import { UigniterError } from '../core/errors.js'

/**
 * uigniter's default VM subnet: private, and apart from Docker's
 * 172.17.0.0/16 and the 192.168.x.0/24 networks home routers hand out.
 */
export const DEFAULT_SUBNET = '10.77.0.0/24'

/** RFC 1918 ranges: VM addresses must never be routable on the internet. */
const PRIVATE_RANGES: ReadonlyArray<readonly [number, number]> = [
  [0x0a000000, 8], // 10.0.0.0/8
  [0xac100000, 12], // 172.16.0.0/12
  [0xc0a80000, 16] // 192.168.0.0/16
]

/** A /16 holds 65,534 VMs, more than one host runs; a /29 (5 VMs) is the smallest useful network. */
const MIN_PREFIX = 16
const MAX_PREFIX = 29

const invalid = (message: string): UigniterError => new UigniterError('UIG_ERR_NET_INVALID_SUBNET', message)

/** Parses a dotted-quad IPv4 address to an unsigned 32-bit number; undefined when malformed. */
export function parseIpv4 (text: string): number | undefined {
  const parts = text.split('.')
  if (parts.length !== 4) return undefined
  let value = 0
  for (const part of parts) {
    // Leading zeros are rejected: some tools read them as octal.
    if (!/^(0|[1-9][0-9]{0,2})$/.test(part)) return undefined
    const octet = Number(part)
    if (octet > 255) return undefined
    value = value * 256 + octet
  }
  return value
}

/** Formats an unsigned 32-bit number as a dotted-quad IPv4 address. */
export function formatIpv4 (value: number): string {
  return [value >>> 24, (value >>> 16) & 255, (value >>> 8) & 255, value & 255].join('.')
}

const maskOf = (prefix: number): number => prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0

/**
 * An IPv4 network in CIDR form. The first host address is the gateway (the
 * bridge's own address); the others are for VMs.
 *
 * @example
 * const subnet = Subnet.parse('10.77.0.0/24')
 * subnet.gateway // '10.77.0.1'
 * [...subnet.hosts()].length // 254, the gateway included
 */
export class Subnet {
  /** The network address, e.g. `10.77.0.0`. */
  readonly network: string
  /** The prefix length, e.g. 24. */
  readonly prefix: number
  /** The dotted netmask, e.g. `255.255.255.0`. */
  readonly netmask: string
  /** The first host address: the bridge's address and the VMs' default route. */
  readonly gateway: string
  /** The broadcast address, e.g. `10.77.0.255`. */
  readonly broadcast: string
  readonly #base: number
  readonly #mask: number

  private constructor (base: number, prefix: number) {
    this.#base = base
    this.#mask = maskOf(prefix)
    this.prefix = prefix
    this.network = formatIpv4(base)
    this.netmask = formatIpv4(this.#mask)
    this.gateway = formatIpv4(base + 1)
    this.broadcast = formatIpv4((base | ~this.#mask) >>> 0)
  }

  /**
   * Parses `a.b.c.d/n` without judging it; throws UIG_ERR_NET_INVALID_SUBNET
   * when malformed or when host bits are set (`10.77.0.5/24`), since a typo
   * there would otherwise silently shift every address.
   */
  static parse (cidr: string): Subnet {
    const match = /^([0-9.]+)\/([0-9]{1,2})$/.exec(cidr.trim())
    const base = match?.[1] === undefined ? undefined : parseIpv4(match[1])
    const prefix = Number(match?.[2])
    if (base === undefined || !(prefix >= 1 && prefix <= 32)) {
      throw invalid(`"${cidr}" is not an IPv4 network in CIDR form; write it like ${DEFAULT_SUBNET}`)
    }
    const mask = maskOf(prefix)
    if (((base & mask) >>> 0) !== base) {
      throw invalid(`"${cidr}" has host bits set; did you mean ${formatIpv4((base & mask) >>> 0)}/${prefix}?`)
    }
    return new Subnet(base, prefix)
  }

  /** The network an interface address like `192.168.1.7/24` lies in. */
  static containing (ip: string, prefix: number): Subnet {
    const value = parseIpv4(ip)
    if (value === undefined || !Number.isInteger(prefix) || prefix < 0 || prefix > 32) throw invalid(`"${ip}/${prefix}" is not an IPv4 address with a prefix`)
    return new Subnet((value & maskOf(prefix)) >>> 0, prefix)
  }

  /**
   * Parses a subnet meant for VMs: it must also be private (RFC 1918) and
   * between /16 and /29. Throws UIG_ERR_NET_INVALID_SUBNET saying why.
   */
  static parseForVms (cidr: string): Subnet {
    const subnet = Subnet.parse(cidr)
    if (subnet.prefix < MIN_PREFIX || subnet.prefix > MAX_PREFIX) {
      throw invalid(`subnet ${subnet.cidr} must be between /${MIN_PREFIX} and /${MAX_PREFIX} (a /${MAX_PREFIX} holds 5 VMs, a /24 holds 253)`)
    }
    const isPrivate = PRIVATE_RANGES.some(([range, bits]) => subnet.prefix >= bits && ((subnet.#base & maskOf(bits)) >>> 0) === range)
    if (!isPrivate) {
      throw invalid(`subnet ${subnet.cidr} is not a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16); use e.g. ${DEFAULT_SUBNET}`)
    }
    return subnet
  }

  /** The network in CIDR form, e.g. `10.77.0.0/24`. */
  get cidr (): string { return `${this.network}/${this.prefix}` }

  /** The gateway with the prefix, as `ip addr add` takes it, e.g. `10.77.0.1/24`. */
  get gatewayCidr (): string { return `${this.gateway}/${this.prefix}` }

  /** How many host addresses the subnet has, the gateway included (network and broadcast excluded). */
  get hostCount (): number { return Math.max(0, 2 ** (32 - this.prefix) - 2) }

  /** Host addresses in ascending order, from the gateway to the one before broadcast. */
  * hosts (): Generator<string> {
    for (let i = 1; i <= this.hostCount; i++) yield formatIpv4(this.#base + i)
  }

  /** True when `ip` (dotted quad) lies in this network, network and broadcast addresses included. */
  contains (ip: string): boolean {
    const value = parseIpv4(ip)
    return value !== undefined && ((value & this.#mask) >>> 0) === this.#base
  }

  /** True when the two networks share at least one address. */
  overlaps (other: Subnet): boolean {
    const mask = this.prefix < other.prefix ? this.#mask : other.#mask
    return ((this.#base & mask) >>> 0) === ((other.#base & mask) >>> 0)
  }

  toString (): string { return this.cidr }
}
