import { UigniterError, type ErrorCode } from '../core/errors.js'

/** The code a layer is refused with, by the reason (which callers may match on too). */
export const layerErrorCodes: Record<LayerRefusal, ErrorCode> = {
  unsafe: 'UIG_ERR_OCI_LAYER_UNSAFE',
  invalid: 'UIG_ERR_OCI_LAYER_INVALID',
  'too-large': 'UIG_ERR_OCI_LAYER_TOO_LARGE'
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
