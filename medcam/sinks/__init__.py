"""Where results go: a folder, a DICOMweb server (STOW-RS) or a DIMSE peer (C-STORE)."""

from medcam.sinks.base import Sink, WrittenCase, open_sink, register_sink, sink_kinds

__all__ = ["Sink", "WrittenCase", "open_sink", "register_sink", "sink_kinds"]
