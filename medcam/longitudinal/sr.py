"""DICOM outputs of a longitudinal comparison: the difference map as a Parametric Map, and per
visit a SEG of its findings with a TID 1500 Measurement Report (Comprehensive 3D SR).

Each finding keeps one TrackingUID at every visit (its :attr:`Finding.uid`), in the SEG's
segment description and in the SR's measurement group, so a PACS or OHIF shows "Finding 2" at
each visit with its volume, linked to the segment it was measured on. A visit's SR lives in that
visit's study, references its source series and its SEG, and states its time point (order,
days since baseline; the baseline is marked "Baseline").

Source series may lack type-2 attributes (PatientBirthDate, PatientSex, AccessionNumber, ...)
that highdicom reads unconditionally; the derived objects are built from copies of the headers
in which the missing ones are present and empty (as the standard allows), so such a series
never crashes a writer. The inputs are not modified.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from medcam.writers.dicom_common import complete_type2

__all__ = [
    "difference_parametric_map",
    "write_findings_dicom",
]

SERIES_NUMBER_PM, SERIES_NUMBER_SEG, SERIES_NUMBER_SR = 9500, 9510, 9520


def _scan(tp):
    return dataclasses.replace(tp.scan, datasets=complete_type2(tp.scan.datasets))


def _method(result) -> str:
    return str(result.baseline.provenance.get("method") or "gradcam")


def difference_parametric_map(diff: np.ndarray, result, label: str):
    """``diff (X, Y, Z)`` (follow-up minus baseline, baseline grid) as a Parametric Map on the
    baseline series."""
    from medcam.writers.dicom_common import DicomIdentity
    from medcam.writers.dicom_pm import build_parametric_map

    return build_parametric_map(
        diff, _scan(result.baseline), method=_method(result), label=f"difference {label}",
        identity=DicomIdentity.new(SERIES_NUMBER_PM),
        description=f"medcam heatmap change {label} vs baseline",
    )  # fmt: skip


def _seg(tp, masks: list[tuple[object, np.ndarray]], method: str, visit: str):
    """A BINARY SEG on ``tp``'s series with one segment per ``(finding, mask (X, Y, Z))``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medcam import __version__
    from medcam.writers.dicom_common import DicomIdentity, method_code

    scan = _scan(tp)
    frames = np.stack([np.transpose(m, (2, 1, 0)) for _, m in masks], axis=-1).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medcam {method}", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=f.name,
            segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
            segmented_property_type=method_code(method),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=f.uid,
            tracking_id=f.name,
        )
        for k, (f, _) in enumerate(masks, start=1)
    ]
    identity = DicomIdentity.new(SERIES_NUMBER_SEG)
    seg = hd.seg.Segmentation(
        source_images=scan.datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        omit_empty_frames=True,  # a finding spans a few slices: store only those
        content_label="FINDINGS",
        content_description=f"medcam findings {visit}"[:64],
        content_creator_name="medcam^",
        **identity.highdicom_kwargs(),
    )
    seg.SeriesDescription = f"medcam findings {visit}"[:64]
    return seg


def _sr(tp, result, visit_index: int, seg, segment_of: dict[int, int]):
    """TID 1500 Measurement Report of the tracked findings at one visit."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    from medcam import __version__
    from medcam.writers.dicom_common import DicomIdentity, method_code

    ml = Code("mL", "UCUM", "milliliter")
    row = result.rows[visit_index]
    method = _method(result)
    when = hd.sr.TimePointContext(
        time_point=row["visit"][:64],
        time_point_type=codes.DCM.Baseline if visit_index == 0 else None,
        time_point_order=visit_index + 1,
        temporal_offset_from_event=hd.sr.LongitudinalTemporalOffsetFromEvent(
            value=float(row["days"]), unit=codes.UCUM.Day, event_type=codes.DCM.Baseline
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(name="medcam", version=__version__)
    groups = []
    for f in result.findings:
        fv = f.visits[visit_index]
        tracking = hd.sr.TrackingIdentifier(uid=f.uid, identifier=f.name)
        if f.number in segment_of:
            volume = hd.sr.Measurement(name=codes.SCT.Volume, value=float(fv.volume_ml),
                                       unit=ml, algorithm_id=algorithm)  # fmt: skip
            segment = hd.sr.ReferencedSegment(  # the series, not each of its images
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=segment_of[f.number],
                source_series=hd.sr.SourceSeriesForSegmentation(
                    tp.scan.datasets[0].SeriesInstanceUID
                ),
            )
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=segment,
                time_point_context=when,
                finding_type=method_code(method),
                algorithm_id=algorithm,
                measurements=[volume],
            ))  # fmt: skip
        elif fv.status == "resolved":
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                time_point_context=when,
                finding_type=method_code(method),
                algorithm_id=algorithm,
                measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=0.0, unit=ml,
                                                algorithm_id=algorithm)],
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                    name=codes.DCM.Finding, value=codes.SCT.Absent)],
            ))  # fmt: skip
    if not groups:
        return None
    modality = str(tp.provenance.get("modality") or tp.scan.datasets[0].get("Modality", ""))
    procedure = (codes.LN.MRIUnspecifiedBodyRegion if modality == "MR"
                 else codes.LN.CTUnspecifiedBodyRegion)  # fmt: skip
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DicomIdentity.new(0).sop_uid, name="medcam", model_name="medcam-monai"),
    )  # fmt: skip
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    identity = DicomIdentity.new(SERIES_NUMBER_SR)
    evidence = [*_scan(tp).datasets] + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=identity.series_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_uid,
        instance_number=1,
        manufacturer="medcam",
        series_description=f"medcam finding measurements {row['visit']}"[:64],
    )
    return sr


def write_findings_dicom(result, folder) -> list[Path]:
    """For each DICOM visit: ``findings_<visit>_seg.dcm`` (its findings, one segment each) and
    ``findings_<visit>_sr.dcm`` (TID 1500 volumes with stable tracking identifiers)."""
    from medcam.io.output import safe_name
    from medcam.longitudinal.findings import PRESENT
    from medcam.longitudinal.report import _is_dicom

    written = []
    method = _method(result)
    for i, tp in enumerate(result.timepoints):
        if not _is_dicom(tp):
            continue
        visit = result.rows[i]["visit"]
        labels = result.own_labels[i]
        masks = [(f, np.isin(labels, f.visits[i].labels)) for f in result.findings
                 if f.visits[i].status in PRESENT]  # fmt: skip
        seg = _seg(tp, masks, method, visit) if masks else None
        segment_of = {f.number: k for k, (f, _) in enumerate(masks, start=1)}
        sr = _sr(tp, result, i, seg, segment_of)
        name = safe_name(f"findings_{visit}")
        if seg is not None:
            written.append(folder.write_file(f"{name}_seg.dcm", lambda p, d=seg: d.save_as(p)))
        if sr is not None:
            written.append(folder.write_file(f"{name}_sr.dcm", lambda p, d=sr: d.save_as(p)))
    return written
