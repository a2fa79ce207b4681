import type { EventEmitter } from 'node:events'
import type { Volume, VolumeCreateRequest } from '../core/volume.js'

/** What the API and the CLI's daemon routes need of the volumes ('volume' events carry a VolumeEvent). */
export interface VolumesApi extends EventEmitter {
  create: (request: VolumeCreateRequest) => Promise<Volume>
  list: () => Promise<Volume[]>
  get: (name: string) => Promise<Volume>
  remove: (name: string) => Promise<void>
}
