import { spawn } from 'node:child_process'
import { UigniterError, hasErrno } from '../core/errors.js'

/**
 * Sets an xattr on an open file. Node has no setxattr and Debian's `attr`
 * (setfattr) is not a setup package, but python3 is: it gets the file as its
 * fd 3 and calls fsetxattr on it, so no path is resolved again (a symlink
 * swapped in meanwhile cannot redirect the write). Only files that carry a
 * capability come here (a handful per image), so one process each is cheap.
 */
export async function setXattrOnFd (fd: number, name: string, value: Buffer): Promise<void> {
  const script = 'import os, sys\nos.setxattr(3, sys.argv[1], bytes.fromhex(sys.argv[2]))\n'
  await new Promise<void>((resolve, reject) => {
    const child = spawn('python3', ['-c', script, name, value.toString('hex')], { stdio: ['ignore', 'ignore', 'pipe', fd] })
    let stderr = ''
    child.stderr?.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-2000) })
    child.on('error', (err) => {
      reject(hasErrno(err, 'ENOENT')
        ? new UigniterError('UIG_ERR_HOST_MISSING_TOOL', '"python3" is not installed (it sets file capabilities of image layers); run "npm run setup" (as root)', { cause: err })
        : err)
    })
    child.on('close', (code) => {
      if (code === 0) resolve()
      else reject(new UigniterError('UIG_ERR_INTERNAL', `setting the ${name} xattr failed: ${stderr.trim().split('\n').pop() ?? ''}`))
    })
  })
}
