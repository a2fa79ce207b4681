import { UigniterError } from './errors.js'

/**
 * Placeholders in a bring-your-own unikernel's command line, filled per VM at
 * launch, so that a unikernel that takes its address on its command line
 * (OSv: `--ip=eth0,{ip},{netmask} --defaultgw={gateway} --nameserver={dns}`)
 * gets the one uigniter allocated. `{{` and `}}` stand for literal braces.
 */
export const CMDLINE_PLACEHOLDERS = ['ip', 'prefix', 'netmask', 'gateway', 'dns', 'hostname'] as const
export type CmdlinePlaceholder = typeof CMDLINE_PLACEHOLDERS[number]

/** A value per placeholder; one left out has no value for this VM (e.g. `{ip}` without a network). */
export type CmdlineValues = Partial<Record<CmdlinePlaceholder, string>>

type Piece = { text: string } | { placeholder: CmdlinePlaceholder }

const KNOWN = CMDLINE_PLACEHOLDERS.map((p) => `{${p}}`).join(', ')

const refuse = (message: string): UigniterError => new UigniterError('UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER',
  `${message}; the placeholders are ${KNOWN}, and {{ and }} write a literal brace`)

/**
 * Splits a command line into text and placeholders. Throws
 * UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER for an unknown placeholder or a lone
 * brace, naming it and where it is: a typo such as `{ipaddr}` must not reach
 * the guest as text, where it would fail far from its cause.
 *
 * @example
 * parseCmdline('--ip=eth0,{ip},{netmask} x={{y}}')
 * // [{ text: '--ip=eth0,' }, { placeholder: 'ip' }, { text: ',' }, { placeholder: 'netmask' }, { text: ' x={y}' }]
 */
export function parseCmdline (cmdline: string): Piece[] {
  const pieces: Piece[] = []
  let text = ''
  let i = 0
  while (i < cmdline.length) {
    const c = cmdline[i]
    if ((c === '{' || c === '}') && cmdline[i + 1] === c) {
      text += c
      i += 2
      continue
    }
    if (c === '}') throw refuse(`the command line has a lone "}" at character ${i + 1}`)
    if (c !== '{') {
      text += c
      i++
      continue
    }
    const end = cmdline.indexOf('}', i + 1)
    const name = end === -1 ? '' : cmdline.slice(i + 1, end)
    if (end === -1 || !/^[A-Za-z0-9_]*$/.test(name)) throw refuse(`the command line has a "{" at character ${i + 1} that opens no placeholder`)
    if (!(CMDLINE_PLACEHOLDERS as readonly string[]).includes(name)) throw refuse(`unknown placeholder {${name}} at character ${i + 1} of the command line`)
    if (text !== '') pieces.push({ text })
    text = ''
    pieces.push({ placeholder: name as CmdlinePlaceholder })
    i = end + 1
  }
  if (text !== '') pieces.push({ text })
  return pieces
}

/** The placeholders a command line uses, each once, in order of first use. */
export function cmdlinePlaceholders (cmdline: string): CmdlinePlaceholder[] {
  const used: CmdlinePlaceholder[] = []
  for (const piece of parseCmdline(cmdline)) {
    if ('placeholder' in piece && !used.includes(piece.placeholder)) used.push(piece.placeholder)
  }
  return used
}

/**
 * Fills the placeholders. Throws UIG_ERR_VM_CMDLINE_INVALID when the command
 * line uses one that has no value for this VM, rather than boot a guest with
 * an empty address.
 */
export function substituteCmdline (cmdline: string, values: CmdlineValues): string {
  return parseCmdline(cmdline).map((piece) => {
    if ('text' in piece) return piece.text
    const value = values[piece.placeholder]
    if (value === undefined || value === '') {
      throw new UigniterError('UIG_ERR_VM_CMDLINE_INVALID', `the image's command line uses {${piece.placeholder}}, which has no value for this VM: ${MISSING[piece.placeholder]}`)
    }
    return value
  }).join('')
}

const MISSING: Record<CmdlinePlaceholder, string> = {
  ip: 'it has no network (start it with network bridge or user)',
  prefix: 'it has no network (start it with network bridge or user)',
  netmask: 'it has no network (start it with network bridge or user)',
  gateway: 'its network has no gateway',
  dns: 'the host has no nameserver a guest can reach (a loopback resolver in /etc/resolv.conf is not one); drop {dns} or give the host a reachable nameserver',
  hostname: 'it has no hostname'
}

/**
 * The values of one VM: its address and prefix, the netmask of that prefix,
 * its gateway, its first nameserver (OSv's --nameserver takes one) and its
 * hostname. Anything absent stays absent.
 */
export function cmdlineValues (network: { address: string, prefix: number, gateway?: string, dns?: string[] } | undefined, hostname: string | undefined): CmdlineValues {
  const values: CmdlineValues = {}
  if (network !== undefined) {
    values.ip = network.address
    values.prefix = String(network.prefix)
    values.netmask = netmaskOf(network.prefix)
    if (network.gateway !== undefined) values.gateway = network.gateway
    const dns = network.dns?.[0]
    if (dns !== undefined) values.dns = dns
  }
  if (hostname !== undefined) values.hostname = hostname
  return values
}

/** 24 → 255.255.255.0. */
export function netmaskOf (prefix: number): string {
  if (!Number.isInteger(prefix) || prefix < 0 || prefix > 32) throw new RangeError(`${prefix} is not an IPv4 prefix length`)
  const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0
  return [mask >>> 24, (mask >>> 16) & 255, (mask >>> 8) & 255, mask & 255].join('.')
}
