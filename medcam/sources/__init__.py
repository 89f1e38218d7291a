"""Where scans come from: local files and folders, a DICOMweb server, a DIMSE peer."""

from medcam.sources.base import (
    SeriesFilter,
    SeriesRef,
    Source,
    open_source,
    register_source,
    source_kinds,
)

__all__ = ["SeriesFilter", "SeriesRef", "Source", "open_source", "register_source", "source_kinds"]
