// Load medcam's DICOM Parametric Map and SEG the way OHIF v3 does, and report what it shows.
//
// OHIF loads derived objects through @cornerstonejs/adapters:
//   PM:  adaptersPMAP.Cornerstone3D.ParametricMap.generateToolState(volume.imageIds, buffer,
//        metaData), then copies the returned pixelData onto a volume derived from the source
//        volume, frame k onto slice k (extensions/cornerstone-dicom-pmap).
//   SEG: adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(imageIds, buffer,
//        {metadataProvider: metaData, tolerance: 0.001}) -> one labelmap image per source image.
// The source volume's imageIds are sorted by @cornerstonejs/core's sortImageIdsAndGetSpacing,
// as its streaming volume loader does. Instance metadata comes from the source files read with
// dcmjs (numbers parsed from the DICOM strings, as from DICOMweb JSON); for a multi-frame
// source each frame gets its own imageId (.../frames/N) and its functional groups are merged
// into the instance, as OHIF's metadata provider does.
//
// Usage: node ohif_load.mjs request.json
//   request: {"sources": [file, ...], "pm": file|null, "seg": [file, ...], "out": folder}
// Prints a JSON report; writes <out>/pm.f32 (the PM pixelData as OHIF gets it, in volume slice
// order) and <out>/seg<i>.u8 (each SEG's labelmap, in the same slice order).

import fs from 'node:fs';
import path from 'node:path';
import * as core from '@cornerstonejs/core';
import { adaptersPMAP, adaptersSEG } from '@cornerstonejs/adapters';
import dcmjs from 'dcmjs';

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

function readDataset(file) {
  const bytes = fs.readFileSync(file);
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const dicom = DicomMessage.readFile(buffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(dicom.dict);
  return { dataset, buffer };
}

function first(value) {
  return Array.isArray(value) ? value[0] : value;
}

// Lift a frame's functional groups (shared, then per-frame) into a flat instance, as OHIF's
// combineFrameInstance does (items holding a SOPInstanceUID, e.g. Philips' private per-frame
// copies of the header, are skipped there too).
function frameInstance(dataset, frameIndex) {
  const instance = { ...dataset };
  delete instance.PixelData;
  const groups = [
    first(dataset.SharedFunctionalGroupsSequence),
    dataset.PerFrameFunctionalGroupsSequence?.[frameIndex],
  ];
  for (const group of groups) {
    if (!group) continue;
    for (const value of Object.values(group)) {
      const item = first(value);
      if (item && typeof item === 'object' && !Array.isArray(item) && !item.SOPInstanceUID) {
        Object.assign(instance, item);
      }
    }
  }
  return instance;
}

const registry = new Map();

function numbers(values) {
  return (values || []).map(Number);
}

function provider(type, imageId) {
  const instance = registry.get(imageId);
  if (!instance) return undefined;
  const iop = numbers(instance.ImageOrientationPatient);
  const ipp = numbers(instance.ImagePositionPatient);
  const spacing = numbers(instance.PixelSpacing);
  switch (type) {
    case 'instance':
      return instance;
    case 'imagePlaneModule':
      return {
        frameOfReferenceUID: instance.FrameOfReferenceUID,
        rows: instance.Rows,
        columns: instance.Columns,
        imageOrientationPatient: iop,
        rowCosines: iop.slice(0, 3),
        columnCosines: iop.slice(3, 6),
        imagePositionPatient: ipp,
        sliceThickness: Number(instance.SliceThickness),
        pixelSpacing: spacing,
        rowPixelSpacing: spacing[0],
        columnPixelSpacing: spacing[1],
      };
    case 'generalImageModule':
      return {
        sopInstanceUID: instance.SOPInstanceUID,
        instanceNumber: instance.InstanceNumber,
      };
    case 'generalSeriesModule':
      return {
        modality: instance.Modality,
        seriesInstanceUID: instance.SeriesInstanceUID,
        studyInstanceUID: instance.StudyInstanceUID,
      };
    case 'imagePixelModule':
      return {
        samplesPerPixel: instance.SamplesPerPixel,
        photometricInterpretation: instance.PhotometricInterpretation,
        rows: instance.Rows,
        columns: instance.Columns,
        bitsAllocated: instance.BitsAllocated,
        bitsStored: instance.BitsStored,
        highBit: instance.HighBit,
        pixelRepresentation: instance.PixelRepresentation,
      };
    default:
      return undefined;
  }
}

function describe(imageId) {
  const instance = registry.get(imageId);
  const match = imageId.match(/\/frames\/(\d+)$/);
  return {
    sop: instance.SOPInstanceUID,
    frame: instance.NumberOfFrames > 1 ? Number(match[1]) : null,
    position: numbers(instance.ImagePositionPatient),
  };
}

async function main() {
  const request = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  core.metaData.addProvider(provider, 10000);
  const imageIds = [];
  for (const file of request.sources) {
    const { dataset } = readDataset(file);
    const frames = Number(dataset.NumberOfFrames) || 1;
    for (let f = 0; f < frames; f++) {
      const imageId =
        `wadors:medcam/studies/${dataset.StudyInstanceUID}/series/${dataset.SeriesInstanceUID}` +
        `/instances/${dataset.SOPInstanceUID}/frames/${f + 1}`;
      registry.set(imageId, frames > 1 ? frameInstance(dataset, f) : dataset);
      imageIds.push(imageId);
    }
  }
  // the source volume, as the streaming volume loader builds it
  const plane = provider('imagePlaneModule', imageIds[0]);
  const normal = [
    plane.rowCosines[1] * plane.columnCosines[2] - plane.rowCosines[2] * plane.columnCosines[1],
    plane.rowCosines[2] * plane.columnCosines[0] - plane.rowCosines[0] * plane.columnCosines[2],
    plane.rowCosines[0] * plane.columnCosines[1] - plane.rowCosines[1] * plane.columnCosines[0],
  ];
  const { sortedImageIds, origin, zSpacing } = core.utilities.sortImageIdsAndGetSpacing(
    imageIds,
    normal
  );
  const report = {
    volume: {
      slices: sortedImageIds.map(describe),
      origin: Array.from(origin),
      zSpacing,
      direction: [...plane.rowCosines, ...plane.columnCosines, ...normal],
      rows: plane.rows,
      columns: plane.columns,
    },
  };
  fs.mkdirSync(request.out, { recursive: true });
  if (request.pm) {
    const { buffer } = readDataset(request.pm);
    try {
      const { pixelData } = await adaptersPMAP.Cornerstone3D.ParametricMap.generateToolState(
        sortedImageIds,
        buffer,
        core.metaData
      );
      fs.writeFileSync(path.join(request.out, 'pm.f32'), Buffer.from(pixelData.buffer));
      report.pm = { loaded: true, type: pixelData.constructor.name, length: pixelData.length };
    } catch (error) {
      report.pm = { loaded: false, error: String(error.message || error) };
    }
  }
  report.seg = [];
  for (const [i, file] of (request.seg || []).entries()) {
    const { buffer } = readDataset(file);
    try {
      const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
        sortedImageIds,
        buffer,
        { metadataProvider: core.metaData, tolerance: 0.001 }
      );
      const images = result.labelMapImages[0];
      const size = plane.rows * plane.columns;
      const out = new Uint8Array(size * sortedImageIds.length);
      images.forEach((image) => {
        const k = sortedImageIds.indexOf(image.referencedImageId);
        const data = image.voxelManager
          ? image.voxelManager.getScalarData()
          : image.getPixelData();
        out.set(data.subarray(0, size), k * size);
      });
      fs.writeFileSync(path.join(request.out, `seg${i}.u8`), Buffer.from(out.buffer));
      report.seg.push({
        loaded: true,
        segments: result.segMetadata.data.filter(Boolean).length,
        framesWithSegments: result.segmentsOnFrame
          .map((s, k) => (s && s.length ? k : null))
          .filter((k) => k !== null),
      });
    } catch (error) {
      report.seg.push({ loaded: false, error: String(error.message || error) });
    }
  }
  process.stdout.write(JSON.stringify(report));
}

main().catch((error) => {
  process.stderr.write(String(error.stack || error));
  process.exit(1);
});
