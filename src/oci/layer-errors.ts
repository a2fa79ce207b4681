import { UigniterError, type ErrorCode } from '../core/errors.js'

/**
 * The codes a layer is refused with. The table in core/errors.ts has no OCI
 * codes yet (UIG_ERR_OCI_LAYER_UNSAFE, _INVALID, _TOO_LARGE are proposed), so
 * all three map to UIG_ERR_IMAGE_SPEC_INVALID until they exist; callers tell
 * the cases apart by `reason`, which stays the same once the codes land.
 */
export const layerErrorCodes: Record<LayerRefusal, ErrorCode> = {
  unsafe: 'UIG_ERR_IMAGE_SPEC_INVALID',
  invalid: 'UIG_ERR_IMAGE_SPEC_INVALID',
  'too-large': 'UIG_ERR_IMAGE_SPEC_INVALID'
}

export type LayerRefusal = 'unsafe' | 'invalid' | 'too-large'

export class LayerError extends UigniterError {
  readonly reason: LayerRefusal

  constructor (reason: LayerRefusal, message: string, options?: { cause?: unknown }) {
    super(layerErrorCodes[reason], message, options)
    this.reason = reason
  }
}

export function layerUnsafe (layer: string, entry: string, why: string): LayerError {
  return new LayerError('unsafe', `layer ${layer}: entry "${entry}" ${why}; the layer was refused (the caller removes the partly written root)`)
}

export function layerInvalid (layer: string, why: string, cause?: unknown): LayerError {
  return new LayerError('invalid', `layer ${layer} is not a valid layer: ${why}`, { cause })
}

export function layerTooLarge (layer: string, why: string): LayerError {
  return new LayerError('too-large', `layer ${layer}: ${why}; raise the limit only for images you trust`)
}
