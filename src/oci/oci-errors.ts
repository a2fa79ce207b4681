import { UigniterError, type ErrorCode } from '../core/errors.js'

/**
 * Why an OCI pull failed, finer than the image codes we have today. Each
 * reason maps onto an existing code until errors.ts has UIG_ERR_OCI_* codes;
 * then only this table changes, and callers that match on `reason` do not.
 */
export type OciFailure = 'reference-invalid' | 'auth' | 'manifest-unsupported' | 'digest-mismatch' | 'registry' | 'not-found'

const interimCodes: Record<OciFailure, ErrorCode> = {
  'reference-invalid': 'UIG_ERR_IMAGE_INVALID_NAME',
  auth: 'UIG_ERR_IMAGE_FETCH_FAILED',
  'manifest-unsupported': 'UIG_ERR_IMAGE_FETCH_FAILED',
  'digest-mismatch': 'UIG_ERR_IMAGE_DIGEST_MISMATCH',
  registry: 'UIG_ERR_IMAGE_FETCH_FAILED',
  'not-found': 'UIG_ERR_IMAGE_FETCH_FAILED'
}

export class OciError extends UigniterError {
  readonly reason: OciFailure
  /** The HTTP status the registry answered with, when one did. */
  readonly httpStatus: number | undefined

  constructor (reason: OciFailure, message: string, options?: { cause?: unknown, httpStatus?: number }) {
    super(interimCodes[reason], message, options)
    this.reason = reason
    this.httpStatus = options?.httpStatus
  }
}

export function ociError (reason: OciFailure, message: string, options?: { cause?: unknown, httpStatus?: number }): OciError {
  return new OciError(reason, message, options)
}
