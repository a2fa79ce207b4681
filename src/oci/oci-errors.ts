import { UigniterError, type ErrorCode } from '../core/errors.js'

/** Why an OCI pull failed; each reason has its code (a digest mismatch is the image store's own). */
export type OciFailure = 'reference-invalid' | 'auth' | 'manifest-unsupported' | 'digest-mismatch' | 'registry' | 'not-found'

const failureCodes: Record<OciFailure, ErrorCode> = {
  'reference-invalid': 'UIG_ERR_OCI_REFERENCE_INVALID',
  auth: 'UIG_ERR_OCI_AUTH',
  'manifest-unsupported': 'UIG_ERR_OCI_MANIFEST_UNSUPPORTED',
  'digest-mismatch': 'UIG_ERR_IMAGE_DIGEST_MISMATCH',
  registry: 'UIG_ERR_OCI_REGISTRY',
  'not-found': 'UIG_ERR_OCI_NOT_FOUND'
}

export class OciError extends UigniterError {
  readonly reason: OciFailure
  /** The HTTP status the registry answered with, when one did. */
  readonly httpStatus: number | undefined

  constructor (reason: OciFailure, message: string, options?: { cause?: unknown, httpStatus?: number }) {
    super(failureCodes[reason], message, options)
    this.reason = reason
    this.httpStatus = options?.httpStatus
  }
}

export function ociError (reason: OciFailure, message: string, options?: { cause?: unknown, httpStatus?: number }): OciError {
  return new OciError(reason, message, options)
}
