/** Debian's qemu-system-x86 package; found on the PATH. */
export const QEMU_BINARY = 'qemu-system-x86_64'
