import { createHash } from 'node:crypto'
import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { UigniterError } from '../../core/errors.js'

/**
 * One change to Debian's linux-source-6.1 before our build: `find`, which
 * must occur exactly once in `file`, becomes `replace`. Exact text rather
 * than a patch file, so that the build needs no `patch` tool and fails
 * loudly, naming the file, when a new linux-source no longer matches.
 */
export interface SourceEdit {
  /** Relative to the source tree's root. */
  file: string
  find: string
  replace: string
}

/** Every edit, in order; each says why in the comment it adds to the source. */
export const SOURCE_EDITS: readonly SourceEdit[] = [
  {
    // Measured here (docs/guest.md, "Boot time"): about 150 ms of a 1.1 s boot to init.
    file: 'arch/x86/mm/init.c',
    find: `		free_reserved_area((void *)begin, (void *)end,
				   POISON_FREE_INITMEM, what);
`,
    replace: `		/*
		 * uigniter: freed init memory is not poisoned. Under QEMU's
		 * TCG every store into a page that still holds translated code
		 * takes the self-modifying-code slow path, and .init.text has
		 * just run: filling it with 0xcc took about 150 ms per boot.
		 */
		free_reserved_area((void *)begin, (void *)end, -1, what);
`
  },
  {
    // With it, calibrate_APIC_clock() returns at once ("lapic timer already calibrated"); command-line.ts passes it under TCG.
    file: 'arch/x86/kernel/apic/apic.c',
    find: `early_param("nolapic_timer", parse_nolapic_timer);
`,
    replace: `early_param("nolapic_timer", parse_nolapic_timer);

/*
 * uigniter: "uigniter.apic_timer_hz=N" names the local APIC timer's input
 * clock (QEMU's is 1 GHz), so that calibrate_APIC_clock() need not measure
 * it: its two loops of HZ/10 ticks each take over 200 ms of a boot under
 * TCG, which has no TSC-deadline timer to skip them.
 */
static int __init parse_uigniter_apic_timer_hz(char *arg)
{
	unsigned long hz;

	if (!arg || kstrtoul(arg, 10, &hz) || hz / HZ == 0 || hz / HZ > UINT_MAX)
		return -EINVAL;
	lapic_timer_period = hz / HZ;
	return 0;
}
early_param("uigniter.apic_timer_hz", parse_uigniter_apic_timer_hz);
`
  }
]

/** Changes whenever an edit does: part of the kernel cache key. */
export function sourceEditsFingerprint (edits: readonly SourceEdit[] = SOURCE_EDITS): string {
  return createHash('sha256').update(JSON.stringify(edits)).digest('hex')
}

/** Applies the edits to the unpacked tree in `srcDir`; UIG_ERR_KERNEL_BUILD_FAILED when one does not match exactly once. */
export async function applySourceEdits (srcDir: string, edits: readonly SourceEdit[] = SOURCE_EDITS): Promise<void> {
  for (const edit of edits) {
    const path = join(srcDir, edit.file)
    const text = await readFile(path, 'utf8')
    const at = text.indexOf(edit.find)
    if (at < 0 || text.indexOf(edit.find, at + 1) >= 0) {
      throw new UigniterError('UIG_ERR_KERNEL_BUILD_FAILED',
        `kernel build failed while editing the source: ${edit.file} holds the text to replace ${at < 0 ? 'nowhere' : 'more than once'} ` +
        '(a linux-source-6.1 that differs from the one src/guest/kernel/source-edits.ts was written for); update the edit')
    }
    await writeFile(path, text.slice(0, at) + edit.replace + text.slice(at + edit.find.length))
  }
}
