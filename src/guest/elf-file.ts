/**
 * A small ELF reader for the image builder: it tells whether a file is an
 * x86-64 executable or shared library, which interpreter and libraries it
 * needs, and whether a kernel can be booted by PVH.
 *
 * The file is untrusted input, so it is parsed here with bounds checks on
 * every read instead of being handed to `ldd` (which may run the program) or
 * `readelf`. Only the ELF header, the program headers and the few segments
 * that matter are read, so a 100 MB binary costs a handful of small reads.
 */

import { constants as fsConstants } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'

import { UigniterError, hasErrno } from '../core/errors.js'

/** What {@link readElf} learns about an x86-64 ELF file. */
export interface ElfInfo {
  /** Always x86-64: every other machine is rejected with UIG_ERR_IMAGE_UNSUPPORTED_ELF. */
  machine: 'x86_64'
  /** `exec` for ET_EXEC, `dyn` for ET_DYN (shared libraries and PIE executables), `other` for the rest. */
  type: 'exec' | 'dyn' | 'other'
  /** The program interpreter (PT_INTERP), e.g. `/lib64/ld-linux-x86-64.so.2`; absent for static binaries. */
  interpreter?: string
  /** DT_NEEDED entries in file order. */
  needed: string[]
  /** DT_RPATH entries, split on `:`, with `$ORIGIN` left unexpanded. */
  rpath: string[]
  /** DT_RUNPATH entries, split on `:`, with `$ORIGIN` left unexpanded. */
  runpath: string[]
  /** DT_SONAME, for shared libraries that declare one. */
  soname?: string
  /** True when a PT_NOTE segment holds the Xen PHYS32_ENTRY note, so QEMU can boot the file by PVH. */
  pvhEntry: boolean
}

// ELF constants (from the System V gABI and the x86-64 psABI).
const ELF_MAGIC = Buffer.from([0x7f, 0x45, 0x4c, 0x46])
const ELFCLASS32 = 1
const ELFCLASS64 = 2
const ELFDATA2LSB = 1
const ELFDATA2MSB = 2
const ET_EXEC = 2
const ET_DYN = 3
const EM_X86_64 = 62
const PT_LOAD = 1
const PT_DYNAMIC = 2
const PT_INTERP = 3
const PT_NOTE = 4
const DT_NULL = 0n
const DT_NEEDED = 1n
const DT_STRTAB = 5n
const DT_STRSZ = 10n
const DT_SONAME = 14n
const DT_RPATH = 15n
const DT_RUNPATH = 29n
const XEN_ELFNOTE_PHYS32_ENTRY = 18

const ELF64_EHDR_SIZE = 64
const ELF64_PHDR_SIZE = 56
const ELF64_DYN_SIZE = 16

// Caps on what a hostile file can make us allocate. The kernel itself refuses
// an interpreter path longer than PATH_MAX; real dynamic sections, string
// tables and note segments are a few KiB, so these limits are generous.
const PATH_MAX = 4096
// binfmt_elf refuses a program header table larger than this, so no file
// the kernel would run (or ld.so would load) has more.
const MAX_PHDR_TABLE_BYTES = 65536
const MAX_DYNAMIC_BYTES = 1 << 20
const MAX_STRTAB_BYTES = 16 << 20
const MAX_NOTE_BYTES = 1 << 20

// Names for the machines people are likely to hand us by mistake, so the
// error says "AArch64" rather than "machine 183".
const MACHINE_NAMES: ReadonlyMap<number, string> = new Map([
  [2, 'SPARC'],
  [3, 'x86 (i386)'],
  [8, 'MIPS'],
  [20, 'PowerPC'],
  [21, 'PowerPC64'],
  [22, 'S/390'],
  [40, 'ARM'],
  [43, 'SPARC64'],
  [50, 'IA-64'],
  [62, 'x86-64'],
  [183, 'AArch64'],
  [243, 'RISC-V'],
  [258, 'LoongArch']
])

interface ProgramHeader {
  type: number
  offset: number
  /** bigint: kernels are linked at 0xffffffff8..., beyond Number's safe range. */
  vaddr: bigint
  filesz: number
  align: number
}

/**
 * Reads the ELF header, program headers, interpreter, dynamic section and
 * notes of an x86-64 ELF file.
 *
 * @param path - the file to read; it is treated as untrusted input.
 * @returns what the image builder needs to know about the file.
 * @throws UigniterError UIG_ERR_IMAGE_PATH_NOT_FOUND when the file does not exist,
 *   UIG_ERR_IMAGE_PATH_UNREADABLE when it cannot be read (permission, directory,
 *   not a regular file), UIG_ERR_IMAGE_NOT_ELF when it is not an ELF file or its
 *   headers are truncated or malformed, UIG_ERR_IMAGE_UNSUPPORTED_ELF when it is
 *   a valid ELF file for another class, byte order or machine.
 */
export async function readElf (path: string): Promise<ElfInfo> {
  const { handle, size } = await openForReading(path)
  try {
    return await new ElfParser(path, handle, size).parse()
  } finally {
    await handle.close()
  }
}

/**
 * Tells whether a file is an x86 Linux boot image (bzImage): the boot
 * protocol puts the "HdrS" magic at offset 0x202 of the setup header.
 *
 * @param path - the kernel file to check.
 * @returns true for a bzImage, false for anything else (including short files).
 * @throws UigniterError UIG_ERR_IMAGE_PATH_NOT_FOUND or UIG_ERR_IMAGE_PATH_UNREADABLE
 *   when the file cannot be opened.
 */
export async function isBzImage (path: string): Promise<boolean> {
  const { handle } = await openForReading(path)
  try {
    const magic = Buffer.alloc(4)
    const { bytesRead } = await readFully(handle, path, magic, 0x202)
    return bytesRead === 4 && magic.toString('latin1') === 'HdrS'
  } finally {
    await handle.close()
  }
}

/**
 * Opens a file read-only and checks it is a regular file. O_NONBLOCK keeps a
 * FIFO given as the path from blocking a libuv thread forever in open(2); it
 * has no effect on regular files.
 */
async function openForReading (path: string): Promise<{ handle: FileHandle; size: number }> {
  let handle: FileHandle
  try {
    handle = await open(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK)
  } catch (err) {
    throw translateFsError(err, path)
  }
  let size: number
  try {
    const stats = await handle.stat()
    size = stats.size
    if (stats.isDirectory()) {
      throw new UigniterError('UIG_ERR_IMAGE_PATH_UNREADABLE', `${path} is a directory, not a file`)
    }
    if (!stats.isFile()) {
      throw new UigniterError('UIG_ERR_IMAGE_PATH_UNREADABLE', `${path} is not a regular file`)
    }
  } catch (err) {
    await handle.close()
    throw err
  }
  return { handle, size }
}

function translateFsError (err: unknown, path: string): unknown {
  if (hasErrno(err, 'ENOENT', 'ENOTDIR')) {
    return new UigniterError('UIG_ERR_IMAGE_PATH_NOT_FOUND', `${path} does not exist`, { cause: err })
  }
  if (hasErrno(err, 'EACCES', 'EPERM', 'EISDIR', 'ELOOP', 'EIO')) {
    const reason = err instanceof Error ? err.message : String(err)
    return new UigniterError('UIG_ERR_IMAGE_PATH_UNREADABLE', `${path} cannot be read: ${reason}`, { cause: err })
  }
  return err
}

/** Reads until `buffer` is full or the file ends; a short read is not an error here. */
async function readFully (handle: FileHandle, path: string, buffer: Buffer, position: number): Promise<{ bytesRead: number }> {
  let total = 0
  try {
    while (total < buffer.length) {
      const { bytesRead } = await handle.read(buffer, total, buffer.length - total, position + total)
      if (bytesRead === 0) break
      total += bytesRead
    }
  } catch (err) {
    throw translateFsError(err, path)
  }
  return { bytesRead: total }
}

class ElfParser {
  constructor (
    private readonly path: string,
    private readonly handle: FileHandle,
    private readonly size: number
  ) {}

  async parse (): Promise<ElfInfo> {
    const ehdr = Buffer.alloc(ELF64_EHDR_SIZE)
    const { bytesRead } = await readFully(this.handle, this.path, ehdr, 0)
    const header = ehdr.subarray(0, bytesRead)
    this.checkIdent(header)
    if (header.length < ELF64_EHDR_SIZE) throw this.notElf('the ELF header is truncated')

    const typeCode = header.readUInt16LE(16)
    const phoff = this.u64(header, 32, 'e_phoff')
    const phentsize = header.readUInt16LE(54)
    const phnum = header.readUInt16LE(56)
    // Sections are not needed at run time, but the section header table sits
    // at the very end of a linked file, so its bounds are the cheapest check
    // that a copy or download was not cut short.
    const shoff = this.u64(header, 40, 'e_shoff')
    const shentsize = header.readUInt16LE(58)
    const shnum = header.readUInt16LE(60)
    if (shnum > 0 && shoff + shentsize * shnum > this.size) {
      throw this.notElf('its section header table ends past the end of the file (truncated?)')
    }

    const phdrs = await this.readProgramHeaders(phoff, phentsize, phnum)

    const info: ElfInfo = {
      machine: 'x86_64',
      type: typeCode === ET_EXEC ? 'exec' : typeCode === ET_DYN ? 'dyn' : 'other',
      needed: [],
      rpath: [],
      runpath: [],
      pvhEntry: false
    }

    const interp = phdrs.find((p) => p.type === PT_INTERP)
    if (interp !== undefined) info.interpreter = await this.readInterpreter(interp)

    const dynamic = phdrs.find((p) => p.type === PT_DYNAMIC)
    if (dynamic !== undefined) await this.readDynamic(dynamic, phdrs, info)

    for (const note of phdrs.filter((p) => p.type === PT_NOTE)) {
      if (await this.hasPvhNote(note)) {
        info.pvhEntry = true
        break
      }
    }
    return info
  }

  /** Tells apart "not ELF at all" from "ELF, but not the kind we run". */
  private checkIdent (header: Buffer): void {
    if (header.length < ELF_MAGIC.length || !header.subarray(0, 4).equals(ELF_MAGIC)) {
      throw this.notElf('it does not start with the ELF magic number')
    }
    // e_machine sits at offset 18 in both ELF classes, so 20 bytes are enough
    // to name what an unsupported file is.
    if (header.length < 20) throw this.notElf('the ELF header is truncated')
    const elfClass = header[4]
    const data = header[5]
    if (elfClass !== ELFCLASS32 && elfClass !== ELFCLASS64) throw this.notElf(`its ELF class byte is invalid (${String(elfClass)})`)
    if (data !== ELFDATA2LSB && data !== ELFDATA2MSB) throw this.notElf(`its ELF data encoding byte is invalid (${String(data)})`)

    const machine = data === ELFDATA2LSB ? header.readUInt16LE(18) : header.readUInt16BE(18)
    if (elfClass === ELFCLASS64 && data === ELFDATA2LSB && machine === EM_X86_64) return

    const what = [
      elfClass === ELFCLASS32 ? '32-bit' : '64-bit',
      data === ELFDATA2LSB ? 'little-endian' : 'big-endian',
      MACHINE_NAMES.get(machine) ?? `machine ${machine}`
    ].join(' ')
    throw new UigniterError('UIG_ERR_IMAGE_UNSUPPORTED_ELF',
      `${this.path} is a ${what} ELF file; uigniter runs 64-bit little-endian x86-64 programs only`)
  }

  private async readProgramHeaders (phoff: number, phentsize: number, phnum: number): Promise<ProgramHeader[]> {
    if (phnum === 0) return []
    // Like the kernel: the entry size must be exactly Elf64_Phdr, and the
    // table small. This also covers PN_XNUM (0xffff), which Linux never loads.
    if (phentsize !== ELF64_PHDR_SIZE) throw this.notElf(`its program header size is ${phentsize}, not ${ELF64_PHDR_SIZE}`)
    if (phnum * phentsize > MAX_PHDR_TABLE_BYTES) throw this.notElf(`it claims ${phnum} program headers`)
    const table = await this.readRange(phoff, phentsize * phnum, 'the program headers')
    const phdrs: ProgramHeader[] = []
    for (let i = 0; i < phnum; i++) {
      const base = i * phentsize
      const phdr: ProgramHeader = {
        type: table.readUInt32LE(base),
        offset: this.u64(table, base + 8, 'p_offset'),
        vaddr: table.readBigUInt64LE(base + 16),
        filesz: this.u64(table, base + 32, 'p_filesz'),
        align: this.u64(table, base + 48, 'p_align')
      }
      // A segment the loader would map must lie inside the file; if it does
      // not, the file was cut short (a partial download or copy).
      const mapped = phdr.type === PT_LOAD || phdr.type === PT_INTERP || phdr.type === PT_DYNAMIC || phdr.type === PT_NOTE
      if (mapped && phdr.filesz > 0 && phdr.offset + phdr.filesz > this.size) {
        throw this.notElf(`segment ${i} ends past the end of the file (truncated?)`)
      }
      phdrs.push(phdr)
    }
    return phdrs
  }

  private async readInterpreter (interp: ProgramHeader): Promise<string> {
    // Same limits as the kernel's binfmt_elf, which refuses to exec otherwise.
    if (interp.filesz < 2 || interp.filesz > PATH_MAX) throw this.notElf(`its PT_INTERP size ${interp.filesz} is invalid`)
    const bytes = await this.readRange(interp.offset, interp.filesz, 'PT_INTERP')
    const end = bytes.indexOf(0)
    if (end <= 0) throw this.notElf('its PT_INTERP is not a NUL-terminated path')
    return bytes.toString('utf8', 0, end)
  }

  private async readDynamic (dynamic: ProgramHeader, phdrs: ProgramHeader[], info: ElfInfo): Promise<void> {
    if (dynamic.filesz > MAX_DYNAMIC_BYTES) throw this.notElf(`its dynamic section is ${dynamic.filesz} bytes`)
    const table = await this.readRange(dynamic.offset, dynamic.filesz, 'the dynamic section')

    // First pass: collect tags; string offsets can only be resolved once
    // DT_STRTAB is known, and it may come after the entries that use it.
    let strtabAddr: bigint | undefined
    let strsz: number | undefined
    const strings: Array<{ tag: bigint; offset: number }> = []
    for (let pos = 0; pos + ELF64_DYN_SIZE <= table.length; pos += ELF64_DYN_SIZE) {
      const tag = table.readBigInt64LE(pos)
      if (tag === DT_NULL) break
      const value = table.readBigUInt64LE(pos + 8)
      if (tag === DT_STRTAB) strtabAddr = value
      else if (tag === DT_STRSZ) strsz = this.toNumber(value, 'DT_STRSZ')
      else if (tag === DT_NEEDED || tag === DT_SONAME || tag === DT_RPATH || tag === DT_RUNPATH) {
        strings.push({ tag, offset: this.toNumber(value, 'a dynamic string offset') })
      }
    }
    if (strings.length === 0) return
    if (strtabAddr === undefined) throw this.notElf('its dynamic section has string entries but no DT_STRTAB')

    const strtab = await this.readStringTable(strtabAddr, strsz, phdrs)
    for (const { tag, offset } of strings) {
      const value = this.stringAt(strtab, offset)
      if (tag === DT_NEEDED) info.needed.push(value)
      else if (tag === DT_SONAME) info.soname = value
      else if (tag === DT_RPATH) info.rpath.push(...splitPathList(value))
      else info.runpath.push(...splitPathList(value))
    }
  }

  /** DT_STRTAB holds a virtual address; the PT_LOAD segment containing it maps it back to a file offset. */
  private async readStringTable (addr: bigint, strsz: number | undefined, phdrs: ProgramHeader[]): Promise<Buffer> {
    const load = phdrs.find((p) => p.type === PT_LOAD && addr >= p.vaddr && addr < p.vaddr + BigInt(p.filesz))
    if (load === undefined) throw this.notElf('its DT_STRTAB address is not inside any PT_LOAD segment')
    const offset = load.offset + Number(addr - load.vaddr)
    const available = load.offset + load.filesz - offset
    const length = Math.min(strsz ?? available, available, MAX_STRTAB_BYTES)
    return await this.readRange(offset, length, 'the dynamic string table')
  }

  private stringAt (strtab: Buffer, offset: number): string {
    if (offset >= strtab.length) throw this.notElf(`a dynamic string offset (${offset}) is outside the string table`)
    const end = strtab.indexOf(0, offset)
    if (end < 0) throw this.notElf('a dynamic string is not NUL-terminated')
    return strtab.toString('utf8', offset, end)
  }

  /**
   * Walks the notes of one PT_NOTE segment. Each note is namesz, descsz, type,
   * then name and desc, each padded to the segment alignment (4, or 8 for
   * segments aligned to 8 such as GNU property notes).
   */
  private async hasPvhNote (note: ProgramHeader): Promise<boolean> {
    const bytes = await this.readRange(note.offset, Math.min(note.filesz, MAX_NOTE_BYTES), 'a note segment')
    const align = note.align === 8 ? 8 : 4
    const pad = (n: number): number => Math.ceil(n / align) * align
    let pos = 0
    while (pos + 12 <= bytes.length) {
      const namesz = bytes.readUInt32LE(pos)
      const descsz = bytes.readUInt32LE(pos + 4)
      const type = bytes.readUInt32LE(pos + 8)
      const nameStart = pos + 12
      const descStart = nameStart + pad(namesz)
      const next = descStart + pad(descsz)
      // A note running off the end is malformed; nothing after it can be
      // trusted, but that does not make the whole file unusable.
      if (next > bytes.length) return false
      if (type === XEN_ELFNOTE_PHYS32_ENTRY && namesz === 4 && bytes.toString('latin1', nameStart, nameStart + 4) === 'Xen\0') {
        return true
      }
      pos = next
    }
    return false
  }

  /** Reads exactly `length` bytes at `offset`, or reports the file as truncated. */
  private async readRange (offset: number, length: number, what: string): Promise<Buffer> {
    if (offset + length > this.size) throw this.notElf(`${what} ends past the end of the file (truncated?)`)
    const buffer = Buffer.alloc(length)
    const { bytesRead } = await readFully(this.handle, this.path, buffer, offset)
    if (bytesRead < length) throw this.notElf(`${what} ends past the end of the file (truncated?)`)
    return buffer
  }

  private u64 (buffer: Buffer, offset: number, field: string): number {
    return this.toNumber(buffer.readBigUInt64LE(offset), field)
  }

  /** Offsets and sizes beyond 2^53 cannot describe a real file; refuse them rather than lose precision. */
  private toNumber (value: bigint, field: string): number {
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw this.notElf(`its ${field} value is out of range`)
    return Number(value)
  }

  private notElf (reason: string): UigniterError {
    return new UigniterError('UIG_ERR_IMAGE_NOT_ELF', `${this.path} is not a valid ELF file: ${reason}`)
  }
}

/** Splits an RPATH/RUNPATH list; empty entries are dropped because they would mean "the current directory" at run time. */
function splitPathList (value: string): string[] {
  return value.split(':').filter((entry) => entry !== '')
}
